-- Custom runtimes, the credentials their images are pulled with, and runtime repositories.
-- docker_credentials: a registry login; the password is sealed with a key derived from the
-- site's secret key (runtimes/credentials.py), never stored or answered in the clear. The default
-- credential is used for an image of its server when a runtime names none.
CREATE TABLE docker_credentials (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    server text NOT NULL,
    username text NOT NULL,
    password_sealed bytea NOT NULL,
    is_default boolean NOT NULL DEFAULT false,
    creator_id bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX docker_credentials_one_default_per_server ON docker_credentials (server) WHERE is_default;

-- A runtime registered by an administrator (custom) rather than named in the configuration;
-- the numeric id is what UpdateRuntimeStatus's runtime_id and cdswctl's "runtimes list" use.
ALTER TABLE runtimes
    ADD COLUMN id bigserial UNIQUE,
    ADD COLUMN custom boolean NOT NULL DEFAULT false,
    ADD COLUMN maintenance_version integer NOT NULL DEFAULT 0,
    ADD COLUMN docker_credential_id bigint REFERENCES docker_credentials(id) ON DELETE SET NULL;

-- Runtime repositories: catalogs of runtimes by URL, as CML lists them.
CREATE TABLE runtime_repos (
    id bigserial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    url text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
