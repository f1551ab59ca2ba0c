"""PostgreSQL connections for a store: bounded waits, outages survived.

This module owns the plumbing between a store and a PostgreSQL server, none of the SQL: a store
(``pharmacy_functions.PostgresStore``, the bridge's ``shared.PostgresState``) hands it the
statements that create its schema and the work of each operation, and gets back either the
result or ``DatabaseUnavailable``.

* psycopg 3 is optional. It is imported only when a store is built for a ``DATABASE_URL``, and
  ``check_database_url`` lets startup say in one sentence how to install it.
* Each worker thread keeps one connection of its own (the bridge runs functions in a pool of
  threads; a psycopg connection serves one query at a time). No pool library: the threads are
  the pool, and the number of connections is capped by the number of threads.
* Every wait is bounded below the bridge's default FUNCTION_TIMEOUT_SECONDS (10): connecting,
  each statement (server-side ``statement_timeout``), and data the server stops acknowledging.
* An unreachable server is ``DatabaseUnavailable``, which the store turns into an answer the
  agent can say. It is logged once when it starts and once when the server is back, not per
  call. A connection that broke while idle (a restarted or failed-over server) is replaced and
  the operation tried once more, unless it broke while committing, when the write may have
  happened; repeating it could place an order twice.
* The schema is created on first use, under an advisory lock, so many processes starting at once
  against an empty database create it (and seed it) exactly once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from bridge.settings import ConfigError

logger = logging.getLogger("bridge.storage.postgres")

T = TypeVar("T")

SCHEMES: Final = frozenset({"postgresql", "postgres"})
INSTALL_HINT: Final = "pip install -r requirements-postgres.txt"

# Bounds on every wait, together well under FUNCTION_TIMEOUT_SECONDS' default of 10. libpq counts
# connect_timeout in whole seconds (per address tried); the other two are milliseconds.
CONNECT_TIMEOUT_SECONDS: Final = 3
STATEMENT_TIMEOUT_MS: Final = 3000
# A server that vanishes mid-query (a dead host, a dropped network) never answers and never
# resets the connection; the kernel gives up on unacknowledged data after this long.
TCP_USER_TIMEOUT_MS: Final = 3000

# Any fixed 64-bit number, the same in every process: pg_advisory_xact_lock's key for "creating
# the schema" of one store. Transaction-scoped, so it is released by the commit or by a dropped
# connection. Each store that creates tables passes its own.
SCHEMA_LOCK_KEY: Final = 0x7068_6172_6D61_6379  # "pharmacy"


class DatabaseUnavailable(Exception):
    """The database can't be reached (down, unreachable, too slow); the caller can try later."""


def check_database_url(url: str) -> None:
    """At startup: psycopg is installed and libpq can read ``url``; else ConfigError, one sentence.

    Nothing connects here. A database that is down must not keep the bridge from starting (pods
    may start before their database; a restart must not wait on it), and an outage at startup is
    no different from one later: calls hear that the order system is unavailable meanwhile.
    """
    try:
        import psycopg  # noqa: F401
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise ConfigError(f"DATABASE_URL is set but psycopg is not installed: {INSTALL_HINT}.") from None
    try:
        conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's reason is not quoted: it may repeat part of the URL, password included.
        raise ConfigError("DATABASE_URL is not a URL libpq can read; check it against postgresql://user:password@host:5432/pharmacy.") from None


def describe(url: str) -> str:
    """``host:port/dbname`` of a database URL for logs: never the user or the password."""
    parts = urlsplit(url)
    try:
        host = parts.hostname or "local socket"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # an unparsable port; libpq will say so when connecting
        host, port = "?", ""
    return f"{host}{port}{parts.path or '/'}"


class PostgresConnections:
    """One connection per thread to the database at ``url``, and the schema created on first use.

    ``schema`` are the statements that create the tables (each idempotent: CREATE ... IF NOT
    EXISTS) and ``seed`` runs after them in the same transaction, both under the advisory lock.
    ``run`` carries out one operation; ``close`` closes every thread's connection.
    """

    def __init__(
        self,
        url: str,
        schema: Iterable[str],
        seed: Callable[[Any], None] | None = None,
        *,
        connect_timeout_seconds: int = CONNECT_TIMEOUT_SECONDS,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
        schema_lock_key: int = SCHEMA_LOCK_KEY,
        outage_effect: str = "functions answer that the order system can't be reached until it is back",
    ) -> None:
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
            from psycopg.rows import dict_row
        except ImportError:
            raise RuntimeError(f"DATABASE_URL needs psycopg: {INSTALL_HINT}") from None
        self._psycopg = psycopg
        self._dict_row = dict_row
        self.where = describe(url)
        # The URL's own settings win, except that our statement timeout is added to its options.
        params: dict[str, Any] = conninfo_to_dict(url)
        params.setdefault("connect_timeout", str(connect_timeout_seconds))
        params.setdefault("tcp_user_timeout", str(TCP_USER_TIMEOUT_MS))
        params.setdefault("application_name", "pharmacy-bridge")
        params["options"] = f"{params.get('options', '')} -c statement_timeout={statement_timeout_ms}".strip()
        self._params = params
        self._schema = tuple(schema)
        self._seed = seed
        self._schema_lock_key = schema_lock_key
        self._outage_effect = outage_effect  # what an outage means, for its one log line
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._local = threading.local()
        self._open: set[Any] = set()  # every thread's connection, so close() reaches them all
        self._state_lock = threading.Lock()
        self._down = False  # logged as down; the next success logs that it is back

    # -- connections ------------------------------------------------------------------------

    def _connection(self) -> tuple[Any, bool]:
        """This thread's connection and whether it was just opened; the schema exists on return."""
        conn = getattr(self._local, "conn", None)
        fresh = conn is None or conn.closed
        if fresh:
            # autocommit: a read is one statement with no transaction left open; writes say
            # `with conn.transaction()` and get BEGIN ... COMMIT.
            conn = self._psycopg.connect(**self._params, autocommit=True, row_factory=self._dict_row)
            self._local.conn = conn
            with self._state_lock:
                self._open.add(conn)
        if not self._schema_ready:
            self._create_schema(conn)
        return conn, fresh

    def _create_schema(self, conn: Any) -> None:
        with self._schema_lock:  # threads of this process queue here; other processes on the lock
            if self._schema_ready:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._schema_lock_key,))
                for statement in self._schema:
                    conn.execute(statement)
                if self._seed is not None:
                    self._seed(conn)
            self._schema_ready = True

    def _discard(self, conn: Any) -> None:
        """Close and forget a connection that failed; the thread's next call opens a new one."""
        with self._state_lock:
            self._open.discard(conn)
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        try:
            conn.close()
        except Exception:  # already broken: nothing left to close cleanly
            pass

    def close(self) -> None:
        """Close every thread's connection (tests, or a store being replaced)."""
        with self._state_lock:
            connections, self._open = self._open, set()
        for conn in connections:
            try:
                conn.close()
            except Exception:
                pass

    # -- operations -------------------------------------------------------------------------

    def run(self, work: Callable[[Any], T], *, write: bool = False) -> T:
        """``work(connection)``, in one transaction if ``write``; DatabaseUnavailable on an outage.

        Errors that aren't about reaching the server (a constraint, bad SQL) propagate as they are.
        """
        unreachable = (self._psycopg.OperationalError, self._psycopg.InterfaceError)
        for attempt in (1, 2):
            conn = None
            fresh = committing = False
            try:
                conn, fresh = self._connection()
                if not write:
                    result = work(conn)
                else:
                    with conn.transaction():
                        result = work(conn)
                        committing = True  # the body is done: a failure from here is the COMMIT's
            except unreachable as exc:
                broken_while_idle = conn is not None and conn.broken and not fresh and not committing
                failed = conn if conn is not None else getattr(self._local, "conn", None)
                if failed is not None:  # failed in the work, or while creating the schema
                    self._discard(failed)
                if attempt == 1 and broken_while_idle:
                    logger.debug("PostgreSQL connection to %s was lost while idle; reconnecting", self.where)
                    continue
                self._mark_down(exc)
                raise DatabaseUnavailable(str(exc).strip() or type(exc).__name__) from exc
            self._mark_up()
            return result
        raise AssertionError("unreachable")  # the loop returns or raises

    def _mark_down(self, exc: BaseException) -> None:
        with self._state_lock:
            first, self._down = not self._down, True
        if first:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            logger.warning("PostgreSQL at %s is unavailable (%s); %s", self.where, reason[:300], self._outage_effect)

    def _mark_up(self) -> None:
        if not self._down:  # the common case, without the lock
            return
        with self._state_lock:
            was_down, self._down = self._down, False
        if was_down:
            logger.info("PostgreSQL at %s is reachable again", self.where)
