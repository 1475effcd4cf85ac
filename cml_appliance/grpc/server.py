"""gRPC (grpclib) on its own port, `grpc_port`, with mutual TLS: the appliance's CA (core/pki.py)
signs the server's certificate and every client's, and a client without one never gets past the
handshake. The client certificate's common name says who calls:

- `workload:<id>`: a workload; the appliance gives each one its certificate when it starts
  (grpc/certificates.py) and it acts for that workload only, in its project only;
- anything else: the user of that name, as `cml-appliance certs client NAME` writes.

Services: the standard grpc.health.v1.Health, Workloads (heartbeats, status lines, log shipping as
a client stream) and Catalog (projects, jobs and runs the caller may read).
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from typing import Any

import asyncpg
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.server import Server, Stream

from cml_appliance.api.listing import ListQuery
from cml_appliance.auth import users
from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core import pki
from cml_appliance.core.errors import NotFound
from cml_appliance.grpc.generated.cml.v1 import appliance_pb2 as pb
from cml_appliance.grpc.generated.cml.v1.appliance_grpc import CatalogBase, WorkloadsBase
from cml_appliance.projects import store as project_store
from cml_appliance.workloads import store as workload_store
from cml_appliance.workloads.logs import LogStore

log = logging.getLogger(__name__)

WORKLOAD_PREFIX = "workload:"
MAX_SHIPPED_BYTES = 64 * 1024 * 1024  # one ShipLogs call


@dataclasses.dataclass(frozen=True)
class Caller:
    user: User
    workload_id: str | None  # set for a workload's certificate


def common_name(stream: Stream) -> str:
    """The verified client certificate's CN (the TLS handshake has checked it against our CA)."""
    cert = stream.peer.cert() if stream.peer is not None else None
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    raise GRPCError(Status.UNAUTHENTICATED, "a client certificate from the appliance's CA is needed")


async def caller(pool: asyncpg.Pool, stream: Stream) -> Caller:
    name = common_name(stream)
    if name.startswith(WORKLOAD_PREFIX):
        workload_id = name[len(WORKLOAD_PREFIX):]
        row = await workload_store.get(pool, workload_id)
        user = await users.get_by_id(pool, row.creator_id) if row is not None else None
        if row is None or user is None or not user.is_active:
            raise GRPCError(Status.PERMISSION_DENIED, f"workload {workload_id} is not known here")
        project_id = await pool.fetchval("SELECT id FROM projects WHERE public_id = $1", row.project_public_id)
        # A workload acts as its user, in its own project only (as its API key does).
        return Caller(dataclasses.replace(user, is_admin=False, scope_project_id=project_id), workload_id)
    try:
        user = await users.get_by_username(pool, name)
    except NotFound:
        user = None
    if user is None or not user.is_active:
        raise GRPCError(Status.PERMISSION_DENIED, f"{name!r} is not an active user here")
    return Caller(user, None)


def _own_workload(who: Caller, workload_id: str) -> str:
    if who.workload_id is None:
        raise GRPCError(Status.PERMISSION_DENIED, "only a workload's own certificate reports for it")
    if workload_id and workload_id != who.workload_id:
        raise GRPCError(Status.PERMISSION_DENIED, f"this certificate is workload {who.workload_id}'s, not {workload_id}'s")
    return who.workload_id


class WorkloadsService(WorkloadsBase):
    def __init__(self, pool: asyncpg.Pool, logs: LogStore):
        self.pool = pool
        self.logs = logs

    async def _active(self, workload_id: str) -> Any:
        row = await workload_store.get(self.pool, workload_id)
        if row is None:
            raise GRPCError(Status.NOT_FOUND, f"workload {workload_id} not found")
        return row

    async def Heartbeat(self, stream: Stream[pb.HeartbeatRequest, pb.HeartbeatReply]) -> None:  # noqa: N802 (gRPC's names)
        request = await stream.recv_message()
        assert request is not None
        workload_id = _own_workload(await caller(self.pool, stream), request.workload_id)
        row = await self._active(workload_id)
        if row.active:
            await workload_store.touch(self.pool, row.id)
        await stream.send_message(pb.HeartbeatReply(status=row.status, keep_running=row.status == "ENGINE_RUNNING"))

    async def ReportStatus(self, stream: Stream[pb.StatusReport, pb.StatusReply]) -> None:  # noqa: N802
        request = await stream.recv_message()
        assert request is not None
        workload_id = _own_workload(await caller(self.pool, stream), request.workload_id)
        row = await self._active(workload_id)
        if not row.active:
            raise GRPCError(Status.FAILED_PRECONDITION, f"workload {workload_id} has ended ({row.status})")
        line = request.message.replace("\n", " ")[:2000]
        self.logs.append(workload_id, f"[status] {line}\n".encode())
        await stream.send_message(pb.StatusReply())

    async def ShipLogs(self, stream: Stream[pb.LogChunk, pb.ShipLogsReply]) -> None:  # noqa: N802
        who = await caller(self.pool, stream)
        received = 0
        async for chunk in stream:
            workload_id = _own_workload(who, chunk.workload_id)
            received += len(chunk.data)
            if received > MAX_SHIPPED_BYTES:
                raise GRPCError(Status.RESOURCE_EXHAUSTED, f"one ShipLogs call takes at most {MAX_SHIPPED_BYTES} bytes")
            self.logs.append(workload_id, chunk.data)
        await stream.send_message(pb.ShipLogsReply(bytes_received=received))


class CatalogService(CatalogBase):
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def _project(self, who: Caller, project_id: str) -> Any:
        project = await project_store.get(self.pool, who.user, project_id)
        if project is None or project.role < Role.READ:
            raise GRPCError(Status.NOT_FOUND, f"project {project_id!r} not found")
        return project

    async def ListProjects(self, stream: Stream[pb.ListProjectsRequest, pb.ListProjectsReply]) -> None:  # noqa: N802
        await stream.recv_message()
        who = await caller(self.pool, stream)
        projects, _ = await project_store.list_visible(self.pool, who.user, ListQuery.first(1000),
                                                      include_public=False, include_all=False)
        await stream.send_message(pb.ListProjectsReply(projects=[
            pb.Project(id=p.public_id, name=p.name, owner=p.owner.get("username", ""), slug=p.slug) for p in projects]))

    async def ListJobs(self, stream: Stream[pb.ListJobsRequest, pb.ListJobsReply]) -> None:  # noqa: N802
        request = await stream.recv_message()
        assert request is not None
        project = await self._project(await caller(self.pool, stream), request.project_id)
        rows = await self.pool.fetch("SELECT public_id, name, script, schedule FROM jobs WHERE project_id = $1 ORDER BY id",
                                     project.id)
        await stream.send_message(pb.ListJobsReply(jobs=[
            pb.Job(id=r["public_id"], name=r["name"], script=r["script"], schedule=r["schedule"]) for r in rows]))

    async def ListRuns(self, stream: Stream[pb.ListRunsRequest, pb.ListRunsReply]) -> None:  # noqa: N802
        request = await stream.recv_message()
        assert request is not None
        project = await self._project(await caller(self.pool, stream), request.project_id)
        rows = await self.pool.fetch(
            "SELECT w.public_id, w.status, w.reason, w.attempt FROM workloads w JOIN jobs j ON j.id = w.job_id"
            " WHERE j.project_id = $1 AND j.public_id = $2 ORDER BY w.id DESC LIMIT 1000", project.id, request.job_id)
        await stream.send_message(pb.ListRunsReply(runs=[
            pb.Run(id=r["public_id"], status=r["status"], reason=r["reason"], attempt=r["attempt"]) for r in rows]))


def server_tls(ca: pki.CertificateAuthority, hosts: list[str]) -> ssl.SSLContext:
    """Mutual TLS: our certificate, and a client certificate from our CA required."""
    issued = ca.issue_server(hosts)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=ca.cert_pem.decode())
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cml-grpc-") as folder:  # ssl loads key pairs from files only
        cert, key = f"{folder}/tls.crt", f"{folder}/tls.key"
        with open(cert, "wb") as fh:
            fh.write(issued.cert_pem)
        with open(key, "wb") as fh:
            fh.write(issued.key_pem)
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def make_server(pool: asyncpg.Pool, logs: LogStore) -> Server:
    return Server([Health(), WorkloadsService(pool, logs), CatalogService(pool)])
