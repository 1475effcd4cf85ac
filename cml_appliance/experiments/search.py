"""MLflow's search syntax for runs, turned into SQL over experiment_runs.

    metrics.rmse < 0.8 and params.model = 'tree' and tags.`mlflow.runName` LIKE 'big%'
    attributes.status IN ('FINISHED', 'FAILED')

Clauses are joined with AND (as in MLflow: there is no OR). An entity is metrics/metric,
params/param/parameters, tags/tag, or attributes/attribute/attr/run (a bare name is an
attribute); a key may be quoted with backticks or double quotes. Metrics compare as numbers
(their latest value); params and tags as strings (=, !=, LIKE, ILIKE, IN, NOT IN); attributes
by their type. Every value becomes a bound parameter, never SQL text. A bad filter raises
ValueError with what is wrong, which the APIs answer as INVALID_PARAMETER_VALUE.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cml_appliance.core.errors import InvalidArgument

_ENTITY = {
    "metrics": "metric", "metric": "metric",
    "params": "param", "param": "param", "parameters": "param", "parameter": "param",
    "tags": "tag", "tag": "tag",
    "attributes": "attribute", "attribute": "attribute", "attr": "attribute", "run": "attribute",
}


@dataclass(frozen=True)
class Columns:
    """What a search runs over: attribute name -> (SQL expression, "string" or "number"), and the
    jsonb columns of params, tags and latest metrics (empty where the entity has none)."""

    attributes: dict[str, tuple[str, str]]
    params: str = ""
    tags: str = ""
    metrics: str = ""


RUNS = Columns(
    attributes={
        "run_id": ("r.run_id", "string"), "run_uuid": ("r.run_id", "string"), "id": ("r.run_id", "string"),
        "run_name": ("r.run_name", "string"), "status": ("r.status", "string"),
        "user_id": ("u.username", "string"), "user_name": ("u.name", "string"), "user_email": ("u.email", "string"),
        "start_time": ("r.start_time", "number"),
        "end_time": ("r.end_time", "number"), "created": ("r.start_time", "number"),
        "lifecycle_stage": ("r.lifecycle_stage", "string"),
    },
    params="r.params", tags="r.tags", metrics="r.latest_metrics",
)
EXPERIMENTS = Columns(
    attributes={
        "name": ("e.name", "string"), "experiment_id": ("e.public_id", "string"),
        "creation_time": ("(extract(epoch FROM e.created_at) * 1000)::bigint", "number"),
        "last_update_time": ("(extract(epoch FROM e.updated_at) * 1000)::bigint", "number"),
        "lifecycle_stage": ("e.lifecycle_stage", "string"),
        "user_id": ("u.username", "string"), "user_name": ("u.name", "string"), "user_email": ("u.email", "string"),
    },
    tags="e.tags",
)
LOGGED_MODELS = Columns(
    attributes={
        "name": ("m.name", "string"), "model_id": ("m.model_id", "string"), "model_type": ("m.model_type", "string"),
        "status": ("m.status", "string"), "source_run_id": ("m.source_run_id", "string"),
        "creation_timestamp": ("m.creation_timestamp", "number"),
        "creation_time": ("m.creation_timestamp", "number"),
        "last_updated_timestamp": ("m.last_updated_timestamp", "number"),
    },
    params="m.params", tags="m.tags",
)
_NUMBER_OPS = ("=", "!=", ">", ">=", "<", "<=")
_STRING_OPS = ("=", "!=", "LIKE", "ILIKE", "IN", "NOT IN")
_TOKEN = re.compile(r"""
    \s*(?:
      (?P<lparen>\() | (?P<rparen>\)) | (?P<comma>,)
    | (?P<op>!=|>=|<=|=|>|<)
    | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<backtick>`[^`]*`)
    | (?P<number>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<word>[A-Za-z_][A-Za-z0-9_.\-]*)
    )""", re.VERBOSE)


@dataclass
class Query:
    """A WHERE clause (without the WHERE) and an ORDER BY list, with their parameters."""

    where: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def bind(self, value: Any) -> str:
        self.args.append(value)
        return f"${self.arg_offset + len(self.args)}"

    arg_offset: int = 0


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            raise ValueError(f"cannot read the filter at {text[pos:pos + 20]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        pos = match.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def _unquote(kind: str, value: str) -> str:
    if kind == "backtick":
        return value[1:-1]
    if kind == "string":
        body = value[1:-1]
        return re.sub(r"\\(.)", r"\1", body)
    return value


def _identifier(tokens: list[tuple[str, str]], i: int) -> tuple[str, str, int]:
    """(entity, key, next index) of `entity.key`, `entity.\\`key\\``, `entity."key"` or a bare attribute."""
    kind, value = tokens[i]
    if kind == "word" and "." in value:
        prefix, _, rest = value.partition(".")
        entity = _ENTITY.get(prefix.lower())
        if entity is None:
            raise ValueError(f"{prefix!r} is not metrics, params, tags or attributes")
        if rest:
            return entity, rest, i + 1
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if nxt[0] in ("backtick", "string"):
            return entity, _unquote(*nxt), i + 2
        raise ValueError(f"{value!r} names no key")
    if kind in ("word", "backtick"):
        return "attribute", _unquote(kind, value), i + 1
    raise ValueError(f"expected a name such as metrics.rmse, got {value!r}")


def _value(tokens: list[tuple[str, str]], i: int) -> tuple[Any, str, int]:
    kind, value = tokens[i]
    if kind == "string":
        return _unquote(kind, value), "string", i + 1
    if kind == "number":
        return float(value), "number", i + 1
    raise ValueError(f"expected a value (a quoted string or a number), got {value!r}")


def _column(columns: Columns, entity: str) -> str:
    column = {"metric": columns.metrics, "param": columns.params, "tag": columns.tags}[entity]
    if not column:
        raise ValueError(f"there are no {entity}s to search here")
    return column


def _comparison(columns: Columns, q: Query, entity: str, key: str, op: str, value: Any, value_kind: str) -> str:
    if entity != "attribute":
        column = _column(columns, entity)
    if entity == "metric":
        if op not in _NUMBER_OPS or value_kind != "number":
            raise ValueError(f"metrics.{key} compares with a number using one of {', '.join(_NUMBER_OPS)}")
        return f"({column} -> {q.bind(key)} ->> 'value')::double precision {op} {q.bind(value)}"
    if entity in ("param", "tag"):
        if value_kind != "string" and op not in ("IN", "NOT IN"):
            raise ValueError(f"{entity}s.{key} compares with a quoted string")
        left = f"({column} ->> {q.bind(key)})"
    else:
        if key not in columns.attributes:
            raise ValueError(f"unknown attribute {key!r}: use one of {', '.join(sorted(columns.attributes))}")
        expression, kind = columns.attributes[key]
        if kind == "number":
            if op not in _NUMBER_OPS or value_kind != "number":
                raise ValueError(f"attributes.{key} compares with a number (milliseconds)")
            return f"{expression} {op} {q.bind(int(value))}"
        left = f"{expression}::text"
    if op not in _STRING_OPS:
        raise ValueError(f"{key!r} compares with one of {', '.join(_STRING_OPS)}")
    if op in ("IN", "NOT IN"):
        return f"{'NOT ' if op == 'NOT IN' else ''}coalesce({left} = ANY({q.bind([str(v) for v in value])}::text[]), false)"
    if op == "LIKE":
        return f"{left} LIKE {q.bind(value)}"
    if op == "ILIKE":
        return f"{left} ILIKE {q.bind(value)}"
    if op == "!=":
        return f"{left} IS DISTINCT FROM {q.bind(value)}"
    return f"{left} = {q.bind(value)}"


def parse_filter(text: str, q: Query, columns: Columns = RUNS) -> None:
    """Add the filter's clauses to q.where."""
    if not text or not text.strip():
        return
    tokens = _tokens(text)
    i = 0
    while i < len(tokens):
        entity, key, i = _identifier(tokens, i)
        if i >= len(tokens):
            raise ValueError(f"{key!r} has no comparison")
        kind, op = tokens[i]
        op_upper = op.upper()
        if kind == "word" and op_upper == "NOT" and i + 1 < len(tokens) and tokens[i + 1][1].upper() == "IN":
            op_upper, i = "NOT IN", i + 2
        elif kind == "op" or (kind == "word" and op_upper in ("LIKE", "ILIKE", "IN")):
            i += 1
        else:
            raise ValueError(f"expected a comparison after {key!r}, got {op!r}")
        if op_upper in ("IN", "NOT IN"):
            if i >= len(tokens) or tokens[i][0] != "lparen":
                raise ValueError(f"{op_upper} takes a list in parentheses: ('a', 'b')")
            i += 1
            values: list[Any] = []
            while True:
                value, _, i = _value(tokens, i)
                values.append(value)
                if i < len(tokens) and tokens[i][0] == "comma":
                    i += 1
                    continue
                if i < len(tokens) and tokens[i][0] == "rparen":
                    i += 1
                    break
                raise ValueError("a list in parentheses must end with )")
            q.where.append(_comparison(columns, q, entity, key, op_upper, values, "list"))
        else:
            if i >= len(tokens):
                raise ValueError(f"{key!r} {op} has no value")
            value, value_kind, i = _value(tokens, i)
            q.where.append(_comparison(columns, q, entity, key, op_upper, value, value_kind))
        if i < len(tokens):
            kind, word = tokens[i]
            if kind != "word" or word.upper() != "AND":
                raise ValueError(f"clauses are joined with AND (there is no OR), got {word!r}")
            i += 1
            if i >= len(tokens):
                raise ValueError("the filter ends with AND")


def parse_order_by(items: list[str], q: Query, columns: Columns = RUNS) -> None:
    """MLflow's order_by: ["metrics.rmse DESC", "attributes.start_time", "params.`lr` ASC"]."""
    for item in items:
        tokens = _tokens(item)
        if not tokens:
            continue
        entity, key, i = _identifier(tokens, 0)
        direction = "ASC"
        if i < len(tokens):
            word = tokens[i][1].upper()
            if word not in ("ASC", "DESC") or i + 1 < len(tokens):
                raise ValueError(f"order_by {item!r}: a name, then ASC or DESC")
            direction = word
        if entity == "metric":
            expression = f"({_column(columns, entity)} -> {q.bind(key)} ->> 'value')::double precision"
        elif entity in ("param", "tag"):
            expression = f"({_column(columns, entity)} ->> {q.bind(key)})"
        else:
            if key not in columns.attributes:
                raise ValueError(f"order_by: unknown attribute {key!r}")
            expression = columns.attributes[key][0]
        q.order.append(f"{expression} {direction} NULLS LAST")


async def fetch_page(pool: Any, select: str, q: Query, columns: Columns, *, filter_text: str, order_by: list[str],
                     tiebreak: list[str], limit: int, offset: int) -> tuple[list[Any], bool]:
    """One page of `select` under q's conditions plus the filter, ordered by order_by then the
    tie-breaking columns: (rows, whether more follow). A bad filter or order is a 400 that says
    what is wrong."""
    try:
        parse_filter(filter_text, q, columns)
        parse_order_by(order_by, q, columns)
    except ValueError as exc:
        raise InvalidArgument(f"invalid filter or order_by: {exc}") from None
    order = ", ".join(q.order + tiebreak)
    rows = await pool.fetch(f"{select} WHERE {' AND '.join(q.where)} ORDER BY {order}"
                            f" LIMIT {q.bind(limit + 1)} OFFSET {q.bind(offset)}", *q.args)
    return list(rows[:limit]), len(rows) > limit
