-- What a job run's end still owes. The statement that records a job run's final status sets
-- followup_due; the scheduler then, in one transaction, records the fires it leads to (its
-- dependents after a success, its retry after a failure) and clears it. Mail owed is marked by
-- mail_due_at, a lease: whoever sends it pushes it on first and clears it after. So a crash
-- between a run's end and what follows defers that to the next scheduler, and loses none of it.
ALTER TABLE workloads ADD COLUMN followup_due boolean NOT NULL DEFAULT false;
ALTER TABLE workloads ADD COLUMN mail_due_at timestamptz;
CREATE INDEX workloads_followup_due ON workloads (id) WHERE followup_due;
CREATE INDEX workloads_mail_due ON workloads (mail_due_at) WHERE mail_due_at IS NOT NULL;
