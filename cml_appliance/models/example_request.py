"""An example request for a model's test box, read from its function's own code.

A model function takes the request's JSON as its one argument. The keys it reads from that
argument (`args["x"]`, `args.get("x", 3)`) make the example: a default given to `.get` is used as
the key's value, other keys get 0. A function whose argument is not read by key gets `{}`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

MAX_SOURCE_BYTES = 1024 * 1024


def from_source(source: bytes, function_name: str) -> str | None:
    """The example as pretty JSON, or None when the function cannot be found or read."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    function = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                     and n.name == function_name), None)
    if function is None or not function.args.args:
        return None
    argument = function.args.args[0].arg
    example: dict[str, Any] = {}
    for node in ast.walk(function):
        key, value = _read_key(node, argument)
        if key is not None and key not in example:
            example[key] = value
    return json.dumps(example, indent=2)


def _read_key(node: ast.AST, argument: str) -> tuple[str | None, Any]:
    if isinstance(node, ast.Subscript) and _is_name(node.value, argument):
        if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
            return node.slice.value, 0
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and _is_name(node.func.value, argument) and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        default: Any = 0
        if len(node.args) > 1:
            try:
                default = ast.literal_eval(node.args[1])
                json.dumps(default)
            except (ValueError, TypeError, SyntaxError):
                default = 0
        return node.args[0].value, default
    return None, None


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def for_build(build_dir: Path, file_path: str, function_name: str) -> str | None:
    try:
        with open(build_dir / file_path, "rb") as fh:
            source = fh.read(MAX_SOURCE_BYTES)
    except OSError:
        return None
    return from_source(source, function_name)
