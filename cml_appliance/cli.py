"""Command line: serve, migrate, check-config, users, api-keys."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import socket
import ssl
import sys
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg

from cml_appliance.core.errors import AppError
from cml_appliance.core.logs import setup_logging
from cml_appliance.core.settings import (
    Settings,
    SettingsError,
    ensure_secret_key,
    load_settings,
)
from cml_appliance.db import migrate as migrations
from cml_appliance.db.pool import create_pool, database_url

log = logging.getLogger(__name__)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", help="Postgres DSN (CML_DATABASE_URL); empty: embedded Postgres")
    parser.add_argument("--data-dir", help="where files, the secret key and the embedded database live (CML_DATA_DIR)")


def _add_server_flags(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--host", help="address to listen on (CML_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (CML_PORT)")
    parser.add_argument("--public-url", help="URL users reach the appliance at (CML_PUBLIC_URL)")
    parser.add_argument("--no-migrate", action="store_true", help="do not apply migrations; refuse to start if any are pending")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cml-appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the appliance")
    _add_server_flags(serve)

    check = sub.add_parser("check-config", help="print the effective settings (with serve's flags), secrets redacted")
    _add_server_flags(check)

    mig = sub.add_parser("migrate", help="apply pending database migrations")
    _add_common(mig)

    users = sub.add_parser("users", help="manage users")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    create = users_sub.add_parser("create", help="create a user")
    _add_common(create)
    create.add_argument("username")
    create.add_argument("--email", required=True)
    create.add_argument("--name", default="")
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    create.add_argument("--admin", action="store_true", help="make the user a site administrator")
    lst = users_sub.add_parser("list", help="list users")
    _add_common(lst)

    keys = sub.add_parser("api-keys", help="manage API v2 keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    kcreate = keys_sub.add_parser("create", help="create an API v2 key; the key is the last line printed")
    _add_common(kcreate)
    kcreate.add_argument("username")
    kcreate.add_argument("--comments", default="created with the command line")
    kcreate.add_argument("--audience", action="append", choices=["API", "Application"])
    kcreate.add_argument("--expires", help="expiry as an RFC 3339 time, e.g. 2027-01-01T00:00:00Z")

    certs = sub.add_parser("certs", help="the appliance's own certificate authority (data_dir/pki)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    cca = certs_sub.add_parser("ca", help="print the CA's certificate (to trust the self-signed HTTPS, or gRPC)")
    _add_common(cca)
    cclient = certs_sub.add_parser("client", help="write ca.pem, tls.crt and tls.key of a client certificate for NAME")
    _add_common(cclient)
    cclient.add_argument("name")
    cclient.add_argument("--out", required=True, help="the folder to write them to")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None)
        for key in ("database_url", "data_dir", "host", "port", "public_url")
    }
    if getattr(args, "no_migrate", False):
        overrides["migrate_on_start"] = False
    return load_settings(overrides)


@contextlib.asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    async with database_url(settings.database_url, settings.data_dir) as dsn:
        pool = await create_pool(dsn, 1, 2)
        try:
            yield pool
        finally:
            await pool.close()


async def _migrate(settings: Settings) -> int:
    async with _pool(settings) as pool, pool.acquire() as conn:
        applied = await migrations.migrate(conn)
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("the database is up to date")
    return 0


async def _with_current_schema(settings: Settings, pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await migrations.require_current_schema(conn)


async def _create_user(settings: Settings, args: argparse.Namespace) -> int:
    from cml_appliance.auth import users

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
    async with _pool(settings) as pool:
        await _with_current_schema(settings, pool)
        user = await users.create_user(pool, args.username, args.email, password, name=args.name, is_admin=args.admin)
    print(f"created user {user.username}{' (site administrator)' if user.is_admin else ''}")
    return 0


async def _list_users(settings: Settings) -> int:
    from cml_appliance.auth import users

    async with _pool(settings) as pool:
        await _with_current_schema(settings, pool)
        for user in await users.list_users(pool):
            flags = ",".join(f for f, on in (("admin", user.is_admin), ("inactive", not user.is_active)) if on)
            print(f"{user.username}\t{user.email}\t{flags}")
    return 0


async def _create_key(settings: Settings, args: argparse.Namespace) -> int:
    from cml_appliance.auth import api_keys, users

    async with _pool(settings) as pool:
        await _with_current_schema(settings, pool)
        user = await users.get_by_username(pool, args.username)
        secret, key = await api_keys.create(
            pool, user, comments=args.comments, audiences=args.audience, expires_at=api_keys.parse_expiry(args.expires)
        )
    print(f"created API key {key.key_id} for {user.username} (audiences: {', '.join(key.audiences)}); it is shown only once:")
    print(secret)
    return 0


def _certs(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from cml_appliance.core import pki

    if args.certs_command == "ca":
        sys.stdout.write(pki.CertificateAuthority.load_or_create(settings.pki_dir).cert_pem.decode())
        return 0
    pki.write_client(settings.pki_dir, args.name, Path(args.out))
    print(f"wrote ca.pem, tls.crt and tls.key for {args.name} to {args.out}")
    return 0


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTPS context of the UI's (and the applications') listener, or None without TLS."""
    if not settings.tls_enabled:
        return None
    if settings.tls == "self-signed":
        from cml_appliance.core import pki

        hosts = [h for h in (urlsplit(settings.base_url).hostname, None if settings.host in ("0.0.0.0", "::", "") else settings.host,
                             "localhost", "127.0.0.1", socket.gethostname()) if h]
        cert, key = pki.server_certificate(settings.pki_dir, hosts)
    else:
        cert, key = settings.tls_cert_file, settings.tls_key_file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def _serve(settings: Settings) -> int:
    import uvloop
    from aiohttp import web

    from cml_appliance.app import create_app
    from cml_appliance.web.keys import TLS_CONTEXT

    app = create_app(settings)
    # The main port is bound before start-up, which opens listeners on ports the system picks
    # (internal_port, apps_port 0): one of those may never take the port asked for here.
    try:
        sock = socket.create_server((settings.host, settings.port), backlog=128, reuse_port=False,
                                    family=socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    except OSError as exc:
        print(f"cml-appliance: cannot listen on {settings.host}:{settings.port}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        context = tls_context(settings)
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"cml-appliance: cannot use the TLS certificate: {exc}", file=sys.stderr)
        return 2
    app[TLS_CONTEXT] = context
    log.info("cml-appliance listening on %s:%s (public URL %s)", settings.host, settings.port, settings.base_url)
    web.run_app(
        app,
        sock=sock,
        ssl_context=context,
        print=None,
        access_log=None,
        shutdown_timeout=15,
        # aiohttp's idle timer runs from the connection's start until a whole request has
        # arrived, so it is also the header-read timeout (a request being served is not cut).
        keepalive_timeout=settings.header_timeout_seconds,
        loop=uvloop.new_event_loop(),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as exc:
        print(f"cml-appliance: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format if args.command == "serve" else "text", settings.log_level)
    if args.command == "check-config":
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    settings = ensure_secret_key(settings)
    try:
        if args.command == "serve":
            return _serve(settings)
        if args.command == "migrate":
            return asyncio.run(_migrate(settings))
        if args.command == "users":
            if args.users_command == "create":
                return asyncio.run(_create_user(settings, args))
            return asyncio.run(_list_users(settings))
        if args.command == "api-keys":
            return asyncio.run(_create_key(settings, args))
        if args.command == "certs":
            return _certs(settings, args)
    except migrations.SchemaError as exc:
        print(f"cml-appliance: {exc}", file=sys.stderr)
        return 3
    except AppError as exc:
        print(f"cml-appliance: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"cml-appliance: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.command)


