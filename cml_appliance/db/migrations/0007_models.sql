-- Models (CML API v2 Model, ModelBuild, ModelDeployment). A build is an immutable snapshot of the
-- project's files plus the file and function to serve; each deployment replica is a workload.

CREATE TABLE models (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    creator_id bigint NOT NULL REFERENCES users(id),
    name text NOT NULL,
    description text NOT NULL DEFAULT '',
    access_key text NOT NULL UNIQUE,
    auth_enabled boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);

CREATE TABLE model_builds (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    model_id bigint NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    creator_id bigint NOT NULL REFERENCES users(id),
    comment text NOT NULL DEFAULT '',
    file_path text NOT NULL,
    function_name text NOT NULL,
    runtime_identifier text NOT NULL,
    status text NOT NULL DEFAULT 'pending',
    failure text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    built_at timestamptz
);

CREATE TABLE model_deployments (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    model_id bigint NOT NULL REFERENCES models(id) ON DELETE CASCADE,
    build_id bigint NOT NULL REFERENCES model_builds(id) ON DELETE CASCADE,
    deployer_id bigint NOT NULL REFERENCES users(id),
    cpu double precision NOT NULL,
    memory double precision NOT NULL,
    replicas integer NOT NULL CHECK (replicas BETWEEN 1 AND 32),
    environment jsonb NOT NULL DEFAULT '{}',
    stopped boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    stopped_at timestamptz
);

ALTER TABLE workloads ADD COLUMN deployment_id bigint REFERENCES model_deployments(id) ON DELETE SET NULL;
CREATE INDEX workloads_deployment ON workloads (deployment_id);
