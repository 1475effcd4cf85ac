"""Usage over time, from the workloads table: how much CPU, memory or GPU the chosen workloads held
in each interval of a window (CML's GetTimeSeries, and the site-admin usage charts).

Each interval's value is the average held over it (a workload that ran half of it counts half),
so a short job between two samples is not lost. Units are CML's own: CPU in millicores
(CDSW_CPU_MILLICORES), memory in MB (CDSW_MEMORY_MB), GPUs in GPUs; time stamps are Unix seconds
at the start of each interval.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from cml_appliance.core.errors import InvalidArgument

# series type -> (SQL of what one workload holds, in the series' unit)
SERIES = {"cpu": "w.cpu * 1000", "memory": "w.memory * 1024", "gpu": "w.nvidia_gpu"}
UNITS = {"cpu": "millicores", "memory": "MB", "gpu": "GPUs"}
DEFAULT_WINDOW = timedelta(hours=24)
FROM = """
FROM workloads w
JOIN projects p ON p.id = w.project_id
JOIN users ow ON ow.id = p.owner_id
JOIN users u ON u.id = w.creator_id
"""


@dataclasses.dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime
    step_seconds: int

    @classmethod
    def of(cls, start: datetime | None, end: datetime | None, now: datetime, points: int = 240) -> Window:
        """[start, end] (the last day by default) cut into about `points` whole-minute intervals."""
        end = min(end or now, now)
        start = start or end - DEFAULT_WINDOW
        if start >= end:
            raise InvalidArgument("the time range is empty: its min must come before its max (and before now)")
        return cls(start, end, max(60, math.ceil((end - start).total_seconds() / points / 60) * 60))


async def time_series(pool: asyncpg.Pool, series_type: str, window: Window, conditions: list[str],
                      args: list[Any]) -> list[tuple[int, float]]:
    """[(Unix seconds, average held), ...] for the workloads meeting `conditions` (SQL over FROM's
    aliases, with `args` bound)."""
    if series_type not in SERIES:
        raise InvalidArgument(f"series_type must be one of {', '.join(SERIES)}")
    args = [*args, window.start, window.end, float(window.step_seconds)]
    start, end, step = f"${len(args) - 2}", f"${len(args) - 1}", f"${len(args)}"
    where = " AND ".join(conditions) or "true"
    rows = await pool.fetch(f"""
        WITH slots AS (
            SELECT t AS slot FROM generate_series({start}::timestamptz, {end}::timestamptz - make_interval(secs => 1),
                                                 make_interval(secs => {step})) AS t),
        held AS (
            SELECT {SERIES[series_type]} AS amount, coalesce(w.running_at, w.starting_at) AS began,
                   coalesce(w.finished_at, now()) AS ended
            {FROM}
            WHERE {where} AND coalesce(w.running_at, w.starting_at) IS NOT NULL
              AND coalesce(w.running_at, w.starting_at) < {end} AND coalesce(w.finished_at, now()) > {start})
        SELECT extract(epoch FROM s.slot)::bigint AS at,
               coalesce(sum(h.amount * greatest(0, extract(epoch FROM
                   least(h.ended, s.slot + make_interval(secs => {step})) - greatest(h.began, s.slot)))), 0) / {step} AS value
        FROM slots s LEFT JOIN held h ON h.began < s.slot + make_interval(secs => {step}) AND h.ended > s.slot
        GROUP BY s.slot ORDER BY s.slot""", *args)
    return [(int(r["at"]), float(r["value"])) for r in rows]


async def hours_by_account(pool: asyncpg.Pool, window: Window) -> list[asyncpg.Record]:
    """Per user and per team (of team projects), the vCPU-, GB- and GPU-hours held within the window,
    largest first."""
    return await pool.fetch(f"""
        WITH held AS (
            SELECT u.username AS creator, CASE WHEN ow.is_team THEN ow.username ELSE '' END AS team, w.cpu, w.memory,
                   w.nvidia_gpu, greatest(0, extract(epoch FROM least(coalesce(w.finished_at, now()), $2::timestamptz)
                   - greatest(coalesce(w.running_at, w.starting_at), $1::timestamptz))) / 3600 AS hours
            {FROM}
            WHERE coalesce(w.running_at, w.starting_at) IS NOT NULL)
        SELECT creator AS account, false AS is_team, sum(cpu * hours) AS cpu_hours, sum(memory * hours) AS memory_hours,
               sum(nvidia_gpu * hours) AS gpu_hours, count(*) FILTER (WHERE hours > 0) AS workloads
        FROM held GROUP BY creator HAVING sum(hours) > 0
        UNION ALL
        SELECT team, true, sum(cpu * hours), sum(memory * hours), sum(nvidia_gpu * hours), count(*) FILTER (WHERE hours > 0)
        FROM held WHERE team <> '' GROUP BY team HAVING sum(hours) > 0
        ORDER BY cpu_hours DESC, account""", window.start, window.end)
