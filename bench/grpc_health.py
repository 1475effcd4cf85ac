#!/usr/bin/env python3
"""Benchmark: unary gRPC Health checks over mutual TLS against the appliance's gRPC port, and
against a bare grpclib server with the same TLS, in the same run.

The appliance (`serve`, uvloop) listens for gRPC on a port of its own (CML_GRPC_PORT) with a
serving certificate from its CA and client certificates required. The baseline is a grpclib
Server with only grpclib's Health service, in a process of its own with uvloop too, given a
serving certificate from the same CA and the same TLS settings (grpc/server.py's server_tls).
Both are called by the same client: one channel, one client certificate from the appliance's CA,
`--calls` sequential Check calls per round after a warm-up, rounds interleaved (appliance, bare,
bare, appliance, …). The last line is `ratio: X` = the appliance's calls per second over the bare
server's, median of the rounds (target: 0.8 or more).

Usage: DATABASE_URL=... .venv/bin/python bench/grpc_health.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_list import free_port
from common import REPO, Harness, install_signal_handlers, interleaved, median, run_async, run_main
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from cml_appliance.core import pki

TARGET = 0.8
# The baseline: grpclib's Health service alone, with the appliance's own TLS settings.
BARE_SERVER = """
import asyncio, sys
import uvloop
from grpclib.health.service import Health
from grpclib.server import Server
from cml_appliance.core import pki
from cml_appliance.grpc.server import server_tls

async def main(pki_dir, port):
    ca = pki.CertificateAuthority.load_or_create(pki_dir)
    server = Server([Health()])
    await server.start("127.0.0.1", port, ssl=server_tls(ca, ["127.0.0.1", "localhost"]))
    print("ready", flush=True)
    await server.wait_closed()

uvloop.run(main(__import__("pathlib").Path(sys.argv[1]), int(sys.argv[2])))
"""


def client_context(ca: pki.CertificateAuthority, folder: Path) -> ssl.SSLContext:
    issued = ca.issue_client("bench")
    (folder / "tls.crt").write_bytes(issued.cert_pem)
    (folder / "tls.key").write_bytes(issued.key_pem)
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.load_cert_chain(str(folder / "tls.crt"), str(folder / "tls.key"))
    context.set_alpn_protocols(["h2"])
    return context


async def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def calls_per_second(port: int, context: ssl.SSLContext, calls: int) -> float:
    channel = Channel("127.0.0.1", port, ssl=context)
    try:
        stub = HealthStub(channel)
        reply = await stub.Check(HealthCheckRequest())  # connect and handshake outside the clock
        assert reply.status == HealthCheckResponse.SERVING, reply
        started = time.perf_counter()
        for _ in range(calls):
            await stub.Check(HealthCheckRequest())
        return calls / (time.perf_counter() - started)
    finally:
        channel.close()


async def measure(appliance_port: int, bare_port: int, context: ssl.SSLContext, args: argparse.Namespace) -> dict[str, list[float]]:
    await wait_port(appliance_port)
    await wait_port(bare_port)
    rates: dict[str, list[float]] = {"appliance": [], "bare": []}
    ports = {"appliance": appliance_port, "bare": bare_port}
    order = ["appliance", "bare"]
    for i, name in interleaved(tuple(order), args.rounds):
        rate = await calls_per_second(ports[name], context, args.calls)
        if i:
            rates[name].append(rate)
        print(f"{i:>3}  {name:<9} {rate:8.0f} calls/s{'' if i else '  (warm-up)'}", flush=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="Check calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per server, after one warm-up (6)")
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("grpc-health")
    bare = None
    rates: dict[str, list[float]] = {}
    try:
        h.database()
        grpc_port, bare_port = free_port(), free_port()
        h.appliance(None, CML_GRPC_PORT=str(grpc_port))
        pki_dir = h.data_dir() / "pki"
        run_async(_wait_ready(h))
        ca = pki.CertificateAuthority.load_or_create(pki_dir)
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(pki_dir), str(bare_port)], cwd=REPO,
                                stdout=subprocess.PIPE, start_new_session=True)
        with tempfile.TemporaryDirectory(prefix="cml-bench-grpc-") as folder:
            context = client_context(ca, Path(folder))
            print(f"database:  {h.where}; dropped at the end")
            print(f"appliance: gRPC on 127.0.0.1:{grpc_port}; bare grpclib Health server on 127.0.0.1:{bare_port}; "
                  f"both mutual TLS with the appliance's CA; {args.calls} sequential calls per round")
            rates = run_async(measure(grpc_port, bare_port, context, args))
    finally:
        if bare is not None:
            bare.kill()
            bare.wait()
        h.close()
    print()
    for name, values in rates.items():
        print(f"{name:<9} median {median(values):.0f} calls/s over {len(values)} rounds")
    ratio = median(rates["appliance"]) / median(rates["bare"])
    print(f"target: appliance/bare {TARGET:g} or more: {'met' if ratio >= TARGET else 'NOT met'}; total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


async def _wait_ready(h: Harness) -> None:
    async with h.client() as http:
        await h.connect(http)


if __name__ == "__main__":
    run_main(main)
