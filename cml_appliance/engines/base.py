"""The engine contract: what every engine (local processes, containers, Kubernetes) does.

An engine runs a workload's main process, hands back its output and exit code, stops it, opens
terminals inside it, and lists what it really runs (for reconciliation). Engines import no
domain code: they get a LaunchSpec and return handles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

# Marks every process/container an appliance starts, so reconciliation can find them.
SITE_LABEL = "cml.site"
WORKLOAD_LABEL = "cml.workload"
KIND_LABEL = "cml.kind"


class EngineUnavailable(Exception):
    """The engine cannot be reached (daemon down, socket gone)."""


class EngineError(Exception):
    """The engine refused the workload (bad image, bad command...)."""


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    workload_id: str
    kind: str
    command: list[str]
    env: dict[str, str]
    project_dir: Path
    image: str
    cpu: float
    memory_mb: int
    # An image to pull first, with these credentials (a built model's, from the appliance's
    # registry proxy); its /home/cdsw is then the workload's, and the project is not mounted.
    registry_auth: dict[str, str] | None = None
    mount_project: bool = True
    # The workload's own gRPC client certificate (grpc/certificates.py), shown at /run/cml/tls.
    tls_dir: Path | None = None
    # Who started it (Kubernetes: the namespace is the user's) and the GPUs it asked for.
    owner: str = ""
    gpus: int = 0
    # Kubernetes: the labels of the nodes it must run on (an accelerator's).
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    # Folders shown read-only inside the workload: {path inside: folder here} (runtime add-ons).
    readonly_mounts: dict[str, Path] = dataclasses.field(default_factory=dict)


class Terminal(Protocol):
    """An interactive shell inside a workload, on a pseudo-terminal."""

    async def read(self) -> bytes:
        """Next output; b"" once the shell has ended."""

    async def write(self, data: bytes) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...

    async def close(self) -> None: ...


class Engine(Protocol):
    """Engines are built with the site id, which they put on everything they start."""

    name: str
    # True when workloads share the host's network: each then needs ports of its own.
    shares_host_network: bool

    async def ping(self) -> None:
        """Raise EngineUnavailable when the engine cannot take work."""

    async def start(self, spec: LaunchSpec) -> str:
        """Start the main process; return the handle that identifies it."""

    def output(self, handle: str) -> AsyncIterator[bytes]:
        """The main process's stdout and stderr, until it ends."""

    async def wait(self, handle: str) -> int | None:
        """Wait for the main process to end; its exit code, or None when unknown."""

    async def stop(self, handle: str, grace: float) -> None:
        """Ask the workload to end (SIGTERM), then force it after `grace` seconds."""

    async def cleanup(self, handle: str) -> None:
        """Release what is left once the workload has ended (a stopped container...)."""

    async def open_terminal(self, handle: str, spec: LaunchSpec) -> Terminal: ...

    async def address(self, handle: str, port: int) -> str:
        """host:port at which the appliance reaches 127.0.0.1:port inside the workload
        (applications, model replicas)."""

    async def list_running(self) -> dict[str, str]:
        """workload id -> handle, for everything this site's labels mark as running here."""

    async def close(self) -> None: ...
