"""The command line, run as a user would: check-config, migrate, users, api-keys, serve and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import _with_database

CLI = [sys.executable, "-m", "cml_appliance"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str], stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)


def get(url: str, key: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_ready(url: str, proc: subprocess.Popen[str], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{proc.stderr.read() if proc.stderr else ''}")
        try:
            if get(url + "/readyz")[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
    raise AssertionError("serve did not become ready")


@pytest.fixture
def fresh_db(database_server: str) -> Iterator[str]:
    import asyncio

    name = f"cml_cli_{uuid.uuid4().hex[:8]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(database_server)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    yield _with_database(database_server, name)
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CML_")}
    env.update({"CML_DATA_DIR": str(tmp_path / "data"), "CML_LOG_LEVEL": "WARNING", "CML_APPS_PORT": "0", "CML_GRPC_PORT": "0",
                "CML_EDITORS_PORT": "0"})
    return env


def test_check_config_prints_redacted_settings(cli_env: dict[str, str]) -> None:
    cli_env["CML_DATABASE_URL"] = "postgresql://cml:hunter2@db.example:5432/cml"
    result = run(["check-config", "--port", "9999"], cli_env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["port"] == 9999 and "hunter2" not in result.stdout
    assert shown["secret_key"].startswith("<")


def test_bad_configuration_exits_with_a_clear_message(cli_env: dict[str, str]) -> None:
    cli_env["CML_PORT"] = "http"
    result = run(["check-config"], cli_env)
    assert result.returncode == 2
    assert "port from environment variable CML_PORT is 'http': use a whole number" in result.stderr


def test_migrate_users_keys_and_serve(cli_env: dict[str, str], fresh_db: str) -> None:
    cli_env["CML_DATABASE_URL"] = fresh_db
    cli_env["CML_HEADER_TIMEOUT_SECONDS"] = "2"
    # Before migrating, commands refuse and name the fix.
    result = run(["users", "create", "ann", "--email", "ann@example.com", "--password-stdin"], cli_env, "longpassword\n")
    assert result.returncode == 3 and "cml-appliance migrate" in result.stderr
    result = run(["migrate"], cli_env)
    assert result.returncode == 0 and "applied 0001_initial" in result.stdout
    assert "up to date" in run(["migrate"], cli_env).stdout

    result = run(["users", "create", "ann", "--email", "ann@example.com", "--password-stdin", "--admin"], cli_env, "longpassword\n")
    assert result.returncode == 0, result.stderr
    result = run(["users", "create", "ann", "--email", "ann@example.com", "--password-stdin"], cli_env, "longpassword\n")
    assert result.returncode == 1 and "already exists" in result.stderr
    result = run(["users", "create", "Bad Name", "--email", "x@example.com", "--password-stdin"], cli_env, "longpassword\n")
    assert result.returncode == 1 and "username must be" in result.stderr
    result = run(["api-keys", "create", "ann"], cli_env)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip().splitlines()[-1]

    port = free_port()
    proc = subprocess.Popen(
        CLI + ["serve", "--port", str(port), "--no-migrate"], env=cli_env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc)
        status, body = get(url + "/api/v2/projects", key)
        assert status == 200 and body == {"projects": [], "next_page_token": ""}
        # A client that trickles its headers is cut off after header_timeout_seconds (2 here).
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            started = time.monotonic()
            slow.sendall(b"GET /api/v2/projects HTTP/1.1\r\nHost: x\r\n")
            closed = False
            while time.monotonic() - started < 8:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    closed = True
                    break
                slow.settimeout(0.5)
                try:
                    if slow.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    pass
            assert closed and time.monotonic() - started < 6, "a connection trickling headers was held open"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        logs = proc.stderr.read() if proc.stderr else ""
        # Log lines are JSON with a request id.
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        assert all("level" in line for line in lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_newer_schema(cli_env: dict[str, str], fresh_db: str) -> None:
    import asyncio

    cli_env["CML_DATABASE_URL"] = fresh_db
    assert run(["migrate"], cli_env).returncode == 0

    async def poison() -> None:
        conn = await asyncpg.connect(fresh_db)
        try:
            await conn.execute("INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')")
        finally:
            await conn.close()

    asyncio.run(poison())
    result = run(["serve", "--port", str(free_port())], cli_env, timeout=60)
    assert result.returncode == 3
    assert "newer release" in result.stderr


def test_embedded_postgres_is_shared_with_the_cli_and_stopped_on_exit(cli_env: dict[str, str], tmp_path: Path) -> None:
    cli_env.pop("DATABASE_URL", None)
    port = free_port()
    proc = subprocess.Popen(
        CLI + ["serve", "--port", str(port)], env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, deadline=90)
        result = run(["users", "create", "eve", "--email", "eve@example.com", "--password-stdin"], cli_env, "longpassword\n")
        assert result.returncode == 0, result.stderr
        key = run(["api-keys", "create", "eve"], cli_env).stdout.strip().splitlines()[-1]
        assert get(url + "/api/v2/projects", key)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pgdata = tmp_path / "data" / "postgres"
    assert (pgdata / "PG_VERSION").exists()
    # The last user of the embedded server stopped it.
    deadline = time.monotonic() + 10
    while (pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (pgdata / "postmaster.pid").exists()


def test_after_a_sigkill_a_clean_stop_still_stops_the_embedded_postgres(cli_env: dict[str, str], tmp_path: Path) -> None:
    cli_env.pop("DATABASE_URL", None)
    pgdata = tmp_path / "data" / "postgres"
    for stop in (signal.SIGKILL, signal.SIGTERM):
        port = free_port()
        proc = subprocess.Popen(CLI + ["serve", "--port", str(port)], env=cli_env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, deadline=90)
            proc.send_signal(stop)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if stop == signal.SIGKILL:
            assert (pgdata / "postmaster.pid").exists()  # killed: nobody stopped it
    deadline = time.monotonic() + 15
    while (pgdata / "postmaster.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not (pgdata / "postmaster.pid").exists(), "the embedded Postgres outlived a clean stop after a SIGKILL"
