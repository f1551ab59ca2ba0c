"""Keypad digits, caller silence, a mid-call Error, History and diagnostics through real sockets:
the real server on 127.0.0.1, the fake Twilio caller and the fake Deepgram agent (tests/fakes.py).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from conftest import BridgeFactory, read_record, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually, shows_digits


async def speak_turn(session: FakeAgentSession) -> None:
    """The agent says something short: the caller hears it and echoes the mark after it."""
    await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.4})
    await session.send_audio(b"\x7f" * 160)
    await session.send_json({"type": "AgentAudioDone"})


async def test_keypad_digits_reach_the_agent_as_one_message_and_stay_out_of_logs_and_records(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with make_bridge(fake_agent, dtmf_timeout_seconds=0.3) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            for digit in "8642":
                await caller.press(digit)
            await caller.press("#")
            await eventually(lambda: session.of_type("InjectUserMessage"), what="the digits")
            assert session.of_type("InjectUserMessage") == [
                {"type": "InjectUserMessage", "content": "The caller pressed 8 6 4 2"}
            ]
            # The agent echoes it as the caller's turn, as Deepgram does.
            await session.send_json({"type": "ConversationText", "role": "user", "content": "The caller pressed 8 6 4 2"})
            await caller.press("9")  # no #: the pause sends it
            await eventually(lambda: len(session.of_type("InjectUserMessage")) == 2, what="the second entry")
            assert session.of_type("InjectUserMessage")[1]["content"] == "The caller pressed 9"
            await caller.stop()
        await eventually(lambda: not server.calls)
    record_text = "".join(path.read_text() for path in (tmp_path / "calls").iterdir())
    assert not shows_digits(record_text, "8642")
    assert '"keys": 4' in record_text
    # The bridge's own log lines (the fakes' websockets debug lines show the frames themselves).
    bridge_lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
    assert "keypad" in bridge_lines
    assert not shows_digits(bridge_lines, "8642")
    assert read_record(tmp_path / "calls")[-1]["keypad_entries"] == 2


async def test_a_silent_caller_is_reprompted_then_the_agent_says_goodbye_and_the_call_ends(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, idle_reprompt_seconds=0.3, idle_hangup_seconds=0.5) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            await eventually(lambda: session.of_type("InjectAgentMessage"), what="the re-prompt")
            assert session.of_type("InjectAgentMessage") == [
                {"type": "InjectAgentMessage", "message": server.settings.caller_lines.idle_reprompt}
            ]
            await speak_turn(session)  # the re-prompt, heard: the caller still says nothing
            await eventually(lambda: len(session.of_type("InjectAgentMessage")) == 2, what="the goodbye")
            assert session.of_type("InjectAgentMessage")[1]["message"] == server.settings.caller_lines.idle_goodbye
            assert not caller.closed.is_set()
            await speak_turn(session)  # the goodbye; its mark's echo ends the call
            await asyncio.wait_for(caller.closed.wait(), 3)
        await eventually(lambda: not server.calls)
    events = read_record(tmp_path / "calls")
    assert [e["event"] for e in events if e["event"].startswith("idle")] == ["idle_reprompt", "idle_hangup"]
    assert events[-1]["ended_by"] == "caller silent" and events[-1]["idle_reprompts"] == 1


async def test_a_caller_who_speaks_is_not_reprompted(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, idle_reprompt_seconds=0.4, idle_hangup_seconds=1.0) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            for _ in range(4):  # speaking every 0.2 s keeps the 0.4 s clock from running out
                await session.send_json({"type": "UserStartedSpeaking"})
                await asyncio.sleep(0.2)
            assert session.of_type("InjectAgentMessage") == []
            await eventually(lambda: session.of_type("InjectAgentMessage"), what="the re-prompt once quiet")


async def test_a_mid_call_error_resumes_on_a_new_session_with_deepgrams_history(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            first = await fake_agent.ready_session()
            await first.send_json({"type": "ConversationText", "role": "user", "content": "Is ibuprofen in stock?"})
            await first.send_json({"type": "History", "role": "user", "content": "Is ibuprofen in stock?"})
            server_side = {"id": "s1", "name": "stock", "client_side": False, "arguments": "{}", "response": "yes"}
            await first.send_json({"type": "History", "function_calls": [server_side]})
            await first.send_json({"type": "LatencyReport", "stt_latency": 0.12, "total_latency": 0.8})
            await first.send_json({"type": "Error", "code": "INTERNAL_SERVER_ERROR", "description": "boom"})
            await asyncio.wait_for(first.closed.wait(), 3)
            second = await fake_agent.ready_session(1)
            assert second.settings is not None
            messages = second.settings["agent"]["context"]["messages"]
            assert messages == [  # each once
                {"type": "History", "role": "user", "content": "Is ibuprofen in stock?"},
                {"type": "History", "function_calls": [server_side]},
            ]
            assert "greeting" not in second.settings["agent"]
            # The caller is still with the agent: the new session's voice reaches them.
            await second.send_audio(b"\x55" * 320)
            await eventually(lambda: caller.audio.endswith(b"\x55" * 320), what="the new session's audio")
            assert not caller.closed.is_set()
            await caller.stop()
        await eventually(lambda: not server.calls)
    events = read_record(tmp_path / "calls")
    summary = events[-1]
    assert summary["agent_request_ids"] == [first.request_id, second.request_id]
    assert summary["ended_by"] == "caller hung up" and summary["errors"] == 1
    [report] = [e for e in events if e["event"] == "latency_report"]
    assert report["stt_latency"] == 0.12 and report["total_latency"] == 0.8 and report["tts_latency"] is None
    assert [e["event"] for e in events].count("agent_resumed") == 1
