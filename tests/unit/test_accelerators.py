"""Accelerators when the cluster cannot be read: a clear 503, never a 500; and node quantities
read as Kubernetes writes them."""

from __future__ import annotations

import pytest

from cml_appliance.core.errors import Unavailable
from cml_appliance.engines.base import EngineUnavailable
from cml_appliance.engines.kubernetes.objects import parse_quantity
from cml_appliance.quotas.accelerators import Accelerators


class _Unreachable:
    async def node_resources(self) -> list[dict[str, object]]:
        raise EngineUnavailable("connection refused")


async def test_unreadable_nodes_are_a_503_that_says_why() -> None:
    accelerators = Accelerators(None, {"kubernetes": _Unreachable()})  # type: ignore[arg-type]
    with pytest.raises(Unavailable, match="cannot be read now: connection refused"):
        await accelerators._nodes()
    assert await Accelerators(None, {"local": object()})._nodes() == []  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "value"), [("2", 2), ("1500m", 1.5), ("8Gi", 8 * 2**30), ("24683784Ki", 24683784 * 1024),
                                             ("4k", 4000), ("", 0), ("lots", 0)])
def test_quantities(text: str, value: float) -> None:
    assert parse_quantity(text) == value
