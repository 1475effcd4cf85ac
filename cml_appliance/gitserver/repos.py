"""Every project directory is a git repository; this is what the appliance does to one.

A project's `.git` is the user's: writers change it through the files API and from their
sessions, hooks and config included. So every git command the appliance runs on a project runs
in the local engine's sandbox (engines/sandbox.py), as a workload would: a hostile config
(core.fsmonitor, a clean filter, a hook) then runs as the project's own code, seeing only the
project. Hooks are off besides. Without a sandbox (a single-user laptop, see
allow_unsandboxed_local) git runs directly, with the same config.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cml_appliance.core import ownership
from cml_appliance.engines.sandbox import Sandbox

log = logging.getLogger(__name__)

# Config for every git the appliance runs on a project: no hooks, no fsmonitor, and never a
# prompt. Hidden refs (refs/cml/...) are the appliance's own: not advertised, not pushable.
# safe.directory: a project's files may belong to the containers' uid 8536 rather than to the
# appliance (the container engine's mounts); git would refuse such a repository as "dubious",
# a check that guards against running a stranger's config, which the sandbox already confines.
SAFE_CONFIG = ("-c", "safe.directory=*", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", "-c", "protocol.allow=never",
               "-c", "uploadpack.hideRefs=refs/cml", "-c", "receive.hideRefs=refs/cml")
COMMITTER = ("-c", "user.name=cml-appliance", "-c", "user.email=cml-appliance@localhost")
HIDDEN_REF_PREFIX = "refs/cml/builds/"
GIT_TIMEOUT_SECONDS = 600


class GitError(Exception):
    """A git command failed; str() is git's own message."""


class SnapshotTooLarge(GitError):
    pass


@dataclass(frozen=True)
class Snapshot:
    commit: str
    files: int
    bytes: int


async def run_git(command: list[str], *, env: dict[str, str], cwd: Path | None = None,
                  timeout: float = GIT_TIMEOUT_SECONDS, stdin: bytes | None = None) -> bytes:
    """Run a git command line (the whole argv: git's, or a sandbox around it): its output, or a
    GitError with git's own words (or the time it took too long)."""
    proc = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise GitError(f"git took longer than {timeout:g} s") from None
    if proc.returncode != 0:
        words = (err or out).decode(errors="replace").strip()
        raise GitError(words[:2000] or f"git exited {proc.returncode}")
    return out


class Repositories:
    def __init__(self, projects_dir: Path, sandbox: Sandbox | None):
        self.projects_dir = projects_dir
        self.sandbox = sandbox
        self._locks: dict[str, asyncio.Lock] = {}  # one snapshot at a time per project

    def environment(self) -> dict[str, str]:
        """A clean environment for git: nothing of the appliance's (no secrets, no credentials)."""
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/cdsw", "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_TERMINAL_PROMPT": "0", "LANG": "C.UTF-8"}

    def command(self, project_dir: Path, args: list[str]) -> list[str]:
        """`git <args>` on the project, sandboxed where the machine allows."""
        command = ["git", *SAFE_CONFIG, *args]
        if self.sandbox is None:
            return command
        return self.sandbox.wrap(command, project_dir=project_dir, new_session=False)

    async def run(self, project_dir: Path, args: list[str], *, env: dict[str, str] | None = None,
                  timeout: float = GIT_TIMEOUT_SECONDS, stdin: bytes | None = None) -> bytes:
        return await run_git(self.command(project_dir, args), env={**self.environment(), **(env or {})},
                             cwd=project_dir, timeout=timeout, stdin=stdin)

    def is_repository(self, project_dir: Path) -> bool:
        return (project_dir / ".git").exists()

    async def ensure(self, project_dir: Path) -> None:
        """A project made before the git server (or whose .git was deleted) becomes a repository."""
        if not self.is_repository(project_dir):
            await self.init(project_dir)

    async def init(self, project_dir: Path) -> None:
        await self.run(project_dir, ["init", "--quiet", "-b", "main", str(project_dir)])

    async def snapshot(self, project_dir: Path, build_id: str, *, max_bytes: int,
                       extra: dict[str, bytes] | None = None) -> Snapshot:
        """The project's files as they are on disk (what .gitignore leaves), as a commit on
        refs/cml/builds/<build_id>: an index of the appliance's own, so the user's branches, index
        and working tree stay as they are. Its parent is HEAD when there is one. `extra` adds
        files that are not in the project (path -> content: a registered model's), in the
        commit only."""
        await self.ensure(project_dir)
        if self.sandbox is not None and self.sandbox.privileged:  # git runs as uid 8536: its files are theirs
            await asyncio.to_thread(ownership.give_tree, project_dir)
        # An index of the appliance's own, kept between snapshots: git rehashes only the files
        # that changed since the last one (the user's own index is never touched).
        index = ".git/cml-snapshot-index"
        env = {"GIT_INDEX_FILE": str(project_dir / index)}
        async with self._locks.setdefault(str(project_dir), asyncio.Lock()):
            return await self._snapshot(project_dir, build_id, max_bytes, env, extra or {})

    async def _snapshot(self, project_dir: Path, build_id: str, max_bytes: int, env: dict[str, str],
                        extra: dict[str, bytes]) -> Snapshot:
        listed = await self.run(project_dir, ["ls-files", "-z", "--cached", "--others", "--exclude-standard"], env=env)
        paths = [p for p in listed.decode(errors="surrogateescape").split("\0") if p]
        total, files = sum(len(v) for v in extra.values()), len(extra)
        for path in paths:
            try:
                total += os.lstat(project_dir / path).st_size
            except OSError:
                continue  # gone meanwhile (or since the last snapshot): git drops it too
            files += 1
            if total > max_bytes:
                raise SnapshotTooLarge(
                    f"the project's files come to more than {max_bytes // (1024 * 1024)} MB (what .gitignore leaves "
                    "out is not counted): ignore data and outputs in .gitignore, or raise build_snapshot_max_mb")
        # What an earlier snapshot took and .gitignore now leaves out goes out of this one.
        ignored = await self.run(project_dir, ["ls-files", "-z", "--cached", "--ignored", "--exclude-standard"], env=env)
        if ignored.strip(b"\0"):
            await self.run(project_dir, ["rm", "-r", "--cached", "--quiet", "--ignore-unmatch", "--pathspec-from-file=-",
                                         "--pathspec-file-nul"], env=env, stdin=ignored)
        await self.run(project_dir, ["add", "--all", "--", "."], env=env)
        tree = (await self.run(project_dir, ["write-tree"], env=env)).decode().strip()
        if extra:
            tree = await self._tree_with(project_dir, tree, extra, build_id)
        parents: list[str] = []
        try:
            head = (await self.run(project_dir, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])).decode().strip()
            parents = ["-p", head]
        except GitError:
            pass  # no commit yet
        message = f"cml-appliance build {build_id}"
        commit = (await self.run(project_dir, [*COMMITTER, "commit-tree", tree, *parents, "-m", message])).decode().strip()
        await self.run(project_dir, ["update-ref", HIDDEN_REF_PREFIX + build_id, commit])
        return Snapshot(commit, files, total)

    async def _tree_with(self, project_dir: Path, tree: str, extra: dict[str, bytes], build_id: str) -> str:
        """`tree` plus the extra files, through a throwaway index: the blobs go in through stdin,
        so nothing is written to the project's working tree."""
        index = project_dir / ".git" / f"cml-snapshot-extra-{build_id}"
        env = {"GIT_INDEX_FILE": str(index)}
        try:
            await self.run(project_dir, ["read-tree", tree], env=env)
            lines = []
            for path, content in sorted(extra.items()):
                if any(c in path for c in "\t\n\r\0") or path.startswith("/") or ".." in path.split("/"):
                    raise GitError(f"cannot add {path!r} to a snapshot")
                blob = (await self.run(project_dir, ["hash-object", "-w", "--stdin"], stdin=content)).decode().strip()
                lines.append(f"100644 {blob}\t{path}\n")
            await self.run(project_dir, ["update-index", "--add", "--index-info"], env=env, stdin="".join(lines).encode())
            return (await self.run(project_dir, ["write-tree"], env=env)).decode().strip()
        finally:
            index.unlink(missing_ok=True)

    async def forget_snapshot(self, project_dir: Path, build_id: str) -> None:
        if self.is_repository(project_dir):
            try:
                await self.run(project_dir, ["update-ref", "-d", HIDDEN_REF_PREFIX + build_id])
            except GitError as exc:
                log.warning("could not delete the snapshot ref of build %s: %s", build_id, exc)
