"""What the bridge's processes share, beyond one call: claims, and notes left for a call.

A Twilio callback may reach any process, or any pod, and none of them need be the one holding the
call it is about (no sticky sessions). Two things then have to be shared:

- **Claims**: Twilio's callback signatures carry no nonce, so a genuinely signed callback replayed
  is accepted again. Whatever acts on a callback that changes a call (an answering machine's
  verdict) first claims it: ``claim(key)`` is True exactly once per key in the whole deployment.
- **Notes**: a callback's news for the process holding a call (the pharmacist pressed 1 on a
  warm transfer) is ``post``ed under a key that process ``read``s until it is there.

Two stores, the same contract:

- ``DirectoryState``: files in a folder of the machine (``STATE_DIR``); a claim is a file created
  with ``O_CREAT | O_EXCL``, a note is written whole and renamed into place: atomic between the
  ``--workers`` of one machine, and between machines that share the folder.
- ``PostgresState``: rows in the database at ``DATABASE_URL``, for replicas on several machines.

Both are blocking (call them in a thread), forget what is older than ``KEEP_DAYS`` days
(``prune``), and name keys by their SHA-256, so no caller text becomes a file name or reaches the
database raw. A note is at most ``MAX_NOTE_CHARS``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Final, Protocol

from ..records import make_private_dirs
from .postgres import PostgresConnections

# A replay is refused, and a note kept, for this long: Twilio retries a callback for minutes, not days.
KEEP_DAYS: Final = 2.0
MAX_NOTE_CHARS: Final = 4000
# Files or rows looked at per prune: pruning is housekeeping and must not hold anything up.
MAX_PRUNED_PER_PASS: Final = 10_000
_FILE_MODE: Final = 0o600
_SCHEMA: Final = (
    """
    CREATE TABLE IF NOT EXISTS bridge_claims (
        key        TEXT PRIMARY KEY,
        claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS bridge_notes (
        key       TEXT PRIMARY KEY,
        note      TEXT NOT NULL,
        posted_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
)
_SCHEMA_LOCK_KEY: Final = 0x6272_6964_6765_636C  # "bridgecl"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class SharedState(Protocol):
    def claim(self, key: str) -> bool:
        """True if no claim of ``key`` was made before (within ``KEEP_DAYS``); blocking."""

    def post(self, key: str, note: str) -> None:
        """Leave ``note`` under ``key``, replacing what was there; blocking."""

    def read(self, key: str) -> str | None:
        """The note under ``key``, if there is one; blocking."""

    def prune(self, now: float) -> int:
        """Forget claims and notes older than ``KEEP_DAYS``, at most ``MAX_PRUNED_PER_PASS``; returns how many."""


def _note(note: str) -> str:
    if len(note) > MAX_NOTE_CHARS:
        raise ValueError(f"a note is at most {MAX_NOTE_CHARS} characters")
    return note


class DirectoryState:
    """Claims and notes as files in ``directory`` (owner-only, made on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def claim(self, key: str) -> bool:
        path = self.directory / f"claim-{_digest(key)}"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileExistsError:
            return False
        except FileNotFoundError:
            make_private_dirs(self.directory)
            return self.claim(key)
        os.close(fd)
        return True

    def post(self, key: str, note: str) -> None:
        data = _note(note).encode("utf-8", "surrogatepass")
        path = self.directory / f"note-{_digest(key)}"
        make_private_dirs(self.directory)
        # Written whole under a name of its own, then renamed: a reader sees all of it or none.
        temporary = self.directory / f".{path.name}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, _FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def read(self, key: str) -> str | None:
        try:
            with open(self.directory / f"note-{_digest(key)}", "rb") as file:
                return file.read(4 * MAX_NOTE_CHARS + 1).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def prune(self, now: float) -> int:
        cutoff = now - KEEP_DAYS * 86400
        pruned = 0
        try:
            entries = os.scandir(self.directory)
        except FileNotFoundError:
            return 0
        with entries:
            for examined, entry in enumerate(entries):
                if examined >= MAX_PRUNED_PER_PASS:
                    break
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        pruned += 1
                except FileNotFoundError:
                    continue  # another process pruned it first
        return pruned


class PostgresState:
    """Claims and notes as rows of ``bridge_claims`` and ``bridge_notes`` in the database at ``url``."""

    def __init__(self, url: str) -> None:
        self._db = PostgresConnections(
            url, _SCHEMA, schema_lock_key=_SCHEMA_LOCK_KEY,
            outage_effect="callbacks are acted on without checking for replays, and warm transfers fail, until it is back",
        )

    def claim(self, key: str) -> bool:
        def insert(conn: Any) -> bool:
            row = conn.execute(
                "INSERT INTO bridge_claims (key) VALUES (%s) ON CONFLICT DO NOTHING RETURNING key", (_digest(key),)
            ).fetchone()
            return row is not None

        return self._db.run(insert, write=True)

    def post(self, key: str, note: str) -> None:
        text = _note(note)
        self._db.run(
            lambda conn: conn.execute(
                "INSERT INTO bridge_notes (key, note) VALUES (%s, %s) "
                "ON CONFLICT (key) DO UPDATE SET note = EXCLUDED.note, posted_at = now()",
                (_digest(key), text),
            ),
            write=True,
        )

    def read(self, key: str) -> str | None:
        row = self._db.run(lambda conn: conn.execute("SELECT note FROM bridge_notes WHERE key = %s", (_digest(key),)).fetchone())
        return str(row["note"]) if row is not None else None

    def prune(self, now: float) -> int:
        def delete(conn: Any) -> int:
            deleted = 0
            for table, column in (("bridge_claims", "claimed_at"), ("bridge_notes", "posted_at")):
                cursor = conn.execute(
                    f"DELETE FROM {table} WHERE key IN (SELECT key FROM {table} WHERE {column} < to_timestamp(%s) LIMIT %s)",
                    (now - KEEP_DAYS * 86400, MAX_PRUNED_PER_PASS),
                )
                deleted += int(cursor.rowcount)
            return deleted

        return self._db.run(delete, write=True)

    def close(self) -> None:
        self._db.close()


def shared_state(state_dir: Path, database_url: str | None) -> SharedState:
    """The production seam: PostgreSQL when the deployment has a database, else the machine's folder."""
    if database_url:
        return PostgresState(database_url)
    return DirectoryState(state_dir)
