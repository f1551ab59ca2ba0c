"""The pharmacy's business functions, and the store behind them (SQLite or PostgreSQL).

This module owns everything the voice agent can *do* for a caller:

* ``get_drug_info``  - describe a drug from the catalogue (use, dosage, side
  effects, price, whether a prescription is needed);
* ``place_order``    - record an order for a drug;
* ``lookup_order``   - read an order back by its number.

They are exposed to the bridge through ``function_map``, a fixed contract:
the bridge imports that dict, looks up the function the LLM asked for, calls it
with keyword arguments parsed from the LLM's JSON, in a worker thread, and
sends the returned dict back to the agent. Every result is therefore a plain,
JSON-serialisable dict worded so the agent can read it aloud; failures the
caller can fix (unknown drug, bad quantity, unknown order number) come back as
``{"error": "..."}`` rather than exceptions, and so do a name holding a
character no database takes (a NUL, half of a character) and an order system
that can't be reached right now.

The catalogue and the orders live in a ``PharmacyStore``: one interface (the
business operations, written once) over two backends that each supply four
small queries.

* ``SQLiteStore``, the embedded default: a file at ``PHARMACY_DB``, standard
  library only. Orders carry customers' names and medicines, so a database file
  this module creates is owner-only (0600), as are SQLite's side files, and so
  is a directory it creates for it (0700). One process, or several on one
  machine (``--workers``), share it. A store keeps to the file it opened: if
  the path stops naming it (deleted, moved, replaced), orders are refused
  rather than written where they would be lost.
* ``PostgresStore``, when ``DATABASE_URL`` is set (``postgresql://...``): the
  store for several bridge processes on several machines, e.g. pods behind a
  load balancer, which must all see the same orders. It needs psycopg 3
  (``pip install -r requirements-postgres.txt``), imported only then;
  connections, timeouts and outages are handled by ``bridge.storage.postgres``.

Both create their tables and seed the catalogue on first use, once even when
many processes start together, and give every order a distinct number however
many processes place orders at once.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final, TypeVar

from bridge.storage.postgres import DatabaseUnavailable, PostgresConnections
from bridge.records import make_private_dirs

logger = logging.getLogger(__name__)

CURRENCY: Final = "USD"
MIN_QUANTITY: Final = 1
MAX_QUANTITY: Final = 100
ORDER_STATUS_PLACED: Final = "placed"

# What the agent tells the caller when the database can't be reached (PostgreSQL down, or too
# slow). Worded to be said aloud; the details are in the log.
UNAVAILABLE_MESSAGE: Final = (
    "I can't reach the order system right now. Please try again in a few minutes."
)

# Order numbers are 64-bit in both databases; a longer number spoken by a caller is no order.
MAX_ORDER_ID: Final = 2**63 - 1

# Seconds a connection waits for another writer's lock before giving up.
# Many calls can place orders at the same moment; they must queue, not fail.
# Kept under the bridge's default FUNCTION_TIMEOUT_SECONDS (10), so that an
# order stuck behind a lock fails on its own before the agent is told it took
# too long. With a lower FUNCTION_TIMEOUT_SECONDS, such an order may still go
# through afterwards; the call record then shows it as function_finished_late.
BUSY_TIMEOUT_SECONDS: Final = 5.0

# Owner-only, and so are the folders made for it (0700). SQLite creates its
# -wal, -shm and -journal files with the database file's own permission bits
# (it fchmods them to match, whatever the umask), so a database file made 0600
# keeps its side files 0600 too.
DB_FILE_MODE: Final = 0o600

# Relative to this file rather than the working directory, so the bridge finds
# the same orders however it is started. PHARMACY_DB overrides it.
DEFAULT_DB_PATH: Final = Path(__file__).resolve().parent / "data" / "pharmacy.db"

# The catalogue seeded into an empty database. Wording is for speech: units are
# spelled out ("milligrams", not "mg") because the agent reads these aloud.
# This is demo data, not medical advice.
SEED_DRUGS: Final[tuple[dict[str, Any], ...]] = (
    {
        "name": "Ibuprofen",
        "description": "A pain reliever and fever reducer that also eases inflammation, such as headaches, muscle aches and menstrual cramps.",
        "dosage": "200 to 400 milligrams every 4 to 6 hours as needed with food, no more than 1,200 milligrams a day unless a doctor advises otherwise.",
        "side_effects": "Upset stomach, heartburn, nausea and dizziness.",
        "price": 8.99,
        "prescription_required": False,
    },
    {
        "name": "Acetaminophen",
        "description": "A pain reliever and fever reducer for headaches, aches and colds.",
        "dosage": "500 to 1,000 milligrams every 4 to 6 hours as needed, no more than 3,000 milligrams a day unless a doctor advises otherwise.",
        "side_effects": "Rare at normal doses; too much can cause serious liver damage, especially with alcohol.",
        "price": 7.49,
        "prescription_required": False,
    },
    {
        "name": "Amoxicillin",
        "description": "An antibiotic for bacterial infections such as ear, throat and urinary tract infections.",
        "dosage": "500 milligrams every 8 hours or 875 milligrams every 12 hours, taking the full course prescribed.",
        "side_effects": "Diarrhea, nausea and skin rash.",
        "price": 12.50,
        "prescription_required": True,
    },
    {
        "name": "Lisinopril",
        "description": "A blood pressure medicine used for high blood pressure and heart failure.",
        "dosage": "10 milligrams once a day to start, usually 20 to 40 milligrams once a day.",
        "side_effects": "Dry cough, dizziness, headache and raised potassium.",
        "price": 10.00,
        "prescription_required": True,
    },
    {
        "name": "Metformin",
        "description": "A medicine that lowers blood sugar in type 2 diabetes.",
        "dosage": "500 milligrams twice a day with meals to start, up to 2,000 milligrams a day.",
        "side_effects": "Diarrhea, nausea, stomach upset and a metallic taste.",
        "price": 9.00,
        "prescription_required": True,
    },
    {
        "name": "Atorvastatin",
        "description": "A statin that lowers cholesterol and the risk of heart attack and stroke.",
        "dosage": "10 to 20 milligrams once a day, up to 80 milligrams a day.",
        "side_effects": "Muscle aches, joint pain and diarrhea.",
        "price": 15.00,
        "prescription_required": True,
    },
    {
        "name": "Omeprazole",
        "description": "An acid reducer for frequent heartburn and acid reflux.",
        "dosage": "20 milligrams once a day before breakfast for up to 14 days.",
        "side_effects": "Headache, stomach pain, nausea and diarrhea.",
        "price": 14.99,
        "prescription_required": False,
    },
    {
        "name": "Cetirizine",
        "description": "An antihistamine for allergy symptoms such as sneezing, runny nose, itchy eyes and hives.",
        "dosage": "10 milligrams once a day.",
        "side_effects": "Drowsiness, dry mouth and tiredness.",
        "price": 11.99,
        "prescription_required": False,
    },
    {
        "name": "Loratadine",
        "description": "A non-drowsy antihistamine for hay fever and other allergy symptoms.",
        "dosage": "10 milligrams once a day.",
        "side_effects": "Headache, dry mouth and, rarely, drowsiness.",
        "price": 10.99,
        "prescription_required": False,
    },
)

# NOCASE on the key makes "IBUPROFEN" and "ibuprofen" the same drug both for
# lookups and for the primary key, so a reseed can never add a case-variant.
_SCHEMA: Final[tuple[str, ...]] = (
    """
    CREATE TABLE IF NOT EXISTS drugs (
        name                  TEXT PRIMARY KEY COLLATE NOCASE,
        description           TEXT NOT NULL,
        dosage                TEXT NOT NULL,
        side_effects          TEXT NOT NULL,
        price                 REAL NOT NULL CHECK (price >= 0),
        prescription_required INTEGER NOT NULL CHECK (prescription_required IN (0, 1))
    )
    """,
    # AUTOINCREMENT so an order number is never reused, even after the newest
    # order is deleted: a caller may read an old number back to us.
    """
    CREATE TABLE IF NOT EXISTS orders (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        customer_name TEXT NOT NULL,
        drug_name     TEXT NOT NULL,
        quantity      INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 100),
        total         REAL NOT NULL,
        status        TEXT NOT NULL,
        created_at    TEXT NOT NULL
    )
    """,
)


# Characters no text argument may hold. NUL: PostgreSQL can't store it in text (psycopg raises
# DataError), and C code reading the text would stop at it. A lone surrogate (what JSON's
# "\ud800" decodes to): half of a character, which no UTF-8 encoder takes (sqlite3 and psycopg
# raise UnicodeEncodeError). Neither comes from speech, only from a broken or hostile agent.
_UNUSABLE_CHARACTER: Final = re.compile("[\x00\ud800-\udfff]")


class UnusableText(ValueError):
    """A text argument holds a character no store takes; ``answer`` is for the agent to say."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the {what} holds a NUL or a lone surrogate")
        self.what = what
        self.answer = f"That {what} has a character in it that I can't use. Please say it again."


def _normalise_name(value: object, what: str) -> str:
    """Trim and collapse whitespace; speech-to-text often pads or doubles spaces.

    Raises ``UnusableText`` (naming the argument as ``what``) for a NUL or a lone surrogate, here
    where every name enters, so both backends refuse them alike before any query.
    """
    if value is None:
        return ""
    text = " ".join(str(value).split())
    if _UNUSABLE_CHARACTER.search(text):
        raise UnusableText(what)
    return text


def _parse_quantity(value: object) -> int | None:
    """Return ``value`` as an int in 1..100, or None if it is not one.

    LLMs send numbers as JSON ints, floats ("2.0") or strings ("2"), so all of
    those are accepted when they denote a whole number.
    """
    # bool is an int subclass; "True" pills is never what the caller meant.
    if isinstance(value, bool):
        return None
    number: int
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not value.is_integer():
            return None
        number = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            return None
        number = int(text)
    else:
        return None
    return number if MIN_QUANTITY <= number <= MAX_QUANTITY else None


def _parse_order_id(value: object) -> int | None:
    """Return an order id from 12, "12", " 12 " or "#12"; None if not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        text = value.strip().lstrip("#").strip()
        if text.isascii() and text.isdigit():
            return int(text)
    return None


def _create_private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 (and missing folders 0700) unless it exists.

    Created by us rather than by sqlite3.connect, which would make it 0644 under
    the usual umask. The mode is given to the open itself, not set by a chmod
    afterwards, so the file is never readable by others, even for a moment.
    SQLite takes an empty file as a new database. An existing file, and its
    mode, are left alone: O_EXCL never opens it.
    """
    make_private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, DB_FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


_ORDER_COLUMNS: Final = "id, customer_name, drug_name, quantity, total, status, created_at"

R = TypeVar("R")


def _order_dict(row: Mapping[str, Any]) -> dict[str, Any]:
    """Shape an orders row as the dict both place_order and lookup_order return."""
    created_at = row["created_at"]
    if isinstance(created_at, datetime):  # PostgreSQL's timestamptz; SQLite keeps the text
        created_at = created_at.astimezone(timezone.utc).isoformat(timespec="seconds")
    return {
        "order_id": row["id"],
        "customer_name": row["customer_name"],
        "drug_name": row["drug_name"],
        "quantity": row["quantity"],
        "total": row["total"],
        "currency": CURRENCY,
        "status": row["status"],
        "created_at": created_at,
    }


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """SQLite's "database is locked" / "database is busy": another connection holds the lock."""
    return "locked" in str(exc) or "busy" in str(exc)


def _answers_failures(method: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """An unreachable database, or an unusable argument, becomes an answer the agent can say."""

    @functools.wraps(method)
    def answer(*args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return method(*args, **kwargs)
        except DatabaseUnavailable:  # logged once per outage, by bridge.storage.postgres or SQLiteStore
            return {"error": UNAVAILABLE_MESSAGE}
        except UnusableText as exc:
            logger.warning("%s refused its arguments: %s", method.__name__, exc)  # never the text itself
            return {"error": exc.answer}

    return answer


class PharmacyStore(ABC):
    """The drug catalogue and the orders: the business operations, on a backend's four queries.

    A backend implements ``drug_names``, ``_drug``, ``_add_order`` and ``_order``, each safe to
    call from many threads at once, and may raise ``DatabaseUnavailable`` from any of them.
    Everything the caller hears (validation, wording, rounding) is here, once for both.

    ``PharmacyStore(path)`` itself, as written before there were two backends, still opens the
    SQLite file at ``path`` (as ``pathlib.Path(...)`` gives a ``PosixPath``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PharmacyStore:
        return super().__new__(SQLiteStore if cls is PharmacyStore else cls)

    # -- what a backend supplies ----------------------------------------------------------

    @abstractmethod
    def drug_names(self) -> list[str]:
        """All catalogue names, sorted ignoring case, for the agent to offer alternatives."""

    @abstractmethod
    def _drug(self, name: str) -> Mapping[str, Any] | None:
        """The catalogue row whose name equals ``name`` ignoring case, or None."""

    @abstractmethod
    def _add_order(self, customer: str, drug_name: str, quantity: int, created_at: datetime) -> Mapping[str, Any] | None:
        """Insert an order for the drug named ``drug_name`` (ignoring case) and return its row.

        Pricing and inserting happen in one transaction, so the total matches the price at the
        moment the order was written. None, and nothing written, if there is no such drug.
        """

    @abstractmethod
    def _order(self, number: int) -> Mapping[str, Any] | None:
        """The orders row with id ``number``, or None."""

    def close(self) -> None:
        """Release connections (tests, or a store being replaced); the store may be used again."""

    # -- lower-level queries ----------------------------------------------------------------

    def find_drug(self, drug_name: str) -> dict[str, Any] | None:
        """The catalogue entry for ``drug_name`` (any case/spacing), or None; see ``UnusableText``."""
        name = _normalise_name(drug_name, "drug name")
        row = self._drug(name) if name else None
        if row is None:
            return None
        return {
            "name": row["name"],
            "description": row["description"],
            "dosage": row["dosage"],
            "side_effects": row["side_effects"],
            "price": row["price"],
            "currency": CURRENCY,
            "prescription_required": bool(row["prescription_required"]),
        }

    def _unknown_drug(self, drug_name: object) -> dict[str, Any]:
        """The error for a drug we don't stock, with the list to choose from."""
        name = _normalise_name(drug_name, "drug name")
        message = f"We don't carry {name}." if name else "Please say which drug you mean."
        return {"error": message, "available": self.drug_names()}

    # -- business operations (the module-level functions delegate here) -------------------

    @_answers_failures
    def get_drug_info(self, drug_name: str) -> dict[str, Any]:
        """Describe a drug, or list what we carry if we don't have it."""
        drug = self.find_drug(drug_name)
        return drug if drug is not None else self._unknown_drug(drug_name)

    @_answers_failures
    def place_order(self, customer_name: str, drug_name: str, quantity: int | str = 1) -> dict[str, Any]:
        """Record an order and return it with its new order number."""
        customer = _normalise_name(customer_name, "customer name")
        if not customer:
            return {"error": "I need the customer's name to place the order."}
        count = _parse_quantity(quantity)
        if count is None:
            return {
                "error": f"The quantity must be a whole number from {MIN_QUANTITY} to {MAX_QUANTITY}."
            }
        name = _normalise_name(drug_name, "drug name")
        created_at = datetime.now(timezone.utc).replace(microsecond=0)
        row = self._add_order(customer, name, count, created_at) if name else None
        if row is None:
            # Built after the write transaction ends, so listing the catalogue
            # does not hold the write lock.
            return self._unknown_drug(drug_name)
        return _order_dict(row)

    @_answers_failures
    def lookup_order(self, order_id: int | str) -> dict[str, Any]:
        """Read an order back by its number (12, "12", " 12 " or "#12")."""
        number = _parse_order_id(order_id)
        if number is None:
            return {"error": "Order IDs are numbers, like 12. Please read me the order number."}
        row = self._order(number) if 0 <= number <= MAX_ORDER_ID else None
        if row is None:
            return {"error": f"There is no order {number}."}
        return _order_dict(row)


class SQLiteStore(PharmacyStore):
    """The catalogue and orders in one SQLite file: the embedded default.

    Each thread keeps one connection of its own: the bridge runs functions in
    worker threads, and a sqlite3 connection must not be shared across
    threads. Opening one costs about half a millisecond of CPU (more than the
    query), so it is opened once per thread, not per operation. The file must
    be a real path (not ``:memory:``), since each connection would otherwise
    see its own empty database.

    The store keeps to the one file it opened, known by its device and inode.
    A file deleted (or moved, or replaced) while open stays readable and
    writable through the connections that have it, so SQLite would go on
    committing orders that vanish at the next restart, whose order numbers a
    new database would then hand out again. So before each write commits
    (one ``stat``, about a microsecond) and when a thread opens its
    connection, the store checks that ``path`` still names that file; if not,
    that write is rolled back and from then on nothing is written or read:
    every function answers ``UNAVAILABLE_MESSAGE``, and the log says once what
    happened and what to do. A different file at the path, even a
    restored backup or a new empty database another process made, is never
    taken up while the store lives: only a restart opens it. The same file
    moved back (same inode) is taken up again at once.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_seconds: float = BUSY_TIMEOUT_SECONDS) -> None:
        self.path: Path = Path(path)
        self.busy_timeout_seconds = busy_timeout_seconds
        _create_private_file(self.path)
        opened = os.stat(self.path)
        self._file_identity = (opened.st_dev, opened.st_ino)
        # mode=rw: a connection never creates the file (``_create_private_file`` does, owner-only),
        # so a thread connecting after the file vanished can't start an empty database there.
        self._uri = f"file:{urllib.parse.quote(os.fspath(self.path))}?mode=rw"
        self._file_lost = False  # logged as lost; the next check that finds it logs that it is back
        self._file_state_lock = threading.Lock()
        self._thread_connections = threading.local()
        self._initialise()

    @contextmanager
    def _connect(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Yield this thread's connection; with ``write``, inside one committed transaction.

        isolation_level=None turns off the sqlite3 module's implicit
        transactions so we control them, and each read statement sees the
        latest committed data. Writes use BEGIN IMMEDIATE, which takes the
        write lock up front (waiting up to the busy timeout): a deferred
        transaction that reads and then writes can fail at once with "database
        is locked" when another writer got in between, instead of waiting.
        """
        conn: sqlite3.Connection | None = getattr(self._thread_connections, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self._uri, uri=True, timeout=self.busy_timeout_seconds, isolation_level=None)
            except sqlite3.OperationalError:
                self._check_file()  # "unable to open database file": most likely gone from its path
                raise
            try:
                self._check_file()  # a new connection opens whatever the path names now: is it ours?
            except DatabaseUnavailable:
                conn.close()
                raise
            conn.row_factory = sqlite3.Row
            self._thread_connections.conn = conn
        elif conn.in_transaction:
            conn.execute("ROLLBACK")  # a COMMIT that failed last time must not hold the write lock
        if not write:
            yield conn
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _query(self, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """``_connect`` for the business queries: a lock held past the busy timeout is an outage.

        Another process (a backup, a migration, a long write) holding the file's lock is, for the
        caller, the same as a database that is down: nothing was written, and trying again later
        works. So it is ``DatabaseUnavailable``, which the agent can say. So is a file that is no
        longer at its path (``_check_file``): checked before a write commits, and before reads
        only once it has been found gone, so that reads cost no system call.
        """
        if self._file_lost and not write:
            self._check_file()
        try:
            with self._connect(write=write) as conn:
                yield conn
                if write:
                    self._check_file()  # raising here rolls the write back: nothing is acknowledged
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise
            logger.warning(
                "SQLite database %s stayed locked by another connection for %.1f s; the caller is told "
                "to try again later",
                self.path,
                self.busy_timeout_seconds,
            )
            raise DatabaseUnavailable(str(exc)) from exc

    def _check_file(self) -> None:
        """Raise ``DatabaseUnavailable`` unless ``path`` still names the file this store opened."""
        try:
            status = os.stat(self.path)
            problem = None if (status.st_dev, status.st_ino) == self._file_identity else "was replaced by another file"
        except FileNotFoundError:
            problem = "was deleted (or moved, or its folder was)"
        except OSError as exc:
            problem = f"can't be checked ({exc.strerror})"
        if problem is None:
            if self._file_lost:
                self._file_found()
            return
        with self._file_state_lock:
            first, self._file_lost = not self._file_lost, True
        if first:
            logger.warning(
                "SQLite database %s %s while this process (pid %d) had it open; functions answer that "
                "the order system can't be reached, since orders written to the old file would be lost. "
                "If it was moved, move it back and orders resume. Otherwise copy it back out of this "
                "process (docs/troubleshooting.md) or restore a backup, then restart the bridge: started "
                "without it, the bridge makes an empty database whose order numbers begin at 1 again, "
                "numbers callers may already have.",
                self.path,
                problem,
                os.getpid(),
            )
        raise DatabaseUnavailable(f"the SQLite database {self.path} {problem}")

    def _file_found(self) -> None:
        with self._file_state_lock:
            was_lost, self._file_lost = self._file_lost, False
        if was_lost:
            logger.info("SQLite database %s is back at its path; orders are taken again", self.path)

    def _initialise(self) -> None:
        """Create the tables and seed the catalogue once, safely across processes."""
        self._enable_wal()
        with self._connect(write=True) as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            # Seed only an empty catalogue, so drugs an operator removed or
            # repriced stay that way. The check and the insert share one
            # IMMEDIATE transaction, so two processes starting together cannot
            # both seed; OR IGNORE is a second guard against duplicates.
            (count,) = conn.execute("SELECT COUNT(*) FROM drugs").fetchone()
            if count == 0:
                conn.executemany(
                    "INSERT OR IGNORE INTO drugs "
                    "(name, description, dosage, side_effects, price, prescription_required) "
                    "VALUES (:name, :description, :dosage, :side_effects, :price, :prescription_required)",
                    [{**drug, "prescription_required": int(drug["prescription_required"])} for drug in SEED_DRUGS],
                )

    def _enable_wal(self) -> None:
        """Switch the file to WAL, retrying while other openers hold it.

        WAL lets readers carry on while an order is being written. The mode is
        stored in the file, so once set it covers every later connection, in
        this process or another. Switching needs an exclusive lock, and SQLite
        may report "database is locked" at once rather than wait the busy
        timeout when several connections open a new file together, so retry
        here until the same deadline.
        """
        deadline = time.monotonic() + self.busy_timeout_seconds
        delay = 0.005
        while True:
            try:
                with self._connect() as conn:
                    (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
                if str(mode).lower() == "wal":
                    return
                error: Exception = sqlite3.OperationalError(f"journal mode stayed {mode!r}")
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                error = exc
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError(f"could not enable WAL on {self.path}: {error}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def drug_names(self) -> list[str]:
        with self._query() as conn:
            rows = conn.execute("SELECT name FROM drugs ORDER BY name COLLATE NOCASE").fetchall()
        return [row["name"] for row in rows]

    def _drug(self, name: str) -> sqlite3.Row | None:
        with self._query() as conn:
            row: sqlite3.Row | None = conn.execute("SELECT * FROM drugs WHERE name = ?", (name,)).fetchone()
        return row

    def _add_order(self, customer: str, drug_name: str, quantity: int, created_at: datetime) -> sqlite3.Row | None:
        with self._query(write=True) as conn:
            drug = conn.execute("SELECT name, price FROM drugs WHERE name = ?", (drug_name,)).fetchone()
            if drug is None:
                return None
            cursor = conn.execute(
                "INSERT INTO orders (customer_name, drug_name, quantity, total, status, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                # Round to cents: 3 x 0.1 must read aloud as 0.30, not 0.30000000000000004.
                (customer, drug["name"], quantity, round(drug["price"] * quantity, 2), ORDER_STATUS_PLACED,
                 created_at.isoformat(timespec="seconds")),
            )
            # lastrowid is per connection, and this connection is ours
            # alone, so it is this insert's id even with writers racing.
            row: sqlite3.Row | None = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = ?", (cursor.lastrowid,)
            ).fetchone()
        return row

    def _order(self, number: int) -> sqlite3.Row | None:
        with self._query() as conn:
            row: sqlite3.Row | None = conn.execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = ?", (number,)
            ).fetchone()
        return row


# The same tables in PostgreSQL. A unique index on lower(name) does what COLLATE NOCASE does in
# SQLite: "IBUPROFEN" and "ibuprofen" are one drug for lookups and for the key. The identity
# column hands out order numbers from one sequence, so processes placing orders at the same
# moment get distinct numbers; a number is never reused (a failed insert leaves a gap instead).
_PG_SCHEMA: Final[tuple[str, ...]] = (
    """
    CREATE TABLE IF NOT EXISTS drugs (
        name                  TEXT PRIMARY KEY,
        description           TEXT NOT NULL,
        dosage                TEXT NOT NULL,
        side_effects          TEXT NOT NULL,
        price                 DOUBLE PRECISION NOT NULL CHECK (price >= 0),
        prescription_required BOOLEAN NOT NULL
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS drugs_name_ignoring_case ON drugs (lower(name))",
    """
    CREATE TABLE IF NOT EXISTS orders (
        id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        customer_name TEXT NOT NULL,
        drug_name     TEXT NOT NULL,
        quantity      INTEGER NOT NULL CHECK (quantity BETWEEN 1 AND 100),
        total         DOUBLE PRECISION NOT NULL,
        status        TEXT NOT NULL,
        created_at    TIMESTAMPTZ NOT NULL
    )
    """,
)


class PostgresStore(PharmacyStore):
    """The catalogue and orders in a PostgreSQL database, shared by every bridge process.

    ``bridge.storage.postgres`` keeps a connection per worker thread, bounds every wait, and turns an
    unreachable server into ``DatabaseUnavailable`` (the caller hears ``UNAVAILABLE_MESSAGE``);
    the next call reconnects. Nothing connects until the first call, which creates the tables
    and seeds the catalogue if they aren't there yet.
    """

    def __init__(self, url: str, **timeouts: int) -> None:
        """``timeouts``: bridge.storage.postgres' connect_timeout_seconds and statement_timeout_ms."""
        self.url = url
        self._db = PostgresConnections(url, _PG_SCHEMA, _seed_postgres, **timeouts)

    def close(self) -> None:
        self._db.close()

    def _run(self, work: Callable[[Any], R], *, write: bool = False) -> R:
        return self._db.run(work, write=write)

    def drug_names(self) -> list[str]:
        rows = self._run(lambda conn: conn.execute("SELECT name FROM drugs ORDER BY lower(name), name").fetchall())
        return [row["name"] for row in rows]

    def _drug(self, name: str) -> Mapping[str, Any] | None:
        return self._run(lambda conn: conn.execute("SELECT * FROM drugs WHERE lower(name) = lower(%s)", (name,)).fetchone())

    def _add_order(self, customer: str, drug_name: str, quantity: int, created_at: datetime) -> Mapping[str, Any] | None:
        def add(conn: Any) -> Mapping[str, Any] | None:
            drug = conn.execute("SELECT name, price FROM drugs WHERE lower(name) = lower(%s)", (drug_name,)).fetchone()
            if drug is None:
                return None
            row: Mapping[str, Any] | None = conn.execute(
                "INSERT INTO orders (customer_name, drug_name, quantity, total, status, created_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_ORDER_COLUMNS}",
                (customer, drug["name"], quantity, round(drug["price"] * quantity, 2), ORDER_STATUS_PLACED, created_at),
            ).fetchone()
            return row

        return self._run(add, write=True)

    def _order(self, number: int) -> Mapping[str, Any] | None:
        return self._run(lambda conn: conn.execute(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE id = %s", (number,)).fetchone())


def _seed_postgres(conn: Any) -> None:
    """Seed an empty catalogue (runs under bridge.storage.postgres' schema lock, in its transaction).

    As with SQLite, only an empty one, so drugs an operator removed or repriced stay that way.
    """
    if conn.execute("SELECT 1 FROM drugs LIMIT 1").fetchone() is None:
        conn.cursor().executemany(
            "INSERT INTO drugs (name, description, dosage, side_effects, price, prescription_required) "
            "VALUES (%(name)s, %(description)s, %(dosage)s, %(side_effects)s, %(price)s, %(prescription_required)s) "
            "ON CONFLICT DO NOTHING",
            SEED_DRUGS,
        )


# -- the store the module-level functions use ---------------------------------

_stores: dict[tuple[str, str], PharmacyStore] = {}
_stores_lock = threading.Lock()


def get_store() -> PharmacyStore:
    """PostgreSQL at $DATABASE_URL if set, else the SQLite file at $PHARMACY_DB.

    (PHARMACY_DB defaults to data/pharmacy.db beside this file.) Read on every
    call, not at import, so tests and deployments can set them any time before
    use, and a changed value takes effect. Stores are cached per setting so the
    schema/seed work happens once per database; the lock stops two worker
    threads building the same store at once.
    """
    url = os.environ.get("DATABASE_URL", "").strip()
    raw = os.environ.get("PHARMACY_DB", "").strip()
    # Keyed by the raw setting so the common case costs a dict lookup, not a path resolution.
    key = ("postgresql", url) if url else ("sqlite", raw)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if url:
                store = PostgresStore(url)
            else:
                # A relative PHARMACY_DB is taken from this project's folder, like the default, so
                # the same orders are found whichever directory the bridge is started from.
                path = (DEFAULT_DB_PATH.parent.parent / raw).resolve() if raw else DEFAULT_DB_PATH
                store = SQLiteStore(path)
            _stores[key] = store
        return store


def get_drug_info(drug_name: str) -> dict[str, Any]:
    """Describe a drug: what it's for, dosage, side effects, price, prescription."""
    return get_store().get_drug_info(drug_name)


def place_order(customer_name: str, drug_name: str, quantity: int = 1) -> dict[str, Any]:
    """Place an order for ``quantity`` (1-100) of a drug; returns the order number."""
    return get_store().place_order(customer_name, drug_name, quantity)


def lookup_order(order_id: int | str) -> dict[str, Any]:
    """Look up an order by its number."""
    return get_store().lookup_order(order_id)


# Fixed contract with the bridge: function name the LLM calls -> implementation.
function_map: dict[str, Callable[..., Any]] = {
    "get_drug_info": get_drug_info,
    "place_order": place_order,
    "lookup_order": lookup_order,
}
