"""The OCI registry behind the registry proxy: CML_REGISTRY_URL's, or one the appliance runs.

With no registry_url the appliance starts Debian's `docker-registry` (docker/distribution) as a
child process, as it does Postgres: storage in data_dir/registry, listening on a Unix socket in
that directory and nowhere else. Workloads share the host's network but never see the data dir,
so the proxy (registry/proxy.py, with its tokens) is the only way in. A registry left running by
an appliance that was killed is stopped first (its pid is kept in registry.pid), and one that
dies is started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

log = logging.getLogger(__name__)

CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: true
      age: 24h
      interval: 1h
      dryrun: false
http:
  net: unix
  addr: {socket}
  secret: {secret}
"""
START_TIMEOUT_SECONDS = 30
WATCH_INTERVAL_SECONDS = 2
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes


@dataclasses.dataclass(frozen=True)
class RegistryEndpoint:
    """Where the backing registry answers: a base URL, over a Unix socket when one is given."""

    url: str
    unix_socket: str | None = None

    def session(self, **kwargs: object) -> aiohttp.ClientSession:
        connector = aiohttp.UnixConnector(path=self.unix_socket) if self.unix_socket else aiohttp.TCPConnector(limit=64)
        return aiohttp.ClientSession(connector=connector, auto_decompress=False, **kwargs)  # type: ignore[arg-type]


@dataclasses.dataclass
class RegistryStatus:
    endpoint: RegistryEndpoint | None
    why_not: str = ""


def _socket_path(root: Path) -> Path:
    path = root / "registry.sock"
    if len(str(path)) <= SOCKET_PATH_MAX:
        return path
    # A data dir deep in the file system: the socket goes to a private directory of its own.
    return Path(tempfile.mkdtemp(prefix="cml-registry-")) / "registry.sock"


def _stop_leftover(pid_file: Path) -> None:
    """A registry started by an appliance that was killed: stop it before starting ours."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if b"docker-registry" not in cmdline and b"registry" not in cmdline.split(b"\0")[0]:
        return  # the pid was reused by something else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def _wait_answering(endpoint: RegistryEndpoint, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with endpoint.session() as http:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"docker-registry exited with {proc.returncode} at start")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(endpoint.url + "/v2/") as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer within {START_TIMEOUT_SECONDS} s")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def registry(configured_url: str, data_dir: Path) -> AsyncIterator[RegistryStatus]:
    """The backing registry for as long as the appliance runs."""
    if configured_url:
        yield RegistryStatus(RegistryEndpoint(configured_url.rstrip("/")))
        return
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        why = "docker-registry is not installed (apt-get install docker-registry), and CML_REGISTRY_URL is not set"
        log.warning("no image registry: %s; builds cannot make images", why)
        yield RegistryStatus(None, why)
        return
    root = data_dir / "registry"
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    (root / "data").mkdir(mode=0o700, exist_ok=True)
    pid_file = root / "registry.pid"
    await asyncio.to_thread(_stop_leftover, pid_file)
    socket_path = _socket_path(root)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    config = root / "config.yml"
    # A fixed secret: upload sessions survive a restart of the registry.
    secret_file = root / "http_secret"
    if not secret_file.exists():
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
    config.write_text(CONFIG.format(root=root / "data", socket=socket_path, secret=secret_file.read_text().strip()))
    config.chmod(0o600)
    endpoint = RegistryEndpoint("http://registry", str(socket_path))
    state: dict[str, asyncio.subprocess.Process] = {}

    async def start() -> None:
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        with open(root / "registry.log", "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                binary, "serve", str(config), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")}, start_new_session=True)
        state["proc"] = proc
        pid_file.write_text(str(proc.pid))
        await _wait_answering(endpoint, proc)

    async def keep_running() -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_SECONDS)
            if state["proc"].returncode is not None:
                log.warning("the embedded registry exited (%s): starting it again", state["proc"].returncode)
                try:
                    await start()
                except (OSError, RuntimeError) as exc:
                    log.error("could not start the embedded registry again: %s", exc)

    await start()
    log.info("embedded registry (docker-registry) serving %s on %s", root / "data", socket_path)
    watch = asyncio.ensure_future(keep_running())
    try:
        yield RegistryStatus(endpoint)
    finally:
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        proc = state["proc"]
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
