"""Test fixtures: a real Postgres (DATABASE_URL, else an embedded pgserver), a fresh database per
test run (per pytest-xdist worker), and every test starting from empty tables."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings, load_settings
from cml_appliance.db import migrate
from cml_appliance.web.keys import APPS_ORIGIN, POOL

REPO = Path(__file__).resolve().parents[1]
# Every appliance a test starts (in process or as `serve`) gives its applications' listener any
# free port: tests run side by side, and a fixed 8081 may be taken.
os.environ.setdefault("CML_APPS_PORT", "0")
os.environ.setdefault("CML_EDITORS_PORT", "0")
os.environ.setdefault("CML_GRPC_PORT", "0")


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """One test process at a time on this machine (xdist workers, or two runs) for what they
    share: an image made under a fixed name."""
    import fcntl

    with open(Path(tempfile.gettempdir()) / f"cml-test-{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(autouse=True)
def _one_cluster_test_at_a_time(request: pytest.FixtureRequest) -> Iterator[None]:
    """With two test workers (CML_TEST_WORKERS=2: pytest-xdist, a file's tests on one worker),
    they take turns on the one-node test cluster, a whole test at a time: its CPUs would
    otherwise leave the pods of two tests pending. (xdist's `loadgroup` does not group on
    pytest 9.2.)"""
    if "kube_cluster" not in request.fixturenames:
        yield
        return
    with machine_lock("cluster"):
        yield


def require_tool(available: bool, what: str) -> None:
    """Skip when a tool is missing, except in CI, where a missing tool is a failure."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is missing")
    pytest.skip(f"{what} is not available")


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def database_server() -> Iterator[str]:
    """DSN of a Postgres server: DATABASE_URL's, or an embedded one for laptops."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    import pgserver

    pgdata = Path(tempfile.mkdtemp(prefix="cml-test-pg-"))
    server = pgserver.get_server(pgdata, cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def database_url(database_server: str) -> Iterator[str]:
    """A database created for this run, migrated once, dropped at the end."""
    name = f"cml_test_{uuid.uuid4().hex[:10]}"

    async def setup() -> None:
        conn = await asyncpg.connect(database_server)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_database(database_server, name))
        try:
            await migrate.migrate(conn)
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(database_server)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(setup())
    yield _with_database(database_server, name)
    asyncio.run(teardown())


@pytest.fixture
async def clean_db(database_url: str) -> str:
    """Empty every table but the migration record: each test starts from a known state."""
    conn = await asyncpg.connect(database_url)
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'schema_migrations'"
        )
        if tables:
            names = ", ".join(f'"{t["tablename"]}"' for t in tables)
            await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()
    return database_url


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cml-test-data-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(clean_db: str, data_dir: Path) -> Settings:
    base = load_settings(environ={})
    return dataclasses.replace(
        base,
        database_url=clean_db,
        data_dir=data_dir,
        secret_key="test-secret-key-" + "x" * 32,
        log_format="text",
        max_upload_mb=2,
        apps_port=0,
        editors_port=0,
        grpc_port=0,
    )


class Api:
    """A test client speaking as one user through a Bearer API key."""

    def __init__(self, client: TestClient, key: str, username: str):
        self.client = client
        self.key = key
        self.username = username

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **(extra or {})}

    async def call(self, method: str, path: str, *, json: Any = None, data: Any = None,
                   headers: dict[str, str] | None = None, params: Any = None) -> tuple[int, Any]:
        resp = await self.client.request(method, path, json=json, data=data, headers=self._headers(headers), params=params)
        body: Any
        if resp.content_type == "application/json":
            body = await resp.json()
        else:
            body = await resp.read()
        return resp.status, body

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", path, **kw)

    async def patch(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("PATCH", path, **kw)

    async def put(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("PUT", path, **kw)

    async def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return await self.call("DELETE", path, **kw)


@pytest.fixture
async def client(aiohttp_client: Any, settings: Settings) -> TestClient:
    app = create_app(settings, allow_local_git=True)
    return await aiohttp_client(app)


def user_maker(client: TestClient) -> Any:
    """make(name, admin=False) -> Api for a new user of `client`'s appliance, with a fresh API key."""

    async def make(username: str, *, admin: bool = False, password: str = "correct horse") -> Api:
        pool = client.app[POOL]
        user = await users.create_user(pool, username, f"{username}@example.com", password, is_admin=admin)
        secret, _ = await api_keys.create(pool, user)
        return Api(client, secret, username)

    return make


@pytest.fixture
def make_user(client: TestClient) -> Any:
    """make_user(name, admin=False) -> Api for a new user with a fresh API key."""
    return user_maker(client)


@pytest.fixture
async def alice(make_user: Any) -> Api:
    return await make_user("alice")


@pytest.fixture
async def bob(make_user: Any) -> Api:
    return await make_user("bob")


@pytest.fixture
async def admin(make_user: Any) -> Api:
    return await make_user("root-admin", admin=True)


def apps_listener(client: TestClient) -> aiohttp.ClientSession:
    """A client of the applications' own listener (applications/origin.py) of `client`'s
    appliance, with a cookie jar of its own that keeps cookies of IP-address hosts."""
    return aiohttp.ClientSession(base_url=f"http://127.0.0.1:{client.app[APPS_ORIGIN].port}",
                                 cookie_jar=aiohttp.CookieJar(unsafe=True))


BUILD_ACTIVE = ("queued", "pending", "pushing")


async def wait_build(api: Api, project_id: str, model_id: str, build_id: str | None = None, *,
                     deployed: bool = False, timeout: float = 90) -> dict[str, Any]:
    """A model build once the queue is done with it (the model's latest when no id is given);
    with `deployed`, also once its automatic deployment exists."""
    import time

    base = f"/api/v2/projects/{project_id}/models/{model_id}/builds"
    deadline = time.monotonic() + timeout
    while True:
        if build_id is None:
            _, listed = await api.get(base)
            build = (listed.get("model_builds") or [{}])[0]
        else:
            _, build = await api.get(f"{base}/{build_id}")
        if build.get("status") and build["status"] not in BUILD_ACTIVE:
            if not deployed or build["status"] != "built":
                return dict(build)
            _, deployments = await api.get(f"{base}/{build['id']}/deployments")
            if deployments.get("model_deployments"):
                return dict(build)
        if time.monotonic() > deadline:
            shown = ""
            if build.get("id"):  # where it stands, for whoever reads the failure
                _, log = await api.get(f"{base}/{build['id']}/logs")
                shown = (log.get("content") or "")[-3000:] if isinstance(log, dict) else ""
            raise AssertionError(f"the build is still {build.get('status')} after {timeout} s; its log:\n{shown}")
        await asyncio.sleep(0.1)


def assert_error(status: int, body: Any, expected_status: int) -> None:
    """Every API error has CML's shape: {error, code, message, details}."""
    assert status == expected_status, body
    assert isinstance(body, dict), body
    assert set(body) == {"error", "code", "message", "details"}, body
    assert isinstance(body["code"], int) and body["code"] > 0
    assert body["message"] and body["error"] == body["message"]
    assert body["details"] == []


# Containers ------------------------------------------------------------------------------------

BUSYBOX_IMAGE = "localhost/cml-test-busybox:1"


async def podman_cli(env: dict[str, str], *args: str, stdin: str = "", timeout: float = 180) -> tuple[int, str]:
    """The podman CLI (as a user would type it), without blocking the loop that serves the
    appliance under test: (exit code, output)."""
    proc = await asyncio.create_subprocess_exec("podman", *args, env=env, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


def _podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(REPO / "config" / "podman" / "containers.conf"))
    return env


@pytest.fixture(scope="session")
def podman_url() -> Iterator[str]:
    """A Docker-compatible API served by `podman system service` on a socket of our own."""
    require_tool(shutil.which("podman") is not None, "podman")
    import subprocess
    import time

    directory = Path(tempfile.mkdtemp(prefix="cml-podman-"))
    socket_path = directory / "podman.sock"
    proc = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
        env=_podman_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        if not socket_path.exists():
            pytest.fail("podman system service did not create its socket")
        yield f"unix://{socket_path}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def busybox_image(podman_url: str) -> str:
    """A tiny runtime image made locally from Debian's busybox-static (nothing can be pulled here)."""
    import subprocess

    env = _podman_env()
    with machine_lock("busybox-image"):
        if subprocess.run(["podman", "image", "exists", BUSYBOX_IMAGE], env=env).returncode != 0:
            _import_busybox(env)
    return BUSYBOX_IMAGE


def _import_busybox(env: dict[str, str]) -> None:
    import subprocess

    busybox = shutil.which("busybox")
    require_tool(busybox is not None, "busybox (Debian's busybox-static)")
    root = Path(tempfile.mkdtemp(prefix="cml-busybox-"))
    try:
        for sub in ("bin", "etc", "tmp", "home/cdsw"):
            (root / sub).mkdir(parents=True)
        shutil.copy(str(busybox), root / "bin" / "busybox")
        applets = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True).stdout.split()
        for applet in applets:
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "tmp").chmod(0o1777)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", "import", "--change", "ENV PATH=/bin", "--change", 'CMD ["/bin/sh"]', "-", BUSYBOX_IMAGE],
            stdin=tar.stdout, env=env, check=True, capture_output=True,
        )
        tar.wait()
    finally:
        shutil.rmtree(root, ignore_errors=True)


PYTHON_IMAGE = "localhost/debian-python:bookworm"


@pytest.fixture(scope="session")
def python_image(podman_url: str) -> str:
    """A Debian runtime image with Python 3, made by scripts/build-base-image.sh (about a minute,
    once per machine; nothing can be pulled here)."""
    import subprocess

    env = _podman_env()
    if subprocess.run(["podman", "image", "exists", PYTHON_IMAGE], env=env).returncode != 0:
        require_tool(shutil.which("debootstrap") is not None and os.getuid() == 0, "debootstrap, as root")
        proc = subprocess.run([str(REPO / "scripts" / "build-base-image.sh")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"build-base-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return PYTHON_IMAGE


@pytest.fixture
async def container_settings(settings: Settings, podman_url: str, busybox_image: str) -> AsyncIterator[Settings]:
    runtime = {
        "image_identifier": busybox_image, "editor": "Workbench", "kernel": "Shell", "edition": "Busybox",
        "description": "busybox, for tests", "full_version": "1.0", "status": "ENABLED",
    }
    yield dataclasses.replace(
        settings, container_engine_url=podman_url, runtimes=(*settings.runtimes, runtime), stop_grace_seconds=3
    )
    # Containers outlive the appliance by design (a restart adopts them); the next test's appliance
    # is another site and would leave them running, so the test's own are removed after it.
    conn = await asyncpg.connect(settings.database_url)
    try:
        site = await conn.fetchval("SELECT site_id FROM site")
    finally:
        await conn.close()
    if site:
        import aiodocker

        async with aiodocker.Docker(url=podman_url) as docker:
            for container in await docker.containers.list(all=True, filters={"label": [f"cml.site={site}"]}):
                try:
                    await container.delete(force=True)
                except aiodocker.exceptions.DockerError as exc:
                    if exc.status != 404:  # gone meanwhile (--rm, or the appliance removed it): fine
                        raise


@pytest.fixture
async def container_client(aiohttp_client: Any, container_settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(container_settings, allow_local_git=True))


@pytest.fixture
def make_container_user(container_client: TestClient) -> Any:
    """make_user's twin for the appliance whose container engine is Podman."""
    return user_maker(container_client)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests run on uvloop, as `serve` does: the two loops differ (e.g. in how they spawn)."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


# Kubernetes: a real one-node cluster (scripts/test-cluster.sh) -------------------------------

TEST_CLUSTER = REPO / "scripts" / "test-cluster.sh"
# The node's pod network gateway: the address the appliance's connections to pods come from.
POD_GATEWAY = "10.88.93.1"


def _cluster_is_up() -> bool:
    import subprocess

    return os.getuid() == 0 and subprocess.run([str(TEST_CLUSTER), "status"], capture_output=True).returncode == 0


CLUSTER_WAS_UP = pytest.StashKey[bool]()


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the run itself, not one of its workers
        session.config.stash[CLUSTER_WAS_UP] = _cluster_is_up()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The cluster is stopped after the run if the run started it: here, once every worker is
    done with it (a worker that finished first must not stop it under the other)."""
    import subprocess

    if os.environ.get("PYTEST_XDIST_WORKER") or session.config.stash.get(CLUSTER_WAS_UP, True):
        return
    if _cluster_is_up():
        subprocess.run([str(TEST_CLUSTER), "down"], capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def kube_cluster() -> Path:
    """The test cluster's admin kubeconfig. Built on first use (about 7 minutes, then cached
    under /var/tmp/cml-test-cluster), started when it is not up (test-cluster.sh serialises two
    workers asking at once)."""
    import subprocess

    require_tool(os.getuid() == 0, "root, for the test cluster's kubelet and containerd (scripts/test-cluster.sh)")
    proc = subprocess.run([str(TEST_CLUSTER), "up"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f"scripts/test-cluster.sh up failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    kubeconfig = Path(proc.stdout.strip().splitlines()[-1])
    assert kubeconfig.is_file(), proc.stdout
    return kubeconfig


def _containerd_has(image: str) -> bool:
    import subprocess

    sock = Path(os.environ.get("CML_TEST_CLUSTER_DIR", "/var/tmp/cml-test-cluster")) / "run" / "containerd.sock"
    listed = subprocess.run(["ctr", "--address", str(sock), "-n", "k8s.io", "images", "ls", "-q"],
                            capture_output=True, text=True).stdout.split()
    return any(name in (image, f"docker.io/{image}") for name in listed)


@pytest.fixture(scope="session")
def kube_images(kube_cluster: Path, busybox_image: str, python_image: str) -> tuple[str, str]:
    """The test runtimes, loaded into the node's containerd (nothing can be pulled here)."""
    for image in (busybox_image, python_image):
        _load_into_cluster(image)
    return busybox_image, python_image


def _load_into_cluster(image: str) -> None:
    """An image of Podman's into the node's containerd, once (both workers may ask)."""
    import subprocess

    with machine_lock("cluster-images"):
        if not _containerd_has(image):
            with tempfile.TemporaryDirectory(prefix="cml-image-") as folder:
                archive = Path(folder) / "image.tar"
                subprocess.run(["podman", "save", "--format", "docker-archive", "-o", str(archive), image],
                               env=_podman_env(), check=True, capture_output=True, timeout=600)
                subprocess.run([str(TEST_CLUSTER), "import", str(archive)], check=True, capture_output=True, timeout=900)
    assert _containerd_has(image), f"{image} is not in the node's containerd after the import"


@pytest.fixture
async def kube_settings(container_settings: Settings, kube_cluster: Path, kube_images: tuple[str, str]) -> AsyncIterator[Settings]:
    """An appliance whose runtimes run as pods on the test cluster, in namespaces of this test's
    own (a fresh prefix), which are deleted afterwards."""
    busybox, python = kube_images
    prefix = "t" + uuid.uuid4().hex[:8]
    python_runtime = {
        "image_identifier": python, "editor": "Workbench", "kernel": "Python 3.11", "edition": "Standard",
        "description": "Debian's Python, for tests", "full_version": "1.0", "status": "ENABLED",
    }
    yield dataclasses.replace(
        container_settings, kubeconfig=str(kube_cluster), workload_engine="kubernetes",
        kubernetes_namespace_prefix=prefix, kubernetes_appliance_cidrs=f"{POD_GATEWAY}/32",
        kubernetes_watch_stale_seconds=5, kubernetes_watch_timeout_seconds=4, runtimes=(*container_settings.runtimes, python_runtime),
        # A profile larger than the node (2 cores): what waits for a node that never comes.
        cpu_profiles=({"cpu": 1, "memory": 2}, {"cpu": 2, "memory": 4}, {"cpu": 8, "memory": 4}),
    )
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kube_cluster), client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        core = client.CoreV1Api(api)
        for namespace in (await core.list_namespace()).items:
            if namespace.metadata.name.startswith(prefix + "-"):
                await core.delete_namespace(namespace.metadata.name, grace_period_seconds=0)


@pytest.fixture
async def kube_client(aiohttp_client: Any, kube_settings: Settings) -> TestClient:
    return await aiohttp_client(create_app(kube_settings, allow_local_git=True))


JUPYTERLAB_IMAGE = "localhost/cml-runtime-jupyterlab:3.11"


@pytest.fixture(scope="session")
def jupyterlab_image(podman_url: str, python_image: str, workload_python: Path) -> str:
    """The container runtime with JupyterLab, built by scripts/build-runtime-image.sh (once per
    machine; JupyterLab from the package index, installed with the workloads' Python 3.11)."""
    import subprocess

    env = _podman_env() | {"PYTHON": str(workload_python)}
    if subprocess.run(["podman", "image", "exists", JUPYTERLAB_IMAGE], env=env).returncode != 0:
        proc = subprocess.run([str(REPO / "scripts" / "build-runtime-image.sh")], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"build-runtime-image.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return JUPYTERLAB_IMAGE


@pytest.fixture(scope="session")
def kube_jupyterlab_image(kube_cluster: Path, jupyterlab_image: str) -> str:
    """The JupyterLab runtime in the test node's containerd too (nothing can be pulled here)."""
    _load_into_cluster(jupyterlab_image)
    return jupyterlab_image


# The workloads' Python ------------------------------------------------------------------------

WORKLOAD_VENV = REPO / ".venv-workload"


@pytest.fixture(scope="session")
def workload_python() -> Path:
    """The Python with the real mlflow, scikit-learn and jupyterlab (requirements-workload.txt),
    made by scripts/test.sh apart from the appliance's own environment."""
    python = WORKLOAD_VENV / "bin" / "python"
    require_tool(python.exists(), "the workloads' Python (.venv-workload, made by scripts/test.sh)")
    return python


async def run_mlflow_client(python: Path, tracking_uri: str, token: str, script: str,
                            timeout: float = 240) -> dict[str, Any]:
    """Run a script in the workloads' Python with the variables a workload gets; its RESULT line."""
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"),
           "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_TRACKING_TOKEN": token, "GIT_PYTHON_REFRESH": "quiet"}
    proc = await asyncio.create_subprocess_exec(str(python), "-c", script, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), timeout)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    line = next(line for line in text.splitlines() if line.startswith("RESULT "))
    return dict(json.loads(line.removeprefix("RESULT ")))


def tracking_uri(api: Api, project_id: str) -> str:
    return f"http://127.0.0.1:{api.client.server.port}/mlflow/{project_id}"
