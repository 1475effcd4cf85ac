#!/usr/bin/env python3
"""Print the project's runtime requirements, one per line (stdlib only).

The Dockerfile installs these in a layer of their own, before the source is copied,
so that a code change does not re-download every dependency. It is only a cache
optimisation: the following `pip install /src` still resolves the real metadata.
Reads [project].dependencies from pyproject.toml and [options] install_requires
from setup.cfg, whichever exist.
"""
import configparser
import sys
import tomllib
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
reqs: list[str] = []

pyproject = root / "pyproject.toml"
if pyproject.is_file():
    with pyproject.open("rb") as f:
        reqs += tomllib.load(f).get("project", {}).get("dependencies", [])

setup_cfg = root / "setup.cfg"
if setup_cfg.is_file():
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(setup_cfg)
    raw = cfg.get("options", "install_requires", fallback="")
    if not raw.strip().startswith("file:"):
        reqs += [line.split("#", 1)[0].strip() for line in raw.splitlines()]

print("\n".join(dict.fromkeys(r for r in reqs if r)))
