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
from typing import Any, NoReturn

import hypothesis
import pytest

ROOT = Path(__file__).resolve().parent.parent

# Property tests check what comes out, never how fast (speed is the benchmark's): no per-example
# deadline, which a CI machine running four workers on two cores would otherwise trip at random.
hypothesis.settings.register_profile("bridge", deadline=None)
hypothesis.settings.load_profile("bridge")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bridge.config import load_agent_config  # noqa: E402
from bridge.settings import Limits, Settings  # noqa: E402
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
def environment_unchanged() -> Iterator[None]:
    """Fail a test that leaves os.environ changed (and put it back).

    The bridge processes later tests start inherit os.environ, and with several tests per
    process, one that leaked TWILIO_AUTH_TOKEN made an unrelated test's calls fail their
    signature check. monkeypatch's changes are undone before this looks.
    """
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = sorted(
        name for name in before.keys() | after.keys()
        if before.get(name) != after.get(name) and name != "PYTEST_CURRENT_TEST"  # pytest's own, per phase
    )
    if changed:
        for name in changed:
            if name in before:
                os.environ[name] = before[name]
            else:
                del os.environ[name]
        pytest.fail(f"the test left os.environ changed: {', '.join(changed)}")


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


LIMIT_FIELDS = frozenset(field.name for field in dataclasses.fields(Limits))


def with_overrides(settings: Settings, **overrides: Any) -> Settings:
    """``settings`` with ``overrides``, each to Settings or to its Limits, by name."""
    limits = {name: overrides.pop(name) for name in list(overrides) if name in LIMIT_FIELDS}
    if limits:
        overrides["limits"] = dataclasses.replace(settings.limits, **limits)
    return dataclasses.replace(settings, **overrides)


def bridge_settings(tmp_path: Path, **overrides: Any) -> Settings:
    base = Settings(
        deepgram_api_key="test-key-not-secret",
        host="127.0.0.1",
        port=0,
        calls_dir=tmp_path / "calls",
        state_dir=tmp_path / "state",
        record_calls=True,
        agent_connect_timeout_seconds=2.0,
    )
    return with_overrides(base, **overrides)


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
        overrides.setdefault("deepgram_agent_url", agent.url if agent else "ws://127.0.0.1:9/unused")
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


def under_ci() -> bool:
    """Whether this run is CI's (the ``CI`` environment variable, which .ci/run and CI services set)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def cannot_run(reason: str) -> NoReturn:
    """Skip the test, saying why; under CI fail it with the same sentence.

    A CI run that skipped, say, the browser tests would pass without having run them, which is
    how such a skip went unnoticed before.
    """
    if under_ci():
        pytest.fail(f"{reason} (CI must run this test, not skip it).", pytrace=False)
    pytest.skip(reason)


def require_tools(missing: list[str], install: str) -> None:
    """``cannot_run`` when tools the test needs are missing, naming them and how to install them."""
    if missing:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if len(missing) > 1 else missing)
        cannot_run(f"{names} {'is' if len(missing) == 1 else 'are'} not installed: {install}")


def empty_env(directory: Path) -> Path:
    """An empty settings file for ``--env-file``, so a developer's own .env stays out of a test."""
    path = directory / "empty.env"
    path.touch()
    return path


def _port_slice() -> range:
    """The ports ``free_port`` hands out in this test process.

    They lie below the kernel's ephemeral range, which every outgoing connection and every bind to
    port 0 draws from: a port picked there could be taken (by a test's client socket, or by another
    test process) between the moment it is picked and the moment a bridge process binds it; the
    bridge would then fail to start while the test talked to whoever took it. Each pytest-xdist
    worker gets a slice of its own, so two never pick the same port either.
    """
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768  # Linux's default; elsewhere, the IANA range starts at 49152
    low, high = max(1024, ephemeral_low - 8000), ephemeral_low
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0) % 8
    size = (high - low) // 8
    return range(low + worker * size, low + (worker + 1) * size)


_PORTS = _port_slice()
_next_port = iter(range(len(_PORTS) * 4))


def free_port() -> int:
    """A port nothing listens on, for a bridge started as its own process (see ``_port_slice``)."""
    for attempt in _next_port:
        port = _PORTS[(attempt * 7919) % len(_PORTS)]  # stride by a prime: not the last one's neighbour
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue  # something else on this machine has it
            return port
    raise RuntimeError(f"no free port left in {_PORTS}")
