"""The appliance's own certificate authority, kept in data_dir/pki.

It signs the HTTPS certificate when `tls = "self-signed"` (for the public host name) and the
client certificates that name who calls the gRPC port (a workload, or what `cml-appliance certs
client` writes). Keys are ECDSA P-256; the CA's key is 0600 in a 0700 folder of the data dir,
which no workload sees. Certificates it issues are short-lived and issued again before they
expire (`needs_renewal`).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 90
CLIENT_DAYS = 30
RENEW_WHEN_LEFT = datetime.timedelta(days=10)


@dataclasses.dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(cls, directory: Path) -> CertificateAuthority:
        """The CA in `directory` (made on first use; two processes racing agree on one)."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key_path, cert_path = directory / "ca.key", directory / "ca.pem"
        if not cert_path.exists():
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cml-appliance"),
                              x509.NameAttribute(NameOID.COMMON_NAME, "cml-appliance CA")])
            cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(_now() - datetime.timedelta(minutes=5))
                    .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                 content_commitment=False, key_encipherment=False, data_encipherment=False,
                                                 key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
                    .sign(key, hashes.SHA256()))
            staging = directory / f".ca-{os.getpid()}"
            staging.mkdir(mode=0o700)
            _write_private(staging / "ca.key", _key_pem(key))
            (staging / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
            try:
                os.link(staging / "ca.key", key_path)  # whoever links first wins; the other reads theirs
                os.replace(staging / "ca.pem", cert_path)
            except FileExistsError:
                pass
            finally:
                for leftover in staging.iterdir():
                    leftover.unlink()
                staging.rmdir()
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))

    def _issue(self, common_name: str, days: int, usage: x509.ObjectIdentifier,
               names: list[x509.GeneralName]) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(_now() - datetime.timedelta(minutes=5))
                   .not_valid_after(_now() + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem, _key_pem(key))

    def issue_server(self, hosts: list[str], days: int = SERVER_DAYS) -> Issued:
        """A serving certificate for these host names and addresses (the chain includes the CA)."""
        names: list[x509.GeneralName] = []
        for host in dict.fromkeys(hosts):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        return self._issue(hosts[0], days, ExtendedKeyUsageOID.SERVER_AUTH, names)

    def issue_client(self, name: str, days: int = CLIENT_DAYS) -> Issued:
        """A client certificate whose common name says who holds it (a workload id, a user's name)."""
        return self._issue(name, days, ExtendedKeyUsageOID.CLIENT_AUTH, [])


def needs_renewal(cert_pem: bytes, hosts: list[str] | None = None) -> bool:
    """Whether a certificate expires within RENEW_WHEN_LEFT (or no longer names `hosts`)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return True
    if cert.not_valid_after_utc - _now() < RENEW_WHEN_LEFT:
        return True
    if hosts is not None:
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return True
        named = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {str(v) for v in san.get_values_for_type(x509.IPAddress)}
        return not set(hosts) <= named
    return False


def server_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """(cert, key) files of the self-signed HTTPS certificate for `hosts`, issued again by the
    CA when missing, near its end, or made for other host names."""
    ca = CertificateAuthority.load_or_create(directory)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    if not cert_path.exists() or needs_renewal(cert_path.read_bytes(), hosts):
        issued = ca.issue_server(hosts)
        _write_private(key_path, issued.key_pem)
        cert_path.write_bytes(issued.cert_pem)
    return cert_path, key_path


def write_client(directory: Path, name: str, out: Path) -> None:
    """ca.pem, tls.crt and tls.key of a client certificate for `name`, into `out`."""
    ca = CertificateAuthority.load_or_create(directory)
    issued = ca.issue_client(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca.pem").write_bytes(ca.cert_pem)
    (out / "tls.crt").write_bytes(issued.cert_pem)
    _write_private(out / "tls.key", issued.key_pem)
