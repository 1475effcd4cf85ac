-- When a cron job fires next. The scheduler moves it forward before it starts the run, so a fire
-- is never started twice, and after downtime a missed fire runs once.
ALTER TABLE jobs ADD COLUMN next_fire_at timestamptz;
CREATE INDEX jobs_due ON jobs (next_fire_at) WHERE schedule <> '' AND NOT paused;
