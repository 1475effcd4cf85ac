"""The single-`docker run` install: build the appliance image and run it against Postgres.

Uses Podman with the project's config/podman/containers.conf. No registry can be pulled
from here, so the base is localhost/debian-python:bookworm, built by
scripts/build-base-image.sh (about a minute, once) unless it already exists.
The container gets a fresh database and --network host; /readyz is polled from the host.

Skipped when podman or Postgres is missing, unless CI is set: then it fails.
Postgres: DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test), used only to
create and drop a throwaway database.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGE = "localhost/cml-appliance:test"
DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
READY_DEADLINE_S = 60.0


def _unavailable(reason: str) -> None:
    """A missing prerequisite skips locally but must not silently pass in CI."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure)")
    pytest.skip(reason)


def _podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(REPO / "config" / "podman" / "containers.conf")
    return env


def _podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["podman", *args], env=_podman_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} -> rc {proc.returncode}\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}"
        )
    return proc


def _image_id(ref: str) -> str | None:
    proc = _podman("image", "inspect", "--format", "{{.Id}}", ref, check=False)
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _with_database(dsn: str, name: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(dsn)._replace(path="/" + name))


async def _admin(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _user_tables(dsn: str) -> list[str]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT table_schema || '.' || table_name AS t FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        )
        return [r["t"] for r in rows]
    finally:
        await conn.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode(errors="replace")


def _running(ctr: str) -> bool:
    proc = _podman("inspect", "--format", "{{.State.Running}}", ctr, check=False)
    return proc.stdout.strip() == "true"


def test_image_builds_and_serves_readyz_against_postgres() -> None:
    if shutil.which("podman") is None:
        _unavailable("podman is not installed")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        _unavailable("asyncpg is not installed in the test environment")

    admin_dsn = os.environ.get("DATABASE_URL") or DEFAULT_DSN
    if not os.environ.get("DATABASE_URL") and not _tcp_open("127.0.0.1", 5432):
        _unavailable("DATABASE_URL is unset and no Postgres answers on 127.0.0.1:5432")

    # A fresh database for the container; created first so an unreachable Postgres
    # skips (or fails in CI) before the slow build.
    db_name = f"cml_image_test_{uuid.uuid4().hex[:12]}"
    try:
        asyncio.run(_admin(admin_dsn, f'CREATE DATABASE "{db_name}"'))
    except (TimeoutError, OSError) as exc:
        _unavailable(f"cannot reach Postgres at {admin_dsn}: {exc!r}")
    app_dsn = _with_database(admin_dsn, db_name)
    ctr = f"cml-image-test-{uuid.uuid4().hex[:8]}"
    timings: dict[str, float] = {}
    try:
        _build_images(timings)
        _run_and_check(ctr, app_dsn, timings)
        _run_with_tls(ctr + "-tls", app_dsn, timings)
    finally:
        _podman("rm", "-f", "-v", "-t", "2", ctr, check=False, timeout=60)
        try:
            asyncio.run(_admin(admin_dsn, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        except Exception as exc:  # never mask the test's own failure
            print(f"warning: could not drop database {db_name}: {exc!r}")
        print("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))


def _run_with_tls(ctr: str, app_dsn: str, timings: dict[str, float]) -> None:
    """The image serves HTTPS with CML_TLS=self-signed; its CA (from `cml-appliance certs ca`
    inside the container) is what a client trusts."""
    import ssl

    port = _free_port()
    try:
        t0 = time.monotonic()
        _podman("run", "-d", "--name", ctr, "--network", "host", "-e", f"CML_DATABASE_URL={app_dsn}",
                "-e", f"CML_PORT={port}", "-e", "CML_APPS_PORT=0", "-e", "CML_EDITORS_PORT=0", "-e", "CML_GRPC_PORT=0", "-e", "CML_TLS=self-signed", IMAGE)
        status, body = 0, ""
        while time.monotonic() - t0 < READY_DEADLINE_S:
            ca = _podman("exec", ctr, "cml-appliance", "certs", "ca", check=False).stdout
            if ca.startswith("-----BEGIN CERTIFICATE-----"):
                try:
                    context = ssl.create_default_context(cadata=ca)
                    with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", timeout=3, context=context) as resp:
                        status, body = resp.status, resp.read().decode()
                except (urllib.error.URLError, OSError) as exc:
                    status, body = 0, repr(exc)
                if status == 200:
                    break
            assert _running(ctr), f"the TLS container exited (last: {status} {body})"
            time.sleep(0.25)
        timings["run with TLS -> https /readyz 200"] = time.monotonic() - t0
        assert status == 200, f"https /readyz not 200 within {READY_DEADLINE_S:.0f}s: {status} {body}"
    except BaseException:
        logs = _podman("logs", "--tail", "100", ctr, check=False)
        print(f"--- container {ctr} logs\n{logs.stdout}{logs.stderr}")
        raise
    finally:
        _podman("rm", "-f", "-v", "-t", "2", ctr, check=False, timeout=60)


def _build_images(timings: dict[str, float]) -> None:
    # Base image: the script is idempotent, but skip even starting it when the image exists.
    if _podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(REPO / "scripts" / "build-base-image.sh")],
            env=_podman_env(), cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"build-base-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        timings["base image build"] = time.monotonic() - t0

    # App image. --format docker keeps the HEALTHCHECK (the OCI format has none);
    # --network host lets RUN reach PyPI without bridge networking (which needs iptables).
    old_id = _image_id(IMAGE)
    t0 = time.monotonic()
    _podman(
        "build", "--pull=never", "--format", "docker", "--network", "host",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-t", IMAGE, ".",
        timeout=900,
    )
    timings["app image build"] = time.monotonic() - t0
    if old_id and old_id != _image_id(IMAGE):
        # Drop the image this tag replaced (no broad prune: the storage is shared).
        _podman("rmi", old_id, check=False)


def _run_and_check(ctr: str, app_dsn: str, timings: dict[str, float]) -> None:
    port = _free_port()
    try:
        # The documented install, as a user would type it (host network, so the
        # container reaches the host's 127.0.0.1 Postgres).
        t0 = time.monotonic()
        _podman(
            "run", "-d", "--name", ctr, "--network", "host",
            "-e", f"CML_DATABASE_URL={app_dsn}", "-e", f"CML_PORT={port}", "-e", "CML_APPS_PORT=0", "-e", "CML_EDITORS_PORT=0",
            "-e", "CML_GRPC_PORT=0", IMAGE,
        )

        # /readyz from the host until 200.
        url = f"http://127.0.0.1:{port}/readyz"
        status, body = 0, ""
        while time.monotonic() - t0 < READY_DEADLINE_S:
            try:
                status, body = _get(url)
            except (urllib.error.URLError, OSError) as exc:
                status, body = 0, repr(exc)
            if status == 200:
                break
            assert _running(ctr), f"container exited before becoming ready (last: {status} {body})"
            time.sleep(0.25)
        timings["run -> /readyz 200"] = time.monotonic() - t0
        assert status == 200, f"/readyz not 200 within {READY_DEADLINE_S:.0f}s: {status} {body}"
        payload = json.loads(body)
        assert isinstance(payload, dict) and payload, f"/readyz body is not a JSON object: {body!r}"
        # The image ships the registry (run by the appliance) and git (every project's repository).
        assert payload.get("registry") == "embedded", payload
        assert _podman("exec", ctr, "git", "--version").stdout.startswith("git version")

        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200

        # The app migrated its database on start.
        tables = asyncio.run(_user_tables(app_dsn))
        assert tables, "no tables in the app database: migrations did not run"

        # Runs as non-root.
        uid = _podman("exec", ctr, "id", "-u").stdout.strip()
        assert uid.isdigit() and int(uid) != 0, f"container process runs as uid {uid!r}"

        # A healthcheck is configured, and it passes (it follows CML_PORT).
        hc = json.loads(_podman("inspect", "--format", "{{json .Config.Healthcheck}}", ctr).stdout or "null")
        assert hc and hc.get("Test"), f"no Healthcheck in the container config: {hc!r}"
        _podman("healthcheck", "run", ctr, timeout=30)

        # Informational: how fast SIGTERM stops it (10 s means SIGTERM was ignored).
        t0 = time.monotonic()
        _podman("stop", "-t", "10", ctr, timeout=30, check=False)
        timings["podman stop"] = time.monotonic() - t0
    except BaseException:
        logs = _podman("logs", "--tail", "200", ctr, check=False)
        print(f"--- container {ctr} logs\n{logs.stdout}{logs.stderr}")
        raise
