"""The Kubernetes engine against a real one-node cluster (scripts/test-cluster.sh): kube-apiserver,
scheduler, controller-manager and a kubelet with containerd, all v1.20.2 built from Debian's
sources. Pods really run: terminals, output, exit codes and OOM kills are the node's own."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.rest import ApiException

from cml_appliance.auth import api_keys, users
from cml_appliance.web.keys import POD_WATCHER, POOL, SETTINGS
from tests.conftest import BUSYBOX_IMAGE, PYTHON_IMAGE, Api
from tests.integration.sessions_helpers import open_terminal, wait_status


@pytest.fixture
async def kate(kube_client: Any) -> Api:
    pool = kube_client.app[POOL]
    user = await users.create_user(pool, "kate", "kate@example.com", "correct horse")
    secret, _ = await api_keys.create(pool, user)
    return Api(kube_client, secret, "kate")


@pytest.fixture
async def core(kube_cluster: Any) -> Any:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kube_cluster), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        yield client.CoreV1Api(api)


async def wait_for(predicate: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def pod_of(core: Any, namespace: str, workload_id: str) -> Any:
    try:
        return await core.read_namespaced_pod(f"cml-{workload_id}", namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def test_session_runs_as_a_locked_down_pod_with_terminal_and_output(kate: Api, core: Any) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "on k8s"})
    pid = project["id"]
    status, session = await kate.post(f"/api/v2/projects/{pid}/sessions",
                                      json={"runtime_identifier": BUSYBOX_IMAGE, "resource_profile_id": 1})
    assert status == 200, session
    assert session["engine"] == "kubernetes"
    sid = session["id"]
    running = await wait_status(kate, pid, sid, "ENGINE_RUNNING", timeout=60)
    prefix = kate.client.app[SETTINGS].kubernetes_namespace_prefix
    namespace = f"{prefix}-user-kate"
    assert running["namespace"] == namespace and running["node"] == "localhost"

    pod = await pod_of(core, namespace, sid)
    spec = pod.spec
    assert spec.automount_service_account_token is False and spec.security_context.run_as_user == 8536
    main = spec.containers[0]
    assert main.security_context.allow_privilege_escalation is False
    assert main.security_context.capabilities.drop == ["ALL"]
    assert main.resources.limits == {"cpu": "1", "memory": "2Gi"}
    assert pod.metadata.labels["cml.appliance/project"] == pid
    # The namespace came with a quota, container defaults and a default-deny policy.
    quota = await core.read_namespaced_resource_quota("cml-quota", namespace)
    assert quota.spec.hard["pods"] == "100"
    assert (await core.read_namespaced_limit_range("cml-limits", namespace)).spec.limits[0].type == "Container"
    policy = await client.NetworkingV1Api(core.api_client).read_namespaced_network_policy("cml-default-deny", namespace)
    assert policy.spec.policy_types == ["Ingress"] and policy.spec.pod_selector.match_labels is None

    term = await open_terminal(kate, pid, sid)
    await term.send("id -u; echo $((6*7))-$CDSW_ENGINE_ID; touch made-in-pod; pwd\n")
    await term.expect(f"42-{sid}", timeout=20)
    screen = await term.expect("/home/cdsw")
    # A resize travels on its own channel, which the node applies independently of the input:
    # ask until the shell sees it.
    await term.resize(100, 40)
    for _ in range(50):
        await term.send("stty size\n")
        try:
            await term.expect("40 100", timeout=0.2)
            break
        except AssertionError:
            continue
    await term.expect("40 100")
    assert "8536" in screen
    assert (kate.client.app[SETTINGS].projects_dir / pid / "made-in-pod").exists()

    async def logged() -> bool:
        _, logs = await kate.get(f"/api/v2/projects/{pid}/sessions/{sid}/logs")
        return f"Session {sid} is running" in logs["content"]

    await wait_for(logged, 20, "the session's output")

    await kate.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    await term.wait_closed(30)
    final = await wait_status(kate, pid, sid, "ENGINE_STOPPED", timeout=60)
    assert final["finished_at"]

    async def pod_gone() -> bool:
        found = await pod_of(core, namespace, sid)
        return found is None or found.metadata.deletion_timestamp is not None

    await wait_for(pod_gone, 30, "the pod to be deleted")


async def run_job(api: Api, pid: str, script: str, body: str, **fields: Any) -> dict[str, Any]:
    (api.client.app[SETTINGS].projects_dir / pid / script).write_text(body)
    status, job = await api.post(f"/api/v2/projects/{pid}/jobs", json={
        "name": script, "script": script, "runtime_identifier": fields.pop("runtime", BUSYBOX_IMAGE), **fields})
    assert status == 200, job
    status, run = await api.post(f"/api/v2/projects/{pid}/jobs/{job['id']}/runs", json={})
    assert status == 200, run
    return run


async def wait_run(api: Api, pid: str, job_id: str, run_id: str, wanted: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        _, run = await api.get(f"/api/v2/projects/{pid}/jobs/{job_id}/runs/{run_id}")
        return run if run["status"] in wanted else None

    return await wait_for(done, timeout, f"run {run_id} to reach {wanted}")


async def test_job_runs_end_with_their_exit_code_and_output(kate: Api) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "jobs on k8s"})
    pid = project["id"]
    run = await run_job(kate, pid, "fail.sh", "echo first line; echo to stderr >&2; exit 3\n")
    ended = await wait_run(kate, pid, run["job_id"], run["id"], ("ENGINE_FAILED", "ENGINE_SUCCEEDED"))
    assert ended["status"] == "ENGINE_FAILED"
    _, logs = await kate.get(f"/api/v2/projects/{pid}/jobs/{run['job_id']}/runs/{run['id']}/logs")
    assert "first line" in logs["content"] and "to stderr" in logs["content"]

    run = await run_job(kate, pid, "ok.sh", "echo all good\n")
    ended = await wait_run(kate, pid, run["job_id"], run["id"], ("ENGINE_FAILED", "ENGINE_SUCCEEDED"))
    assert ended["status"] == "ENGINE_SUCCEEDED", ended


async def test_the_output_of_a_pod_that_waited_for_a_node_is_all_kept(kate: Api, core: Any) -> None:
    """The apiserver answers a log request for a pod not yet on a node with 204 No Content (a
    loaded scheduler made a job's output vanish so): the follower asks again until the pod is
    placed, and keeps every line."""
    import uuid
    from pathlib import Path

    from cml_appliance.engines.base import LaunchSpec
    from cml_appliance.web.keys import WORKLOADS

    engine = kate.client.app[WORKLOADS].engines["kubernetes"]
    (node,) = (await core.list_node()).items
    label = "cml-test/late-node"
    spec = LaunchSpec(workload_id="late" + uuid.uuid4().hex[:12], kind="job_run",
                      command=["/bin/sh", "-c", "echo placed at last; echo and ran"], env={}, project_dir=Path("/nonexistent"),
                      image=BUSYBOX_IMAGE, cpu=0.1, memory_mb=64, mount_project=False, owner="kate",
                      node_selector={label: "yes"})
    handle = await engine.start(spec)

    async def read_all() -> bytes:
        return b"".join([chunk async for chunk in engine.output(handle)])

    try:
        reader = asyncio.create_task(read_all())
        await asyncio.sleep(2)
        assert not reader.done(), "the follower gave up on a pod that waits for a node"
        await core.patch_node(node.metadata.name, {"metadata": {"labels": {label: "yes"}}})
        output = await asyncio.wait_for(reader, 60)
        assert b"placed at last" in output and b"and ran" in output, output
    finally:
        await core.patch_node(node.metadata.name, {"metadata": {"labels": {label: None}}})
        await engine.cleanup(handle)


async def test_memory_limit_kills_with_oomkilled(kate: Api) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "oom"})
    pid = project["id"]
    # 1 GB into a shell variable: far past the smallest profile's memory.
    run = await run_job(kate, pid, "oom.sh", "x=$(head -c 1000000000 /dev/zero | tr '\\0' a); echo survived\n",
                        cpu=1, memory=0.25)
    await wait_run(kate, pid, run["job_id"], run["id"], ("ENGINE_FAILED", "ENGINE_SUCCEEDED"), timeout=90)
    row = await kate.client.app[POOL].fetchrow("SELECT status, reason, exit_code FROM workloads WHERE public_id = $1", run["id"])
    assert row["status"] == "ENGINE_FAILED" and "OOMKilled" in row["reason"], dict(row)


async def test_an_image_that_cannot_be_pulled_fails_fast_naming_it(kate: Api, kube_settings: Any) -> None:
    from cml_appliance.runtimes import catalog

    await catalog.seed_runtimes(kate.client.app[POOL], [{
        "image_identifier": "localhost/no-such-image:1", "editor": "Workbench", "kernel": "Shell", "edition": "None",
        "description": "missing", "full_version": "1", "status": "ENABLED"}])
    _, project = await kate.post("/api/v2/projects", json={"name": "missing image"})
    pid = project["id"]
    started = time.monotonic()
    _, session = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": "localhost/no-such-image:1"})
    failed = await wait_status(kate, pid, session["id"], "ENGINE_FAILED", timeout=60)
    assert "localhost/no-such-image:1" in failed["reason"] and "pulled" in failed["reason"], failed
    assert time.monotonic() - started < 45


async def test_unschedulable_waits_with_the_schedulers_reason_then_stops(kate: Api, core: Any) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "too big"})
    pid = project["id"]
    # The site offers 8 vCPU (kube_settings); the node has 2.
    _, session = await kate.post(f"/api/v2/projects/{pid}/sessions",
                                 json={"runtime_identifier": BUSYBOX_IMAGE, "cpu": 8, "memory": 1})
    sid = session["id"]

    async def waiting() -> dict[str, Any] | None:
        _, body = await kate.get(f"/api/v2/projects/{pid}/sessions/{sid}")
        return body if "Insufficient cpu" in body.get("reason", "") else None

    body = await wait_for(waiting, 30, "the scheduler's reason")
    assert body["status"] == "ENGINE_SCHEDULING", body
    await kate.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    await wait_status(kate, pid, sid, "ENGINE_STOPPED", timeout=60)


async def test_a_start_over_the_namespace_quota_is_refused_with_the_quota_named(kate: Api, core: Any) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "quota"})
    pid = project["id"]
    _, first = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    await wait_status(kate, pid, first["id"], "ENGINE_RUNNING", timeout=60)
    namespace = (await kate.get(f"/api/v2/projects/{pid}/sessions/{first['id']}"))[1]["namespace"]
    await core.patch_namespaced_resource_quota("cml-quota", namespace, {"spec": {"hard": {"pods": "1"}}})

    async def quota_counts() -> bool:
        quota = await core.read_namespaced_resource_quota("cml-quota", namespace)
        return (quota.status.hard or {}).get("pods") == "1"

    await wait_for(quota_counts, 20, "the quota to take effect")
    _, second = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    failed = await wait_status(kate, pid, second["id"], "ENGINE_FAILED", timeout=30)
    assert "quota" in failed["reason"] and "pods=1" in failed["reason"], failed
    await kate.post(f"/api/v2/projects/{pid}/sessions/{first['id']}:stop")
    await wait_status(kate, pid, first["id"], "ENGINE_STOPPED", timeout=60)


async def test_the_appliance_quota_holds_on_the_cluster_too(kate: Api, core: Any) -> None:
    """A start over the user's quota is refused before any pod is made, with the quota and what
    runs named, as on the local and container engines (test_quotas.py)."""
    from tests.conftest import assert_error, user_maker

    admin = await user_maker(kate.client)("root", admin=True)
    assert (await admin.put("/api/v2/usersquota/kate", json={"cpu": "1", "memory": "8"}))[0] == 200
    _, project = await kate.post("/api/v2/projects", json={"name": "held"})
    pid = project["id"]
    status, first = await kate.post(f"/api/v2/projects/{pid}/sessions", json={
        "runtime_identifier": BUSYBOX_IMAGE, "name": "first", "cpu": 0.5, "memory": 1})
    assert status == 200 and first["engine"] == "kubernetes", first
    running = await wait_status(kate, pid, first["id"], "ENGINE_RUNNING", timeout=60)
    status, body = await kate.post(f"/api/v2/projects/{pid}/sessions", json={
        "runtime_identifier": BUSYBOX_IMAGE, "name": "second", "cpu": 1, "memory": 1})
    assert_error(status, body, 429)
    assert "kate's quota of 1 vCPU, 8 GB" in body["message"] and "session 'first' in 'held'" in body["message"], body
    pods = await core.list_namespaced_pod(running["namespace"])
    assert [pod.metadata.name for pod in pods.items] == [f"cml-{first['id']}"]
    await kate.post(f"/api/v2/projects/{pid}/sessions/{first['id']}:stop")
    await wait_status(kate, pid, first["id"], "ENGINE_STOPPED", timeout=60)


async def test_a_pod_deleted_by_hand_fails_its_workload_with_a_reason(kate: Api, core: Any) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "deleted"})
    pid = project["id"]
    _, session = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    running = await wait_status(kate, pid, session["id"], "ENGINE_RUNNING", timeout=60)
    await core.delete_namespaced_pod(f"cml-{session['id']}", running["namespace"], grace_period_seconds=0)
    failed = await wait_status(kate, pid, session["id"], "ENGINE_FAILED", timeout=60)
    assert failed["reason"], failed
    assert kate.client.app[POD_WATCHER].describe()["watch"] == "active"


async def test_sigkill_and_restart_adopt_running_pods_and_fail_lost_ones(
    clean_db: str, tmp_path: Any, kube_cluster: Any, kube_images: tuple[str, str], core: Any
) -> None:
    """kill -9 of `serve` while pods run; one pod is deleted and an unowned one appears while it
    is down; the restarted appliance adopts the survivor (and can stop it), fails the lost
    one with a reason and deletes the stranger."""
    import os
    import signal
    import subprocess
    import uuid

    import aiohttp
    import asyncpg

    from tests.integration.test_cli import CLI, free_port
    from tests.integration.test_reconcile_after_crash import serve, status_of, wait_ready

    busybox, _ = kube_images
    conn = await asyncpg.connect(clean_db)
    try:
        await conn.execute("INSERT INTO runtimes (image_identifier, editor, kernel, edition, full_version)"
                           " VALUES ($1, 'Workbench', 'Shell', 'Busybox', '1')", busybox)
    finally:
        await conn.close()
    prefix = "t" + uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CML_")}
    env.update({
        "CML_DATABASE_URL": clean_db, "CML_DATA_DIR": str(tmp_path / "data"), "CML_KUBECONFIG": str(kube_cluster),
        "CML_KUBERNETES_NAMESPACE_PREFIX": prefix, "CML_LOG_LEVEL": "WARNING", "CML_STOP_GRACE_SECONDS": "2",
        "CML_APPS_PORT": "0", "CML_GRPC_PORT": "0", "CML_EDITORS_PORT": "0",
    })
    assert subprocess.run(CLI + ["users", "create", "kim", "--email", "k@example.com", "--password-stdin"],
                          env=env, input=b"longpassword\n", capture_output=True).returncode == 0
    key = subprocess.run(CLI + ["api-keys", "create", "kim"], env=env, capture_output=True, text=True).stdout.split()[-1]
    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    namespace = f"{prefix}-user-kim"
    proc = serve(env, port, log)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
            await wait_ready(http, url, proc, log)
            async with http.post(url + "/api/v2/projects", json={"name": "crash"}) as resp:
                pid = (await resp.json())["id"]
            sids = []
            for _ in range(2):
                # Half a core each: two sessions of the default 1 vCPU fill the node's 2 cores, and
                # a pod of the test before, still ending, then left one to the scheduler's retry.
                async with http.post(f"{url}/api/v2/projects/{pid}/sessions",
                                     json={"runtime_identifier": busybox, "cpu": 0.5, "memory": 1}) as resp:
                    body = await resp.json()
                    assert resp.status == 200, body
                sids.append(body["id"])
            for sid in sids:
                await status_of(http, url, pid, sid, "ENGINE_RUNNING", timeout=60)
            survivor, lost = sids
            site = (await core.read_namespaced_pod(f"cml-{survivor}", namespace)).metadata.labels["cml.appliance/site"]

            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            await core.delete_namespaced_pod(f"cml-{lost}", namespace, grace_period_seconds=0)
            stranger = {"metadata": {"name": "cml-zzzorphan", "labels": {"cml.appliance/site": site,
                                                                         "cml.appliance/workload": "zzzorphan"}},
                        "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                                 "containers": [{"name": "main", "image": busybox, "command": ["sleep", "600"],
                                                 "imagePullPolicy": "IfNotPresent"}]}}
            await core.create_namespaced_pod(namespace, stranger)

            proc = serve(env, port, log)
            await wait_ready(http, url, proc, log)
            failed = await status_of(http, url, pid, lost, "ENGINE_FAILED", timeout=60)
            assert "pod" in failed["reason"], failed
            adopted = await status_of(http, url, pid, survivor, "ENGINE_RUNNING")
            assert adopted["namespace"] == namespace

            async def stranger_gone() -> bool:
                found = await pod_of(core, namespace, "zzzorphan")
                return found is None or found.metadata.deletion_timestamp is not None

            await wait_for(stranger_gone, 60, "the unowned pod to be deleted")
            async with http.post(f"{url}/api/v2/projects/{pid}/sessions/{survivor}:stop") as resp:
                assert resp.status == 200
            await status_of(http, url, pid, survivor, "ENGINE_STOPPED", timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        try:
            await core.delete_namespace(namespace, grace_period_seconds=0)
        except ApiException:
            pass


class FaultyProxy:
    """A TCP proxy in front of the apiserver: it can cut every connection, go silent (keep
    connections open and forward nothing, as a broken load balancer does), or refuse new
    connections (`refusing`), as an apiserver that is down."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.port = 0
        self.refusing = False
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter, list[bool]]] = []
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:  # the apiserver is down: connections are closed at once
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        silent = [False]
        self.links.append((writer, up_writer, silent))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if silent[0]:
                        continue  # swallowed: the peer sees a connection that says nothing
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self) -> None:
        for writer, up_writer, _ in self.links:
            writer.transport.abort()
            up_writer.transport.abort()
        self.links.clear()

    def live(self) -> bool:
        """Does a connection pass bytes (one not silenced)?"""
        return any(not silent[0] for _, _, silent in self.links)

    def silence(self) -> None:
        for _, _, silent in self.links:
            silent[0] = True

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def test_the_watch_survives_a_cut_a_silent_stall_and_410_gone(kate: Api, core: Any) -> None:
    from urllib.parse import urlsplit

    from cml_appliance.web.keys import WORKLOADS

    engine = kate.client.app[WORKLOADS].engines["kubernetes"]
    watcher = kate.client.app[POD_WATCHER]
    await wait_for(lambda: _true(watcher.role == "active" and watcher.synced.is_set()), 30, "the watch to start")
    target = urlsplit(engine.watch_api.configuration.host).port
    proxy = FaultyProxy(target)
    await proxy.start()
    # From its next request on, the watch goes through the proxy (it ends the current one).
    engine.watch_api.configuration.host = f"https://127.0.0.1:{proxy.port}"
    restarts = watcher.restarts

    async def cut_a_watch_in_flight() -> None:
        """Cut the proxy's connections until the watcher counts a failed watch. A cut that lands
        between two watch requests (each lasts kubernetes_watch_timeout_seconds) hits only an idle
        pooled connection, which aiohttp replaces without an error. The watcher then backs off for
        at least 0.5 s, as the poll here is 0.05 s."""
        before = watcher.restarts
        async with asyncio.timeout(30):
            while watcher.restarts == before:
                await wait_for(lambda: _true(proxy.live()), 30, "the watch to use the proxy")
                proxy.cut()
                await asyncio.sleep(0.05)

    _, project = await kate.post("/api/v2/projects", json={"name": "watch faults"})
    pid = project["id"]
    try:
        _, first = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
        await wait_status(kate, pid, first["id"], "ENGINE_RUNNING", timeout=60)
        await wait_for(lambda: _true(bool(proxy.links)), 30, "the watch to use the proxy")

        # 1. The connection is cut: the watch backs off, resumes where it was, and status flows on.
        await cut_a_watch_in_flight()
        await kate.post(f"/api/v2/projects/{pid}/sessions/{first['id']}:stop")
        await wait_status(kate, pid, first["id"], "ENGINE_STOPPED", timeout=60)
        restarts = watcher.restarts

        # 2. The connection stays open but says nothing: after kubernetes_watch_stale_seconds (5)
        # the watcher sees that pods changed, restarts the watch, and the session shows running.
        await wait_for(lambda: _true(bool(proxy.links)), 30, "the watch to reconnect")
        proxy.silence()
        _, second = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
        await wait_status(kate, pid, second["id"], "ENGINE_RUNNING", timeout=60)
        assert watcher.restarts > restarts, watcher.describe()

        # 3. 410 Gone: the watch is told to resume from a resourceVersion the apiserver no longer
        # keeps; it lists again instead of giving up.
        expired, relists = watcher.expired, watcher.relists
        # The proxy refuses new connections, so the cut watch cannot come back before its resume
        # point is one the apiserver no longer keeps. (Setting it while the watch merely backed
        # off raced the reconnect, and a stale-watch restart's list, which sets the point anew.)
        proxy.refusing = True
        failures = watcher.restarts
        proxy.cut()
        await wait_for(lambda: _true(watcher.restarts > failures), 30, "the cut watch to fail")
        async with asyncio.timeout(60):
            while True:  # until a refused reconnect leaves the point at "1" (no list came between)
                watcher.resource_version = "1"
                failures = watcher.restarts
                await wait_for(lambda: _true(watcher.restarts > failures), 30, "a refused reconnect")
                if watcher.resource_version == "1":
                    break
        proxy.refusing = False
        await wait_for(lambda: _true(watcher.expired > expired and watcher.relists > relists), 30, "a relist after 410 Gone")
        await kate.post(f"/api/v2/projects/{pid}/sessions/{second['id']}:stop")
        await wait_status(kate, pid, second["id"], "ENGINE_STOPPED", timeout=60)
        status, ready = await kate.get("/readyz")
        assert ready["kubernetes"]["watch"] == "active" and ready["kubernetes"]["cache_age_seconds"] < 60, ready
    finally:
        await proxy.close()


async def _true(value: bool) -> bool:
    return value


async def test_application_and_model_replica_run_as_pods_reached_through_their_relay(kate: Api, core: Any) -> None:
    import aiohttp

    from tests.conftest import POD_GATEWAY, apps_listener, wait_build
    from tests.integration.test_container_workloads import APP, MODEL

    _, project = await kate.post("/api/v2/projects", json={"name": "served on k8s"})
    pid = project["id"]
    form = aiohttp.FormData()
    form.add_field("app.py", APP, filename="app.py")
    form.add_field("predict.py", MODEL, filename="predict.py")
    await kate.post(f"/api/v2/projects/{pid}/files", data=form)
    status, app = await kate.post(f"/api/v2/projects/{pid}/applications", json={
        "name": "podded", "subdomain": "podded", "script": "app.py", "runtime_identifier": PYTHON_IMAGE,
        "cpu": 0.5, "memory": 1})  # the node has 2 cores: room for the app and the replica
    assert status == 200, app

    async def app_running() -> dict[str, Any] | None:
        _, body = await kate.get(f"/api/v2/projects/{pid}/applications/{app['id']}")
        assert body["status"] not in ("APPLICATION_FAILED", "APPLICATION_STOPPED"), body
        return body if body["status"] == "APPLICATION_RUNNING" else None

    await wait_for(app_running, 90, "the application to run")
    async with apps_listener(kate.client) as apps:
        resp = await apps.get("/apps/podded/deep/path", headers={"Authorization": f"Bearer {kate.key}"})
        text = await resp.text()
    assert resp.status == 200 and text.startswith("hello from ") and text.endswith(" at /deep/path"), text
    run_id = text.split()[2]
    namespace = f"{kate.client.app[SETTINGS].kubernetes_namespace_prefix}-user-kate"
    pod = await pod_of(core, namespace, run_id)
    assert [c.name for c in pod.spec.containers] == ["main", "relay"]
    service = await core.read_namespaced_service(f"cml-{run_id}", namespace)
    assert service.spec.selector["cml.appliance/workload"] == run_id
    # Another pod on the node cannot reach the application past the appliance: the relay admits
    # the appliance's address (the pod network's gateway, here) only.
    assert pod.status.pod_ip != POD_GATEWAY
    probe = {"metadata": {"name": "probe"}, "spec": {
        "restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [{
            "name": "probe", "image": BUSYBOX_IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sh", "-c", f"wget -q -T 5 -O - http://{pod.status.pod_ip}:18100/ && echo REACHED || echo REFUSED"]}]}}
    await core.create_namespaced_pod(namespace, probe)

    async def probe_done() -> str | None:
        found = await core.read_namespaced_pod("probe", namespace)
        if found.status.phase in ("Succeeded", "Failed"):
            return await core.read_namespaced_pod_log("probe", namespace)
        return None

    output = await wait_for(probe_done, 60, "the probe pod")
    assert "REFUSED" in output and "hello" not in output, output
    await core.delete_namespaced_pod("probe", namespace, grace_period_seconds=0)

    status, model = await kate.post(f"/api/v2/projects/{pid}/models", json={
        "name": "doubler", "disable_authentication": True, "auto_build_model": True,
        "auto_build_config": {"file_path": "predict.py", "function_name": "predict", "runtime_identifier": PYTHON_IMAGE},
        "auto_deploy_model": True, "auto_deployment_config": {"replicas": 1, "cpu": 0.5, "memory": 1},
    })
    assert status == 200, model
    built = await wait_build(kate, pid, model["id"], deployed=True)
    assert built["status"] == "built", built["failure_reason"]

    async def answered() -> dict[str, Any] | None:
        resp = await kate.client.post("/model", json={"accessKey": model["access_key"], "request": {"x": 21}})
        body = await resp.json()
        return body if resp.status == 200 else None

    try:
        answer = await wait_for(answered, 120, "the model to answer")
    except AssertionError:
        rows = await kate.client.app[POOL].fetch("SELECT public_id, status, reason FROM workloads WHERE kind = 'model_replica'")
        raise AssertionError(f"the model never answered; its replicas: {[dict(r) for r in rows]}") from None
    assert answer["success"] is True and answer["response"] == {"double": 42}
    replica = await kate.client.app[POOL].fetchrow("SELECT engine, public_id, node FROM workloads WHERE kind = 'model_replica'")
    assert replica["engine"] == "kubernetes" and replica["node"] == "localhost"
    # The replica runs the built image, pulled through the appliance's registry proxy with a
    # pull secret, and has its gRPC certificate from a Secret; nothing of the host is mounted.
    replica_pod = await pod_of(core, namespace, replica["public_id"])
    assert replica_pod.spec.containers[0].image.endswith(built["built_image"])
    assert replica_pod.spec.image_pull_secrets[0].name == f"cml-{replica['public_id']}-pull"
    volumes = {v.name: v for v in replica_pod.spec.volumes}
    assert set(volumes) == {"tls"} and volumes["tls"].secret.secret_name == f"cml-{replica['public_id']}-tls"
    status, _ = await kate.post(f"/api/v2/projects/{pid}/applications/{app['id']}:stop")
    assert status == 200


async def test_apiserver_unreachable_refuses_new_starts_and_fails_nothing_that_runs(
    aiohttp_client: Any, kube_settings: Any, kube_cluster: Any, tmp_path: Any
) -> None:
    import dataclasses
    from urllib.parse import urlsplit

    from cml_appliance.app import create_app
    from cml_appliance.web.keys import WORKLOADS

    text = kube_cluster.read_text()
    server = next(line.split('"')[1] for line in text.splitlines() if "server:" in line)
    proxy = FaultyProxy(urlsplit(server).port)
    await proxy.start()
    proxied = tmp_path / "kubeconfig"
    proxied.write_text(text.replace(server, f"https://127.0.0.1:{proxy.port}"))
    app_client = await aiohttp_client(create_app(dataclasses.replace(kube_settings, kubeconfig=str(proxied)),
                                                 allow_local_git=True))
    pool = app_client.app[POOL]
    user = await users.create_user(pool, "otto", "otto@example.com", "correct horse")
    otto = Api(app_client, (await api_keys.create(pool, user))[0], "otto")
    try:
        _, project = await otto.post("/api/v2/projects", json={"name": "outage"})
        pid = project["id"]
        _, session = await otto.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
        await wait_status(otto, pid, session["id"], "ENGINE_RUNNING", timeout=60)

        proxy.refusing = True
        proxy.cut()
        status, body = await otto.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
        assert status == 503 and "Kubernetes" in body["message"], body
        counts = await app_client.app[WORKLOADS].reconcile("kubernetes")
        assert counts["failed"] == 0
        _, still = await otto.get(f"/api/v2/projects/{pid}/sessions/{session['id']}")
        assert still["status"] == "ENGINE_RUNNING", still

        proxy.refusing = False
        await otto.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
        await wait_status(otto, pid, session["id"], "ENGINE_STOPPED", timeout=90)
    finally:
        await proxy.close()


async def test_a_namespace_deleted_under_the_appliance_fails_its_workloads_and_is_made_again(kate: Api, core: Any) -> None:
    _, project = await kate.post("/api/v2/projects", json={"name": "namespace gone"})
    pid = project["id"]
    _, session = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    running = await wait_status(kate, pid, session["id"], "ENGINE_RUNNING", timeout=60)
    namespace = running["namespace"]
    await core.delete_namespace(namespace)
    failed = await wait_status(kate, pid, session["id"], "ENGINE_FAILED", timeout=60)
    assert "deleted" in failed["reason"], failed

    async def namespace_gone() -> bool:
        try:
            await core.read_namespace(namespace)
            return False
        except ApiException as exc:
            return exc.status == 404

    await wait_for(namespace_gone, 90, "the namespace to go")
    _, again = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    await wait_status(kate, pid, again["id"], "ENGINE_RUNNING", timeout=60)
    assert (await core.read_namespaced_resource_quota("cml-quota", namespace)).spec.hard
    await kate.post(f"/api/v2/projects/{pid}/sessions/{again['id']}:stop")
    await wait_status(kate, pid, again["id"], "ENGINE_STOPPED", timeout=60)


async def test_a_pods_grpc_certificate_is_a_secret_renewed_in_place(kate: Api, core: Any) -> None:
    from cml_appliance.core import pki
    from cml_appliance.web.keys import WORKLOADS

    _, project = await kate.post("/api/v2/projects", json={"name": "certificates"})
    pid = project["id"]
    _, session = await kate.post(f"/api/v2/projects/{pid}/sessions", json={"runtime_identifier": BUSYBOX_IMAGE})
    running = await wait_status(kate, pid, session["id"], "ENGINE_RUNNING", timeout=60)
    sid, namespace = session["id"], running["namespace"]
    secret = await core.read_namespaced_secret(f"cml-{sid}-tls", namespace)
    assert set(secret.data) == {"ca.pem", "tls.crt", "tls.key"}
    term = await open_terminal(kate, pid, sid)
    await term.send("ls /run/cml/tls; echo $CML_GRPC_CERT\n")
    await term.expect("/run/cml/tls/tls.crt", timeout=20)
    await term.expect("tls.key")

    # The certificate nears its end: it is issued again, and the Secret follows.
    service = kate.client.app[WORKLOADS]
    folder = service.certificates.directory / sid
    ca = pki.CertificateAuthority.load_or_create(kate.client.app[SETTINGS].pki_dir)
    (folder / "tls.crt").write_bytes(ca.issue_client(f"workload:{sid}", days=1).cert_pem)
    assert sid in await service.renew_certificates()
    renewed = await core.read_namespaced_secret(f"cml-{sid}-tls", namespace)
    import base64

    assert renewed.data["tls.crt"] != secret.data["tls.crt"]
    assert base64.b64decode(renewed.data["tls.crt"]) == (folder / "tls.crt").read_bytes()
    assert not pki.needs_renewal((folder / "tls.crt").read_bytes())
    await kate.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    await wait_status(kate, pid, sid, "ENGINE_STOPPED", timeout=60)


async def test_one_pod_watcher_per_site_however_many_appliance_processes(kube_client: Any, aiohttp_client: Any,
                                                                         kube_settings: Any) -> None:
    from cml_appliance.app import create_app

    second = await aiohttp_client(create_app(kube_settings, allow_local_git=True))
    first_watcher, second_watcher = kube_client.app[POD_WATCHER], second.app[POD_WATCHER]
    await wait_for(lambda: _true({first_watcher.role, second_watcher.role} == {"active", "standby"}), 30,
                   "one watcher active and the other standing by")
    for client_ in (kube_client, second):
        resp = await client_.get("/metrics")
        text = await resp.text()
        assert "cml_kubernetes_watch_cache_age_seconds" in text and "cml_kubernetes_watch_restarts" in text
    standby = second if second_watcher.role == "standby" else kube_client
    resp = await standby.get("/readyz")
    assert (await resp.json())["kubernetes"]["watch"] == "standby"


async def test_a_jupyterlab_session_as_a_pod(kube_client: Any, kube_settings: Any, kube_jupyterlab_image: str,
                                             aiohttp_client: Any) -> None:
    """JupyterLab in a pod listens on the pod's own 127.0.0.1, behind the pod's relay (which
    admits the appliance alone); the editors' proxy reaches it there, and a kernel runs in the
    pod as uid 8536 with the project as its home."""
    import dataclasses

    from cml_appliance.app import create_app
    from tests.conftest import user_maker
    from tests.integration.editor_helpers import editors_listener, hand_over, run_in_kernel, start_jupyterlab, until_ready
    from tests.integration.test_web_ui import sign_in

    runtime = {"image_identifier": kube_jupyterlab_image, "editor": "JupyterLab", "kernel": "Python 3.11",
               "edition": "Standard", "description": "JupyterLab, for tests", "full_version": "1.0", "status": "ENABLED"}
    settings = dataclasses.replace(kube_settings, runtimes=(*kube_settings.runtimes, runtime))
    client = await aiohttp_client(create_app(settings, allow_local_git=True))
    kim = await user_maker(client)("kim")
    pid, sid = await start_jupyterlab(kim, "pod notebooks", runtime=kube_jupyterlab_image)
    assert (await sign_in(client, "kim")).status == 302
    async with editors_listener(client) as editors:
        origin = str(editors._base_url).rstrip("/")
        await hand_over(client, editors, pid, sid)
        resp = await until_ready(editors, f"/editors/{sid}/lab", timeout=120)
        assert resp.status == 200 and "JupyterLab" in await resp.text()
        out = await run_in_kernel(editors, sid, "import os, socket; print(os.getuid(), os.getcwd(), socket.gethostname())", origin)
        uid, cwd, host = out.split()
        assert (uid, cwd) == ("8536", "/home/cdsw") and host.startswith("cml-"), out
    await kim.post(f"/api/v2/projects/{pid}/sessions/{sid}:stop")
    await wait_status(kim, pid, sid, "ENGINE_STOPPED", timeout=60)


async def test_gpus_of_an_accelerator_are_held_to_its_limits_and_run_on_its_nodes(kate: Api, core: Any) -> None:
    """The node is made to offer 4 Tesla-T4 GPUs (an extended resource in its status, and NVIDIA's
    product label, as the device plugin and GPU feature discovery would): the appliance finds the
    accelerator; the administrator's per-workload limit and kate's quota refuse what is too
    much, with why; a session within them is a pod that asks for the GPUs on that kind of node."""
    from cml_appliance.auth.users import get_by_username

    pool = kate.client.app[POOL]
    admin_user = await users.create_user(pool, "gpu-admin", "g@example.com", "correct horse", is_admin=True)
    admin = Api(kate.client, (await api_keys.create(pool, admin_user))[0], "gpu-admin")
    (node,) = (await core.list_node()).items
    name = node.metadata.name
    await core.patch_node_status(name, [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": "4"}])
    await core.patch_node(name, {"metadata": {"labels": {"nvidia.com/gpu.product": "Tesla-T4"}}})
    try:
        async def found() -> dict[str, Any] | None:
            _, body = await kate.get("/api/v2/nodelabels")
            return next((l for l in body["accelerator_node_label"] if l["label_value"] == "Tesla-T4"), None)

        label = await wait_for(found, 30, "the accelerator to be found")
        assert label["label_key"] == "nvidia.com/gpu.product" and label["availability"] and label["max_gpu_count"] == "4"
        _, groups = await kate.get("/api/v2/resourcegroups")
        kube_group = next(g for g in groups["resource_group"] if g["name"] == "kubernetes")
        assert kube_group["gpu_count"] == "4" and kube_group["gpu_model"] == "Tesla-T4", kube_group

        status, body = await admin.patch("/api/v2/nodelabels/config", json={"id_max_gpu_workload": {label["id"]: "2"}})
        assert status == 200 and body == {"rows_affected": 1}, body
        kate_id = (await get_by_username(pool, "kate")).id
        status, body = await admin.patch("/api/v2/nodelabels/quota", json={"accelerator_based_user_quota": [
            {"user_id": str(kate_id), "accelerator_id": label["id"], "gpu_quota": "1"}]})
        assert status == 200, body
        _, project = await kate.post("/api/v2/projects", json={"name": "gpu"})
        pid = project["id"]
        ask = {"runtime_identifier": BUSYBOX_IMAGE, "accelerator_label_id": label["id"], "cpu": 0.1, "memory": 0.1}
        status, body = await kate.post(f"/api/v2/projects/{pid}/sessions", json=ask | {"nvidia_gpu": 3})
        assert status == 400 and "at most 2 Tesla-T4 GPUs" in body["message"], body
        status, body = await kate.post(f"/api/v2/projects/{pid}/sessions", json=ask | {"nvidia_gpu": 2})
        assert status == 429 and "kate's quota of 1 Tesla-T4 GPUs has 1 left" in body["message"], body
        _, mine = await kate.get("/api/v2/userslabels/quota")
        assert mine["user_accelerator_quota"] == [{"user_id": str(kate_id), "username": "kate", "accelerator_id": label["id"],
                                                   "quota_configured": {"cpu": "", "memory": "", "nvidia_gpu": "1"},
                                                   "quota_usage": {"cpu": "", "memory": "", "nvidia_gpu": "0"}}]

        status, session = await kate.post(f"/api/v2/projects/{pid}/sessions", json=ask | {"nvidia_gpu": 1})
        assert status == 200, session
        namespace = kate.client.app[SETTINGS].kubernetes_namespace_prefix + "-user-kate"
        pod = await wait_for(lambda: pod_of(core, namespace, session["id"]), 30, "the pod")
        assert pod.spec.node_selector == {"nvidia.com/gpu.product": "Tesla-T4"}
        assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
        _, mine = await kate.get("/api/v2/userslabels/quota")
        assert mine["user_accelerator_quota"][0]["quota_usage"]["nvidia_gpu"] == "1"
        status, body = await kate.post(f"/api/v2/projects/{pid}/sessions", json=ask | {"nvidia_gpu": 1})
        assert status == 429, body  # the one GPU of the quota is held
        await kate.post(f"/api/v2/projects/{pid}/sessions/{session['id']}:stop")
        await wait_status(kate, pid, session["id"], ("ENGINE_STOPPED", "ENGINE_FAILED"), timeout=60)
    finally:
        await core.patch_node_status(name, [{"op": "remove", "path": "/status/capacity/nvidia.com~1gpu"}])
        await core.patch_node(name, {"metadata": {"labels": {"nvidia.com/gpu.product": None}}})
