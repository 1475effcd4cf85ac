"""Reproducible image layers from a build's snapshot.

`git archive` of the snapshot commit (entries under home/cdsw/) is rewritten entry by entry:
sorted names, every mtime 0, owner 8536:8536 (cdsw), modes 0755 for folders and executables and
0644 otherwise, plus the files the build adds (the model's entry point). The layer is that tar
gzip-compressed with a zero timestamp, so the same snapshot always gives the same digest and a
rebuild pushes nothing new. Entries that would escape the layer's root (absolute paths, `..`,
devices) are refused: BadSnapshot.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

OWNER = 8536
PREFIX = "home/cdsw/"
GZIP_LEVEL = 6
COPY_CHUNK = 1024 * 1024


class BadSnapshot(ValueError):
    """The snapshot cannot become a layer; the message says which entry and why."""


@dataclasses.dataclass(frozen=True)
class Layer:
    tar_path: Path  # uncompressed: what local replicas unpack
    blob_path: Path  # gzip: what the registry stores
    diff_id: str  # sha256 of the tar
    digest: str  # sha256 of the gzip
    size: int  # of the gzip
    files: int
    tar_size: int


def _check_name(name: str) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not name.startswith(PREFIX.rstrip("/")):
        raise BadSnapshot(f"the snapshot entry {name!r} would land outside /home/cdsw")
    return name


def _normal(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = OWNER
    info.uname = info.gname = "cdsw"
    info.pax_headers = {}
    if info.isdir():
        info.mode = 0o755
    elif info.isfile():
        info.mode = 0o755 if info.mode & 0o111 else 0o644
    elif info.issym():
        info.mode = 0o777
    return info


def make_layer(archive: Path, work: Path, extra: dict[str, bytes]) -> Layer:
    """The layer of `archive` (a tar with entries under home/cdsw/) plus `extra` files (paths
    relative to /home/cdsw); written to `work`."""
    tar_path, blob_path = work / "layer.tar", work / "layer.tar.gz"
    entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}
    with tarfile.open(archive, "r:") as source:
        for member in source:
            if member.name in ("pax_global_header",) or member.type == tarfile.XGLTYPE:
                continue
            name = _check_name(member.name.rstrip("/"))
            if not (member.isdir() or member.isfile() or member.issym()):
                raise BadSnapshot(f"the snapshot entry {name!r} is neither a file, a folder nor a symbolic link")
            data = source.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            member.name = name
            entries[name] = (_normal(member), data)
    for parent in ("home", "home/cdsw"):
        info = tarfile.TarInfo(parent)
        info.type = tarfile.DIRTYPE
        entries.setdefault(parent, (_normal(info), None))
    for relative, data in extra.items():
        info = tarfile.TarInfo(PREFIX + relative)
        info.size = len(data)
        info.mode = 0o644
        entries[info.name] = (_normal(info), data)
    files = 0
    with open(tar_path, "wb") as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
            for name in sorted(entries):
                info, data = entries[name]
                if info.isfile():
                    files += 1
                    info.size = len(data or b"")
                    out.addfile(info, io.BytesIO(data or b""))
                else:
                    out.addfile(info)
    diff_id = file_digest(tar_path)
    with open(tar_path, "rb") as src, open(blob_path, "wb") as dst:
        with gzip.GzipFile(filename="", mode="wb", fileobj=dst, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            shutil.copyfileobj(src, gz, COPY_CHUNK)
    return Layer(tar_path, blob_path, diff_id, file_digest(blob_path), blob_path.stat().st_size, files,
                 tar_path.stat().st_size)


def make_layer_from_dir(home: Path, work: Path, extra: dict[str, bytes]) -> Layer:
    """The layer of a folder that is /home/cdsw (what a build script left), by way of a tar of it
    made in the same reproducible form as make_layer's."""
    archive = work / "home.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as out:
        for folder, dirs, names in os.walk(home):
            dirs.sort()
            for name in sorted(dirs) + sorted(names):
                path = Path(folder) / name
                if not (path.is_symlink() or path.is_dir() or path.is_file()):
                    raise BadSnapshot(f"{path.relative_to(home)!s} is neither a file, a folder nor a symbolic link")
                out.add(path, arcname=PREFIX + str(path.relative_to(home)), recursive=False)
    return make_layer(archive, work, extra)


def unpack(layer_tar: Path, target: Path, *, keep_links: bool = False) -> None:
    """The /home/cdsw of a layer (or of a snapshot's archive) as a folder, through tarfile's
    `data` filter: nothing is written outside `target`, no device, no setuid bit, no link that
    leads out. Links are left out unless asked for (a local replica needs none; a build script's
    folder keeps the project as it is)."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(layer_tar, "r:") as tar:
        members = []
        for member in tar:
            if not member.name.startswith(PREFIX):
                continue
            member.name = member.name[len(PREFIX):]
            if (member.issym() or member.islnk()) and not keep_links:
                continue
            members.append(member)
        try:
            tar.extractall(target, members=members, filter="data")
        except tarfile.FilterError as exc:
            raise BadSnapshot(f"the snapshot entry {exc.tarinfo.name!r} would land outside /home/cdsw") from None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(COPY_CHUNK):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()
