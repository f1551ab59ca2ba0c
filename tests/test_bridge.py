"""End to end through the real server: a fake Twilio caller and a fake Deepgram agent on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import BridgeFactory, twilio_url
from fakes import FakeAgent, FakeTwilioCaller, eventually


def noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def test_caller_audio_reaches_agent_byte_exact_with_tail(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    audio = noise(3200 * 5 + 1234, seed=1)  # five full buffers and a partial one
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        await caller.send_audio(audio)
        await caller.stop()
        session = await fake_agent.session()
        await asyncio.wait_for(session.closed.wait(), 2)
    assert bytes(session.audio) == audio
    assert session.audio_frames == [3200] * 5 + [1234]


async def test_audio_sent_before_settings_applied_waits_and_is_not_lost(make_bridge: BridgeFactory) -> None:
    audio = noise(8000, seed=2)
    async with FakeAgent(settings_delay=0.5) as agent, make_bridge(agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await caller.send_audio(audio)  # all of it lands while the agent is still applying settings
            session = await agent.session()
            await eventually(lambda: len(session.audio) >= 6400, what="buffered audio after SettingsApplied")
            assert session.audio_before_settings_applied == 0
            await caller.stop()
            await asyncio.wait_for(session.closed.wait(), 2)
    assert bytes(session.audio) == audio


async def test_agent_audio_reaches_caller_byte_exact_with_stream_sid(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    rng = random.Random(3)
    chunks = [rng.randbytes(rng.randint(1, 5000)) for _ in range(40)]
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        for chunk in chunks:
            await session.send_audio(chunk)
        expected = b"".join(chunks)
        await eventually(lambda: len(caller.audio) >= len(expected), what="agent audio at the caller")
    assert bytes(caller.audio) == expected
    media = caller.of_event("media")
    assert media and all(event["streamSid"] == caller.stream_sid for event in media)
    assert set(media[0]) == {"event", "streamSid", "media"} and set(media[0]["media"]) == {"payload"}


async def test_user_started_speaking_sends_clear(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        await session.send_audio(b"\xff" * 8000)
        await session.send_json({"type": "UserStartedSpeaking"})
        await eventually(lambda: caller.of_event("clear"), what="clear")
    assert caller.of_event("clear")[0] == {"event": "clear", "streamSid": caller.stream_sid}


@pytest.mark.parametrize("how", ["stop", "close"])
async def test_caller_hangup_closes_agent_socket(fake_agent: FakeAgent, make_bridge: BridgeFactory, how: str) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            await caller.send_audio(b"\x01" * 500)
            if how == "stop":
                await caller.stop()
        # leaving the block closed the caller's socket
        await asyncio.wait_for(session.closed.wait(), 1.5)
        assert bytes(session.audio) == b"\x01" * 500
        await eventually(lambda: not server.calls, 2, "the call to be gone")


async def test_agent_end_closes_caller_socket(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    # A mid-call Error resumes instead: tests/test_conversation_sockets.py.
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        await session.close(1000, "session over")
        await asyncio.wait_for(caller.closed.wait(), 1.5)
        await asyncio.wait_for(session.closed.wait(), 1.5)
        await eventually(lambda: not server.calls, 2, "the call to be gone")


async def test_two_concurrent_calls_never_mix_audio(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as one, FakeTwilioCaller(twilio_url(server)) as two:
            await one.start()
            await two.start()
            first, second = await fake_agent.session(0), await fake_agent.session(1)
            await eventually(lambda: first.settings and second.settings)
            up = {one: noise(9000, 10), two: noise(9000, 11)}
            await asyncio.gather(*(caller.send_audio(audio) for caller, audio in up.items()))
            await eventually(lambda: len(first.audio) >= 6400 and len(second.audio) >= 6400)
            # which agent session belongs to which caller: the one whose audio starts with its bytes
            by_caller = {c: s for c in up for s in (first, second) if up[c].startswith(bytes(s.audio[:6400]))}
            assert len(set(by_caller.values())) == 2
            down = {one: noise(7000, 12), two: noise(7000, 13)}
            for caller, audio in down.items():
                await by_caller[caller].send_audio(audio)
            await eventually(lambda: len(one.audio) >= 7000 and len(two.audio) >= 7000)
            await one.stop()
            await two.stop()
            await asyncio.wait_for(asyncio.gather(first.closed.wait(), second.closed.wait()), 2)
        for caller in up:
            assert bytes(by_caller[caller].audio) == up[caller]
            assert bytes(caller.audio) == down[caller]
            assert not caller.foreign_stream_events


async def test_health_and_404(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    import urllib.request

    async with make_bridge(fake_agent) as server:
        def get(path: str) -> tuple[int, str, str]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=2) as response:
                    return response.status, response.headers["Content-Type"], response.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers["Content-Type"], exc.read().decode()

        status, content_type, body = await asyncio.to_thread(get, "/health")
        assert (status, content_type, json.loads(body)) == (200, "application/json", {"status": "ok", "calls": 0})
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await eventually(lambda: len(server.calls) == 1)
            _, _, body = await asyncio.to_thread(get, "/health")
            assert json.loads(body) == {"status": "ok", "calls": 1}
        assert (await asyncio.to_thread(get, "/nope"))[0] == 404
        assert (await asyncio.to_thread(get, "/phone"))[0] == 404  # the phone page is off by default
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.port}/elsewhere")
        assert refused.value.response.status_code == 404


async def test_events_are_logged_per_call_and_unknown_types_survive(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_bridge(fake_agent) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        for message in (
            {"type": "History", "role": "user", "content": "x"},
            {"type": "SomethingNew", "data": [1, 2]},
            {"type": "AgentThinking", "content": "hmm"},
            {"type": "ConversationText", "role": "user", "content": "Do you have ibuprofen?"},
            {"type": "ConversationText", "role": "assistant", "content": "Yes, we do."},
            {"type": "Warning", "code": "SLOW", "description": "things are slow"},
            {"type": "AgentStartedSpeaking", "total_latency": 0.8, "tts_latency": 0.2, "ttt_latency": 0.6},
            {"type": "AgentAudioDone"},
        ):
            await session.send_json(message)
        await eventually(lambda: caller.of_event("mark"), what="the turn's mark")
        await session.send_audio(b"\x7f" * 320)
        await eventually(lambda: len(caller.audio) == 320, what="audio still flowing after odd messages")
        await caller.stop()
        await asyncio.wait_for(session.closed.wait(), 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "bridge.call"]
    assert f"[{caller.call_sid}] User: Do you have ibuprofen?" in lines
    assert f"[{caller.call_sid}] Agent: Yes, we do." in lines
    assert any(r.levelno == logging.WARNING and "SLOW" in r.getMessage() for r in caplog.records)
    started = lines.index(next(line for line in lines if "started" in line))
    assert all(line.startswith(f"[{caller.call_sid}]") for line in lines[started:])
    ours = [r for r in caplog.records if r.name.startswith("bridge")]
    assert not any("test-key-not-secret" in r.getMessage() for r in ours)
    assert not any("media" in r.getMessage().lower() and "payload" in r.getMessage() for r in caplog.records)


def test_library_debug_logs_which_show_headers_stay_off() -> None:
    """websockets logs handshake headers (the API key) at DEBUG; main.py keeps it at WARNING+."""
    import main

    main.configure_logging("DEBUG")
    assert logging.getLogger("websockets").getEffectiveLevel() >= logging.WARNING


async def test_browser_events_go_to_browser_sessions_only(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, phone_page=True, phone_page_token="tok") as server:
        async with FakeTwilioCaller(twilio_url(server)) as phone_call, FakeTwilioCaller(twilio_url(server, "?token=tok")) as browser:
            for index, caller in enumerate((phone_call, browser)):
                await caller.start()
                session = await fake_agent.session(index)
                await eventually(lambda s=session: s.settings is not None)
                for message in (
                    {"type": "ConversationText", "role": "user", "content": "Hi"},
                    {"type": "AgentStartedSpeaking", "total_latency": 0.5, "tts_latency": 0.1, "ttt_latency": 0.4},
                    {"type": "FunctionCallRequest", "functions": [
                        {"id": "f", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True}]},
                ):
                    await session.send_json(message)
                await eventually(lambda s=session: s.of_type("FunctionCallResponse"))
                await session.close()
                await asyncio.wait_for(caller.closed.wait(), 2)
        for refused_query in ("?token=", "?token=nope"):
            with pytest.raises(InvalidStatus) as refused:
                await connect(twilio_url(server, refused_query))
            assert refused.value.response.status_code == 403
    twilio_kinds = {event["event"] for event in phone_call.events}
    assert twilio_kinds <= {"media", "mark", "clear"}, twilio_kinds
    browser_events = {event["event"]: event for event in browser.events}
    assert browser_events["transcript"] == {"event": "transcript", "role": "user", "content": "Hi"}
    assert browser_events["agent_latency"]["total_latency"] == 0.5
    assert browser_events["function_call"]["name"] == "get_drug_info"
    assert browser_events["function_call"]["result"]["price"] == 8.99
    assert browser_events["call_ended"]["reason"] == "Deepgram closed the session (code 1000)"


async def test_fragmented_and_direct_frames_are_handled_alike(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    """Whole text frames take the direct path, fragmented messages websockets' usual one."""
    from fakes import media_event

    audio = noise(640, seed=20)
    async with make_bridge(fake_agent, inbound_chunk_bytes=160) as server, FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.session()
        await eventually(lambda: session.settings is not None)
        assert caller.socket is not None
        for index in range(4):
            text = media_event(caller.stream_sid, index + 3, index + 1, audio[index * 160 : (index + 1) * 160])
            if index % 2:
                await caller.socket.send(iter([text[:50], text[50:120], text[120:]]))  # three fragments
            else:
                await caller.socket.send(text)
        await caller.socket.send(iter(['{"event":', '"stop"}']))
        await asyncio.wait_for(session.closed.wait(), 2)
    assert bytes(session.audio) == audio
