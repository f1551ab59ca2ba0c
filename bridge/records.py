"""The record of one call: a JSON Lines file in ``CALLS_DIR``, events first, a summary line last.

Events are kept as encoded JSON lines (about 150 bytes each) and handed to one writer thread
per process when the call ends, whatever ended it, or every ``FLUSH_LINES`` events on a long
call, so memory stays bounded. The event loop never waits on the disk, and the writer wakes
rarely: a thread woken for every event would fight the loop for the GIL under load.
``CallRecord.finish`` returns once the summary line is on disk.

With ``RECORDS_RETENTION_DAYS``, ``delete_old_records`` deletes the record files older than that
(the server runs it at startup and hourly, in a thread): only files named as ``CallRecord`` names
them, in ``CALLS_DIR`` itself, never through a symlink, and a bounded number per pass.

Records hold what callers said, so they are the caller's personal data: each file is created
owner-only (0600) and each directory this module creates is 0700, whatever the umask
(``make_private_dirs`` makes every directory the bridge creates). Every line is strict JSON (no
``NaN``/``Infinity`` and no lone surrogate, which other JSON readers reject), and one call's events
take at most ``RECORD_MAX_BYTES`` (a peer flooding transcripts cannot fill the disk); events past
the cap are counted in the summary's ``record_events_dropped`` instead of written.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from . import jsontext
from .call_events import RecordEvent

logger = logging.getLogger("bridge.records")

# How long the writer thread gathers work before writing it.
BATCH_SECONDS = 0.25
# A call's events are handed to the writer at the latest every this many lines.
FLUSH_LINES = 10
# The most bytes of event lines one call's record takes; the summary line comes on top.
RECORD_MAX_BYTES: Final = 1_000_000
# A string field longer than this is cut, so one huge transcript cannot take the whole cap.
FIELD_MAX_CHARS: Final = 4000
# How deep into nested fields (a function's result) long strings are looked for.
_MAX_FIELD_DEPTH: Final = 64
# Owner-only, set by the open itself: a chmod afterwards would leave a moment when others can read.
_FILE_MODE: Final = 0o600
_DIR_MODE: Final = 0o700
_FILE_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# Adding to a record that must already be there (a recording's status, after the call): never
# created, and never through a symlink, so a line can't land anywhere but in a record.
_EXISTING_FILE_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW


# The name ``CallRecord.name_after`` gives a record: its start (UTC) and the callSid. Retention
# deletes files with such names only, so nothing else put in CALLS_DIR is ever touched.
RECORD_NAME: Final = re.compile(r"[0-9]{8}T[0-9]{6}_[A-Za-z0-9_-]{1,64}\.jsonl")
# The most record files one retention pass examines (stats, and deletes if old). A pass then
# takes well under a second on a local disk (0.15 s to delete 20,000 on ext4), so the thread it
# runs in, and a shutdown that waits for that thread, are never held up longer; and it is more
# than one process can create in an hour (MAX_CALLS=200 calls of a minute each make 12,000), so
# the passes keep up, and a backlog (retention turned on over years of records) shrinks by at
# least 8,000 every hour.
RETENTION_BATCH: Final = 20_000
SECONDS_PER_DAY: Final = 86_400


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _cut(text: str) -> str:
    return f"{text[:FIELD_MAX_CHARS]}…(+{len(text) - FIELD_MAX_CHARS} chars)"


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with every string longer than ``FIELD_MAX_CHARS`` cut, however deep it sits."""
    if isinstance(value, str):
        return value if len(value) <= FIELD_MAX_CHARS else _cut(value)
    if depth < _MAX_FIELD_DEPTH:
        if isinstance(value, dict):
            return {key: bounded(item, depth + 1) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [bounded(item, depth + 1) for item in value]
    return value


def _as_text(value: object) -> str:
    """What json cannot encode is written as its str(), cut like any other long string."""
    text = str(value)
    return text if len(text) <= FIELD_MAX_CHARS else _cut(text)


def finite(value: Any, path: frozenset[int] = frozenset()) -> Any:
    """``value`` with every NaN and infinity, as a value or a key, replaced by None.

    Only used after a strict encode failed, so a container met again on its own path (a
    circular reference, the other ValueError json raises) becomes a marker instead of
    recursing forever.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple):
        if id(value) in path:
            return "<circular>"
        inner = path | {id(value)}
        if isinstance(value, dict):
            return {finite(key, inner): finite(item, inner) for key, item in value.items()}
        return [finite(item, inner) for item in value]
    return value


def record_line(event: str, fields: dict[str, Any]) -> str:
    """One record line: the time, ``event`` and ``fields`` (long strings cut), as strict JSON."""
    return _encode({"time": _now(), "event": event, **bounded(fields)})


def _encode(value: dict[str, Any]) -> str:
    """One strict JSON line: NaN, Infinity and lone surrogates are not JSON strict readers take."""
    try:
        line = json.dumps(value, default=_as_text, allow_nan=False)
    except ValueError:
        # Rare (Deepgram or a function handed us a non-finite float), so the walk is paid only here.
        line = json.dumps(finite(value), default=_as_text, allow_nan=False)
    if "\\ud" in line:
        # A surrogate's escape: half of an astral character's pair, or a lone surrogate (from a
        # function's result, say; the codecs mend what peers send), which strict readers refuse.
        # Rare, so the round trip that mends it is paid only here.
        line = json.dumps(jsontext.loads(line), allow_nan=False)
    return line + "\n"


_Done = Callable[[OSError | None], None]


def _settle(future: asyncio.Future[OSError | None], error: OSError | None) -> None:
    if not future.done():  # its waiter may have been cancelled meanwhile
        future.set_result(error)


class RecordWriter:
    """Appends lines to record files from one thread, in the order they were given."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Path, str, _Done | None, bool] | None]
        self._queue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def append(self, path: Path, text: str, done: _Done | None = None, *, must_exist: bool = False) -> None:
        """Queue ``text`` (whole lines) for ``path``; ``done(error)`` is called from the writer thread once written.

        With ``must_exist`` the file is not created: a missing one (or a symlink) is the
        ``OSError`` given to ``done`` (``FileNotFoundError`` when it is missing).
        """
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-records", daemon=True)
                self._thread.start()
        self._queue.put((path, text, done, must_exist))

    async def write(self, path: Path, text: str, *, must_exist: bool = False) -> OSError | None:
        """Append as ``append`` does, and return once it is on disk: None, or the error that stopped it."""
        loop = asyncio.get_running_loop()
        written: asyncio.Future[OSError | None] = loop.create_future()

        def done(error: OSError | None) -> None:
            # The loop may be gone (a shutdown cut short): the writer thread must live on regardless.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, written, error)

        self.append(path, text, done, must_exist=must_exist)
        return await written

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
            existing_only: dict[Path, bool] = {}  # every line for the file asked not to create it
            callbacks: list[tuple[Path, _Done]] = []
            for item in batch:
                if item is None:
                    continue
                path, text, done, must_exist = item
                by_file.setdefault(path, []).append(text)
                existing_only[path] = existing_only.get(path, True) and must_exist
                if done is not None:
                    callbacks.append((path, done))
            errors = {path: _append(path, "".join(texts), create=not existing_only[path]) for path, texts in by_file.items()}
            for path, done in callbacks:
                done(errors[path])
            reported = {path for path, _ in callbacks}
            for path, error in errors.items():
                if error is not None and path not in reported:  # a mid-call batch: nobody waits on it
                    logger.error("could not write to the call record %s: %s", path, error)


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each 0700; every directory the bridge makes.

    Not ``Path.mkdir(parents=True)`` or ``os.makedirs``: both create the parents with the
    umask's default mode (often 0755), whatever mode is asked for the last one.
    """
    missing: list[Path] = []
    current = directory
    while not current.exists() and current.parent != current:
        missing.append(current)
        current = current.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first: fine
            os.mkdir(folder, _DIR_MODE)


def _open_record(path: Path) -> int:
    try:
        return os.open(path, _FILE_FLAGS, _FILE_MODE)
    except FileNotFoundError:
        # Only the first write of a call (or of a new CALLS_DIR) gets here: no stat per batch.
        make_private_dirs(path.parent)
        return os.open(path, _FILE_FLAGS, _FILE_MODE)


def _append(path: Path, text: str, *, create: bool = True) -> OSError | None:
    """Append whole lines, or nothing: a write cut short (a full disk) is undone."""
    data = text.encode("utf-8")
    try:
        fd = _open_record(path) if create else os.open(path, _EXISTING_FILE_FLAGS)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)  # a half line would run into the next one
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        return exc
    return None


class CallRecord:
    """One call's record file (nothing at all when recording is off)."""

    def __init__(
        self, directory: Path, enabled: bool, writer: RecordWriter, *, max_bytes: int = RECORD_MAX_BYTES
    ) -> None:
        self.directory = directory
        self.enabled = enabled
        self.writer = writer
        self.max_bytes = max_bytes
        self.event_bytes = 0  # bytes of event lines accepted so far
        self.events_dropped = 0  # events past max_bytes, counted instead of written
        self.started_at = _now()
        self.path: Path | None = None
        self._lines: list[str] = []  # encoded events not yet handed to the writer
        self._finished = False  # the summary is written: the file takes no more lines

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
        if self.events_dropped:  # full: don't even encode what will not be written
            self.events_dropped += 1
            return
        line = record_line(event, fields)
        # json.dumps escapes everything outside ASCII, so characters are bytes here.
        if self.event_bytes + len(line) > self.max_bytes:
            # From the first event that does not fit, everything is dropped: what is written
            # stays the call's beginning, with no gaps a reader could miss.
            self.events_dropped = 1
            logger.warning(
                "the call record %s reached its %d-byte cap: further events are counted, not written",
                self.path.name if self.path is not None else "(not yet named)",
                self.max_bytes,
            )
            return
        self.event_bytes += len(line)
        self._lines.append(line)
        if len(self._lines) >= FLUSH_LINES and self.path is not None:
            self.writer.append(self.path, "".join(self._lines))
            self._lines.clear()

    def summary(self, **fields: Any) -> dict[str, Any]:
        ended_at = _now()
        duration = datetime.fromisoformat(ended_at) - datetime.fromisoformat(self.started_at)
        # The call's own counts (turns, functions, latencies, ...) come from its state machine in
        # ``fields``; the record adds what only it knows: the times and what it had to drop.
        return {
            "event": RecordEvent.SUMMARY,
            **fields,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "duration_seconds": round(duration.total_seconds(), 3),
            "record_events_dropped": self.events_dropped,
        }

    async def finish(self, call_sid: str, summary: dict[str, Any]) -> Path | None:
        """Write the summary line and return the file once all of it is on disk (None when off)."""
        if not self.enabled:
            return None
        self.name_after(call_sid)
        assert self.path is not None
        # Set here too, so the count is current and present even in a summary built elsewhere.
        summary = {**summary, "record_events_dropped": self.events_dropped}
        self._lines.append(_encode(bounded(summary)))
        text = "".join(self._lines)
        self._lines.clear()
        self._finished = True
        error = await self.writer.write(self.path, text)
        if error is not None:
            raise error
        return self.path


class RetentionError(Exception):
    """Some old records could not be deleted: one sentence saying why, and how many were."""

    def __init__(self, message: str, deleted: int) -> None:
        super().__init__(message)
        self.deleted = deleted


def delete_old_records(
    directory: Path, max_age_days: float, *, now: float | None = None, limit: int = RETENTION_BATCH
) -> int:
    """Delete the call records in ``directory`` last modified more than ``max_age_days`` ago.

    Returns how many were deleted. Blocking disk work: the server runs it in a thread. Only
    regular files named as ``CallRecord`` names them (``RECORD_NAME``) directly in ``directory``
    are candidates: no other file, no subfolder, and never a symlink (neither followed nor
    removed). Each pass examines at most ``limit`` of them, oldest name (so oldest call) first,
    and lists the folder's names without examining the rest. Everything is done relative to
    one open descriptor of ``directory``, so a path swapped mid-pass can't lead outside it. A
    missing directory has nothing to delete. A record another process deleted first (``--workers``
    each run a pass) is not counted. Raises ``RetentionError`` if some could not be deleted or
    the directory could not be read, after deleting what it could. ``now`` is the time
    (``time.time()``) to measure ages from.
    """
    cutoff = (time.time() if now is None else now) - max_age_days * SECONDS_PER_DAY
    try:
        folder = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0  # no call was recorded yet
    except OSError as exc:
        raise RetentionError(f"cannot open {directory}: {exc.strerror or exc}", 0) from None
    deleted = 0
    failed: list[OSError] = []
    try:
        with os.scandir(folder) as entries:
            names = heapq.nsmallest(limit, (entry.name for entry in entries if RECORD_NAME.fullmatch(entry.name)))
        for name in names:
            try:
                info = os.stat(name, dir_fd=folder, follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode) or info.st_mtime >= cutoff:
                    continue
                os.unlink(name, dir_fd=folder)
            except FileNotFoundError:
                continue  # deleted by another worker in the meantime
            except OSError as exc:
                failed.append(exc)
                continue
            deleted += 1
    except OSError as exc:  # listing the folder failed
        raise RetentionError(f"cannot read {directory}: {exc.strerror or exc}", deleted) from None
    finally:
        os.close(folder)
    if failed:
        first = failed[0]
        raise RetentionError(
            f"{len(failed)} of them could not be deleted from {directory}, the first: {first.strerror or first}", deleted
        )
    return deleted
