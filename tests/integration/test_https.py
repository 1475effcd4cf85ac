"""HTTPS: the real `serve` with a certificate from the appliance's own CA (tls = self-signed) or
with certificate files; cookies are Secure, HSTS is sent, WebSockets work as wss://, and plain
HTTP on the port gets nowhere. `cml-appliance certs` prints the CA and writes client certs."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from tests.integration.test_cli import CLI, cli_env, free_port, fresh_db, run  # noqa: F401 (fixtures)


def https_get(url: str, context: ssl.SSLContext, key: str = "") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10, context=context) as resp:
        return resp.status, dict(resp.headers), resp.read()


def wait_https(url: str, context: ssl.SSLContext, proc: subprocess.Popen[str]) -> None:
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited: {proc.stderr.read() if proc.stderr else ''}"
        try:
            if https_get(url + "/readyz", context)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("serve did not become ready over HTTPS")


@pytest.fixture
def prepared(cli_env: dict[str, str], fresh_db: str) -> tuple[dict[str, str], str]:
    cli_env["CML_DATABASE_URL"] = fresh_db
    assert run(["migrate"], cli_env).returncode == 0
    assert run(["users", "create", "tia", "--email", "t@example.com", "--password-stdin"], cli_env, "longpassword\n").returncode == 0
    key = run(["api-keys", "create", "tia"], cli_env).stdout.strip().splitlines()[-1]
    return cli_env, key


def test_self_signed_https_secure_cookies_hsts_and_wss(prepared: tuple[dict[str, str], str], tmp_path: Path) -> None:
    env, key = prepared
    env["CML_TLS"] = "self-signed"
    ca = run(["certs", "ca"], env)
    assert ca.returncode == 0 and ca.stdout.startswith("-----BEGIN CERTIFICATE-----"), ca.stderr
    (tmp_path / "ca.pem").write_text(ca.stdout)
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--port", str(port), "--no-migrate"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = f"https://127.0.0.1:{port}"
        wait_https(url, trusted, proc)
        status, headers, body = https_get(url + "/api/v2/projects", trusted, key)
        assert status == 200 and json.loads(body)["projects"] == []
        assert headers["Strict-Transport-Security"].startswith("max-age=")
        # The sign-in page's cookie is Secure; the certificate names the host and chains to the CA.
        status, headers, _ = https_get(url + "/login", trusted)
        assert status == 200 and "Secure" in headers["Set-Cookie"], headers["Set-Cookie"]
        # A client that does not trust the appliance's CA is refused; plain HTTP gets no page.
        with pytest.raises(urllib.error.URLError) as refused:
            https_get(url + "/healthz", ssl.create_default_context())
        assert isinstance(refused.value.reason, ssl.SSLCertVerificationError), refused.value
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()
        asyncio.run(_terminal_over_wss(url, key, trusted))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def _terminal_over_wss(url: str, key: str, context: ssl.SSLContext) -> None:
    """A session's terminal over wss:// (what the page opens when it is served over HTTPS)."""
    auth = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
        async with http.post(url + "/api/v2/projects", json={"name": "secure"}, headers=auth) as resp:
            pid = (await resp.json())["id"]
        async with http.post(f"{url}/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "host/python3"},
                             headers=auth) as resp:
            session = await resp.json()
            assert resp.status == 200, session
        for _ in range(200):
            async with http.get(f"{url}/api/v2/projects/{pid}/sessions/{session['id']}", headers=auth) as resp:
                if (await resp.json())["status"] == "ENGINE_RUNNING":
                    break
            await asyncio.sleep(0.1)
        ws = await http.ws_connect(f"{url.replace('https', 'wss')}/api/v2/projects/{pid}/sessions/{session['id']}/terminal",
                                   headers=auth)
        await ws.send_bytes(b"echo over-$((40+2))-wss\n")
        seen = b""
        while b"over-42-wss" not in seen:
            msg = await ws.receive(timeout=10)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            seen += msg.data
        await ws.close()
        async with http.post(f"{url}/api/v2/projects/{pid}/sessions/{session['id']}:stop", headers=auth) as resp:
            assert resp.status == 200


def test_a_certificate_of_ones_own_and_a_broken_one(prepared: tuple[dict[str, str], str], tmp_path: Path) -> None:
    from cml_appliance.core import pki

    env, key = prepared
    # A certificate from another CA (as a company's would be), given as files.
    other = pki.CertificateAuthority.load_or_create(tmp_path / "company-ca")
    issued = other.issue_server(["127.0.0.1", "localhost"])
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    (tmp_path / "tls.key").write_bytes(issued.key_pem)
    env.update({"CML_TLS_CERT_FILE": str(tmp_path / "tls.crt"), "CML_TLS_KEY_FILE": str(tmp_path / "tls.key")})
    trusted = ssl.create_default_context(cadata=other.cert_pem.decode())
    port = free_port()
    proc = subprocess.Popen(CLI + ["serve", "--port", str(port), "--no-migrate"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_https(f"https://127.0.0.1:{port}", trusted, proc)
        assert https_get(f"https://127.0.0.1:{port}/api/v2/projects", trusted, key)[0] == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # A key that is not the certificate's: a clear refusal at start, not a half-started server.
    (tmp_path / "other.key").write_bytes(other.issue_server(["x"]).key_pem)
    env["CML_TLS_KEY_FILE"] = str(tmp_path / "other.key")
    result = run(["serve", "--port", str(free_port()), "--no-migrate"], env, timeout=60)
    assert result.returncode == 2 and "cannot use the TLS certificate" in result.stderr, result.stderr
    # Half a configuration is refused before anything starts.
    env.pop("CML_TLS_KEY_FILE")
    result = run(["check-config"], env)
    assert result.returncode == 2 and "tls_cert_file and tls_key_file go together" in result.stderr


def test_client_certificates_name_their_holder(cli_env: dict[str, str], tmp_path: Path) -> None:
    result = run(["certs", "client", "workload-abc", "--out", str(tmp_path / "client")], cli_env)
    assert result.returncode == 0, result.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "client" / "tls.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "client" / "ca.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=workload-abc" and cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)
    assert oct((tmp_path / "client" / "tls.key").stat().st_mode & 0o777) == "0o600"
    assert oct((Path(cli_env["CML_DATA_DIR"]) / "pki" / "ca.key").stat().st_mode & 0o777) == "0o600"
