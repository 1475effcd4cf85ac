#!/usr/bin/env python3
"""Benchmark: a keystroke's round trip through a session's terminal WebSocket, against a bare pty.

One running session on the local engine (host/python3). Both targets run the same shell the local
engine opens for a terminal (bash -i, else /bin/sh -i, TERM=xterm-256color, 80x24), turned into
an echo: `stty raw -echo; exec cat`, so that each byte typed is read by a program and written
back at once (what a shell's line editor does for a printable key, without its line wrapping).
One sample: send b"x", wait until the "x" comes back; one byte in flight at a time.

- Appliance: the terminal WebSocket GET .../sessions/{id}/terminal of the real
  `python -m cml_appliance serve` (CML_LOG_LEVEL=WARNING), Authorization: Bearer <key>, with an
  aiohttp client; "x" goes as a binary frame and comes back in one.
- Bare: in this process, pty.openpty + the same shell as a child (its own session, the pty as its
  controlling terminal), the master read through the event loop (add_reader) and written with
  os.write: no network, no WebSocket, no relay process.

Both run in this one process on the same event loop (uvloop), after --warmup samples each, in
interleaved blocks (appliance, bare, bare, appliance, ... of --block samples) so that machine
noise hits both alike. Reported: p50, p90, p99 and mean for each, in microseconds. The last line
is `ratio: X` = the appliance's p50 over the bare p50. No target is set: the absolute p50 and
p99 matter more (a keystroke under ~10 ms feels instant); the ratio says what the HTTP/WebSocket
relay adds to a pty.

Usage: /tmp/venv/bin/python bench/terminal_roundtrip.py [--samples N] [--warmup N] [--block N]
       (defaults: 500, 100, 50: about 5 s)
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from common import (
    BenchError,
    Harness,
    install_signal_handlers,
    percentile,
    run_async,
    run_main,
)

RUNNING = "ENGINE_RUNNING"
# Typed into the shell; the quotes keep the echo of the typed line from matching READY.
SETUP = b"stty raw -echo; echo RE''ADY; exec cat\r"


class BareTerminal:
    """The same shell on a pty of our own, the master read through the event loop."""

    def __init__(self, master: int, proc: subprocess.Popen[bytes]):
        self.master = master
        self.proc = proc
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.waiter: asyncio.Future[None] | None = None
        os.set_blocking(master, False)
        self.loop.add_reader(master, self._readable)

    @classmethod
    async def open(cls, cwd: Path, site_id: str) -> BareTerminal:
        shell = shutil.which("bash") or "/bin/sh"
        master, slave = pty.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {k: os.environ[k] for k in ("PATH", "LANG", "TZ") if k in os.environ}
        env |= {"TERM": "xterm-256color", "HOME": str(cwd), "BENCH_SITE_ID": site_id}  # the clean-up's marker

        def take_tty() -> None:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        # subprocess.Popen, not the event loop's subprocess_exec: uvloop runs preexec_fn before
        # setsid() and before the pty is on fd 0, so TIOCSCTTY fails there (ENOTTY). The stdlib
        # child does dup2, setsid, then preexec_fn. Only the set-up is done this way; the pty is
        # then served by the event loop as a relay would be.
        try:
            proc = subprocess.Popen(  # noqa: ASYNC220 - set-up, not measured; see above
                [shell, "-i"], cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True, preexec_fn=take_tty,  # noqa: PLW1509 - one ioctl, as the appliance does
            )
        finally:
            os.close(slave)
        return cls(master, proc)

    def _readable(self) -> None:
        try:
            data = os.read(self.master, 65536)
        except OSError:
            data = b""
        if not data:
            self.loop.remove_reader(self.master)
        self.buffer += data
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def send(self, data: bytes) -> None:
        os.write(self.master, data)

    async def receive(self, timeout: float) -> bytes:
        if not self.buffer:
            self.waiter = self.loop.create_future()
            await asyncio.wait_for(self.waiter, timeout)
        data = bytes(self.buffer)
        self.buffer.clear()
        if not data:
            raise BenchError("the bare shell closed its terminal")
        return data

    async def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGHUP)
        except ProcessLookupError:
            pass
        try:
            await asyncio.to_thread(self.proc.wait, 2)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            await asyncio.to_thread(self.proc.wait, 5)
        self.loop.remove_reader(self.master)
        os.close(self.master)


class WsTerminal:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse, log_tail: Any):
        self.ws = ws
        self.log_tail = log_tail  # the appliance's log, for errors

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def receive(self, timeout: float) -> bytes:
        while True:
            msg = await self.ws.receive(timeout=timeout)
            if msg.type == aiohttp.WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type == aiohttp.WSMsgType.TEXT:
                continue  # control messages (none expected)
            raise BenchError(f"the terminal WebSocket closed ({self.ws.close_code}, {msg.extra!r})\n"
                             f"--- appliance log tail ---\n{self.log_tail()}")

    async def close(self) -> None:
        await self.ws.close()


async def expect(term: Any, needle: bytes, timeout: float = 10) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BenchError(f"{needle!r} never came; the terminal showed {seen[-300:]!r}")
        try:
            seen += await term.receive(remaining)
        except TimeoutError:
            continue
    return seen


async def drain(term: Any, quiet: float = 0.3) -> None:
    """Read until nothing has come for `quiet` seconds (the prompt, the rest of the set-up)."""
    while True:
        try:
            await term.receive(quiet)
        except TimeoutError:
            return


async def make_echo(term: Any) -> None:
    try:
        await term.receive(15)  # the shell's first output (its prompt)
    except TimeoutError:
        raise BenchError("the shell printed nothing in 15 s") from None
    await drain(term)
    await term.send(SETUP)
    await expect(term, b"READY")
    await drain(term)


async def roundtrips(term: Any, count: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        await term.send(b"x")
        got = await term.receive(5)
        while b"x" not in got:
            got += await term.receive(5)
        out.append(clock() - started)
        if got != b"x":
            raise BenchError(f"expected the echo b'x', got {got!r}")
    return out


async def measure(h: Harness, args: argparse.Namespace) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"appliance": [], "bare": []}
    async with h.client() as http:
        api = await h.connect(http)
        terms: dict[str, Any] = {}
        try:
            project = await api.create_project(f"bench terminal {args.attempt}")
            body = await api.start_session(project, runtime_identifier="host/python3")
            sid = body["id"]
            await api.wait_status(project, sid, RUNNING, interval=0.02)
            try:
                ws = await http.ws_connect(
                    f"{api.base}{api.session_path(project, sid)}/terminal", headers=api.headers, autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                raise BenchError(f"the terminal WebSocket was refused: HTTP {exc.status} {exc.message}") from None
            terms["appliance"] = WsTerminal(ws, api.server.log_tail)
            bare_dir = h.workdir / "bare-home"
            bare_dir.mkdir(exist_ok=True)
            terms["bare"] = await BareTerminal.open(bare_dir, h.site_id)
            for name, term in terms.items():
                await make_echo(term)
                await roundtrips(term, args.warmup)
            order = ["appliance", "bare"]
            done = 0
            block = 0
            while done < args.samples:
                n = min(args.block, args.samples - done)
                for name in (order if block % 2 == 0 else order[::-1]):
                    results[name] += await roundtrips(terms[name], n)
                done += n
                block += 1
            status = (await api.get_session(project, sid))["status"]
            if status != RUNNING:
                raise BenchError(f"the session is {status} after the benchmark, not {RUNNING}")
        finally:
            for term in terms.values():
                try:
                    await term.close()
                except Exception as exc:  # noqa: BLE001 - keep cleaning up
                    h.problems.append(f"closing a terminal: {exc}")
            try:
                statuses = await api.stop_all()
                bad = {k: v for k, v in statuses.items() if v != "ENGINE_STOPPED"}
                if bad:
                    print(f"warning: sessions that did not end ENGINE_STOPPED: {bad}", file=sys.stderr)
            except BenchError as exc:
                h.problems.append(f"stopping the session: {exc}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=500, help="round trips per target (500)")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured round trips per target first (100)")
    parser.add_argument("--block", type=int, default=50, help="samples per interleaved block (50)")
    args = parser.parse_args()
    args.attempt = 1
    if args.samples < 1 or args.warmup < 0 or args.block < 1:
        parser.error("--samples and --block must be at least 1, --warmup not negative")

    install_signal_handlers()
    h = Harness("terminal")
    results: dict[str, list[float]] = {}
    try:
        h.database()
        h.appliance()
        shell = shutil.which("bash") or "/bin/sh"
        print(f"terminal keystroke round trip: {args.samples} samples per target after {args.warmup} warm-up each, "
              f"interleaved blocks of {args.block} (A B B A...); one byte in flight")
        print(f"database:  {h.where}; dropped at the end")
        print(f"echo:      {shell} -i on a pty, then `stty raw -echo; exec cat`: each byte read by cat and written back")
        print("appliance: python -m cml_appliance serve (uvloop), CML_LOG_LEVEL=WARNING; the session's terminal "
              "WebSocket, binary frames, aiohttp client in this process")
        print("bare:      pty.openpty + the same shell in this process; master read with loop.add_reader, "
              "written with os.write")
        results = run_async(measure(h, args))
    finally:
        h.close()

    print()
    print(f"{'target':<9}  {'samples':>7}  {'p50 us':>8}  {'p90 us':>8}  {'p99 us':>8}  {'mean us':>8}  {'max us':>8}")
    for name, values in results.items():
        us = [v * 1e6 for v in values]
        print(f"{name:<9}  {len(us):>7}  {percentile(us, 0.5):>8.0f}  {percentile(us, 0.9):>8.0f}  "
              f"{percentile(us, 0.99):>8.0f}  {sum(us) / len(us):>8.0f}  {max(us):>8.0f}")
    app, bare = results["appliance"], results["bare"]
    print(f"p99/p50: appliance {percentile(app, 0.99) / percentile(app, 0.5):.1f}, "
          f"bare {percentile(bare, 0.99) / percentile(bare, 0.5):.1f}; total time {h.elapsed():.0f} s")
    print(f"ratio: {percentile(app, 0.5) / percentile(bare, 0.5):.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
