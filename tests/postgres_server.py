"""A real PostgreSQL server for the tests, from Debian's ``postgresql`` package, in a temp folder.

One server per test session (``postgres_server`` in conftest.py); each test gets its own database
(``postgres_url``). The server listens only on a Unix socket inside its own folder, so it needs
no port and can't clash with another server on the machine. It runs with fsync off: the tests
need PostgreSQL's behaviour, not its durability.

PostgreSQL refuses to run as root, and CI runs as root: then initdb and the server run as the
unprivileged user ``nobody``, owning the folder. The binaries must be there (``.ci/run``
installs the package); if they aren't, the tests that need them fail saying so, rather than skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

# The server listens on no TCP port; this only names its socket file, inside its own folder.
SOCKET_PORT = 5432
UNPRIVILEGED_USER = "nobody"


def server_binaries() -> Path:
    """The folder with initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, or on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    pytest.fail(
        "PostgreSQL's server binaries (initdb, pg_ctl) are not installed: install Debian's postgresql "
        "package (`apt-get install postgresql`; .ci/run does this when run as root).",
        pytrace=False,
    )


class PostgresServer:
    """``start()``, ``stop()`` (the outage tests stop and restart it), ``url(database)``."""

    def __init__(self) -> None:
        self.bin = server_binaries()
        # Under /tmp, not $TMPDIR: a short path (a Unix socket's path is limited to about 100
        # bytes) whose parents the unprivileged user can pass through.
        self.folder = Path(tempfile.mkdtemp(prefix="pharmacy-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(UNPRIVILEGED_USER)
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", UNPRIVILEGED_USER, "--"]
        self._count = 0
        self.running = False

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self._as_user, *command], cwd=self.folder, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}{log}")

    def initialise(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")

    def start(self) -> None:
        options = (
            f"-k {self.folder} -c listen_addresses='' -p {SOCKET_PORT} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "30", "start")
        self.running = True

    def stop(self) -> None:
        """Stop now, disconnecting every client (as a restarted or failed-over server does)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        self.running = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.folder}&port={SOCKET_PORT}"

    def admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        self._count += 1
        name = f"test_{self._count}"
        self.admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.split("?")[0].rsplit("/", 1)[1]
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def rows(self, url: str, sql: str) -> list[tuple[Any, ...]]:
        """Read the database directly, independent of the code under test."""
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as conn:  # commits when the block ends
            cursor = conn.execute(sql)
            return [tuple(row) for row in cursor.fetchall()] if cursor.description else []

    def close(self) -> None:
        if self.running:
            try:
                self.stop()
            except RuntimeError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)
