"""Several bridge processes sharing one PostgreSQL database, DATABASE_URL at startup, and the
Kubernetes example's database and metrics wiring (docs/scaling.md).

The processes are real ``main.py`` processes (test_attacks.BridgeProcess) on the session's real
PostgreSQL server (tests/postgres_server.py); the calls come from FakeTwilioCaller, and the
function calls from FakeAgent, exactly as Deepgram would ask for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bridge.settings import ConfigError, load_settings
from bridge.storage.shared import KEEP_DAYS, DirectoryState, PostgresState
from bridge.storage.postgres import check_database_url
from conftest import ROOT, empty_env
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually
from postgres_server import PostgresServer
from test_attacks import BridgeProcess
from test_docs import KUBERNETES, parse_yaml_subset

UNAVAILABLE = "I can't reach the order system right now. Please try again in a few minutes."


async def open_call(bridge: BridgeProcess, agent: FakeAgent, caller: FakeTwilioCaller) -> FakeAgentSession:
    """Start ``caller``'s call on ``bridge``; the agent session the bridge opened for it."""
    index = len(agent.sessions)
    await caller.start()
    session = await agent.session(index, 10)
    await eventually(lambda: session.settings is not None, 10, f"Settings from the bridge on port {bridge.port}")
    return session


async def ask(session: FakeAgentSession, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Ask the bridge for a function call as Deepgram does; its answer, decoded."""
    await session.send_json({
        "type": "FunctionCallRequest",
        "functions": [{"id": call_id, "name": name, "arguments": json.dumps(arguments), "client_side": True}],
    })
    response = await eventually(
        lambda: next((m for m in session.of_type("FunctionCallResponse") if m.get("id") == call_id), None),
        10,
        f"the answer to {name} ({call_id})",
    )
    assert response["name"] == name
    answer: dict[str, Any] = json.loads(response["content"])
    return answer


def health_status(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        return int(response.status)


async def test_an_order_placed_through_one_bridge_process_is_found_through_the_other(
    tmp_path: Path, fake_agent: FakeAgent, postgres_url: str, postgres_server: PostgresServer
) -> None:
    env = {"DATABASE_URL": postgres_url}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with (
        BridgeProcess(tmp_path / "a", fake_agent, env=env) as bridge_a,
        BridgeProcess(tmp_path / "b", fake_agent, env=env) as bridge_b,
    ):
        async with (
            FakeTwilioCaller(f"ws://127.0.0.1:{bridge_a.port}/twilio") as caller_a,
            FakeTwilioCaller(f"ws://127.0.0.1:{bridge_b.port}/twilio") as caller_b,
        ):
            session_a = await open_call(bridge_a, fake_agent, caller_a)
            session_b = await open_call(bridge_b, fake_agent, caller_b)

            placed_a = await ask(session_a, "a1", "place_order", {"customer_name": "Ann Lee", "drug_name": "ibuprofen", "quantity": 2})
            placed_b = await ask(session_b, "b1", "place_order", {"customer_name": "Bo Chen", "drug_name": "Cetirizine", "quantity": "3"})
            assert placed_a["customer_name"] == "Ann Lee" and placed_b["customer_name"] == "Bo Chen"
            assert placed_a["order_id"] != placed_b["order_id"]

            # Each order looked up through the other process.
            assert await ask(session_b, "b2", "lookup_order", {"order_id": str(placed_a["order_id"])}) == placed_a
            assert await ask(session_a, "a2", "lookup_order", {"order_id": f"#{placed_b['order_id']}"}) == placed_b

            # Orders placed at the same time through both get distinct numbers; none is lost.
            import asyncio

            more = await asyncio.gather(*(
                ask(session, f"{tag}{i}", "place_order", {"customer_name": f"{tag} {i}", "drug_name": "Loratadine"})
                for i in range(10)
                for tag, session in (("x", session_a), ("y", session_b))
            ))
            ids = [placed_a["order_id"], placed_b["order_id"], *(order["order_id"] for order in more)]
            assert len(set(ids)) == 22
        for bridge in (bridge_a, bridge_b):
            assert "orders are kept in PostgreSQL at local socket/test_" in bridge.log(), bridge.log_tail()
    assert postgres_server.rows(postgres_url, "SELECT COUNT(*) FROM orders") == [(22,)]
    assert postgres_server.rows(postgres_url, "SELECT COUNT(*) FROM drugs") == [(9,)]  # seeded once


async def test_a_database_outage_is_an_answer_mid_call_and_the_bridge_recovers_without_a_restart(
    tmp_path: Path, fake_agent: FakeAgent, postgres_url: str, postgres_server: PostgresServer
) -> None:
    import asyncio

    async with BridgeProcess(tmp_path, fake_agent, env={"DATABASE_URL": postgres_url}) as bridge:
        async with FakeTwilioCaller(f"ws://127.0.0.1:{bridge.port}/twilio") as caller:
            session = await open_call(bridge, fake_agent, caller)
            placed = await ask(session, "p1", "place_order", {"customer_name": "Ann Lee", "drug_name": "Omeprazole"})
            assert placed["order_id"] == 1

            await asyncio.to_thread(postgres_server.stop)
            try:
                for attempt in range(3):
                    assert await ask(session, f"down{attempt}", "lookup_order", {"order_id": 1}) == {"error": UNAVAILABLE}
                assert await ask(session, "down-order", "place_order", {"customer_name": "Bo", "drug_name": "Ibuprofen"}) == {"error": UNAVAILABLE}
                assert await asyncio.to_thread(health_status, bridge.port) == 200
                assert not caller.closed.is_set()  # the call goes on
            finally:
                await asyncio.to_thread(postgres_server.start)

            assert await ask(session, "up", "lookup_order", {"order_id": 1}) == placed
            assert (await ask(session, "up-order", "place_order", {"customer_name": "Bo", "drug_name": "Ibuprofen"}))["order_id"] == 2
        assert bridge.process is not None and bridge.process.poll() is None
        log = bridge.log()
    unavailable = [line for line in log.splitlines() if "is unavailable" in line]
    assert len(unavailable) == 1, log  # logged once per outage, not per call
    assert "reachable again" in log
    assert "Traceback" not in log


def test_database_url_must_be_a_postgresql_url_and_is_never_echoed() -> None:
    assert load_settings({"DEEPGRAM_API_KEY": "k"}).database_url is None
    for accepted in ("postgresql://u:p@db:5432/pharmacy", "postgres://db/pharmacy", "postgresql:///pharmacy?host=/run/pg"):
        assert load_settings({"DEEPGRAM_API_KEY": "k", "DATABASE_URL": accepted}).database_url == accepted
    for refused in ("mysql://u:hunter2@db/pharmacy", "u:hunter2@db/pharmacy", "sqlite:///hunter2.db"):
        with pytest.raises(ConfigError) as error:
            load_settings({"DEEPGRAM_API_KEY": "k", "DATABASE_URL": refused})
        message = str(error.value)
        assert message.startswith("DATABASE_URL must be a postgresql:// URL") and "hunter2" not in message
    with pytest.raises(ConfigError, match="libpq can read") as error:
        check_database_url("postgresql://u:hunter2@db/pharmacy?no_such_option=1")
    assert "hunter2" not in str(error.value)
    check_database_url("postgresql://u:p@db:5432/pharmacy?sslmode=require")


def test_startup_without_psycopg_says_how_to_install_it(tmp_path: Path) -> None:
    # psycopg made unimportable for this one process, as on a machine that never installed it.
    script = (
        "import runpy, sys; sys.modules['psycopg'] = None; "
        f"sys.argv = ['main.py', '--env-file', {str(empty_env(tmp_path))!r}]; "
        f"runpy.run_path({str(ROOT / 'main.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "CALLS_DIR": str(tmp_path / "calls"),
           "DATABASE_URL": "postgresql://pharmacy:hunter2@db.example.internal/pharmacy"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: DATABASE_URL is set but psycopg is not installed: pip install -r requirements-postgres.txt."
    )


def test_the_bridge_needs_psycopg_only_for_database_url() -> None:
    code = "import sys, main, pharmacy_functions; pharmacy_functions.get_drug_info('x'); print('psycopg' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    requirements = (ROOT / "requirements.txt").read_text()
    assert "psycopg" not in requirements
    assert "psycopg[binary]==" in (ROOT / "requirements-postgres.txt").read_text()
    assert "-r requirements-postgres.txt" in (ROOT / "requirements-dev.txt").read_text()


def test_kubernetes_example_shares_one_database_and_is_scraped_for_metrics() -> None:
    documents = {doc["kind"]: doc for doc in parse_yaml_subset(KUBERNETES)}
    deployment, service = documents["Deployment"], documents["Service"]
    assert deployment["spec"]["replicas"] >= 2
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {item["name"]: item for item in container["env"]}

    # DATABASE_URL from a Secret, never a literal in the manifest.
    assert "value" not in env["DATABASE_URL"]
    secret = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] == "DATABASE_URL"
    assert "--from-literal=DATABASE_URL=" in KUBERNETES and secret["name"] in KUBERNETES.split("apiVersion")[0]

    # /metrics on the named port METRICS_PORT, and the pod says so to Prometheus.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    metrics_port = int(env["METRICS_PORT"]["value"])
    assert ports["metrics"] == metrics_port
    annotations = template["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port),
        "prometheus.io/path": "/metrics",
    }
    # The metrics port stays inside the cluster, and calls need no affinity.
    assert [port["targetPort"] for port in service["spec"]["ports"]] == ["http"]
    assert "sessionAffinity" not in service["spec"]


# ---------------------------------------------------------------------- claims shared by replicas


def test_claims_and_notes_are_shared_by_replicas_on_postgresql(postgres_url: str) -> None:
    """Two replicas' claim stores on one database: a key is granted to exactly one of them."""
    first, second = PostgresState(postgres_url), PostgresState(postgres_url)
    try:
        with ThreadPoolExecutor(8) as pool:
            granted = list(pool.map(lambda store: store.claim("amd-verdict:CA1"), [first, second] * 8))
        assert granted.count(True) == 1
        assert second.claim("amd-verdict:CA2") and not first.claim("amd-verdict:CA2")
        assert first.prune(time.time()) == 0  # nothing is old yet
        assert first.prune(time.time() + (KEEP_DAYS + 1) * 86400) == 2
        assert first.claim("amd-verdict:CA1"), "a claim past the replay window is forgotten"
        assert second.read("transfer:CA1") is None
        first.post("transfer:CA1", "accepted")
        assert second.read("transfer:CA1") == "accepted"
        first.post("transfer:CA1", "declined: busy")  # the newest note wins
        assert second.read("transfer:CA1") == "declined: busy"
    finally:
        first.close()
        second.close()


def test_claims_and_notes_are_shared_by_processes_through_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    first, second = DirectoryState(folder), DirectoryState(folder)
    with ThreadPoolExecutor(8) as pool:
        granted = list(pool.map(lambda store: store.claim("amd-verdict:CA1"), [first, second] * 8))
    assert granted.count(True) == 1
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    second.post("transfer:CA1", "accepted")
    assert first.read("transfer:CA1") == "accepted" and first.read("transfer:CA2") is None
    names = sorted(path.name for path in folder.iterdir())
    assert len(names) == 2 and not any("CA1" in name for name in names), names
    assert all(oct(path.stat().st_mode & 0o777) == "0o600" for path in folder.iterdir())
    for path in folder.iterdir():
        os.utime(path, (time.time() - (KEEP_DAYS + 1) * 86400,) * 2)
    assert first.prune(time.time()) == 2 and first.claim("amd-verdict:CA1") and first.read("transfer:CA1") is None
