"""A project's files, confined to the project directory.

Paths come from users: absolute paths, `..`, NUL bytes and symlinks that lead out of the
project are refused. Uploads go to a temporary file and are renamed into place, so a failed or
oversized upload leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from cml_appliance.core.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PayloadTooLarge,
)


def clean_relative(path: str) -> str:
    """Normalise a user-supplied relative path ('' is the project root); refuse escapes."""
    if "\x00" in path:
        raise InvalidArgument("file path must not contain NUL bytes")
    if path.startswith("/") or path.startswith("\\"):
        raise InvalidArgument(f"file path {path!r} must be relative to the project root")
    parts = [p for p in PurePosixPath(path.replace("\\", "/")).parts if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise InvalidArgument(f"file path {path!r} must not contain '..'")
    return "/".join(parts)


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
        real = Path(os.path.realpath(entry))
        if real != root_real and not real.is_relative_to(root_real):
            continue  # a symlink out of the project is not shown
        rel = (target / entry.name).relative_to(root_real).as_posix()
        if real.is_dir():
            out.append({"path": rel, "is_dir": True})
        elif real.exists():
            out.append({"path": rel, "is_dir": False, "file_size": str(real.stat().st_size)})
    return out


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
    if parent.exists() and not parent.is_dir():
        raise InvalidArgument(f"{parent.relative_to(root_real).as_posix()!r} is a file, not a directory")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=parent)
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise PayloadTooLarge(f"upload is larger than the limit of {max_bytes // (1024 * 1024)} MB")
                fh.write(chunk)
        final = target if overwrite else free_name(target)
        os.replace(tmp_name, final)
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, dest)
    return _info(root_real, dest)


def make_dir(root: Path, path: str) -> dict[str, Any]:
    root_real = Path(os.path.realpath(root))
    target = resolve(root_real, path, must_exist=False)
    if target.exists():
        raise AlreadyExists(f"{clean_relative(path)!r} already exists")
    target.mkdir(parents=True)
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
