-- Jobs (CML API v2 Job) and their runs, which are workloads of kind job_run.

CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    creator_id bigint NOT NULL REFERENCES users(id),
    name text NOT NULL,
    script text NOT NULL,
    arguments text NOT NULL DEFAULT '',
    cpu double precision NOT NULL,
    memory double precision NOT NULL,
    nvidia_gpu integer NOT NULL DEFAULT 0,
    runtime_identifier text NOT NULL,
    environment jsonb NOT NULL DEFAULT '{}',
    schedule text NOT NULL DEFAULT '',
    timezone text NOT NULL DEFAULT 'America/Los_Angeles',
    paused boolean NOT NULL DEFAULT false,
    parent_id bigint REFERENCES jobs(id) ON DELETE SET NULL,
    timeout_seconds integer NOT NULL DEFAULT 0,
    kill_on_timeout boolean NOT NULL DEFAULT true,
    retry_enabled boolean NOT NULL DEFAULT false,
    max_retry integer NOT NULL DEFAULT 0,
    retry_delay integer NOT NULL DEFAULT 0,
    retry_for_script_failure boolean NOT NULL DEFAULT false,
    retry_for_system_failure boolean NOT NULL DEFAULT false,
    retry_for_timedout_runs boolean NOT NULL DEFAULT false,
    retry_for_skipped_runs boolean NOT NULL DEFAULT false,
    recipients jsonb NOT NULL DEFAULT '[]',
    attachments jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);
CREATE INDEX jobs_parent ON jobs (parent_id);

ALTER TABLE workloads ADD COLUMN job_id bigint REFERENCES jobs(id) ON DELETE SET NULL;
-- At most one active run per job, whichever process starts it.
CREATE UNIQUE INDEX workloads_one_active_run ON workloads (job_id)
    WHERE kind = 'job_run' AND status IN ('ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING', 'ENGINE_STOPPING');
CREATE INDEX workloads_job ON workloads (job_id, created_at DESC);
