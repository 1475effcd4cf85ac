"""Operations of CML's API v2 that have no meaning on this appliance. Each answers CML's error
shape with 501 (gRPC UNIMPLEMENTED) and why, never a bare 404, so that a client built from CML's
swagger learns what it is missing here. Callers must still be signed in: the answer is the same
for everyone, but nobody learns anything of the appliance without a key."""

from __future__ import annotations

from aiohttp import web

from cml_appliance.core.errors import Unimplemented
from cml_appliance.web.context import current_user

SPARK = ("this appliance runs no Spark and reaches no data lake: there are no Spark defaults to read or set; "
         "install pyspark in a runtime to use Spark in local mode")
COPILOT = "this appliance has no Copilot: it serves no language or embedding models to its UI"
# (method, path, operationId, why)
UNIMPLEMENTED: tuple[tuple[str, str, str, str], ...] = (
    ("GET", "/api/v2/basecluster/sparkconfig", "ReadBaseClusterSparkDefault", SPARK),
    ("GET", "/api/v2/cml/sparkconfig/{pushdown_enabled}/{raz_enabled}", "ReadCMLSparkDefault", SPARK),
    ("POST", "/api/v2/workspaces/sparkconfig", "SetWorkspaceSparkDefault", SPARK),
    ("GET", "/api/v2/workspaces/sparkconfig/{is_pushdown}", "ReadWorkspaceSparkDefault", SPARK),
    ("GET", "/api/v2/copilot/embedding_model/{copilot_embedding_model_id}", "GetCopilotEmbeddingModel", COPILOT),
    ("GET", "/api/v2/copilot/embedding_models", "ListCopilotEmbeddingModels", COPILOT),
    ("POST", "/api/v2/copilot/embedding_models", "CreateCopilotEmbeddingModel", COPILOT),
    ("PATCH", "/api/v2/copilot/embedding_models/{copilot_embedding_model.id}", "UpdateCopilotEmbeddingModel", COPILOT),
    ("DELETE", "/api/v2/copilot/embedding_models/{copilot_embedding_model_id}", "DeleteCopilotEmbeddingModel", COPILOT),
    ("POST", "/api/v2/copilot/event", "SendCopilotEvent", COPILOT),
    ("GET", "/api/v2/copilot/model/{copilot_model_id}", "GetCopilotModel", COPILOT),
    ("GET", "/api/v2/copilot/models", "ListCopilotModels", COPILOT),
    ("POST", "/api/v2/copilot/models", "CreateCopilotModel", COPILOT),
    ("PATCH", "/api/v2/copilot/models/{copilot_model.id}", "UpdateCopilotModel", COPILOT),
    ("DELETE", "/api/v2/copilot/models/{copilot_model_id}", "DeleteCopilotModel", COPILOT),
    ("POST", "/api/v2/dashboardsarchive/{days_finished}", "DashboardsArchive",
     "this appliance has no dashboards (CML's legacy workload type) to archive: applications serve what dashboards did"),
    ("GET", "/api/v2/ml_serving_apps", "ListMlServingApps",
     "this appliance has no AI inference service (ML serving apps): models are served through POST /model"),
    ("GET", "/api/v2/newsfeeds/{category}", "ListNewsFeeds",
     "this appliance reads no news feeds: it does not reach the internet for its UI"),
    ("POST", "/api/v2/runtimeaddons", "LoadRuntimeAddonsUpload",
     "repo assemblies list Cloudera's add-on images (Spark, Hadoop CLI) in Cloudera's repository, which this appliance "
     "does not reach; upload an add-on's files as a tarball with POST /api/v2/runtimeaddons/custom"),
    ("POST", "/api/v2/site/config:update", "DisableEngines",
     "this appliance has no legacy engines to disable: every workload runs on a runtime"),
    ("POST", "/api/v2/users/{username}/v1_key:rotate", "RotateV1Key",
     "this appliance has no API v1 keys: CDSW's v1 job start takes an API v2 key "
     "(POST /api/v2/users/{username}/v2_keys makes one, DELETE …/v2_keys/{key_id} retires one)"),
)


def _handler(why: str):  # type: ignore[no-untyped-def]
    async def unimplemented(request: web.Request) -> web.Response:
        current_user(request)  # signed in first: 401 before 501
        raise Unimplemented(why)

    return unimplemented


def routes() -> list[web.RouteDef]:
    # CML names some path parameters after a message's field ({copilot_model.id}): aiohttp's are
    # identifiers, so the dot becomes an underscore (the path matches the same requests).
    return [web.route(method, path.replace(".id}", "_id}"), _handler(why), name=f"api_unimplemented_{operation}")
            for method, path, operation, why in UNIMPLEMENTED]
