"""Settings: config/defaults.toml, overridden by CML_* environment variables, then CLI flags.

Validation collects every problem and reports them together, each with how to fix it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cml_appliance.core.paths import config_dir

ENV_PREFIX = "CML_"
SECRET_FIELDS = frozenset({"secret_key", "smtp_password"})


class SettingsError(Exception):
    """The configuration is invalid; str() lists every problem and its fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclasses.dataclass(frozen=True)
class Settings:
    host: str
    port: int
    public_url: str
    database_url: str
    database_pool_min: int
    database_pool_max: int
    data_dir: Path
    secret_key: str
    tls: str
    tls_cert_file: str
    tls_key_file: str
    migrate_on_start: bool
    log_format: str
    log_level: str
    max_json_body_mb: int
    max_upload_mb: int
    header_timeout_seconds: int
    session_hours: int
    login_max_failures: int
    container_engine_url: str
    container_network: str
    workload_engine: str
    kubeconfig: str
    kubernetes_in_cluster: bool
    kubernetes_namespace_prefix: str
    kubernetes_projects_volume: str
    kubernetes_namespace_quota: str
    kubernetes_appliance_cidrs: str
    kubernetes_appliance_namespace: str
    kubernetes_watch_timeout_seconds: int
    kubernetes_watch_stale_seconds: int
    local_sandbox: str
    allow_unsandboxed_local: bool
    workload_log_max_mb: int
    stop_grace_seconds: int
    idle_maximum_minutes: int
    session_maximum_minutes: int
    reconcile_interval_seconds: int
    app_ready_timeout_seconds: int
    allow_unauthenticated_apps: bool
    apps_port: int
    apps_url: str
    apps_domain: str
    editors_port: int
    editors_url: str
    allow_private_git_hosts: bool
    git_max_push_mb: int
    registry_url: str
    registry_max_upload_mb: int
    internal_port: int
    grpc_port: int
    build_concurrency: int
    build_timeout_seconds: int
    build_lease_seconds: int
    build_snapshot_max_mb: int
    model_request_timeout_seconds: int
    model_max_request_mb: int
    model_busy_wait_seconds: int
    smtp_host: str
    smtp_port: int
    smtp_sender: str
    smtp_username: str
    smtp_password: str
    smtp_starttls: bool
    runtimes: tuple[Mapping[str, Any], ...] = ()
    cpu_profiles: tuple[Mapping[str, Any], ...] = ()

    @property
    def base_url(self) -> str:
        """The URL users reach the appliance at, without a trailing slash."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{'https' if self.tls_enabled else 'http'}://{host}:{self.port}"

    @property
    def tls_enabled(self) -> bool:
        return self.tls == "self-signed" or bool(self.tls_cert_file)

    @property
    def domain(self) -> str:
        return urlsplit(self.base_url).netloc

    @property
    def secure_cookies(self) -> bool:
        return self.base_url.startswith("https://")

    @property
    def kubernetes_enabled(self) -> bool:
        return bool(self.kubeconfig) or self.kubernetes_in_cluster

    @property
    def runtime_engine(self) -> str:
        """Where runtimes that are not host/... run: kubernetes (when configured) or container."""
        return self.workload_engine or ("kubernetes" if self.kubernetes_enabled else "container")

    @property
    def projects_dir(self) -> Path:
        return self.data_dir / "projects"

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets and DSN passwords hidden."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in SECRET_FIELDS:
                value = "<redacted>" if value else ("<generated in data_dir/secret_key>" if field.name == "secret_key" else "")
            elif field.name == "database_url":
                value = redact_dsn(value) if value else "<embedded pgserver in data_dir/postgres>"
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [dict(v) for v in value]
            out[field.name] = value
        return out


def redact_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":<redacted>@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


_HINTS = typing.get_type_hints(Settings)
_SCALAR_TYPES: dict[str, Any] = {
    f.name: _HINTS[f.name] for f in dataclasses.fields(Settings) if f.name not in ("runtimes", "cpu_profiles")
}


def _coerce(name: str, raw: Any, problems: list[str], source: str) -> Any:
    kind = _SCALAR_TYPES[name]
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        problems.append(f"{name} from {source} is {raw!r}: use true or false")
        return None
    if kind is int:
        if isinstance(raw, bool):
            problems.append(f"{name} from {source} is {raw!r}: use a whole number")
            return None
        try:
            return int(str(raw).strip())
        except ValueError:
            problems.append(f"{name} from {source} is {raw!r}: use a whole number")
            return None
    if kind is Path:
        return Path(str(raw)).expanduser()
    return str(raw)


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    defaults_file: Path | None = None,
) -> Settings:
    """Build and validate the settings; raises SettingsError listing every problem."""
    environ = os.environ if environ is None else environ
    defaults_file = defaults_file or config_dir() / "defaults.toml"
    with open(defaults_file, "rb") as fh:
        raw: dict[str, Any] = tomllib.load(fh)
    sources = {key: str(defaults_file) for key in raw}
    problems: list[str] = []

    unknown = sorted(k for k in raw if k not in _SCALAR_TYPES and k not in ("runtimes", "cpu_profiles"))
    problems += [f"unknown setting {k!r} in {defaults_file}: remove it" for k in unknown]

    for name in _SCALAR_TYPES:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            raw[name] = environ[env_name]
            sources[name] = f"environment variable {env_name}"
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
            sources[name] = f"command-line flag --{name.replace('_', '-')}"

    values: dict[str, Any] = {}
    for name in _SCALAR_TYPES:
        if name not in raw:
            problems.append(f"{name} is missing from {defaults_file}: restore it")
            continue
        values[name] = _coerce(name, raw[name], problems, sources[name])

    _validate(values, sources, problems)
    if problems:
        raise SettingsError(problems)

    values["data_dir"] = values["data_dir"].resolve()
    values["runtimes"] = tuple(raw.get("runtimes", ()))
    values["cpu_profiles"] = tuple(raw.get("cpu_profiles", ()))
    return Settings(**values)


def _validate(values: dict[str, Any], sources: dict[str, str], problems: list[str]) -> None:
    """Check values that parsed (None marks one that did not, already reported)."""

    def bad(name: str, why: str) -> None:
        problems.append(f"{name} from {sources[name]} is {values[name]!r}: {why}")

    def ok(*names: str) -> bool:
        return all(values.get(n) is not None for n in names)

    public = values.get("public_url")
    if ok("port") and not 1 <= values["port"] <= 65535:
        bad("port", "use a port between 1 and 65535 (CML_PORT)")
    if ok("grpc_port") and not 0 <= values["grpc_port"] <= 65535:
        bad("grpc_port", "use a port between 1 and 65535, or 0 for any free port (CML_GRPC_PORT)")
    if ok("internal_port") and not 0 <= values["internal_port"] <= 65535:
        bad("internal_port", "use a port between 1 and 65535, or 0 for any free port (CML_INTERNAL_PORT)")
    if ok("apps_port") and not 0 <= values["apps_port"] <= 65535:
        bad("apps_port", "use a port between 1 and 65535, or 0 for any free port (CML_APPS_PORT)")
    elif ok("apps_port", "port") and values["apps_port"] == values["port"]:
        bad("apps_port", "applications need a listener of their own: use a port other than CML_PORT")
    apps_url = values.get("apps_url")
    if apps_url:
        parts = urlsplit(apps_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
            bad("apps_url", "use the origin of the applications' listener, such as https://apps.example.com, or leave it empty")
        elif public and urlsplit(public).netloc.lower() == parts.netloc.lower():
            bad("apps_url", "applications must not share the UI's origin (public_url): use another host or port")
    if ok("editors_port") and not 0 <= values["editors_port"] <= 65535:
        bad("editors_port", "use a port between 1 and 65535, or 0 for any free port (CML_EDITORS_PORT)")
    elif ok("editors_port", "port", "apps_port") and values["editors_port"] and \
            values["editors_port"] in (values["port"], values["apps_port"]):
        bad("editors_port", "editors need a listener of their own: use a port other than CML_PORT and CML_APPS_PORT")
    editors_url = values.get("editors_url")
    if editors_url:
        parts = urlsplit(editors_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            bad("editors_url", "use the origin of the editors' listener, such as https://editors.example.com, or leave it empty")
        elif values.get("public_url") and urlsplit(values["public_url"]).netloc == parts.netloc:
            bad("editors_url", "editors must not share the UI's origin (public_url): use another host or port")
    apps_domain = values.get("apps_domain")
    if apps_domain and (not re.fullmatch(r"[a-z0-9.-]+(:[0-9]{1,5})?", apps_domain.lower()) or apps_domain.startswith(".")):
        bad("apps_domain", "use a domain with wildcard DNS, such as apps.example.com (no scheme, no leading dot), or leave it empty")
    url = values.get("database_url")
    if url and urlsplit(url).scheme not in ("postgres", "postgresql"):
        problems.append(
            f"database_url from {sources['database_url']} must start with postgresql:// "
            "(for example postgresql://user:password@db-host:5432/cml), or be empty for the embedded Postgres"
        )
    if public and (urlsplit(public).scheme not in ("http", "https") or not urlsplit(public).netloc):
        bad("public_url", "use a full URL such as https://cml.example.com, or leave it empty")
    if ok("database_pool_min", "database_pool_max") and (
        values["database_pool_min"] < 1 or values["database_pool_max"] < values["database_pool_min"]
    ):
        problems.append("database_pool_min must be at least 1 and no larger than database_pool_max")
    if ok("log_format") and values["log_format"] not in ("json", "text"):
        bad("log_format", "use json or text")
    if ok("log_level"):
        if values["log_level"].upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            bad("log_level", "use DEBUG, INFO, WARNING or ERROR")
        values["log_level"] = values["log_level"].upper()
    registry = values.get("registry_url")
    if registry and (urlsplit(registry).scheme not in ("http", "https") or not urlsplit(registry).netloc):
        bad("registry_url", "use the base URL of an OCI registry, such as https://registry.example.com, or leave it empty")
    engine_url = values.get("container_engine_url")
    if engine_url and urlsplit(engine_url).scheme not in ("unix", "tcp", "http", "https"):
        bad("container_engine_url", "use unix:///path/to/docker.sock, tcp://host:port or http(s)://..., or leave it empty")
    if ok("tls") and values["tls"] not in ("off", "self-signed"):
        bad("tls", "use off, or self-signed (a certificate from the appliance's own CA); for your own certificate set "
                   "tls_cert_file and tls_key_file instead")
    if bool(values.get("tls_cert_file")) != bool(values.get("tls_key_file")):
        problems.append("tls_cert_file and tls_key_file go together: set both (PEM files), or neither")
    elif values.get("tls_cert_file") and values.get("tls") == "self-signed":
        problems.append("tls is self-signed but tls_cert_file is set too: choose one")
    if ok("local_sandbox") and values["local_sandbox"] not in ("auto", "bubblewrap", "off"):
        bad("local_sandbox", "use auto (bubblewrap where it works), bubblewrap (required) or off")
    if ok("container_network") and values["container_network"] not in ("bridge", "host", "none"):
        bad("container_network", "use bridge, host or none")
    kubernetes_on = bool(values.get("kubeconfig")) or bool(values.get("kubernetes_in_cluster"))
    if values.get("kubeconfig") and not Path(str(values["kubeconfig"])).expanduser().is_file():
        bad("kubeconfig", "use the path of a kubeconfig file (CML_KUBECONFIG), or leave it empty")
    if values.get("kubeconfig") and values.get("kubernetes_in_cluster"):
        problems.append("kubeconfig and kubernetes_in_cluster are both set: choose one way to reach the cluster")
    if ok("workload_engine"):
        if values["workload_engine"] not in ("", "kubernetes", "container"):
            bad("workload_engine", "use kubernetes or container, or leave it empty (kubernetes when it is configured)")
        elif values["workload_engine"] == "kubernetes" and not kubernetes_on:
            bad("workload_engine", "kubernetes needs CML_KUBECONFIG or CML_KUBERNETES_IN_CLUSTER=true")
    prefix = values.get("kubernetes_namespace_prefix")
    if prefix is not None and not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,28}[a-z0-9])?", prefix):
        bad("kubernetes_namespace_prefix", "use up to 30 lower-case letters, digits and dashes (a DNS label)")
    quota = values.get("kubernetes_namespace_quota")
    if quota and not all(re.fullmatch(r"\s*[a-zA-Z0-9./-]+\s*=\s*[0-9][0-9.]*[a-zA-Z]*\s*", part) for part in quota.split(",")):
        bad("kubernetes_namespace_quota", "use name=quantity pairs, such as requests.cpu=8,requests.memory=32Gi,pods=50")
    for name in (
        "max_json_body_mb", "max_upload_mb", "session_hours", "login_max_failures", "workload_log_max_mb",
        "stop_grace_seconds", "idle_maximum_minutes", "session_maximum_minutes", "reconcile_interval_seconds",
        "app_ready_timeout_seconds", "model_request_timeout_seconds", "model_max_request_mb", "model_busy_wait_seconds",
        "git_max_push_mb", "build_snapshot_max_mb", "kubernetes_watch_timeout_seconds", "kubernetes_watch_stale_seconds", "registry_max_upload_mb", "build_concurrency", "build_timeout_seconds", "build_lease_seconds",
    ):
        if ok(name) and values[name] < 1:
            bad(name, "use a whole number of at least 1")
    if values.get("secret_key") and len(values["secret_key"]) < 32:
        bad("secret_key", "use at least 32 characters, or leave it empty to have one generated")


def ensure_secret_key(settings: Settings) -> Settings:
    """Return settings with a secret key: the configured one, or one kept in data_dir/secret_key."""
    if settings.secret_key:
        return settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path = settings.data_dir / "secret_key"
    if not path.exists():
        # O_EXCL so two processes starting together agree on one key.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(48))
    key = path.read_text().strip()
    return dataclasses.replace(settings, secret_key=key)
