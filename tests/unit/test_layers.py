"""Image layers from snapshots: reproducible whatever the source's times and owners, and never a
path outside /home/cdsw (an entry that would escape is refused, as is a link that leads out)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cml_appliance.builds.layers import BadSnapshot, make_layer, unpack


def archive(path: Path, entries: list[tuple[str, bytes | None, dict[str, object]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data, attrs in entries:
            info = tarfile.TarInfo(name)
            for key, value in attrs.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def test_the_same_files_make_the_same_layer_whatever_their_times_and_owners(tmp_path: Path) -> None:
    files = [("home/cdsw/b.py", b"b", {}), ("home/cdsw/a.py", b"a", {"mode": 0o755})]
    first = archive(tmp_path / "one.tar", [(n, d, {**a, "mtime": 1_700_000_000, "uid": 0}) for n, d, a in files])
    second = archive(tmp_path / "two.tar", [(n, d, {**a, "mtime": 5, "uid": 1234, "uname": "x"}) for n, d, a in reversed(files)])
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    one = make_layer(first, tmp_path / "w1", {".entry.py": b"entry"})
    two = make_layer(second, tmp_path / "w2", {".entry.py": b"entry"})
    assert (one.digest, one.diff_id) == (two.digest, two.diff_id)
    with tarfile.open(one.tar_path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid) for m in members} == {(0, 8536, 8536)}
    assert {m.name: m.mode for m in members if m.isfile()} == {"home/cdsw/.entry.py": 0o644, "home/cdsw/a.py": 0o755,
                                                               "home/cdsw/b.py": 0o644}
    (tmp_path / "w3").mkdir()
    changed = archive(tmp_path / "three.tar", [("home/cdsw/b.py", b"B", {}), ("home/cdsw/a.py", b"a", {"mode": 0o755})])
    assert make_layer(changed, tmp_path / "w3", {".entry.py": b"entry"}).digest != one.digest


@pytest.mark.parametrize("entry", [
    ("home/cdsw/../../etc/passwd", b"x", {}),
    ("/etc/passwd", b"x", {}),
    ("etc/shadow", b"x", {}),
    ("home/cdsw/dev", None, {"type": tarfile.CHRTYPE, "devmajor": 1, "devminor": 3}),
])
def test_an_entry_that_would_leave_home_cdsw_is_refused(tmp_path: Path, entry: tuple[str, bytes | None, dict[str, object]]) -> None:
    bad = archive(tmp_path / "bad.tar", [("home/cdsw/ok.py", b"ok", {}), entry])
    with pytest.raises(BadSnapshot):
        make_layer(bad, tmp_path, {})


def test_unpacking_never_writes_outside_its_folder(tmp_path: Path) -> None:
    target = tmp_path / "home"
    outside = archive(tmp_path / "link.tar", [
        ("home/cdsw/ok.py", b"ok", {}),
        ("home/cdsw/escape", None, {"type": tarfile.SYMTYPE, "linkname": "/etc"}),
        ("home/cdsw/escape/evil", b"x", {}),
    ])
    with pytest.raises(BadSnapshot):
        unpack(outside, target, keep_links=True)
    assert not Path("/etc/evil").exists()
    # Links are left out where none are wanted (a local replica's folder).
    unpack(outside, tmp_path / "replica")
    assert (tmp_path / "replica" / "ok.py").read_bytes() == b"ok" and not (tmp_path / "replica" / "escape").is_symlink()
