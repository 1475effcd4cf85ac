"""Durable workload logs: one file per workload under data_dir/logs, capped, readable from any
byte offset, and followable live (writers wake the readers waiting on that workload)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)
TRANSCRIPT_KEEP = 256 * 1024
TRUNCATION_NOTICE = "\n[cml-appliance: the log reached its cap of {cap} MB; later output was dropped]\n"


class LogStore:
    def __init__(self, directory: Path, cap_bytes: int):
        self.directory = directory
        self.cap_bytes = cap_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._changed: dict[str, asyncio.Event] = {}
        self._closed: set[str] = set()
        self._write_failures: set[str] = set()

    def path(self, workload_id: str) -> Path:
        return self.directory / f"{workload_id}.log"

    def size(self, workload_id: str) -> int:
        try:
            return self.path(workload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, workload_id: str, data: bytes) -> None:
        """Append output; past the cap, write one notice and drop the rest."""
        if not data:
            return
        path = self.path(workload_id)
        size = self.size(workload_id)
        if size >= self.cap_bytes:
            return
        room = self.cap_bytes - size
        try:
            with open(path, "ab") as fh:
                if len(data) <= room:
                    fh.write(data)
                else:
                    fh.write(data[:room])
                    fh.write(TRUNCATION_NOTICE.format(cap=self.cap_bytes // (1024 * 1024)).encode())
        except OSError as exc:
            # A full disk loses this output, never the workload or the appliance; said once.
            if workload_id not in self._write_failures:
                self._write_failures.add(workload_id)
                log.warning("output of workload %s is being lost: cannot write its log: %s", workload_id, exc)
            return
        self._wake(workload_id)

    def close(self, workload_id: str) -> None:
        """No more output will come (the workload finished): followers stop at the end."""
        self._closed.add(workload_id)
        self._wake(workload_id)

    def _wake(self, workload_id: str) -> None:
        event = self._changed.pop(workload_id, None)
        if event is not None:
            event.set()

    def read(self, workload_id: str, offset: int, limit: int) -> bytes:
        try:
            with open(self.path(workload_id), "rb") as fh:
                if offset >= os.fstat(fh.fileno()).st_size:
                    return b""  # past the end: some file systems refuse to seek that far (EINVAL)
                fh.seek(max(0, offset))
                return fh.read(limit)
        except FileNotFoundError:
            return b""

    async def follow(
        self, workload_id: str, offset: int, *, poll: float = 5.0
    ) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (offset, chunk) from `offset` on, waiting for more until the workload is closed.

        `poll` bounds each wait, so a writer in another process (or a missed close) is noticed.
        """
        while True:
            chunk = self.read(workload_id, offset, 64 * 1024)
            if chunk:
                yield offset, chunk
                offset += len(chunk)
                continue
            if workload_id in self._closed:
                return
            event = self._changed.setdefault(workload_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), poll)
            except TimeoutError:
                yield offset, b""  # lets the caller check the status and send keepalives

    def delete(self, workload_id: str) -> None:
        for path in (self.path(workload_id), self.transcript_path(workload_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    # A session's terminal: what the shell last printed, so a stopped session still shows its
    # last screen. Only the newest TRANSCRIPT_KEEP bytes matter (the screen and some scrollback).

    def transcript_path(self, workload_id: str) -> Path:
        return self.directory / f"{workload_id}.terminal"

    def append_transcript(self, workload_id: str, data: bytes) -> None:
        path = self.transcript_path(workload_id)
        try:
            with open(path, "ab") as fh:
                fh.write(data)
                size = fh.tell()
            if size > 2 * TRANSCRIPT_KEEP:
                with open(path, "rb") as fh:
                    fh.seek(size - TRANSCRIPT_KEEP)
                    tail = fh.read()
                tmp = path.with_suffix(".terminal-tmp")
                tmp.write_bytes(tail)
                os.replace(tmp, path)
        except OSError as exc:  # the terminal goes on; only its last screen is not kept
            log.warning("cannot keep the terminal transcript of %s: %s", workload_id, exc)

    def read_transcript(self, workload_id: str) -> bytes:
        try:
            with open(self.transcript_path(workload_id), "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - TRANSCRIPT_KEEP))
                return fh.read()
        except FileNotFoundError:
            return b""
