"""Production hardening through the real server: admission, Deepgram faults, resume, records, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from twilio.request_validator import RequestValidator
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from bridge.call import MAX_ERROR_RESUMES
from bridge.records import RecordWriter
from bridge.server import DUPLICATE_SIGNAL_SECONDS, BridgeServer
from bridge.twilio import expected_signature
from conftest import ROOT, BridgeFactory, empty_env, free_port, read_record, twilio_url
from fakes import FakeAgent, FakeTwilioCaller, close_code, eventually
from test_config import validate_settings

TOKEN = "twilio-auth-token-for-tests"
PUBLIC = "https://bridge.example.ngrok.app"


def http_get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}") if exc.headers.get("Content-Type") == "application/json" else {}


# ------------------------------------------------------------------------------------ signature


def test_our_signature_matches_twilios_own_validator() -> None:
    url = "wss://bridge.example.ngrok.app/twilio"
    signature = expected_signature(TOKEN, url)
    assert RequestValidator(TOKEN).validate(url, {}, signature)
    assert not RequestValidator(TOKEN).validate(url, {}, expected_signature("other", url))


async def test_signature_is_required_when_auth_token_is_set(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, twilio_auth_token=TOKEN, public_url=PUBLIC) as server:
        good = RequestValidator(TOKEN).compute_signature("wss://bridge.example.ngrok.app/twilio", {})
        for headers in (
            {},
            {"X-Twilio-Signature": "bm90IGEgc2lnbmF0dXJl"},
            {"X-Twilio-Signature": expected_signature("wrong", "wss://bridge.example.ngrok.app/twilio")},
            {"X-Twilio-Signature": "caf\u00e9"},  # not ASCII: refused, not a 500
            [("X-Twilio-Signature", good), ("X-Twilio-Signature", good)],  # twice: refused, not a 500
        ):
            with pytest.raises(InvalidStatus) as refused:
                await connect(twilio_url(server), additional_headers=headers)
            assert refused.value.response.status_code == 403
        assert fake_agent.handshakes == 0, "a refused call must not open a Deepgram session"
        # Twilio's own library computes the header a real Twilio would send.
        async with FakeTwilioCaller(twilio_url(server), headers={"X-Twilio-Signature": good}) as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)


# ---------------------------------------------------------------------------------------- limits


async def test_calls_past_max_calls_get_503(fake_agent: FakeAgent, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with make_bridge(fake_agent, max_calls=2) as server:
        async with FakeTwilioCaller(twilio_url(server)) as one, FakeTwilioCaller(twilio_url(server)) as two:
            await one.start()
            await two.start()
            with pytest.raises(InvalidStatus) as refused:
                await connect(twilio_url(server))
            assert refused.value.response.status_code == 503
            assert "refused a call: 2 calls are live and MAX_CALLS is 2" in [r.getMessage() for r in caplog.records]
        await eventually(lambda: not server.calls)
        async with FakeTwilioCaller(twilio_url(server)) as three:  # room again once they hung up
            await three.start()
            await eventually(lambda: len(fake_agent.sessions) == 3)


async def test_oversize_frame_ends_only_that_call(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as good, FakeTwilioCaller(twilio_url(server)) as bad:
            await good.start()
            await bad.start()
            await bad.send_raw("x" * (256 * 1024))
            await asyncio.wait_for(bad.closed.wait(), 2)
            assert bad.socket is not None and await close_code(bad.socket) == 1009
            await good.send_audio(b"\x42" * 3200)
            sessions = await eventually(lambda: [s for s in fake_agent.sessions if len(s.audio) == 3200], what="good audio")
            assert len(sessions) == 1


# ------------------------------------------------------------------------------- Deepgram faults


async def expect_prompt_end(server: Any, caplog: pytest.LogCaptureFixture, reason: str, within: float = 2.0) -> None:
    started = time.monotonic()
    async with FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        await caller.send_audio(b"\x00" * 1600)
        await asyncio.wait_for(caller.closed.wait(), within)
    assert time.monotonic() - started < within
    await eventually(lambda: not server.calls)
    failures = [r.getMessage() for r in caplog.records if "could not start the agent session" in r.getMessage()]
    assert len(failures) == 1 and reason in failures[0], failures


async def test_agent_refusing_the_key_ends_the_call(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAgent(refuse_status=401) as agent, make_bridge(agent) as server:
        await expect_prompt_end(server, caplog, "HTTP 401 (check DEEPGRAM_API_KEY)")


async def test_agent_unreachable_ends_the_call(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    async with make_bridge(None, deepgram_agent_url=f"ws://127.0.0.1:{port}/") as server:
        await expect_prompt_end(server, caplog, "could not start the agent session: cannot reach Deepgram: ")


def test_the_reason_deepgram_could_not_be_reached_says_so_once() -> None:
    from bridge.session import _connect_failure

    refused = ConnectionRefusedError(111, "Connection refused")
    assert _connect_failure(refused) == "cannot reach Deepgram: [Errno 111] Connection refused"


async def test_no_settings_applied_in_time_ends_the_call(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAgent(settings_mode="ignore") as agent, make_bridge(agent, agent_connect_timeout_seconds=0.5) as server:
        await expect_prompt_end(server, caplog, "timed out after 0.5 s waiting for SettingsApplied")


async def test_settings_refused_ends_the_call(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAgent(settings_mode="error") as agent, make_bridge(agent) as server:
        await expect_prompt_end(server, caplog, "Deepgram refused the session: INVALID_SETTINGS: bad settings")


async def test_bad_agent_messages_are_survived(fake_agent: FakeAgent, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        for frame in ["not json", "[1,2]", '{"type": 5}', "{}", '{"type":"FunctionCallRequest","functions":"x"}',
                      '{"type":"FunctionCallRequest","functions":[{"id":1}]}', '{"type":"ConversationText","role":null}',
                      '{"type":"FunctionCallCancelled","functions":[null]}', "not json either"]:
            await session.socket.send(frame)
        await session.send_audio(b"\x33" * 999)
        await caller.send_audio(b"\x44" * 3200)
        await eventually(lambda: len(caller.audio) == 999 and len(session.audio) == 3200)
        assert not caller.closed.is_set()
    assert sum("not JSON" in r.getMessage() for r in caplog.records) == 1, "logged once per call, not per frame"


async def test_keepalive_when_no_audio_flows(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, keepalive_seconds=0.2) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: len(session.of_type("KeepAlive")) >= 2, 2, "KeepAlives while idle")
        # While audio flows there are none.
        count = len(session.of_type("KeepAlive"))
        for _ in range(30):
            await caller.send_audio(b"\x01" * 3200)
            await asyncio.sleep(0.02)
        assert len(session.of_type("KeepAlive")) <= count + 1


# --------------------------------------------------------------------------------- resume


def agent_ready(server: BridgeServer, sessions: int = 1) -> bool:
    """The bridge has taken SettingsApplied on its ``sessions``-th agent session (not just connected)."""
    return bool(server.calls) and all(
        session.call.link.generation >= sessions and session.call.agent_ready for session in server.calls
    )


async def test_mid_call_drop_resumes_with_history(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, inbound_chunk_bytes=160) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        first = await fake_agent.session(0)
        await eventually(lambda: agent_ready(server), what="the first agent session to be ready")
        await first.send_json({"type": "ConversationText", "role": "user", "content": "Is ibuprofen in stock?"})
        await first.send_json({"type": "FunctionCallRequest", "functions": [
            {"id": "f1", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True}]})
        await eventually(lambda: first.of_type("FunctionCallResponse"))
        await first.send_json({"type": "ConversationText", "role": "assistant", "content": "Yes, it is."})
        await caller.send_audio(b"\x01" * 320)
        await eventually(lambda: len(first.audio) == 320 and any(len(c.call.history) == 3 for c in server.calls))
        first.drop()
        second = await fake_agent.session(1, timeout=5)
        await eventually(lambda: second.settings is not None)
        await eventually(lambda: agent_ready(server, 2), what="the bridge to have SettingsApplied again")
        validate_settings(second.settings_raw)
        history = second.settings["agent"]["context"]["messages"]
        assert history[0] == {"type": "History", "role": "user", "content": "Is ibuprofen in stock?"}
        assert history[1]["function_calls"][0]["id"] == "f1"
        assert json.loads(history[1]["function_calls"][0]["response"])["name"] == "Ibuprofen"
        assert history[2] == {"type": "History", "role": "assistant", "content": "Yes, it is."}
        # The conversation carries on in both directions on the new session.
        await second.send_audio(b"\x02" * 640)
        await caller.send_audio(b"\x03" * 480)
        await eventually(lambda: caller.audio.endswith(b"\x02" * 640) and len(second.audio) == 480)
        assert bytes(second.audio) == b"\x03" * 480, "no stale audio replayed into the new session"
        assert not caller.closed.is_set()


async def test_gap_audio_is_not_replayed(make_bridge: BridgeFactory) -> None:
    async with FakeAgent() as agent, make_bridge(agent, inbound_chunk_bytes=160) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            first = await agent.session(0)
            await eventually(lambda: agent_ready(server), what="the first agent session to be ready")
            agent.settings_delay = 0.3  # the resumed session takes a while to apply
            first.drop()
            second = await agent.session(1, timeout=5)
            await caller.send_audio(b"\x09" * 800)  # spoken during the gap
            await eventually(lambda: second.settings is not None)
            await eventually(lambda: agent_ready(server, 2), what="the bridge to have SettingsApplied again")
            await caller.send_audio(b"\x0a" * 160)
            await eventually(lambda: len(second.audio) >= 160)
            assert bytes(second.audio) == b"\x0a" * 160


async def test_failed_resume_ends_the_call(make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAgent() as agent, make_bridge(agent, agent_reconnect_delays=(0.05, 0.05)) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            first = await agent.session(0)
            await eventually(lambda: agent_ready(server), what="the first agent session to be ready")
            agent.refuse_status = 503
            first.drop()
            await asyncio.wait_for(caller.closed.wait(), 3)
    assert agent.handshakes == 4  # the first session and three attempts
    assert any("could not resume the agent session after 3 attempts" in r.getMessage() for r in caplog.records)


# -------------------------------------------------------------------------------- call records


async def test_call_record_has_the_whole_call(fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start({"campaign": "spring"})
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            await caller.send_audio(b"\x01" * 4000)
            for message in (
                {"type": "ConversationText", "role": "user", "content": "How much is ibuprofen?"},
                {"type": "FunctionCallRequest", "functions": [{"id": "a", "name": "get_drug_info", "arguments": '{"drug_name":"ibuprofen"}', "client_side": True}]},
                {"type": "AgentStartedSpeaking", "total_latency": 0.9, "tts_latency": 0.3, "ttt_latency": 0.6},
                {"type": "ConversationText", "role": "assistant", "content": "It is 8.99."},
                {"type": "UserStartedSpeaking"},
                {"type": "AgentStartedSpeaking", "total_latency": 1.1, "tts_latency": 0.3, "ttt_latency": 0.8},
                {"type": "Warning", "code": "W1", "description": "careful"},
            ):
                await session.send_json(message)
            await session.send_audio(b"\x02" * 2000)
            await eventually(lambda: session.of_type("FunctionCallResponse") and len(caller.audio) == 2000)
            await caller.stop()
            await asyncio.wait_for(session.closed.wait(), 2)
        await eventually(lambda: not server.calls)
    events = read_record(tmp_path / "calls")
    kinds = [e["event"] for e in events]
    assert kinds.count("transcript") == 2 and "barge_in" in kinds and "warning" in kinds
    function = next(e for e in events if e["event"] == "function_call")
    assert function["name"] == "get_drug_info" and function["result"]["price"] == 8.99 and function["error"] is None
    assert function["duration_seconds"] >= 0
    summary = events[-1]
    assert summary["event"] == "summary"
    assert summary["call_sid"] == caller.call_sid and summary["stream_sid"] == caller.stream_sid
    assert summary["custom_parameters"] == {"campaign": "spring"}
    assert summary["ended_by"] == "caller hung up"
    assert (summary["turns"], summary["barge_ins"], summary["function_calls"], summary["function_errors"]) == (2, 1, 1, 0)
    assert summary["agent_latency_p50"] == pytest.approx(1.0) and 1.0 < summary["agent_latency_p95"] <= 1.1
    assert (summary["audio_bytes_from_caller"], summary["audio_bytes_to_agent"], summary["audio_bytes_to_caller"]) == (4000, 4000, 2000)
    assert summary["duration_seconds"] > 0 and summary["started_at"] < summary["ended_at"]


async def test_record_is_complete_when_the_call_ends_by_a_fault(fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        await session.send_json({"type": "ConversationText", "role": "user", "content": "hello"})
        # A mid-call Error resumes the session; one that comes back every time ends the call.
        for attempt in range(MAX_ERROR_RESUMES + 1):
            session = await fake_agent.session(attempt)
            await eventually(lambda: session.settings is not None)
            await session.send_json({"type": "Error", "code": "CLIENT_MESSAGE_TIMEOUT", "description": "no audio"})
        await asyncio.wait_for(caller.closed.wait(), 5)
        await eventually(lambda: not server.calls)
    events = read_record(tmp_path / "calls")
    assert [event["event"] for event in events[:3]] == ["start", "agent_session", "transcript"]
    assert events[-2] == {**events[-2], "event": "error", "code": "CLIENT_MESSAGE_TIMEOUT"}
    assert events[-1]["ended_by"] == "Deepgram error CLIENT_MESSAGE_TIMEOUT"
    assert events[-1]["errors"] == MAX_ERROR_RESUMES + 1


async def test_record_calls_false_writes_nothing(fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with make_bridge(fake_agent, record_calls=False) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await session.send_json({"type": "ConversationText", "role": "user", "content": "private"})
        await caller.stop()
        await eventually(lambda: not server.calls)
    assert not (tmp_path / "calls").exists()


# -------------------------------------------------------------------------------- draining


async def test_sigterm_drains_a_live_call_then_exits_zero(fake_agent: FakeAgent, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "DEEPGRAM_AGENT_URL": fake_agent.url, "DRAIN_SECONDS": "20",
           "CALLS_DIR": str(tmp_path / "calls"), "LOG_LEVEL": "INFO"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        await eventually(lambda: _health(port)[0] == 200, 10, "the server to start")
        async with FakeTwilioCaller(f"ws://127.0.0.1:{port}/twilio") as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            process.send_signal(signal.SIGTERM)
            await eventually(lambda: _health(port) == (503, {"status": "draining", "calls": 1}), 5, "health to say draining")
            with pytest.raises(InvalidStatus) as refused:
                await connect(f"ws://127.0.0.1:{port}/twilio")
            assert refused.value.response.status_code == 503
            # The live call carries on both ways while draining.
            await caller.send_audio(b"\x05" * 3200)
            await session.send_audio(b"\x06" * 800)
            await eventually(lambda: len(session.audio) == 3200 and len(caller.audio) == 800)
            assert process.poll() is None
            await caller.stop()
        code = await asyncio.to_thread(process.wait, 10)
        assert code == 0
        assert len(list((tmp_path / "calls").glob("*.jsonl"))) == 1
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate()
    assert "draining" in stderr


def _health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        return http_get(port, "/health")
    except OSError:
        return 0, {}


async def test_a_long_calls_events_reach_disk_before_it_ends(fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path) -> None:
    from bridge.records import FLUSH_LINES

    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        for turn in range(FLUSH_LINES + 5):
            await session.send_json({"type": "ConversationText", "role": "user", "content": f"turn {turn}"})

        def early_turns_on_disk() -> bool:
            files = list((tmp_path / "calls").glob("*.jsonl"))
            return bool(files) and f'"turn {FLUSH_LINES - 5}"' in files[0].read_text()

        await eventually(early_turns_on_disk, 3, "the first events on disk mid-call")
        assert len(server.calls) == 1 and not caller.closed.is_set()
        await caller.stop()
        await eventually(lambda: not server.calls)
    events = read_record(tmp_path / "calls")
    assert [e["content"] for e in events if e["event"] == "transcript"] == [f"turn {n}" for n in range(FLUSH_LINES + 5)]
    assert events[-1]["event"] == "summary" and events[-1]["turns"] == FLUSH_LINES + 5


@contextlib.asynccontextmanager
async def bridge_process_with_a_call(
    fake_agent: FakeAgent, tmp_path: Path, *, record: bool = False, log: Path | None = None
) -> AsyncIterator[tuple[subprocess.Popen[bytes], int, FakeTwilioCaller]]:
    """main.py as its own process (DRAIN_SECONDS 30), with one call up and its agent session ready."""
    port = free_port()
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "DEEPGRAM_AGENT_URL": fake_agent.url, "DRAIN_SECONDS": "30",
           "RECORD_CALLS": "true" if record else "false", "CALLS_DIR": str(tmp_path / "calls")}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb") if log else subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _health(port)[0] == 200, 10, "the server to start")
        async with FakeTwilioCaller(f"ws://127.0.0.1:{port}/twilio") as caller:
            await caller.start()
            await eventually(lambda: fake_agent.sessions and fake_agent.sessions[0].settings is not None)
            yield process, port, caller
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_second_signal_ends_live_calls_at_once_and_writes_their_records(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    log = tmp_path / "bridge.log"
    async with bridge_process_with_a_call(fake_agent, tmp_path, record=True, log=log) as (process, port, caller):
        process.send_signal(signal.SIGTERM)
        await eventually(lambda: _health(port)[0] == 503, 5, "draining")
        await asyncio.sleep(DUPLICATE_SIGNAL_SECONDS)  # a person's second Ctrl-C, not a duplicate
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        code = await asyncio.to_thread(process.wait, 5)
        assert time.monotonic() - started < 2, "the second signal must not wait for the drain"
        assert code == 1
        await asyncio.wait_for(caller.closed.wait(), 2)
    events = read_record(tmp_path / "calls")
    assert events[0]["event"] == "start"
    assert events[-1]["event"] == "summary" and events[-1]["ended_by"] == "server shutting down"
    text = log.read_text()
    assert "press Ctrl-C again, or send another SIGTERM, to end live calls now" in text
    assert "second signal: ending 1 live call now and writing their records" in text
    assert re.search(r" draining: waiting up to 30 s for 1 live call$", text, flags=re.M), text  # one call: singular


SECOND_SIGNAL_BACKSTOP_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
import bridge.server
bridge.server.SECOND_SIGNAL_EXIT_SECONDS = {backstop}  # shortened for the test
import pharmacy_functions

def get_drug_info(drug_name):  # a thread that never finishes: it holds up the interpreter's exit
    time.sleep(120)

pharmacy_functions.function_map["get_drug_info"] = get_drug_info
import main
sys.exit(main.main(sys.argv[1:]))
"""


async def test_a_second_signal_is_bounded_even_if_a_function_thread_hangs(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """A stuck ``def`` function keeps the interpreter from exiting: the backstop ends the process anyway."""
    backstop = 4.0
    port = free_port()
    script = tmp_path / "bridge_with_a_stuck_function.py"
    script.write_text(SECOND_SIGNAL_BACKSTOP_SCRIPT.format(root=str(ROOT), backstop=backstop))
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "DEEPGRAM_AGENT_URL": fake_agent.url, "DRAIN_SECONDS": "30",
           "RECORD_CALLS": "true", "CALLS_DIR": str(tmp_path / "calls")}
    process = subprocess.Popen(
        [sys.executable, str(script), "--host", "127.0.0.1", "--port", str(port), "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _health(port)[0] == 200, 10, "the server to start")
        async with FakeTwilioCaller(f"ws://127.0.0.1:{port}/twilio") as caller:
            await caller.start()
            await eventually(lambda: fake_agent.sessions and fake_agent.sessions[0].settings is not None)
            await fake_agent.sessions[0].send_json({"type": "FunctionCallRequest", "functions": [
                {"id": "f1", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True}]})
            process.send_signal(signal.SIGTERM)
            await eventually(lambda: _health(port)[0] == 503, 5, "draining")
            await asyncio.sleep(DUPLICATE_SIGNAL_SECONDS)
            started = time.monotonic()
            process.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(process.wait, backstop + 5)
            took = time.monotonic() - started
        assert code == 1
        assert backstop - 0.5 < took < backstop + 2, f"exited after {took:.1f} s; the backstop is {backstop} s"
        events = read_record(tmp_path / "calls")
        assert events[-1]["event"] == "summary" and events[-1]["ended_by"] == "server shutting down"
        (function,) = [event for event in events if event["event"] == "function_call"]
        assert function["error"] == "the call ended before it finished"
    finally:
        if process.poll() is None:
            process.kill()


async def test_an_agent_session_that_opens_while_the_call_closes_is_closed_too(make_bridge: BridgeFactory) -> None:
    """A call ended mid-handshake (a drain, say): the half-open agent session must not outlive it.

    Its socket closes, the handshake is abandoned (no session becomes ready), and no timer of the
    call is left armed (a KeepAlive chain used to reschedule itself forever after the call).
    """
    async with FakeAgent(settings_delay=0.3) as agent, make_bridge(agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            seen = await agent.session(0)
            session = next(iter(server.calls))
            assert not session.call.agent_ready
            assert caller.socket is not None
            caller.socket.transport.pause_reading()  # closing the caller's socket now takes its full timeout
            session.shut_down()
            await eventually(lambda: not server.calls, 5, "the call to end")
            assert session.call.link.generation == 0, "an abandoned handshake must not become a session"
            await asyncio.wait_for(seen.closed.wait(), 2)
            assert not session._timers, f"timers left armed: {list(session._timers)}"
            caller.socket.transport.resume_reading()


async def test_a_resumed_session_hears_of_a_function_that_ran_across_the_drop(make_bridge: BridgeFactory) -> None:
    """The agent drops while an order is being placed: the new session's history has its result."""

    def place_slowly(drug_name: str) -> dict[str, Any]:
        time.sleep(0.5)
        return {"order_number": "ORD-7", "drug_name": drug_name}

    async with FakeAgent() as agent, make_bridge(agent, function_map={"get_drug_info": place_slowly}) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            first = await agent.session(0)
            await eventually(lambda: agent_ready(server), what="the first agent session to be ready")
            await first.send_json({"type": "FunctionCallRequest", "functions": [
                {"id": "o1", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True}]})
            await eventually(lambda: any(session.call.functions.any_running for session in server.calls), what="the function to start")
            first.drop()
            second = await agent.session(1, timeout=5)
            await eventually(lambda: second.settings is not None)
            history = second.settings["agent"]["context"]["messages"]
            assert [item["function_calls"][0]["id"] for item in history if "function_calls" in item] == ["o1"]
            assert json.loads(history[-1]["function_calls"][0]["response"]) == {"order_number": "ORD-7", "drug_name": "ibuprofen"}
            assert not first.of_type("FunctionCallResponse") and not second.of_type("FunctionCallResponse")


async def test_one_stop_delivered_twice_still_drains(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """systemd signals every process of a service, and a --workers parent forwards it too."""
    async with bridge_process_with_a_call(fake_agent, tmp_path) as (process, port, caller):
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        await eventually(lambda: _health(port)[0] == 503, 5, "draining")  # the first one is handled
        if time.monotonic() - sent > DUPLICATE_SIGNAL_SECONDS * 0.8:
            pytest.skip("the server took too long to start draining to tell a duplicate from a second signal")
        process.send_signal(signal.SIGTERM)  # the same stop again, moments later
        await asyncio.sleep(0.5)
        assert _health(port) == (503, {"status": "draining", "calls": 1})
        assert process.poll() is None and not caller.closed.is_set(), "the duplicate cut the drain short"
        await caller.stop()
        assert await asyncio.to_thread(process.wait, 10) == 0


async def test_a_post_to_twilio_gets_405_and_one_line_saying_where_the_webhook_goes(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A number's voice webhook pointed at /twilio: Twilio POSTs its form there."""
    async with make_bridge() as server:
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/twilio", data=b"CallSid=CA123&From=%2B15551234567", method="POST"
        )
        with caplog.at_level("WARNING", logger="bridge.server"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=3)
        assert caught.value.code == 405 and caught.value.headers["Allow"] == "GET"
    lines = [record.getMessage() for record in caplog.records if record.name == "bridge.server"]
    assert lines == [
        "refused a POST to /twilio: /twilio is the Media Streams WebSocket, not a voice webhook; "
        "point the number's voice webhook at /twiml, or use a TwiML Bin"
    ]


def get_text(port: int, path: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def test_the_root_lists_what_is_served_without_secrets(make_bridge: BridgeFactory) -> None:
    async with make_bridge(phone_page=True, phone_page_token="secret-token-123") as server:
        status, kind, body = await asyncio.to_thread(get_text, server.port, "/")
        assert status == 200 and kind == "text/plain; charset=utf-8"
        for path, what in server.routes():
            assert f"{path} " in body and what in body
        assert "/phone?token=..." in body and "secret-token-123" not in body and "test-key-not-secret" not in body
    async with make_bridge() as server:
        _, _, body = await asyncio.to_thread(get_text, server.port, "/")
        assert "/phone" not in body and "/twilio " in body and "/health " in body


def test_a_record_write_cut_short_leaves_whole_lines(tmp_path: Path) -> None:
    """A full disk mid-write: the part that fitted is taken back, so the file stays valid JSON Lines."""
    script = f"""
import resource, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from bridge.records import _append
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path({str(tmp_path / "call.jsonl")!r})
assert _append(path, "a" * 99 + "\\n") is None
resource.setrlimit(resource.RLIMIT_FSIZE, (150, 150))  # room for 50 more bytes only
error = _append(path, "b" * 99 + "\\n")
print(type(error).__name__, path.stat().st_size)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10)
    assert result.stdout.split() == ["OSError", "100"], result.stderr
    assert (tmp_path / "call.jsonl").read_text() == "a" * 99 + "\n"


def test_a_mid_call_record_batch_that_fails_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    not_a_directory = tmp_path / "calls"
    not_a_directory.write_text("")
    writer = RecordWriter()
    writer.append(not_a_directory / "call.jsonl", '{"event": "transcript"}\n')
    writer.close()
    assert [r.levelname for r in caplog.records if "could not write to the call record" in r.getMessage()] == ["ERROR"]
