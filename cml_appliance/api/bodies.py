"""Reading and checking JSON request bodies: objects only, known fields only, right types."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import MultipartReader, web

from cml_appliance.core.errors import InvalidArgument, PayloadTooLarge

# Field kinds a body spec may name.
STR, INT, INT64, FLOAT, BOOL = "string", "integer", "int64", "number", "boolean"
STR_MAP, STR_LIST, OBJECT, ANY = "map of strings", "list of strings", "object", "any"


async def read_json_object(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object ({} when empty); 400/413 with a clear message otherwise."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    # read(n) answers with what has arrived so far: read until the end (or just past the limit).
    chunks: list[bytes] = []
    size = 0
    try:
        while size <= max_bytes and (chunk := await request.content.read(max_bytes + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    except ValueError:
        raise InvalidArgument("request body could not be read") from None
    raw = b"".join(chunks)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body is larger than the limit of {max_bytes} bytes")
    if not raw.strip():
        return {}
    return parse_json_object(raw)


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """A JSON object that Postgres and our answers can hold: no NaN or Infinity (not JSON), no
    nesting past MAX_JSON_DEPTH, no NUL or lone surrogate in any string."""
    try:
        body = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidArgument(f"request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    check_json_values(body)
    return body


MAX_JSON_DEPTH = 64


def _refuse_constant(name: str) -> Any:
    raise InvalidArgument(f"request body is not valid JSON: {name} is not a JSON number")


def check_json_values(value: Any) -> None:
    """Walk a parsed JSON value (iteratively: depth is bounded here, not by the stack)."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidArgument(f"request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                check_text(key)
                pending.append((inner, depth + 1))
        elif isinstance(item, list):
            pending.extend((inner, depth + 1) for inner in item)


def check_text(text: str, what: str = "text") -> str:
    """Refuse what Postgres cannot store in text (NUL) and what UTF-8 cannot encode (lone surrogates)."""
    if "\x00" in text:
        raise InvalidArgument(f"{what} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} must be valid Unicode (it contains a lone surrogate)") from None
    return text


def _type_ok(kind: str, value: Any) -> tuple[bool, Any]:
    if kind == ANY:
        return True, value
    if kind == STR:
        return isinstance(value, str), value
    if kind == BOOL:
        return isinstance(value, bool), value
    if kind == INT:  # int32, as Postgres integer columns hold
        return isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31, value
    if kind == INT64:  # proto3 JSON: int64 may come as a number or a decimal string
        if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value.strip()) < 21:
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
        return ok, value
    if kind == FLOAT:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, float(value) if ok else value
    if kind == STR_MAP:
        ok = isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
        return ok, value
    if kind == STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value), value
    if kind == OBJECT:
        return isinstance(value, dict), value
    raise AssertionError(kind)


def check_body(body: Mapping[str, Any], spec: Mapping[str, str], ignored: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Return the known fields of body, converted; unknown fields or wrong types are a 400.

    `ignored` names output-only fields a client may echo back (they are dropped, not refused).
    Null counts as absent, as in proto3 JSON.
    """
    unknown = sorted(k for k in body if k not in spec and k not in ignored)
    if unknown:
        raise InvalidArgument(f"unknown field(s): {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, kind in spec.items():
        if key not in body or body[key] is None:
            continue
        ok, value = _type_ok(kind, body[key])
        if not ok:
            raise InvalidArgument(f"field {key!r} must be a {kind}, got {json.dumps(body[key])[:80]}")
        out[key] = value
    return out


async def open_multipart(request: web.Request) -> MultipartReader:
    """The request's multipart reader; a form without a boundary is a 400, not aiohttp's ValueError."""
    if not request.content_type.startswith("multipart/"):
        raise InvalidArgument(f"the upload must be multipart/form-data, not {request.content_type or 'no content type'}")
    try:
        return await request.multipart()
    except ValueError as exc:
        raise InvalidArgument(f"the upload must be multipart/form-data with a boundary: {exc}") from None
