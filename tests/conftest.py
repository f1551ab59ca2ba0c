"""Shared fixtures: a fake Deepgram agent and the real bridge server, both on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bridge.config import Settings, load_agent_config  # noqa: E402
from bridge.server import BridgeServer  # noqa: E402
from fakes import FakeAgent  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402

BridgeFactory = Callable[..., AbstractAsyncContextManager[BridgeServer]]


class _ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unhandled_asyncio_errors() -> Iterator[None]:
    """Fail a test in which asyncio reported an error nobody handled.

    An exception escaping a protocol callback, or a task's exception never retrieved, reaches
    only asyncio's logger; the test that caused it would otherwise pass. Autouse fixtures are
    set up first and torn down last, so this sees the event loop's close too.
    """
    errors = _ErrorRecords()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(errors)
    try:
        yield
    finally:
        asyncio_logger.removeHandler(errors)
    if errors.records:
        pytest.fail("asyncio reported unhandled errors:\n" + "\n".join(
            logging.Formatter().format(record) for record in errors.records
        ))


@pytest.fixture(autouse=True)
def pharmacy_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own pharmacy database file."""
    path = tmp_path / "pharmacy.db"
    monkeypatch.setenv("PHARMACY_DB", str(path))
    monkeypatch.delenv("DATABASE_URL", raising=False)  # SQLite unless a test asks for PostgreSQL
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (tests/postgres_server.py)."""
    server = PostgresServer()
    try:
        server.initialise()
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database on the session's server, dropped after the test."""
    if not postgres_server.running:  # a failed outage test left it stopped
        postgres_server.start()
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
async def fake_agent() -> AsyncIterator[FakeAgent]:
    async with FakeAgent() as agent:
        yield agent


def bridge_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = Settings(
        deepgram_api_key="test-key-not-secret",
        host="127.0.0.1",
        port=0,
        calls_dir=tmp_path / "calls",
        record_calls=True,
        agent_connect_timeout_seconds=2.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def make_bridge(tmp_path: Path) -> BridgeFactory:
    """``async with make_bridge(agent, **settings_overrides) as server``: the real server."""

    @asynccontextmanager
    async def factory(
        agent: FakeAgent | None = None,
        *,
        function_map: dict[str, Callable[..., Any]] | None = None,
        config_path: Path = ROOT / "config.json",
        **overrides: Any,
    ) -> AsyncIterator[BridgeServer]:
        if function_map is None:
            from pharmacy_functions import function_map as pharmacy_map

            function_map = pharmacy_map
        overrides.setdefault("agent_url", agent.url if agent else "ws://127.0.0.1:9/unused")
        settings = bridge_settings(tmp_path, **overrides)
        server = BridgeServer(settings, load_agent_config(config_path, os.environ), function_map)
        async with server:
            yield server

    return factory


def twilio_url(server: BridgeServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/twilio{query}"


def read_record(directory: Path) -> list[dict[str, Any]]:
    """The lines of the one call record in ``directory``."""
    files = list(directory.glob("*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def empty_env(directory: Path) -> Path:
    """An empty settings file for ``--env-file``, so a developer's own .env stays out of a test."""
    path = directory / "empty.env"
    path.touch()
    return path


def free_port() -> int:
    """A port nothing listens on, for a bridge started as its own process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
