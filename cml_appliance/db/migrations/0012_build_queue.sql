-- Model builds become images, made by a durable queue (builds/queue.py): a build records its
-- snapshot commit (a hidden ref of the project's repository) and, once built, its image. A
-- worker claims a queued build with FOR UPDATE SKIP LOCKED and holds it by a lease that it
-- renews; a lease that runs out (a crashed appliance) lets another worker claim it again.
ALTER TABLE model_builds
    ADD COLUMN snapshot_commit text NOT NULL DEFAULT '',
    ADD COLUMN built_image text NOT NULL DEFAULT '',
    ADD COLUMN image_digest text NOT NULL DEFAULT '',
    ADD COLUMN model_root_dir text NOT NULL DEFAULT '',
    ADD COLUMN build_script_path text NOT NULL DEFAULT '',
    ADD COLUMN deploy_config jsonb,
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN lease_owner text,
    ADD COLUMN lease_expires_at timestamptz,
    ADD COLUMN started_at timestamptz,
    ADD COLUMN finished_at timestamptz,
    ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;

-- Builds of the directory-snapshot era were made at once; one caught half-way never finishes.
UPDATE model_builds SET status = 'build failed', failure = 'interrupted by an upgrade of the appliance', updated_at = now()
 WHERE status = 'building';

CREATE INDEX model_builds_queue ON model_builds (created_at) WHERE status IN ('queued', 'pending', 'pushing');
