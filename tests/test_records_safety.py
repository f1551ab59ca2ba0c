"""Call records and the pharmacy database hold callers' personal data: private, strict, bounded."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.records import FIELD_MAX_CHARS, RECORD_MAX_BYTES, CallRecord, RecordWriter
from pharmacy_functions import PharmacyStore


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """The usual umask, which leaves new files world-readable unless the code asks otherwise."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def writer() -> Iterator[RecordWriter]:
    records = RecordWriter()
    try:
        yield records
    finally:
        records.close()


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file chmodded after its open was readable by others in between: the open must set the mode."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        # An OSError, so the writer thread reports it through finish() rather than dying with it.
        raise PermissionError("the mode must be set by the open itself: a chmod afterwards leaves a window")

    monkeypatch.setattr(os, "chmod", refuse)
    monkeypatch.setattr(os, "fchmod", refuse)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def refuse_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON: strict readers reject the whole file")


def strict_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of ``path`` parsed as strict JSON (NaN, Infinity and -Infinity refused)."""
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line, parse_constant=refuse_constant) for line in data.decode("utf-8").splitlines()]


async def write_record(record: CallRecord, **summary: Any) -> Path:
    path = await record.finish("CA0123", record.summary(**summary))
    assert path is not None
    return path


# ------------------------------------------------------------------------------ owner-only files


@pytest.mark.usefixtures("no_chmod")
async def test_a_record_file_is_0600_and_the_folders_it_makes_0700(tmp_path: Path, writer: RecordWriter) -> None:
    directory = tmp_path / "new" / "deeper" / "calls"
    existing = mode(tmp_path)
    record = CallRecord(directory, True, writer)
    record.add("transcript", role="user", content="my date of birth is ...")
    path = await write_record(record)
    assert path.parent == directory
    assert mode(path) == 0o600
    assert [mode(folder) for folder in (tmp_path / "new", tmp_path / "new" / "deeper", directory)] == [0o700] * 3
    assert mode(tmp_path) == existing, "a folder that existed is left alone"


@pytest.mark.usefixtures("no_chmod")
async def test_a_record_in_an_existing_folder_is_0600_even_under_an_open_umask(tmp_path: Path, writer: RecordWriter) -> None:
    os.umask(0)  # the fixture restores the previous one
    existing = mode(tmp_path)
    record = CallRecord(tmp_path, True, writer)
    record.name_after("CA0123")
    record.add("start", stream_sid="MZ1")
    path = await write_record(record)
    assert mode(path) == 0o600
    assert mode(tmp_path) == existing, "an existing folder is not ours to change"


# ------------------------------------------------------------------------------ strict JSON


async def test_non_finite_numbers_anywhere_become_null(tmp_path: Path, writer: RecordWriter) -> None:
    nan, inf = math.nan, math.inf
    record = CallRecord(tmp_path, True, writer)
    record.add(
        "function_call",
        name="lookup_order",
        arguments='{"order_id": 7}',
        result={"total": inf, "items": [1.5, -inf, {"deep": [nan, "NaN"]}], nan: "key"},
        error=None,
        duration_seconds=0.25,
    )
    record.add("warning", code=nan, description=("x", inf))
    record.add("agent_started_speaking", total_latency=nan, tts_latency=inf, ttt_latency=0.5)
    record.add("agent_started_speaking", total_latency=1.25, tts_latency=0.5, ttt_latency=0.75)
    path = await write_record(record, custom_parameters={"score": -inf}, agent_latency_p50=nan)
    function_call, warning, latency, _, summary = strict_lines(path)
    assert function_call["result"] == {"total": None, "items": [1.5, None, {"deep": [None, "NaN"]}], "null": "key"}
    assert function_call["duration_seconds"] == 0.25, "finite numbers are kept"
    assert (warning["code"], warning["description"]) == (None, ["x", None])
    assert (latency["total_latency"], latency["tts_latency"], latency["ttt_latency"]) == (None, None, 0.5)
    assert summary["custom_parameters"] == {"score": None}
    assert summary["agent_latency_p50"] is None, "a non-finite summary field is null too"


async def test_a_summary_with_a_non_finite_number_is_still_written(tmp_path: Path, writer: RecordWriter) -> None:
    record = CallRecord(tmp_path, True, writer)
    path = await write_record(record, ended_by="caller hung up", duration_hint=math.inf)
    (summary,) = strict_lines(path)
    assert summary["event"] == "summary" and summary["duration_hint"] is None
    assert summary["ended_by"] == "caller hung up"


# ------------------------------------------------------------------------------ size cap


async def test_events_past_the_cap_are_counted_not_written(tmp_path: Path, writer: RecordWriter) -> None:
    cap = 20_000
    record = CallRecord(tmp_path, True, writer, max_bytes=cap)
    record.name_after("CA0123")  # so batches go to disk mid-call, as on a real long call
    total = 1_000
    for turn in range(total):
        record.add("transcript", role="user", content=f"turn {turn:04d} " + "x" * 80)
    path = await write_record(record, turns=total)
    data = path.read_bytes()
    lines = strict_lines(path)
    events, summary = lines[:-1], lines[-1]
    event_bytes = len(data) - len(data.splitlines(keepends=True)[-1])
    line_bytes = len(data.splitlines(keepends=True)[0])
    assert cap - line_bytes < event_bytes <= cap, "events fill the cap, and no more"
    assert len(data) < cap + 1_000, "the summary line comes on top of the cap"
    assert 0 < len(events) < total
    # The events written are the call's beginning, in order, with no gaps.
    assert [event["content"][:9] for event in events] == [f"turn {turn:04d}" for turn in range(len(events))]
    assert summary["record_events_dropped"] == total - len(events)
    assert summary["turns"] == total, "the summary's counts still cover the whole call"


async def test_a_record_under_the_cap_drops_nothing(tmp_path: Path, writer: RecordWriter) -> None:
    assert RECORD_MAX_BYTES == 1_000_000
    record = CallRecord(tmp_path, True, writer)
    assert record.max_bytes == RECORD_MAX_BYTES
    for turn in range(50):
        record.add("transcript", role="assistant", content=f"turn {turn}")
    path = await write_record(record)
    lines = strict_lines(path)
    assert len(lines) == 51
    assert lines[-1]["record_events_dropped"] == 0
    assert CallRecord(tmp_path, False, writer).summary()["record_events_dropped"] == 0, "always present"


async def test_the_cap_holds_for_huge_fields(tmp_path: Path, writer: RecordWriter) -> None:
    record = CallRecord(tmp_path, True, writer, max_bytes=50_000)
    for _ in range(100):
        record.add("transcript", role="user", content="y" * 1_000_000)
    path = await write_record(record)
    *events, summary = strict_lines(path)
    assert path.stat().st_size < 50_000 + 1_000
    line_bytes = len(path.read_bytes().splitlines(keepends=True)[0])
    assert line_bytes < FIELD_MAX_CHARS + 200, "each transcript was cut before it was counted"
    assert len(events) == 50_000 // line_bytes  # the lines are all the same length
    assert summary["record_events_dropped"] == 100 - len(events)


# ------------------------------------------------------------------------------ long fields


async def test_a_long_string_field_is_cut_with_a_marker(tmp_path: Path, writer: RecordWriter) -> None:
    class Loud:
        def __str__(self) -> str:
            return "z" * 9_000

    record = CallRecord(tmp_path, True, writer)
    record.add("transcript", role="user", content="x" * 10_000)
    record.add("transcript", role="user", content="w" * FIELD_MAX_CHARS)
    record.add(
        "function_call", name="get_drug_info", arguments="{}", result={"pages": ["p" * 5_000, "short"]}, error="e" * 4_001
    )
    record.add("warning", code="W1", description=Loud())
    path = await write_record(record, ended_by="q" * 6_000)
    long_turn, exact_turn, function_call, warning, summary = strict_lines(path)
    assert long_turn["content"] == "x" * FIELD_MAX_CHARS + "…(+6000 chars)"
    assert exact_turn["content"] == "w" * FIELD_MAX_CHARS, "a field at the limit is kept whole"
    assert function_call["result"] == {"pages": ["p" * FIELD_MAX_CHARS + "…(+1000 chars)", "short"]}
    assert function_call["error"] == "e" * FIELD_MAX_CHARS + "…(+1 chars)"
    assert warning["description"] == "z" * FIELD_MAX_CHARS + "…(+5000 chars)", "str() of an object is cut too"
    assert summary["ended_by"] == "q" * FIELD_MAX_CHARS + "…(+2000 chars)"
    assert path.stat().st_size < 6 * (FIELD_MAX_CHARS + 400)


# ------------------------------------------------------------------------------ pharmacy database


def test_the_pharmacy_database_and_its_side_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "new" / "data" / "pharmacy.db"
    store = PharmacyStore(path)
    order = store.place_order("Ada Lovelace", "Ibuprofen", 2)
    assert "order_id" in order
    files = sorted(path.parent.iterdir())
    # WAL mode: the -wal and -shm files are there while this thread's connection is open.
    assert [file.name for file in files] == ["pharmacy.db", "pharmacy.db-shm", "pharmacy.db-wal"]
    assert {file.name: mode(file) for file in files} == {file.name: 0o600 for file in files}
    assert (mode(tmp_path / "new"), mode(path.parent)) == (0o700, 0o700)
    assert store.lookup_order(order["order_id"])["customer_name"] == "Ada Lovelace"


def test_a_rollback_journal_on_the_pharmacy_database_is_owner_only_too(tmp_path: Path) -> None:
    """Whatever journal mode the file is switched to, SQLite gives its side files the file's mode."""
    path = tmp_path / "pharmacy.db"
    store = PharmacyStore(path)
    store._thread_connections.conn.close()  # leaving the journal mode needs the only connection
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute("PRAGMA journal_mode=PERSIST")  # keeps the -journal file after each write
        conn.execute("INSERT INTO orders (customer_name, drug_name, quantity, total, status, created_at) "
                     "VALUES ('A', 'Ibuprofen', 1, 8.99, 'placed', 'now')")
    conn.close()
    journal = tmp_path / "pharmacy.db-journal"
    assert journal.exists()
    assert (mode(path), mode(journal)) == (0o600, 0o600)


def test_an_existing_pharmacy_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "pharmacy.db"
    PharmacyStore(path)
    path.chmod(0o640)  # an operator's choice, e.g. for a backup group
    PharmacyStore(path).place_order("Ada", "Ibuprofen", 1)
    assert mode(path) == 0o640
