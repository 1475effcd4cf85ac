-- Every run of an application names it (applications.workload_id names only the current one), so
-- that ListWorkloadExecutions can show an application's past runs as its executions.
ALTER TABLE workloads ADD COLUMN application_id bigint REFERENCES applications(id) ON DELETE SET NULL;
UPDATE workloads w SET application_id = a.id FROM applications a WHERE a.workload_id = w.id;
CREATE INDEX workloads_application ON workloads (application_id);
