-- Users, sign-in sessions, API keys, projects, collaborators, runtimes, resource profiles, audit.

CREATE TABLE users (
    id bigserial PRIMARY KEY,
    username text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
    email text NOT NULL,
    name text NOT NULL DEFAULT '',
    password_hash text,
    is_admin boolean NOT NULL DEFAULT false,
    is_active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Browser sign-in sessions; only a digest of the cookie value is stored.
CREATE TABLE login_sessions (
    token_digest text PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX login_sessions_user ON login_sessions (user_id);

-- Failed sign-ins, for throttling by username and by client address.
CREATE TABLE login_failures (
    id bigserial PRIMARY KEY,
    username text NOT NULL,
    remote text NOT NULL,
    failed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX login_failures_username ON login_failures (username, failed_at);
CREATE INDEX login_failures_remote ON login_failures (remote, failed_at);

-- CML API v2 keys: shown once, stored as a digest.
CREATE TABLE api_keys (
    id bigserial PRIMARY KEY,
    key_id text NOT NULL UNIQUE,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    key_digest text NOT NULL UNIQUE,
    comments text NOT NULL DEFAULT '',
    audiences text[] NOT NULL,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

CREATE TABLE projects (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    name text NOT NULL,
    slug text NOT NULL,
    owner_id bigint NOT NULL REFERENCES users(id),
    creator_id bigint NOT NULL REFERENCES users(id),
    description text NOT NULL DEFAULT '',
    visibility text NOT NULL DEFAULT 'private' CHECK (visibility IN ('private', 'organization', 'public')),
    default_engine_type text NOT NULL DEFAULT 'ml_runtime',
    template text NOT NULL DEFAULT 'blank',
    git_url text NOT NULL DEFAULT '',
    creation_status text NOT NULL DEFAULT 'success' CHECK (creation_status IN ('creating', 'success', 'failure')),
    creation_message text NOT NULL DEFAULT '',
    shared_memory_limit integer NOT NULL DEFAULT 64,
    ephemeral_storage_request integer NOT NULL DEFAULT 0,
    ephemeral_storage_limit integer NOT NULL DEFAULT 0,
    environment jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, name),
    UNIQUE (owner_id, slug)
);
CREATE INDEX projects_updated ON projects (updated_at DESC, id DESC);

CREATE TABLE project_collaborators (
    project_id bigint NOT NULL REFERENCES projects(id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    permission text NOT NULL CHECK (permission IN ('read', 'operator', 'write', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_collaborators_user ON project_collaborators (user_id);

CREATE TABLE runtimes (
    image_identifier text PRIMARY KEY,
    editor text NOT NULL,
    kernel text NOT NULL,
    edition text NOT NULL,
    description text NOT NULL DEFAULT '',
    full_version text NOT NULL,
    short_version text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'ENABLED' CHECK (status IN ('ENABLED', 'DISABLED', 'DEPRECATED')),
    register_user_id integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cpu_profiles (
    id serial PRIMARY KEY,
    cpu double precision NOT NULL CHECK (cpu > 0),
    memory double precision NOT NULL CHECK (memory > 0),
    resource_group_id integer NOT NULL DEFAULT 0,
    UNIQUE (cpu, memory, resource_group_id)
);

CREATE TABLE audit_events (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    user_id bigint REFERENCES users(id) ON DELETE SET NULL,
    action text NOT NULL,
    target_type text NOT NULL,
    target_id text NOT NULL,
    details jsonb NOT NULL DEFAULT '{}',
    request_id text NOT NULL DEFAULT ''
);
CREATE INDEX audit_events_at ON audit_events (at DESC);
