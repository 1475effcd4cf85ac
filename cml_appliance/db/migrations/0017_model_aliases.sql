-- MLflow's model aliases: a name ("champion") that points at one version of a registered model,
-- so that models:/<name>@<alias> loads whatever version it points at today.
CREATE TABLE registered_model_aliases (
    registered_model_id bigint NOT NULL REFERENCES registered_models(id) ON DELETE CASCADE,
    alias text NOT NULL,
    version integer NOT NULL,
    PRIMARY KEY (registered_model_id, alias),
    FOREIGN KEY (registered_model_id, version) REFERENCES registered_model_versions(registered_model_id, version)
        ON DELETE CASCADE
);
