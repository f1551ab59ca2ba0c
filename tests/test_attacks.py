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
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from websockets.frames import Frame, Opcode

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
    async with make_bridge(fake_agent, stall_timeout_seconds=1.0) as server, raw_call(
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
    async with make_bridge(fake_agent, stall_timeout_seconds=1.0, inbound_chunk_bytes=16000) as server:
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
    async with make_bridge(fake_agent, caller_frames_per_second=1e6, max_caller_frame_burst=10**6) as server:
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
        agent, agent_connect_timeout_seconds=30, max_agent_queue_bytes=64_000
    ) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await agent.session()
            sending = asyncio.create_task(caller.send_audio(b"\x33" * 4_000_000, frame=8000))
            session = next(iter(server.calls))
            await eventually(lambda: session.call.inbound.reading_paused, 10, "reading from the caller to pause")
            await asyncio.sleep(0.3)
            held = session.call.inbound.held_bytes
            assert 64_000 <= held <= 64_000 + 8000 + 3200, held  # at most one frame past the cap
            await asyncio.sleep(0.5)
            assert session.call.inbound.held_bytes == held, "audio kept growing past the cap"
            # What the caller sends meanwhile waits in the socket's inbox, then in TCP: both bounded.
            await eventually(lambda: sending.done() or session.caller.transport.is_reading() is False, 10)
            assert session.caller._inbox_bytes <= 2 * 256 * 1024 + 16_000  # the cap, plus the read that crossed it
            sending.cancel()
            # The bridge is (rightly) not reading us, so a polite close would wait out websockets'
            # 10 s close timeout: hang up the TCP connection instead.
            assert caller.socket is not None
            caller.socket.transport.abort()
    assert sum("wait for the agent session" in r.getMessage() for r in caplog.records) == 1


async def test_a_ping_flood_from_a_peer_that_never_reads_is_cut_off(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """Pings from a client that never reads its pongs: reading pauses, so no pong backlog builds."""
    # The frame budget would slow this flood too; lifted, the write-side defence is what's tested.
    async with make_bridge(
        fake_agent, stall_timeout_seconds=3.0, caller_frames_per_second=1e6, max_caller_frame_burst=10**6
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


# ------------------------------------------------------- the bridge as its own process (main.py)
#
# Memory, file descriptors and signals are properties of a process: these attacks run against
# main.py in a subprocess, where RSS (/proc/PID/status) is the bridge's alone, not the test
# runner's. Protocol settings that have no environment variable are set by a bootstrap that runs
# main.main() with ``dataclasses.replace`` applied to the settings it loads (and, when asked,
# RLIMIT_NOFILE lowered first). A field the Settings don't have is reported on stderr and fails
# the test at its end, after its behavioural checks.

SETTINGS_BOOTSTRAP = r"""
import dataclasses, json, os, resource, sys
if os.environ.get("ATTACK_TEST_MAX_OPEN_FILES"):
    limit = int(os.environ.pop("ATTACK_TEST_MAX_OPEN_FILES"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # soft = hard: main.py can't raise it
sys.path.insert(0, sys.argv.pop(1))
import main
from bridge.settings import Limits, Settings
wanted = json.loads(os.environ.pop("ATTACK_TEST_SETTINGS", "{}"))
known = {field.name for field in dataclasses.fields(Settings)}
limits = {field.name for field in dataclasses.fields(Limits)}
for name in sorted(set(wanted) - known - limits):
    print(f"ATTACK-TEST: Settings has no field {name}; override ignored", file=sys.stderr, flush=True)
overrides = {name: value for name, value in wanted.items() if name in known}
limit_overrides = {name: value for name, value in wanted.items() if name in limits}
load_settings = main.load_settings


def overridden(*args, **kwargs):
    settings = load_settings(*args, **kwargs)
    return dataclasses.replace(settings, limits=dataclasses.replace(settings.limits, **limit_overrides), **overrides)


main.load_settings = overridden
sys.exit(main.main())
"""


class BridgeProcess:
    """``async with BridgeProcess(...) as bridge``: main.py on 127.0.0.1, its stderr kept in a file."""

    def __init__(
        self,
        tmp_path: Path,
        agent: FakeAgent,
        *,
        env: dict[str, str] | None = None,
        settings: dict[str, Any] | None = None,
        max_open_files: int | None = None,
    ) -> None:
        self.port = free_port()
        self.tmp_path = tmp_path
        self.calls_dir = tmp_path / "calls"
        self.log_path = tmp_path / "bridge-stderr.log"
        self.env = {
            **os.environ,
            "DEEPGRAM_API_KEY": "test-key-not-secret",
            "DEEPGRAM_AGENT_URL": agent.url,
            "CALLS_DIR": str(self.calls_dir),
            "LOG_LEVEL": "INFO",
            **(env or {}),
        }
        self.settings = settings
        self.max_open_files = max_open_files
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def __aenter__(self) -> BridgeProcess:
        flags = ["--host", "127.0.0.1", "--port", str(self.port), "--env-file", str(empty_env(self.tmp_path))]
        if self.settings or self.max_open_files:
            command = [sys.executable, "-c", SETTINGS_BOOTSTRAP, str(ROOT), *flags]
            self.env["ATTACK_TEST_SETTINGS"] = json.dumps(self.settings or {})
            self.env["ATTACK_TEST_MAX_OPEN_FILES"] = str(self.max_open_files or "")
        else:
            command = [sys.executable, str(ROOT / "main.py"), *flags]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            await eventually(lambda: self.process.poll() is not None or _up(self.port), 15, "the bridge to start")
        except AssertionError:
            await self.__aexit__()
            raise AssertionError(f"the bridge did not start; its log:\n{self.log_tail()}") from None
        if self.process.poll() is not None:
            raise AssertionError(f"the bridge exited at startup ({self.process.returncode}):\n{self.log_tail()}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            await asyncio.to_thread(self.process.wait, 10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def memory_kb(self, field: str) -> int:
        """``VmRSS`` or ``VmHWM`` (peak RSS) of the bridge, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def live_calls(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
            return int(json.load(response)["calls"])

    def ignored_overrides(self) -> list[str]:
        return [line for line in self.log().splitlines() if line.startswith("ATTACK-TEST:")]


class MemoryWatch:
    """How much the bridge's resident memory rose above a baseline, at its peak, during a block.

    The kernel's high-water mark (VmHWM) catches a peak between samples; the samples are used
    when the peak stayed under the high-water mark the process had already reached before.
    """

    def __init__(self, bridge: BridgeProcess) -> None:
        self.bridge = bridge
        self.baseline_kb = bridge.memory_kb("VmRSS")
        self.hwm_before_kb = bridge.memory_kb("VmHWM")
        self.sampled_peak_kb = self.baseline_kb
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MemoryWatch:
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._sampler is not None
        self._sampler.cancel()
        await asyncio.gather(self._sampler, return_exceptions=True)

    async def _sample(self) -> None:
        while True:
            try:
                self.sampled_peak_kb = max(self.sampled_peak_kb, self.bridge.memory_kb("VmRSS"))
            except (OSError, AssertionError):
                return  # the process is gone
            await asyncio.sleep(0.02)

    def growth_mb(self) -> float:
        hwm = self.bridge.memory_kb("VmHWM")
        peak = hwm if hwm > self.hwm_before_kb else max(self.sampled_peak_kb, self.bridge.memory_kb("VmRSS"))
        return (peak - self.baseline_kb) / 1024


class HealthProbe:
    """``with HealthProbe(port) as probe``: GET /health every 0.1 s on a thread; the slowest answer is kept."""

    def __init__(self, port: int, timeout: float = 3.0) -> None:
        self.port = port
        self.timeout = timeout
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(self.timeout + 1)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=self.timeout) as response:
                    response.read()
                    if response.status != 200:
                        self.failures.append(f"status {response.status}")
            except Exception as exc:  # noqa: BLE001 - a refused or timed-out probe is the finding
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(0.1)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))


async def a_normal_call_works(port: int, agent: FakeAgent, timeout: float = 5.0) -> None:
    """A well-behaved call on ``port``: its audio reaches its agent and the agent's reaches it."""
    index = len(agent.sessions)
    async with FakeTwilioCaller(f"ws://127.0.0.1:{port}/twilio") as caller:
        await caller.start()
        session = await agent.session(index, timeout)
        await eventually(lambda: session.settings is not None, timeout, "the normal call's agent to get Settings")
        await caller.send_audio(b"\x44" * 3200)
        await eventually(lambda: len(session.audio) >= 3200, timeout, "the normal call's audio at its agent")
        await session.send_audio(b"\x45" * 800)
        await eventually(lambda: len(caller.audio) >= 800, timeout, "the agent's audio at the normal caller")
        await caller.stop()


async def write_until_blocked(
    writer: asyncio.StreamWriter, chunk: bytes, *, total_bytes: int, seconds: float, stuck_after: float = 1.0
) -> tuple[int, str]:
    """Write ``chunk`` over and over: at most ``total_bytes``, for at most ``seconds``.

    Returns the bytes written and why it stopped: "all sent", "time up", "blocked" (a write
    waited ``stuck_after`` s: the bridge stopped reading, i.e. backpressure) or "closed" (the
    bridge closed the connection).
    """
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < total_bytes:
        if time.monotonic() > deadline:
            return sent, "time up"
        writer.write(chunk)
        sent += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), stuck_after)
        except TimeoutError:
            return sent, "blocked"
        except ConnectionError:
            return sent, "closed"
    return sent, "all sent"


def start_frame(caller: RawTwilio, call_sid: str, **extra: Any) -> bytes:
    start = {"streamSid": caller.stream_sid, "callSid": call_sid, "accountSid": "AC" + "0" * 32,
             "tracks": ["inbound"], **extra}
    return caller.text({"event": "connected", "protocol": "Call", "version": "1.0.0"}) + caller.text(
        {"event": "start", "sequenceNumber": "1", "streamSid": caller.stream_sid, "start": start}
    )


def records_by_call_sid(calls_dir: Path) -> dict[str | None, tuple[Path, list[dict[str, Any]]]]:
    """Every record in ``calls_dir`` by the call SID in its summary (None: the call never started)."""
    found: dict[str | None, tuple[Path, list[dict[str, Any]]]] = {}
    for path in sorted(calls_dir.glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        summary = lines[-1] if lines and lines[-1].get("event") == "summary" else {}
        found[summary.get("call_sid")] = (path, lines)
    return found


def mark_batches(caller: RawTwilio, names: int) -> list[bytes]:
    """Mark echoes for ``names`` distinct names of 2 to 125 characters, as masked frames in batches of 5,000."""
    return [
        b"".join(
            caller.text({"event": "mark", "streamSid": caller.stream_sid, "mark": {"name": f"m{i}-" + "n" * (i % 120)}})
            for i in range(first, min(first + 5000, names))
        )
        for first in range(0, names, 5000)
    ]


def mark_bad_input(summary: dict[str, Any]) -> int:
    return sum(n for key, n in (summary.get("bad_input") or {}).items() if "mark" in key)


async def test_a_mark_flood_before_and_after_start_keeps_memory_and_the_record_flat(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    """Attack: 200,000 mark echoes (names the bridge never sent) before any start, then 100,000 after it.

    Must hold: the bridge process's RSS rises by < 30 MB; no record has a line per mark (the
    pre-start connection's record, if any, is a handful of lines); the started call's record stays
    under max_record_bytes plus its summary line; the summaries count the marks as bad input.
    The frame budget is lifted (bootstrap settings) so that every mark is really read: the
    throttle is tested elsewhere; here it is what the bridge keeps of what it reads.
    """
    max_record_bytes = 1_000_000
    lifted = {"caller_frames_per_second": 1e9, "max_caller_frame_burst": 10**9, "max_record_bytes": max_record_bytes}
    problems: list[str] = []
    async with BridgeProcess(tmp_path, fake_agent, settings=lifted) as bridge:
        await a_normal_call_works(bridge.port, fake_agent)  # warm-up: the first call's imports and buffers
        await eventually(lambda: bridge.live_calls() == 0, 5, "the warm-up call to end")
        url = f"ws://127.0.0.1:{bridge.port}/twilio"
        async with MemoryWatch(bridge) as memory:
            early = RawTwilio(url, stream_sid="MZearly")
            await early.open()
            assert early.writer is not None
            batches = mark_batches(early, 20_000)  # sent ten times over
            early.writer.write(early.text({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            for _ in range(10):
                for batch in batches:
                    early.writer.write(batch)
                    await early.writer.drain()
            early.writer.write(Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True))
            await early.writer.drain()
            early.close()
            try:
                await eventually(lambda: bridge.live_calls() == 0, 20, "the pre-start connection's call to end")
            except AssertionError as exc:
                problems.append(str(exc))

            started = RawTwilio(url, stream_sid="MZmarks")
            await started.open()
            assert started.writer is not None
            await started.write(start_frame(started, "CAmarks"))
            session = await fake_agent.session(1)
            await eventually(lambda: session.settings is not None, 5, "the started call's agent to be ready")
            batches = mark_batches(started, 20_000)
            for _ in range(5):
                for batch in batches:
                    started.writer.write(batch)
                    await started.writer.drain()
            started.writer.write(started.text({"event": "stop", "streamSid": "MZmarks", "stop": {"callSid": "CAmarks"}}))
            await started.writer.drain()
            try:
                await eventually(lambda: bridge.live_calls() == 0, 20, "the started call to end")
            except AssertionError as exc:
                problems.append(str(exc))
            started.close()
            growth = memory.growth_mb()
        if growth >= 30:
            problems.append(f"the bridge's RSS rose by {growth:.1f} MB (limit 30 MB)")
        ignored = bridge.ignored_overrides()
        log_tail = bridge.log_tail()

    records = records_by_call_sid(bridge.calls_dir)
    for call_sid, expected in ((None, 200_000), ("CAmarks", 100_000)):
        if call_sid not in records:
            if call_sid is not None:
                problems.append(f"no record for {call_sid}; records: {sorted(map(str, records))}")
            continue
        path, lines = records[call_sid]
        per_mark = [line for line in lines if line.get("event") in ("mark_played", "mark_cleared")]
        if per_mark:
            problems.append(f"{call_sid}: {len(per_mark)} record lines for forged marks")
        if len(lines) > 10:
            problems.append(f"{call_sid}: {len(lines)} record lines, not a handful")
        summary_bytes = len(path.read_text().splitlines()[-1]) + 1
        if path.stat().st_size - summary_bytes > max_record_bytes:
            problems.append(f"{call_sid}: the record's events are {path.stat().st_size - summary_bytes} bytes")
        counted = mark_bad_input(lines[-1]) if lines and lines[-1].get("event") == "summary" else None
        if counted != expected:
            problems.append(f"{call_sid}: bad_input counts {counted} marks, not {expected}")
    assert not problems, "\n".join(problems) + f"\n--- bridge log:\n{log_tail}"
    assert not ignored, ignored


async def test_caller_audio_flood_while_the_agent_never_answers_keeps_memory_flat(tmp_path: Path) -> None:
    """Attack: a caller sends 40 MB of audio as fast as it can while its agent never answers Settings.

    Must hold: the bridge's RSS rises by < 30 MB (the held audio is capped and reading from the
    caller pauses: backpressure), and a normal call at the same time still carries audio both ways.
    """
    async with FakeAgent() as agent, BridgeProcess(
        tmp_path, agent, env={"AGENT_CONNECT_TIMEOUT_SECONDS": "30"}
    ) as bridge:
        await a_normal_call_works(bridge.port, agent)  # warm-up
        await eventually(lambda: bridge.live_calls() == 0, 5, "the warm-up call to end")
        agent.settings_mode = "ignore"
        flooder = RawTwilio(f"ws://127.0.0.1:{bridge.port}/twilio", stream_sid="MZflood")
        await flooder.open()
        assert flooder.writer is not None
        await flooder.write(start_frame(flooder, "CAflood"))
        ignored_session = await agent.session(1)
        await eventually(lambda: ignored_session.settings is not None, 5, "the flooder's Settings at the agent")
        agent.settings_mode = "apply"  # for the normal call; the flooder's session stays unanswered
        frame = flooder.text(media_event("MZflood", 1, 1, b"\x5a" * 32_000))  # 43 KB of JSON, 32 KB of audio
        problems: list[str] = []
        async with MemoryWatch(bridge) as memory:
            audio_bytes = 40 * 1024 * 1024  # as base64 in JSON: 4/3 of that on the wire
            sent, why = await write_until_blocked(flooder.writer, frame, total_bytes=audio_bytes * 4 // 3, seconds=8)
            try:
                await asyncio.wait_for(a_normal_call_works(bridge.port, agent), 10)
            except (AssertionError, TimeoutError) as exc:
                problems.append(f"the normal call beside the flood failed: {exc!r}")
            await asyncio.sleep(0.5)  # the bridge must not keep growing while the flooder is blocked
            growth = memory.growth_mb()
        if growth >= 30:
            problems.append(f"the bridge's RSS rose by {growth:.1f} MB (limit 30 MB)")
        if len(ignored_session.audio):
            problems.append(f"the unready agent got {len(ignored_session.audio)} bytes of audio before SettingsApplied")
        flooder.writer.transport.abort()
        assert not problems, "\n".join(problems) + f"\n(flooder wrote {sent / 1e6:.1f} MB, then: {why})" + (
            f"\n--- bridge log:\n{bridge.log_tail()}"
        )


async def test_a_ping_flood_from_a_client_that_never_reads_keeps_memory_flat_and_health_prompt(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    """Attack: a Twilio client with a tiny receive buffer writes masked 125-byte pings and never reads.

    Must hold: the bridge's RSS rises by < 30 MB (no backlog of pongs: it stops reading, or cuts
    the client off), and GET /health answers within 1 s throughout the flood.
    """
    async with BridgeProcess(tmp_path, fake_agent) as bridge:
        await a_normal_call_works(bridge.port, fake_agent)  # warm-up
        await eventually(lambda: bridge.live_calls() == 0, 5, "the warm-up call to end")
        flooder = RawTwilio(f"ws://127.0.0.1:{bridge.port}/twilio", stream_sid="MZping")
        await flooder.open(receive_buffer=4096)
        assert flooder.writer is not None
        await flooder.write(start_frame(flooder, "CAping"))
        await eventually(lambda: fake_agent.sessions[-1].settings is not None, 5, "the flooder's agent")
        pings = Frame(Opcode.PING, b"p" * 125).serialize(mask=True) * 1000
        async with MemoryWatch(bridge) as memory:
            with HealthProbe(bridge.port) as probe:
                # Up to 400,000 pings (52 MB in, 51 MB of pongs out if the bridge answered them all).
                sent, why = await write_until_blocked(flooder.writer, pings, total_bytes=400 * len(pings), seconds=8)
                await asyncio.sleep(1.0)  # the bridge must not keep growing while the flooder is blocked
            growth = memory.growth_mb()
        flooder.writer.transport.abort()
    problems = []
    if probe.failures:
        problems.append(f"/health failed during the flood: {probe.failures[:3]}")
    if probe.worst >= 1.0:
        problems.append(f"/health took {probe.worst:.2f} s during the flood")
    if growth >= 30:
        problems.append(f"the bridge's RSS rose by {growth:.1f} MB (limit 30 MB)")
    assert not problems, "\n".join(problems) + (
        f"\n(flooder wrote {sent // 131:,} pings, then: {why}; {len(probe.latencies)} health probes)"
    )


async def test_a_crowd_of_stalled_handshakes_cannot_use_up_file_descriptors(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    """Attack: 1,100 connections each send half an HTTP request and stall, at a 1,024-descriptor limit.

    Must hold (main.py with RLIMIT_NOFILE soft = hard = 1024, handshake_timeout_seconds = 3):
    GET /health answers 200 within 1 s and a normal call carries audio while they are stalled;
    the bridge's log has one warning (a few at most, not hundreds) about the handshake limit;
    at most max_handshakes (256) of them are left open, and all are closed by the bridge within
    the handshake timeout (+ 2 s).
    """
    handshake_timeout = 3.0
    problems: list[str] = []
    async with BridgeProcess(
        tmp_path, fake_agent, settings={"handshake_timeout_seconds": handshake_timeout}, max_open_files=1024
    ) as bridge:
        readers: list[asyncio.StreamReader] = []
        writers: list[asyncio.StreamWriter] = []
        failed_connects = 0

        async def stall() -> None:
            nonlocal failed_connects
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", bridge.port), 3)
            except (OSError, TimeoutError):
                failed_connects += 1
                return
            writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            readers.append(reader)
            writers.append(writer)

        try:
            for _ in range(11):
                await asyncio.gather(*(stall() for _ in range(100)))
            stalled_at = time.monotonic()

            def closed(reader: asyncio.StreamReader) -> bool:
                return reader.at_eof() or reader.exception() is not None

            try:
                health = await asyncio.wait_for(health_in_thread(bridge.port), 2)
                if health >= 1:
                    problems.append(f"/health took {health:.2f} s with the crowd stalled")
            except Exception as exc:  # noqa: BLE001 - no answer at all is the finding
                problems.append(f"/health did not answer with the crowd stalled: {exc!r}")
            try:
                await asyncio.wait_for(a_normal_call_works(bridge.port, fake_agent), 5)
            except Exception as exc:  # noqa: BLE001
                problems.append(f"a normal call failed with the crowd stalled: {exc!r}")
            open_now = sum(not closed(reader) for reader in readers)
            if open_now > 256 + 10:
                problems.append(f"{open_now} stalled connections still open (max_handshakes is 256)")
            try:
                await eventually(
                    lambda: all(closed(reader) for reader in readers),
                    max(0.5, handshake_timeout + 2 - (time.monotonic() - stalled_at)),
                    "every stalled connection to be closed by the bridge",
                )
            except AssertionError as exc:
                problems.append(f"{exc}: {sum(not closed(r) for r in readers)} still open")
        finally:
            for writer in writers:
                writer.transport.abort()
        limit_lines = [
            line for line in bridge.log().splitlines()
            if "handshake" in line.lower() and "limit" in line.lower() and "WARNING" in line
        ]
        if not 1 <= len(limit_lines) <= 3:
            problems.append(f"{len(limit_lines)} warning lines about the handshake limit, not one: {limit_lines[:3]}")
        errors = [line for line in bridge.log().splitlines() if " ERROR " in line or "Traceback" in line]
        if errors:
            problems.append(f"{len(errors)} error lines in the log, e.g. {errors[:2]}")
        ignored = bridge.ignored_overrides()
        detail = f"({len(readers)} connected, {failed_connects} failed to connect)\n--- bridge log:\n{bridge.log_tail()}"
    assert not problems, "\n".join(problems) + "\n" + detail
    assert not ignored, ignored


async def test_sigterm_exits_in_time_while_the_agent_floods_a_caller_that_never_reads(
    fake_agent: FakeAgent, tmp_path: Path
) -> None:
    """Attack: SIGTERM while the caller reads nothing and the agent keeps sending audio, nonstop.

    Must hold: main.py exits with 0 within DRAIN_SECONDS + 5 s, and the call's record is on disk
    with its summary line last.
    """
    drain = 1.0
    async with BridgeProcess(tmp_path, fake_agent, env={"DRAIN_SECONDS": str(drain)}) as bridge:
        caller = RawTwilio(f"ws://127.0.0.1:{bridge.port}/twilio", stream_sid="MZwedged")
        await caller.open(receive_buffer=4096)
        await caller.write(start_frame(caller, "CAwedged"))
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None, 5, "the agent to be ready")
        sent = 0

        async def flood() -> None:
            nonlocal sent
            chunk = b"\x22" * 32_000
            try:
                while True:
                    await asyncio.wait_for(session.send_audio(chunk), 10)
                    sent += len(chunk)
            except Exception:  # noqa: BLE001 - the bridge closed the agent's socket: the flood is over
                pass

        flooding = asyncio.create_task(flood())
        try:
            await eventually(lambda: sent >= 3_000_000 or flooding.done(), 10, "3 MB of agent audio to be sent")
            assert bridge.process is not None
            started = time.monotonic()
            bridge.process.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(bridge.process.wait, drain + 5)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"still running {drain + 5} s after SIGTERM (DRAIN_SECONDS={drain})\n{bridge.log_tail()}"
                ) from None
            took = time.monotonic() - started
        finally:
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
            caller.close()
        assert code == 0, f"exit code {code}\n{bridge.log_tail()}"
        records = list(bridge.calls_dir.glob("*.jsonl"))
        assert len(records) == 1, f"{records}\n{bridge.log_tail()}"
        last = json.loads(records[0].read_text().splitlines()[-1])
        assert last["event"] == "summary", last
        assert took < drain + 5
