-- Diagnostics bundles: a site administrator's request for the appliance's logs, settings and
-- recent activity over a window, made into one archive (data_dir/diagnostics/<public_id>.tar.gz).
CREATE TABLE diag_bundles (
    id bigserial PRIMARY KEY,
    public_id text NOT NULL UNIQUE,
    requester_id bigint REFERENCES users(id) ON DELETE SET NULL,
    status text NOT NULL DEFAULT 'DIAG_IN_PROGRESS'
        CHECK (status IN ('DIAG_IN_PROGRESS', 'DIAG_COMPLETED', 'DIAG_FAILED')),
    start_time timestamptz NOT NULL,
    end_time timestamptz NOT NULL,
    size_bytes bigint NOT NULL DEFAULT 0,
    failure text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
