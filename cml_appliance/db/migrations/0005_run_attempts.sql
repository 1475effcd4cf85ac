-- Which attempt a job run is (1, then 2, 3... when the job retries it).
ALTER TABLE workloads ADD COLUMN attempt integer NOT NULL DEFAULT 1;
