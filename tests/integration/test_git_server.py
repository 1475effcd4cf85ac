"""The git server: every project is a repository that the real `git` clones and pushes to over
HTTP, with an API key as the password, within the project's roles; nothing else is served."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from cml_appliance.app import create_app
from cml_appliance.auth import api_keys, users
from cml_appliance.core.settings import Settings
from cml_appliance.web.keys import POOL, PROJECTS
from tests.conftest import Api


async def git(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real git client, run without blocking the loop that serves the appliance."""
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd or Path.cwd()), "GIT_TERMINAL_PROMPT": "0",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "Alice", "GIT_AUTHOR_EMAIL": "a@example.com",
           "GIT_COMMITTER_NAME": "Alice", "GIT_COMMITTER_EMAIL": "a@example.com"}
    # safe.directory: as root, the test reads project repositories that belong to uid 8536.
    proc = await asyncio.create_subprocess_exec("git", "-c", "safe.directory=*", *args, cwd=cwd, env=env,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    result = subprocess.CompletedProcess(["git", *args], proc.returncode or 0, out.decode(errors="replace"),
                                         err.decode(errors="replace"))
    if check:
        assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result


def remote(client: TestClient, api: Api, owner: str, slug: str, password: str | None = None) -> str:
    return f"http://{api.username}:{password or api.key}@127.0.0.1:{client.server.port}/git/{owner}/{slug}.git"


async def project(api: Api, name: str) -> dict[str, Any]:
    status, body = await api.post("/api/v2/projects", json={"name": name})
    assert status == 200, body
    return body


async def test_clone_push_and_see_the_files(alice: Api, bob: Api, make_user: Any, tmp_path: Path) -> None:
    client = alice.client
    proj = await project(alice, "Pushed to")
    directory = client.app[PROJECTS].projects_dir / proj["id"]
    assert (directory / ".git").is_dir(), "a blank project is a repository from the start"
    url = remote(client, alice, "alice", proj["slug"])
    await git("clone", "--quiet", url, str(tmp_path / "work"), cwd=tmp_path)
    work = tmp_path / "work"
    (work / "src").mkdir()
    (work / "src" / "train.py").write_text("print('trained')\n")
    (work / "name with spaces & ü.txt").write_text("odd\n")
    await git("add", "-A", cwd=work)
    await git("commit", "--quiet", "-m", "first", cwd=work)
    await git("push", "--quiet", "origin", "HEAD:main", cwd=work)
    # The push updated the project's files (its working tree was clean).
    status, listing = await alice.get(f"/api/v2/projects/{proj['id']}/files/src")
    assert status == 200 and [f["path"] for f in listing["files"]] == ["src/train.py"], listing
    assert (directory / "name with spaces & ü.txt").read_text() == "odd\n"

    # A viewer clones but may not push; a stranger sees no repository; no key, no entry.
    await alice.put(f"/api/v2/projects/{proj['id']}/collaborators/bob", json={"permission": "read"})
    await git("clone", "--quiet", remote(client, bob, "alice", proj["slug"]), str(tmp_path / "bobs"), cwd=tmp_path)
    assert (tmp_path / "bobs" / "src" / "train.py").exists()
    (tmp_path / "bobs" / "x.txt").write_text("x")
    await git("add", "-A", cwd=tmp_path / "bobs")
    await git("commit", "--quiet", "-m", "bob's", cwd=tmp_path / "bobs")
    refused = await git("push", "origin", "HEAD:main", cwd=tmp_path / "bobs", check=False)
    assert refused.returncode != 0 and "403" in refused.stderr, refused.stderr
    carol = await make_user("carol")
    hidden = await git("clone", remote(client, carol, "alice", proj["slug"]), str(tmp_path / "carols"), cwd=tmp_path, check=False)
    assert hidden.returncode != 0 and "not found" in hidden.stderr.lower(), hidden.stderr
    wrong = await git("clone", remote(client, alice, "alice", proj["slug"], password="not-a-key"), str(tmp_path / "w"),
                cwd=tmp_path, check=False)
    assert wrong.returncode != 0 and "Authentication failed" in wrong.stderr, wrong.stderr
    base = f"http://127.0.0.1:{client.server.port}/git/alice/{proj['slug']}.git"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/info/refs?service=git-upload-pack") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Basic")
        # Someone else's key under alice's name is refused too.
        async with http.get(base + "/info/refs?service=git-upload-pack", headers={"Authorization": aiohttp.encode_basic_auth("alice", bob.key)}) as resp:
            assert resp.status == 401
        # Only the smart protocol: no file of the repository, no dumb HTTP, no other path.
        auth = {"Authorization": aiohttp.encode_basic_auth("alice", alice.key)}
        for path in ("/HEAD", "/config", "/objects/info/packs", "/info/refs", "/info/refs?service=git-upload-archive",
                     "/../../secret_key", "/%2e%2e/%2e%2e/secret_key"):
            async with http.get(base + path, headers=auth) as resp:
                assert resp.status == 404, (path, resp.status)
        async with http.get(f"http://127.0.0.1:{client.server.port}/git/alice/..%2f..%2fsecret_key.git/info/refs"
                            "?service=git-upload-pack", headers=auth) as resp:
            assert resp.status == 404

    # A change on disk (a session's edit, an upload) is never overwritten by a push: git refuses.
    (directory / "src" / "train.py").write_text("print('edited in a session')\n")
    (work / "src" / "train.py").write_text("print('pushed over it')\n")
    await git("commit", "--quiet", "-am", "second", cwd=work)
    dirty = await git("push", "origin", "HEAD:main", cwd=work, check=False)
    assert dirty.returncode != 0 and "unstaged changes" in (dirty.stderr + dirty.stdout), dirty.stderr
    assert (directory / "src" / "train.py").read_text() == "print('edited in a session')\n"


async def test_hooks_do_not_run_and_pushes_have_a_size_limit(aiohttp_client: Any, settings: Settings, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(dataclasses.replace(settings, git_max_push_mb=1), allow_local_git=True))
    user = await users.create_user(client.app[POOL], "dana", "dana@example.com", "correct horse")
    dana = Api(client, (await api_keys.create(client.app[POOL], user))[0], "dana")
    proj = await project(dana, "Limits")
    directory = client.app[PROJECTS].projects_dir / proj["id"]
    marker = tmp_path / "hook-ran"
    hook = directory / ".git" / "hooks" / "post-receive"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    url = remote(client, dana, "dana", proj["slug"])
    await git("clone", "--quiet", url, str(tmp_path / "work"), cwd=tmp_path)
    work = tmp_path / "work"
    (work / "small.txt").write_text("small\n")
    await git("add", "-A", cwd=work)
    await git("commit", "--quiet", "-m", "small", cwd=work)
    await git("push", "--quiet", "origin", "HEAD:main", cwd=work)
    assert (directory / "small.txt").exists() and not marker.exists(), "a hook of the project ran in the appliance"
    (work / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024))  # random: does not compress below the limit
    await git("add", "-A", cwd=work)
    await git("commit", "--quiet", "-m", "big", cwd=work)
    big = await git("push", "origin", "HEAD:main", cwd=work, check=False)
    assert big.returncode != 0, big.stderr
    assert not (directory / "big.bin").exists()


async def test_a_snapshot_is_a_hidden_commit_of_the_files_on_disk(alice: Api, tmp_path: Path) -> None:
    """A build's snapshot: what is on disk (less what .gitignore leaves out), as a commit on
    refs/cml/builds/<id>; the user's branch, index and working tree are as they were, clones do
    not see the ref, and a hostile clean filter runs in the sandbox, away from the data dir."""
    from cml_appliance.gitserver.repos import SnapshotTooLarge
    from cml_appliance.web.keys import GIT, SETTINGS

    client = alice.client
    proj = await project(alice, "Snapshotted")
    directory = client.app[PROJECTS].projects_dir / proj["id"]
    work = tmp_path / "work"
    await git("clone", "--quiet", remote(client, alice, "alice", proj["slug"]), str(work), cwd=tmp_path)
    (work / ".gitignore").write_text("data/\n*.log\n")
    (work / "train.py").write_text("print(1)\n")
    await git("add", "-A", cwd=work)
    await git("commit", "--quiet", "-m", "base", cwd=work)
    await git("push", "--quiet", "origin", "HEAD:main", cwd=work)
    # Then work on disk that was never committed: new, changed, ignored, nested, odd and empty files.
    (directory / "train.py").write_text("print(2)\n")
    (directory / "data").mkdir()
    (directory / "data" / "big.csv").write_text("a,b\n" * 1000)
    (directory / "run.log").write_text("noise\n")
    (directory / "pkg" / "sub").mkdir(parents=True)
    (directory / "pkg" / "sub" / "mod.py").write_text("x = 1\n")
    (directory / "pkg" / "empty.txt").write_text("")
    (directory / "weird 'name' #1.txt").write_text("w\n")
    # A clean filter that tries to read the secret key while git adds the files.
    secret = client.app[SETTINGS].data_dir / "secret_key"
    secret.write_text("s3cret-" + "x" * 40)
    (directory / ".gitattributes").write_text("*.py filter=steal\n")
    with open(directory / ".git" / "config", "a") as fh:
        fh.write(f'[filter "steal"]\n\tclean = "cat {secret} > {directory}/stolen.txt 2>/dev/null; cat"\n')
    status_before = (await git("status", "--porcelain", cwd=directory)).stdout
    head_before = (await git("rev-parse", "HEAD", cwd=directory)).stdout

    repos = client.app[GIT]
    snap = await repos.snapshot(directory, "build1", max_bytes=10 * 1024 * 1024)
    files = (await git("ls-tree", "-r", "--name-only", snap.commit, cwd=directory)).stdout.splitlines()
    # The filter ran (as the project's own code would), but could not see the secret key.
    stolen = directory / "stolen.txt"
    assert stolen.exists() and "s3cret" not in stolen.read_text()
    assert sorted(set(files) - {"stolen.txt"}) == sorted([".gitattributes", ".gitignore", "train.py", "pkg/sub/mod.py",
                                                           "pkg/empty.txt", "weird 'name' #1.txt"]), files
    assert (await git("show", f"{snap.commit}:train.py", cwd=directory)).stdout == "print(2)\n"
    assert (await git("rev-parse", "refs/cml/builds/build1", cwd=directory)).stdout.strip() == snap.commit
    assert (await git("rev-parse", f"{snap.commit}^", cwd=directory)).stdout == head_before  # on top of HEAD
    assert (await git("status", "--porcelain", cwd=directory)).stdout == status_before
    assert (await git("rev-parse", "HEAD", cwd=directory)).stdout == head_before
    # Clones and fetches are not shown the appliance's refs.
    listed = (await git("ls-remote", remote(client, alice, "alice", proj["slug"]), cwd=tmp_path)).stdout
    assert "refs/heads/main" in listed and "refs/cml" not in listed
    # What .gitignore leaves out later leaves the next snapshot too (the appliance's index is kept).
    with open(directory / ".gitignore", "a") as fh:
        fh.write("pkg/\n")
    later = await repos.snapshot(directory, "build1b", max_bytes=10 * 1024 * 1024)
    later_files = (await git("ls-tree", "-r", "--name-only", later.commit, cwd=directory)).stdout.splitlines()
    assert not any(f.startswith("pkg/") for f in later_files) and "train.py" in later_files, later_files
    # Too large: refused before anything is written.
    (directory / "huge.bin").write_bytes(b"\0" * (2 * 1024 * 1024))
    try:
        await repos.snapshot(directory, "build2", max_bytes=1024 * 1024)
    except SnapshotTooLarge as exc:
        assert "more than 1 MB" in str(exc)
    else:
        raise AssertionError("a snapshot over the limit was taken")
    assert (await git("show-ref", cwd=directory)).stdout.count("refs/cml/builds/") == 2
