-- ENGINE_SKIPPED (CML's): a job run recorded for a cron fire that found the job's previous run
-- still going. It never ran; it may be retried (retry_for_skipped_runs).
ALTER TABLE workloads DROP CONSTRAINT workloads_status_check;
ALTER TABLE workloads ADD CONSTRAINT workloads_status_check CHECK (status IN (
    'ENGINE_SCHEDULING', 'ENGINE_STARTING', 'ENGINE_RUNNING', 'ENGINE_STOPPING',
    'ENGINE_STOPPED', 'ENGINE_SUCCEEDED', 'ENGINE_FAILED', 'ENGINE_TIMEDOUT', 'ENGINE_SKIPPED'));
