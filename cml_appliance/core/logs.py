"""Log set-up: JSON lines carrying the current request id."""

from __future__ import annotations

import collections
import contextvars
import json
import logging
import sys
from datetime import UTC, datetime

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key in ("method", "path", "status", "duration_ms", "user"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler, RecentRecords()]
    root.setLevel(level)
    # aiohttp's own access log duplicates ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class RecentRecords(logging.Handler):
    """The last records of this process as JSON lines, for the diagnostics bundle (logs go to
    stderr otherwise, where the appliance cannot read them back)."""

    def __init__(self, keep: int = 20000):
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.lines: collections.deque[tuple[float, str]] = collections.deque(maxlen=keep)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append((record.created, self.format(record)))
        except Exception:  # a log line that cannot be formatted must not break the caller
            self.handleError(record)

    def between(self, start: float, end: float) -> list[str]:
        return [line for at, line in list(self.lines) if start <= at <= end]


def recent_records() -> RecentRecords:
    """The process's RecentRecords handler, on the root logger (added once)."""
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler, RecentRecords):
            return handler
    handler = RecentRecords()
    root.addHandler(handler)
    return handler
