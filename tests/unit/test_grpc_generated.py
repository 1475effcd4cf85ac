"""The committed gRPC code is what scripts/generate-grpc.sh makes from the .proto files today."""

from __future__ import annotations

import filecmp
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, require_tool


def test_the_generated_code_matches_the_protos(tmp_path: Path) -> None:
    require_tool(importlib.util.find_spec("grpc_tools") is not None, "grpcio-tools (requirements-test.txt)")
    result = subprocess.run([str(REPO / "scripts" / "generate-grpc.sh")], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OUT": str(tmp_path / "generated"), "PYTHON": sys.executable}, timeout=120)
    assert result.returncode == 0, result.stderr
    committed = REPO / "cml_appliance" / "grpc" / "generated"
    for made in sorted((tmp_path / "generated").rglob("*.py")):
        twin = committed / made.relative_to(tmp_path / "generated")
        assert twin.exists() and filecmp.cmp(made, twin, shallow=False), f"{twin} is stale: run scripts/generate-grpc.sh"
