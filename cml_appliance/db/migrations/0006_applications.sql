-- Applications (CML API v2 Application): a long-running web app, reached through the appliance
-- at /apps/<subdomain>/ and at http://<subdomain>.<domain>/. Each start is a workload.

CREATE TABLE applications (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    creator_id bigint NOT NULL REFERENCES users(id),
    name text NOT NULL,
    subdomain text NOT NULL UNIQUE CHECK (subdomain ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
    description text NOT NULL DEFAULT '',
    script text NOT NULL,
    cpu double precision NOT NULL,
    memory double precision NOT NULL,
    runtime_identifier text NOT NULL,
    environment jsonb NOT NULL DEFAULT '{}',
    bypass_authentication boolean NOT NULL DEFAULT false,
    workload_id bigint REFERENCES workloads(id) ON DELETE SET NULL,
    -- Set once the app answered on its polling endpoint; cleared at each start.
    ready_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, name)
);
