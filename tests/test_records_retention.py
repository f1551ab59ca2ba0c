"""RECORDS_RETENTION_DAYS: old call records are deleted, at startup and then hourly, and nothing else.

Files are aged with os.utime; the server is the real one, with its retention interval shortened
through its constructor.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from bridge.config import load_agent_config
from bridge.settings import ConfigError, load_settings
from bridge.records import CallRecord, RecordWriter, RetentionError, delete_old_records
from bridge.server import BridgeServer
from conftest import ROOT, bridge_settings
from fakes import eventually

DAY = 86_400.0


def record_file(directory: Path, call_sid: str, age_days: float, *, started: str = "20260301T142233") -> Path:
    """A call record named as the bridge names them, last modified ``age_days`` ago."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{started}_{call_sid}.jsonl"
    path.write_text('{"event": "summary"}\n')
    aged(path, age_days)
    return path


def aged(path: Path, age_days: float) -> None:
    when = time.time() - age_days * DAY
    os.utime(path, (when, when), follow_symlinks=False)


def retention_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        record.getMessage() for record in caplog.records
        if record.name == "bridge.server" and record.levelno == level and " older than " in record.getMessage()
    ]


@asynccontextmanager
async def serving(tmp_path: Path, calls_dir: Path, days: float | None, interval: float = 3600.0) -> AsyncIterator[BridgeServer]:
    settings = bridge_settings(tmp_path, calls_dir=calls_dir, records_retention_days=days)
    from pharmacy_functions import function_map

    server = BridgeServer(
        settings, load_agent_config(ROOT / "config.json", os.environ), function_map, housekeeping_interval=interval
    )
    async with server:
        yield server


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.INFO, logger="bridge"):
        yield caplog


# ------------------------------------------------------------------------------ the server


async def test_the_server_deletes_exactly_the_old_records_at_start(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    calls = tmp_path / "calls"
    old = [record_file(calls, f"CAold{index}", 31 + index) for index in range(3)]
    new = [record_file(calls, "CAnew", 29), record_file(calls, "CAtoday", 0, started="20260302T000000")]
    # Old, but not the bridge's records: another name, another extension, a folder, a symlink.
    others = [calls / "notes.jsonl", calls / "20200101T000000_CAx.txt", calls / "export.json"]
    for path in others:
        path.write_text("keep\n")
        aged(path, 400)
    folder = calls / "20200101T000000_CAdir.jsonl"
    folder.mkdir()
    inside = record_file(folder, "CAinside", 400)
    outside = record_file(tmp_path / "elsewhere", "CAoutside", 400)
    link = calls / "20200101T000000_CAlink.jsonl"
    link.symlink_to(outside)
    aged(link, 400)  # the link itself is old too

    async with serving(tmp_path, calls, days=30):
        await eventually(lambda: retention_lines(info_logs, logging.INFO), what="the startup pass")
    assert retention_lines(info_logs, logging.INFO) == ["deleted 3 call records older than 30 days"]
    assert not any(path.exists() for path in old)
    assert all(path.exists() for path in [*new, *others, folder, inside, outside])
    assert link.is_symlink() and link.resolve() == outside.resolve(), "the symlink is neither followed nor removed"
    assert retention_lines(info_logs, logging.WARNING) == []


async def test_without_the_setting_nothing_is_deleted(tmp_path: Path, info_logs: pytest.LogCaptureFixture) -> None:
    calls = tmp_path / "calls"
    ancient = record_file(calls, "CAancient", 10_000)
    async with serving(tmp_path, calls, days=None, interval=0.01) as server:
        assert server._housekeeping_task is None, "no retention task at all"
    assert ancient.exists()
    assert retention_lines(info_logs, logging.INFO) == []


async def test_a_pass_runs_every_interval_and_says_nothing_when_nothing_was_deleted(
    tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    calls = tmp_path / "calls"
    record_file(calls, "CAold", 2)
    kept = record_file(calls, "CAkept", 0.5)
    async with serving(tmp_path, calls, days=1, interval=0.05):
        await eventually(lambda: retention_lines(info_logs, logging.INFO), what="the startup pass")
        # Turns older than a day 0.3 s from now: the passes until then (about six) delete nothing.
        ageing = record_file(calls, "CAageing", 1 - 0.3 / DAY)
        # On the pass's line, not the file's absence: a pass deletes, then says so.
        await eventually(lambda: len(retention_lines(info_logs, logging.INFO)) >= 2, what="a later pass to delete the record that aged")
        assert not ageing.exists()
        later = record_file(calls, "CAlater", 3)  # appears while serving
        await eventually(lambda: len(retention_lines(info_logs, logging.INFO)) >= 3, what="the next pass to delete it")
        assert not later.exists()
    assert kept.exists()
    # Three passes deleted one record each; those in between deleted nothing and said nothing.
    assert retention_lines(info_logs, logging.INFO) == ["deleted 1 call record older than 1 day"] * 3


async def test_a_pass_that_fails_logs_one_warning(tmp_path: Path, info_logs: pytest.LogCaptureFixture) -> None:
    not_a_folder = tmp_path / "calls"
    not_a_folder.write_text("CALLS_DIR points at a file\n")
    async with serving(tmp_path, not_a_folder, days=7, interval=0.05):
        await eventually(lambda: len(retention_lines(info_logs, logging.WARNING)) >= 2, what="two passes")
    warnings = retention_lines(info_logs, logging.WARNING)
    assert warnings[0] == f"deleting call records older than 7 days failed: cannot open {not_a_folder}: Not a directory"
    assert len(set(warnings)) == 1, "one line per pass, the same each time"
    assert retention_lines(info_logs, logging.INFO) == []


async def test_shutdown_stops_the_passes(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    first = record_file(calls, "CAfirst", 5)
    async with serving(tmp_path, calls, days=1, interval=0.01) as server:
        await eventually(lambda: not first.exists(), what="the startup pass")
        task = server._housekeeping_task
    assert task is not None and task.done()
    late = record_file(calls, "CAlate", 5)
    await asyncio.sleep(0.1)  # ten intervals: a pass still running would have deleted it
    assert late.exists(), "no pass runs after shutdown"


# ------------------------------------------------------------------------------ one pass


def test_a_record_the_bridge_wrote_is_deleted_once_old(tmp_path: Path) -> None:
    writer = RecordWriter()
    try:
        record = CallRecord(tmp_path, True, writer)

        async def write() -> Path | None:
            return await record.finish("CA0123456789abcdef", record.summary())

        path = asyncio.run(write())
    finally:
        writer.close()
    assert path is not None and path.exists()
    assert delete_old_records(tmp_path, 1) == 0
    aged(path, 1.01)
    assert delete_old_records(tmp_path, 1) == 1
    assert not path.exists()


def test_a_pass_examines_at_most_its_limit_oldest_call_first(tmp_path: Path) -> None:
    paths = [record_file(tmp_path, f"CA{index}", 10, started=f"2026030{index}T000000") for index in range(1, 6)]
    assert delete_old_records(tmp_path, 1, limit=3) == 3
    assert [path.exists() for path in paths] == [False, False, False, True, True]
    assert delete_old_records(tmp_path, 1, limit=3) == 2
    assert delete_old_records(tmp_path, 1, limit=3) == 0


def test_ages_are_measured_from_the_time_given(tmp_path: Path) -> None:
    path = record_file(tmp_path, "CA1", 0)
    assert delete_old_records(tmp_path, 2, now=time.time() + 1.9 * DAY) == 0
    assert delete_old_records(tmp_path, 2, now=time.time() + 2.1 * DAY) == 1
    assert not path.exists()


def test_a_missing_folder_has_nothing_to_delete(tmp_path: Path) -> None:
    assert delete_old_records(tmp_path / "never-created", 1) == 0


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="root can delete anything: needs root to run the pass as another user, who may delete only some files",
)
def test_files_that_cannot_be_deleted_are_one_error_and_the_rest_go() -> None:
    nobody = 65534
    with tempfile.TemporaryDirectory(dir="/tmp") as temporary:  # pytest's tmp_path is root-only
        calls = Path(temporary) / "calls"
        calls.mkdir()
        os.chmod(temporary, 0o755)
        os.chmod(calls, 0o1777)  # sticky, like /tmp: each user may delete only their own files
        theirs = [record_file(calls, f"CAtheirs{index}", 9) for index in range(2)]
        for path in theirs:
            os.chown(path, nobody, nobody, follow_symlinks=False)
        roots = [record_file(calls, f"CAroots{index}", 9, started="20260302T000000") for index in range(3)]
        # The child starts as root (the interpreter may live where others can't read) and becomes
        # the other user before the pass.
        script = (
            "import json, os, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            "from bridge.records import RetentionError, delete_old_records\n"
            f"os.setgroups([]); os.setgid({nobody}); os.setuid({nobody})\n"
            "try:\n    print(json.dumps({'deleted': delete_old_records(Path(sys.argv[2]), 1)}))\n"
            "except RetentionError as exc:\n    print(json.dumps({'deleted': exc.deleted, 'error': str(exc)}))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, str(ROOT), str(calls)], capture_output=True, text=True, timeout=30, check=True
        )
        outcome = json.loads(result.stdout)
        assert outcome == {
            "deleted": 2,
            "error": f"3 of them could not be deleted from {calls}, the first: Operation not permitted",
        }
        assert not any(path.exists() for path in theirs) and all(path.exists() for path in roots)


# ------------------------------------------------------------------------------ the setting


def test_the_setting_is_a_number_of_days_above_zero() -> None:
    key = {"DEEPGRAM_API_KEY": "k"}
    assert load_settings(key).records_retention_days is None, "kept forever by default"
    assert load_settings({**key, "RECORDS_RETENTION_DAYS": " 30 "}).records_retention_days == 30.0
    assert load_settings({**key, "RECORDS_RETENTION_DAYS": "0.5"}).records_retention_days == 0.5
    for bad in ("0", "-3", "thirty", "nan", "inf", "30d"):
        with pytest.raises(ConfigError) as caught:
            load_settings({**key, "RECORDS_RETENTION_DAYS": bad})
        assert str(caught.value) == (
            f"RECORDS_RETENTION_DAYS must be a number of days greater than 0 (empty keeps records forever), got {bad!r}."
        )


def test_retention_error_carries_how_many_were_deleted() -> None:
    error = RetentionError("cannot read calls: Permission denied", 4)
    assert error.deleted == 4 and str(error) == "cannot read calls: Permission denied"
