"""Every workload's own client certificate for the gRPC port (CN `workload:<id>`), issued by the
appliance's CA when the workload starts, kept in data_dir/workload-tls/<id> (no workload sees the
data dir), shown to the workload read-only at /run/cml/tls, issued again before it expires, and
deleted when the workload ends.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cml_appliance.core import ownership, pki

log = logging.getLogger(__name__)

MOUNT = Path("/run/cml/tls")  # where a workload finds ca.pem, tls.crt and tls.key


class WorkloadCertificates:
    def __init__(self, ca: pki.CertificateAuthority, directory: Path, address: str):
        self.ca = ca
        self.directory = directory
        self.address = address  # host:port of the gRPC listener, as workloads reach it

    def issue(self, workload_id: str) -> Path:
        folder = self.directory / workload_id
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        issued = self.ca.issue_client(f"workload:{workload_id}")
        (folder / "ca.pem").write_bytes(self.ca.cert_pem)
        (folder / "tls.crt").write_bytes(issued.cert_pem)
        key = folder / "tls.key"
        key.touch(mode=0o600)
        key.write_bytes(issued.key_pem)
        ownership.give_tree(folder)  # the workload's uid reads its own key
        return folder

    def environment(self, folder: Path, *, mounted: bool) -> dict[str, str]:
        """What tells a workload where its certificate and the gRPC port are."""
        where = MOUNT if mounted else folder
        return {"CML_GRPC_ADDRESS": self.address, "CML_GRPC_CA": str(where / "ca.pem"),
                "CML_GRPC_CERT": str(where / "tls.crt"), "CML_GRPC_KEY": str(where / "tls.key")}

    def remove(self, workload_id: str) -> None:
        shutil.rmtree(self.directory / workload_id, ignore_errors=True)

    def renew_due(self, active: set[str]) -> list[str]:
        """Issue again the certificates of running workloads that near their end; drop the rest.
        Returns the workload ids renewed (a pod's Secret is then replaced too)."""
        renewed: list[str] = []
        if not self.directory.exists():
            return renewed
        for folder in self.directory.iterdir():
            if folder.name not in active:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            cert = folder / "tls.crt"
            if not cert.exists() or pki.needs_renewal(cert.read_bytes()):
                self.issue(folder.name)
                renewed.append(folder.name)
        return renewed
