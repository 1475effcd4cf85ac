"""gRPC with mutual TLS: only a client certificate from the appliance's CA gets in; a user's
certificate reads what the user may read; each workload is given a certificate of its own that
acts for that workload only, at /run/cml/tls inside its sandbox, and is gone when it ends."""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from cml_appliance.core import pki
from cml_appliance.grpc.generated.cml.v1 import appliance_pb2 as pb
from cml_appliance.grpc.generated.cml.v1.appliance_grpc import CatalogStub, WorkloadsStub
from cml_appliance.web.keys import GRPC_PORT, SETTINGS
from tests.conftest import Api
from tests.integration.sessions_helpers import start_running_session


# How a refused connection shows: the handshake fails, or the stream ends unanswered.
REFUSED = (StreamTerminatedError, ConnectionError, ssl.SSLError, OSError, asyncio.TimeoutError)


def client_tls(ca_pem: bytes, cert_pem: bytes | None = None, key_pem: bytes | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    if cert_pem is not None and key_pem is not None:
        folder = Path(tempfile.mkdtemp(prefix="cml-grpc-client-"))
        (folder / "tls.crt").write_bytes(cert_pem)
        (folder / "tls.key").write_bytes(key_pem)
        context.load_cert_chain(str(folder / "tls.crt"), str(folder / "tls.key"))
    context.set_alpn_protocols(["h2"])
    return context


def ca_of(client: Any) -> pki.CertificateAuthority:
    return pki.CertificateAuthority.load_or_create(client.app[SETTINGS].pki_dir)


async def health(port: int, context: ssl.SSLContext | None) -> Any:
    channel = Channel("127.0.0.1", port, ssl=context)
    try:
        return await asyncio.wait_for(HealthStub(channel).Check(HealthCheckRequest()), 10)
    finally:
        channel.close()


async def test_only_a_certificate_from_the_appliances_ca_gets_in(alice: Api) -> None:
    client = alice.client
    port, ca = client.app[GRPC_PORT], ca_of(client)
    # Plain TCP, TLS without a client certificate, and a certificate from another CA: refused.
    for context in (None, client_tls(ca.cert_pem)):
        with pytest.raises(REFUSED):
            await health(port, context)
    stranger_ca = pki.CertificateAuthority.load_or_create(Path(tempfile.mkdtemp(prefix="cml-other-ca-")))
    forged = stranger_ca.issue_client("alice")
    with pytest.raises(REFUSED):
        await health(port, client_tls(ca.cert_pem, forged.cert_pem, forged.key_pem))
    # The appliance's own: the standard health check answers.
    mine = ca.issue_client("alice")
    reply = await health(port, client_tls(ca.cert_pem, mine.cert_pem, mine.key_pem))
    assert reply.status == HealthCheckResponse.SERVING


async def test_users_read_their_own_and_workloads_act_for_themselves(alice: Api, bob: Api) -> None:
    client = alice.client
    port, ca = client.app[GRPC_PORT], ca_of(client)
    _, mine = await alice.post("/api/v2/projects", json={"name": "graph"})
    _, theirs = await bob.post("/api/v2/projects", json={"name": "hidden"})
    await alice.post(f"/api/v2/projects/{mine['id']}/jobs", json={"name": "nightly", "script": "x.py"})
    issued = ca.issue_client("alice")
    channel = Channel("127.0.0.1", port, ssl=client_tls(ca.cert_pem, issued.cert_pem, issued.key_pem))
    try:
        catalog = CatalogStub(channel)
        projects = await catalog.ListProjects(pb.ListProjectsRequest())
        assert [p.id for p in projects.projects] == [mine["id"]]
        jobs = await catalog.ListJobs(pb.ListJobsRequest(project_id=mine["id"]))
        assert [j.name for j in jobs.jobs] == ["nightly"]
        with pytest.raises(GRPCError) as hidden:
            await catalog.ListJobs(pb.ListJobsRequest(project_id=theirs["id"]))
        assert hidden.value.status == Status.NOT_FOUND
        with pytest.raises(GRPCError) as not_a_workload:
            await WorkloadsStub(channel).Heartbeat(pb.HeartbeatRequest(workload_id="x"))
        assert not_a_workload.value.status == Status.PERMISSION_DENIED
    finally:
        channel.close()

    # A session's own certificate, as the session sees it.
    session = await start_running_session(alice, mine["id"])
    other = await start_running_session(alice, mine["id"])
    folder = client.app[SETTINGS].data_dir / "workload-tls" / session["id"]
    channel = Channel("127.0.0.1", port, ssl=client_tls((folder / "ca.pem").read_bytes(), (folder / "tls.crt").read_bytes(),
                                                       (folder / "tls.key").read_bytes()))
    try:
        workloads = WorkloadsStub(channel)
        beat = await workloads.Heartbeat(pb.HeartbeatRequest(workload_id=session["id"]))
        assert (beat.status, beat.keep_running) == ("ENGINE_RUNNING", True)
        await workloads.ReportStatus(pb.StatusReport(workload_id=session["id"], message="training: epoch 3 of 10"))
        async with workloads.ShipLogs.open() as stream:
            await stream.send_message(pb.LogChunk(workload_id=session["id"], data=b"shipped line\n"))
            await stream.send_message(pb.LogChunk(data=b"another\n"), end=True)
            shipped = await stream.recv_message()
        assert shipped is not None and shipped.bytes_received == len(b"shipped line\nanother\n")
        _, logs = await alice.get(f"/api/v2/projects/{mine['id']}/sessions/{session['id']}/logs")
        assert "[status] training: epoch 3 of 10" in logs["content"] and "shipped line\nanother\n" in logs["content"]
        for call in (workloads.Heartbeat(pb.HeartbeatRequest(workload_id=other["id"])),
                     workloads.ReportStatus(pb.StatusReport(workload_id=other["id"], message="I am someone else"))):
            with pytest.raises(GRPCError) as impersonation:
                await call
            assert impersonation.value.status == Status.PERMISSION_DENIED
        # It reads its own project only.
        seen = await CatalogStub(channel).ListProjects(pb.ListProjectsRequest())
        assert [p.id for p in seen.projects] == [mine["id"]]
    finally:
        channel.close()
    # When the session ends its certificate goes.
    await alice.post(f"/api/v2/projects/{mine['id']}/sessions/{session['id']}:stop")
    for _ in range(100):
        if not folder.exists():
            break
        await asyncio.sleep(0.1)
    assert not folder.exists()
    await alice.post(f"/api/v2/projects/{mine['id']}/sessions/{other['id']}:stop")


async def test_a_workload_finds_its_certificate_in_its_sandbox(alice: Api) -> None:
    import shutil

    from tests.conftest import require_tool

    require_tool(shutil.which("bwrap") is not None, "bubblewrap")
    _, project = await alice.post("/api/v2/projects", json={"name": "certified"})
    pid = project["id"]
    import aiohttp

    form = aiohttp.FormData()
    form.add_field("show.sh", b"ls /run/cml/tls; head -1 \"$CML_GRPC_CERT\"; head -c 27 \"$CML_GRPC_KEY\"; echo; "
                              b"echo address=$CML_GRPC_ADDRESS\n", filename="show.sh")
    await alice.post(f"/api/v2/projects/{pid}/files", data=form)
    _, job = await alice.post(f"/api/v2/projects/{pid}/jobs", json={"name": "show", "script": "show.sh"})
    _, run = await alice.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    from tests.integration.test_jobs_api import wait_run

    await wait_run(alice, pid, job["id"], run["id"], "ENGINE_SUCCEEDED")
    _, logs = await alice.get(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs/{run['id']}/logs")
    content = logs["content"]
    assert "ca.pem" in content and "tls.crt" in content and "tls.key" in content, content
    assert "-----BEGIN CERTIFICATE-----" in content and "-----BEGIN PRIVATE KEY-----" in content, content
    assert f"address=127.0.0.1:{alice.client.app[GRPC_PORT]}" in content, content


def test_certificates_near_their_end_are_issued_again(tmp_path: Path) -> None:
    from cml_appliance.grpc.certificates import WorkloadCertificates

    ca = pki.CertificateAuthority.load_or_create(tmp_path / "pki")
    certificates = WorkloadCertificates(ca, tmp_path / "workload-tls", "127.0.0.1:1")
    folder = certificates.issue("w1")
    certificates.issue("gone")
    short = ca.issue_client("workload:w1", days=2)  # within the renewal window
    (folder / "tls.crt").write_bytes(short.cert_pem)
    assert certificates.renew_due({"w1"}) == ["w1"]
    assert not pki.needs_renewal((folder / "tls.crt").read_bytes())
    assert not (tmp_path / "workload-tls" / "gone").exists()  # a workload that ended leaves nothing
