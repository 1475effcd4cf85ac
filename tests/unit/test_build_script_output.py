"""A build script's output in a container: the container's exit ends the build step even when
the engine's followed log does not end with it (Podman's sometimes does not), and the lines the
follower had not delivered are still shown, once each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cml_appliance.builds.image import BuildSpec, ImageBuilder
from cml_appliance.engines import container as container_engine

SPEC = BuildSpec(build_id="b1", model_id="m", owner="o", project_slug="p", commit="c", runtime_identifier="img:1",
                 file_path="predict.py", function_name="predict", git_url="", git_user="", git_password="")
OUTPUT = ["step one\n", "step two\nstep th", "ree\n", "done"]  # the last line unended


class StuckLogContainer:
    """Exits at once with code 3; its followed log delivers the first two chunks, then hangs."""

    id = "c0ffee"

    def __init__(self) -> None:
        self.deleted = False

    async def start(self) -> None:
        pass

    def log(self, *, stdout: bool, stderr: bool, follow: bool = False) -> Any:
        if not follow:
            return self._all()
        return self._follow()

    async def _all(self) -> list[str]:
        return list(OUTPUT)

    async def _follow(self) -> AsyncIterator[str]:
        for chunk in OUTPUT[:2]:
            yield chunk
        await asyncio.Event().wait()  # never ends, as the engine's stream did

    async def wait(self) -> dict[str, int]:
        return {"StatusCode": 3}

    async def delete(self, force: bool) -> None:
        self.deleted = True


class Containers:
    def __init__(self, container: StuckLogContainer) -> None:
        self.container = container

    async def create(self, config: dict[str, Any], name: str) -> StuckLogContainer:
        return self.container


class Docker:
    def __init__(self, container: StuckLogContainer) -> None:
        self.containers = Containers(container)


async def test_the_exit_ends_the_step_and_the_unfollowed_rest_is_shown(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(container_engine, "LOG_DRAIN_SECONDS", 0.2)
    container = StuckLogContainer()
    builder = ImageBuilder(None, tmp_path, tmp_path, ("entry.py", b""), lambda: Docker(container))  # type: ignore[arg-type]
    lines: list[str] = []
    code = await asyncio.wait_for(builder._run_in_container(SPEC, tmp_path, "/home/cdsw", "true", lines.append), 10)
    assert code == 3
    # "step three" came half followed, half from the unfollowed read: one line all the same.
    assert lines == ["step one", "step two", "step three", "done"]
    assert container.deleted


class WellBehavedContainer(StuckLogContainer):
    """Its followed log ends with it; an unfollowed read would show lines twice."""

    async def _follow(self) -> AsyncIterator[str]:
        for chunk in OUTPUT:
            yield chunk

    async def _all(self) -> list[str]:
        raise AssertionError("the log was read again though its follow ended")


async def test_a_follow_that_ends_is_all_that_is_read(tmp_path: Path) -> None:
    container = WellBehavedContainer()
    builder = ImageBuilder(None, tmp_path, tmp_path, ("entry.py", b""), lambda: Docker(container))  # type: ignore[arg-type]
    lines: list[str] = []
    assert await builder._run_in_container(SPEC, tmp_path, "/home/cdsw", "true", lines.append) == 3
    assert lines == ["step one", "step two", "step three", "done"]
