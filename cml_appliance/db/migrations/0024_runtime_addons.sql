-- Runtime add-ons: a folder of files (tools, libraries, configuration) an administrator uploads
-- as a tarball, kept in data_dir/runtime-addons/<id>, and mounted read-only at
-- /runtime-addons/<identifier> into the sessions that ask for it.
CREATE TABLE runtime_addons (
    id bigserial PRIMARY KEY,
    identifier text NOT NULL UNIQUE,
    component text NOT NULL DEFAULT '',
    display_name text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'AVAILABLE'
        CHECK (status IN ('UNKNOWN', 'AVAILABLE', 'DISABLED', 'DEPRECATED', 'DELETED', 'FAILED')),
    reason text NOT NULL DEFAULT '',
    size_bytes bigint NOT NULL DEFAULT 0,
    files integer NOT NULL DEFAULT 0,
    creator_id bigint REFERENCES users(id) ON DELETE SET NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
