-- Teams, as CML has them: a team is an account (a users row with is_team, no password, no keys)
-- that can own projects and be a project's collaborator; its members hold a team role (read,
-- operator, write, admin), which is their role on the projects the team owns. A team that is a
-- collaborator gives its members that collaborator permission.
ALTER TABLE users ADD COLUMN is_team boolean NOT NULL DEFAULT false;
ALTER TABLE users ADD CONSTRAINT teams_have_no_password CHECK (NOT is_team OR password_hash IS NULL);

CREATE TABLE teams (
    user_id bigint PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    bio text NOT NULL DEFAULT '',
    team_type text NOT NULL DEFAULT 'local',
    -- The role a member gets when added without one.
    default_permission text NOT NULL DEFAULT 'read' CHECK (default_permission IN ('read', 'operator', 'write', 'admin')),
    created_by bigint REFERENCES users(id) ON DELETE SET NULL
);

CREATE TABLE team_members (
    team_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    permission text NOT NULL CHECK (permission IN ('read', 'operator', 'write', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (team_id, user_id)
);
CREATE INDEX team_members_user ON team_members (user_id);
