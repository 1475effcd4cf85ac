"""Experiment tracking: MLflow's model (experiments, runs, metrics, params, tags, artifacts,
logged models) kept in Postgres and the data dir, spoken to through MLflow's own REST API
(mlflow_api.py, so the unmodified `mlflow` client works) and CML API v2 (api.py)."""
