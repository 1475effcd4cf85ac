"""The local engine's processes: output that the log has not taken yet holds the process, not
memory; exits are seen with or without pidfds; memory is capped and the process dies with the
appliance, whether started through setpriv/prlimit or the preexec_fn fallback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from cml_appliance.engines.base import LaunchSpec
from cml_appliance.engines.local import OUTPUT_BUFFER_CHUNKS, LocalEngine

PIECES = 160  # 10 MB of output


async def test_unread_output_holds_the_process_not_memory(tmp_path: Path) -> None:
    engine = LocalEngine("test")
    writer = f"import sys\nfor _ in range({PIECES}): sys.stdout.write('x' * 65536)\n"
    handle = await engine.start(LaunchSpec(workload_id="outputflow000001", kind="job_run",
                                           command=["python3", "-c", writer], env={}, project_dir=tmp_path,
                                           image="", cpu=1, memory_mb=512))
    try:
        with pytest.raises(TimeoutError):  # nobody reads: it waits on its full pipe
            await asyncio.wait_for(engine.wait(handle), 1)
        assert engine._procs[handle]._output.qsize() <= OUTPUT_BUFFER_CHUNKS
        total = 0
        async for chunk in engine.output(handle):
            total += len(chunk)
        assert total == PIECES * 65536
        assert await engine.wait(handle) == 0
    finally:
        await engine.cleanup(handle)
        await engine.close()


async def test_without_pidfds_exits_are_still_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pidfd(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr("os.pidfd_open", no_pidfd)
    engine = LocalEngine("test")
    handle = await engine.start(LaunchSpec(workload_id="nopidfd000000001", kind="job_run",
                                           command=["sh", "-c", "echo hi; exit 7"], env={}, project_dir=tmp_path,
                                           image="", cpu=1, memory_mb=512))
    try:
        assert b"".join([chunk async for chunk in engine.output(handle)]) == b"hi\n"
        assert await asyncio.wait_for(engine.wait(handle), 5) == 7
    finally:
        await engine.cleanup(handle)
        await engine.close()


@pytest.fixture(params=["setpriv", "preexec_fn"])
def engine(request: pytest.FixtureRequest) -> LocalEngine:
    engine = LocalEngine("test")
    if request.param == "setpriv":
        assert engine._launcher is not None, "setpriv and prlimit (util-linux) should work here"
    else:
        engine._launcher = None
    return engine


async def test_memory_is_capped(engine: LocalEngine, tmp_path: Path) -> None:
    hog = "try:\n    b = bytearray(400 * 1024 * 1024)\nexcept MemoryError:\n    print('capped')\nelse:\n    print('not capped')\n"
    handle = await engine.start(LaunchSpec(workload_id="memorycap0000001", kind="job_run", command=["python3", "-c", hog],
                                           env={}, project_dir=tmp_path, image="", cpu=1, memory_mb=128))
    try:
        assert b"".join([chunk async for chunk in engine.output(handle)]) == b"capped\n"
        assert await engine.wait(handle) == 0
    finally:
        await engine.cleanup(handle)
        await engine.close()


async def test_a_missing_or_unrunnable_program_fails_the_start(engine: LocalEngine, tmp_path: Path) -> None:
    from cml_appliance.engines.base import EngineError

    (tmp_path / "plain.sh").write_text("echo not executable\n")
    for command, why in ((["no-such-program"], "No such file"), (["./missing.sh"], "No such file"),
                         (["./plain.sh"], "Permission denied")):
        with pytest.raises(EngineError, match=why):
            await engine.start(LaunchSpec(workload_id="missingprogram01", kind="job_run", command=command,
                                          env={}, project_dir=tmp_path, image="", cpu=1, memory_mb=128))
    await engine.close()


@pytest.mark.parametrize("launcher", ["setpriv", "preexec_fn"])
def test_main_processes_die_with_the_appliance(launcher: str, tmp_path: Path) -> None:
    """A process that starts a workload and then dies at once (no clean-up runs): the workload goes too."""
    script = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from cml_appliance.engines.base import LaunchSpec
        from cml_appliance.engines.local import LocalEngine

        async def main():
            engine = LocalEngine("test")
            if {launcher!r} == "preexec_fn":
                engine._launcher = None
            handle = await engine.start(LaunchSpec(workload_id="dieswithparent01", kind="job_run",
                command=["sleep", "60"], env={{}}, project_dir=Path({str(tmp_path)!r}), image="", cpu=1, memory_mb=0))
            pid = handle.split(":")[0]
            # setpriv sets the parent-death signal after its exec, and a signal asked for once the
            # parent is gone never comes: wait until it has exec'd the command (under load that
            # takes a while). An appliance killed within that moment leaves the process to the
            # restart's reconciliation (tests/integration/test_reconcile_after_crash.py).
            while not Path(f"/proc/{{pid}}/cmdline").read_bytes().split(b"\\0")[0].endswith(b"sleep"):
                await asyncio.sleep(0.001)
            print(pid, flush=True)
            os._exit(0)

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    raise AssertionError(f"process {pid} outlived the process that started it")


def test_the_sandbox_binds_runtimes_but_never_the_data_dir_or_a_tools_home(tmp_path: Path) -> None:
    from cml_appliance.engines.sandbox import Sandbox

    pyenv = tmp_path / "home/.pyenv"
    (pyenv / "shims").mkdir(parents=True)
    (pyenv / "versions").mkdir()
    (pyenv / "plugins/virtualenv/shims").mkdir(parents=True)
    cargo_bin = tmp_path / "home/.cargo/bin"
    cargo_bin.mkdir(parents=True)
    data = tmp_path / "app/.cml-data"
    (data / "bin").mkdir(parents=True)
    venv = tmp_path / "app/.venv"
    (venv / "bin").mkdir(parents=True)
    sandbox = Sandbox("/usr/bin/bwrap", [data], [
        str(pyenv / "plugins/virtualenv/shims"), str(pyenv / "shims"), str(cargo_bin), str(data / "bin"),
        str(tmp_path / "app"), str(venv), "/usr/bin", "relative/bin", str(tmp_path / "missing")])
    assert sandbox.runtime_dirs == [str(pyenv), str(cargo_bin), str(venv)]
    args = sandbox.wrap(["python3", "x.py"], project_dir=tmp_path)
    assert args[-3:] == ["--", "python3", "x.py"]
    assert str(data) not in " ".join(args)
    # /tmp is fresh before anything is bound under it.
    assert args.index("/tmp") < args.index(str(venv))
