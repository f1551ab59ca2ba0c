"""The second attack round's holes in the call core, each through real sockets.

The real server on 127.0.0.1 with the fake Twilio caller and the fake Deepgram agent
(tests/fakes.py); each test fails without its fix:

- keypad echoes: no echo of any keypad entry shows digits, however many entries came first (the
  echo filter used to remember only the last 8);
- a ``dtmf`` event naming another stream, or a track other than the caller's, is bad input, not a key;
- the silence clock does not run while a business function runs;
- function arguments nested thousands deep reach neither the browser page's event nor the
  transfer's reason as an exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import BridgeFactory, read_record, twilio_url
from fakes import FakeAgent, FakeTwilioCaller, eventually, shows_digits
from test_call_control import Timeline, TimelineRest, call_with_agent, events, rest_settings, say, transfer_request

TRANSFER = "+15557654321"


def deep_arguments(depth: int = 3000) -> str:
    return '{"drug_name": ' + "[" * depth + "]" * depth + "}"


async def test_no_echo_of_any_keypad_entry_shows_its_digits_however_many_entries_came_first(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    entries = [f"{n:03d}{n + 7:03d}" for n in range(12)]  # 12 six-digit entries, all distinct
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            for entry in entries:
                for digit in entry:
                    await caller.press(digit)
                await caller.press("#")
            await eventually(lambda: len(session.of_type("InjectUserMessage")) == 12, what="every entry")
            # Deepgram echoes them only now, oldest first: more than 8 were sent before the first echo.
            for message in session.of_type("InjectUserMessage"):
                await session.send_json({"type": "ConversationText", "role": "user", "content": message["content"]})
            await session.send_json({"type": "ConversationText", "role": "assistant", "content": "Thank you."})
            await caller.stop()
        await eventually(lambda: not server.calls)
    record = read_record(tmp_path / "calls")
    transcript = [line["content"] for line in record if line["event"] == "transcript"]
    assert transcript == ["(keypad digits)"] * 12 + ["Thank you."]
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("bridge"))
    for entry in entries:
        assert not shows_digits(json.dumps(record), entry), entry
        assert not shows_digits(logged, entry), entry


async def test_a_dtmf_event_for_another_stream_or_track_is_bad_input_not_a_key(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, dtmf_timeout_seconds=0.2) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            other_stream = {"event": "dtmf", "streamSid": "MZ" + "9" * 32, "dtmf": {"track": "inbound_track", "digit": "5"}}
            other_track = {"event": "dtmf", "streamSid": caller.stream_sid, "dtmf": {"track": "outbound_track", "digit": "6"}}
            await caller.send_json(other_stream)
            await caller.send_json(other_track)
            await caller.send_json({"event": "dtmf", "streamSid": caller.stream_sid, "dtmf": {"digit": "7"}})
            await caller.press("8")  # the caller's own key still counts
            await eventually(lambda: session.of_type("InjectUserMessage"), what="the caller's key")
            await asyncio.sleep(0.3)  # any other entry would have gone out by now (DTMF timeout 0.2 s)
            assert session.of_type("InjectUserMessage") == [{"type": "InjectUserMessage", "content": "The caller pressed 8"}]
            await caller.stop()
        await eventually(lambda: not server.calls)
    assert read_record(tmp_path / "calls")[-1]["bad_input"] == {"twilio:foreign-dtmf": 3}


async def test_the_silence_clock_does_not_run_while_a_function_runs(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """A function taking longer than the re-prompt time: no re-prompt until it has answered."""
    released = asyncio.Event()

    async def get_drug_info(drug_name: str) -> dict[str, Any]:
        await released.wait()
        return {"name": drug_name}

    async with make_bridge(
        fake_agent, function_map={"get_drug_info": get_drug_info, "place_order": print, "lookup_order": print},
        idle_reprompt_seconds=0.2, idle_hangup_seconds=5.0,
    ) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            await session.send_json({"type": "FunctionCallRequest", "functions": [
                {"id": "f1", "name": "get_drug_info", "arguments": '{"drug_name": "Ibuprofen"}', "client_side": True}
            ]})
            await eventually(lambda: any(s.call.functions.any_running for s in server.calls), what="the function to run")
            await asyncio.sleep(0.6)  # three re-prompt times
            assert session.of_type("InjectAgentMessage") == [], "re-prompted while a function ran"
            released.set()
            await eventually(lambda: session.of_type("FunctionCallResponse"), what="the answer")
            await eventually(lambda: session.of_type("InjectAgentMessage"), what="the re-prompt once it answered")
            await caller.stop()


async def test_arguments_nested_thousands_deep_reach_the_browser_page_as_text(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, phone_page=True, phone_page_token="tok") as server:
        async with FakeTwilioCaller(twilio_url(server, "?token=tok")) as page:
            await page.start()
            session = await fake_agent.ready_session()
            arguments = deep_arguments()
            await session.send_json({"type": "FunctionCallRequest", "functions": [
                {"id": "f1", "name": "get_drug_info", "arguments": arguments, "client_side": True}
            ]})
            [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), what="the answer")
            assert "error" in json.loads(answer["content"])
            [shown] = await eventually(lambda: page.of_event("function_call"), what="the page's event")
            assert shown["arguments"] == arguments and shown["result"] == json.loads(answer["content"])
            await page.stop()
        await eventually(lambda: not server.calls)
    assert read_record(tmp_path / "calls")[-1]["ended_by"] == "caller hung up"


async def test_a_transfer_with_arguments_nested_thousands_deep_goes_ahead_with_the_default_reason(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    timeline = Timeline()
    async with TimelineRest(timeline) as fake, make_bridge(fake_agent, **rest_settings(fake, transfer_number=TRANSFER)) as server:
        async with call_with_agent(server, fake, fake_agent, timeline) as (caller, session):
            request = transfer_request("t1")
            request["functions"][0]["arguments"] = '{"reason": ' + "[" * 3000 + "]" * 3000 + "}"
            await session.send_json(request)
            await eventually(lambda: session.of_type("FunctionCallResponse"), what="the agent's answer")
            await say(session, b"\x01" * 800)
            await fake.wait_for_requests(1, operation="update")
            await eventually(lambda: not server.calls, what="the call to end")
    lines = read_record(tmp_path / "calls")
    assert events(lines, "transferred") == [{"reason": "the agent transferred the call", "mode": "cold"}]
    assert lines[-1]["ended_by"] == "transferred"
