"""The record of one call: a JSON Lines file in ``CALLS_DIR``, events first, a summary line last.

Events are kept as encoded JSON lines (about 150 bytes each) and handed to one writer thread
per process when the call ends, whatever ended it, or every ``FLUSH_LINES`` events on a long
call, so memory stays bounded. The event loop never waits on the disk, and the writer wakes
rarely: a thread woken for every event would fight the loop for the GIL under load.
``CallRecord.finish`` returns once the summary line is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import re
import statistics
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


logger = logging.getLogger("bridge.records")

# How long the writer thread gathers work before writing it.
BATCH_SECONDS = 0.25
# A call's events are handed to the writer at the latest every this many lines.
FLUSH_LINES = 10


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    # statistics.quantiles with the inclusive method interpolates between the observed values.
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[int(fraction * 100) - 1], 4)


class RecordWriter:
    """Appends lines to record files from one thread, in the order they were given."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, str, Callable[[OSError | None], None] | None] | None]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def append(self, path: Path, text: str, done: Callable[[OSError | None], None] | None = None) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-records", daemon=True)
                self._thread.start()
        self._queue.put((path, text, done))

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued and stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            # Gather for a moment: waking this thread per event would make it fight the event
            # loop for the GIL hundreds of times a second under load.
            time.sleep(BATCH_SECONDS)
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            by_file: dict[Path, list[str]] = {}
            callbacks: list[tuple[Path, Callable[[OSError | None], None]]] = []
            for item in batch:
                if item is None:
                    continue
                path, text, done = item
                by_file.setdefault(path, []).append(text)
                if done is not None:
                    callbacks.append((path, done))
            errors = {path: _append(path, "".join(texts)) for path, texts in by_file.items()}
            for path, done in callbacks:
                done(errors[path])
            reported = {path for path, _ in callbacks}
            for path, error in errors.items():
                if error is not None and path not in reported:  # a mid-call batch: nobody waits on it
                    logger.error("could not write to the call record %s: %s", path, error)


def _append(path: Path, text: str) -> OSError | None:
    """Append whole lines, or nothing: a write cut short (a full disk) is undone."""
    data = text.encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab", buffering=0) as file:
            start = file.tell()
            try:
                view = memoryview(data)
                while view:
                    view = view[file.write(view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    file.truncate(start)  # a half line would run into the next one
                raise
    except OSError as exc:
        return exc
    return None


class CallRecord:
    """One call's record file (nothing at all when recording is off)."""

    def __init__(self, directory: Path, enabled: bool, writer: RecordWriter) -> None:
        self.directory = directory
        self.enabled = enabled
        self.writer = writer
        self.started_at = _now()
        self.path: Path | None = None
        self._lines: list[str] = []  # encoded events not yet handed to the writer
        self._finished = False  # the summary is written: the file takes no more lines
        self.agent_latencies: list[float] = []
        self.turns = 0
        self.barge_ins = 0
        self.function_calls = 0
        self.function_errors = 0
        self.warnings = 0
        self.errors = 0

    def name_after(self, call_sid: str) -> None:
        """Name the file after the call, once Twilio has said which call this is."""
        if not self.enabled or self.path is not None:
            return
        safe_sid = re.sub(r"[^A-Za-z0-9_-]", "_", call_sid)[:64] or "unknown"
        stamp = self.started_at.replace(":", "").replace("-", "").split(".")[0]
        self.path = self.directory / f"{stamp}_{safe_sid}.jsonl"

    def add(self, event: str, **fields: Any) -> None:
        if not self.enabled or self._finished:
            return
        self._lines.append(json.dumps({"time": _now(), "event": event, **fields}, default=str) + "\n")
        if len(self._lines) >= FLUSH_LINES and self.path is not None:
            self.writer.append(self.path, "".join(self._lines))
            self._lines.clear()

    def turn(self, role: str, content: str) -> None:
        self.turns += 1
        self.add("transcript", role=role, content=content)

    def barge_in(self) -> None:
        self.barge_ins += 1
        self.add("barge_in")

    def agent_latency(self, message: dict[str, Any]) -> None:
        latencies = {key: message.get(key) for key in ("total_latency", "tts_latency", "ttt_latency")}
        if isinstance(latencies["total_latency"], int | float):
            self.agent_latencies.append(float(latencies["total_latency"]))
        self.add("agent_started_speaking", **latencies)

    def function_call(
        self, name: str, arguments: str, result: Any, error: str | None, duration: float, *, withdrawn: bool = False
    ) -> None:
        self.function_calls += 1
        if error is not None:
            self.function_errors += 1
        self.add(
            "function_call",
            name=name,
            arguments=arguments,
            result=result,
            error=error,
            duration_seconds=round(duration, 4),
            withdrawn=withdrawn,
        )

    def warning(self, code: Any, description: Any) -> None:
        self.warnings += 1
        self.add("warning", code=code, description=description)

    def error(self, source: str, code: Any, description: Any) -> None:
        self.errors += 1
        self.add("error", source=source, code=code, description=description)

    def summary(self, **fields: Any) -> dict[str, Any]:
        ended_at = _now()
        duration = datetime.fromisoformat(ended_at) - datetime.fromisoformat(self.started_at)
        return {
            "event": "summary",
            **fields,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "duration_seconds": round(duration.total_seconds(), 3),
            "turns": self.turns,
            "barge_ins": self.barge_ins,
            "function_calls": self.function_calls,
            "function_errors": self.function_errors,
            "warnings": self.warnings,
            "errors": self.errors,
            "agent_latency_p50": _percentile(self.agent_latencies, 0.50),
            "agent_latency_p95": _percentile(self.agent_latencies, 0.95),
        }

    async def finish(self, call_sid: str, summary: dict[str, Any]) -> Path | None:
        """Write the summary line and return the file once all of it is on disk (None when off)."""
        if not self.enabled:
            return None
        self.name_after(call_sid)
        assert self.path is not None
        loop = asyncio.get_running_loop()
        written: asyncio.Future[OSError | None] = loop.create_future()

        def done(error: OSError | None) -> None:
            loop.call_soon_threadsafe(written.set_result, error)

        self._lines.append(json.dumps(summary, default=str) + "\n")
        self.writer.append(self.path, "".join(self._lines), done)
        self._lines.clear()
        self._finished = True
        error = await written
        if error is not None:
            raise error
        return self.path
