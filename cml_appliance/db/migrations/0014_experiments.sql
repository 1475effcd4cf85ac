-- Experiment tracking (MLflow's model, which CML API v2 mirrors). An experiment belongs to a
-- project; a run to an experiment. A run's params, tags and latest metric values live on its row
-- (jsonb) so that a search over them is one query; every metric point is a row of run_metrics.
-- Artifacts are files in the data dir (artifacts/<project>/<experiment>/<run>/artifacts/…).

CREATE TABLE experiments (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    creator_id bigint REFERENCES users(id) ON DELETE SET NULL,
    name text NOT NULL,
    lifecycle_stage text NOT NULL DEFAULT 'active' CHECK (lifecycle_stage IN ('active', 'deleted')),
    tags jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE experiment_runs (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL UNIQUE,
    experiment_id bigint NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    user_id bigint REFERENCES users(id) ON DELETE SET NULL,
    run_name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'RUNNING'
        CHECK (status IN ('RUNNING', 'SCHEDULED', 'FINISHED', 'FAILED', 'KILLED')),
    start_time bigint NOT NULL,          -- milliseconds since the epoch, as MLflow sends them
    end_time bigint,
    lifecycle_stage text NOT NULL DEFAULT 'active' CHECK (lifecycle_stage IN ('active', 'deleted')),
    params jsonb NOT NULL DEFAULT '{}',
    tags jsonb NOT NULL DEFAULT '{}',
    -- {key: {"value": v, "timestamp": t, "step": s}}: the point MLflow calls latest (highest step,
    -- then timestamp, then value).
    latest_metrics jsonb NOT NULL DEFAULT '{}',
    inputs jsonb NOT NULL DEFAULT '[]',
    outputs jsonb NOT NULL DEFAULT '[]'
);
CREATE INDEX experiment_runs_by_experiment ON experiment_runs (experiment_id, start_time DESC);

CREATE TABLE run_metrics (
    run_id bigint NOT NULL REFERENCES experiment_runs(id) ON DELETE CASCADE,
    key text NOT NULL,
    value double precision NOT NULL,
    timestamp bigint NOT NULL,
    step bigint NOT NULL DEFAULT 0,
    model_id text
);
CREATE INDEX run_metrics_history ON run_metrics (run_id, key, step, timestamp);

-- MLflow 3's logged models: a model an experiment produced, with its own artifacts.
CREATE TABLE logged_models (
    id bigserial PRIMARY KEY,
    model_id text NOT NULL UNIQUE,
    experiment_id bigint NOT NULL REFERENCES experiments(id) ON DELETE CASCADE,
    source_run_id text,
    name text NOT NULL,
    model_type text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'LOGGED_MODEL_PENDING',
    status_message text NOT NULL DEFAULT '',
    params jsonb NOT NULL DEFAULT '{}',
    tags jsonb NOT NULL DEFAULT '{}',
    lifecycle_stage text NOT NULL DEFAULT 'active',
    creation_timestamp bigint NOT NULL,
    last_updated_timestamp bigint NOT NULL,
    user_id bigint REFERENCES users(id) ON DELETE SET NULL
);
CREATE INDEX logged_models_by_experiment ON logged_models (experiment_id, creation_timestamp DESC);
