"""Tests for pharmacy_functions: the catalogue, orders and their SQLite store."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

# The module under test sits at the project root. Put the root on sys.path so
# this file also runs under plain `pytest` with no conftest or pythonpath set.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pharmacy_functions as pf  # noqa: E402
from pharmacy_functions import PharmacyStore  # noqa: E402

ORDER_KEYS = {"order_id", "customer_name", "drug_name", "quantity", "total", "currency", "status", "created_at"}
DRUG_KEYS = {"name", "description", "dosage", "side_effects", "price", "currency", "prescription_required"}


@pytest.fixture
def store(tmp_path: Path) -> PharmacyStore:
    return PharmacyStore(tmp_path / "pharmacy.db")


@pytest.fixture
def db_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the module-level functions at a fresh file for this test."""
    path = tmp_path / "env" / "pharmacy.db"
    monkeypatch.setenv("PHARMACY_DB", str(path))
    return path


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the file directly, independent of the code under test."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


# -- catalogue ------------------------------------------------------------------


def test_new_store_creates_parent_directory_and_seeds_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "pharmacy.db"
    store = PharmacyStore(path)

    assert path.is_file()
    names = store.drug_names()
    assert len(names) == len(pf.SEED_DRUGS)
    assert 8 <= len(names) <= 10
    assert names == sorted(names)
    assert {"Ibuprofen", "Acetaminophen", "Amoxicillin"} <= set(names)
    assert _rows(path, "SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]


def test_store_uses_wal_journal_mode(store: PharmacyStore) -> None:
    assert _rows(store.path, "PRAGMA journal_mode") == [("wal",)]


def test_every_seeded_drug_is_complete(store: PharmacyStore) -> None:
    for name in store.drug_names():
        info = store.get_drug_info(name)
        assert set(info) == DRUG_KEYS
        assert info["name"] == name
        for field in ("description", "dosage", "side_effects"):
            assert isinstance(info[field], str) and info[field].strip()
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


def test_seeding_twice_on_one_file_does_not_duplicate_drugs(tmp_path: Path) -> None:
    path = tmp_path / "pharmacy.db"
    first = PharmacyStore(path)
    second = PharmacyStore(path)

    assert _rows(path, "SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]
    assert first.drug_names() == second.drug_names()


def test_seeding_skips_a_catalogue_that_is_not_empty(tmp_path: Path) -> None:
    path = tmp_path / "pharmacy.db"
    PharmacyStore(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("DELETE FROM drugs WHERE name = 'Metformin'")
    conn.close()

    store = PharmacyStore(path)  # a restart must not bring a removed drug back

    assert "Metformin" not in store.drug_names()
    assert len(store.drug_names()) == len(pf.SEED_DRUGS) - 1


def test_concurrent_first_use_of_one_file_seeds_once(tmp_path: Path) -> None:
    # Several fresh files, each opened by many threads at the same instant: the
    # switch to WAL and the seeding must both cope with racing openers.
    openers = 16
    for attempt in range(5):
        path = tmp_path / f"pharmacy-{attempt}.db"
        barrier = threading.Barrier(openers)

        def open_store() -> list[str]:
            barrier.wait()
            return PharmacyStore(path).drug_names()

        with ThreadPoolExecutor(max_workers=openers) as pool:
            results = list(pool.map(lambda _: open_store(), range(openers)))

        assert all(names == results[0] for names in results)
        assert _rows(path, "SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]
        assert _rows(path, "PRAGMA journal_mode") == [("wal",)]


_CHILD_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import pharmacy_functions as pf
ids = [pf.place_order("Process", "Ibuprofen", 1)["order_id"] for _ in range(10)]
print(",".join(map(str, ids)))
"""


def test_separate_processes_share_one_file(tmp_path: Path) -> None:
    # Separate bridge processes (or a restart overlapping the old one) start on
    # the same fresh file: one seed, no lost or shared order ids.
    path = tmp_path / "shared.db"
    env = {**os.environ, "PHARMACY_DB": str(path)}
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
    assert _rows(path, "SELECT COUNT(*) FROM orders") == [(40,)]
    assert _rows(path, "SELECT COUNT(*) FROM drugs") == [(len(pf.SEED_DRUGS),)]


# -- placing orders -------------------------------------------------------------


def test_place_order_returns_the_stored_order(store: PharmacyStore) -> None:
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
    assert before <= created <= after
    json.dumps(order)

    rows = _rows(store.path, "SELECT id, customer_name, drug_name, quantity, total, status FROM orders")
    assert rows == [(order["order_id"], "Jane Doe", "Amoxicillin", 3, 37.5, "placed")]


@pytest.mark.parametrize(("drug", "quantity", "total"), [("Ibuprofen", 27, 242.73), ("Omeprazole", 11, 164.89)])
def test_place_order_total_has_no_float_noise(store: PharmacyStore, drug: str, quantity: int, total: float) -> None:
    # 8.99 * 27 is 242.73000000000002 in floating point; the agent must say 242.73.
    result = store.place_order("Sam", drug, quantity)
    assert result["total"] == total
    assert repr(result["total"]) == repr(total)
    assert _rows(store.path, "SELECT total FROM orders") == [(total,)]


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
def test_place_order_rejects_bad_quantities(store: PharmacyStore, bad: object) -> None:
    result = store.place_order("Sam", "Loratadine", bad)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert "1" in result["error"] and "100" in result["error"]
    assert _rows(store.path, "SELECT COUNT(*) FROM orders") == [(0,)]


@pytest.mark.parametrize("blank", ["", "   ", None])
def test_place_order_requires_a_customer_name(store: PharmacyStore, blank: object) -> None:
    result = store.place_order(blank, "Ibuprofen", 1)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert _rows(store.path, "SELECT COUNT(*) FROM orders") == [(0,)]


def test_place_order_for_unknown_drug_lists_what_we_carry(store: PharmacyStore) -> None:
    result = store.place_order("Sam", "Unobtainium", 2)

    assert result == {"error": "We don't carry Unobtainium.", "available": store.drug_names()}
    assert _rows(store.path, "SELECT COUNT(*) FROM orders") == [(0,)]


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


@pytest.mark.parametrize("bad", ["twelve", "", "12a", "1.5", None, True])
def test_lookup_non_numeric_order_id(store: PharmacyStore, bad: object) -> None:
    result = store.lookup_order(bad)  # type: ignore[arg-type]

    assert set(result) == {"error"}
    assert result["error"].startswith("Order IDs are numbers")


def test_orders_survive_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pharmacy.db"
    placed = PharmacyStore(path).place_order("Jane Doe", "Lisinopril", 2)

    reopened = PharmacyStore(path)  # as after a restart

    assert reopened.lookup_order(placed["order_id"]) == placed
    assert reopened.place_order("Sam", "Ibuprofen")["order_id"] == placed["order_id"] + 1


# -- concurrency ----------------------------------------------------------------


def test_fifty_concurrent_orders_get_distinct_ids_and_none_are_lost(db_env: Path) -> None:
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

    rows = _rows(db_env, "SELECT id, customer_name, quantity FROM orders")
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


def test_module_functions_use_pharmacy_db_and_accept_llm_keyword_args(db_env: Path) -> None:
    assert not db_env.exists()  # nothing is created until first use

    arguments = json.loads('{"customer_name": "Jane", "drug_name": "METFORMIN", "quantity": "2"}')
    order = pf.function_map["place_order"](**arguments)
    info = pf.function_map["get_drug_info"](**{"drug_name": "metformin"})
    found = pf.function_map["lookup_order"](**{"order_id": str(order["order_id"])})

    assert db_env.is_file()
    assert order["total"] == round(info["price"] * 2, 2)
    assert found == order
    assert _rows(db_env, "SELECT COUNT(*) FROM orders") == [(1,)]


def test_get_store_follows_changes_to_pharmacy_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "a.db", tmp_path / "b.db"

    monkeypatch.setenv("PHARMACY_DB", str(first))
    store_a = pf.get_store()
    assert pf.get_store() is store_a  # cached per path
    pf.place_order("Jane", "Ibuprofen")

    monkeypatch.setenv("PHARMACY_DB", str(second))
    store_b = pf.get_store()
    assert store_b is not store_a
    assert store_b.path.resolve() == second.resolve()
    assert pf.lookup_order(1) == {"error": "There is no order 1."}

    assert _rows(first, "SELECT COUNT(*) FROM orders") == [(1,)]
    assert _rows(second, "SELECT COUNT(*) FROM orders") == [(0,)]


def test_relative_pharmacy_db_is_taken_from_the_project_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pharmacy_functions

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PHARMACY_DB", "data/test-relative.db")
    expected = Path(pharmacy_functions.__file__).resolve().parent / "data" / "test-relative.db"
    try:
        assert pharmacy_functions.get_store().path == expected
        assert not (tmp_path / "data").exists()
    finally:
        expected.unlink(missing_ok=True)
        for suffix in ("-wal", "-shm"):
            Path(str(expected) + suffix).unlink(missing_ok=True)
