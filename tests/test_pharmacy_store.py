"""Tests for pharmacy_functions: the catalogue, orders and their store, on both backends.

Every test of the store's behaviour runs twice: on SQLite (a file in the test's folder) and on
PostgreSQL (a fresh database on the session's real server, tests/postgres_server.py). Tests of
one backend's own concerns (SQLite's file and WAL; PostgreSQL's outages and timeouts) say so.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

# The module under test sits at the project root.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pharmacy_functions as pf  # noqa: E402
from pharmacy_functions import PharmacyStore, PostgresStore, SQLiteStore  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402

ORDER_KEYS = {"order_id", "customer_name", "drug_name", "quantity", "total", "currency", "status", "created_at"}
DRUG_KEYS = {"name", "description", "dosage", "side_effects", "price", "currency", "prescription_required"}
UNAVAILABLE = {"error": pf.UNAVAILABLE_MESSAGE}


@dataclass
class Backend:
    """One database of one backend, for one test: open stores on it, read it directly."""

    kind: str  # "sqlite" or "postgresql"
    target: str  # the SQLite file's path, or the PostgreSQL URL
    server: PostgresServer | None = None
    opened: list[PharmacyStore] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The settings that point pharmacy_functions (in this process or a child) at it."""
        return {"DATABASE_URL": self.target} if self.kind == "postgresql" else {"PHARMACY_DB": self.target}

    def open(self) -> PharmacyStore:
        """A new store on this database, as a new process (or a restart) would open it."""
        store: PharmacyStore = PostgresStore(self.target) if self.kind == "postgresql" else SQLiteStore(self.target)
        self.opened.append(store)
        return store

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """Run ``statement`` directly, independent of the code under test, and commit."""
        if self.server is not None:
            return self.server.rows(self.target, statement)
        conn = sqlite3.connect(self.target)
        try:
            with conn:
                return conn.execute(statement).fetchall()
        finally:
            conn.close()

    def has_tables(self) -> bool:
        if self.server is None:
            return Path(self.target).exists()
        return self.sql("SELECT to_regclass('orders') IS NOT NULL")[0][0]

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Backend]]:
    """Makes a new, empty database of the test's backend each time it is called."""
    made: list[Backend] = []
    server: PostgresServer | None = None
    if request.param == "postgresql":
        server = request.getfixturevalue("postgres_server")
        if not server.running:
            server.start()

    def make() -> Backend:
        if server is not None:
            backend = Backend("postgresql", server.create_database(), server)
        else:
            backend = Backend("sqlite", str(tmp_path / f"db-{len(made)}" / "pharmacy.db"))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()
        if server is not None:
            server.drop_database(backend.target)


@pytest.fixture
def backend(new_backend: Callable[[], Backend]) -> Backend:
    return new_backend()


@pytest.fixture
def store(backend: Backend) -> PharmacyStore:
    opened = backend.open()
    opened.drug_names()  # PostgreSQL creates its tables on first use, SQLite on opening
    return opened


@pytest.fixture
def db_env(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """Point the module-level functions at this test's database, through the environment."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    for name, value in backend.env.items():
        monkeypatch.setenv(name, value)
    stores: dict[Any, PharmacyStore] = {}
    monkeypatch.setattr(pf, "_stores", stores)  # a cache of this test's own
    yield backend
    for opened in stores.values():
        opened.close()


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read a SQLite file directly, independent of the code under test."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- catalogue ------------------------------------------------------------------


def test_new_store_seeds_the_catalogue(backend: Backend) -> None:
    assert not backend.has_tables()
    store = backend.open()

    names = store.drug_names()
    assert backend.has_tables()
    assert len(names) == len(pf.SEED_DRUGS)
    assert 8 <= len(names) <= 10
    assert names == sorted(names)
    assert {"Ibuprofen", "Acetaminophen", "Amoxicillin"} <= set(names)
    assert backend.sql("SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]


def test_sqlite_store_creates_its_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "pharmacy.db"
    SQLiteStore(path)
    assert path.is_file()


def test_sqlite_store_uses_wal_journal_mode(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "pharmacy.db")
    assert _rows(store.path, "PRAGMA journal_mode") == [("wal",)]


def test_every_seeded_drug_is_complete(store: PharmacyStore) -> None:
    for name in store.drug_names():
        info = store.get_drug_info(name)
        assert set(info) == DRUG_KEYS
        assert info["name"] == name
        for field_name in ("description", "dosage", "side_effects"):
            assert isinstance(info[field_name], str) and info[field_name].strip()
        assert isinstance(info["price"], float) and info["price"] > 0
        assert info["currency"] == "USD"
        assert isinstance(info["prescription_required"], bool)


def test_get_drug_info_returns_catalogue_entry(store: PharmacyStore) -> None:
    info = store.get_drug_info("Amoxicillin")

    seed = next(d for d in pf.SEED_DRUGS if d["name"] == "Amoxicillin")
    assert info == {**seed, "currency": "USD"}
    assert info["prescription_required"] is True
    assert store.get_drug_info("Ibuprofen")["prescription_required"] is False
    json.dumps(info)  # must be sendable to the agent as-is


@pytest.mark.parametrize("spoken", ["ibuprofen", "IBUPROFEN", "  Ibuprofen  ", "\tiBuPrOfEn\n"])
def test_drug_name_matching_ignores_case_and_surrounding_space(store: PharmacyStore, spoken: str) -> None:
    info = store.get_drug_info(spoken)
    assert "error" not in info
    assert info["name"] == "Ibuprofen"


@pytest.mark.parametrize("unknown", ["unobtainium", "ibuprofe", "", "   "])
def test_unknown_drug_returns_error_and_available_list(store: PharmacyStore, unknown: str) -> None:
    result = store.get_drug_info(unknown)

    assert set(result) == {"error", "available"}
    assert result["available"] == sorted(d["name"] for d in pf.SEED_DRUGS)
    if unknown.strip():
        assert result["error"] == f"We don't carry {unknown}."


def test_a_case_variant_of_a_drug_cannot_be_added(backend: Backend) -> None:
    backend.open().drug_names()
    with pytest.raises(Exception, match="(?i)unique"):
        backend.sql(
            "INSERT INTO drugs (name, description, dosage, side_effects, price, prescription_required) "
            "VALUES ('IBUPROFEN', 'd', 'd', 's', 1.0, FALSE)"
        )


def test_seeding_twice_on_one_database_does_not_duplicate_drugs(backend: Backend) -> None:
    first = backend.open()
    second = backend.open()

    assert first.drug_names() == second.drug_names()
    assert backend.sql("SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]


def test_seeding_skips_a_catalogue_that_is_not_empty(backend: Backend) -> None:
    backend.open().drug_names()
    backend.sql("DELETE FROM drugs WHERE name = 'Metformin'")

    store = backend.open()  # a restart must not bring a removed drug back

    assert "Metformin" not in store.drug_names()
    assert len(store.drug_names()) == len(pf.SEED_DRUGS) - 1


def test_concurrent_first_use_of_one_database_seeds_once(new_backend: Callable[[], Backend]) -> None:
    # Several fresh databases, each opened by many stores (as many processes would) at the same
    # instant: creating the schema (SQLite's switch to WAL too) and seeding must cope with racing.
    openers = 16
    for _attempt in range(3):
        backend = new_backend()
        barrier = threading.Barrier(openers)

        def open_store() -> list[str]:
            barrier.wait()
            return backend.open().drug_names()

        with ThreadPoolExecutor(max_workers=openers) as pool:
            results = list(pool.map(lambda _: open_store(), range(openers)))

        assert all(names == results[0] for names in results)
        assert len(results[0]) == len(pf.SEED_DRUGS)
        assert backend.sql("SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]
        if backend.kind == "sqlite":
            assert backend.sql("PRAGMA journal_mode") == [("wal",)]


_CHILD_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import pharmacy_functions as pf
ids = [pf.place_order("Process", "Ibuprofen", 1)["order_id"] for _ in range(10)]
print(",".join(map(str, ids)))
"""


def test_separate_processes_share_one_database(backend: Backend) -> None:
    # Separate bridge processes (or a restart overlapping the old one) start on
    # the same fresh database: one seed, no lost or shared order ids.
    env = {name: value for name, value in os.environ.items() if name not in {"DATABASE_URL", "PHARMACY_DB"}}
    env.update(backend.env)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD_SCRIPT, _ROOT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    ids: list[int] = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        ids += [int(i) for i in out.strip().split(",")]

    assert len(ids) == 40 and len(set(ids)) == 40
    assert backend.sql("SELECT COUNT(*) FROM orders") == [(40,)]
    assert backend.sql("SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]


# -- placing orders -------------------------------------------------------------


def test_place_order_returns_the_stored_order(backend: Backend, store: PharmacyStore) -> None:
    before = datetime.now(timezone.utc).replace(microsecond=0)
    order = store.place_order(customer_name="  Jane   Doe ", drug_name=" amoxicillin ", quantity=3)
    after = datetime.now(timezone.utc)

    assert set(order) == ORDER_KEYS
    assert isinstance(order["order_id"], int)
    assert order["customer_name"] == "Jane Doe"
    assert order["drug_name"] == "Amoxicillin"  # canonical name, not as spoken
    assert order["quantity"] == 3
    assert order["total"] == 37.5  # 3 x 12.50
    assert order["currency"] == "USD"
    assert order["status"] == "placed"
    created = datetime.fromisoformat(order["created_at"])
    assert created.utcoffset() is not None and created.utcoffset().total_seconds() == 0
    assert order["created_at"].endswith("+00:00")
    assert before <= created <= after
    json.dumps(order)

    rows = backend.sql("SELECT id, customer_name, drug_name, quantity, total, status FROM orders")
    assert rows == [(order["order_id"], "Jane Doe", "Amoxicillin", 3, 37.5, "placed")]


@pytest.mark.parametrize(("drug", "quantity", "total"), [("Ibuprofen", 27, 242.73), ("Omeprazole", 11, 164.89)])
def test_place_order_total_has_no_float_noise(
    backend: Backend, store: PharmacyStore, drug: str, quantity: int, total: float
) -> None:
    # 8.99 * 27 is 242.73000000000002 in floating point; the agent must say 242.73.
    result = store.place_order("Sam", drug, quantity)
    assert result["total"] == total
    assert repr(result["total"]) == repr(total)
    assert backend.sql("SELECT total FROM orders") == [(total,)]


def test_place_order_total_is_price_times_quantity(store: PharmacyStore) -> None:
    for name in store.drug_names():
        price = store.get_drug_info(name)["price"]
        for quantity in (1, 3, 7, 100):
            total = store.place_order("Sam", name, quantity)["total"]
            assert total == round(price * quantity, 2)
            assert total == round(total, 2)


def test_place_order_quantity_defaults_to_one(store: PharmacyStore) -> None:
    order = store.place_order("Sam", "Cetirizine")
    assert order["quantity"] == 1
    assert order["total"] == store.get_drug_info("cetirizine")["price"]


@pytest.mark.parametrize(("given", "expected"), [(1, 1), (100, 100), ("2", 2), (" 7 ", 7), (4.0, 4)])
def test_place_order_accepts_whole_number_quantities(store: PharmacyStore, given: object, expected: int) -> None:
    order = store.place_order("Sam", "Loratadine", given)  # type: ignore[arg-type]
    assert order["quantity"] == expected


@pytest.mark.parametrize("bad", [0, -1, 101, 2.5, "two", "", "2.5", "-3", None, True, [2]])
def test_place_order_rejects_bad_quantities(backend: Backend, store: PharmacyStore, bad: object) -> None:
    result = store.place_order("Sam", "Loratadine", bad)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert "1" in result["error"] and "100" in result["error"]
    assert backend.sql("SELECT COUNT(*) FROM orders") == [(0,)]


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_place_order_requires_a_customer_name(backend: Backend, store: PharmacyStore, blank: object) -> None:
    result = store.place_order(blank, "Ibuprofen", 1)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert backend.sql("SELECT COUNT(*) FROM orders") == [(0,)]


def test_place_order_for_unknown_drug_lists_what_we_carry(backend: Backend, store: PharmacyStore) -> None:
    result = store.place_order("Sam", "Unobtainium", 2)

    assert result == {"error": "We don't carry Unobtainium.", "available": store.drug_names()}
    assert backend.sql("SELECT COUNT(*) FROM orders") == [(0,)]


def test_order_ids_increase(store: PharmacyStore) -> None:
    ids = [store.place_order("Sam", "Ibuprofen")["order_id"] for _ in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


# -- looking orders up ----------------------------------------------------------


def test_lookup_order_accepts_int_and_string_forms(store: PharmacyStore) -> None:
    for _ in range(11):
        store.place_order("Filler", "Ibuprofen")
    placed = store.place_order("Jane Doe", "Omeprazole", 2)
    assert placed["order_id"] == 12

    for form in (12, "12", " 12 ", "#12", "# 12"):
        assert store.lookup_order(form) == placed, form


def test_lookup_unknown_order(store: PharmacyStore) -> None:
    assert store.lookup_order(12) == {"error": "There is no order 12."}
    assert store.lookup_order("12") == {"error": "There is no order 12."}


def test_lookup_of_a_number_beyond_64_bits_is_no_order(store: PharmacyStore) -> None:
    # A caller may read out any digits; the databases' ids are 64-bit and must not overflow.
    assert store.lookup_order("99999999999999999999") == {"error": "There is no order 99999999999999999999."}
    assert store.lookup_order(2**63 - 1) == {"error": f"There is no order {2**63 - 1}."}


@pytest.mark.parametrize("bad", ["twelve", "", "12a", "1.5", None, True])
def test_lookup_non_numeric_order_id(store: PharmacyStore, bad: object) -> None:
    result = store.lookup_order(bad)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert result["error"].startswith("Order IDs are numbers")


def test_orders_survive_reopening_the_database(backend: Backend) -> None:
    placed = backend.open().place_order("Jane Doe", "Lisinopril", 2)

    reopened = backend.open()  # as after a restart

    assert reopened.lookup_order(placed["order_id"]) == placed
    assert reopened.place_order("Sam", "Ibuprofen")["order_id"] == placed["order_id"] + 1


# -- concurrency ----------------------------------------------------------------


def test_fifty_concurrent_orders_get_distinct_ids_and_none_are_lost(db_env: Backend) -> None:
    workers = 50
    start = threading.Barrier(workers)  # release every thread at once to maximise contention

    def order(i: int) -> dict[str, Any]:
        start.wait()
        return pf.place_order(customer_name=f"Customer {i}", drug_name="ibuprofen", quantity=(i % 5) + 1)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(order, range(workers)))

    assert all("error" not in r for r in results), results
    ids = [r["order_id"] for r in results]
    assert len(set(ids)) == workers

    rows = db_env.sql("SELECT id, customer_name, quantity FROM orders")
    assert len(rows) == workers
    assert {row[0] for row in rows} == set(ids)
    # Each caller's id points at that caller's own row, not a neighbour's.
    by_id = {row[0]: (row[1], row[2]) for row in rows}
    for i, result in enumerate(results):
        assert by_id[result["order_id"]] == (f"Customer {i}", (i % 5) + 1)
        assert pf.lookup_order(str(result["order_id"])) == result


# -- module-level functions and the bridge contract -----------------------------


def test_function_map_is_the_bridge_contract() -> None:
    assert pf.function_map == {
        "get_drug_info": pf.get_drug_info,
        "place_order": pf.place_order,
        "lookup_order": pf.lookup_order,
    }


def test_module_functions_use_the_configured_store_and_accept_llm_keyword_args(db_env: Backend) -> None:
    assert not db_env.has_tables()  # nothing is created until first use

    arguments = json.loads('{"customer_name": "Jane", "drug_name": "METFORMIN", "quantity": "2"}')
    order = pf.function_map["place_order"](**arguments)
    info = pf.function_map["get_drug_info"](**{"drug_name": "metformin"})
    found = pf.function_map["lookup_order"](**{"order_id": str(order["order_id"])})

    assert db_env.has_tables()
    assert isinstance(pf.get_store(), PostgresStore if db_env.kind == "postgresql" else SQLiteStore)
    assert order["total"] == round(info["price"] * 2, 2)
    assert found == order
    assert db_env.sql("SELECT COUNT(*) FROM orders") == [(1,)]


def test_get_store_follows_changes_to_pharmacy_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.db", tmp_path / "b.db"

    monkeypatch.setenv("PHARMACY_DB", str(first))
    store_a = pf.get_store()
    assert pf.get_store() is store_a  # cached per path
    pf.place_order("Jane", "Ibuprofen")

    monkeypatch.setenv("PHARMACY_DB", str(second))
    store_b = pf.get_store()
    assert isinstance(store_b, SQLiteStore) and store_b is not store_a
    assert store_b.path.resolve() == second.resolve()
    assert pf.lookup_order(1) == {"error": "There is no order 1."}

    assert _rows(first, "SELECT COUNT(*) FROM orders") == [(1,)]
    assert _rows(second, "SELECT COUNT(*) FROM orders") == [(0,)]


def test_database_url_wins_over_pharmacy_db_and_follows_changes(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = Backend("postgresql", postgres_server.create_database(), postgres_server)
    second = Backend("postgresql", postgres_server.create_database(), postgres_server)
    monkeypatch.setattr(pf, "_stores", {})
    monkeypatch.setenv("PHARMACY_DB", str(tmp_path / "unused.db"))
    try:
        monkeypatch.setenv("DATABASE_URL", first.target)
        store_a = pf.get_store()
        assert isinstance(store_a, PostgresStore) and pf.get_store() is store_a
        pf.place_order("Jane", "Ibuprofen")

        monkeypatch.setenv("DATABASE_URL", second.target)
        assert pf.get_store() is not store_a
        assert pf.lookup_order(1) == {"error": "There is no order 1."}
    finally:
        for opened in pf._stores.values():
            opened.close()
    assert first.sql("SELECT COUNT(*) FROM orders") == [(1,)]
    assert second.sql("SELECT COUNT(*) FROM orders") == [(0,)]
    assert not (tmp_path / "unused.db").exists()
    for backend in (first, second):
        postgres_server.drop_database(backend.target)


def test_relative_pharmacy_db_is_taken_from_the_project_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pharmacy_functions

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHARMACY_DB", "data/test-relative.db")
    expected = Path(pharmacy_functions.__file__).resolve().parent / "data" / "test-relative.db"
    try:
        store = pharmacy_functions.get_store()
        assert isinstance(store, SQLiteStore) and store.path == expected
        assert not (tmp_path / "data").exists()
    finally:
        expected.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(expected) + suffix).unlink(missing_ok=True)


# -- PostgreSQL: outages and bounded waits --------------------------------------


def _with_password(url: str, password: str) -> str:
    """The server trusts local connections, so a password in the URL is accepted and unused."""
    return url.replace("postgresql://postgres@", f"postgresql://postgres:{password}@", 1)


def _postgres_log(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.storage.postgres" and r.levelno == level]


def test_a_postgres_outage_is_an_answer_the_agent_can_say_and_the_store_recovers(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(_with_password(postgres_url, "s3cret-pw"))
    try:
        placed = store.place_order("Jane", "Ibuprofen", 2)
        caplog.set_level(logging.INFO, logger="bridge.storage.postgres")
        postgres_server.stop()
        try:
            for _ in range(3):
                started = time.monotonic()
                assert store.lookup_order(placed["order_id"]) == UNAVAILABLE
                assert store.place_order("Sam", "Ibuprofen") == UNAVAILABLE
                assert store.get_drug_info("Ibuprofen") == UNAVAILABLE
                assert time.monotonic() - started < 5
            # From worker threads too, as the bridge calls them.
            with ThreadPoolExecutor(max_workers=4) as pool:
                assert list(pool.map(lambda _: store.lookup_order(1), range(8))) == [UNAVAILABLE] * 8
        finally:
            postgres_server.start()

        # Back, without a new store: the broken connection is replaced on the next call, and the
        # call that finds it broken still succeeds (it broke while idle, so retrying is safe).
        assert store.lookup_order(placed["order_id"]) == placed
        again = store.place_order("Sam", "Ibuprofen")
        assert again["order_id"] == placed["order_id"] + 1
    finally:
        store.close()

    (warning,) = _postgres_log(caplog, logging.WARNING)  # once for the outage, not per call
    assert "is unavailable" in warning and "local socket/test_" in warning
    assert any("reachable again" in line for line in _postgres_log(caplog, logging.INFO))
    assert "s3cret-pw" not in caplog.text
    assert postgres_server.rows(postgres_url, "SELECT COUNT(*) FROM orders") == [(2,)]  # nothing lost or doubled


def test_a_postgres_database_down_at_first_use_gets_its_schema_when_back(postgres_server: PostgresServer) -> None:
    url = postgres_server.create_database()
    store = PostgresStore(url)
    postgres_server.stop()
    try:
        assert store.get_drug_info("Ibuprofen") == UNAVAILABLE
        assert store.place_order("Jane", "Ibuprofen") == UNAVAILABLE
    finally:
        postgres_server.start()
    try:
        assert store.get_drug_info("Ibuprofen")["name"] == "Ibuprofen"
        assert store.place_order("Jane", "Ibuprofen")["order_id"] == 1
    finally:
        store.close()
        postgres_server.drop_database(url)


def test_a_postgres_server_that_never_answers_is_given_up_on_in_bounded_time() -> None:
    # Accepts the connection and then says nothing, like a hung server or a half-open network.
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        store = PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/pharmacy", connect_timeout_seconds=2)
        started = time.monotonic()
        assert store.get_drug_info("Ibuprofen") == UNAVAILABLE
        elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 5, elapsed


def test_a_postgres_statement_stuck_behind_a_lock_times_out_and_the_next_call_works(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    import psycopg

    store = PostgresStore(postgres_url, statement_timeout_ms=300)
    try:
        assert store.place_order("Jane", "Ibuprofen")["order_id"] == 1
        with psycopg.connect(postgres_url) as locker:
            locker.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")  # held until the block ends
            started = time.monotonic()
            assert store.place_order("Sam", "Ibuprofen") == UNAVAILABLE
            assert store.lookup_order(1) == UNAVAILABLE
            assert time.monotonic() - started < 3
            locker.rollback()
        assert store.lookup_order(1)["customer_name"] == "Jane"
        assert store.place_order("Sam", "Ibuprofen")["order_id"] >= 2
    finally:
        store.close()
    assert postgres_server.rows(postgres_url, "SELECT customer_name FROM orders ORDER BY id") == [("Jane",), ("Sam",)]


def test_a_sqlite_file_locked_past_the_busy_timeout_is_an_outage_the_agent_can_say(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    store = SQLiteStore(tmp_path / "pharmacy.db", busy_timeout_seconds=0.3)
    assert store.place_order("Jane", "Ibuprofen")["order_id"] == 1
    locker = sqlite3.connect(tmp_path / "pharmacy.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # another process's long write, say
        with caplog.at_level("WARNING", logger="pharmacy_functions"):
            assert store.place_order("Sam", "Ibuprofen") == UNAVAILABLE
        assert store.lookup_order(1)["customer_name"] == "Jane"  # WAL: reads go on meanwhile
        locker.execute("ROLLBACK")
    finally:
        locker.close()
    [warning] = [r.getMessage() for r in caplog.records if r.name == "pharmacy_functions"]
    assert warning.endswith("pharmacy.db stayed locked by another connection for 0.3 s; the caller is told to try again later")
    assert store.place_order("Sam", "Ibuprofen")["order_id"] == 2
    assert [store.lookup_order(n)["customer_name"] for n in (1, 2)] == ["Jane", "Sam"]


def test_every_thread_of_a_sqlite_store_stops_at_a_deleted_file_and_none_makes_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread with a connection to the deleted file, and one that connects afterwards."""
    path = tmp_path / "data" / "pharmacy.db"
    store = SQLiteStore(path)
    with ThreadPoolExecutor(max_workers=1) as connected, ThreadPoolExecutor(max_workers=1) as newcomer:
        assert connected.submit(store.place_order, "Jane", "Ibuprofen").result()["order_id"] == 1
        shutil.rmtree(path.parent)
        path.parent.mkdir()  # the folder is back, empty: connecting must not make a database in it
        # The newcomer's first read opens a connection, which finds the file gone...
        assert newcomer.submit(store.lookup_order, 1).result() == UNAVAILABLE
        assert not path.exists()
        # ...and from then on the old connection's reads are refused too, not answered from the old file.
        assert connected.submit(store.lookup_order, 1).result() == UNAVAILABLE
        assert connected.submit(store.place_order, "Sam", "Ibuprofen").result() == UNAVAILABLE
        restarted = SQLiteStore(path)  # another process starts, with a new, empty database
        for thread in (connected, newcomer):
            assert thread.submit(store.place_order, "Sam", "Ibuprofen").result() == UNAVAILABLE
            assert thread.submit(store.get_drug_info, "Ibuprofen").result() == UNAVAILABLE
    assert restarted.lookup_order(1) == {"error": "There is no order 1."}
    [warning] = [r.getMessage() for r in caplog.records if r.name == "pharmacy_functions"]
    assert warning.startswith(f"SQLite database {path} was deleted (or moved, or its folder was) while this process")
    assert f"(pid {os.getpid()})" in warning


def test_a_sqlite_file_replaced_under_the_store_is_neither_read_nor_written(tmp_path: Path) -> None:
    """A new thread doesn't read the new file; an order is rolled back, not left in the old one."""
    data = tmp_path / "data"
    store = SQLiteStore(data / "pharmacy.db")
    assert store.place_order("Jane", "Ibuprofen")["order_id"] == 1
    data.rename(tmp_path / "old")
    SQLiteStore(data / "pharmacy.db")  # a new, empty database where the old one was
    with ThreadPoolExecutor(max_workers=1) as newcomer:
        assert newcomer.submit(store.lookup_order, 1).result() == UNAVAILABLE  # not "There is no order 1."
    assert store.place_order("Sam", "Ibuprofen") == UNAVAILABLE
    assert _rows(tmp_path / "old" / "pharmacy.db", "SELECT customer_name FROM orders") == [("Jane",)]
    assert _rows(data / "pharmacy.db", "SELECT customer_name FROM orders") == []


def test_pharmacy_store_of_a_path_is_still_the_sqlite_store(tmp_path: Path) -> None:
    store = PharmacyStore(tmp_path / "pharmacy.db")  # type: ignore[abstract]
    assert type(store) is SQLiteStore and store.path == tmp_path / "pharmacy.db"
    assert store.place_order("Jane", "Ibuprofen")["order_id"] == 1


def test_a_postgres_restart_between_two_calls_goes_unnoticed_and_places_no_order_twice(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresStore(postgres_url)
    try:
        # Connections opened in four threads, all broken by the restart while idle.
        with ThreadPoolExecutor(max_workers=4) as pool:
            barrier = threading.Barrier(4)

            def first(i: int) -> dict[str, Any]:
                barrier.wait()  # all four threads at once, so each opens its own connection
                return store.place_order(f"Before {i}", "Ibuprofen")

            assert all("order_id" in order for order in pool.map(first, range(4)))
            postgres_server.stop()
            postgres_server.start()
            barrier.reset()

            def after(i: int) -> dict[str, Any]:
                barrier.wait()
                return store.place_order(f"After {i}", "Ibuprofen")

            placed = list(pool.map(after, range(4)))
        assert all("order_id" in order for order in placed), placed
        assert store.lookup_order(placed[0]["order_id"]) == placed[0]
    finally:
        store.close()
    assert postgres_server.rows(postgres_url, "SELECT COUNT(*) FROM orders") == [(8,)]
    assert not _postgres_log(caplog, logging.WARNING)  # nothing was unavailable to anyone
