"""Who owns a project's files.

Workloads run as uid 8536 (CML's `cdsw`): in containers, and, when the appliance runs as root, in
the local sandbox too (engines/sandbox.py switches to the real uid 8536). For both to write what
the other made, and git to accept the repository as the user's own, everything in a project
belongs to 8536 then: the appliance gives what it writes (uploads, folders, clones) away, and
engines give the whole tree before a workload starts, in case something slipped through. As an
ordinary user the appliance's own uid is the workloads' too (a user namespace maps 8536 to it),
and nothing here does anything.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKLOAD_UID = 8536


def giving() -> bool:
    return os.geteuid() == 0


def give(path: Path | str) -> None:
    """Give one file or folder to the workloads' uid (when the appliance is root)."""
    if giving():
        os.lchown(path, WORKLOAD_UID, WORKLOAD_UID)


def give_tree(root: Path | str) -> None:
    """Give a folder and everything in it, touching only what is not theirs already."""
    if not giving():
        return
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            try:
                if os.lstat(name).st_uid != WORKLOAD_UID:
                    os.lchown(name, WORKLOAD_UID, WORKLOAD_UID)
            except FileNotFoundError:
                continue  # removed meanwhile


def give_path(root: Path, target: Path) -> None:
    """Give `target` and the folders between it and `root` (which a write may just have made)."""
    if not giving():
        return
    here = target
    while True:
        try:
            if os.lstat(here).st_uid != WORKLOAD_UID:
                os.lchown(here, WORKLOAD_UID, WORKLOAD_UID)
        except FileNotFoundError:
            pass
        if here == root or root not in here.parents:
            return
        here = here.parent
