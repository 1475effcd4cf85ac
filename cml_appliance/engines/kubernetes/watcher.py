"""The pod watcher: keeps Postgres in step with the pods of this site.

List, then watch from the list's resourceVersion with a server-side timeout; on 410 Gone (the
apiserver no longer has that history) list again. One watcher per site: it runs where it holds
a Postgres advisory lock, so several appliance processes on one database never double it. A
watch can also die silently (a proxy holding a dead connection open): when neither an event nor
a bookmark came for `stale_seconds`, a cheap list tells whether pods changed meanwhile, and if
they did the watch is restarted from a fresh list.

Events are read as raw JSON (no client models: a relist of 10,000 pods must take well under two
seconds) and applied in batches: whatever arrived while the previous batch was being written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import asyncpg
from kubernetes_asyncio.client.rest import ApiException

from cml_appliance.db.pool import try_advisory_lock
from cml_appliance.engines.base import EngineUnavailable
from cml_appliance.engines.kubernetes import objects
from cml_appliance.engines.kubernetes.engine import KubernetesEngine, api_message

log = logging.getLogger(__name__)

WATCH_LOCK = 0x434D4C4B
BATCH_MAX = 2000
BACKOFF_MAX = 30.0

Apply = Callable[[list[objects.Observed]], Awaitable[None]]


class WatchExpired(Exception):
    """410 Gone: the resourceVersion is too old; list again."""


class WatchStale(Exception):
    """The watch stopped delivering while pods changed."""


class PodWatcher:
    def __init__(self, engine: KubernetesEngine, pool: asyncpg.Pool, apply: Apply, *,
                 timeout_seconds: int = 300, stale_seconds: float = 90):
        self.engine = engine
        self.pool = pool
        self.apply = apply
        self.timeout_seconds = timeout_seconds
        self.stale_seconds = stale_seconds
        self.role = "starting"   # active (holds the lock), standby (another process does), starting
        self.last_sync = 0.0     # monotonic time of the last list, event, bookmark or watch start
        self.resource_version = ""
        self.relists = 0
        self.restarts = 0        # watches restarted for being stale or cut
        self.expired = 0         # 410 Gone answers (a relist followed each)
        self.events = 0
        # pod key (namespace/name) -> (resourceVersion, observed state) of what was applied last
        self.pods: dict[str, tuple[str, objects.Observed]] = {}
        self.synced = asyncio.Event()

    def cache_age(self) -> float | None:
        """Seconds since the watcher last knew the cluster's state; None when it does not watch here."""
        if self.role != "active" or not self.last_sync:
            return None
        return time.monotonic() - self.last_sync

    def _fresh(self) -> None:
        self.last_sync = time.monotonic()

    async def run(self) -> None:
        """Forever: hold the site's lock and watch; without the lock, wait for it."""
        while True:
            async with try_advisory_lock(self.pool, WATCH_LOCK) as held:
                if held is None:
                    self.role = "standby"
                else:
                    self.role = "active"
                    try:
                        await self._watch_while_held(held)
                    finally:
                        self.role = "standby"
                        self.synced.clear()
            await asyncio.sleep(5)

    async def _watch_while_held(self, lock_connection: asyncpg.Connection) -> None:
        """List, then watch; a watch that fails is resumed from the last resourceVersion seen
        (the apiserver replays what was missed), and only 410 Gone or a stale watch costs a new
        list, as client-go's reflector does."""
        delay = 0.5
        must_list = True
        while True:
            try:
                if must_list:
                    await self._list()
                    must_list = False
                await self._watch_once()
                delay = 0.5
                # the server ended the watch at its timeout: check the lock is still ours
                await lock_connection.fetchval("SELECT 1")
            except WatchExpired:
                self.expired += 1
                must_list = True
                log.info("pod watch: resourceVersion %s expired (410 Gone); listing again", self.resource_version)
            except WatchStale:
                self.restarts += 1
                must_list = True
                log.warning("pod watch delivered nothing for %.0f s while pods changed; restarting it", self.stale_seconds)
            except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError) as exc:
                if isinstance(exc, ConnectionError) and not lock_connection.is_closed():
                    await self._back_off(exc, delay)  # the apiserver's connection, not the database's
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                log.warning("pod watch: the database connection that holds the lock is gone (%s)", exc)
                return  # the lock went with it: take it again first
            except ApiException as exc:
                if exc.status == 410:  # the watch request itself refused: the same as the event
                    self.expired += 1
                    must_list = True
                    continue
                must_list = True
                await self._back_off(api_message(exc), delay)
                delay = min(delay * 2, BACKOFF_MAX)
            except (EngineUnavailable, aiohttp.ClientError, TimeoutError, OSError) as exc:
                await self._back_off(exc, delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def _back_off(self, why: object, delay: float) -> None:
        self.restarts += 1
        log.warning("pod watch failed (%s); resuming in %.1f s", str(why)[:300], delay)
        await asyncio.sleep(delay)

    async def _list(self) -> None:
        pods, self.resource_version = await self.engine.list_pods()
        self.relists += 1
        seen: dict[str, tuple[str, objects.Observed]] = {}
        for pod in pods:
            observed = objects.describe_pod(pod)
            if observed is not None:
                meta = pod["metadata"]
                seen[f"{meta['namespace']}/{meta['name']}"] = (meta.get("resourceVersion", ""), observed)
        changed = [obs for key, (rv, obs) in seen.items() if self.pods.get(key, ("", None))[1] != obs]
        # Pods that vanished while nobody watched (or while the watch was dead) ended too.
        vanished = [objects.Observed(obs.workload_id, obs.status if obs.final else "ENGINE_FAILED",
                                     obs.reason if obs.final else "its pod was deleted (by hand, or by the cluster)",
                                     obs.node, obs.exit_code, gone=True)
                    for key, (_, obs) in self.pods.items() if key not in seen]
        self.pods = seen
        await self.apply(changed + vanished)
        self._fresh()
        self.synced.set()

    async def _watch_once(self) -> None:
        """One watch request, until the server's timeout; raises WatchExpired or WatchStale."""
        response = await self.engine.watch_core.list_pod_for_all_namespaces(
            label_selector=f"{objects.SITE_LABEL}={self.engine.site_id}", watch=True,
            resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=self.timeout_seconds, _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        self._fresh()
        lines: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def read() -> None:
            try:
                while line := await response.content.readline():
                    lines.put_nowait(line)
            finally:
                lines.put_nowait(None)

        reader = asyncio.create_task(read())
        pending: dict[str, objects.Observed] = {}
        try:
            while True:
                try:
                    line = await asyncio.wait_for(lines.get(), self.stale_seconds)
                except TimeoutError:
                    if await self._missed_changes():
                        raise WatchStale() from None
                    self._fresh()  # nothing changed: the silence was real
                    continue
                if line is None:
                    if reader.done() and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    break
                self._event(line, pending)
                if lines.empty() or len(pending) >= BATCH_MAX:
                    await self._flush(pending)
            await self._flush(pending)
        finally:
            reader.cancel()
            response.release()

    def _event(self, line: bytes, pending: dict[str, objects.Observed]) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        kind, pod = event.get("type"), event.get("object") or {}
        meta = pod.get("metadata") or {}
        if kind == "ERROR":
            if pod.get("code") == 410:
                raise WatchExpired()
            raise ApiException(status=pod.get("code") or 500, reason=pod.get("message") or "watch error")
        self._fresh()
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        self.events += 1
        key = f"{meta.get('namespace')}/{meta.get('name')}"
        observed = objects.describe_pod(pod, deleted=kind == "DELETED")
        if observed is None:
            return
        if kind == "DELETED":
            self.pods.pop(key, None)
        else:
            previous = self.pods.get(key)
            self.pods[key] = (meta.get("resourceVersion", ""), observed)
            if previous is not None and previous[1] == observed:
                return  # a change that does not change what the workload shows
        pending[key] = observed

    async def _flush(self, pending: dict[str, objects.Observed]) -> None:
        if pending:
            batch = list(pending.values())
            pending.clear()
            await self.apply(batch)

    async def _missed_changes(self) -> bool:
        """Do the pods differ from what the watch told us? (a list of this site's pods)"""
        pods, _ = await self.engine.list_pods()
        current = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p["metadata"].get("resourceVersion", "")
                   for p in pods}
        known = {key: rv for key, (rv, _) in self.pods.items()}
        return current != known

    def describe(self) -> dict[str, Any]:
        age = self.cache_age()
        return {"watch": self.role, "cache_age_seconds": None if age is None else round(age, 1),
                "pods": len(self.pods), "relists": self.relists, "restarts": self.restarts, "expired": self.expired}
