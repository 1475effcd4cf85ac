"""Typed keys for what the application holds (aiohttp AppKey) and per-request state."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from cml_appliance.core.settings import Settings
from cml_appliance.core.tasks import Supervisor
from cml_appliance.projects.service import ProjectService
from cml_appliance.web.metrics import Metrics

SETTINGS = web.AppKey("settings", Settings)
POOL = web.AppKey("pool", asyncpg.Pool)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
PROJECTS = web.AppKey("projects", ProjectService)
METRICS = web.AppKey("metrics", Metrics)
