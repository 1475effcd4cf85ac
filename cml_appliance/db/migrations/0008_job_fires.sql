-- Runs a job owes: a cron fire, or a retry waiting out its delay. The scheduler records a fire in
-- the transaction that moves the job's next fire on, and a run consumes its fire in the statement
-- that inserts the run; so a crash between the two loses no fire, and no fire starts twice.
CREATE TABLE job_fires (
    id bigserial PRIMARY KEY,
    job_id bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    -- Whom the run starts as: the job's creator for cron fires, the failed run's for retries.
    creator_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    due_at timestamptz NOT NULL,
    attempt integer NOT NULL DEFAULT 1,
    -- A retry repeats its run's overrides; NULL arguments means the job's own.
    environment jsonb NOT NULL DEFAULT '{}',
    arguments text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_fires_due ON job_fires (due_at);
CREATE INDEX job_fires_job ON job_fires (job_id);
