"""Claims: the first process to claim a key acts, every later claim of it (anywhere) is refused.

Twilio's callback signatures carry no nonce, so a genuinely signed callback replayed is accepted
again; and a replay may reach another process, or another pod. Whatever acts on a callback that
changes a call (an answering machine's verdict) first claims it: ``claim(key)`` is True exactly
once per key in the whole deployment.

- ``DirectoryClaims``: one file per key, created with ``O_CREAT | O_EXCL`` in a folder of the
  machine (``STATE_DIR``): atomic between the ``--workers`` of one machine, and between machines
  that share the folder.
- ``PostgresClaims``: one row per key (``INSERT ... ON CONFLICT DO NOTHING``) in the database at
  ``DATABASE_URL``, for replicas on several machines.

Both are blocking (call them in a thread), keep a claim for ``CLAIM_DAYS`` days (``prune``), and
name keys by their SHA-256, so no caller text becomes a file name or reaches the database raw.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Final, Protocol

from ..records import make_private_dirs
from .postgres import PostgresConnections

# A replay is refused for this long: Twilio retries a callback for minutes, not days.
CLAIM_DAYS: Final = 2.0
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
)
_SCHEMA_LOCK_KEY: Final = 0x6272_6964_6765_636C  # "bridgecl"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class Claims(Protocol):
    def claim(self, key: str) -> bool:
        """True if no claim of ``key`` was made before (within ``CLAIM_DAYS``); blocking."""

    def prune(self, now: float) -> int:
        """Forget claims older than ``CLAIM_DAYS``, at most ``MAX_PRUNED_PER_PASS``; returns how many."""


class DirectoryClaims:
    """Claims as files in ``directory`` (owner-only, made on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def claim(self, key: str) -> bool:
        path = self.directory / _digest(key)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, _FILE_MODE)
        except FileExistsError:
            return False
        except FileNotFoundError:
            make_private_dirs(self.directory)
            return self.claim(key)
        os.close(fd)
        return True

    def prune(self, now: float) -> int:
        cutoff = now - CLAIM_DAYS * 86400
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


class PostgresClaims:
    """Claims as rows of ``bridge_claims`` in the database at ``url``."""

    def __init__(self, url: str) -> None:
        self._db = PostgresConnections(
            url, _SCHEMA, schema_lock_key=_SCHEMA_LOCK_KEY,
            outage_effect="callbacks are acted on without checking for replays until it is back",
        )

    def claim(self, key: str) -> bool:
        def insert(conn: Any) -> bool:
            row = conn.execute(
                "INSERT INTO bridge_claims (key) VALUES (%s) ON CONFLICT DO NOTHING RETURNING key", (_digest(key),)
            ).fetchone()
            return row is not None

        return self._db.run(insert, write=True)

    def prune(self, now: float) -> int:
        def delete(conn: Any) -> int:
            cursor = conn.execute(
                "DELETE FROM bridge_claims WHERE key IN (SELECT key FROM bridge_claims "
                "WHERE claimed_at < to_timestamp(%s) LIMIT %s)",
                (now - CLAIM_DAYS * 86400, MAX_PRUNED_PER_PASS),
            )
            return int(cursor.rowcount)

        return self._db.run(delete, write=True)

    def close(self) -> None:
        self._db.close()


def claims_for(state_dir: Path, database_url: str | None) -> Claims:
    """The production seam: PostgreSQL when the deployment has a database, else the machine's folder."""
    if database_url:
        return PostgresClaims(database_url)
    return DirectoryClaims(state_dir / "claims")
