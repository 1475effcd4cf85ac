#!/usr/bin/env python3
"""Benchmark: pulling a 100 MB image through the appliance's registry proxy, against pulling it
from the backing registry directly, in the same run.

A `docker-registry` of the bench's own listens on a loopback TCP port and is the appliance's
registry (CML_REGISTRY_URL). An image of one --mb MB layer (random bytes: nothing to gain from
compression) plus a small config is pushed to <user>/<project>/big:1. Then, in interleaved rounds
(proxy, direct, direct, proxy, …), the whole image is pulled as a client does: the manifest, then
every blob, read to the end and checked against its digest:

- proxy:  http://127.0.0.1:<appliance port>/v2/… with Docker token auth (a token fetched once
  per round with the user's API key, as podman does per pull);
- direct: http://127.0.0.1:<registry port>/v2/… with no authentication.

The last line is `ratio: X` = direct time over proxy time, median of the rounds (target: 0.8 or
more, i.e. the proxy keeps 80 % of the registry's speed).

Usage: DATABASE_URL=... .venv/bin/python bench/registry_pull.py [--mb N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from api_list import free_port
from common import BenchError, Harness, install_signal_handlers, interleaved, median, run_async, run_main

from cml_appliance.registry.client import RegistryClient

TARGET = 0.8
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
REGISTRY_CONFIG = """version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
http:
  addr: 127.0.0.1:{port}
"""


def start_registry(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("docker-registry")
    if binary is None:
        raise BenchError("docker-registry is not installed (apt-get install docker-registry)")
    port = free_port()
    (workdir / "registry").mkdir()
    config = workdir / "registry" / "config.yml"
    config.write_text(REGISTRY_CONFIG.format(root=workdir / "registry" / "data", port=port))
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while True:
        try:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1) as resp:
                if resp.status == 200:
                    return proc, port
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise BenchError("docker-registry did not start")
        time.sleep(0.05)


async def push_image(client: RegistryClient, repository: str, mb: int, workdir: Path) -> int:
    layer = workdir / "layer.bin"
    with open(layer, "wb") as fh:
        for _ in range(mb):
            fh.write(os.urandom(1024 * 1024))
    import hashlib

    digest = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    await client.push_blob_file(repository, layer, digest)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    config_digest, _ = await client.push_blob(repository, config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                                      "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest,
                                       "size": layer.stat().st_size}]}).encode()
    await client.put_manifest(repository, "1", manifest, OCI_MANIFEST)
    return layer.stat().st_size


async def pull(client: RegistryClient, repository: str) -> int:
    raw, _, _ = await client.manifest(repository, "1")
    manifest = json.loads(raw)
    size = 0
    for blob in [manifest["config"], *manifest["layers"]]:
        size += len(await client.blob(repository, blob["digest"]))  # read whole, digest checked
    return size


async def measure(h: Harness, registry_port: int, args: argparse.Namespace) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"proxy": [], "direct": []}
    async with h.client(timeout=600) as http:
        api = await h.connect(http)
        pid = await api.create_project("bench pull")
        project = await api.call("GET", f"/api/v2/projects/{pid}")
        repository = f"bench/{project['slug']}/big"
        direct_base = f"http://127.0.0.1:{registry_port}"
        size = await push_image(RegistryClient(http, direct_base), repository, args.mb, h.workdir)
        print(f"image {repository}:1: one layer of {size / 1e6:.0f} MB", flush=True)
        order = ["proxy", "direct"]
        for i, name in interleaved(tuple(order), args.rounds):
            client = (RegistryClient(http, api.base, username="bench", password=h.secret) if name == "proxy"
                      else RegistryClient(http, direct_base))
            started = time.perf_counter()
            pulled = await pull(client, repository)
            seconds = time.perf_counter() - started
            if pulled < size:
                raise BenchError(f"{name}: pulled {pulled} bytes of {size}")
            if i:
                times[name].append(seconds)
            print(f"{i:>3}  {name:<7} {seconds:.3f} s  {pulled / seconds / 1e6:.0f} MB/s{'' if i else '  (warm-up)'}", flush=True)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="size of the image's layer in MB (100)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per target, after one warm-up (6)")
    args = parser.parse_args()
    install_signal_handlers()
    h = Harness("registry-pull")
    times: dict[str, list[float]] = {}
    registry = None
    try:
        registry, port = start_registry(h.workdir)
        h.database()
        h.appliance(None, CML_REGISTRY_URL=f"http://127.0.0.1:{port}")
        print(f"database:  {h.where}; dropped at the end")
        print(f"registry:  docker-registry on 127.0.0.1:{port} (the appliance's CML_REGISTRY_URL)")
        print("proxy:     the appliance's /v2/ with a token per pull; direct: the registry with no auth; "
              "a pull = manifest + every blob read whole and checked")
        times = run_async(measure(h, port, args))
    finally:
        h.close()
        if registry is not None:
            registry.kill()
            registry.wait()
    print()
    for name, values in times.items():
        print(f"{name:<7} median {median(values):.3f} s over {len(values)}")
    ratio = median(times["direct"]) / median(times["proxy"])
    print(f"target: direct/proxy time {TARGET:g} or more: {'met' if ratio >= TARGET else 'NOT met'}; total time {h.elapsed():.0f} s")
    print(f"ratio: {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
