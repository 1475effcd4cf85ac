"""The layer-append builder: daemonless, in Python over the OCI distribution API.

A build's image is its runtime's base image plus one layer: the snapshot commit, fetched from the
git server (never read from the disk), under /home/cdsw, with the model's entry point. The base
comes from the registry; a runtime image that only the container engine has (built or imported
locally, as on machines that cannot pull) is exported from the engine once and pushed to an
internal repository, cml-runtimes/<name>, from which builds mount its layers. `host/` runtimes
(the local engine) have no base: their image is the layer alone, which local replicas unpack.

Failures say whose they are: BuildFailed is the build's own (a missing file or function, a
snapshot that cannot be a layer) and is never retried; anything else (the git server, the
registry or the engine not answering) is the infrastructure's, and the queue tries again.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiodocker

from cml_appliance.builds.layers import PREFIX, BadSnapshot, Layer, file_digest, make_layer, make_layer_from_dir, unpack
from cml_appliance.core import ownership
from cml_appliance.engines.container import followed_log
from cml_appliance.engines.sandbox import Sandbox
from cml_appliance.gitserver.repos import run_git
from cml_appliance.registry.client import RegistryClient, RegistryError

log = logging.getLogger(__name__)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
RUNTIMES_REPOSITORY = "cml-runtimes"
GIT_TIMEOUT_SECONDS = 300


class BuildFailed(Exception):
    """The build itself cannot succeed (not the infrastructure): never retried."""


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    build_id: str
    model_id: str
    owner: str
    project_slug: str
    commit: str
    runtime_identifier: str
    file_path: str
    function_name: str
    git_url: str  # the project's repository on the internal listener
    git_user: str
    git_password: str  # a key of the build's own, for this fetch
    model_root_dir: str = ""  # file_path is relative to it; the build script runs there
    build_script_path: str = ""  # "": cdsw-build.sh when the model root has one

    @property
    def model_file(self) -> str:
        return f"{self.model_root_dir.strip('/')}/{self.file_path}" if self.model_root_dir.strip("/") else self.file_path

    @property
    def repository(self) -> str:
        return f"{_component(self.owner)}/{_component(self.project_slug)}/model-{_component(self.model_id)}"


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    reference: str  # <repository>:<build id>
    digest: str
    layer_digest: str
    pushed_bytes: int


def _component(text: str) -> str:
    """A registry path component (lower-case letters, digits, single separators)."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return cleaned or "x"


Progress = Callable[[str], None]


class ImageBuilder:
    def __init__(self, registry: RegistryClient, work_dir: Path, builds_dir: Path, entry_point: tuple[str, bytes],
                 docker: Callable[[], aiodocker.Docker] | None, sandbox: Sandbox | None = None):
        self.registry = registry
        self.work_dir = work_dir
        self.builds_dir = builds_dir
        self.entry_point = entry_point  # (name under /home/cdsw, contents)
        self.docker = docker
        self.sandbox = sandbox  # where a host/ runtime's build script runs
        self._bases: dict[str, tuple[str, dict[str, Any]]] = {}
        self._cache_locks: dict[str, asyncio.Lock] = {}

    async def build(self, spec: BuildSpec, say: Progress, stage: Callable[[str], Any]) -> BuiltImage:
        work = self.work_dir / spec.build_id
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        try:
            archive = await self._fetch(spec, work, say)
            say(f"[2/4] Checking {spec.model_file} for {spec.function_name}()")
            await asyncio.to_thread(_check_function, archive, spec.model_file, spec.function_name)
            script = await asyncio.to_thread(_script_for, archive, spec)
            extra = {self.entry_point[0]: self.entry_point[1]}
            try:
                if script is None:
                    layer = await asyncio.to_thread(make_layer, archive, work, extra)
                else:
                    home = await self._run_script(spec, archive, work, script, say)
                    layer = await asyncio.to_thread(make_layer_from_dir, home, work, extra)
            except BadSnapshot as exc:
                raise BuildFailed(str(exc)) from None
            say(f"      layer {layer.digest[:19]}: {layer.files} files, {layer.tar_size / 1e6:.1f} MB, "
                f"{layer.size / 1e6:.1f} MB compressed")
            base = await self._base(spec.runtime_identifier, work, say)
            await stage("pushing")
            built = await self._push(spec, layer, base, say)
            if base is None:  # a host/ runtime: what its local replicas run is the layer, unpacked
                target = self.builds_dir / spec.build_id
                shutil.rmtree(target, ignore_errors=True)
                await asyncio.to_thread(unpack, layer.tar_path, target)
            return built
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _fetch(self, spec: BuildSpec, work: Path, say: Progress) -> Path:
        """The snapshot, from the git server, into a cache repository of the project's (kept
        between builds, so that a build after a small change fetches only what changed)."""
        say(f"[1/4] Fetching snapshot {spec.commit[:12]} from the git server")
        cache = self.work_dir / "cache" / f"{_component(spec.owner)}--{_component(spec.project_slug)}.git"
        auth = base64.b64encode(f"{spec.git_user}:{spec.git_password}".encode()).decode()
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
        async with self._cache_locks.setdefault(cache.name, asyncio.Lock()):
            if not (cache / "HEAD").exists():
                shutil.rmtree(cache, ignore_errors=True)
                await _git(["init", "--quiet", "--bare", str(cache)], env)
            # The fetched commit is kept as a ref: the next fetch offers it as what the cache has,
            # and only what changed since comes (without a ref, every fetch is the whole tree).
            # Not shallow: a cache made of many shallow fetches soon gets answers git cannot read
            # ("expected 'acknowledgments'"), and the first fetch of a project takes its history once.
            await _git(["-C", str(cache), "-c", f"http.extraHeader=Authorization: Basic {auth}", "fetch", "--quiet",
                        "--no-tags", spec.git_url, f"+{spec.commit}:refs/cml/last"], env)
            archive = work / "snapshot.tar"
            await _git(["-C", str(cache), "-c", "core.attributesFile=/dev/null", "archive", "--format=tar",
                        f"--prefix={PREFIX}", "-o", str(archive), spec.commit], env)
        return archive

    async def _run_script(self, spec: BuildSpec, archive: Path, work: Path, script: tuple[str, str], say: Progress) -> Path:
        """Run the build script with the snapshot as /home/cdsw, unprivileged: in a container of the
        runtime's image (all capabilities dropped), or in the local sandbox for host/ runtimes.
        What /home/cdsw holds afterwards (`pip install --user` puts packages in .local) is the
        layer. A failing script fails the build with its output's tail; the queue's time limit
        ends one that does not stop."""
        label, command = script
        home = work / "home"
        try:
            await asyncio.to_thread(unpack, archive, home, keep_links=True)
        except BadSnapshot as exc:
            raise BuildFailed(str(exc)) from None
        await asyncio.to_thread(ownership.give_tree, home)
        cwd = f"/home/cdsw/{spec.model_root_dir.strip('/')}".rstrip("/")
        say(f"      running {label} in {cwd}")
        tail: collections.deque[str] = collections.deque(maxlen=30)

        def show(line: str) -> None:
            tail.append(line)
            say(f"      | {line}")

        if spec.runtime_identifier.startswith("host/"):
            code = await self._run_locally(home, cwd, command, show)
        else:
            code = await self._run_in_container(spec, home, cwd, command, show)
        if code != 0:
            raise BuildFailed(f"{label} exited with {code}: " + " / ".join(tail)[-1500:])
        return home

    async def _run_locally(self, home: Path, cwd: str, command: str, show: Callable[[str], None]) -> int:
        if self.sandbox is None:
            raise BuildFailed("build scripts of host/ runtimes need the local sandbox (bubblewrap), which this machine lacks")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/cdsw", "LANG": "C.UTF-8"}
        proc = await asyncio.create_subprocess_exec(
            *self.sandbox.wrap(["/bin/sh", "-c", f"cd {shlex.quote(cwd)} && {command}"], project_dir=home),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)
        assert proc.stdout is not None
        try:
            while line := await proc.stdout.readline():
                show(line.decode(errors="replace").rstrip())
            return await proc.wait()
        finally:
            if proc.returncode is None:  # cancelled or timed out: the script and what it started
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def _run_in_container(self, spec: BuildSpec, home: Path, cwd: str, command: str,
                                show: Callable[[str], None]) -> int:
        if self.docker is None:
            raise BuildFailed(f"the runtime {spec.runtime_identifier} needs the container engine, which is not configured")
        docker = self.docker()
        config = {
            "Image": spec.runtime_identifier, "Cmd": ["/bin/sh", "-c", command], "WorkingDir": cwd,
            "User": f"{ownership.WORKLOAD_UID}:{ownership.WORKLOAD_UID}" if ownership.giving() else f"{os.getuid()}:{os.getgid()}",
            "Env": ["HOME=/home/cdsw", f"CML_BUILD_ID={spec.build_id}"], "Tty": False,
            "Labels": {"cml.build": spec.build_id},
            "HostConfig": {"Binds": [f"{home}:/home/cdsw"], "CapDrop": ["ALL"], "SecurityOpt": ["no-new-privileges"],
                           "PidsLimit": 1024, "Memory": 4 * 1024 ** 3, "NetworkMode": "bridge"},
        }
        container = await docker.containers.create(config, name=f"cml-build-{spec.build_id}")
        partial = ""  # the start of a line that the next chunk ends
        try:
            await container.start()
            async for chunk in followed_log(container):
                *lines, partial = (partial + chunk).replace("\r\n", "\n").split("\n")
                for line in lines:
                    show(line)
            if partial:
                show(partial)
            return int((await container.wait()).get("StatusCode", 1))
        finally:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)

    async def _base(self, runtime: str, work: Path, say: Progress) -> tuple[str, dict[str, Any]] | None:
        """(repository, manifest) of the runtime's image in the registry; None for host runtimes."""
        if runtime.startswith("host/"):
            say(f"[3/4] Base: none ({runtime} runs on the local engine; the image is the snapshot layer alone)")
            return None
        if runtime in self._bases:
            say(f"[3/4] Base: {runtime}")
            return self._bases[runtime]
        if self.docker is None:
            raise BuildFailed(f"the runtime {runtime} needs the container engine, which is not configured (CML_CONTAINER_ENGINE_URL)")
        docker = self.docker()
        try:
            info = await docker.images.inspect(runtime)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                raise BuildFailed(f"the container engine has no image {runtime}") from None
            raise
        name, _, _ = runtime.rpartition(":") if ":" in runtime.rsplit("/", 1)[-1] else (runtime, "", "")
        repository = f"{RUNTIMES_REPOSITORY}/{'/'.join(_component(p) for p in name.split('/'))}"
        tag = info["Id"].removeprefix("sha256:")[:32]
        try:
            raw, _, _ = await self.registry.manifest(repository, tag)
            say(f"[3/4] Base: {runtime} (in the registry as {repository}:{tag[:12]})")
        except RegistryError as exc:
            if exc.status != 404:
                raise
            say(f"[3/4] Base: {runtime}, exported from the container engine into the registry (once per image)")
            raw = await self._import_base(docker, runtime, repository, tag, work, say)
        manifest = json.loads(raw)
        self._bases[runtime] = (repository, manifest)
        return repository, manifest

    async def _import_base(self, docker: aiodocker.Docker, image: str, repository: str, tag: str, work: Path,
                           say: Progress) -> bytes:
        archive = work / "base.tar"
        async with docker.images.export_image(image) as stream:
            with open(archive, "wb") as fh:
                while chunk := await stream.read(1024 * 1024):
                    fh.write(chunk)
        unpacked = work / "base"
        with tarfile.open(archive, "r:") as tar:
            tar.extractall(unpacked, filter="data")
        (entry,) = json.loads((unpacked / "manifest.json").read_text())
        config = (unpacked / entry["Config"]).read_bytes()
        layers = []
        for name in entry["Layers"]:
            path = unpacked / name
            digest = await asyncio.to_thread(file_digest, path)
            await self.registry.push_blob_file(repository, path, digest)
            layers.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": path.stat().st_size})
        config_digest, _ = await self.registry.push_blob(repository, config)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                               "layers": layers}, separators=(",", ":")).encode()
        await self.registry.put_manifest(repository, tag, manifest, OCI_MANIFEST)
        say(f"      pushed {len(layers)} base layer(s), {sum(entry['size'] for entry in layers) / 1e6:.1f} MB")
        return manifest

    async def _push(self, spec: BuildSpec, layer: Layer, base: tuple[str, dict[str, Any]] | None, say: Progress) -> BuiltImage:
        repository = spec.repository
        say(f"[4/4] Pushing to {repository}:{spec.build_id}")
        if base is not None:
            base_repository, manifest = base
            config = json.loads(await self.registry.blob(base_repository, manifest["config"]["digest"]))
            mounted = 0
            for entry in manifest["layers"]:
                if await self.registry.has_blob(repository, entry["digest"]):
                    continue
                if not await self.registry.mount(repository, entry["digest"], base_repository):
                    raise RegistryError(502, f"could not mount base layer {entry['digest']} from {base_repository}")
                mounted += 1
            base_layers = list(manifest["layers"])
            layer_type = DOCKER_LAYER_GZIP if manifest.get("mediaType", "").startswith("application/vnd.docker") else OCI_LAYER_GZIP
            manifest_type = manifest.get("mediaType") or OCI_MANIFEST
            say(f"      base: {len(base_layers)} layer(s) mounted from {base_repository} ({mounted} new here)")
        else:
            config = {"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}
            base_layers, layer_type, manifest_type = [], OCI_LAYER_GZIP, OCI_MANIFEST
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        config["rootfs"]["diff_ids"] = [*config["rootfs"].get("diff_ids", []), layer.diff_id]
        settings = config.setdefault("config", {}) or {}
        config["config"] = settings
        settings["WorkingDir"] = "/home/cdsw"
        settings["Labels"] = {**(settings.get("Labels") or {}), "io.cml-appliance.build": spec.build_id,
                              "io.cml-appliance.snapshot": spec.commit}
        config["history"] = [*config.get("history", []), {"created_by": f"cml-appliance build {spec.build_id}: snapshot {spec.commit[:12]}"}]
        config.pop("created", None)  # no timestamps: the same snapshot on the same base is the same image

        pushed = 0

        def count(sent: int) -> None:
            nonlocal pushed
            say(f"      layer: {sent / 1e6:.1f} of {layer.size / 1e6:.1f} MB sent")
            pushed = sent

        if not await self.registry.push_blob_file(repository, layer.blob_path, layer.digest, count):
            say("      layer unchanged since an earlier build: nothing to send")
        config_raw = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_digest, _ = await self.registry.push_blob(repository, config_raw)
        manifest_raw = json.dumps({
            "schemaVersion": 2, "mediaType": manifest_type,
            "config": {"mediaType": OCI_CONFIG if manifest_type == OCI_MANIFEST else "application/vnd.docker.container.image.v1+json",
                       "digest": config_digest, "size": len(config_raw)},
            "layers": [*base_layers, {"mediaType": layer_type, "digest": layer.digest, "size": layer.size}],
        }, separators=(",", ":")).encode()
        digest = await self.registry.put_manifest(repository, spec.build_id, manifest_raw, manifest_type)
        say(f"Built {repository}:{spec.build_id} ({digest[:19]}), {pushed / 1e6:.1f} MB sent")
        return BuiltImage(f"{repository}:{spec.build_id}", digest, layer.digest, pushed)


def _script_for(archive: Path, spec: BuildSpec) -> tuple[str, str] | None:
    """(what to call it, the shell command) of the build's script: build_script_path, else the
    model root's cdsw-build.sh, else `pip install --user -r requirements.txt` when it has one."""
    root = spec.model_root_dir.strip("/")
    with tarfile.open(archive, "r:") as tar:
        names = set(tar.getnames())
    def there(relative: str) -> bool:
        return PREFIX + relative in names
    if spec.build_script_path:
        path = spec.build_script_path.strip("/")
        if not there(path):
            raise BuildFailed(f"build_script_path {path} is not a file in the snapshot")
        return path, f"/bin/sh /home/cdsw/{shlex.quote(path)}"
    default = f"{root}/cdsw-build.sh" if root else "cdsw-build.sh"
    if there(default):
        return default, f"/bin/sh /home/cdsw/{shlex.quote(default)}"
    requirements = f"{root}/requirements.txt" if root else "requirements.txt"
    if there(requirements):
        return requirements, "python3 -m pip install --user --no-warn-script-location -r requirements.txt"
    return None


def function_problem(source: bytes | None, file_path: str, function_name: str) -> str:
    """Why `source` (the model's file; None when there is none) cannot serve the function, or ""."""
    if source is None:
        return f"{file_path} is not a file in the project"
    try:  # bytes: Python's own rules find the encoding (a coding line, else UTF-8)
        tree = ast.parse(source, filename=file_path)
    except SyntaxError as exc:  # also undecodable bytes and NUL bytes
        return f"{file_path} is not valid Python: {exc.msg} (line {exc.lineno})"
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    return "" if function_name in names else f"{file_path} has no function named {function_name!r}"


def _check_function(archive: Path, file_path: str, function_name: str) -> None:
    source = None
    with tarfile.open(archive, "r:") as tar:
        try:
            member = tar.getmember(PREFIX + file_path)
        except KeyError:
            member = None
        if member is not None and member.isfile():
            source = tar.extractfile(member).read()  # type: ignore[union-attr]
    problem = function_problem(source, file_path, function_name)
    if problem:
        raise BuildFailed(problem)


async def _git(args: list[str], env: dict[str, str]) -> None:
    await run_git(["git", *args], env=env, timeout=GIT_TIMEOUT_SECONDS)

