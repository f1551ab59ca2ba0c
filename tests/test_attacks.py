"""Hostile and broken peers, driven from outside through real sockets, with a normal call beside them.

Each test models one attack from the call-core issue and asserts what must hold: the call (or
connection) is ended or slowed within a bound, memory and records stay bounded, the log can't be
forged, and the bridge keeps serving (/health, other calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

from bridge.server import BridgeServer
from conftest import ROOT, BridgeFactory, empty_env, free_port, read_record, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually, media_event
from test_transport import RawTwilio, raw_call


def health_seconds(port: int) -> float:
    """How long GET /health takes; fails the test if it doesn't answer 200."""
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert response.status == 200
    return time.monotonic() - started


async def health_in_thread(port: int) -> float:
    return await asyncio.to_thread(health_seconds, port)


def strict_json(line: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"not strict JSON: {name} in {line[:200]}")

    return json.loads(line, parse_constant=refuse)


# ------------------------------------------------------------------------- peers that stop reading


async def test_a_caller_that_stops_reading_is_cut_off_and_its_call_recorded(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The caller reads nothing while the agent talks: the call ends within seconds, slot freed."""
    async with make_bridge(fake_agent, stall_seconds=1.0) as server, raw_call(
        server, fake_agent, receive_buffer=4096
    ) as (caller, agent, connection):
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        started = time.monotonic()
        chunk = b"\x55" * 32_000
        try:
            for _ in range(600):  # up to 19 MB of speech, never read by the caller
                await asyncio.wait_for(agent.send_audio(chunk), 5)
                if not server.calls:
                    break
        except Exception:  # noqa: BLE001 - the bridge closed the agent socket under us, as it should
            pass
        await eventually(lambda: not server.calls, 6, "the stalled call to end")
        assert time.monotonic() - started < 6
        assert await health_in_thread(server.port) < 1
    summary = read_record(tmp_path / "calls")[-1]
    assert summary["ended_by"] == "caller stopped reading"


async def test_an_agent_that_stops_reading_ends_the_call(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The agent reads nothing while the caller talks: the call ends, it is not held forever."""
    async with make_bridge(fake_agent, stall_seconds=1.0, inbound_buffer_bytes=16000) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            session.socket.transport.pause_reading()
            started = time.monotonic()
            try:
                for _ in range(400):  # 25 MB of audio, faster than real time
                    await caller.send_audio(b"\x11" * 64_000, frame=16_000)
                    if caller.closed.is_set() or not server.calls:
                        break
            except Exception:  # noqa: BLE001 - the bridge hung up on us, as it should
                pass
            await eventually(lambda: not server.calls, 8, "the call with a stalled agent to end")
            assert time.monotonic() - started < 8
            session.socket.transport.resume_reading()
    summary = read_record(tmp_path / "calls")[-1]
    assert summary["ended_by"] == "agent stopped reading"


async def test_sigterm_exits_in_time_with_a_wedged_caller_and_writes_its_record(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    """SIGTERM with a caller that reads nothing: the process exits within DRAIN_SECONDS + a few."""
    port = free_port()
    calls_dir = tmp_path / "calls"
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "DEEPGRAM_AGENT_URL": fake_agent.url, "DRAIN_SECONDS": "1",
           "CALLS_DIR": str(calls_dir)}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port),
         "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        await eventually(lambda: _up(port), 10, "the server to start")
        caller = RawTwilio(f"ws://127.0.0.1:{port}/twilio")
        await caller.open(receive_buffer=4096)
        await caller.write(caller.opening())
        agent = await fake_agent.session()
        await eventually(lambda: agent.settings is not None)
        for _ in range(40):  # fill the caller's socket: it never reads
            await agent.send_audio(b"\x22" * 32_000)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 15)
        assert code == 0 and time.monotonic() - started < 1 + 8
        [record] = list(calls_dir.glob("*.jsonl"))
        assert json.loads(record.read_text().splitlines()[-1])["event"] == "summary"
        caller.close()
    finally:
        if process.poll() is None:
            process.kill()


def _up(port: int) -> bool:
    try:
        return health_seconds(port) >= 0
    except OSError:
        return False


# ------------------------------------------------------------------------------------ floods


async def test_marks_before_start_and_forged_marks_after_it_are_counted_not_kept(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """A mark flood before start keeps nothing; after start, marks the bridge never sent write nothing."""
    # The frame budget is lifted here: this test is about what is kept, not about throttling.
    async with make_bridge(fake_agent, caller_frames_per_second=1e6, caller_frame_burst=10**6) as server:
        caller = RawTwilio(twilio_url(server))
        await caller.open()
        marks = b"".join(caller.text({"event": "mark", "mark": {"name": f"m{i}"}}) for i in range(2000))
        for _ in range(10):
            await caller.write(marks)  # 20,000 marks before start
        await caller.write(caller.opening())
        agent = await fake_agent.session()
        await eventually(lambda: agent.settings is not None)
        for _ in range(10):
            await caller.write(marks)  # 20,000 forged echoes after start
        session = next(iter(server.calls))
        await eventually(lambda: sum(session.call.bad_input.values()) >= 40_000, 20, "every mark counted")
        caller.close()
        await eventually(lambda: not server.calls, 5)
    lines = read_record(tmp_path / "calls")
    assert not [line for line in lines if line["event"] in ("mark_played", "mark_cleared")]
    assert len(lines) < 10
    assert lines[-1]["bad_input"] == {"twilio:mark-before-start": 20_000, "twilio:unknown-mark": 20_000}


async def test_caller_audio_for_an_agent_that_never_gets_ready_is_capped(
    make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent that never answers Settings, a caller flooding audio: held audio stops at its cap."""
    async with FakeAgent(settings_mode="ignore") as agent, make_bridge(
        agent, agent_connect_timeout_seconds=30, agent_queue_max_bytes=64_000
    ) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await agent.session()
            sending = asyncio.create_task(caller.send_audio(b"\x33" * 4_000_000, frame=8000))
            session = next(iter(server.calls))
            await eventually(lambda: session._caller_held, 10, "reading from the caller to pause")
            await asyncio.sleep(0.3)
            held = session.call._held_bytes
            assert 64_000 <= held <= 64_000 + 8000 + 3200, held  # at most one frame past the cap
            await asyncio.sleep(0.5)
            assert session.call._held_bytes == held, "audio kept growing past the cap"
            # What the caller sends meanwhile waits in the socket's inbox, then in TCP: both bounded.
            await eventually(lambda: sending.done() or session.caller.transport.is_reading() is False, 10)
            assert session.caller._inbox_bytes <= 2 * 256 * 1024 + 16_000  # the cap, plus the read that crossed it
            sending.cancel()
    assert sum("wait for the agent session" in r.getMessage() for r in caplog.records) == 1


async def test_a_ping_flood_from_a_peer_that_never_reads_is_cut_off(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """Pings from a client that never reads its pongs: reading pauses, so no pong backlog builds."""
    # The frame budget would slow this flood too; lifted, the write-side defence is what's tested.
    async with make_bridge(
        fake_agent, stall_seconds=3.0, caller_frames_per_second=1e6, caller_frame_burst=10**6
    ) as server, raw_call(
        server, fake_agent, receive_buffer=4096
    ) as (caller, _, connection):
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ping = Frame(Opcode.PING, b"p" * 125).serialize(mask=True)
        assert caller.writer is not None
        paused = False
        try:
            for _ in range(2000):  # up to 25 MB of pongs if the bridge kept reading
                caller.writer.write(ping * 100)
                await asyncio.wait_for(caller.writer.drain(), 1)
                assert connection.transport.get_write_buffer_size() < 512 * 1024
        except TimeoutError:
            paused = True  # the bridge stopped reading us: backpressure
        except ConnectionError:
            pass
        assert connection.transport.get_write_buffer_size() < 512 * 1024
        assert paused or not server.calls
        assert await health_in_thread(server.port) < 1
        await eventually(lambda: not server.calls, 8, "the ping flooder to be cut off")


async def test_a_flood_of_tiny_frames_is_throttled_and_other_calls_keep_their_latency(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """One connection writes tiny frames as fast as it can; a normal call's audio stays prompt."""
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as normal:
            await normal.start()
            session: FakeAgentSession = await fake_agent.session(0)
            await eventually(lambda: session.settings is not None)
            flooder = RawTwilio(twilio_url(server))
            await flooder.open()
            await flooder.write(flooder.opening())
            tiny = flooder.text("{}") * 5000

            async def flood() -> None:
                assert flooder.writer is not None
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline:
                    flooder.writer.write(tiny)
                    await flooder.writer.drain()

            flooding = asyncio.create_task(flood())
            delays = []
            for n in range(15):
                before = len(normal.audio)
                sent = time.monotonic()
                await session.send_audio(bytes([n]) * 400)
                await eventually(lambda: len(normal.audio) >= before + 400, 2, "agent audio at the caller")
                delays.append(time.monotonic() - sent)
                await asyncio.sleep(0.1)
            assert max(delays) < 0.25, delays
            assert await health_in_thread(server.port) < 0.5
            flood_call = [call for call in server.calls if call.caller is not next(iter(server.calls)).caller]
            assert any(call.caller.frames_throttled for call in server.calls), "the flooder was never throttled"
            flooding.cancel()
            flooder.close()
            del flood_call


async def test_stalled_handshakes_are_bounded_and_health_still_answers(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Many connections that never finish their request: the oldest make room, with one log line."""
    caplog.set_level(logging.WARNING, "bridge.server")
    async with make_bridge(fake_agent, max_handshakes=20) as server:
        stalled = []
        readers = []
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
            stalled.append(writer)
            readers.append(reader)
        await eventually(lambda: server.handshakes <= 20, 5)
        # The oldest were really closed by the bridge (their descriptors freed), not just forgotten.
        await eventually(lambda: sum(reader.at_eof() for reader in readers[:40]) == 40, 5, "the oldest to be closed")
        assert await health_in_thread(server.port) < 1
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await caller.send_audio(b"\x44" * 3200)
            sessions = await eventually(lambda: [s for s in fake_agent.sessions if len(s.audio) >= 3200], 5)
            assert sessions
        for writer in stalled:
            writer.close()
    warnings = [r for r in caplog.records if "HTTP handshake" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]


async def test_a_connection_that_sends_nothing_is_closed_after_the_handshake_timeout(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    async with make_bridge(fake_agent, handshake_timeout_seconds=0.5) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert 0.4 < time.monotonic() - started < 2
        writer.close()


# ------------------------------------------------------------------------- data at rest, logs


async def test_records_and_their_folder_are_owner_only(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    old_umask = os.umask(0o022)
    try:
        async with make_bridge(fake_agent, calls_dir=tmp_path / "private" / "calls") as server:
            async with FakeTwilioCaller(twilio_url(server)) as caller:
                await caller.start()
                await caller.stop()
            await eventually(lambda: not server.calls)
    finally:
        os.umask(old_umask)
    [record] = list((tmp_path / "private" / "calls").glob("*.jsonl"))
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(record.parent.stat().st_mode) == 0o700


async def test_a_call_sid_cannot_forge_log_lines(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "bridge")
    async with make_bridge(fake_agent) as server:
        caller = RawTwilio(twilio_url(server))
        await caller.open()
        start = {"streamSid": "MZ1\nFORGED", "callSid": "CA1\nFORGED line\x1b[31m", "accountSid": "AC1",
                 "customParameters": {"na\nme": "x\ry"}}
        await caller.write(caller.text({"event": "start", "streamSid": "MZ1", "start": start}))
        await eventually(lambda: fake_agent.sessions, 5)
        caller.close()
        await eventually(lambda: not server.calls, 5)
    for record in caplog.records:
        if record.name.startswith("bridge"):
            text = record.getMessage()
            assert "\n" not in text and "\r" not in text and "\x1b" not in text, text


async def test_agent_messages_of_any_shape_are_survived_and_records_stay_strict_json(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            for message in (
                {"type": "FunctionCallRequest", "functions": 5},
                {"type": "FunctionCallRequest", "functions": True},
                {"type": "FunctionCallRequest", "functions": [5, None, {"id": 5}]},
                {"type": "FunctionCallCancelled", "functions": True},
                {"type": "ConversationText", "role": "user", "content": "x" * 1_000_000},
                {"type": "FunctionCallRequest", "functions": [
                    {"id": "i" * 100_000, "name": "get_drug_info", "arguments": "{}", "client_side": True}]},
            ):
                await session.send_json(message)
            await session.socket.send('{"type":"AgentStartedSpeaking","total_latency":NaN}')
            await session.socket.send('{"type":"AgentStartedSpeaking","total_latency":Infinity}')
            await session.send_audio(b"\x66" * 800)
            await caller.send_audio(b"\x77" * 3200)
            await eventually(lambda: len(caller.audio) >= 800 and len(session.audio) >= 3200, 5, "audio both ways")
            assert server.calls
            assert not session.of_type("FunctionCallResponse"), "a 100 KB id must not be echoed back"
            await caller.stop()
        await eventually(lambda: not server.calls)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert max(len(r.getMessage()) for r in caplog.records) < 2000
    [path] = list((tmp_path / "calls").glob("*.jsonl"))
    assert path.stat().st_size < 1_000_000 + 10_000
    lines = [strict_json(line) for line in path.read_text().splitlines()]
    assert lines[-1]["bad_input"]["deepgram:bad-functions"] == 3
    assert lines[-1]["bad_input"]["deepgram:non-finite-number"] == 2
