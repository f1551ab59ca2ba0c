"""Property-based: whatever a stranger sends to /twilio, a normal call beside it stays byte-exact."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import bridge_settings, ROOT
from bridge.config import load_agent_config
from bridge.server import BridgeServer
from fakes import FakeAgent, FakeTwilioCaller, eventually, media_event

T = TypeVar("T")


class BackgroundBridge:
    """The fake agent and the real server on an event loop in a thread, so hypothesis can drive it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 20) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def __enter__(self) -> BackgroundBridge:
        self.thread.start()

        async def start() -> None:
            import pharmacy_functions

            self.agent = await FakeAgent().__aenter__()
            settings = bridge_settings(self.tmp_path, deepgram_agent_url=self.agent.url, record_calls=False, max_calls=1000)
            self.server = BridgeServer(settings, load_agent_config(ROOT / "config.json", {}), pharmacy_functions.function_map)
            await self.server.start()

        self.run(start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def stop() -> None:
            await self.server.shutdown(0)
            await self.agent.__aexit__(None, None, None)

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def json_values() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
        max_leaves=12,
    )


EVENTS = st.sampled_from(["connected", "start", "media", "mark", "dtmf", "stop", "nonsense", "MEDIA", ""])

bad_frames = st.one_of(
    st.binary(max_size=400),  # binary frames
    st.text(max_size=200),  # text that is not JSON (mostly)
    json_values().map(json.dumps),  # JSON without an event, or of the wrong type
    st.builds(lambda e, v: json.dumps({"event": e, **({e: v} if e else {})}), EVENTS, json_values()),
    st.builds(lambda p: json.dumps({"event": "media", "streamSid": "MZx", "media": {"payload": p}}), st.text(max_size=60)),
    st.builds(lambda a: media_event("MZx", 1, 1, a), st.binary(max_size=400)),  # valid media, maybe before start
    st.builds(lambda n: "[" * n + "]" * n, st.integers(500, 5000)),  # deeply nested JSON
    st.just("x" * 70_000),  # oversize: the server closes that connection
)


async def stranger(port: int, start_first: bool, frames: list[str | bytes]) -> None:
    async with connect(f"ws://127.0.0.1:{port}/twilio", compression=None) as socket:
        if start_first:
            await socket.send(json.dumps({"event": "start", "streamSid": "MZstranger", "start": {"streamSid": "MZstranger", "callSid": "CAstranger"}}))
        try:
            for frame in frames:
                await socket.send(frame)
        except ConnectionClosed:
            pass


class NormalCall:
    """A well-behaved call that keeps talking while strangers misbehave."""

    def __init__(self, bridge: BackgroundBridge) -> None:
        self.bridge = bridge
        rng = random.Random(7)
        self.up = rng.randbytes(160 * 2000)
        self.down = rng.randbytes(50_000)

    async def open(self) -> None:
        self.caller = await FakeTwilioCaller(f"ws://127.0.0.1:{self.bridge.server.port}/twilio").__aenter__()
        await self.caller.start()
        self.session = await self.bridge.agent.session(0)
        await eventually(lambda: self.session.settings is not None)
        self.sent_up = 0
        self.sent_down = 0

    async def talk(self, frames: int = 20) -> None:
        """Send the next ``frames`` 20 ms frames up and a slice of agent audio down."""
        chunk = self.up[self.sent_up : self.sent_up + 160 * frames]
        await self.caller.send_audio(chunk)
        self.sent_up += len(chunk)
        down = self.down[self.sent_down : self.sent_down + 500]
        if down:
            await self.session.send_audio(down)
            self.sent_down += len(down)

    async def finish(self) -> None:
        await self.caller.stop()
        await asyncio.wait_for(self.session.closed.wait(), 5)
        await eventually(lambda: len(self.caller.audio) >= self.sent_down, 5, "agent audio at the caller")
        await self.caller.__aexit__(None, None, None)


def test_bad_twilio_input_never_disturbs_a_normal_call(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with BackgroundBridge(tmp_path) as bridge:
        normal = NormalCall(bridge)
        bridge.run(normal.open())

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(start_first=st.booleans(), frames=st.lists(bad_frames, min_size=1, max_size=6))
        def throw(start_first: bool, frames: list[str | bytes]) -> None:
            bridge.run(stranger(bridge.server.port, start_first, frames))
            bridge.run(normal.talk())

        throw()
        assert len(bridge.server.calls) >= 1  # the normal call is still live
        bridge.run(normal.finish())
        assert normal.sent_up > 160 * 100
        assert bytes(normal.session.audio) == normal.up[: normal.sent_up]
        assert bytes(normal.caller.audio) == normal.down[: normal.sent_down]
        # Strangers ended cleanly: only the stranger sessions that sent a start opened an agent.
        bridge.run(eventually(lambda: len(bridge.server.calls) == 0, 10, "every call to end"))
    crashes = [r for r in caplog.records if r.exc_info and r.name.startswith("bridge")]
    assert not crashes, crashes[0].getMessage()
    assert any("ignoring bad input" in r.getMessage() for r in caplog.records)
