-- The model registry (MLflow's registry, which CML API v2's /registry mirrors): a registered model
-- is site-wide, owned by a user, private (its owner and site admins) or public (everyone reads
-- it); each version is a copy of a run's logged model, kept in data_dir/model-registry/<model>/
-- <version>/ so that deleting the run or its project never breaks a deployed version.

CREATE TABLE registered_models (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    name text NOT NULL UNIQUE,
    description text NOT NULL DEFAULT '',
    owner_id bigint REFERENCES users(id) ON DELETE SET NULL,
    visibility text NOT NULL DEFAULT 'PRIVATE' CHECK (visibility IN ('PRIVATE', 'PUBLIC')),
    tags jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE registered_model_versions (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    registered_model_id bigint NOT NULL REFERENCES registered_models(id) ON DELETE CASCADE,
    version integer NOT NULL,
    user_id bigint REFERENCES users(id) ON DELETE SET NULL,
    -- Where it came from (kept as text: the run or project may be deleted later).
    project_id bigint REFERENCES projects(id) ON DELETE SET NULL,
    experiment_id text NOT NULL DEFAULT '',
    run_id text NOT NULL DEFAULT '',
    logged_model_id text NOT NULL DEFAULT '',
    model_path text NOT NULL DEFAULT '',
    source text NOT NULL DEFAULT '',
    description text NOT NULL DEFAULT '',
    tags jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'READY',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (registered_model_id, version)
);
CREATE INDEX registered_model_versions_by_run ON registered_model_versions (run_id);

-- A model build from a registered version (CreateModelBuild.registered_model_version_id).
ALTER TABLE model_builds ADD COLUMN registered_model_version_id text NOT NULL DEFAULT '';
