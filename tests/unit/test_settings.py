"""Settings: defaults, environment and flag overrides, validation messages, redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from cml_appliance.core.settings import (
    SettingsError,
    ensure_secret_key,
    load_settings,
    redact_dsn,
)


def test_defaults() -> None:
    s = load_settings(environ={})
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.database_url == "" and s.migrate_on_start is True
    assert s.base_url == "http://127.0.0.1:8080"
    assert any(r["image_identifier"] == "host/python3" for r in s.runtimes)


def test_environment_then_flags_override(tmp_path: Path) -> None:
    env = {"CML_PORT": "9000", "CML_HOST": "0.0.0.0", "CML_DATA_DIR": str(tmp_path), "CML_MIGRATE_ON_START": "no"}
    s = load_settings(environ=env)
    assert s.port == 9000 and s.data_dir == tmp_path and s.migrate_on_start is False
    assert s.base_url == "http://127.0.0.1:9000"
    s = load_settings({"port": 9100, "public_url": "https://cml.example.com/"}, environ=env)
    assert s.port == 9100 and s.base_url == "https://cml.example.com" and s.domain == "cml.example.com"
    assert s.secure_cookies


def test_every_problem_is_reported_with_its_source_and_fix() -> None:
    env = {
        "CML_PORT": "eighty",
        "CML_DATABASE_URL": "mysql://db",
        "CML_LOG_FORMAT": "xml",
        "CML_SECRET_KEY": "short",
        "CML_PUBLIC_URL": "cml.example.com",
    }
    with pytest.raises(SettingsError) as info:
        load_settings(environ=env)
    text = str(info.value)
    assert "port from environment variable CML_PORT is 'eighty': use a whole number" in text
    assert "must start with postgresql://" in text
    env["CML_PORT"] = "70000"
    with pytest.raises(SettingsError) as info:
        load_settings(environ=env)
    problems = info.value.problems
    assert any("between 1 and 65535" in p for p in problems)
    assert any("postgresql://" in p for p in problems)
    assert any("log_format" in p and "json or text" in p for p in problems)
    assert any("secret_key" in p and "32 characters" in p for p in problems)
    assert any("public_url" in p for p in problems)


def test_flag_source_is_named() -> None:
    with pytest.raises(SettingsError, match="command-line flag --port"):
        load_settings({"port": 0}, environ={})


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    source = Path(__file__).resolve().parents[2] / "config" / "defaults.toml"
    broken = tmp_path / "defaults.toml"
    broken.write_text("colour = 'blue'\n" + source.read_text())
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings(environ={}, defaults_file=broken)


def test_secrets_are_redacted() -> None:
    s = load_settings(environ={"CML_DATABASE_URL": "postgresql://cml:hunter2@db:5432/cml", "CML_SECRET_KEY": "k" * 40})
    shown = s.redacted()
    assert "hunter2" not in str(shown) and "k" * 40 not in str(shown)
    assert shown["database_url"] == "postgresql://cml:<redacted>@db:5432/cml"
    assert redact_dsn("postgresql://u@h/db") == "postgresql://u@h/db"


def test_secret_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    s = load_settings(environ={"CML_DATA_DIR": str(tmp_path)})
    first = ensure_secret_key(s).secret_key
    assert len(first) >= 32
    assert ensure_secret_key(s).secret_key == first
    assert (tmp_path / "secret_key").stat().st_mode & 0o777 == 0o600


def test_tls_settings_are_checked_and_turn_the_public_url_to_https(tmp_path: Path) -> None:
    env = {"CML_DATA_DIR": str(tmp_path)}
    s = load_settings(environ=env | {"CML_TLS": "self-signed"})
    assert s.tls_enabled and s.base_url == "https://127.0.0.1:8080" and s.secure_cookies
    assert not load_settings(environ=env).tls_enabled
    with pytest.raises(SettingsError) as bad:
        load_settings(environ=env | {"CML_TLS": "on"})
    assert "use off, or self-signed" in str(bad.value)
    with pytest.raises(SettingsError) as half:
        load_settings(environ=env | {"CML_TLS_CERT_FILE": "/x.pem"})
    assert "go together" in str(half.value)
