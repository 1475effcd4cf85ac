"""The one factory: create_app(settings) wires every component as a cleanup context,
opened in dependency order and closed in reverse."""

from __future__ import annotations

import asyncio
import functools
import os
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import aiohttp_jinja2
import asyncpg
import jinja2
from aiohttp import web

from cml_appliance.api import openapi
from cml_appliance.applications import api as applications_api
from cml_appliance.applications import origin as applications_origin
from cml_appliance.applications import proxy as applications_proxy
from cml_appliance.applications import ui as applications_ui
from cml_appliance.applications.service import ApplicationService
from cml_appliance.auth import api as auth_api
from cml_appliance.auth import ui as auth_ui
from cml_appliance.core import pki
from cml_appliance.core.paths import static_dir
from cml_appliance.core.settings import Settings
from cml_appliance.core.tasks import Supervisor
from cml_appliance.db import migrate
from cml_appliance.db.pool import create_pool, database_url
from cml_appliance.engines.base import Engine
from cml_appliance.engines.container import ContainerEngine
from cml_appliance.engines.kubernetes.engine import KubernetesEngine, KubernetesSettings, load_configuration
from cml_appliance.engines.kubernetes.watcher import PodWatcher
from cml_appliance.engines.local import LocalEngine
from cml_appliance.engines.sandbox import find_sandbox
from cml_appliance.gitserver import http as git_http
from cml_appliance.grpc import server as grpc_server
from cml_appliance.grpc.certificates import WorkloadCertificates
from cml_appliance.gitserver.repos import Repositories
from cml_appliance.jobs import api as jobs_api
from cml_appliance.jobs import notify
from cml_appliance.jobs import ui as jobs_ui
from cml_appliance.jobs.service import JobService
from cml_appliance.editors import proxy as editors_proxy
from cml_appliance.editors.origin import EditorsOrigin
from cml_appliance.editors.service import EditorProxy
from cml_appliance.editors.sockets import EditorSockets
from cml_appliance.experiments import api as experiments_api
from cml_appliance.experiments import mlflow_api, mlflow_registry_api
from cml_appliance.experiments import registry_api
from cml_appliance.experiments import ui as experiments_ui
from cml_appliance.experiments.artifacts import ArtifactStore
from cml_appliance.experiments.registry import ModelRegistry
from cml_appliance.experiments.service import TrackingService
from cml_appliance.models import api as models_api
from cml_appliance.models import ui as models_ui
from cml_appliance.builds.image import ImageBuilder
from cml_appliance.models.service import REPLICA_SERVER, SERVER_NAME, BuildSettings, ModelService
from cml_appliance.registry.client import RegistryClient
from cml_appliance.projects import api as projects_api
from cml_appliance.projects import ui as projects_ui
from cml_appliance.projects.service import ProjectService
from cml_appliance.registry import embedded as embedded_registry
from cml_appliance.registry import proxy as registry_proxy
from cml_appliance.runtimes import api as runtimes_api
from cml_appliance.runtimes import catalog
from cml_appliance.runtimes import ui as runtimes_ui
from cml_appliance.runtimes.addons import RuntimeAddons
from cml_appliance.runtimes.credentials import DockerCredentials
from cml_appliance.projects.amps import AmpService
from cml_appliance.diagnostics import api as diagnostics_api
from cml_appliance.diagnostics import ui as diagnostics_ui
from cml_appliance.diagnostics.service import Diagnostics
from cml_appliance.core.logs import recent_records
from cml_appliance.runtimes.custom import CustomRuntimes
from cml_appliance.sessions import api as sessions_api
from cml_appliance.sessions import ui as sessions_ui
from cml_appliance.sessions.service import SessionService
from cml_appliance.web import health, listener, live, middlewares, templating
from cml_appliance.web.keys import (
    CLOSING,
    ACCELERATORS,
    RUNTIME_ADDONS,
    CUSTOM_RUNTIMES,
    DIAGNOSTICS,
    DOCKER_CREDENTIALS,
    LOCAL_SANDBOX,
    POD_WATCHER,
    APP_PROXY_SESSION,
    AMPS,
    APPLICATIONS,
    APPS_ORIGIN,
    ARTIFACTS,
    EDITORS,
    EDITORS_ORIGIN,
    MODEL_REGISTRY,
    JOBS,
    METRICS,
    GIT,
    GRPC_PORT,
    INTERNAL_URL,
    TLS_CONTEXT,
    MODELS,
    REGISTRY,
    REGISTRY_SESSION,
    POOL,
    PROJECTS,
    SESSIONS,
    SETTINGS,
    STATUS_HUB,
    SUPERVISOR,
    QUOTAS,
    TEAMS,
    TRACKING,
    WEBSOCKETS,
    WORKLOADS,
)
from cml_appliance.web.metrics import Metrics
from cml_appliance.api import unimplemented
from cml_appliance.quotas import api as quotas_api
from cml_appliance.quotas import ui as quotas_ui
from cml_appliance.quotas import accelerators_api, resources_ui
from cml_appliance.quotas.accelerators import Accelerators
from cml_appliance.quotas.service import QuotaService
from cml_appliance.teams import api as teams_api
from cml_appliance.teams import ui as teams_ui
from cml_appliance.teams.service import TeamService
from cml_appliance.workloads import api as workloads_api
from cml_appliance.workloads import ui as workloads_ui
from cml_appliance.workloads import store as workload_store
from cml_appliance.workloads.events import StatusHub
from cml_appliance.workloads.logs import LogStore
from cml_appliance.workloads.service import WorkloadService

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, migrate_on_start: bool | None = None, allow_local_git: bool = False) -> web.Application:
    app = web.Application(
        middlewares=[
            middlewares.observe,
            middlewares.errors,
            applications_proxy.gateway,  # application traffic goes no further
            middlewares.authenticate,
            middlewares.csrf,
            templating.page_context,
        ],
        client_max_size=settings.max_json_body_mb * 1024 * 1024,
    )
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[CLOSING] = asyncio.Event()
    app[APPS_ORIGIN] = applications_origin.AppsOrigin(settings)
    app[EDITORS_ORIGIN] = EditorsOrigin(settings)
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("cml_appliance.web", "templates"),
        autoescape=True,
    )
    templating.setup(app)
    should_migrate = settings.migrate_on_start if migrate_on_start is None else migrate_on_start
    resolved: dict[str, str] = {}  # the database URL once known (embedded Postgres makes its own)
    found_sandbox: dict[str, Any] = {}  # the local sandbox (or None) and why not, found once

    async def database(app: web.Application) -> AsyncIterator[None]:
        async with database_url(settings.database_url, settings.data_dir) as dsn:
            resolved["dsn"] = dsn
            pool = await create_pool(dsn, settings.database_pool_min, settings.database_pool_max)
            try:
                async with pool.acquire() as conn:
                    if should_migrate:
                        await migrate.migrate(conn)
                    await migrate.require_current_schema(conn)
                await catalog.seed_runtimes(pool, settings.runtimes)
                await catalog.seed_profiles(pool, settings.cpu_profiles)
                app[POOL] = pool
                app[METRICS].watch_pool(lambda: (pool.get_size(), pool.get_idle_size(), pool.get_max_size()))
                yield
            finally:
                await pool.close()

    async def supervisor(app: web.Application) -> AsyncIterator[None]:
        app[SUPERVISOR] = Supervisor()
        yield
        await app[SUPERVISOR].close()

    async def services(app: web.Application) -> AsyncIterator[None]:
        settings.projects_dir.mkdir(parents=True, exist_ok=True)
        sandbox, why_not = (None, "local_sandbox is off") if settings.local_sandbox == "off" else await asyncio.to_thread(
            find_sandbox, [settings.data_dir], os.environ.get("PATH", ""))
        if sandbox is None and settings.local_sandbox == "bubblewrap":
            raise RuntimeError(f"local_sandbox is bubblewrap, but {why_not}")
        if sandbox is None:
            log.warning("local workloads run UNSANDBOXED, with the appliance's own rights: %s", why_not)
        found_sandbox.update(sandbox=sandbox, why_not=why_not)
        app[LOCAL_SANDBOX] = "bubblewrap" if sandbox is not None else f"none: {why_not}"
        # Git on a project runs in the same sandbox as the project's workloads.
        app[GIT] = Repositories(settings.projects_dir, sandbox)
        projects = ProjectService(app[POOL], settings.projects_dir, app[SUPERVISOR], app[GIT], allow_local_git=allow_local_git,
                                  allow_private_git_hosts=settings.allow_private_git_hosts)
        failed = await projects.fail_interrupted_creations()
        if failed:
            log.warning("marked %d project creation(s) interrupted by a restart as failed", failed)
        app[PROJECTS] = projects
        app[TEAMS] = projects.teams = TeamService(app[POOL])
        app[TRACKING] = TrackingService(app[POOL], projects, settings.data_dir / "artifacts")
        app[MODEL_REGISTRY] = ModelRegistry(app[POOL], app[TRACKING], settings.data_dir / "model-registry")
        app[ARTIFACTS] = ArtifactStore(app[TRACKING], app[MODEL_REGISTRY], settings.max_upload_mb * 1024 * 1024)
        yield

    async def image_registry(app: web.Application) -> AsyncIterator[None]:
        async with embedded_registry.registry(settings.registry_url, settings.data_dir) as status:
            app[REGISTRY] = status
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            async with (status.endpoint.session(timeout=timeout) if status.endpoint else aiohttp.ClientSession()) as session:
                app[REGISTRY_SESSION] = session
                yield

    async def internal_listener(app: web.Application) -> AsyncIterator[None]:
        """Loopback only: the git server and the registry proxy, for the builders and the container
        engine, at an address known whatever public_url says."""
        internal = listener.sharing(app, (POOL, SETTINGS, METRICS, PROJECTS, GIT, REGISTRY, REGISTRY_SESSION),
                                    middlewares=[middlewares.observe, applications_origin.errors])
        internal.router.add_routes(git_http.routes())
        internal.router.add_routes(registry_proxy.routes())
        async with listener.serving(internal, "127.0.0.1", settings.internal_port, settings.header_timeout_seconds) as port:
            app[INTERNAL_URL] = f"http://127.0.0.1:{port}"
            yield

    async def workloads(app: web.Application) -> AsyncIterator[None]:
        pool, tasks = app[POOL], app[SUPERVISOR]
        site_id = await workload_store.site_id(pool)
        sandbox, why_not = found_sandbox["sandbox"], found_sandbox["why_not"]
        engines: dict[str, Engine] = {"local": LocalEngine(site_id, sandbox)}
        if settings.container_engine_url:
            engines["container"] = ContainerEngine(site_id, settings.container_engine_url, network=settings.container_network)
        if settings.kubernetes_enabled:
            kube_settings = KubernetesSettings(
                kubeconfig=settings.kubeconfig, in_cluster=settings.kubernetes_in_cluster,
                namespace_prefix=settings.kubernetes_namespace_prefix, projects_volume=settings.kubernetes_projects_volume,
                quota=settings.kubernetes_namespace_quota, appliance_cidrs=settings.kubernetes_appliance_cidrs,
                appliance_namespace=settings.kubernetes_appliance_namespace)
            engines["kubernetes"] = KubernetesEngine(site_id, kube_settings, await load_configuration(kube_settings),
                                                     projects_dir=settings.projects_dir,
                                                     stop_grace=settings.stop_grace_seconds)
        service = WorkloadService(
            pool, engines, LogStore(settings.logs_dir, settings.workload_log_max_mb * 1024 * 1024), tasks,
            projects_dir=settings.projects_dir, base_url=settings.base_url, stop_grace=settings.stop_grace_seconds,
            runtime_engine=settings.runtime_engine,
        )
        app[WORKLOADS] = service
        app[QUOTAS] = service.quotas = QuotaService(pool)
        app[ACCELERATORS] = service.accelerators = Accelerators(pool, engines)
        await app[ACCELERATORS].seed_groups()
        app[DOCKER_CREDENTIALS] = DockerCredentials(pool, settings.secret_key)
        app[RUNTIME_ADDONS] = service.addons = RuntimeAddons(pool, settings.data_dir / "runtime-addons",
                                                             settings.max_upload_mb * 1024 * 1024)
        app[DIAGNOSTICS] = Diagnostics(pool, settings, tasks, recent_records(), engines)
        app[CUSTOM_RUNTIMES] = service.runtime_images = CustomRuntimes(
            pool, app[DOCKER_CREDENTIALS], engines.get("container"), settings.domain,
            app[INTERNAL_URL].removeprefix("http://") if INTERNAL_URL in app else None)
        service.editors = EditorSockets(settings.secret_key)
        app[EDITORS] = EditorProxy(pool, service.editors, engines)
        if sandbox is None and not settings.allow_unsandboxed_local:
            service.unsandboxed_local = why_not
        app[SESSIONS] = SessionService(pool, app[PROJECTS], service, settings)
        smtp = None
        if settings.smtp_host:
            smtp = notify.SmtpSettings(settings.smtp_host, settings.smtp_port, settings.smtp_sender,
                                       settings.smtp_username, settings.smtp_password, settings.smtp_starttls)
        app[JOBS] = JobService(pool, app[PROJECTS], service, smtp=smtp, base_url=settings.base_url)
        app[APPLICATIONS] = ApplicationService(
            pool, app[PROJECTS], service, tasks, ready_timeout=settings.app_ready_timeout_seconds,
            allow_unauthenticated=settings.allow_unauthenticated_apps,
        )
        registry = app[REGISTRY]
        builder = None
        if registry.endpoint is not None:
            container = engines.get("container")
            builder = ImageBuilder(
                RegistryClient(app[REGISTRY_SESSION], registry.endpoint.url), settings.data_dir / "build-work",
                settings.data_dir / "model_builds", (SERVER_NAME, REPLICA_SERVER.read_bytes()),
                (lambda: container.docker) if isinstance(container, ContainerEngine) else None, sandbox)
        app[MODELS] = ModelService(pool, app[PROJECTS], service, tasks, builds_dir=settings.data_dir / "model_builds",
                                   builds=BuildSettings(builder, registry.why_not, app[INTERNAL_URL],
                                                        settings.build_snapshot_max_mb * 1024 * 1024,
                                                        settings.build_concurrency, settings.build_timeout_seconds,
                                                        settings.build_lease_seconds),
                                   registry=app[MODEL_REGISTRY])
        app[AMPS] = AmpService(app[PROJECTS], app[JOBS], app[MODELS], app[APPLICATIONS])
        app[METRICS].watch_gauge("cml_model_replacements_pending", "Lost model replicas waiting to be replaced",
                                 lambda: app[MODELS].replacements_pending)
        app[APP_PROXY_SESSION] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        app[WEBSOCKETS] = set()
        hub = StatusHub()
        await hub.start(resolved["dsn"])
        app[STATUS_HUB] = hub
        # Before serving: nothing stays active that no longer runs, nothing runs that nobody owns.
        kubernetes = engines.get("kubernetes")
        if isinstance(kubernetes, KubernetesEngine):
            watcher = PodWatcher(kubernetes, pool, functools.partial(service.apply_observed, "kubernetes"),
                                 timeout_seconds=settings.kubernetes_watch_timeout_seconds,
                                 stale_seconds=settings.kubernetes_watch_stale_seconds)
            app[POD_WATCHER] = watcher
            tasks.spawn("kubernetes-pod-watch", watcher.run())
            app[METRICS].watch_gauge("cml_kubernetes_watch_cache_age_seconds",
                                     "Seconds since the pod watcher last knew the cluster's state (-1: not watching here)",
                                     lambda: -1 if watcher.cache_age() is None else watcher.cache_age())
            app[METRICS].watch_gauge("cml_kubernetes_watch_restarts", "Pod watches restarted (cut, failed or stale)",
                                     lambda: watcher.restarts)
        for name in engines:
            await service.reconcile(name, starting_up=True)
            tasks.loop(f"reconcile-{name}", functools.partial(service.reconcile, name), settings.reconcile_interval_seconds)
        await app[MODELS].resume_deployments()
        tasks.loop("session-time-limits", service.enforce_time_limits, 15)
        tasks.loop("job-scheduler", app[JOBS].scheduler_tick, 1, wake=app[JOBS].wake)
        tasks.loop("build-queue", app[MODELS].queue.tick, 5, wake=app[MODELS].queue.wake)
        yield
        try:
            await service.shutdown()
        except (asyncpg.InterfaceError, asyncpg.PostgresError, OSError) as exc:
            log.warning("could not end local workloads cleanly (the database went away): %s", exc)
        finally:
            await hub.stop()
            await app[APP_PROXY_SESSION].close()
            await app[MODELS].queue.close()
            await app[MODELS].close()

    async def grpc_listener(app: web.Application) -> AsyncIterator[None]:
        """gRPC with mutual TLS on grpc_port; every workload started from now on gets its own
        client certificate."""
        ca = await asyncio.to_thread(pki.CertificateAuthority.load_or_create, settings.pki_dir)
        hosts = [h for h in ("localhost", "127.0.0.1", settings.host if settings.host not in ("0.0.0.0", "::", "") else None) if h]
        server = grpc_server.make_server(app[POOL], app[WORKLOADS].logs)
        await server.start(settings.host, settings.grpc_port, ssl=grpc_server.server_tls(ca, hosts))
        port = server._server.sockets[0].getsockname()[1] if server._server and server._server.sockets else settings.grpc_port
        app[GRPC_PORT] = port
        connect = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        certificates = WorkloadCertificates(ca, settings.data_dir / "workload-tls", f"{connect}:{port}")
        app[WORKLOADS].certificates = certificates

        app[SUPERVISOR].loop("grpc-certificates", app[WORKLOADS].renew_certificates, 3600)
        log.info("gRPC (mutual TLS) on %s:%s", settings.host, port)
        try:
            yield
        finally:
            app[WORKLOADS].certificates = None
            server.close()
            await server.wait_closed()

    async def apps_listener(app: web.Application) -> AsyncIterator[None]:
        """Applications get a listener (an origin) of their own, once the services they need run."""
        apps_app = applications_proxy.create_listener_app(app)
        async with listener.serving(apps_app, settings.host, settings.apps_port, settings.header_timeout_seconds,
                                    app.get(TLS_CONTEXT)) as port:
            app[APPS_ORIGIN].port = port
            log.info("applications are served on %s:%s%s", settings.host, port,
                     f" and at <subdomain>.{settings.apps_domain}" if settings.apps_domain else "")
            yield

    async def editors_listener(app: web.Application) -> AsyncIterator[None]:
        """Session editors (JupyterLab) get a listener (an origin) of their own too."""
        editors_app = editors_proxy.create_listener_app(app)
        async with listener.serving(editors_app, settings.host, settings.editors_port, settings.header_timeout_seconds,
                                    app.get(TLS_CONTEXT)) as port:
            app[EDITORS_ORIGIN].port = port
            log.info("session editors are served on %s:%s", settings.host, port)
            try:
                yield
            finally:
                await app[EDITORS].close()

    app.cleanup_ctx.extend([database, supervisor, services, image_registry, internal_listener, workloads, grpc_listener,
                            apps_listener, editors_listener])
    app.on_shutdown.append(sessions_api.close_websockets)
    app.on_shutdown.append(live.end_streams)

    app.router.add_routes(health.routes())
    app.router.add_routes(openapi.routes())
    app.router.add_routes(auth_api.routes())
    app.router.add_routes(jobs_api.legacy_routes())
    app.router.add_routes(projects_api.routes())
    app.router.add_routes(runtimes_api.routes())
    app.router.add_routes(sessions_api.routes())
    app.router.add_routes(jobs_api.routes())
    app.router.add_routes(applications_api.routes())
    app.router.add_routes(applications_proxy.routes())
    app.router.add_routes(models_api.routes())
    app.router.add_routes(experiments_api.routes())
    app.router.add_routes(workloads_api.routes())
    app.router.add_routes(teams_api.routes())
    app.router.add_routes(quotas_api.routes())
    app.router.add_routes(accelerators_api.routes())
    app.router.add_routes(diagnostics_api.routes())
    app.router.add_routes(unimplemented.routes())
    app.router.add_routes(registry_api.routes())
    app.router.add_routes(mlflow_registry_api.routes())  # before mlflow_api's catch-all
    app.router.add_routes(mlflow_api.routes())
    app.router.add_routes(git_http.routes())
    app.router.add_routes(registry_proxy.routes())
    app.router.add_routes(experiments_ui.routes())
    app.router.add_routes(editors_proxy.routes())
    app.router.add_routes(teams_ui.routes())
    app.router.add_routes(quotas_ui.routes())
    app.router.add_routes(workloads_ui.routes())
    app.router.add_routes(diagnostics_ui.routes())
    app.router.add_routes(resources_ui.routes())
    app.router.add_routes(auth_ui.routes())
    app.router.add_routes(projects_ui.routes())
    app.router.add_routes(runtimes_ui.routes())
    app.router.add_routes(sessions_ui.routes())
    app.router.add_routes(jobs_ui.routes())
    app.router.add_routes(applications_ui.routes())
    app.router.add_routes(models_ui.routes())
    app.router.add_routes(live.routes())
    app.router.add_static("/static", static_dir(), name="static", append_version=True)
    return app
