"""Who may call each route: the documented rules, one entry per route name, checked by
tests/integration/test_authz_matrix.py against every principal. A route missing here fails it.

Rules:
- public: anyone, signed in or not;
- own_auth: the route checks its caller's credentials itself (HTTP Basic or Bearer): without any,
  it refuses;
- signed_in: any signed-in user or API key (a workload's key included);
- user_not_workload: a signed-in user or a personal API key, not a workload's own key;
- site_admin: site administrators only;
- self: the user named in the path, or a site administrator;
- read / operator / write / admin: that role on the route's project, at least (owners and site
  administrators are admins of every project; a workload's key acts as its user in its project
  only);
- session_owner: the session's owner or a project admin;
- session_creator: the session's owner alone (a site administrator neither);
- team_admin: an admin of the route's team (the owner made it) or a site administrator, never a
  workload's key;
- registered_model_owner: the owner of a (private) registered model, or a site administrator (a
  workload's key acts as its user);
- skip: checked by its own credentials and tested on its own (static files; the application hand-over,
  tests/integration/test_applications.py; git, test_git_server.py; the registry, test_registry.py).

Each project's MLflow API (mlflow_*) takes API keys only, never the UI's cookie, and answers in
MLflow's shape: own_auth here; who may do what there is tested in test_experiments.py.
"""

RULES: dict[str, str] = {
    # Operations and pages anyone reaches
    "favicon": "public", "healthz": "public", "readyz": "public", "metrics": "public", "static": "skip",
    "index": "public", "setup": "public", "setup_post": "public", "login": "public", "login_post": "public",
    "logout": "public", "app_open": "skip", "model_endpoint": "public", "model_endpoint_altus": "public",
    "api_validate_key": "public", "api_openapi": "public", "api_v1_start_job": "own_auth", "api_v1_start_job_v2_path": "own_auth",
    "git_smart_http": "skip", "registry_base": "skip", "registry_token": "skip", "registry_catalog": "skip",
    "registry_api": "skip",
    # Keys
    "api_list_keys": "self", "api_create_key": "self", "api_delete_keys": "self", "api_delete_key": "self",
    # Projects
    "api_list_projects": "signed_in", "api_create_project": "user_not_workload", "api_create_amp": "user_not_workload",
    "api_get_project": "read", "api_update_project": "write", "api_delete_project": "admin",
    "api_list_collaborators": "read", "api_put_collaborator": "admin", "api_delete_collaborator": "admin",
    "api_upload_files": "write", "api_list_files_root": "read", "api_list_files": "read",
    "api_download_file": "read", "api_update_file": "write", "api_delete_file": "write",
    # Runtimes and profiles
    "api_list_runtimes": "signed_in", "api_list_cpu_profiles": "signed_in", "api_create_cpu_profile": "site_admin",
    "api_update_cpu_profile": "site_admin", "api_delete_cpu_profile": "site_admin",
    "api_register_runtime": "site_admin", "api_validate_runtime": "site_admin", "api_update_runtime_status": "site_admin",
    "api_set_runtime_credential": "site_admin", "api_list_docker_credentials": "signed_in",
    "api_create_docker_credential": "site_admin", "api_update_docker_credential": "site_admin",
    "api_delete_docker_credential": "site_admin", "api_list_runtime_repos": "signed_in", "api_list_runtime_addons": "signed_in",
    "api_update_runtime_addon_status": "site_admin", "api_upload_runtime_addon": "site_admin",
    "api_list_resource_groups": "signed_in", "api_update_resource_group": "site_admin", "api_list_node_labels": "signed_in",
    "api_node_labels_config": "site_admin", "api_node_labels_default_quota": "site_admin",
    "api_list_accelerator_user_quotas": "site_admin", "api_set_accelerator_user_quotas": "site_admin",
    "api_list_accelerator_team_quotas": "site_admin", "api_set_accelerator_team_quotas": "site_admin",
    "api_create_gpu_profile": "site_admin", "api_update_gpu_profile": "site_admin", "api_delete_gpu_profile": "site_admin",
    "api_list_users_accelerator_quota": "signed_in", "api_list_teams_accelerator_quota": "signed_in",
    "api_create_runtime_repo": "site_admin", "api_update_runtime_repo": "site_admin", "api_delete_runtime_repo": "site_admin",
    # Sessions
    "api_list_my_sessions": "signed_in", "api_list_sessions": "read", "api_start_session": "write",
    "api_get_session": "read", "api_stop_session": "session_owner", "api_session_logs": "read",
    "api_session_events": "read", "api_session_terminal": "session_owner", "api_session_terminal_transcript": "session_owner",
    # Jobs
    "api_list_all_jobs": "signed_in", "api_list_jobs": "read", "api_create_job": "write", "api_get_job": "read",
    "api_update_job": "write", "api_delete_job": "write", "api_list_job_runs": "read", "api_create_job_run": "operator",
    "api_get_job_run": "read", "api_stop_job_run": "operator", "api_job_run_logs": "read", "api_job_run_events": "read",
    # Applications
    "api_list_applications": "read", "api_create_application": "write", "api_get_application": "read",
    "api_update_application": "write", "api_delete_application": "write", "api_restart_application": "write",
    "api_stop_application": "write", "api_application_logs": "read", "api_application_events": "read",
    # Models
    "api_list_all_models": "signed_in", "api_list_models": "read", "api_create_model": "write", "api_get_model": "read",
    "api_update_model": "write", "api_delete_model": "write", "api_regenerate_model_key": "write",
    "api_list_model_builds": "read", "api_create_model_build": "write", "api_get_model_build": "read",
    "api_delete_model_build": "write", "api_cancel_model_build": "write", "ui_model_build_cancel": "write", "ui_admin_builds": "site_admin", "ui_admin_build_cancel": "site_admin", "api_model_build_logs": "read", "api_model_build_events": "read", "api_list_model_deployments": "read", "api_create_model_deployment": "write",
    "api_get_model_deployment": "read", "api_stop_model_deployment": "write", "api_restart_model_deployment": "write",
    # Pages
    "ui_api_keys": "signed_in", "ui_api_keys_create": "signed_in", "ui_api_keys_delete": "signed_in",
    "ui_admin_users": "site_admin", "ui_admin_users_create": "site_admin", "ui_admin_users_update": "site_admin",
    "ui_projects": "signed_in", "ui_project_new": "signed_in", "ui_project_create": "signed_in",
    "ui_project": "read", "ui_project_files_root": "read", "ui_project_files": "read", "ui_project_collaborators": "read",
    "ui_project_settings_page": "read", "ui_project_download": "read", "ui_project_upload": "write",
    "ui_project_delete_file": "write", "ui_project_mkdir": "write", "ui_project_collaborator_put": "admin",
    "ui_project_collaborator_delete": "admin", "ui_project_environment": "write", "ui_project_settings": "write",
    "ui_project_delete": "admin", "ui_runtimes": "signed_in",
    "ui_admin_usage": "site_admin", "ui_admin_resources": "site_admin", "ui_admin_resource_group": "site_admin",
    "ui_admin_accelerator": "site_admin", "ui_admin_diagnostics": "site_admin", "ui_admin_make_diagnostics": "site_admin",
    "ui_admin_download_diagnostics": "site_admin", "api_generate_diag_bundle": "site_admin",
    "api_diag_bundle_status": "site_admin", "api_download_diag_bundle": "site_admin", "ui_register_runtime": "site_admin", "ui_runtime_status": "site_admin", "ui_create_docker_credential": "site_admin",
    "ui_delete_docker_credential": "site_admin", "ui_my_sessions": "signed_in", "ui_sessions": "read",
    "ui_session_start": "write", "ui_session": "read", "ui_session_stop": "session_owner", "ui_jobs": "read",
    "ui_job_create": "write", "ui_job": "read", "ui_job_update": "write", "ui_job_run": "operator",
    "ui_job_delete": "write", "ui_job_run_page": "read", "ui_job_run_stop": "operator", "ui_applications": "read",
    "ui_application_create": "write", "ui_application": "read", "ui_application_action": "write",
    "ui_models": "read", "ui_model_create": "write", "ui_model": "read", "ui_model_regenerate_key": "write",
    "ui_model_delete": "write", "ui_model_test": "read", "ui_model_build": "write", "ui_model_deploy": "write",
    "ui_model_deployment_action": "write", "ui_model_replica_logs": "read", "ui_model_replica_events": "read",
    "ui_live": "signed_in",
    # Experiments (CML API v2)
    "api_list_all_experiments": "signed_in", "api_list_experiments": "read", "api_create_experiment": "write",
    "api_get_experiment": "read", "api_update_experiment": "write", "api_delete_experiment": "write",
    "api_list_experiment_runs": "read", "api_create_experiment_run": "write", "api_get_experiment_run": "read",
    "api_update_experiment_run": "write", "api_delete_experiment_run": "write", "api_get_experiment_run_metrics": "read",
    "api_log_experiment_run_batch": "write", "api_delete_experiment_run_batch": "write",
    # The model registry (site-wide, not a project's)
    "api_list_registered_models": "signed_in", "api_create_registered_model": "signed_in",
    "api_update_registered_model": "signed_in", "api_get_registered_model": "registered_model_owner",
    "api_delete_registered_model": "registered_model_owner", "api_update_registered_model_version": "registered_model_owner",
    "api_get_registered_model_version": "registered_model_owner",
    "api_delete_registered_model_version": "registered_model_owner",
    # Experiment and registry pages
    "ui_all_experiments": "signed_in", "ui_experiments": "read", "ui_experiment_create": "write", "ui_experiment": "read",
    "ui_experiment_compare": "read", "ui_experiment_run": "read", "ui_experiment_run_register": "write",
    "ui_experiment_artifact": "read", "ui_registry": "signed_in", "ui_registered_model": "registered_model_owner",
    "ui_registered_version_deploy": "registered_model_owner",
    "mlflow_unknown_endpoint": "skip",
    # Listings about workloads and people
    "api_list_workload_types": "signed_in", "api_list_workload_status": "signed_in", "api_list_project_names": "signed_in",
    "api_get_short_user": "signed_in", "api_list_workload_executions": "signed_in", "api_get_time_series": "signed_in", "api_list_usage": "signed_in",
    "api_list_machine_users": "read", "api_batch_list_projects": "signed_in",
    # Teams (synced ones answer that no directory is configured, to anyone signed in)
    "api_create_team": "user_not_workload", "api_list_teams": "signed_in", "api_get_team": "signed_in",
    "api_update_team": "team_admin", "api_delete_team": "team_admin", "api_list_team_members": "signed_in",
    "api_put_team_member": "team_admin", "api_delete_team_member": "team_admin",
    "api_create_synced_team": "signed_in", "api_latest_sync_status": "signed_in", "api_teams_sync_status": "signed_in",
    "api_users_sync_status": "signed_in", "api_list_synced_team_members": "signed_in",
    "api_update_synced_team_member": "signed_in", "api_list_synced_team_groups": "signed_in",
    "api_add_synced_team_group": "signed_in", "api_remove_synced_team_group": "signed_in",
    "api_update_synced_team_group": "signed_in",
    # Quotas
    "api_get_default_quota": "signed_in", "api_set_default_quota": "site_admin", "api_get_default_quotas": "signed_in",
    "api_set_team_default_quota": "site_admin", "api_list_users_quota": "signed_in", "api_list_groups_quota": "signed_in",
    "api_put_account_quota": "site_admin", "api_delete_account_quota": "site_admin",
    "ui_admin_quotas": "site_admin", "ui_admin_quota_default": "site_admin", "ui_admin_quota_account": "site_admin",
    "ui_teams": "signed_in", "ui_team_create": "signed_in", "ui_team": "signed_in", "ui_team_member_put": "team_admin",
    "ui_team_member_delete": "team_admin", "ui_team_delete": "team_admin",
    # A session's editor: its owner's alone (not even a project admin's), tests/integration/test_editors.py
    "ui_session_editor": "session_creator",
}
# Each project's MLflow API: see above.
MLFLOW_RULE = "own_auth"
