"""The Kubernetes engine: one pod per workload, in a namespace per user, through kubernetes-asyncio.

Unlike the other two engines this one does not watch each workload itself: the pod watcher
(watcher.py, one per site) reads every pod's state and WorkloadService applies it to Postgres.
This module creates and deletes what a workload needs (namespace, pod, Service, Secrets), follows
a pod's log, and opens terminals through the exec subresource (the v4.channel.k8s.io protocol).
Every create is idempotent (409: it is there already) and transient apiserver errors are retried
with a capped backoff.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException
from kubernetes_asyncio.stream import WsApiClient

from cml_appliance.core import ownership
from cml_appliance.engines.base import EngineError, EngineUnavailable, LaunchSpec
from cml_appliance.editors.sockets import PORT_VARIABLE as EDITOR_PORT_VARIABLE
from cml_appliance.engines.container import RELAY_PORT_OFFSET, RELAY_SOURCE, RELAYED_KINDS
from cml_appliance.engines.kubernetes import objects

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRIES = 5
CALL_TIMEOUT = 30
# Answers worth another try: the apiserver is busy, restarting, or a new namespace's default
# ServiceAccount does not exist yet (a 1.20 race a controller must retry through).
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class KubernetesSettings:
    kubeconfig: str = ""
    in_cluster: bool = False
    namespace_prefix: str = "cml"
    # "/path" (a hostPath: one-node clusters) or the name of a PersistentVolumeClaim holding
    # every project under its id.
    projects_volume: str = ""
    quota: str = ""
    appliance_cidrs: str = ""
    appliance_namespace: str = ""


async def load_configuration(settings: KubernetesSettings) -> client.Configuration:
    configuration = client.Configuration()
    if settings.in_cluster:
        config.load_incluster_config(client_configuration=configuration)
    else:
        await config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
    return configuration


def _tls_data(folder: Path) -> dict[str, str]:
    """A workload's certificate files (grpc/certificates.py) as Secret data."""
    return {name: base64.b64encode((folder / name).read_bytes()).decode()
            for name in ("ca.pem", "tls.crt", "tls.key") if (folder / name).exists()}


def _unavailable(exc: BaseException) -> EngineUnavailable:
    return EngineUnavailable(f"the Kubernetes apiserver cannot be reached: {exc}")


def api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body).get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason or exc.status)


async def with_retries(call: Callable[[], Awaitable[T]], what: str) -> T:
    """Run an apiserver call, retrying transient failures (capped exponential backoff, jitter)."""
    delay = 0.2
    for attempt in range(RETRIES):
        try:
            async with asyncio.timeout(CALL_TIMEOUT):  # an apiserver that hangs is one that fails
                return await call()
        except ApiException as exc:
            if exc.status not in TRANSIENT_STATUSES or attempt == RETRIES - 1:
                raise
            log.info("%s: apiserver answered %s, retrying: %s", what, exc.status, api_message(exc)[:200])
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            if attempt == RETRIES - 1:
                raise _unavailable(exc) from None
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 3.0)
    raise AssertionError("unreachable")


async def create_idempotent(call: Callable[[], Awaitable[Any]], what: str) -> None:
    """Create an object; 409 (it exists already) counts as done."""
    try:
        await with_retries(call, what)
    except ApiException as exc:
        if exc.status != 409:
            raise


async def ignore_missing(call: Callable[[], Awaitable[Any]], what: str) -> None:
    try:
        await with_retries(call, what)
    except ApiException as exc:
        if exc.status != 404:
            raise


class KubernetesTerminal:
    """A TTY shell through the pod's exec subresource: channel 0 stdin, 1 stdout, 2 stderr,
    3 the final status, 4 resize (v4.channel.k8s.io)."""

    def __init__(self, ws_client: WsApiClient, socket: aiohttp.ClientWebSocketResponse):
        self._client = ws_client
        self._socket = socket

    async def read(self) -> bytes:
        while True:
            try:
                message = await self._socket.receive()
            except (aiohttp.ClientError, RuntimeError, OSError):
                return b""
            if message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                data = message.data if isinstance(message.data, bytes) else message.data.encode()
                if not data:
                    continue
                channel, payload = data[0], data[1:]
                if channel in (1, 2):
                    if payload:
                        return payload
                    continue
                if channel == 3:
                    return b""  # the shell ended (its status is on this channel)
                continue
            return b""  # closed, error

    async def write(self, data: bytes) -> None:
        try:
            await self._socket.send_bytes(b"\x00" + data)
        except (aiohttp.ClientError, RuntimeError, ConnectionError):
            pass

    async def resize(self, cols: int, rows: int) -> None:
        try:
            await self._socket.send_bytes(b"\x04" + json.dumps({"Width": cols, "Height": rows}).encode())
        except (aiohttp.ClientError, RuntimeError, ConnectionError):
            pass

    async def close(self) -> None:
        await self._socket.close()
        await self._client.close()


class KubernetesEngine:
    name = "kubernetes"
    shares_host_network = False
    # Status comes from the pod watcher, not from waiting on each workload (see WorkloadService).
    reports_status = True

    def __init__(self, site_id: str, settings: KubernetesSettings, configuration: client.Configuration,
                 *, projects_dir: Path, stop_grace: int):
        self.site_id = site_id
        self.settings = settings
        self.configuration = configuration
        self.projects_dir = projects_dir
        self.stop_grace = stop_grace
        self.quota = objects.parse_quota(settings.quota)
        self.api = client.ApiClient(configuration)
        self.core = client.CoreV1Api(self.api)
        # The pod watch has a client of its own: a long stream never holds one of the shared
        # pool's connections, and a watch connection that dies takes nothing else with it.
        self.watch_api = client.ApiClient(copy.deepcopy(configuration))
        self.watch_core = client.CoreV1Api(self.watch_api)
        self.networking = client.NetworkingV1Api(self.api)
        self._namespaces: set[str] = set()
        self._ips: dict[str, str] = {}

    # Health ----------------------------------------------------------------------------------

    async def ping(self) -> None:
        try:
            async with asyncio.timeout(5):
                await client.VersionApi(self.api).get_code()
        except ApiException as exc:
            raise EngineUnavailable(f"the Kubernetes apiserver answered {exc.status}: {api_message(exc)}") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from None

    async def node_resources(self) -> list[dict[str, Any]]:
        """Each node's labels and allocatable vCPU, memory and GPUs (nvidia.com/gpu)."""
        try:
            nodes = await self.core.list_node()
        except ApiException as exc:
            raise EngineUnavailable(f"the Kubernetes apiserver answered {exc.status}: {api_message(exc)}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        out = []
        for node in nodes.items:
            allocatable = (node.status.allocatable if node.status else None) or {}
            out.append({"name": node.metadata.name, "labels": dict(node.metadata.labels or {}),
                        "cpu": objects.parse_quantity(allocatable.get("cpu", "0")),
                        "memory_bytes": int(objects.parse_quantity(allocatable.get("memory", "0"))),
                        "gpus": int(objects.parse_quantity(allocatable.get("nvidia.com/gpu", "0")))})
        return out

    # Namespaces ------------------------------------------------------------------------------

    def namespace_for(self, username: str) -> str:
        return objects.namespace_for(self.settings.namespace_prefix, username)

    async def ensure_namespace(self, username: str) -> str:
        """The user's namespace with its quota, defaults and network policy, made on first use."""
        name = self.namespace_for(username)
        if name in self._namespaces:
            return name
        cidrs = [c.strip() for c in self.settings.appliance_cidrs.split(",") if c.strip()]
        made = objects.namespace_objects(name, self.site_id, self.quota, cidrs, self.settings.appliance_namespace or None)
        await create_idempotent(lambda: self.core.create_namespace(made["namespace"]), f"namespace {name}")
        if self.quota:
            await create_idempotent(lambda: self.core.create_namespaced_resource_quota(name, made["quota"]), "quota")
        await create_idempotent(lambda: self.core.create_namespaced_limit_range(name, made["limits"]), "limit range")
        await create_idempotent(lambda: self.networking.create_namespaced_network_policy(name, made["policy"]), "policy")
        self._namespaces.add(name)
        return name

    # Workloads -------------------------------------------------------------------------------

    def _project_volume(self, spec: LaunchSpec) -> dict[str, Any] | None:
        if not spec.mount_project:
            return None
        configured = self.settings.projects_volume
        if configured and not configured.startswith("/"):
            return {"persistentVolumeClaim": {"claimName": configured}, "subPath": spec.project_dir.name}
        # hostPath: the node sees the appliance's disk (one-node clusters); a model build's
        # snapshot is a folder of its own outside projects/, mounted as it is.
        root = Path(configured) if configured else self.projects_dir
        try:
            relative = spec.project_dir.relative_to(self.projects_dir)
            path = root / relative
        except ValueError:
            path = spec.project_dir
        return {"hostPath": {"path": str(path), "type": "Directory"}}

    async def start(self, spec: LaunchSpec) -> str:
        if not spec.owner:
            raise EngineError("a Kubernetes workload needs its owner's name (for the namespace)")
        volume = self._project_volume(spec)
        if volume is not None and "hostPath" in volume:
            # The pod's user (8536) must be able to write the project files it is given.
            await asyncio.to_thread(ownership.give_tree, volume["hostPath"]["path"])
        try:
            namespace = await self.ensure_namespace(spec.owner)
            return await self._start_in(namespace, spec)
        except ApiException as exc:
            message = api_message(exc)
            if exc.status == 404 or (exc.status == 403 and "being terminated" in message):
                # The namespace was deleted under us (or is going): make it again, once.
                self._namespaces.discard(self.namespace_for(spec.owner))
                if exc.status == 403:
                    raise EngineError(f"the namespace is being deleted; try again in a minute: {message}") from None
                try:
                    namespace = await self.ensure_namespace(spec.owner)
                    return await self._start_in(namespace, spec)
                except ApiException as again:
                    raise self._refused(again) from None
            raise self._refused(exc) from None

    @staticmethod
    def _refused(exc: ApiException) -> EngineError:
        message = api_message(exc)
        if exc.status == 403 and "exceeded quota" in message:
            return EngineError(f"refused by the namespace's quota: {message}")
        return EngineError(f"Kubernetes refused the workload ({exc.status}): {message}")

    async def _start_in(self, namespace: str, spec: LaunchSpec) -> str:
        if spec.readonly_mounts and self.settings.projects_volume:
            # Add-ons are folders of the appliance's data dir: a node reaches them only when it
            # sees the appliance's disk, as it does projects when no projects volume is set.
            raise EngineError("runtime add-ons reach pods only when the node sees the appliance's disk "
                              "(CML_KUBERNETES_PROJECTS_VOLUME unset); this site keeps projects on a volume")
        name = objects.pod_name(spec.workload_id)
        labels = {objects.SITE_LABEL: self.site_id, objects.WORKLOAD_LABEL: spec.workload_id,
                  objects.MANAGED_LABEL: objects.MANAGED_BY}
        tls_secret = pull_secret = None
        if spec.tls_dir is not None:
            tls_secret = f"{name}-tls"
            body = {"metadata": {"name": tls_secret, "labels": labels}, "type": "Opaque", "data": _tls_data(spec.tls_dir)}
            await create_idempotent(lambda: self.core.create_namespaced_secret(namespace, body), "tls secret")
        if spec.registry_auth:  # {} pulls anonymously, as the kubelet does by itself
            pull_secret = f"{name}-pull"
            auth = spec.registry_auth
            token = base64.b64encode(f"{auth['username']}:{auth['password']}".encode()).decode()
            docker_config = {"auths": {auth["serveraddress"]: {"auth": token}}}
            body = {"metadata": {"name": pull_secret, "labels": labels}, "type": "kubernetes.io/dockerconfigjson",
                    "data": {".dockerconfigjson": base64.b64encode(json.dumps(docker_config).encode()).decode()}}
            await create_idempotent(lambda: self.core.create_namespaced_secret(namespace, body), "pull secret")
        relay = None
        # Applications and models serve on CDSW_APP_PORT, a session's editor on its own port.
        port = int(spec.env["CDSW_APP_PORT"]) if spec.kind in RELAYED_KINDS and "CDSW_APP_PORT" in spec.env \
            else int(spec.env.get(EDITOR_PORT_VARIABLE) or 0)
        if port:
            peers = self.settings.appliance_cidrs or "*"
            relay = (["python3", "-c", RELAY_SOURCE, str(port + RELAY_PORT_OFFSET), str(port), peers], port)
        env = spec.env | {"HOME": objects.CONTAINER_HOME, "CML_SITE_ID": self.site_id, "CML_WORKLOAD_ID": spec.workload_id}
        pod = objects.pod_body(
            name=name, site_id=self.site_id, workload_id=spec.workload_id, kind=spec.kind,
            project_id=spec.project_dir.name, image=spec.image, command=spec.command, env=env, cpu=spec.cpu,
            memory_mb=spec.memory_mb, gpus=spec.gpus, grace_seconds=self.stop_grace,
            project_volume=self._project_volume(spec), tls_secret=tls_secret, pull_secret=pull_secret, relay=relay,
            node_selector=spec.node_selector,
            readonly_host_paths={inside: str(source) for inside, source in spec.readonly_mounts.items()},
        )
        await create_idempotent(lambda: self.core.create_namespaced_pod(namespace, pod), f"pod {name}")
        if relay is not None:
            service = objects.service_body(name, self.site_id, spec.workload_id, relay[1] + RELAY_PORT_OFFSET)
            await create_idempotent(lambda: self.core.create_namespaced_service(namespace, service), "service")
        return f"{namespace}/{name}"

    async def replace_tls_secret(self, handle: str, folder: Path) -> None:
        """A renewed gRPC certificate: the pod's Secret gets it (the kubelet updates the mounted
        files within its sync period)."""
        namespace, name = self._split(handle)
        patch = {"data": _tls_data(folder)}
        try:
            await with_retries(lambda: self.core.patch_namespaced_secret(f"{name}-tls", namespace, patch), "tls secret")
        except ApiException as exc:
            log.warning("cannot renew the gRPC certificate of %s: %s", handle, api_message(exc))

    @staticmethod
    def _split(handle: str) -> tuple[str, str]:
        namespace, _, name = handle.partition("/")
        if not namespace or not name:
            raise EngineError(f"not a Kubernetes workload handle: {handle!r}")
        return namespace, name

    async def output(self, handle: str, *, new_only: bool = False) -> AsyncIterator[bytes]:
        """The main container's output, followed until it ends. Before the container runs the
        log API answers 400 ("waiting to start"), and 204 while the pod is not on a node: asked
        again until it runs, or the pod is gone."""
        namespace, name = self._split(handle)
        first = True
        while True:
            try:
                params: dict[str, Any] = {"container": objects.MAIN_CONTAINER, "follow": True, "_preload_content": False}
                if new_only and first:
                    params["tail_lines"] = 0
                response = await self.core.read_namespaced_pod_log(name, namespace, **params)
            except ApiException as exc:
                if exc.status == 400:  # not started yet
                    await asyncio.sleep(0.3)
                    continue
                return  # 404: the pod is gone
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("log stream of %s could not start: %s", handle, exc)
                await asyncio.sleep(1)
                continue
            if response.status != 200:  # unread content: errors come back as answers here
                response.release()
                # 400: "waiting to start", not running yet. 204: not on a node yet (a loaded
                # scheduler made a job's output vanish when this was taken for the end).
                if response.status in (400, 204):
                    await asyncio.sleep(0.3)
                    continue
                return  # 404: the pod is gone
            try:
                async for chunk in response.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("log stream of %s was cut: %s", handle, exc)
                first = False
                new_only = True  # follow again from now on; what came before is kept already
                continue
            finally:
                response.release()
            return

    async def wait(self, handle: str) -> int | None:
        raise NotImplementedError("Kubernetes workloads are followed by the pod watcher")

    async def stop(self, handle: str, grace: float) -> None:
        namespace, name = self._split(handle)
        self._ips.pop(handle, None)
        try:
            await ignore_missing(lambda: self.core.delete_namespaced_pod(
                name, namespace, grace_period_seconds=max(0, int(grace))), f"delete pod {name}")
        except ApiException as exc:
            raise EngineError(f"cannot delete pod {name}: {api_message(exc)}") from None

    async def cleanup(self, handle: str) -> None:
        """Everything a workload had: its pod (at once: it has ended), Service and Secrets."""
        namespace, name = self._split(handle)
        self._ips.pop(handle, None)
        calls = [
            (lambda: self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0), "pod"),
            (lambda: self.core.delete_namespaced_service(name, namespace), "service"),
            (lambda: self.core.delete_namespaced_secret(f"{name}-tls", namespace), "tls secret"),
            (lambda: self.core.delete_namespaced_secret(f"{name}-pull", namespace), "pull secret"),
        ]
        for call, what in calls:
            try:
                await ignore_missing(call, f"delete {what} of {name}")
            except ApiException as exc:
                log.warning("cannot delete the %s of %s: %s", what, handle, api_message(exc))

    async def open_terminal(self, handle: str, spec: LaunchSpec) -> KubernetesTerminal:
        namespace, name = self._split(handle)
        shell = ["/bin/sh", "-c", "cd /home/cdsw 2>/dev/null; export TERM=xterm-256color HOME=/home/cdsw; "
                 "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi"]
        ws_client = WsApiClient(configuration=self.configuration)
        try:
            connect = await client.CoreV1Api(ws_client).connect_get_namespaced_pod_exec(
                name, namespace, container=objects.MAIN_CONTAINER, command=shell,
                stdin=True, stdout=True, stderr=True, tty=True, _preload_content=False)
            socket = await connect
        except ApiException as exc:
            await ws_client.close()
            raise EngineError(f"cannot open a terminal: {api_message(exc)}") from None
        except aiohttp.WSServerHandshakeError as exc:
            await ws_client.close()
            raise EngineError(f"cannot open a terminal ({exc.status}): {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            await ws_client.close()
            raise _unavailable(exc) from None
        terminal = KubernetesTerminal(ws_client, socket)
        await terminal.resize(80, 24)
        return terminal

    async def address(self, handle: str, port: int) -> str:
        """The pod's relay: pod IP and port + offset (reachable from the appliance's pod, or from
        the node's host on a one-node cluster)."""
        ip = self._ips.get(handle)
        if ip is None:
            namespace, name = self._split(handle)
            try:
                pod = await with_retries(lambda: self.core.read_namespaced_pod(name, namespace), f"read pod {name}")
            except ApiException as exc:
                raise EngineError(f"cannot find pod {name}: {api_message(exc)}") from None
            if not pod.status.pod_ip:
                raise EngineUnavailable(f"pod {name} has no address yet")
            ip = self._ips[handle] = pod.status.pod_ip
        return f"{ip}:{port + RELAY_PORT_OFFSET}"

    async def list_pods(self) -> tuple[list[dict[str, Any]], str]:
        """Every pod of this site, as plain dicts, and the list's resourceVersion (to watch from).
        Raw JSON, page by page: turning 10,000 pods into client models would take seconds."""
        pods: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"label_selector": f"{objects.SITE_LABEL}={self.site_id}", "limit": 2000,
                                      "_preload_content": False, "_request_timeout": 60}
            if token:
                params["_continue"] = token
            response = await with_retries(lambda: self.core.list_pod_for_all_namespaces(**params), "list pods")
            try:
                page = json.loads(await response.read())
            finally:
                response.release()
            pods.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return pods, str((page.get("metadata") or {}).get("resourceVersion") or "")

    async def list_running(self) -> dict[str, str]:
        try:
            pods, _ = await self.list_pods()
        except ApiException as exc:
            raise EngineUnavailable(f"cannot list pods: {api_message(exc)}") from None
        # Every pod that still exists, ended or being deleted too: how it ended is the pod
        # watcher's to record, not reconciliation's.
        running = {}
        for pod in pods:
            workload_id = ((pod.get("metadata") or {}).get("labels") or {}).get(objects.WORKLOAD_LABEL)
            if workload_id:
                running[workload_id] = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        return running

    async def close(self) -> None:
        await self.api.close()
        await self.watch_api.close()
