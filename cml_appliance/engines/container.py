"""The container engine: one container per workload through the Docker API (Docker, or Podman's
Docker-compatible service), driven with aiodocker.

The runtime's image runs the main process with the project mounted at /home/cdsw, as a non-root
user, with no new privileges, an init process (so a stop takes milliseconds, not the timeout)
and the resource profile as HostConfig limits. Terminals are TTY exec sessions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import aiohttp

from cml_appliance.core import ownership
from cml_appliance.editors.sockets import SOCKET_VARIABLE as EDITOR_SOCKET_VARIABLE
from cml_appliance.engines.base import (
    KIND_LABEL,
    SITE_LABEL,
    WORKLOAD_LABEL,
    EngineError,
    EngineUnavailable,
    LaunchSpec,
)

log = logging.getLogger(__name__)

CONTAINER_HOME = "/home/cdsw"
# CML's runtime images run as user cdsw, uid/gid 8536.
CDSW_UID = 8536
PIDS_LIMIT = 1024
# On a bridge network a workload's 127.0.0.1:$CDSW_APP_PORT is reached through port_relay.py on
# this port plus the offset, at the container's address. Workloads that serve on the port:
RELAY_PORT_OFFSET = 10000
RELAYED_KINDS = frozenset({"application", "model_replica"})
RELAY_SOURCE = (Path(__file__).parent / "port_relay.py").read_text()
# After a container exits, for the rest of its followed log; under the workloads service's
# OUTPUT_DRAIN_SECONDS, so that an unfollowed read of what the follow missed still has time.
LOG_DRAIN_SECONDS = 2


def _source_address_towards(ip: str) -> str:
    """The address this process's connections to `ip` come from (the host's end of the bridge,
    or this appliance's own container address): the one peer the relay lets in."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((ip, 9))  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])


async def followed_log(container: Any) -> AsyncIterator[str]:
    """A container's output (stdout and stderr) as it comes, ending once the container has exited.

    The exit is the container's wait, not the end of the followed log: Podman's follow does not
    always end when the container does (podman#6627, #11461; a build here once hung on it). What
    the follow has not delivered LOG_DRAIN_SECONDS after the exit is read once, unfollowed."""
    chunks: asyncio.Queue[str | None] = asyncio.Queue()
    received = 0

    async def follow() -> None:
        try:
            async for chunk in container.log(stdout=True, stderr=True, follow=True):
                chunks.put_nowait(chunk)
        finally:
            chunks.put_nowait(None)

    following = asyncio.ensure_future(follow())
    exited = asyncio.ensure_future(container.wait())
    loop = asyncio.get_running_loop()
    drain_until: float | None = None
    getting: asyncio.Future[str | None] | None = None
    try:
        while True:
            getting = asyncio.ensure_future(chunks.get())
            waiting: set[asyncio.Future[Any]] = {getting} if drain_until is not None else {getting, exited}
            timeout = None if drain_until is None else max(0.0, drain_until - loop.time())
            done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getting in done:
                chunk = getting.result()
                if chunk is None:
                    following.result()  # the follow's own error, if it ended on one
                    return
                received += len(chunk)
                yield chunk
                continue
            getting.cancel()
            if drain_until is None:  # it has exited: the follow has a moment to deliver the rest
                drain_until = loop.time() + LOG_DRAIN_SECONDS
                continue
            log.warning("the followed log of container %s did not end with it; reading it once", str(container.id)[:12])
            following.cancel()
            rest = "".join(await container.log(stdout=True, stderr=True))[received:]
            if rest:
                yield rest
            return
    finally:
        tasks = [task for task in (following, exited, getting) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _unavailable(exc: Exception) -> EngineUnavailable:
    return EngineUnavailable(f"the container engine cannot be reached: {exc}")


class ContainerTerminal:
    def __init__(self, execution: Any, stream: Any):
        self._exec = execution
        self._stream = stream
        self._closed = False

    async def read(self) -> bytes:
        try:
            message = await self._stream.read_out()
        except (aiohttp.ClientError, aiodocker.DockerError, RuntimeError):
            return b""
        return message.data if message is not None else b""

    async def write(self, data: bytes) -> None:
        try:
            await self._stream.write_in(data)
        except (aiohttp.ClientError, aiodocker.DockerError, RuntimeError, ConnectionError):
            pass

    async def resize(self, cols: int, rows: int) -> None:
        try:
            await self._exec.resize(h=rows, w=cols)
        except (aiohttp.ClientError, aiodocker.DockerError):
            pass

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._stream.close()


def _socket_binds(spec: LaunchSpec) -> list[str]:
    """A session's editor listens on a Unix socket in a directory of its own (editors/sockets.py):
    the same path inside the container, so that the appliance reaches it on the host."""
    socket = spec.env.get(EDITOR_SOCKET_VARIABLE)
    if not socket:
        return []
    folder = str(Path(socket).parent)
    return [f"{folder}:{folder}"]


class ContainerEngine:
    name = "container"

    def __init__(self, site_id: str, url: str, *, network: str = "bridge", user: str | None = None):
        self.site_id = site_id
        self.url = url
        self.network = network
        self._docker: aiodocker.Docker | None = None
        # A running container's address does not change: asked once, not on every model call.
        self._ips: dict[str, str] = {}
        # Who the workload runs as: the appliance's own uid when it is not root (so the mounted
        # project files stay writable), else CML's cdsw user.
        self.user = user or (f"{os.getuid()}:{os.getgid()}" if os.getuid() != 0 else f"{CDSW_UID}:{CDSW_UID}")

    @property
    def shares_host_network(self) -> bool:
        """Workloads on the host's network need ports of their own; on a bridge each has its own."""
        return self.network == "host"

    @property
    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            self._docker = aiodocker.Docker(url=self.url)
        return self._docker

    async def ping(self) -> None:
        # /_ping, not /version: Podman 4.3 runs ~20 helper processes to answer /version (~0.5 s).
        try:
            async with asyncio.timeout(5), self.docker._query("_ping", versioned_api=False) as response:
                await response.read()
        except (TimeoutError, aiohttp.ClientError, aiodocker.DockerError, OSError) as exc:
            raise _unavailable(exc) from None

    def _prepare_mount(self, spec: LaunchSpec) -> None:
        # The container user must be able to write the project files it is given.
        if self.user.startswith(f"{CDSW_UID}:"):
            ownership.give_tree(spec.project_dir)

    async def _pull(self, image: str, auth: dict[str, str]) -> None:
        """Pull a built image from the appliance's registry proxy. Podman is asked through its own
        API with TLS verification off (the proxy on loopback speaks plain HTTP; Docker trusts
        127.0.0.0/8 by itself); Docker's API is the fallback."""
        header = base64.urlsafe_b64encode(json.dumps(auth).encode()).decode()
        try:
            async with self.docker._query("v4.0.0/libpod/images/pull", "POST", versioned_api=False,
                                          params={"reference": image, "tlsVerify": "false", "quiet": "true"},
                                          headers={"X-Registry-Auth": header}) as response:
                body = await response.text()
            if '"error"' in body:
                raise EngineError(f"the container engine could not pull {image}: {body.strip()[:500]}")
            return
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise EngineError(f"the container engine could not pull {image}: {exc.message}") from None
        await self.docker.images.pull(image, auth=auth)

    async def pull_image(self, image: str, auth: dict[str, str]) -> None:
        """Pull `image` with a registry login ({} for none); EngineError says why it could not."""
        try:
            await self._pull(image, auth)
        except aiodocker.DockerError as exc:
            raise EngineError(f"the container engine could not pull {image}: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None

    async def inspect_image(self, image: str) -> dict[str, Any]:
        """The engine's description of a local image (Config.Labels, Config.User, Architecture...)."""
        try:
            return dict(await self.docker.images.inspect(image))
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise EngineError(f"the container engine has no image {image}") from None
            raise EngineError(f"the container engine cannot describe {image}: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None

    async def tag_image(self, image: str, reference: str) -> None:
        """Give a local image another name (repository[:tag])."""
        last = reference.rsplit("/", 1)[-1]
        repository, tag = (reference.rsplit(":", 1) if ":" in last else (reference, "latest"))
        try:
            await self.docker.images.tag(image, repository, tag=tag)
        except aiodocker.DockerError as exc:
            raise EngineError(f"the container engine cannot name {image} {reference}: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None

    async def probe(self, image: str, command: list[str], timeout: float = 60) -> tuple[int, str]:
        """Run `command` in a throwaway container of `image` as workloads run (same user, no
        capabilities), without network or project: (exit code, output)."""
        config: dict[str, Any] = {
            "Image": image, "Cmd": command, "User": self.user, "WorkingDir": "/", "Tty": False,
            "Labels": {SITE_LABEL: self.site_id, KIND_LABEL: "probe"},
            "HostConfig": {"NetworkMode": "none", "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"],
                           "PidsLimit": 256, "Memory": 1024 ** 3, "MemorySwap": 1024 ** 3},
        }
        container = None
        try:
            container = await self.docker.containers.create(config, name=f"cml-probe-{os.urandom(6).hex()}")
            await container.start()
            async with asyncio.timeout(timeout):
                code = int((await container.wait()).get("StatusCode", -1))
            output = "".join(await container.log(stdout=True, stderr=True))
            return code, output
        except TimeoutError:
            raise EngineError(f"{image} did not answer within {timeout:g} s") from None
        except aiodocker.DockerError as exc:
            if "executable file not found" in str(exc.message) or "no such file or directory" in str(exc.message):
                return 127, str(exc.message)  # as a shell says of a command it cannot find
            raise EngineError(f"the container engine cannot run {image}: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        finally:
            if container is not None:
                with contextlib.suppress(aiodocker.DockerError, aiohttp.ClientError, OSError):
                    await container.delete(force=True)

    async def start(self, spec: LaunchSpec) -> str:
        if spec.registry_auth is not None:
            await self.pull_image(spec.image, spec.registry_auth)
        if spec.mount_project:
            await asyncio.to_thread(self._prepare_mount, spec)
        env = spec.env | {"HOME": CONTAINER_HOME, "CML_SITE_ID": self.site_id, "CML_WORKLOAD_ID": spec.workload_id}
        config: dict[str, Any] = {
            "Image": spec.image,
            "Cmd": spec.command,
            "Env": [f"{k}={v}" for k, v in env.items()],
            "WorkingDir": CONTAINER_HOME,
            "User": self.user,
            "Tty": False,
            "OpenStdin": False,
            "Labels": {SITE_LABEL: self.site_id, WORKLOAD_LABEL: spec.workload_id, KIND_LABEL: spec.kind},
            "HostConfig": {
                "Binds": ([f"{spec.project_dir}:{CONTAINER_HOME}"] if spec.mount_project else [])
                         + ([f"{spec.tls_dir}:/run/cml/tls:ro"] if spec.tls_dir is not None else [])
                         + [f"{source}:{inside}:ro" for inside, source in spec.readonly_mounts.items()]
                         + _socket_binds(spec),
                "Memory": spec.memory_mb * 1024 * 1024,
                "MemorySwap": spec.memory_mb * 1024 * 1024,
                "NanoCpus": int(spec.cpu * 1e9),
                "PidsLimit": PIDS_LIMIT,
                "Init": True,
                "SecurityOpt": ["no-new-privileges"],
                "CapDrop": ["ALL"],
                "NetworkMode": self.network,
            },
        }
        try:
            container = await self.docker.containers.create(config, name=f"cml-{spec.workload_id}")
            await container.start()
            if self.network == "bridge" and spec.kind in RELAYED_KINDS and "CDSW_APP_PORT" in spec.env:
                await self._start_relay(container, int(spec.env["CDSW_APP_PORT"]))
        except aiodocker.DockerError as exc:
            message = exc.message if isinstance(exc.message, str) else str(exc)
            if exc.status == 404 and "image" in message.lower():
                raise EngineError(f"runtime image {spec.image!r} is not available to the container engine") from None
            raise EngineError(f"the container engine refused the workload: {message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        return str(container.id)

    async def _start_relay(self, container: Any, port: int) -> None:
        """Reach the workload's 127.0.0.1:port from the bridge network (port_relay.py), for this
        appliance's connections only."""
        try:
            ip = self._ip_of(await container.show())
            execution = await container.exec(
                ["python3", "-c", RELAY_SOURCE, str(port + RELAY_PORT_OFFSET), str(port), _source_address_towards(ip)],
                user=self.user)
            await execution.start(detach=True)
        except aiodocker.DockerError as exc:
            state = (await container.show()).get("State") or {}
            if not state.get("Running"):
                return  # the main process has already ended: its exit code and output tell why
            await container.delete(force=True)
            raise EngineError(
                f"the runtime image cannot run python3, which relays CDSW_APP_PORT to the appliance on the "
                f"bridge network ({exc.message}); use a runtime with Python 3, or set container_network = \"host\""
            ) from None

    async def output(self, handle: str) -> AsyncIterator[bytes]:
        container = self.docker.containers.container(handle)
        try:
            async for text in followed_log(container):
                yield text.encode() if isinstance(text, str) else text
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            log.warning("log stream of container %s ended: %s", handle[:12], exc)

    async def wait(self, handle: str) -> int | None:
        container = self.docker.containers.container(handle)
        try:
            result = await container.wait()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        self._ips.pop(handle, None)  # its address may soon be another container's
        return int(result.get("StatusCode", -1))

    async def stop(self, handle: str, grace: float) -> None:
        self._ips.pop(handle, None)
        container = self.docker.containers.container(handle)
        try:
            await container.stop(t=max(1, int(grace)))
        except aiodocker.DockerError as exc:
            if exc.status not in (304, 404):
                raise EngineError(f"cannot stop container: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None

    async def cleanup(self, handle: str) -> None:
        self._ips.pop(handle, None)
        try:
            await self.docker.containers.container(handle).delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                log.warning("cannot remove container %s: %s", handle[:12], exc.message)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("cannot remove container %s: %s", handle[:12], exc)

    async def open_terminal(self, handle: str, spec: LaunchSpec) -> ContainerTerminal:
        container = self.docker.containers.container(handle)
        shell = ["/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash -i; else exec sh -i; fi"]
        try:
            execution = await container.exec(
                shell, stdin=True, tty=True, user=self.user, workdir=CONTAINER_HOME,
                environment={"TERM": "xterm-256color", "HOME": CONTAINER_HOME},
            )
            stream = execution.start(detach=False)
            await stream.__aenter__()  # connects now, so resize and errors happen here
        except aiodocker.DockerError as exc:
            raise EngineError(f"cannot open a terminal: {exc.message}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        terminal = ContainerTerminal(execution, stream)
        await terminal.resize(80, 24)
        return terminal

    async def address(self, handle: str, port: int) -> str:
        if self.network == "host":
            return f"127.0.0.1:{port}"
        ip = self._ips.get(handle)
        if ip is None:
            try:
                info = await self.docker.containers.container(handle).show()
            except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
                raise _unavailable(exc) from None
            ip = self._ips[handle] = self._ip_of(info)
        return f"{ip}:{port + RELAY_PORT_OFFSET}"  # the relay (port_relay.py)

    @staticmethod
    def _ip_of(info: dict[str, Any]) -> str:
        networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
        ip = (info.get("NetworkSettings") or {}).get("IPAddress") or next(
            (n.get("IPAddress") for n in networks.values() if n.get("IPAddress")), ""
        )
        if not ip:
            raise EngineError("the container has no network address")
        return str(ip)

    async def list_running(self) -> dict[str, str]:
        try:
            containers = await self.docker.containers.list(
                all=True, filters={"label": [f"{SITE_LABEL}={self.site_id}"]}
            )
        except (aiodocker.DockerError, aiohttp.ClientError, OSError) as exc:
            raise _unavailable(exc) from None
        running = {}
        for container in containers:
            labels = container._container.get("Labels") or {}
            state = container._container.get("State")
            state = state.get("Status") if isinstance(state, dict) else state
            workload_id = labels.get(WORKLOAD_LABEL)
            if workload_id and state in ("running", "created", "restarting", "paused"):
                running[workload_id] = str(container.id)
        return running

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
