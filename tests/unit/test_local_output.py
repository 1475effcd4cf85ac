"""The local engine's output pipe: a log that falls behind makes the process wait, and loses nothing."""

from __future__ import annotations

import asyncio
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
