"""Warm transfer and call recording carried out by a real call, end to end.

The real server, a bound call from the fake Twilio caller, the fake agent, and the fake REST API
checking requests as Twilio does; the pharmacist's callbacks are signed by Twilio's own validator
and reach the server over loopback as Twilio's would. What is asserted is what went over the
wire (each REST request's fields, the TwiML the pharmacist hears), the shared state's notes and
the call's record. The machines' rules are unit tested in tests/test_call_recording_and_consult.py;
this file proves the session carries their actions out.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from conftest import ROOT, BridgeFactory, read_record
from fake_twilio_rest import FakeTwilioRest
from fakes import FakeAgent, FakeAgentSession, eventually
from test_call_control import (
    OUR_NUMBER,
    PUBLIC,
    TRANSFER,
    call_with_agent,
    events,
    function_request,
    rest_settings,
    say,
)
from test_warm_transfer import callback, key_form, note, public_key_url, public_status_url, status_form, twiml_of

from bridge.call.consult import CALLER_LEFT_NOTE, caller_left_key, conference_name
from bridge.caller_lines import CallerLines
from bridge.storage.shared import DirectoryState

LINES = CallerLines()
SUMMARY = "Ann Lee asks whether her amoxicillin interacts with ibuprofen"


def warm_call_settings(fake: FakeTwilioRest, **extra: Any) -> dict[str, Any]:
    return rest_settings(
        fake, transfer_number=TRANSFER, twilio_phone_number=OUR_NUMBER, transfer_mode="warm",
        transfer_timeout_seconds=20.0, **extra,
    )


async def ask_for_a_warm_transfer(session: FakeAgentSession, call_id: str = "t1") -> None:
    await session.send_json(function_request(call_id, "transfer_call", reason="an interaction question", summary=SUMMARY))


def injected(session: FakeAgentSession) -> list[str]:
    return [message["message"] for message in session.of_type("InjectAgentMessage")]


async def test_a_warm_transfer_briefs_the_pharmacist_and_moves_the_caller_once_they_press_1(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The pharmacist's call is created as Twilio wants it, with the summary in the briefing; their
    key press reaches the bridge; the caller hears the agent say so and is then moved into the
    conference the pharmacist waits in. Twilio reads the briefing in the agent's ``twilio_say`` voice."""
    agent_file = json.loads((ROOT / "config.json").read_text())
    agent_file["bridge"] = {"twilio_say": {"language": "en-GB", "voice": "Polly.Amy"}}
    (tmp_path / "agent.json").write_text(json.dumps(agent_file))
    async with FakeTwilioRest() as fake, make_bridge(
        fake_agent, config_path=tmp_path / "agent.json", **warm_call_settings(fake)
    ) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            fake.add_call(caller.call_sid)
            await ask_for_a_warm_transfer(session)
            [create] = await fake.wait_for_requests(1, operation="create")
            [answer] = session.of_type("FunctionCallResponse")
            assert "fetching the pharmacist" in json.loads(answer["content"])["result"]
            assert not caller.closed.is_set(), "the caller stays with the agent"
            # The pharmacist answers and presses 1, at the key URL the briefing named.
            gather = ET.fromstring(create.field("Twiml") or "")[0]
            key_url = gather.get("action") or ""
            assert key_url == public_key_url(caller.call_sid)
            status, _, body = await callback(server.port, key_url, key_form("1"), fake.auth_token)
            assert status == 200 and twiml_of(body)[1][0].text == conference_name(caller.call_sid)
            # The holder reads the note; the agent is given the connecting line, says it, and once it is heard...
            await eventually(lambda: LINES.transfer_connecting in injected(session), what="the connecting line")
            await say(session, b"\x01" * 800)
            [move] = await fake.wait_for_requests(1, operation="update")
            await eventually(lambda: not server.calls, what="the call to end")
    assert (create.field("To"), create.field("From"), create.field("Timeout")) == (TRANSFER, OUR_NUMBER, "20")
    assert create.field("StatusCallback") == public_status_url(caller.call_sid)
    assert create.form["StatusCallbackEvent"] == ["answered", "completed"]
    assert (create.field("MachineDetection"), create.field("AsyncAmd")) == ("Enable", "true")
    briefing = gather[0].text or ""
    assert briefing == LINES.pharmacist_briefing.format(summary=SUMMARY)
    assert gather[0].attrib == {"voice": "Polly.Amy", "language": "en-GB"}
    assert move.call_sid == caller.call_sid
    conference = ET.fromstring(move.field("Twiml") or "").find("Dial/Conference")
    assert conference is not None and conference.text == conference_name(caller.call_sid)
    assert note(tmp_path, caller.call_sid) == "accepted"
    lines = read_record(tmp_path / "calls")
    assert events(lines, "transfer_dialling") == [{"mode": "warm", "reason": "an interaction question"}]
    assert [line["event"] for line in lines if line["event"].startswith("transfer")] == [
        "transfer_dialling", "transfer_accepted", "transferred"]
    assert events(lines, "transferred") == [{"reason": "an interaction question", "mode": "warm"}]
    assert lines[-1]["ended_by"] == "transferred"
    assert len(fake.requests) == 2  # the pharmacist's call and the caller's move: nothing else


async def test_a_busy_pharmacist_leaves_the_caller_with_the_agent_who_may_try_again(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Busy: the pharmacist's leg is hung up, the agent tells the caller, the call goes on; a second
    attempt rings again under its own note, and the first's late status can't answer it."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **warm_call_settings(fake)) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await ask_for_a_warm_transfer(session)
            [first] = await fake.wait_for_requests(1, operation="create")
            assert (await callback(server.port, public_status_url(caller.call_sid), status_form("busy"), fake.auth_token))[0] == 204
            await eventually(lambda: LINES.transfer_declined in injected(session), what="the declined line")
            [hang_up] = await fake.wait_for_requests(1, operation="update")
            assert (hang_up.call_sid, hang_up.form_pairs()) == (fake.created_sids[0], [("Status", "completed")])
            await ask_for_a_warm_transfer(session, "t2")
            await fake.wait_for_requests(2, operation="create")
            second = fake.requests_for("create")[1]
            assert "attempt=2" in (ET.fromstring(second.field("Twiml") or "")[0].get("action") or "")
            assert (await callback(server.port, public_status_url(caller.call_sid), status_form("completed"), fake.auth_token))[0] == 204
            await asyncio.sleep(0)  # nothing to wait for: attempt 1's answer stands, attempt 2 has none
            assert not caller.closed.is_set()
            await caller.stop()
            await eventually(lambda: not server.calls, what="the call to end")
    assert first.field("Twiml") != second.field("Twiml")
    assert note(tmp_path, caller.call_sid, 1) == "declined:busy" and note(tmp_path, caller.call_sid, 2) is None
    lines = read_record(tmp_path / "calls")
    assert events(lines, "transfer_declined") == [{"mode": "warm", "reason": "busy"}]
    assert lines[-1]["ended_by"] == "caller hung up"


async def test_a_caller_hanging_up_during_the_briefing_ends_the_pharmacists_leg_and_says_so(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The holder leaves the caller-left note and hangs up the pharmacist's call before the record is
    written; a 1 pressed after that hears that the caller has gone."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **warm_call_settings(fake)) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await ask_for_a_warm_transfer(session)
            await fake.wait_for_requests(1, operation="create")
            await caller.stop()
            await eventually(lambda: not server.calls, what="the call to end")
        [hang_up] = fake.requests_for("update")  # awaited before the call ended: no waiting needed
        assert DirectoryState(tmp_path / "state").read(caller_left_key(caller.call_sid)) == CALLER_LEFT_NOTE
        status, _, body = await callback(server.port, public_key_url(caller.call_sid), key_form("1"), fake.auth_token)
    assert hang_up.call_sid == fake.created_sids[0] and hang_up.form_pairs() == [("Status", "completed")]
    assert status == 200 and twiml_of(body)[0].text == LINES.pharmacist_caller_left
    assert note(tmp_path, caller.call_sid) is None


async def test_a_caller_who_hangs_up_while_the_pharmacists_call_is_being_created_still_gets_it_ended(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Twilio answers the create only after the caller has left: the new call, which nobody would
    be put through to, is hung up all the same, before the caller's record is written."""
    create_answers = asyncio.Event()
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **warm_call_settings(fake)) as server:
        fake.script("create", create_answers)
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await ask_for_a_warm_transfer(session)
            await eventually(lambda: fake.held, what="the pharmacist's call being created")
            await caller.stop()
            state = DirectoryState(tmp_path / "state")
            await eventually(lambda: state.read(caller_left_key(caller.call_sid)) == CALLER_LEFT_NOTE, what="the caller gone")
            create_answers.set()
            await eventually(lambda: not server.calls, what="the call to end")
        [hang_up] = fake.requests_for("update")
    assert hang_up.call_sid == fake.created_sids[0] and hang_up.form_pairs() == [("Status", "completed")]


async def test_a_recorded_call_starts_after_the_notice_is_heard_and_skips_keypad_digits(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """CALL_RECORDING=dual: the greeting opens with the notice; no recording request before its mark
    is echoed; then one two-channel recording whose callback names the call's record; keypad
    digits pause it (skipped, not silent) and the end of the entry resumes it, in that order."""
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake, call_recording="dual")) as server:
        async with call_with_agent(server, fake, fake_agent, mark_delay=0.3) as (caller, session):
            fake.add_call(caller.call_sid)
            greeting = session.settings["agent"]["greeting"]  # type: ignore[index]
            assert greeting.startswith(LINES.recording_notice + " ")
            await say(session, b"\x01" * 800)  # the greeting, notice first
            await eventually(lambda: caller.of_event("mark"), what="the greeting's mark")
            assert fake.requests == [], "nothing is recorded before the notice is heard"
            [start] = await fake.wait_for_requests(1, operation="start-recording")
            await caller.press("4")
            await caller.press("#")
            await fake.wait_for_requests(2, operation="update-recording")
            await caller.stop()
            await eventually(lambda: not server.calls, what="the call to end")
    [record] = list((tmp_path / "calls").glob("*.jsonl"))
    assert start.call_sid == caller.call_sid
    assert start.field("RecordingChannels") == "dual"
    assert start.form["RecordingStatusCallbackEvent"] == ["completed", "absent"]
    assert start.field("RecordingStatusCallback") == f"{PUBLIC}/twilio/recording?" + urllib.parse.urlencode({"record": record.name})
    pause, resume = fake.requests_for("update-recording")
    assert pause.form_pairs() == [("Status", "paused"), ("PauseBehavior", "skip")]
    assert resume.form_pairs() == [("Status", "in-progress")]
    lines = read_record(tmp_path / "calls")
    recorded = [line["event"] for line in lines if line["event"].startswith("recording")]
    assert recorded == ["recording_notice_heard", "recording_started", "recording_paused", "recording_resumed"]
    [started] = events(lines, "recording_started")
    assert started == {"recording_sid": next(iter(fake.recordings))}
    assert lines[-1]["recording_sid"] == started["recording_sid"]
    assert events(lines, "dtmf") == [{"keys": 1}]  # how many, never which
