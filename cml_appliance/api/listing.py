"""CML list conventions: page_size / page_token / next_page_token, search_filter (JSON, substring
match) and sort ("-updated_at,+name").

Page tokens are signed and bound to the query they came from, so a forged or reused token is a 400.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cml_appliance.api.bodies import check_text
from cml_appliance.core.errors import InvalidArgument
from cml_appliance.core.security import sign

# CML's creator.* filter and sort keys, for lists whose SQL joins the creator as `u`.
CREATOR_KEYS = {"creator.username": "u.username", "creator.name": "u.name", "creator.email": "u.email"}

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class ListQuery:
    page_size: int
    offset: int
    filters: dict[str, str]
    sort: list[tuple[str, bool]]  # (key, descending)
    fingerprint: str

    @classmethod
    def first(cls, count: int) -> ListQuery:
        """The first `count` items in the default order, unfiltered (for pages of the UI)."""
        return cls(count, 0, {}, [], "")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def parse_list_query(
    query: Mapping[str, str],
    *,
    secret: str,
    scope: str,
    filter_keys: Mapping[str, str],
    sort_keys: Mapping[str, str],
) -> ListQuery:
    """Parse and check the list parameters; `scope` names the listing (a path) the token is bound to."""
    raw_size = query.get("page_size", "")
    if raw_size in ("", "0"):
        page_size = DEFAULT_PAGE_SIZE
    else:
        try:
            page_size = int(raw_size)
        except ValueError:
            raise InvalidArgument(f"page_size must be a whole number, got {raw_size!r}") from None
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size must be between 1 and {MAX_PAGE_SIZE}")

    filters: dict[str, str] = {}
    raw_filter = query.get("search_filter", "")
    if raw_filter:
        try:
            parsed = json.loads(raw_filter)
        except (json.JSONDecodeError, RecursionError):
            raise InvalidArgument('search_filter must be a JSON object such as {"name":"demo"}') from None
        if not isinstance(parsed, dict):
            raise InvalidArgument('search_filter must be a JSON object such as {"name":"demo"}')
        for key, value in parsed.items():
            if key not in filter_keys:
                raise InvalidArgument(
                    f"search_filter key {key!r} is not supported; use one of: {', '.join(filter_keys)}"
                )
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InvalidArgument(f"search_filter value for {key!r} must be a string")
            filters[key] = check_text(str(value), f"search_filter value for {key!r}")

    sort: list[tuple[str, bool]] = []
    for part in query.get("sort", "").split(","):
        # A literal "+" in a query string decodes to a space: treat a leading space as "+".
        part = part.strip()
        if not part:
            continue
        descending = part.startswith("-")
        key = part.lstrip("+-").strip()
        if key not in sort_keys:
            raise InvalidArgument(f"sort key {key!r} is not supported; use one of: {', '.join(sort_keys)}")
        sort.append((key, descending))

    fingerprint = hashlib.sha256(
        json.dumps([scope, page_size, sorted(filters.items()), sort]).encode()
    ).hexdigest()[:16]
    offset = 0
    token = query.get("page_token", "")
    if token:
        offset = _decode_token(token, secret, fingerprint)
    return ListQuery(page_size, offset, filters, sort, fingerprint)


def next_page_token(q: ListQuery, secret: str, has_more: bool) -> str:
    if not has_more:
        return ""
    payload = base64.urlsafe_b64encode(json.dumps({"o": q.offset + q.page_size, "f": q.fingerprint}).encode())
    text = payload.decode().rstrip("=")
    return f"{text}.{_token_signature(secret, text)}"


def _decode_token(token: str, secret: str, fingerprint: str) -> int:
    invalid = InvalidArgument(
        "page_token is not valid for this query: repeat the same page_size, search_filter and sort "
        "with the next_page_token of the previous page"
    )
    text, _, signature = token.partition(".")
    if not hmac.compare_digest(_token_signature(secret, text), signature):
        raise invalid
    try:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        offset = int(data["o"])
    except (ValueError, KeyError, TypeError):
        raise invalid from None
    if data.get("f") != fingerprint or offset < 0:
        raise invalid
    return offset


def _token_signature(secret: str, text: str) -> str:
    return sign(secret, "page-token:" + text)[:32]


def sql_where_and_order(
    q: ListQuery,
    filter_keys: Mapping[str, str],
    sort_keys: Mapping[str, str],
    default_sort: str,
    args: list[Any],
) -> tuple[str, str]:
    """SQL fragments for the filters (ANDed, case-insensitive substring) and the ORDER BY.

    Appends parameters to `args` and numbers placeholders after those already there.
    """
    conditions = []
    for key, value in q.filters.items():
        args.append(f"%{_escape_like(value)}%")
        conditions.append(f"{filter_keys[key]}::text ILIKE ${len(args)}")
    where = " AND ".join(conditions) if conditions else "TRUE"
    order = ", ".join(f"{sort_keys[k]} {'DESC' if d else 'ASC'}" for k, d in q.sort)
    order = f"{order}, {default_sort}" if order else default_sort
    return where, order


async def fetch_listing(
    conn: Any,
    table: str,
    q: ListQuery,
    filter_keys: Mapping[str, str],
    sort_keys: Mapping[str, str],
    default_sort: str,
) -> tuple[list[Any], bool]:
    """One page of `table`'s rows, filtered and sorted as `q` asks: (rows, whether more follow)."""
    args: list[Any] = []
    where, order = sql_where_and_order(q, filter_keys, sort_keys, default_sort, args)
    args += [q.page_size + 1, q.offset]
    rows = await conn.fetch(f"SELECT * FROM {table} WHERE {where} ORDER BY {order}"
                            f" LIMIT ${len(args) - 1} OFFSET ${len(args)}", *args)
    return list(rows[: q.page_size]), len(rows) > q.page_size
