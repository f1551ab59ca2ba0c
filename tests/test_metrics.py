"""Prometheus metrics (bridge/metrics.py): the text format read back with prometheus_client's own
parser, values checked against the calls the tests made, METRICS_PORT, and one scrape covering
every worker of a real ``main.py --workers 2``, including a worker that was killed and replaced.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from conftest import ROOT, BridgeFactory, free_port, twilio_url
from fakes import FakeAgent, FakeTwilioCaller, eventually
from prometheus_client.parser import text_string_to_metric_families
from test_agents import MainProcess

from bridge.call import CallEnd, EndReason
from bridge.metrics import END_LABELS, OTHER_END, Metrics, WorkerShare


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as {(name, sorted labels): value}, through prometheus_client's parser."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], metric: str, **labels: str) -> float:
    """The sample's value; a series that isn't there at all is a KeyError, never a silent 0."""
    return samples[(metric, tuple(sorted(labels.items())))]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return reply.read().decode()


# ------------------------------------------------------------------------------ the format


def test_the_text_format_parses_and_histograms_are_cumulative() -> None:
    metrics = Metrics(["get_drug_info"])
    metrics.call_started()
    metrics.call_started()
    metrics.call_ended(CallEnd(EndReason.CALLER_HUNG_UP), 42.0, {"twilio:not-json": 3})
    for seconds in (0.003, 0.2, 0.2, 30.0):
        metrics.on_record("function_call", {"name": "get_drug_info", "outcome": "ok", "duration_seconds": seconds})
    metrics.on_record("function_call", {"name": 'evil"\n{name}', "outcome": "bad_call", "duration_seconds": 0.0})
    metrics.on_record("agent_started_speaking", {"total_latency": 0.6})
    metrics.on_record("agent_resumed", {"attempt": 1})
    samples = parse(metrics.render())
    assert value(samples, "bridge_calls_active") == 1
    assert value(samples, "bridge_calls_total", ended_by="caller_hung_up") == 1
    assert value(samples, "bridge_call_duration_seconds_count") == 1
    assert value(samples, "bridge_call_duration_seconds_bucket", le="60.0") == 1
    assert value(samples, "bridge_call_duration_seconds_bucket", le="30.0") == 0
    fn = {"name": "get_drug_info", "outcome": "ok"}
    assert value(samples, "bridge_function_duration_seconds_bucket", le="0.005", **fn) == 1
    assert value(samples, "bridge_function_duration_seconds_bucket", le="0.25", **fn) == 3
    assert value(samples, "bridge_function_duration_seconds_bucket", le="+Inf", **fn) == 4
    assert value(samples, "bridge_function_duration_seconds_count", **fn) == 4
    assert abs(value(samples, "bridge_function_duration_seconds_sum", **fn) - 30.403) < 1e-9
    # A name the LLM made up is no new series.
    assert value(samples, "bridge_function_duration_seconds_count", name="unknown", outcome="bad_call") == 1
    assert value(samples, "bridge_agent_latency_seconds_count") == 1
    assert value(samples, "bridge_agent_reconnects_total") == 1
    assert value(samples, "bridge_bad_input_total", kind="twilio:not-json") == 3
    # A live call's bad input is added at each scrape, and in the snapshot the other workers read.
    live = [{"twilio:not-json": 2, "deepgram:bad-history": 1}]
    with_live = parse(metrics.render(live_bad_input=live))
    assert value(with_live, "bridge_bad_input_total", kind="twilio:not-json") == 5
    assert value(with_live, "bridge_bad_input_total", kind="deepgram:bad-history") == 1
    assert [["twilio:not-json"], 5.0] in metrics.snapshot(live)["values"]["bridge_bad_input_total"]
    assert value(parse(metrics.render()), "bridge_bad_input_total", kind="twilio:not-json") == 3  # not kept
    assert value(samples, "process_cpu_seconds_total") > 0
    assert value(samples, "process_open_fds") > 0 and value(samples, "process_resident_memory_bytes") > 0


def test_every_way_a_call_ends_has_its_own_label() -> None:
    """Each end reason is counted under its own label, and the docs list every label there is."""
    metrics = Metrics()
    for reason in EndReason:
        metrics.call_started()
        metrics.call_ended(CallEnd(reason, " with some detail"), 1.0, {})
    samples = parse(metrics.render())
    labels = {reason.value for reason in EndReason}
    assert len(labels) == len(EndReason) and OTHER_END not in labels
    for label in labels:
        assert value(samples, "bridge_calls_total", ended_by=label) == 1, label
    assert set(END_LABELS) == labels | {OTHER_END}
    documented = (ROOT / "docs" / "deployment.md").read_text()
    [row] = [line for line in documented.splitlines() if line.startswith("| `bridge_calls_total`")]
    assert set(re.findall(r"`([a-z_]+)`", row)) - {"bridge_calls_total", "ended_by", "end_reason"} == set(END_LABELS)


def test_snapshots_of_other_workers_are_summed_and_their_process_metrics_labelled() -> None:
    one, two = Metrics(["f"]), Metrics(["f"])
    one.call_started()
    two.call_started()
    two.call_started()
    two.call_ended(CallEnd(EndReason.AGENT_ENDED), 10.0, {})
    two.on_record("function_call", {"name": "f", "outcome": "timeout", "duration_seconds": 10.0})
    samples = parse(one.render([("1", two.snapshot())], worker="0"))
    assert value(samples, "bridge_calls_active") == 2
    assert value(samples, "bridge_calls_total", ended_by="agent_ended") == 1
    assert value(samples, "bridge_function_duration_seconds_count", name="f", outcome="timeout") == 1
    assert value(samples, "process_start_time_seconds", worker="0") > 0
    assert value(samples, "process_start_time_seconds", worker="1") > 0
    # A damaged snapshot is skipped, not a failed scrape.
    assert "bridge_calls_active 1" in one.render([("1", {"values": {"bridge_calls_total": [["x"]]}})], worker="0")


def test_a_retired_worker_keeps_its_counts_but_not_its_live_calls(tmp_path: Path) -> None:
    gone, alive = Metrics(["f"]), Metrics(["f"])
    for _ in range(3):
        gone.call_started()
    gone.call_ended(CallEnd(EndReason.CALLER_HUNG_UP), 5.0, {"twilio:not-json": 1})
    gone.on_record("function_call", {"name": "f", "outcome": "ok", "duration_seconds": 0.1})
    WorkerShare(tmp_path, "0").write(gone.snapshot())
    WorkerShare.retire(tmp_path, "0")
    assert not (tmp_path / "worker-0.json").exists()
    WorkerShare(tmp_path, "0").write(gone.snapshot())  # the same worker index dies a second time
    WorkerShare.retire(tmp_path, "0")
    share = WorkerShare(tmp_path, "1")
    samples = parse(alive.render(share.others(), worker="1"))
    assert value(samples, "bridge_calls_total", ended_by="caller_hung_up") == 2
    assert value(samples, "bridge_call_duration_seconds_count") == 2
    assert value(samples, "bridge_function_duration_seconds_count", name="f", outcome="ok") == 2
    assert value(samples, "bridge_bad_input_total", kind="twilio:not-json") == 2
    assert value(samples, "bridge_calls_active") == 0  # its calls ended with it
    assert {labels for name, labels in samples if name == "process_start_time_seconds"} == {(("worker", "1"),)}


# ------------------------------------------------------------------- through the real server


async def test_metrics_count_the_calls_made(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            during = parse(await asyncio.to_thread(scrape, server.port))
            assert value(during, "bridge_calls_active") == 1
            await caller.send_raw("not json")
            await caller.send_raw("still not json")
            # Bad input shows while the call runs, not only once it ends (a flood is seen as it happens).
            await eventually(lambda: [s.call.bad_input for s in server.calls] == [{"twilio:not-json": 2}])
            during = parse(await asyncio.to_thread(scrape, server.port))
            assert value(during, "bridge_bad_input_total", kind="twilio:not-json") == 2
            await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.4})
            await session.send_json({
                "type": "FunctionCallRequest",
                "functions": [
                    {"id": "a", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True},
                    {"id": "b", "name": "hack", "arguments": "{}", "client_side": True},
                ],
            })
            await eventually(lambda: len(session.of_type("FunctionCallResponse")) == 2, what="both answers")
            await session.close(1011, "restarting")  # resumable: a reconnect
            second = await fake_agent.session(1)
            await eventually(lambda: second.settings is not None)
            await caller.stop()
        async with FakeTwilioCaller(twilio_url(server)) as other:
            await other.start()
            third = await fake_agent.session(2)
            await eventually(lambda: third.settings is not None)
        await eventually(lambda: not server.calls, what="both calls to end")
        after = parse(await asyncio.to_thread(scrape, server.port))
    assert value(after, "bridge_calls_active") == 0
    assert value(after, "bridge_calls_total", ended_by="caller_hung_up") == 2
    assert value(after, "bridge_call_duration_seconds_count") == 2
    assert value(after, "bridge_agent_latency_seconds_count") == 1
    assert value(after, "bridge_agent_latency_seconds_sum") == 0.4
    assert value(after, "bridge_function_duration_seconds_count", name="get_drug_info", outcome="ok") == 1
    assert value(after, "bridge_function_duration_seconds_count", name="unknown", outcome="bad_call") == 1
    assert value(after, "bridge_agent_reconnects_total") == 1
    assert value(after, "bridge_bad_input_total", kind="twilio:not-json") == 2  # handed over, not counted twice


async def test_metrics_port_serves_metrics_there_only(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    metrics_port = free_port()
    async with make_bridge(fake_agent, metrics_port=metrics_port) as server:
        text = await asyncio.to_thread(scrape, metrics_port)
        assert "# TYPE bridge_calls_total counter" in text
        for port, path in ((server.port, "/metrics"), (metrics_port, "/health"), (metrics_port, "/twilio")):
            try:
                await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}{path}", timeout=5)
            except urllib.error.HTTPError as exc:
                assert exc.code == 404, (port, path)
            else:
                raise AssertionError(f"{path} on port {port} should be 404")


async def test_one_scrape_covers_every_worker(tmp_path: Path) -> None:
    both_workers = {(("worker", "0"),), (("worker", "1"),)}

    def workers_in(samples: dict[Any, float]) -> set[tuple[tuple[str, str], ...]]:
        return {labels for name, labels in samples if name == "process_start_time_seconds"}

    async with FakeAgent() as agent, MainProcess(tmp_path, agent, ROOT / "config.json", "--workers", "2") as bridge:
        # The parent's banner comes before the workers listen; a worker shows in a scrape once it
        # has written its first snapshot, so wait for both before counting on either.
        def both_sharing() -> bool:
            try:
                return workers_in(parse(scrape(bridge.port))) == both_workers
            except OSError:  # no worker listens yet
                return False

        await eventually(both_sharing, 15, "both workers sharing")
        calls = 8
        for _ in range(calls):  # the kernel spreads them over the two workers
            async with FakeTwilioCaller(bridge.url()) as caller:
                await caller.start()
                await caller.stop()

        def all_counted() -> bool:
            samples = parse(scrape(bridge.port))
            return (
                workers_in(samples) == both_workers
                and value(samples, "bridge_calls_total", ended_by="caller_hung_up") == calls
            )

        # Whichever worker answers, each scrape alone shows both workers and every call (each
        # worker writes its snapshot as a call ends).
        await eventually(lambda: all(all_counted() for _ in range(8)), 10, "every call in every scrape")
        samples = parse(await asyncio.to_thread(scrape, bridge.port))
        assert value(samples, "bridge_call_duration_seconds_count") == calls
        assert value(samples, "bridge_calls_active") == 0
    log = bridge.log()
    assert "Traceback" not in log, log


async def test_a_killed_worker_is_replaced_and_no_count_is_lost(tmp_path: Path) -> None:
    from test_config import worker_pids

    both_workers = {(("worker", "0"),), (("worker", "1"),)}
    async with FakeAgent() as agent, MainProcess(tmp_path, agent, ROOT / "config.json", "--workers", "2") as bridge:
        await eventually(lambda: bridge.count("worker (pid") == 2, 15, "both workers listening")
        assert bridge.process is not None
        calls = 6
        for _ in range(calls):
            async with FakeTwilioCaller(bridge.url()) as caller:
                await caller.start()
                await caller.stop()
        await eventually(
            lambda: value(parse(scrape(bridge.port)), "bridge_calls_total", ended_by="caller_hung_up") == calls,
            10, "every call counted",
        )
        before = await asyncio.to_thread(worker_pids, bridge.process)
        victim = before[0]
        os.kill(int(victim), signal.SIGKILL)  # the OOM killer, say
        await eventually(lambda: bridge.count("starting another") == 1, 10, "the parent to notice")
        [notice] = [line for line in bridge.log().splitlines() if "starting another" in line]
        assert f"(pid {victim}) exited (killed by SIGKILL); starting another" in notice
        await eventually(lambda: bridge.count("worker (pid") == 3, 15, "the new worker listening")
        after = await asyncio.to_thread(worker_pids, bridge.process)
        assert victim not in after and len(after) == 2

        def counts_kept() -> bool:
            try:
                samples = parse(scrape(bridge.port))
            except OSError:
                return False
            return (
                {labels for name, labels in samples if name == "process_start_time_seconds"} == both_workers
                and value(samples, "bridge_calls_total", ended_by="caller_hung_up") == calls
            )

        # Whichever worker answers, the dead worker's calls are still counted and both workers show.
        await eventually(lambda: all(counts_kept() for _ in range(8)), 10, "the counts after the restart")
        for _ in range(4):  # and calls still go through, whichever worker takes them
            async with FakeTwilioCaller(bridge.url()) as caller:
                sessions = len(agent.sessions)
                await caller.start()
                session = await agent.session(sessions)
                await eventually(lambda: session.settings is not None, what="the agent configured")
                await caller.stop()
        bridge.process.terminate()
        assert await asyncio.to_thread(bridge.process.wait, 15) == 0


def test_transfers_are_counted_by_mode_and_outcome() -> None:
    metrics = Metrics()
    metrics.on_record("transferred", {"reason": "r", "mode": "cold"})
    metrics.on_record("transfer_declined", {"mode": "warm", "reason": "busy"})
    metrics.on_record("transferred", {"reason": "r", "mode": "warm"})
    metrics.on_record("transfer_failed", {"reason": "r", "mode": "surprise!", "error": "e"})  # never a new label
    samples = parse(metrics.render())
    assert value(samples, "bridge_transfers_total", mode="cold", outcome="transferred") == 1
    assert value(samples, "bridge_transfers_total", mode="warm", outcome="declined") == 1
    assert value(samples, "bridge_transfers_total", mode="warm", outcome="transferred") == 1
    assert value(samples, "bridge_transfers_total", mode="cold", outcome="failed") == 1
