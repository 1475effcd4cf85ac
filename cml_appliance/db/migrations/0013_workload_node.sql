-- The node a workload runs on (Kubernetes), for the UI and for telling why it waits. A
-- Kubernetes workload's namespace is the first half of its handle (namespace/pod).
ALTER TABLE workloads ADD COLUMN node text NOT NULL DEFAULT '';
