"""Call control through real sockets: transfer, the fallback line, outbound calls, answering machines.

The bridge talks to a fake Twilio REST API on loopback (tests/fake_twilio_rest.py), which records
every request; Twilio's own ``RequestValidator`` signs the callbacks, as Twilio would. Where the
order of things matters (no transfer before the caller has heard the agent's last words; the
fallback update before the caller's socket closes), a ``Timeline`` shared by the fakes records
what happened, in order, as it happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from bridge import twilio
from bridge.binding import binding_key, binding_mac
from bridge.caller_lines import CallerLines
from bridge.call import MAX_ERROR_RESUMES
from bridge.server import BridgeServer
from conftest import ROOT, BridgeFactory, empty_env, free_port, read_record, twilio_url
from fake_twilio_rest import DEFAULT_ACCOUNT_SID, FakeTwilioRest, RecordedRequest, Reply, twilio_error
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually

HOST = "bridge.example.ngrok.app"
PUBLIC = f"https://{HOST}"
STREAM_URL = f"wss://{HOST}/twilio"
TRANSFER = "+15550001111"
FALLBACK = "+15550002222"
OUR_NUMBER = "+15559990000"
VOICEMAIL = "Hi, this is Main Street Pharmacy: your refill is ready. Call us back at 555 0100."
CALL_PARAMETERS = {"name": "Ann", "reason": "refill_ready"}
AMD_URL = f"{PUBLIC}/twilio/amd?name=Ann&reason=refill_ready"
# The apology's words are the bridge's to choose; the shape of the TwiML is not.
FALLBACK_DIAL = re.compile(rf"<Response><Say>[^<]+</Say><Dial>{re.escape(FALLBACK)}</Dial></Response>")
FALLBACK_HANG_UP = re.compile(r"<Response><Say>[^<]+</Say><Hangup/></Response>")


# ------------------------------------------------------------------------------------ helpers


class Timeline:
    """What the fakes saw, in the order they saw it (one event loop: no locking needed)."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str]] = []

    def add(self, what: str) -> None:
        self.entries.append((time.monotonic(), what))

    def names(self) -> list[str]:
        return [what for _, what in self.entries]

    def first(self, prefix: str) -> float:
        """When the first entry starting with ``prefix`` happened."""
        return next(at for at, what in self.entries if what.startswith(prefix))

    def before(self, earlier: str, later: str) -> bool:
        names = self.names()
        first_earlier = next(i for i, name in enumerate(names) if name.startswith(earlier))
        first_later = next(i for i, name in enumerate(names) if name.startswith(later))
        return first_earlier < first_later


class TimelineRest(FakeTwilioRest):
    """The fake REST API, noting each request on the timeline the moment it is listed.

    ``answer_delay``: seconds between listing a request and answering it (a slow Twilio).
    """

    def __init__(self, timeline: Timeline, *, answer_delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.timeline = timeline
        self.answer_delay = answer_delay

    async def _publish(self, recorded: RecordedRequest) -> None:
        self.timeline.add(f"rest {recorded.operation}")
        await super()._publish(recorded)
        if self.answer_delay:
            await asyncio.sleep(self.answer_delay)  # the fake answers once this returns


class _NotedEvent(asyncio.Event):
    def __init__(self, timeline: Timeline, what: str) -> None:
        super().__init__()
        self.timeline, self.what = timeline, what

    def set(self) -> None:
        if not self.is_set():
            self.timeline.add(self.what)
        super().set()


class TimelineCaller(FakeTwilioCaller):
    """The fake Twilio caller, noting each mark it echoes and the moment its socket closes."""

    def __init__(self, url: str, timeline: Timeline, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.timeline = timeline
        self.closed = _NotedEvent(timeline, "caller closed")

    async def echo_mark(self, name: str) -> None:
        self.timeline.add(f"echo {name}")
        await super().echo_mark(name)


def rest_settings(fake: FakeTwilioRest, **extra: Any) -> dict[str, Any]:
    """Bridge settings that point Twilio's REST API at ``fake``, with short timeouts."""
    return {
        "twilio_account_sid": fake.account_sid,
        "twilio_auth_token": fake.auth_token,
        "twilio_api_url": fake.url,
        "public_url": PUBLIC,
        "twilio_api_timeout_seconds": 0.5,
        "twilio_api_backoff_seconds": 0.01,
        **extra,
    }


def signature_headers(fake: FakeTwilioRest) -> dict[str, str]:
    """What Twilio sends on the stream's upgrade request when the auth token is set."""
    return {"X-Twilio-Signature": twilio.expected_signature(fake.auth_token, STREAM_URL)}


class BoundCaller(TimelineCaller):
    """Twilio's side of a call whose TwiML came from the bridge's /twiml: its stream is bound.

    ``start`` first asks /twiml for the call's TwiML, signed as Twilio signs it, and starts the
    stream with the ``<Parameter>``s it holds (the binding MAC among them), as Twilio would;
    ``start_with`` uses exactly the parameters given (a TwiML the test took from a REST update).
    """

    def __init__(self, server: BridgeServer, fake: FakeTwilioRest, timeline: Timeline, **kwargs: Any) -> None:
        super().__init__(
            twilio_url(server), timeline, headers=signature_headers(fake), account_sid=fake.account_sid, **kwargs
        )
        self.server, self.fake = server, fake

    async def start(self, custom_parameters: dict[str, str] | None = None) -> None:
        bound = await twiml_parameters(self.server, self.fake, self.call_sid)
        await super().start({**bound, **(custom_parameters or {})})

    async def start_with(self, parameters: dict[str, str]) -> None:
        await super().start(parameters)


def signed_caller(server: BridgeServer, fake: FakeTwilioRest, timeline: Timeline | None = None, **kwargs: Any) -> BoundCaller:
    return BoundCaller(server, fake, timeline or Timeline(), **kwargs)


async def twiml_parameters(
    server: BridgeServer, fake: FakeTwilioRest, call_sid: str, *, account_sid: str | None = None, query: str = ""
) -> dict[str, str]:
    """The ``<Parameter>``s of the TwiML the bridge's /twiml answers Twilio's signed webhook for ``call_sid``.

    What Twilio then hands the stream in ``start.customParameters``: the binding MAC among them.
    """
    form = {"CallSid": call_sid, "AccountSid": account_sid or fake.account_sid, "From": "+15550001234",
            "To": "+15550005678", "Direction": "inbound"}
    url = f"{PUBLIC}/twiml" + (f"?{query}" if query else "")
    signature = RequestValidator(fake.auth_token).compute_signature(url, form)
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/twiml" + (f"?{query}" if query else ""),
        data=urllib.parse.urlencode(form).encode(), headers={"X-Twilio-Signature": signature}, method="POST",
    )
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=5).read())
    return stream_parameters(body.decode())


@asynccontextmanager
async def call_with_agent(
    server: BridgeServer,
    fake: FakeTwilioRest,
    agent: FakeAgent,
    timeline: Timeline | None = None,
    parameters: dict[str, str] | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[BoundCaller, FakeAgentSession]]:
    """A signed call whose agent session is ready (Settings answered)."""
    before = len(agent.sessions)
    async with signed_caller(server, fake, timeline, **kwargs) as caller:
        await caller.start(parameters)
        session = await agent.session(before)
        await eventually(lambda: session.settings is not None, what="the agent's Settings")
        yield caller, session


def function_request(call_id: str, name: str, **arguments: str) -> dict[str, Any]:
    return {"type": "FunctionCallRequest", "functions": [
        {"id": call_id, "name": name, "arguments": json.dumps(arguments), "client_side": True}]}


def transfer_request(call_id: str = "t1", **arguments: str) -> dict[str, Any]:
    return function_request(call_id, "transfer_call", **arguments)


async def say(session: FakeAgentSession, audio: bytes) -> None:
    """One agent turn: speech, then AgentAudioDone (after which the bridge sends a mark)."""
    await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.4})
    await session.send_audio(audio)
    await session.send_json({"type": "AgentAudioDone"})


def events(lines: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The record's ``kind`` events, without their timestamps."""
    return [{k: v for k, v in line.items() if k not in ("time", "event")} for line in lines if line["event"] == kind]


def calls_path(fake: FakeTwilioRest, call_sid: str) -> str:
    return f"/2010-04-01/Accounts/{fake.account_sid}/Calls/{call_sid}.json"


def assert_update(request: RecordedRequest, fake: FakeTwilioRest, call_sid: str, twiml: str | re.Pattern[str]) -> None:
    """One update of ``call_sid`` exactly as Twilio's API wants it: Basic auth, one Twiml field."""
    assert (request.method, request.path, request.operation) == ("POST", calls_path(fake, call_sid), "update")
    assert request.auth == (fake.account_sid, fake.auth_token)
    assert request.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert [name for name, _ in request.form_pairs()] == ["Twiml"]
    sent = request.field("Twiml") or ""
    if isinstance(twiml, str):
        assert sent == twiml
    else:
        assert twiml.fullmatch(sent), sent


# ---------------------------------------------------------------------------------- transfer


async def test_transfer_dials_the_configured_number_only_after_the_line_after_the_request_is_heard(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """transfer_call, then "Let me connect you": the update waits for that line's mark echo.

    The agent asks to dial +1900…; the bridge dials TRANSFER_NUMBER, in exactly one update of the
    caller's call, and records the transfer with the agent's reason.
    """
    timeline = Timeline()
    async with TimelineRest(timeline) as fake, make_bridge(
        fake_agent, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        async with call_with_agent(server, fake, fake_agent, timeline, mark_delay=0.4) as (caller, session):
            await session.send_json(transfer_request("t1", reason="wants a pharmacist", number="+19005550000"))
            [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), what="the agent's answer")
            assert (answer["id"], answer["name"]) == ("t1", "transfer_call")
            assert "result" in json.loads(answer["content"]) and "error" not in json.loads(answer["content"])
            await say(session, b"\x01" * 1600)  # "Let me connect you to a pharmacist."
            [update] = await fake.wait_for_requests(1, operation="update")
            await eventually(lambda: not server.calls, what="the call to end")
            await asyncio.wait_for(caller.closed.wait(), 2)
        assert len(caller.audio) == 1600
    assert timeline.before("echo ", "rest update"), f"transferred before the line was heard: {timeline.names()}"
    assert fake.requests == [update]
    assert_update(update, fake, caller.call_sid, f"<Response><Dial>{TRANSFER}</Dial></Response>")
    assert b"19005550000" not in update.body
    lines = read_record(tmp_path / "calls")
    assert events(lines, "transferred") == [{"reason": "wants a pharmacist", "mode": "cold"}]
    assert lines[-1]["event"] == "summary" and lines[-1]["ended_by"] == "transferred"


@pytest.mark.parametrize("mark_delay", [0.0, 2.2], ids=["heard-before-the-request", "heard-after-the-grace"])
async def test_transfer_after_the_line_waits_for_the_grace_and_every_mark(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, mark_delay: float
) -> None:
    """The prompt's order: the line is spoken (and marked) first, then transfer_call, nothing more.

    The transfer waits out the 1.5 s grace for last words, and then for the line's mark to be
    echoed if it hasn't been yet; never earlier.
    """
    timeline = Timeline()
    async with TimelineRest(timeline) as fake, make_bridge(
        fake_agent, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        async with call_with_agent(server, fake, fake_agent, timeline, mark_delay=mark_delay) as (caller, session):
            await say(session, b"\x01" * 1600)  # "Let me connect you to a pharmacist."
            await eventually(lambda: caller.of_event("mark"), what="the line's mark")
            await asyncio.sleep(0.05)
            timeline.add("request")
            await session.send_json(transfer_request("t1", reason="wants a pharmacist", number="+19005550000"))
            [update] = await fake.wait_for_requests(1, operation="update", timeout=6)
            await eventually(lambda: not server.calls, what="the call to end")
    waited = timeline.first("rest update") - timeline.first("request")
    assert waited > 1.4, f"transferred {waited:.2f} s after the request: no grace for last words"
    assert timeline.before("echo ", "rest update"), f"transferred before the line was heard: {timeline.names()}"
    assert fake.requests == [update]
    assert_update(update, fake, caller.call_sid, f"<Response><Dial>{TRANSFER}</Dial></Response>")
    lines = read_record(tmp_path / "calls")
    assert events(lines, "transferred") == [{"reason": "wants a pharmacist", "mode": "cold"}]
    assert lines[-1]["ended_by"] == "transferred"


@pytest.mark.parametrize("how", ["barge-in", "cancelled"])
async def test_a_barge_in_or_a_withdrawn_transfer_keeps_the_caller_with_the_agent(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, how: str
) -> None:
    """After transfer_call, the caller speaks (or Deepgram withdraws the call): no transfer, ever.

    The wait goes past the grace, the hang-up timer and the line's mark echo; then the
    conversation still flows both ways, and the record says the departure was called off.
    """
    async with FakeTwilioRest() as fake, make_bridge(
        fake_agent, hangup_timeout_seconds=0.5, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        async with call_with_agent(server, fake, fake_agent, echo_marks=False) as (caller, session):
            await session.send_json(transfer_request("t1", reason="wants a pharmacist"))
            await eventually(lambda: session.of_type("FunctionCallResponse"), what="the agent's answer")
            await say(session, b"\x01" * 1600)
            [mark] = await eventually(lambda: caller.of_event("mark"), what="the line's mark")
            if how == "barge-in":
                await session.send_json({"type": "UserStartedSpeaking"})
                await eventually(lambda: caller.of_event("clear"), what="the clear")
            else:
                await session.send_json({"type": "FunctionCallCancelled", "functions": [{"id": "t1", "name": "transfer_call"}]})
            await asyncio.sleep(0.1)
            await caller.echo_mark(mark["mark"]["name"])  # played, or echoed unplayed after the clear
            await asyncio.sleep(2.0)  # past the 1.5 s grace and the 0.5 s hang-up timer
            assert not fake.requests, "the caller was transferred after all"
            assert server.calls and not caller.closed.is_set()
            heard, sent = len(caller.audio), len(session.audio)
            await session.send_audio(b"\x02" * 800)
            await caller.send_audio(b"\x03" * 3200)
            await eventually(lambda: len(caller.audio) == heard + 800 and len(session.audio) == sent + 3200,
                             what="audio both ways")
            await caller.stop()
            await eventually(lambda: not server.calls, what="the call to end")
    assert not fake.requests
    lines = read_record(tmp_path / "calls")
    assert len(events(lines, "hangup_cancelled")) == 1
    assert not events(lines, "transferred") and lines[-1]["ended_by"] == "caller hung up"


async def test_a_failed_transfer_tells_the_agent_and_the_call_goes_on(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Twilio refuses the <Dial> (400, 21210): the agent is told, the conversation goes on.

    A 400 is not retried (one request); the agent gets an InjectAgentMessage to say so; audio
    still flows both ways; and a second transfer_call later works.
    """
    refusal = "The source phone number provided, +15550001111, is not yet verified for your account."
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake, transfer_number=TRANSFER)) as server:
        fake.script("update", twilio_error(400, 21210, refusal))
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await session.send_json(transfer_request("t1", reason="wants a pharmacist"))
            await say(session, b"\x01" * 1600)
            [injected] = await eventually(lambda: session.of_type("InjectAgentMessage"), 5, "the agent to be told")
            assert set(injected) == {"type", "message"} and isinstance(injected["message"], str) and injected["message"]
            assert len(fake.requests_for("update")) == 1
            heard, sent = len(caller.audio), len(session.audio)
            await session.send_audio(b"\x02" * 800)
            await caller.send_audio(b"\x03" * 3200)
            await eventually(lambda: len(caller.audio) == heard + 800 and len(session.audio) == sent + 3200,
                             what="audio both ways")
            assert server.calls and not caller.closed.is_set()
            # The caller insists; this time Twilio takes it.
            await session.send_json(transfer_request("t2", reason="insists"))
            await say(session, b"\x04" * 800)
            await fake.wait_for_requests(2, operation="update")
            await eventually(lambda: not server.calls, what="the call to end")
    first, second = fake.requests
    assert first.outcome == 400 and second.outcome == 200
    for update in (first, second):
        assert_update(update, fake, caller.call_sid, f"<Response><Dial>{TRANSFER}</Dial></Response>")
    lines = read_record(tmp_path / "calls")
    [failed] = events(lines, "transfer_failed")
    assert failed["reason"] == "wants a pharmacist"
    assert "21210" in failed["error"] and "not yet verified" in failed["error"]
    assert events(lines, "transferred") == [{"reason": "insists", "mode": "cold"}]
    assert lines[-1]["ended_by"] == "transferred"


@pytest.mark.parametrize("accepted", [True, False], ids=["accepted", "refused"])
async def test_twilio_ending_the_stream_before_the_transfer_answer_is_recorded_by_that_answer(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, accepted: bool
) -> None:
    """Twilio ends the stream as the call moves to <Dial>, before the REST answer comes back.

    The record follows the answer: "transferred" (once) if Twilio took the update; otherwise a
    transfer_failed event and a call that did not end as transferred.
    """
    timeline = Timeline()
    async with TimelineRest(timeline, answer_delay=0.3) as fake, make_bridge(
        fake_agent, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        if not accepted:
            fake.script("update", twilio_error(400, 21210, "The source phone number provided is not yet verified."))
        async with call_with_agent(server, fake, fake_agent, timeline) as (caller, session):
            await session.send_json(transfer_request("t1", reason="wants a pharmacist"))
            await say(session, b"\x01" * 800)
            await fake.wait_for_requests(1, operation="update")
            await caller.stop()  # what Twilio does when the update arrives, before it answers
        await eventually(lambda: not server.calls, 5, "the call to end")
    assert len(fake.requests) == 1
    lines = read_record(tmp_path / "calls")
    if accepted:
        assert events(lines, "transferred") == [{"reason": "wants a pharmacist", "mode": "cold"}]
        assert not events(lines, "transfer_failed") and lines[-1]["ended_by"] == "transferred"
    else:
        [failed] = events(lines, "transfer_failed")
        assert "21210" in failed["error"]
        assert not events(lines, "transferred") and lines[-1]["ended_by"] != "transferred"


async def test_transfer_call_without_a_transfer_number_is_answered_with_an_error(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """REST credentials but no TRANSFER_NUMBER: the agent is told at once; no request, no hang-up."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, hangup_timeout_seconds=0.3, **rest_settings(fake)) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await session.send_json(transfer_request("t1", reason="wants a pharmacist"))
            [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), what="the agent's answer")
            assert "error" in json.loads(answer["content"])
            await say(session, b"\x01" * 800)
            await asyncio.sleep(0.6)  # past the hang-up timer
            assert server.calls and not caller.closed.is_set() and not fake.requests
            await caller.stop()
            await eventually(lambda: not server.calls)
    assert read_record(tmp_path / "calls")[-1]["ended_by"] == "caller hung up"


# ---------------------------------------------------------------------------------- fallback


@pytest.mark.parametrize(
    "fallback_number, cause",
    [(FALLBACK, "refused"), (None, "refused"), (FALLBACK, "unreachable")],
    ids=["dial-fallback", "apology-and-hang-up", "agent-unreachable"],
)
async def test_a_caller_is_sent_to_the_fallback_before_the_stream_closes_when_the_agent_fails_at_start(
    make_bridge: BridgeFactory, tmp_path: Path, fallback_number: str | None, cause: str
) -> None:
    """Deepgram refuses the session (401) or can't be reached: one update, then the socket closes.

    The update must come first: with <Connect> the last verb, closing the stream would hang up.
    """
    timeline = Timeline()
    async with TimelineRest(timeline) as fake, FakeAgent(refuse_status=401) as agent:
        agent_url = agent.url if cause == "refused" else f"ws://127.0.0.1:{free_port()}/v1/agent/converse"
        async with make_bridge(agent, deepgram_agent_url=agent_url, **rest_settings(fake, fallback_number=fallback_number)) as server:
            async with signed_caller(server, fake, timeline) as caller:
                await caller.start()
                await asyncio.wait_for(caller.closed.wait(), 5)
                await eventually(lambda: not server.calls, what="the call to end")
    [update] = fake.requests
    assert timeline.names() == ["rest update", "caller closed"]
    assert_update(update, fake, caller.call_sid, FALLBACK_DIAL if fallback_number else FALLBACK_HANG_UP)
    lines = read_record(tmp_path / "calls")
    target = "fallback number" if fallback_number else "apology and hang-up"
    assert events(lines, "fallback") == [{"to": target, "ok": True, "error": None}]
    assert lines[-1]["ended_by"].startswith("agent unavailable")


async def test_twilio_says_the_fallback_in_the_agents_own_language_and_voice(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """An agent's ``bridge.twilio_say`` is the language and voice of the fallback's ``<Say>``."""
    settings = json.loads((ROOT / "config.json").read_text())
    settings["bridge"] = {
        "lines": {"fallback_goodbye": "Lo siento, no está disponible. Adiós."},
        "twilio_say": {"language": "es-ES", "voice": "Polly.Lucia-Neural"},
    }
    (tmp_path / "spanish.json").write_text(json.dumps(settings))
    async with FakeTwilioRest() as fake, FakeAgent(refuse_status=401) as agent, make_bridge(
        agent, config_path=tmp_path / "spanish.json", **rest_settings(fake)
    ) as server:
        async with signed_caller(server, fake) as caller:
            await caller.start()
            await asyncio.wait_for(caller.closed.wait(), 5)
    [update] = fake.requests
    assert_update(
        update, fake, caller.call_sid,
        '<Response><Say voice="Polly.Lucia-Neural" language="es-ES">Lo siento, no está disponible. Adiós.</Say><Hangup/></Response>',
    )


async def test_a_fallback_twilio_refuses_is_recorded_and_the_call_still_ends(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Twilio answers the fallback update with an error: recorded (ok false), the socket closes."""
    async with FakeTwilioRest() as fake, FakeAgent(refuse_status=401) as agent, make_bridge(
        agent, **rest_settings(fake, fallback_number=FALLBACK)
    ) as server:
        fake.script("update", twilio_error(400, 13223, "Dial: Invalid phone number format"))
        async with signed_caller(server, fake) as caller:
            await caller.start()
            await asyncio.wait_for(caller.closed.wait(), 5)
            await eventually(lambda: not server.calls, what="the call to end")
    assert len(fake.requests) == 1
    [fallback] = events(read_record(tmp_path / "calls"), "fallback")
    assert fallback["to"] == "fallback number" and fallback["ok"] is False and "13223" in fallback["error"]


async def test_without_twilio_credentials_a_failed_agent_just_ends_the_call(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """No TWILIO_ACCOUNT_SID: no REST request at all (even with FALLBACK_NUMBER set); the call ends."""
    async with FakeTwilioRest() as fake, FakeAgent(refuse_status=401) as agent, make_bridge(
        agent, twilio_api_url=fake.url, public_url=PUBLIC, fallback_number=FALLBACK
    ) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await asyncio.wait_for(caller.closed.wait(), 5)
            await eventually(lambda: not server.calls, what="the call to end")
        await asyncio.sleep(0.1)
    assert not fake.requests
    lines = read_record(tmp_path / "calls")
    assert not events(lines, "fallback") and lines[-1]["ended_by"].startswith("agent unavailable")


async def test_a_caller_is_sent_to_the_fallback_after_a_failed_resume(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """The agent connection drops mid-call and every reconnection is refused: the fallback line.

    Two attempts (0 s, then 0.05 s) both fail with HTTP 503; the update comes before the caller's
    socket closes, and the call ends as "agent connection lost".
    """
    timeline = Timeline()
    async with TimelineRest(timeline) as fake, FakeAgent() as agent, make_bridge(
        agent, agent_reconnect_delays=(0.05,), **rest_settings(fake, fallback_number=FALLBACK)
    ) as server:
        async with call_with_agent(server, fake, agent, timeline) as (caller, session):
            agent.refuse_status = 503  # Deepgram is down: nothing to resume with
            session.drop()
            [update] = await fake.wait_for_requests(1, operation="update", timeout=10)
            await asyncio.wait_for(caller.closed.wait(), 5)
            await eventually(lambda: not server.calls, what="the call to end")
    assert agent.handshakes == 3, "one session, then two refused reconnection attempts"
    assert timeline.names() == ["rest update", "caller closed"]
    assert fake.requests == [update]
    assert_update(update, fake, caller.call_sid, FALLBACK_DIAL)
    lines = read_record(tmp_path / "calls")
    assert events(lines, "fallback") == [{"to": "fallback number", "ok": True, "error": None}]
    assert lines[-1]["ended_by"] == "agent connection lost"


async def test_a_deepgram_error_mid_call_sends_the_caller_to_the_fallback(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """docs/call-control.md: "or Deepgram ends it with an error" also leads to the fallback line."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake, fallback_number=FALLBACK)) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            # Each Error resumes the session, a bounded number of times; then the fallback.
            for attempt in range(MAX_ERROR_RESUMES + 1):
                session = await fake_agent.session(attempt)
                await eventually(lambda: session.settings is not None)
                await session.send_json({"type": "Error", "code": "INTERNAL_SERVER_ERROR", "description": "boom"})
            [update] = await fake.wait_for_requests(1, operation="update")
            await asyncio.wait_for(caller.closed.wait(), 5)
            await eventually(lambda: not server.calls, what="the call to end")
    assert_update(update, fake, caller.call_sid, FALLBACK_DIAL)
    assert read_record(tmp_path / "calls")[-1]["ended_by"] == "Deepgram error INTERNAL_SERVER_ERROR"


# ----------------------------------------------------------------------------- outbound calls


def child_env(**variables: str) -> dict[str, str]:
    """A clean environment for main.py: only what a test gives it (a developer's own stays out)."""
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "SYSTEMROOT", "PYTHONPATH") if name in os.environ}
    return {**keep, **variables}


def run_main(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args, "--env-file", str(empty_env(tmp_path))],
        env=child_env(**env), capture_output=True, text=True, timeout=20,
    )


def outbound_env(fake: FakeTwilioRest) -> dict[str, str]:
    return {
        "DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": fake.account_sid, "TWILIO_AUTH_TOKEN": fake.auth_token,
        "TWILIO_PHONE_NUMBER": OUR_NUMBER, "PUBLIC_URL": PUBLIC, "TWILIO_API_URL": fake.url,
    }


def test_main_help_names_the_call_command_and_the_real_defaults() -> None:
    """``python main.py --help`` is where a newcomer looks: it lists ``call`` and the defaults startup uses."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--help"], env=child_env(), capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert "python main.py call +1" in done.stdout and "python main.py call --help" in done.stdout
    assert "default 127.0.0.1" in done.stdout and "default 5000" in done.stdout


async def test_an_outbound_call_request_is_exact(tmp_path: Path) -> None:
    """``main.py call`` sends one create request, exactly as section 7 says, and prints the Call SID."""
    async with FakeTwilioRest() as fake:
        done = await asyncio.to_thread(
            run_main, ["call", "+15551230000", "--param", "reason=refill_ready", "--param", "name=Ann"],
            outbound_env(fake), tmp_path,
        )
    assert done.returncode == 0, done.stderr
    [create] = fake.requests
    assert done.stdout == fake.created_sids[0] + "\n"
    assert (create.method, create.path, create.operation) == ("POST", f"/2010-04-01/Accounts/{fake.account_sid}/Calls.json", "create")
    assert create.auth == (fake.account_sid, fake.auth_token)
    assert sorted(create.form_pairs()) == sorted([
        ("To", "+15551230000"),
        ("From", OUR_NUMBER),
        ("Url", f"{PUBLIC}/twiml?name=Ann&reason=refill_ready"),
        ("Method", "POST"),
        ("MachineDetection", "DetectMessageEnd"),
        ("AsyncAmd", "true"),
        ("AsyncAmdStatusCallback", AMD_URL),
        ("AsyncAmdStatusCallbackMethod", "POST"),
    ])


@pytest.mark.parametrize(
    "args, env_change, expected",
    [
        (["call", "+15551230000"], {"TWILIO_PHONE_NUMBER": ""}, "TWILIO_PHONE_NUMBER"),
        (["call", "5551230000"], {}, "E.164"),
        (["call", "+1555"], {}, "E.164"),
        (["call", "+15551230000", "--param", "bridge_mode=voicemail"], {}, "bridge_mode"),
        (["call", "+15551230000", "--param", "note=" + "n" * 5000], {}, "the call's TwiML 5,"),
        (["call", "+15551230000", *[f"--param=p{n}=v" for n in range(150)]], {}, "over the 4,000 Twilio takes"),
        # Fits the TwiML (an "é" is one character there) but not the URLs ("%C3%A9": six).
        (["call", "+15551230000", "--param", "note=" + "é" * 1000], {}, "TwiML URL 6,"),
    ],
    ids=["no-phone-number", "no-plus", "too-short", "reserved-param", "long-param", "many-params", "long-url"],
)
async def test_an_outbound_call_that_cannot_be_placed_is_refused_in_one_sentence(
    tmp_path: Path, args: list[str], env_change: dict[str, str], expected: str
) -> None:
    """Missing settings or a bad number: exit 2, one "error: …." line naming the problem, no request."""
    async with FakeTwilioRest() as fake:
        done = await asyncio.to_thread(run_main, args, {**outbound_env(fake), **env_change}, tmp_path)
    assert not fake.requests
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.endswith(".\n") and done.stderr.count("\n") == 1, done.stderr
    assert expected in done.stderr
    assert "Traceback" not in done.stderr


async def run_call(fake: FakeTwilioRest, tmp_path: Path, **env_change: str) -> subprocess.CompletedProcess[str]:
    """``main.py call +15551230000`` against ``fake``; asserts it printed one "error: …." line."""
    done = await asyncio.to_thread(run_main, ["call", "+15551230000"], {**outbound_env(fake), **env_change}, tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.endswith(".\n") and done.stderr.count("\n") == 1, done.stderr
    return done


@pytest.mark.parametrize(
    "reply", [Reply(201, b"<html>Created</html>"), Reply(201, {"status": "queued"})], ids=["not-json", "no-sid"]
)
async def test_a_yes_from_twilio_that_cannot_be_read_says_the_call_may_have_been_placed(
    tmp_path: Path, reply: Reply
) -> None:
    async with FakeTwilioRest() as fake:
        fake.script("create", reply)
        done = await run_call(fake, tmp_path)
    assert len(fake.requests) == 1  # never tried again: a second call could ring twice
    assert "(HTTP 201: " in done.stderr and "refused" not in done.stderr
    assert "the call may have been placed: check the call log in the Twilio console before trying again." in done.stderr


async def test_a_refusal_is_said_once_and_a_401_names_the_settings_to_check(tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake:
        fake.script("create", twilio_error(400, 21211, "The 'To' number +15551230000 is not a valid phone number."))
        refused = await run_call(fake, tmp_path)
        wrong_token = await run_call(fake, tmp_path, TWILIO_AUTH_TOKEN="not-the-token-0123456789abcdef")
    assert refused.stderr == (
        "error: Twilio refused the call (HTTP 400, Twilio error 21211: "
        "The 'To' number +15551230000 is not a valid phone number.).\n"
    )  # the one line: no WARNING log line saying it first
    assert wrong_token.stderr == (
        "error: Twilio refused the call (HTTP 401, Twilio error 20003: Authenticate); "
        "check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN.\n"
    )
    assert "not-the-token" not in wrong_token.stderr


async def test_an_unreachable_api_is_not_called_a_refusal(tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake:
        pass  # closed: its port now refuses connections
    done = await run_call(fake, tmp_path)
    assert done.stderr.startswith(f"error: could not reach Twilio's API at {fake.url} (connection failed: ")
    assert done.stderr.endswith("; no call was placed.\n") and "refused the call" not in done.stderr


# ------------------------------------------------------------------- answering-machine verdicts


def local_url(port: int, url: str) -> str:
    """``url`` (the public one Twilio signs) as this test reaches the bridge: on loopback."""
    parts = urllib.parse.urlsplit(url)
    return f"http://127.0.0.1:{port}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def http(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def post_callback(port: int, url: str, params: dict[str, str], signature: str | None) -> int:
    """POST a callback to the bridge on ``port`` as Twilio would send it to the public ``url``."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    body = urllib.parse.urlencode(params).encode()
    return await asyncio.to_thread(http, urllib.request.Request(local_url(port, url), data=body, headers=headers, method="POST"))


async def get_callback(port: int, url: str, signature: str) -> int:
    """GET ``url`` (parameters in its query string) as Twilio would, on loopback."""
    return await asyncio.to_thread(http, urllib.request.Request(local_url(port, url), headers={"X-Twilio-Signature": signature}))


def verdict(call_sid: str, answered_by: str) -> dict[str, str]:
    """The parameters of Twilio's AsyncAmdStatusCallback."""
    return {"CallSid": call_sid, "AccountSid": DEFAULT_ACCOUNT_SID, "AnsweredBy": answered_by, "MachineDetectionDuration": "4210"}


def voicemail_twiml(fake: FakeTwilioRest, call_sid: str) -> str:
    """The TwiML a machine's call is moved to: its parameters, the mode, and the MAC binding its stream."""
    key = binding_key(None, fake.auth_token)
    assert key is not None
    mac = binding_mac(key, call_sid, fake.account_sid)
    return twilio.connect_twiml(STREAM_URL, {**CALL_PARAMETERS, "bridge_mode": "voicemail", "bridge_binding": mac})


def stream_parameters(twiml: str) -> dict[str, str]:
    """The ``<Parameter>``s a TwiML hands its stream."""
    stream = ET.fromstring(twiml).find("./Connect/Stream")
    assert stream is not None, twiml
    return {parameter.get("name", ""): parameter.get("value", "") for parameter in stream.findall("Parameter")}


def signed(token: str, url: str, params: dict[str, str]) -> str:
    """The oracle: Twilio's own library signs the request."""
    return str(RequestValidator(token).compute_signature(url, params))


async def test_a_machine_verdict_leads_to_the_voicemail_message_and_a_hang_up(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """machine_end_beep: the call moves to a voicemail stream that says VOICEMAIL_MESSAGE and hangs up.

    The update carries the call's own parameters plus bridge_mode=voicemail. The new stream opens
    the agent with the message as its greeting; speech from the machine clears nothing; once the
    message's mark is echoed the call ends as "voicemail".
    """
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, caller_lines=CallerLines(voicemail=VOICEMAIL), **rest_settings(fake)) as server:
        sid = "CA" + "1" * 32
        params = verdict(sid, "machine_end_beep")
        assert await post_callback(server.port, AMD_URL, params, signed(fake.auth_token, AMD_URL, params)) == 204
        [update] = await fake.wait_for_requests(1, operation="update")
        assert_update(update, fake, sid, voicemail_twiml(fake, sid))
        # The redirected call's new stream (whichever process takes it) gets exactly the update's
        # parameters from Twilio: the message, then a hang-up.
        parameters = {**CALL_PARAMETERS, "bridge_mode": "voicemail"}
        async with signed_caller(server, fake, echo_marks=False) as caller:
            caller.call_sid = sid
            await caller.start_with(stream_parameters(update.field("Twiml")))
            session = await fake_agent.session(0)
            await eventually(lambda: session.settings is not None, what="the agent's Settings")
            assert session.settings is not None and session.settings["agent"]["greeting"] == VOICEMAIL
            await session.send_json({"type": "AgentStartedSpeaking"})
            await session.send_audio(b"\x04" * 1600)
            await session.send_json({"type": "UserStartedSpeaking"})  # the machine's beep: the message goes on
            await session.send_audio(b"\x05" * 1600)
            await session.send_json({"type": "AgentAudioDone"})
            [mark] = await eventually(lambda: caller.of_event("mark"), what="the message's mark")
            await asyncio.sleep(0.3)
            assert not caller.closed.is_set(), "hung up before the message had played"
            await caller.echo_mark(mark["mark"]["name"])
            await asyncio.wait_for(caller.closed.wait(), 5)
            await eventually(lambda: not server.calls, what="the call to end")
        assert not caller.of_event("clear") and len(caller.audio) == 3200
    assert fake.requests == [update]
    summary = read_record(tmp_path / "calls")[-1]
    assert summary["ended_by"] == "voicemail" and summary["custom_parameters"] == parameters


@pytest.mark.parametrize(
    "answered_by, twiml",
    [
        ("human", None),
        ("unknown", None),
        ("fax", "<Response><Hangup/></Response>"),
        ("machine_start", "voicemail"),
        ("machine_end_silence", "voicemail"),
    ],
)
async def test_each_verdict_changes_the_call_as_it_should(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, answered_by: str, twiml: str | None
) -> None:
    """A person (or unknown) changes nothing; a fax is hung up on; any machine gets the message."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        sid = "CA" + "2" * 32
        params = verdict(sid, answered_by)
        assert await post_callback(server.port, AMD_URL, params, signed(fake.auth_token, AMD_URL, params)) == 204
        if twiml is None:
            await asyncio.sleep(0.3)
            assert not fake.requests
        else:
            [update] = await fake.wait_for_requests(1, operation="update")
            assert_update(update, fake, sid, voicemail_twiml(fake, sid) if twiml == "voicemail" else twiml)
            await asyncio.sleep(0.1)
            assert fake.requests == [update]


async def test_a_callback_reaching_a_second_bridge_process_works(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Bridge A holds the call; the verdict reaches bridge B (its own main.py process): B redirects it.

    Nothing about the call is in B's memory: the call's parameters come back in the signed query.
    """
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as bridge_a:
        port = free_port()
        env = child_env(**outbound_env(fake), DEEPGRAM_AGENT_URL=fake_agent.url, RECORD_CALLS="false", STATE_DIR=str(tmp_path / "state"))
        log = (tmp_path / "bridge_b.log").open("wb")
        bridge_b = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port),
             "--env-file", str(empty_env(tmp_path))],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            async with call_with_agent(bridge_a, fake, fake_agent, parameters=CALL_PARAMETERS) as (caller, _):

                def up() -> bool:
                    try:
                        return http(urllib.request.Request(f"http://127.0.0.1:{port}/health")) == 200
                    except OSError:
                        return False

                await eventually(lambda: up(), 15, "bridge B to start")
                params = verdict(caller.call_sid, "machine_end_beep")
                assert await post_callback(port, AMD_URL, params, signed(fake.auth_token, AMD_URL, params)) == 204
                [update] = await fake.wait_for_requests(1, operation="update", timeout=10)
                assert_update(update, fake, caller.call_sid, voicemail_twiml(fake, caller.call_sid))
                assert bridge_a.calls and not caller.closed.is_set()  # A was not involved
        finally:
            bridge_b.terminate()
            await asyncio.to_thread(bridge_b.wait, 10)
            log.close()
    assert fake.requests == [update]


async def test_callback_signatures_on_post_and_get(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    """Only a request signed for exactly its URL and parameters is acted on (docs/protocols.md §4).

    Refused (403, no REST request): a wrong signature, none, a signature for other parameters
    (AnsweredBy tampered), a signature for another query (the call's parameters tampered). A GET
    with the query string signed is accepted; a badly signed GET is refused. A well-signed machine
    verdict then acts, so the refusals above were not for want of a REST API.
    """
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        token, port = fake.auth_token, server.port
        sid = "CA" + "4" * 32
        person, machine = verdict(sid, "human"), verdict(sid, "machine_end_beep")
        assert await post_callback(port, AMD_URL, person, signed(token, AMD_URL, person)) == 204
        tampered_url = f"{PUBLIC}/twilio/amd?name=Ann&reason=anything_else"
        refused = [
            await post_callback(port, AMD_URL, machine, signed(token, AMD_URL, person)),  # AnsweredBy tampered
            await post_callback(port, AMD_URL, machine, None),
            await post_callback(port, AMD_URL, machine, "bm90IGEgc2lnbmF0dXJl"),
            await post_callback(port, AMD_URL, machine, signed("another-token", AMD_URL, machine)),
            await post_callback(port, tampered_url, machine, signed(token, AMD_URL, machine)),
            await post_callback(port, AMD_URL, machine, signed(token, local_url(port, AMD_URL), machine)),
        ]
        assert refused == [403] * len(refused)
        get_person = AMD_URL + "&" + urllib.parse.urlencode(person)
        assert await get_callback(port, get_person, signed(token, get_person, {})) == 204
        get_machine = AMD_URL + "&" + urllib.parse.urlencode(machine)
        assert await get_callback(port, get_machine, signed(token, AMD_URL, machine)) == 403  # signed as a POST
        assert await get_callback(port, get_machine, signed(token, get_person, {})) == 403
        await asyncio.sleep(0.2)
        assert not fake.requests, "a refused callback must change no call"
        assert await post_callback(port, AMD_URL, machine, signed(token, AMD_URL, machine)) == 204
        [update] = await fake.wait_for_requests(1, operation="update")
        assert_update(update, fake, sid, voicemail_twiml(fake, sid))


# ------------------------------------------------------------- bugs found by these tests, now fixed


async def test_a_voicemail_stream_that_resumes_still_leaves_the_voicemail_message(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The agent drops before the voicemail message was said: the resumed session must say it."""
    async with FakeTwilioRest() as fake, FakeAgent() as agent, make_bridge(
        agent, caller_lines=CallerLines(voicemail=VOICEMAIL), agent_reconnect_delays=(0.05,), **rest_settings(fake)
    ) as server:
        parameters = {**CALL_PARAMETERS, "bridge_mode": "voicemail"}
        async with call_with_agent(server, fake, agent, parameters=parameters) as (caller, session):
            assert session.settings is not None and session.settings["agent"]["greeting"] == VOICEMAIL
            session.drop()
            resumed = await agent.session(1)
            await eventually(lambda: resumed.settings is not None, what="the resumed session's Settings")
            greeting = resumed.settings["agent"].get("greeting")  # type: ignore[index]
            await caller.stop()
    assert greeting == VOICEMAIL, f"the machine would record {greeting!r}"


async def test_a_get_machine_verdict_redirects_with_only_the_calls_own_parameters(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """A GET verdict (AsyncAmdStatusCallbackMethod=GET is allowed by Twilio) redirects like a POST one."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        sid = "CA" + "5" * 32
        url = AMD_URL + "&" + urllib.parse.urlencode(verdict(sid, "machine_end_beep"))
        assert await get_callback(server.port, url, signed(fake.auth_token, url, {})) == 204
        [update] = await fake.wait_for_requests(1, operation="update")
    assert update.field("Twiml") == voicemail_twiml(fake, sid)


# ------------------------------------------------------------------------------ startup checks


def config_with_transfer(tmp_path: Path) -> Path:
    config = json.loads((ROOT / "config.json").read_text())
    config["agent"]["think"]["functions"].append(
        {"name": "transfer_call", "description": "Transfer the caller to a pharmacist.",
         "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}}, "defer_until_eot": True}
    )
    path = tmp_path / "with_transfer.json"
    path.write_text(json.dumps(config))
    return path


def test_declaring_transfer_call_without_its_settings_is_a_startup_error(tmp_path: Path) -> None:
    """config.json declares transfer_call but .env has no TRANSFER_NUMBER: exit 2, one sentence."""
    done = run_main(["--config", str(config_with_transfer(tmp_path)), "--port", "0"], {"DEEPGRAM_API_KEY": "k"}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "TRANSFER_NUMBER" in done.stderr


def test_an_agent_that_transfers_warm_without_our_number_is_a_startup_error(tmp_path: Path) -> None:
    """The agent file, not .env, asks for warm transfers: still one sentence at startup, naming the file."""
    config = json.loads(config_with_transfer(tmp_path).read_text())
    config["bridge"] = {"transfer_mode": "warm"}
    path = tmp_path / "warm.json"
    path.write_text(json.dumps(config))
    env = {"DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t",
           "PUBLIC_URL": HOST, "TRANSFER_NUMBER": TRANSFER}
    done = run_main(["--config", str(path), "--port", "0"], env, tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr == "error: warm.json transfers warm, which needs TWILIO_PHONE_NUMBER in .env: the bridge calls the pharmacist from it.\n"


def test_startup_says_once_which_call_control_features_are_off() -> None:
    """One line per feature that is off, naming what turns it on; none when all are on."""
    from bridge.settings import load_settings
    from main import call_control_status

    none = call_control_status(load_settings({"DEEPGRAM_API_KEY": "k"}))
    assert len(none) == 1 and "TWILIO_ACCOUNT_SID" in none[0]
    rest = load_settings({"DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t",
                          "PUBLIC_URL": HOST})
    lines = call_control_status(rest)
    assert [line.split(":")[0] for line in lines] == [
        "call transfer is off", "FALLBACK_NUMBER is not set", "outbound calls are off"]
    everything = load_settings({"DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t",
                                "PUBLIC_URL": HOST, "TRANSFER_NUMBER": TRANSFER, "FALLBACK_NUMBER": FALLBACK,
                                "TWILIO_PHONE_NUMBER": OUR_NUMBER})
    assert call_control_status(everything) == []


@pytest.mark.parametrize("env, expected", [
    ({"TWILIO_ACCOUNT_SID": "ACnope", "TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID must be AC"),
    ({"TWILIO_ACCOUNT_SID": "AC" + "a" * 32}, "TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not"),
    ({"TRANSFER_NUMBER": "555-1234"}, "TRANSFER_NUMBER must be a phone number in E.164"),
    ({"FALLBACK_NUMBER": "+0123"}, "FALLBACK_NUMBER must be a phone number in E.164"),
    ({"TWILIO_API_URL": "ftp://x"}, "TWILIO_API_URL must be an http(s)"),
    ({"CALL_RECORDING": "dual"}, "CALL_RECORDING needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN"),
    ({"TRANSFER_MODE": "warm", "TRANSFER_NUMBER": TRANSFER}, "TRANSFER_MODE=warm needs TWILIO_PHONE_NUMBER"),
])
def test_call_control_settings_are_validated_in_one_sentence(env: dict[str, str], expected: str) -> None:
    """Each bad call-control setting is refused at load time with one sentence naming it."""
    from bridge.settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings({"DEEPGRAM_API_KEY": "k", **env})
    assert str(caught.value).startswith(expected) and str(caught.value).endswith(".")


async def test_a_replayed_machine_verdict_is_acted_on_once_across_processes(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Twilio's signatures carry no nonce: a genuinely signed verdict replayed, to the same process
    and to another one sharing the state folder, moves the call once. PostgreSQL serves pods the same
    way (tests/test_scaling.py)."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as first, make_bridge(
        fake_agent, **rest_settings(fake)
    ) as second:
        sid = "CA" + "6" * 32
        params = verdict(sid, "machine_end_beep")
        signature = signed(fake.auth_token, AMD_URL, params)
        assert await post_callback(first.port, AMD_URL, params, signature) == 204
        [update] = await fake.wait_for_requests(1, operation="update")
        for server in (first, second, first):
            assert await post_callback(server.port, AMD_URL, params, signature) == 204
        await asyncio.sleep(0.3)  # a second update would have been sent by now
        assert fake.requests == [update]
        other = verdict("CA" + "7" * 32, "machine_end_beep")  # another call's verdict still acts
        assert await post_callback(second.port, AMD_URL, other, signed(fake.auth_token, AMD_URL, other)) == 204
        await fake.wait_for_requests(2, operation="update")
    assert_update(update, fake, sid, voicemail_twiml(fake, sid))


# ------------------------------------------------------------------ streams bound to their calls


@pytest.mark.parametrize("forgery", ["no-mac", "wrong-mac", "another-calls-mac"])
async def test_a_replayed_stream_signature_can_not_move_another_live_call(
    make_bridge: BridgeFactory, tmp_path: Path, forgery: str
) -> None:
    """The attack: the stream's X-Twilio-Signature is the same for every call, so a stranger who saw
    one replays it, opens /twilio, names a live victim's CallSid in its start and asks the agent to
    transfer it (or lets the agent fail, for the fallback). The victim's CallSid must never be the
    subject of a REST request; the attacker's conversation goes on without call control."""
    async with TimelineRest(Timeline()) as fake, FakeAgent() as agent, make_bridge(
        agent, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        async with call_with_agent(server, fake, agent) as (victim, _):
            attacker = signed_caller(server, fake)
            attacker.call_sid = victim.call_sid  # the stranger claims the victim's call
            async with attacker:
                stolen = {"no-mac": {}, "wrong-mac": {"bridge_binding": "A" * 43}}.get(forgery)
                if stolen is None:  # a genuine MAC, but for another call (the attacker's own, say)
                    stolen = await twiml_parameters(server, fake, "CA" + "e" * 32)
                await attacker.start_with(stolen)
                session = await agent.session(1)
                await eventually(lambda: session.settings is not None, what="the attacker's agent session")
                await session.send_json(transfer_request("t1", reason="now"))
                [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), what="the answer")
                assert "error" in json.loads(answer["content"])
                await say(session, b"\x01" * 800)
                await session.close(1000)  # the agent goes away: no fallback for an unbound stream either
                await asyncio.wait_for(attacker.closed.wait(), 5)
            await asyncio.sleep(0.3)
            assert fake.requests == [], "a REST request was made for a stream not bound to its call"
            assert server.calls, "the victim's call is untouched"
    lines = [json.loads(line) for path in (tmp_path / "calls").iterdir() for line in path.read_text().splitlines()]
    starts = [line for line in lines if line["event"] == "start"]
    assert sorted(start["bound"] for start in starts) == [False, True]
    assert all("bridge_binding" not in start["custom_parameters"] for start in starts)


async def test_a_stream_of_another_twilio_account_is_closed(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        async with FakeTwilioCaller(twilio_url(server), headers=signature_headers(fake), account_sid="AC" + "9" * 32) as caller:
            await caller.start()
            await asyncio.wait_for(caller.closed.wait(), 5)
        await eventually(lambda: not server.calls, what="the call to end")
    assert not fake_agent.sessions, "no agent session for another account's stream"
    warnings = [r.getMessage() for r in caplog.records if r.name == "bridge.call" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "another Twilio account" in warnings[0]
    [summary] = [json.loads(line) for path in (tmp_path / "calls").iterdir() for line in path.read_text().splitlines()]
    assert summary["end_reason"] == "stream_refused" and summary["call_sid"] is None
