-- Live pages: every change a page shows is announced on the channel that workloads use, with the
-- project it belongs to, so one stream per browser tab can tell a page when to refresh.
-- Workload notifications keep their 'id' (the event stream of one workload matches on it) and
-- gain the creator; the other tables' notifications carry 'table' and no 'id'.

CREATE OR REPLACE FUNCTION notify_workload_status() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM pg_notify('cml_workloads', json_build_object(
            'id', NEW.public_id, 'kind', NEW.kind, 'project_id', NEW.project_id,
            'creator_id', NEW.creator_id, 'status', NEW.status, 'reason', NEW.reason)::text);
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE FUNCTION notify_project_change() RETURNS trigger AS $$
DECLARE
    row_project bigint;
BEGIN
    IF TG_TABLE_NAME = 'projects' THEN
        row_project := COALESCE(NEW.id, OLD.id);
    ELSIF TG_TABLE_NAME IN ('applications', 'models', 'jobs') THEN
        row_project := COALESCE(NEW.project_id, OLD.project_id);
    ELSE  -- model_builds, model_deployments
        SELECT project_id INTO row_project FROM models WHERE id = COALESCE(NEW.model_id, OLD.model_id);
    END IF;
    IF row_project IS NOT NULL THEN
        PERFORM pg_notify('cml_workloads', json_build_object(
            'table', TG_TABLE_NAME, 'op', TG_OP, 'project_id', row_project)::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER projects_notify_change AFTER UPDATE OF creation_status, creation_message, name, description ON projects
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
CREATE TRIGGER applications_notify_change AFTER INSERT OR DELETE OR UPDATE OF ready_at, workload_id, name, description ON applications
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
CREATE TRIGGER models_notify_change AFTER INSERT OR DELETE ON models
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
-- Not on next_fire_at, which the scheduler moves at every fire.
CREATE TRIGGER jobs_notify_change AFTER INSERT OR DELETE OR UPDATE OF name, script, schedule, timezone, paused, parent_id ON jobs
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
CREATE TRIGGER model_builds_notify_change AFTER INSERT OR UPDATE OF status ON model_builds
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
CREATE TRIGGER model_deployments_notify_change AFTER INSERT OR UPDATE OF stopped ON model_deployments
    FOR EACH ROW EXECUTE FUNCTION notify_project_change();
