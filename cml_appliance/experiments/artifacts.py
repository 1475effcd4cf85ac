"""Where experiment artifacts live: data_dir/artifacts/<project>/<experiment>/…, addressed as
MLflow addresses them (`mlflow-artifacts:/<experiment>/<run id>/artifacts/<path>` for a run,
`mlflow-artifacts:/<experiment>/models/<model id>/artifacts/<path>` for a logged model).

A registered model version's files are read (never written) here too, as
`mlflow-artifacts:/registered-models/<model id>/<version>/…` (registry.py keeps them), by anyone
who may read that registered model, through any project's URL.

A path is checked before it touches the disk: its experiment must be one of the project's, its
second part a run of that experiment (or `models/<a logged model of it>`), and nothing may climb
out (projects/files.py's rules: no '..', no absolute paths, no symlinks out).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

from cml_appliance.auth.permissions import Role
from cml_appliance.auth.users import User
from cml_appliance.core.errors import InvalidArgument, NotFound
from cml_appliance.experiments.registry import ARTIFACT_PREFIX, ModelRegistry
from cml_appliance.experiments.service import TrackingService
from cml_appliance.projects import files


class ArtifactStore:
    def __init__(self, tracking: TrackingService, registry: ModelRegistry, max_bytes: int):
        self.tracking = tracking
        self.registry = registry
        self.max_bytes = max_bytes

    async def locate(self, user: User, project_id: str, path: str, needed: Role = Role.READ) -> tuple[Path, str]:
        """(the project's artifact root, the clean path below it) for an artifact path, after the
        checks above; raises NotFound for an experiment, run or model that is not this project's."""
        clean = files.clean_relative(path)
        parts = PurePosixPath(clean).parts
        if not parts:
            raise InvalidArgument("an artifact path starts with an experiment id")
        if parts[0] == ARTIFACT_PREFIX:
            if needed > Role.READ:
                raise InvalidArgument("a registered model version's files cannot be changed: register a new version")
            if len(parts) < 2:
                raise InvalidArgument("name a registered model: registered-models/<model id>/<version>/…")
            model = await self.registry.model(user, parts[1], by="id")
            return self.registry.storage, PurePosixPath(model.public_id, *parts[2:]).as_posix()
        project, experiment = await self.tracking.experiment(user, project_id, parts[0], needed)
        if len(parts) > 1:
            if parts[1] == "models":
                if len(parts) < 3:
                    return self.tracking.artifact_root(project), clean
                model = await self.tracking.logged_model(user, project_id, parts[2], needed)
                if model.experiment_id != experiment.id:
                    raise NotFound(f"logged model {parts[2]!r} not found in experiment {parts[0]!r}")
            else:
                run = await self.tracking.run(user, project_id, parts[1], needed)
                if run.experiment_id != experiment.id:
                    raise NotFound(f"run {parts[1]!r} not found in experiment {parts[0]!r}")
        return self.tracking.artifact_root(project), clean

    async def write(self, user: User, project_id: str, path: str, chunks: AsyncIterator[bytes]) -> None:
        root, clean = await self.locate(user, project_id, path, Role.WRITE)
        if len(PurePosixPath(clean).parts) < 3:
            raise InvalidArgument("artifacts are stored under <experiment>/<run id>/artifacts/…")
        root.mkdir(parents=True, exist_ok=True)
        await files.write_upload(root, clean, chunks, self.max_bytes)

    async def file(self, user: User, project_id: str, path: str) -> Path:
        root, clean = await self.locate(user, project_id, path)
        if not root.exists():
            raise NotFound(f"artifact {clean!r} not found")
        target = files.resolve(root, clean)
        if target.is_dir():
            raise InvalidArgument(f"{clean!r} is a directory: list it instead")
        return target

    async def listing(self, user: User, project_id: str, path: str) -> list[dict[str, Any]]:
        """MLflow's FileInfo list for a directory: names relative to it; nothing for a missing one."""
        root, clean = await self.locate(user, project_id, path)
        if not root.exists():
            return []
        try:
            entries = files.list_dir(root, clean)
        except NotFound:
            return []
        out = []
        for entry in entries:
            name = PurePosixPath(entry["path"]).relative_to(clean).as_posix() if clean and entry["path"] != clean \
                else PurePosixPath(entry["path"]).name
            item: dict[str, Any] = {"path": name, "is_dir": entry["is_dir"]}
            if not entry["is_dir"]:
                item["file_size"] = int(entry["file_size"])
            out.append(item)
        return out

    async def delete(self, user: User, project_id: str, path: str) -> None:
        root, clean = await self.locate(user, project_id, path, Role.WRITE)
        if len(PurePosixPath(clean).parts) < 3:
            raise InvalidArgument("only artifacts under <experiment>/<run id>/artifacts/… can be deleted")
        target = files.resolve(root, clean)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            os.unlink(target)
