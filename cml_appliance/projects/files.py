"""A project's files, confined to the project directory.

Paths come from users: absolute paths, `..`, NUL bytes and symlinks that lead out of the
project are refused. Uploads go to a temporary file and are renamed into place, so a failed or
oversized upload leaves nothing half-written.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from cml_appliance.core import ownership
from cml_appliance.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
    StorageFull,
)


# What Linux file systems take: a name of 255 bytes, a path of 4096.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4000
# Beside the project directories (their public ids never start with a dot).
UPLOADS_DIR = ".uploads"


def clean_relative(path: str) -> str:
    """Normalise a user-supplied relative path ('' is the project root); refuse escapes."""
    if "\x00" in path:
        raise InvalidArgument("file path must not contain NUL bytes")
    if path.startswith("/") or path.startswith("\\"):
        raise InvalidArgument(f"file path {path!r} must be relative to the project root")
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"file path {path!r} must not contain '..'")
    for part in parts:
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument("file path must be valid Unicode (it contains a lone surrogate)") from None
        if size > MAX_NAME_BYTES:
            raise InvalidArgument(f"a file or folder name may be at most {MAX_NAME_BYTES} bytes; {part[:40]!r}… has {size}")
    joined = "/".join(parts)
    if len(joined.encode("utf-8")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"file path must be at most {MAX_PATH_BYTES} bytes")
    return joined


def resolve(root: Path, path: str, *, must_exist: bool = True) -> Path:
    """The absolute path for a project path, after following symlinks, checked to stay inside root."""
    rel = clean_relative(path)
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / rel))
    if target != root_real and not target.is_relative_to(root_real):
        raise InvalidArgument(f"file path {path!r} leads outside the project")
    if must_exist and not target.exists():
        raise NotFound(f"file {rel or '/'!r} not found")
    return target


def _info(root: Path, target: Path) -> dict[str, Any]:
    rel = target.relative_to(root).as_posix()
    if target.is_dir():
        return {"path": rel, "is_dir": True}
    return {"path": rel, "is_dir": False, "file_size": str(target.stat().st_size)}


def file_info(root: Path, path: str) -> dict[str, Any]:
    root_real = Path(os.path.realpath(root))
    return _info(root_real, resolve(root_real, path))


def list_dir(root: Path, path: str) -> list[dict[str, Any]]:
    """CML FileInfo for each entry of a directory (or the file itself), paths relative to the root."""
    root_real = Path(os.path.realpath(root))
    target = resolve(root_real, path)
    if not target.is_dir():
        return [_info(root_real, target)]
    out = []
    for entry in sorted(target.iterdir(), key=lambda p: (not p.is_dir(), p.name)):
        if entry.name == ".git" and target == root_real:
            continue  # the project's repository (gitserver/): git's business, not a folder of files
        real = Path(os.path.realpath(entry))
        if real != root_real and not real.is_relative_to(root_real):
            continue  # a symlink out of the project is not shown
        rel = (target / entry.name).relative_to(root_real).as_posix()
        if real.is_dir():
            out.append({"path": rel, "is_dir": True})
        elif real.exists():
            out.append({"path": rel, "is_dir": False, "file_size": str(real.stat().st_size)})
    return out


def _check_folders_above(root_real: Path, target: Path) -> None:
    """Every existing folder on the way to `target` must be a folder, not a file."""
    for ancestor in reversed(target.relative_to(root_real).parents):
        here = root_real / ancestor
        if here.exists() and not here.is_dir():
            raise InvalidArgument(f"{ancestor.as_posix()!r} is a file, not a folder")


def free_name(target: Path) -> Path:
    """CML's upload naming when overwriting is off: name.ext, then name(1).ext, name(2).ext..."""
    if not target.exists():
        return target
    stem, suffix = target.stem, target.suffix
    n = 1
    while (candidate := target.with_name(f"{stem}({n}){suffix}")).exists():
        n += 1
    return candidate


async def write_upload(
    root: Path, path: str, chunks: AsyncIterator[bytes], max_bytes: int, *, overwrite: bool = True
) -> dict[str, Any]:
    """Stream an upload into place atomically; returns its FileInfo."""
    rel = clean_relative(path)
    if not rel:
        raise InvalidArgument("upload needs a file name: the form field name is the destination path")
    root_real = Path(os.path.realpath(root))
    target = resolve(root_real, rel, must_exist=False)
    if target.is_dir():
        raise AlreadyExists(f"{rel!r} is a directory")
    parent = target.parent
    # The parent must itself stay inside the project once created (no symlinked parents).
    resolve(root_real, str(parent.relative_to(root_real)), must_exist=False)
    _check_folders_above(root_real, target)
    parent.mkdir(parents=True, exist_ok=True)
    # The upload is written beside the projects, not inside one: a process killed mid-upload
    # leaves nothing in the project's tree (the next start sweeps UPLOADS_DIR).
    staging = root_real.parent / UPLOADS_DIR
    staging.mkdir(exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix="upload-", dir=staging)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload is larger than the limit of {max_bytes // (1024 * 1024)} MB")
                fh.write(chunk)
        final = target if overwrite else free_name(target)
        ownership.give(tmp_name)
        os.replace(tmp_name, final)
        ownership.give_path(root_real, final.parent)
    except OSError as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageFull(f"the appliance's data disk is full: {rel!r} was not stored (the files already there are unharmed)") from None
        raise
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return _info(root_real, final)


def move(root: Path, path: str, new_path: str) -> dict[str, Any]:
    root_real = Path(os.path.realpath(root))
    source = resolve(root_real, path)
    if source == root_real:
        raise InvalidArgument("the project root cannot be moved")
    rel_new = clean_relative(new_path)
    if not rel_new:
        raise InvalidArgument("path must name the new location")
    dest = resolve(root_real, rel_new, must_exist=False)
    if dest.exists():
        raise AlreadyExists(f"{rel_new!r} already exists")
    if dest.is_relative_to(source):
        raise InvalidArgument("a directory cannot be moved into itself")
    _check_folders_above(root_real, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    ownership.give_path(root_real, dest.parent)
    os.rename(source, dest)
    return _info(root_real, dest)


def make_dir(root: Path, path: str) -> dict[str, Any]:
    root_real = Path(os.path.realpath(root))
    target = resolve(root_real, path, must_exist=False)
    if target.exists():
        raise AlreadyExists(f"{clean_relative(path)!r} already exists")
    _check_folders_above(root_real, target)
    target.mkdir(parents=True)
    ownership.give_path(root_real, target)
    return _info(root_real, target)


def delete(root: Path, path: str) -> None:
    root_real = Path(os.path.realpath(root))
    rel = clean_relative(path)
    if not rel:
        raise InvalidArgument("the project root cannot be deleted; delete the project instead")
    # A symlink is removed itself, never followed.
    link = root_real / rel
    if link.is_symlink():
        resolve(root_real, str(PurePosixPath(rel).parent))
        link.unlink()
        return
    target = resolve(root_real, rel)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()

