"""The local engine's sandbox: each workload process runs under bubblewrap (Debian's `bubblewrap`).

Inside, a workload sees the system read-only (/usr, /etc, the runtime's own files on PATH), its
project read-write at its own path and at /home/cdsw, a private /tmp, its own /proc (a PID
namespace: no other workload's processes, so no other workload's CDSW_APIV2_KEY in
/proc/*/environ) and nothing else: not the data dir, the secret key, the embedded Postgres's
socket, the container engine's socket, or another project. It runs as uid 8536 (CML's `cdsw`
user): in a user namespace of its own as an ordinary user, and as the real uid 8536 without any
capability when the appliance is root (see Sandbox).

The network stays the host's: applications and models listen on ports the appliance reaches,
and workloads call the appliance's API. What a workload may reach over the network is the
business of the database's authentication (the embedded Postgres listens on a socket only).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cml_appliance.core import ownership

log = logging.getLogger(__name__)

WORKLOAD_UID = ownership.WORKLOAD_UID  # CML's cdsw user, as in its containers
HOME = Path("/home/cdsw")
# The system, read-only, where it exists (merged-/usr systems have /bin etc. as links).
SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt")


class Sandbox:
    """Builds the bwrap command line around a workload's command.

    As an ordinary user, bwrap makes a user namespace in which the workload is uid 8536 (the
    appliance's own uid outside). As root it needs none: bwrap sets up the namespaces and mounts
    with root's rights, then `setpriv` becomes the real uid 8536 with no capability and no way to
    regain one, so that a workload that broke out of its mounts would be an unprivileged user,
    and files it makes belong to 8536, as a container's do (core/ownership.py).
    """

    def __init__(self, bwrap: str, hidden: Iterable[Path], path_dirs: Iterable[str], *, setpriv: str | None = None):
        self.bwrap = bwrap
        self.setpriv = setpriv  # set: privileged mode (the appliance is root)
        # Never bound in, whatever PATH says: the data dir (secret key, database, every project).
        self.hidden = [Path(os.path.realpath(p)) for p in hidden]
        self.runtime_dirs = self._runtime_dirs(path_dirs)

    def _runtime_dirs(self, path_dirs: Iterable[str]) -> list[str]:
        """What of PATH lies outside the system paths, each to be bound read-only: the directory
        itself (a tool's bin, never its parent, which may hold credentials), except a pyenv's
        shims, which need the whole pyenv, and a virtualenv's bin, which needs the venv; and whole interpreter prefixes (a venv's or a Python's
        own, given as such). One that holds or sits in a hidden directory is left out."""
        chosen: list[str] = []
        for entry in path_dirs:
            if not entry or not os.path.isabs(entry) or not os.path.isdir(entry):
                continue
            real = Path(os.path.realpath(entry))
            if any(real == Path(s) or real.is_relative_to(s) for s in SYSTEM_PATHS):
                continue
            root = real
            if "plugins" in real.parts:  # pyenv's plugins' shims: the pyenv they belong to
                root = Path(*real.parts[: real.parts.index("plugins")])
            elif real.name == "shims" and (real.parent / "versions").is_dir():
                root = real.parent
            elif real.name == "bin" and (real.parent / "pyvenv.cfg").is_file():  # a venv's bin: its packages too
                root = real.parent
            if any(root == h or root.is_relative_to(h) or h.is_relative_to(root) for h in self.hidden):
                log.warning("not binding %s into workload sandboxes: it holds or sits in the data dir", root)
                continue
            if not any(root.is_relative_to(c) for c in chosen):
                chosen = [c for c in chosen if not Path(c).is_relative_to(root)] + [str(root)]
        return chosen

    def wrap(self, command: list[str], *, project_dir: Path, extra_writable: Iterable[Path] = (),
             readonly: dict[str, Path] | None = None, new_session: bool = True) -> list[str]:
        project = os.path.realpath(project_dir)
        args = [self.bwrap]
        if self.setpriv is None:
            args += ["--unshare-user", "--uid", str(WORKLOAD_UID), "--gid", str(WORKLOAD_UID)]
        args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent",
                 "--hostname", "cml-workload"]
        if new_session:  # no TIOCSTI into a terminal it does not own (a terminal keeps its own)
            args.append("--new-session")
        for path in SYSTEM_PATHS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        # Mounts apply in order: the fresh /tmp and /run first, so that what is bound below them
        # (a runtime or a project that lives under /tmp) stays visible.
        # /dev/shm of its own and writable: POSIX semaphores and shared memory (multiprocessing,
        # joblib, data loaders) need it.
        args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/dev/shm", "--tmpfs", "/tmp", "--tmpfs", "/run"]
        writable = [os.path.realpath(p) for p in extra_writable]
        # The folders leading to what is bound in, made traversable (bwrap would otherwise copy
        # the host's modes, and /root is 0700: uid 8536 could not reach a Python installed there).
        made: set[str] = set()
        for target in [*self.runtime_dirs, project, str(HOME), *writable]:
            for ancestor in reversed(Path(target).parents):
                name = str(ancestor)
                if name in ("/", "/tmp", "/run") or name in made or any(name == s or name.startswith(s + "/") for s in SYSTEM_PATHS):
                    continue
                made.add(name)
                args += ["--perms", "0755", "--dir", name]
        for path in self.runtime_dirs:
            args += ["--ro-bind", path, path]
        args += ["--bind", project, project, "--bind", project, str(HOME)]
        for real in writable:
            args += ["--bind", real, real]
        for inside, source in (readonly or {}).items():  # under /run (a tmpfs here): its folders are made
            args += ["--perms", "0755", "--dir", str(Path(inside).parent), "--ro-bind", os.path.realpath(source), inside]
        args += ["--chdir", project, "--"]
        if self.setpriv is not None:
            args += [self.setpriv, f"--reuid={WORKLOAD_UID}", f"--regid={WORKLOAD_UID}", "--clear-groups",
                     "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
        return args + command

    @property
    def privileged(self) -> bool:
        return self.setpriv is not None


_probed: dict[tuple[str, tuple[Path, ...], str], tuple[Sandbox | None, str]] = {}


def find_sandbox(hidden: Iterable[Path], path: str) -> tuple[Sandbox | None, str]:
    """A working sandbox, or None and why not (said at start-up and in /readyz). The probe runs
    once per process for the same arguments."""
    key = (shutil.which("bwrap") or "", tuple(hidden), path)
    if key not in _probed:
        _probed[key] = _probe(key[1], path)
    return _probed[key]


def _probe(hidden: Iterable[Path], path: str) -> tuple[Sandbox | None, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None, "bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
    setpriv = None
    if ownership.giving():
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            return None, "setpriv (util-linux) is missing: as root the sandbox needs it to become uid 8536"
    # PATH's tools, and this interpreter's own prefixes (host/ runtimes run the appliance's Python).
    sandbox = Sandbox(bwrap, hidden, path.split(os.pathsep) + [sys.prefix, sys.base_prefix], setpriv=setpriv)
    try:
        with tempfile.TemporaryDirectory(prefix="cml-sandbox-probe-") as probe_dir:
            ownership.give(probe_dir)
            probe = subprocess.run(sandbox.wrap(["/bin/sh", "-c", "touch probe && exit 0"], project_dir=Path(probe_dir)),
                                   capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"bubblewrap does not run here: {exc}"
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip() or f"exit {probe.returncode}"
        return None, f"bubblewrap cannot make a sandbox here (user namespaces off?): {reason}"
    return sandbox, ""
