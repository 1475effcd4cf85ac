-- Quotas: how much CPU (vCPU), memory (GB) and GPUs one account's workloads may hold at once.
-- default_quotas: one row per kind of account (user, team), applied where an account has no
-- quota of its own; account_quotas: an account's own (a NULL part: no limit on it). A user's
-- workloads count against the user; a team-owned project's workloads against the team too.
CREATE TABLE default_quotas (
    id bigserial UNIQUE,
    owner_type text PRIMARY KEY CHECK (owner_type IN ('user', 'team')),
    cpu double precision CHECK (cpu >= 0),
    memory double precision CHECK (memory >= 0),
    nvidia_gpu integer CHECK (nvidia_gpu >= 0),
    active boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE account_quotas (
    user_id bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    cpu double precision CHECK (cpu >= 0),
    memory double precision CHECK (memory >= 0),
    nvidia_gpu integer CHECK (nvidia_gpu >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
