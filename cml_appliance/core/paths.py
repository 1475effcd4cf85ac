"""Where the top-level static/ and config/ folders are, in a checkout or installed."""

from __future__ import annotations

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
_INSTALLED = Path(sys.prefix) / "share" / "cml-appliance"


def _first_existing(name: str) -> Path:
    for base in (_CHECKOUT, _INSTALLED):
        candidate = base / name
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cannot find the {name}/ folder in {_CHECKOUT} or {_INSTALLED}")


def static_dir() -> Path:
    return _first_existing("static")


def config_dir() -> Path:
    return _first_existing("config")
