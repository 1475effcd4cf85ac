"""The local engine: a process group per workload on this host, the embedded default.

Each workload's main process runs in its own session and process group, in the project
directory, with CML's environment. It dies with the appliance (PR_SET_PDEATHSIG); anything it
left behind carries CML_SITE_ID, CML_WORKLOAD_ID and CML_ENGINE=local in its environment,
which is how reconciliation finds and stops it. Memory is capped with RLIMIT_DATA; CPU is not limited (that
needs cgroups, which the container engine gets from its runtime).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import functools
import logging
import os
import pty
import resource
import shutil
import signal
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cml_appliance.core import ownership
from cml_appliance.core.processes import process_exists
from cml_appliance.editors.sockets import SOCKET_VARIABLE as EDITOR_SOCKET_VARIABLE
from cml_appliance.engines import sandbox as sandbox_mod
from cml_appliance.engines.base import EngineError, LaunchSpec
from cml_appliance.engines.sandbox import Sandbox

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
# Where a local model replica's Unix socket is (models/service.py sets it; the sandbox binds its folder).
REPLICA_SOCKET_VARIABLE = "CML_MODEL_SOCKET"
# Variables naming a Unix socket a workload listens on: its directory is bound into the sandbox.
SOCKET_VARIABLES = (REPLICA_SOCKET_VARIABLE, EDITOR_SOCKET_VARIABLE)
# Pieces of output (up to 64 kB each) held for the log before the process is made to wait.
OUTPUT_BUFFER_CHUNKS = 16
_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup(memory_bytes: int, tty_fd: int | None = None) -> Callable[[], None]:
    """Runs in the child between fork and exec: die with the appliance, cap memory, and for a
    terminal start a new session whose controlling tty is the pty.

    uvloop calls this before it moves the pty onto fd 0 (the standard loop after), so the session
    and the tty are set up here, on the pty's own descriptor, and not by start_new_session.
    """

    def setup() -> None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if memory_bytes > 0:
            resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
        if tty_fd is not None:
            os.setsid()
            fcntl.ioctl(tty_fd, termios.TIOCSCTTY, 0)

    return setup


def _find_launcher() -> tuple[str, str] | None:
    """util-linux's setpriv and prlimit, if they work here.

    Started through them (`setpriv --pdeathsig KILL -- prlimit --data=N -- command`), a main
    process gets its parent-death signal and memory cap without a preexec_fn, and so without
    fork(): Popen then uses vfork, which does not copy this process's page tables. For an
    appliance of some 150 MB that is ~0.6 ms a start instead of ~20 ms (a thousand cron runs due at
    once feel it). Without them, _child_setup does the same between fork and exec.
    """
    setpriv, prlimit, true = shutil.which("setpriv"), shutil.which("prlimit"), shutil.which("true")
    if not (setpriv and prlimit and true):
        return None
    probe = subprocess.run([setpriv, "--pdeathsig", "KILL", "--", prlimit, "--data=1073741824", "--", true],
                           capture_output=True, check=False)
    return (setpriv, prlimit) if probe.returncode == 0 else None


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks: with the pid, it names one process for good."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def _alive(pid: int, ticks: str) -> bool:
    try:
        return _start_ticks(pid) == ticks
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _parse(handle: str) -> tuple[int, str, str]:
    pid, ticks, workload_id = handle.split(":", 2)
    return int(pid), ticks, workload_id


class MainProcess:
    """A workload's main process, started by subprocess.Popen in a worker thread.

    Forking this (large) process and waiting for the child's exec takes milliseconds; done on the
    event loop (as uvloop's subprocess does) that blocks every other request meanwhile, which is
    what a thousand cron runs due at once would feel. The loop only watches the output pipe and a
    pidfd that becomes readable when the process ends. Both descriptors are ours alone, closed once.
    """

    def __init__(self, popen: subprocess.Popen[bytes], output_fd: int):
        self.popen = popen
        self.pid = popen.pid
        # Output read but not yet taken by the log: bounded, so a log that falls behind makes
        # the process wait on its full pipe instead of growing this process's memory.
        self._output: asyncio.Queue[bytes] = asyncio.Queue()
        self._output_paused = False
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._output_fd: int | None = output_fd
        os.set_blocking(output_fd, False)
        self._loop.add_reader(output_fd, self._readable)
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
        except OSError as exc:  # an old kernel, or out of descriptors: look now and then instead
            log.warning("no pidfd for process %d (%s): polling for its exit", popen.pid, exc)
            self._poll_exit()
        else:
            self._loop.add_reader(self._pidfd, self._check_exit)
            self._check_exit()  # it may already be gone

    @classmethod
    async def start(cls, spawner: ThreadPoolExecutor, command: list[str], cwd: Path, env: dict[str, str],
                    memory_bytes: int, launcher: tuple[str, str] | None,
                    wrap: Callable[[list[str]], list[str]] | None = None) -> MainProcess:
        preexec: Callable[[], None] | None = None
        if launcher is not None or wrap is not None:
            # A missing program is an error here, as it is when Popen runs it itself (which()
            # finds only files we may execute); in a sandbox the same paths are bound in.
            program = command[0] if "/" in command[0] else shutil.which(command[0], path=env.get("PATH"))
            if program is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command[0])
            resolved = Path(cwd) / program
            if not resolved.is_file():
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), command[0])
            if not os.access(resolved, os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), command[0])
            command = [program, *command[1:]]
            if wrap is not None:
                command = wrap(command)
        if launcher is None:
            preexec = _child_setup(memory_bytes)
        else:
            setpriv, prlimit = launcher
            cap = [prlimit, f"--data={memory_bytes}", "--"] if memory_bytes > 0 else []
            command = [setpriv, "--pdeathsig", "KILL", "--", *cap, *command]
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            popen = await asyncio.get_running_loop().run_in_executor(spawner, functools.partial(
                subprocess.Popen, command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=write_fd,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=preexec,
            ))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return cls(popen, read_fd)

    def _readable(self) -> None:
        assert self._output_fd is not None
        try:
            data = os.read(self._output_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._output.put_nowait(data)
        if self._output.qsize() >= OUTPUT_BUFFER_CHUNKS:
            self._loop.remove_reader(self._output_fd)
            self._output_paused = True

    async def read_output(self) -> bytes:
        """The next piece of output; b"" once it has all been read."""
        if self._output_fd is None and self._output.empty():
            return b""
        chunk = await self._output.get()
        if self._output_paused and self._output_fd is not None and self._output.qsize() < OUTPUT_BUFFER_CHUNKS:
            self._output_paused = False
            self._loop.add_reader(self._output_fd, self._readable)
        return chunk

    def _check_exit(self) -> None:
        if self.exited.done() or self.popen.poll() is None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)  # reaped: the pidfd has served
            os.close(self._pidfd)
            self._pidfd = None
        self.exited.set_result(self.popen.returncode)

    def _poll_exit(self) -> None:
        self._check_exit()
        if not self.exited.done():
            self._loop.call_later(0.1, self._poll_exit)

    def close(self) -> None:
        """Stop reading the output (at its end, or when the workload is cleaned up)."""
        if self._output_fd is not None:
            self._loop.remove_reader(self._output_fd)
            os.close(self._output_fd)
            self._output_fd = None
            self._output.put_nowait(b"")  # wakes a reader waiting for more


class LocalTerminal:
    """A shell on a pseudo-terminal, read through the event loop."""

    def __init__(self, master: int, proc: asyncio.subprocess.Process):
        self._master = master
        self._proc = proc
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        os.set_blocking(master, False)
        self._loop.add_reader(master, self._readable)
        self._closed = False

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except OSError as exc:  # EIO: the shell side closed
            if exc.errno not in (errno.EIO, errno.EBADF):
                log.warning("terminal read failed: %s", exc)
            data = b""
        if not data:
            self._loop.remove_reader(self._master)
        self._queue.put_nowait(data)

    async def read(self) -> bytes:
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._master, view)
                view = view[written:]
            except BlockingIOError:
                await asyncio.sleep(0.005)
            except OSError:
                return

    async def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.killpg(self._proc.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(self._proc.wait(), 2)
        except TimeoutError:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await self._proc.wait()
        self._loop.remove_reader(self._master)
        os.close(self._master)
        # The reader may not have seen the end yet (a sandbox's processes let go of the pty a
        # moment after the shell's parent ended): whoever reads learns it is over.
        self._queue.put_nowait(b"")


class LocalEngine:
    name = "local"
    shares_host_network = True  # each workload gets free ports of its own

    def __init__(self, site_id: str, sandbox: Sandbox | None = None):
        self.site_id = site_id
        # Workloads run under bubblewrap when given one (engines/sandbox.py).
        self.sandbox = sandbox
        self._procs: dict[str, MainProcess] = {}
        # Threads that fork main processes. PR_SET_PDEATHSIG fires when the forking *thread* ends,
        # so these live exactly as long as the engine (the default executor's threads might not).
        self._spawner = ThreadPoolExecutor(max_workers=2, thread_name_prefix="local-spawn")
        self._launcher = _find_launcher()
        self._closing = False
        self._terminals: dict[str, set[LocalTerminal]] = {}

    async def ping(self) -> None:
        return None

    def _env(self, spec: LaunchSpec) -> dict[str, str]:
        base = {k: os.environ[k] for k in ("PATH", "LANG", "TZ") if k in os.environ}
        env = base | spec.env | {
            "CML_SITE_ID": self.site_id, "CML_WORKLOAD_ID": spec.workload_id, "CML_ENGINE": self.name,
        }
        if self.sandbox is not None:  # the project is there too, as in CML's containers
            env["HOME"] = str(sandbox_mod.HOME)
        return env

    def _wrap(self, spec: LaunchSpec, *, new_session: bool = True) -> Callable[[list[str]], list[str]] | None:
        if self.sandbox is None:
            return None
        sandbox = self.sandbox
        # A local model replica, and a session's editor, listen on a Unix socket in a directory of its own.
        writable = [Path(spec.env[name]).parent for name in SOCKET_VARIABLES if spec.env.get(name)]
        readonly = ({"/run/cml/tls": spec.tls_dir} if spec.tls_dir is not None else {}) | spec.readonly_mounts
        return lambda command: sandbox.wrap(command, project_dir=spec.project_dir, extra_writable=writable,
                                            readonly=readonly, new_session=new_session)

    async def _give(self, spec: LaunchSpec) -> None:
        """As root, the sandbox runs workloads as uid 8536: their files must be theirs."""
        if self.sandbox is not None and self.sandbox.privileged:
            await asyncio.to_thread(ownership.give_tree, spec.project_dir)
            for name in SOCKET_VARIABLES:
                if spec.env.get(name):
                    ownership.give(Path(spec.env[name]).parent)

    async def start(self, spec: LaunchSpec) -> str:
        if self._closing:
            raise EngineError("the local engine is shutting down")
        if spec.readonly_mounts and self.sandbox is None:
            raise EngineError("runtime add-ons are mounted by the sandbox, which this host cannot run")
        await self._give(spec)
        try:
            proc = await MainProcess.start(self._spawner, spec.command, spec.project_dir, self._env(spec),
                                           spec.memory_mb * 1024 * 1024, self._launcher, self._wrap(spec))
        except OSError as exc:
            raise EngineError(f"cannot start {spec.command[0]!r}: {exc.strerror}") from None
        try:
            ticks = _start_ticks(proc.pid)
        except (FileNotFoundError, ProcessLookupError):
            ticks = "ended"  # a very short process can end (and be reaped) before we look
        handle = f"{proc.pid}:{ticks}:{spec.workload_id}"
        self._procs[handle] = proc
        return handle

    async def output(self, handle: str) -> AsyncIterator[bytes]:
        proc = self._procs.get(handle)
        if proc is None:
            return
        while chunk := await proc.read_output():
            yield chunk

    async def wait(self, handle: str) -> int | None:
        proc = self._procs.get(handle)
        if proc is None:
            pid, ticks, _ = _parse(handle)
            while _alive(pid, ticks):
                await asyncio.sleep(0.5)
            return None
        # Shielded: a waiter that is cancelled (shutdown) must not cancel the exit itself, which
        # the process is still reaped into.
        code = await asyncio.shield(proc.exited)
        # A signal death shows as -N; report it as a shell would (128 + N).
        return code if code >= 0 else 128 - code

    async def stop(self, handle: str, grace: float) -> None:
        pid, ticks, workload_id = _parse(handle)
        for terminal in list(self._terminals.get(workload_id, ())):
            await terminal.close()
        groups = {pid} if _alive(pid, ticks) else set()
        # Everything else the workload started, in whatever process group it went to.
        marked = [p for p in self._marked(workload_id) if process_exists(p)]
        groups |= {_pgid(p) for p in marked} - {None}
        # In a sandbox, SIGTERM goes to the workload's own processes only: the bubblewrap around
        # them would die of it at once and take them along before they could end cleanly.
        wrappers = {p for p in marked if _is_bwrap(p)} | ({pid} if self.sandbox is not None else set())
        workload_groups = {_pgid(p) for p in marked if p not in wrappers} - {None}
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for group in (workload_groups or groups) if sig == signal.SIGTERM and self.sandbox is not None else groups:
                try:
                    os.killpg(group, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = asyncio.get_running_loop().time() + (grace if sig == signal.SIGTERM else 5)
            while asyncio.get_running_loop().time() < deadline:
                if not (_alive(pid, ticks) or self._marked(workload_id)):
                    return
                await asyncio.sleep(0.05)

    async def cleanup(self, handle: str) -> None:
        proc = self._procs.pop(handle, None)
        if proc is not None:
            await asyncio.shield(proc.exited)
            proc.close()
        _, _, workload_id = _parse(handle)
        self._terminals.pop(workload_id, None)

    async def open_terminal(self, handle: str, spec: LaunchSpec) -> LocalTerminal:
        pid, ticks, workload_id = _parse(handle)
        if not _alive(pid, ticks):
            raise EngineError("the session is not running")
        shell = shutil.which("bash") or "/bin/sh"
        await self._give(spec)
        master, slave = pty.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = self._env(spec) | {"TERM": "xterm-256color"}
        command = [shell, "-i"]
        wrap = self._wrap(spec, new_session=False)  # the shell keeps the pty as its terminal
        if wrap is not None:
            command = wrap(command)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=spec.project_dir, env=env, stdin=slave, stdout=slave, stderr=slave,
                preexec_fn=_child_setup(spec.memory_mb * 1024 * 1024, tty_fd=slave),
            )
        finally:
            os.close(slave)
        terminal = LocalTerminal(master, proc)
        self._terminals.setdefault(workload_id, set()).add(terminal)
        return terminal

    async def address(self, handle: str, port: int) -> str:
        return f"127.0.0.1:{port}"  # local workloads share the host's network

    def _marked(self, workload_id: str | None = None) -> list[int]:
        """Pids whose environment carries this site's marker (and the workload's, if given).

        CML_ENGINE=local matters: container processes show in /proc too, with the same site marker.
        """
        site = f"CML_SITE_ID={self.site_id}".encode()
        engine = f"CML_ENGINE={self.name}".encode()
        wanted = f"CML_WORKLOAD_ID={workload_id}".encode() if workload_id else None
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if site in environ and engine in environ and (wanted is None or wanted in environ):
                found.append(int(entry.name))
        return found

    async def list_running(self) -> dict[str, str]:
        running: dict[str, str] = {}
        for pid in await asyncio.to_thread(self._marked):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                ticks = _start_ticks(pid)
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"CML_WORKLOAD_ID="):
                    workload_id = item.split(b"=", 1)[1].decode()
                    running.setdefault(workload_id, f"{pid}:{ticks}:{workload_id}")
        return running

    async def close(self) -> None:
        for terminals in self._terminals.values():
            for terminal in list(terminals):
                await terminal.close()
        # Local workloads end with the appliance: the spawner threads ending sends PDEATHSIG.
        self._closing = True
        self._spawner.shutdown(wait=False)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _is_bwrap(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == "bwrap"
    except OSError:
        return False


