"""Typed keys for what the application holds (aiohttp AppKey) and per-request state."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
from aiohttp import web

from cml_appliance.applications.origin import AppsOrigin
from cml_appliance.applications.service import ApplicationService
from cml_appliance.core.settings import Settings
from cml_appliance.diagnostics.service import Diagnostics
from cml_appliance.core.tasks import Supervisor
from cml_appliance.editors.origin import EditorsOrigin
from cml_appliance.editors.service import EditorProxy
from cml_appliance.experiments.artifacts import ArtifactStore
from cml_appliance.experiments.registry import ModelRegistry
from cml_appliance.experiments.service import TrackingService
from cml_appliance.gitserver.repos import Repositories
from cml_appliance.jobs.service import JobService
from cml_appliance.models.service import ModelService
from cml_appliance.projects.amps import AmpService
from cml_appliance.projects.service import ProjectService
from cml_appliance.quotas.accelerators import Accelerators
from cml_appliance.quotas.service import QuotaService
from cml_appliance.teams.service import TeamService
from cml_appliance.registry.embedded import RegistryStatus
from cml_appliance.runtimes.addons import RuntimeAddons
from cml_appliance.runtimes.credentials import DockerCredentials
from cml_appliance.runtimes.custom import CustomRuntimes
from cml_appliance.sessions.service import SessionService
from cml_appliance.web.metrics import Metrics
from cml_appliance.workloads.events import StatusHub
from cml_appliance.workloads.service import WorkloadService

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
PROJECTS = web.AppKey("projects", ProjectService)
# AMPs: projects set up by their .project-metadata.yaml (projects/amps.py).
AMPS = web.AppKey("amps", AmpService)
METRICS = web.AppKey("metrics", Metrics)
WORKLOADS = web.AppKey("workloads", WorkloadService)
SESSIONS = web.AppKey("sessions", SessionService)
STATUS_HUB = web.AppKey("status_hub", StatusHub)
WEBSOCKETS = web.AppKey[set[web.WebSocketResponse]]("websockets")
JOBS = web.AppKey("jobs", JobService)
APPLICATIONS = web.AppKey("applications", ApplicationService)
# Where applications are served, and the hand-over to it (applications/origin.py).
APPS_ORIGIN = web.AppKey("apps_origin", AppsOrigin)
APP_PROXY_SESSION = web.AppKey("app_proxy_session", aiohttp.ClientSession)
MODELS = web.AppKey("models", ModelService)
TEAMS = web.AppKey("teams", TeamService)
QUOTAS = web.AppKey("quotas", QuotaService)
# Resource groups (engines) and accelerators (GPU kinds) with their limits (quotas/accelerators.py).
ACCELERATORS = web.AppKey("accelerators", Accelerators)
# Custom runtimes (runtimes/custom.py) and the registry logins their images are pulled with.
CUSTOM_RUNTIMES = web.AppKey("custom_runtimes", CustomRuntimes)
DOCKER_CREDENTIALS = web.AppKey("docker_credentials", DockerCredentials)
RUNTIME_ADDONS = web.AppKey("runtime_addons", RuntimeAddons)
# Diagnostics bundles (diagnostics/service.py).
DIAGNOSTICS = web.AppKey("diagnostics", Diagnostics)
# Session editors (editors/): their origin and the proxy to each session's JupyterLab.
EDITORS_ORIGIN = web.AppKey("editors_origin", EditorsOrigin)
EDITORS = web.AppKey("editors", EditorProxy)
# Experiment tracking (experiments/): runs, metrics and the like in Postgres, artifacts on disk.
TRACKING = web.AppKey("tracking", TrackingService)
ARTIFACTS = web.AppKey("artifacts", ArtifactStore)
MODEL_REGISTRY = web.AppKey("model_registry", ModelRegistry)
# The backing OCI registry (registry/embedded.py), and the proxy's connection to it.
REGISTRY = web.AppKey("registry", RegistryStatus)
REGISTRY_SESSION = web.AppKey("registry_session", aiohttp.ClientSession)
# The internal loopback listener's base URL (http://127.0.0.1:<internal_port>): git and /v2/.
INTERNAL_URL = web.AppKey("internal_url", str)
# The gRPC listener's bound port (grpc/server.py).
GRPC_PORT = web.AppKey("grpc_port", int)
# The HTTPS context `serve` listens with (None: plain HTTP); the applications' listener uses it too.
TLS_CONTEXT = web.AppKey("tls_context", object)
# Every project's git repository (gitserver/repos.py): init, snapshots, the smart-HTTP backend.
GIT = web.AppKey("git", Repositories)
# Set when the appliance shuts down: the open /live streams end instead of holding it up.
CLOSING = web.AppKey("closing", asyncio.Event)
# How local workloads are isolated: "bubblewrap", or "none: <why>" (shown by /readyz).
LOCAL_SANDBOX = web.AppKey("local_sandbox", str)
# The Kubernetes pod watcher (engines/kubernetes/watcher.py), when Kubernetes is configured.
POD_WATCHER = web.AppKey("pod_watcher", object)
