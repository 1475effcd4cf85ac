-- One table for every workload (sessions, job runs, model replicas, applications), with CML's
-- EngineStatus values, and a NOTIFY on every status change for live updates.

-- Identifies this installation's workloads in engines shared with others (container labels).
CREATE TABLE site (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    site_id text NOT NULL
);
INSERT INTO site (site_id) VALUES (substr(md5(random()::text || clock_timestamp()::text), 1, 12));

CREATE TABLE workloads (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    kind text NOT NULL CHECK (kind IN ('session', 'job_run', 'model_replica', 'application')),
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    creator_id bigint NOT NULL REFERENCES users(id),
    engine text NOT NULL,
    status text NOT NULL DEFAULT 'ENGINE_SCHEDULING' CHECK (status IN (
        'ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING', 'ENGINE_STOPPING',
        'ENGINE_STOPPED', 'ENGINE_SUCCEEDED', 'ENGINE_FAILED', 'ENGINE_TIMEDOUT')),
    name text NOT NULL DEFAULT '',
    runtime_identifier text NOT NULL,
    cpu double precision NOT NULL,
    memory double precision NOT NULL,
    nvidia_gpu integer NOT NULL DEFAULT 0,
    script text NOT NULL DEFAULT '',
    arguments text NOT NULL DEFAULT '',
    environment jsonb NOT NULL DEFAULT '{}',
    handle text NOT NULL DEFAULT '',
    exit_code integer,
    reason text NOT NULL DEFAULT '',
    -- The status a requested stop ends in: ENGINE_STOPPED, or ENGINE_TIMEDOUT for time limits.
    stop_status text,
    api_key_id text,
    -- CDSW_APP_PORT and CDSW_READONLY_PORT as the engine gave them (host ports on the local engine).
    app_port integer,
    readonly_port integer,
    idle_timeout_minutes double precision,
    max_duration_minutes double precision,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    scheduling_at timestamptz NOT NULL DEFAULT now(),
    starting_at timestamptz,
    running_at timestamptz,
    stopping_at timestamptz,
    finished_at timestamptz,
    last_activity_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workloads_project ON workloads (project_id, kind, created_at DESC);
CREATE INDEX workloads_creator ON workloads (creator_id, kind, created_at DESC);
CREATE INDEX workloads_active ON workloads (engine, status)
    WHERE status IN ('ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING', 'ENGINE_STOPPING');

-- A key made for one workload (CDSW_APIV2_KEY) reaches only that workload's project.
ALTER TABLE api_keys ADD COLUMN scope_project_id bigint REFERENCES projects(id) ON DELETE CASCADE;

CREATE FUNCTION notify_workload_status() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('cml_workloads', json_build_object(
            'id', NEW.public_id, 'kind', NEW.kind, 'project_id', NEW.project_id,
            'status', NEW.status, 'reason', NEW.reason)::text);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER workloads_notify AFTER INSERT OR UPDATE ON workloads
    FOR EACH ROW EXECUTE FUNCTION notify_workload_status();
