-- Resource groups: where workloads run, one per engine this site has (local, container,
-- kubernetes), each saying which kinds of workload it takes. Accelerators: the kinds of GPU the
-- Kubernetes nodes offer, found by their node labels (nvidia.com/gpu.product), with an
-- administrator's limits; GPU profiles (gpu_count set) are a resource group's GPU shapes.
-- accelerator_quotas: GPUs of one accelerator an account's workloads may hold at once.
CREATE TABLE resource_groups (
    id serial PRIMARY KEY,
    name text NOT NULL UNIQUE,
    allow_jobs boolean NOT NULL DEFAULT true,
    allow_sessions boolean NOT NULL DEFAULT true,
    allow_models boolean NOT NULL DEFAULT true,
    allow_applications boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accelerator_labels (
    id bigserial PRIMARY KEY,
    label_key text NOT NULL DEFAULT '',
    label_value text NOT NULL DEFAULT '',
    resource_group_id integer REFERENCES resource_groups(id) ON DELETE CASCADE,
    available boolean NOT NULL DEFAULT false,
    max_gpu_count integer NOT NULL DEFAULT 0 CHECK (max_gpu_count >= 0),
    max_gpu_per_workload integer CHECK (max_gpu_per_workload >= 0),
    default_quota integer CHECK (default_quota >= 0),
    gpu_count integer CHECK (gpu_count > 0),
    cpu double precision CHECK (cpu > 0),
    memory double precision CHECK (memory > 0),
    gpu_memory double precision CHECK (gpu_memory >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX accelerator_labels_found ON accelerator_labels (label_key, label_value) WHERE gpu_count IS NULL;
CREATE UNIQUE INDEX accelerator_labels_profiles ON accelerator_labels (resource_group_id, gpu_count) WHERE gpu_count IS NOT NULL;

CREATE TABLE accelerator_quotas (
    account_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    accelerator_id bigint NOT NULL REFERENCES accelerator_labels(id) ON DELETE CASCADE,
    gpu_quota integer NOT NULL CHECK (gpu_quota >= 0),
    PRIMARY KEY (account_id, accelerator_id)
);

ALTER TABLE workloads ADD COLUMN accelerator_label_id bigint REFERENCES accelerator_labels(id) ON DELETE SET NULL;
