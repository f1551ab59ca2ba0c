"""The call core's recording and warm-transfer machines, with a fake clock and no sockets.

Recording (bridge/call/recording.py): nothing is recorded before a Twilio mark proves the notice
played; a caller who hangs up first, or talks over it every time, is never recorded; keypad entries
pause it. The warm transfer's consult leg (bridge/call/consult.py): the caller stays with the agent
while the pharmacist is dialled; accepted, the caller is moved into the conference once the
agent's line is heard; declined, unanswered or timed out, the pharmacist's leg ends and the
conversation goes on.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bridge.call import (
    DialPharmacist,
    EndCallLeg,
    HangUp,
    MarkCaller,
    NoteCallerLeft,
    Record,
    StartRecording,
    Timer,
    TransferCall,
    UpdateRecording,
    StopWatchingForNote,
    WatchForNote,
)
from bridge.caller_lines import CallerLines
from test_call import (
    BARGE,
    CALL_SID,
    DONE,
    GREETING,
    STARTED,
    Harness,
    dtmf_frame,
    injected_texts,
    json_sent,
    of,
    records,
    request,
    with_agent,
)

ACCOUNT = "AC" + "a" * 32
REST = {"twilio_account_sid": ACCOUNT, "twilio_auth_token": "t0ken", "transfer_number": "+15550001111",
        "public_url": "https://bridge.example", "twilio_phone_number": "+15550002222"}
NOTICE = CallerLines().recording_notice
PHARMACIST = "CA" + "f" * 32


def recorded(**overrides: Any) -> Harness:
    h = Harness(**REST, call_recording="dual", **overrides)
    h.open()
    return h


# ----------------------------------------------------------------------------- recording


def test_the_greeting_carries_the_notice_and_recording_starts_only_once_its_mark_is_heard() -> None:
    h = Harness(**REST, call_recording="dual")
    h.connected()
    h.start()
    h.agent_connected()
    [settings] = json_sent(h.agent({"type": "Welcome", "request_id": "r"}))
    assert settings["agent"]["greeting"] == f"{NOTICE} {GREETING}"
    h.agent({"type": "SettingsApplied"})
    mark = h.turn(1600)  # the greeting, notice first
    assert not of(h.actions, StartRecording), "recording before the notice was heard"
    out = h.echo(mark)
    assert of(out, StartRecording) == [StartRecording(CALL_SID)]
    assert records(out, "recording_notice_heard") == [Record("recording_notice_heard", {"mark": mark})]
    out = h.take(h.call.recording_started("RE" + "1" * 32, None))
    assert records(out, "recording_started") == [Record("recording_started", {"recording_sid": "RE" + "1" * 32})]
    assert h.call.summary()["recording_sid"] == "RE" + "1" * 32


def test_a_caller_who_hangs_up_before_the_notice_is_heard_is_never_recorded() -> None:
    h = recorded()
    h.turn(1600)
    h.stop()
    assert not of(h.actions, StartRecording)


def test_a_notice_cut_by_a_barge_in_is_said_again_and_only_then_recording_starts() -> None:
    h = recorded()
    first = h.turn(1600)
    h.agent(BARGE)
    assert not of(h.echo(first), StartRecording), "a cleared mark is no proof the notice was heard"
    h.agent(STARTED)
    h.speak(b"\x01" * 800)
    out = h.agent(DONE)  # the agent's answer to the caller: then the notice again
    assert injected_texts(out) == [NOTICE]
    [answer_mark] = [mark.name for mark in of(out, MarkCaller)]
    second = h.turn(800)  # the notice, said
    # Twilio plays the answer before the notice: its mark is no proof the notice was heard.
    assert not of(h.echo(answer_mark), StartRecording), "recording once the answer before the notice played"
    assert of(h.echo(second), StartRecording) == [StartRecording(CALL_SID)]


def test_a_caller_who_talks_over_the_notice_every_time_is_not_recorded() -> None:
    h = recorded()
    for attempt in range(3):
        mark = h.turn(800)
        h.agent(BARGE)
        out = h.echo(mark)
        if attempt < 2:
            h.agent(STARTED)
            assert injected_texts(h.agent(DONE)) == [NOTICE]
    assert records(out, "recording_skipped")
    h.turn(800)
    assert not of(h.actions, StartRecording)


def test_an_agent_without_a_greeting_is_given_the_notice_to_say_once_ready() -> None:
    from bridge.call import Call
    from test_call import AGENT_SETTINGS, catalog_of

    settings = {**AGENT_SETTINGS, "agent": {k: v for k, v in AGENT_SETTINGS["agent"].items() if k != "greeting"}}
    h = Harness(**REST, call_recording="dual")
    h.call = Call(h.settings, catalog_of(settings))
    assert injected_texts(h.open()) == [NOTICE]
    assert of(h.echo(h.turn(800)), StartRecording)


def test_an_unbound_call_is_not_recorded_and_hears_no_notice() -> None:
    h = Harness(**REST, call_recording="dual")
    h.connected()
    h.start(bound=False)
    h.agent_connected()
    [settings] = json_sent(h.agent({"type": "Welcome", "request_id": "r"}))
    assert settings["agent"]["greeting"] == GREETING
    h.agent({"type": "SettingsApplied"})
    h.echo(h.turn(800))
    assert not of(h.actions, StartRecording)


def test_keypad_digits_pause_the_recording_and_the_entry_resumes_it() -> None:
    h = recorded(dtmf_timeout_seconds=2.0)
    h.echo(h.turn(800))
    h.take(h.call.recording_started("RE" + "1" * 32, None))
    assert of(h.twilio(dtmf_frame("1")), UpdateRecording) == [UpdateRecording(CALL_SID, pause=True)]
    assert not of(h.twilio(dtmf_frame("2")), UpdateRecording), "paused once per entry"
    assert of(h.twilio(dtmf_frame("#")), UpdateRecording) == [UpdateRecording(CALL_SID, pause=False)]
    h.twilio(dtmf_frame("3"))
    assert of(h.fire(Timer.DTMF), UpdateRecording) == [UpdateRecording(CALL_SID, pause=False)]


# ------------------------------------------------------------------------- warm transfer


def warm() -> Harness:
    h = Harness(**REST, transfer_mode="warm", transfer_timeout_seconds=30.0)
    h.open()
    return h


def ask_for_the_pharmacist(h: Harness) -> list[Any]:
    return h.agent(request(("t1", "transfer_call", {"reason": "refill", "summary": "Ann Lee, asking about order 12"})))


def accepted_warm() -> Harness:
    """A warm transfer whose pharmacist has just pressed 1."""
    h = warm()
    ask_for_the_pharmacist(h)
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    h.take(h.call.consult_answered("accepted", h.now))
    return h


def test_a_warm_transfer_keeps_the_caller_with_the_agent_while_the_pharmacist_is_dialled() -> None:
    h = warm()
    out = ask_for_the_pharmacist(h)
    [answer] = [m for m in json_sent(out) if m["type"] == "FunctionCallResponse"]
    assert "fetching the pharmacist" in json.loads(answer["content"])["result"]
    lines = CallerLines()
    briefing = lines.pharmacist_briefing.format(summary="Ann Lee, asking about order 12")
    assert of(out, DialPharmacist) == [DialPharmacist(CALL_SID, "default", 1, briefing, lines.pharmacist_no_answer)]
    assert not of(out, TransferCall) and not of(out, HangUp)
    assert of(h.take(h.call.consult_dialled(PHARMACIST, None, h.now)), WatchForNote) == [WatchForNote(CALL_SID, 1)]


def test_the_models_summary_is_cleaned_and_cut_between_words_for_the_briefing() -> None:
    h = warm()
    summary = "Ann\u202e Lee\x00 " + "asks about order twelve " * 40
    [dial] = of(h.agent(request(("t1", "transfer_call", {"reason": "refill", "summary": summary}))), DialPharmacist)
    said = dial.briefing.split(": ", 1)[1].rsplit(". Press 1", 1)[0]
    assert said.startswith("Ann Lee asks about order twelve") and "\u202e" not in said and "\x00" not in said
    assert len(said) <= 300 and said.endswith(("asks", "about", "order", "twelve"))
    # A summary with nothing left to say once cleaned: the pharmacist hears the reason instead.
    h = warm()
    [dial] = of(h.agent(request(("t1", "transfer_call", {"reason": "a refill", "summary": "\u200b\u2066 \x07"}))), DialPharmacist)
    assert ": a refill. Press 1" in dial.briefing


def test_every_attempt_has_its_own_note_and_a_call_has_at_most_five() -> None:
    h = warm()
    for attempt in range(1, 6):
        [dial] = of(ask_for_the_pharmacist(h), DialPharmacist)
        assert dial.attempt == attempt
        assert of(h.take(h.call.consult_dialled(PHARMACIST, None, h.now)), WatchForNote) == [WatchForNote(CALL_SID, attempt)]
        out = h.take(h.call.consult_answered("declined:declined", h.now))
        assert of(out, StopWatchingForNote) and of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)]
    out = ask_for_the_pharmacist(h)
    assert not of(out, DialPharmacist)
    [answer] = [m for m in json_sent(out) if m["type"] == "FunctionCallResponse"]
    assert "too often" in json.loads(answer["content"])["error"]


def test_accepted_the_caller_is_moved_into_the_conference_once_the_agents_line_is_heard() -> None:
    h = warm()
    ask_for_the_pharmacist(h)
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    out = h.take(h.call.consult_answered("accepted", h.now))
    assert injected_texts(out) == [CallerLines().transfer_connecting]
    assert not of(out, TransferCall), "not before the agent's line"
    mark = h.turn(800)  # "The pharmacist can take your call now..."
    [transfer] = of(h.echo(mark), TransferCall)
    assert transfer.redirect.call_sid == CALL_SID and f"transfer-{CALL_SID}</Conference>" in transfer.redirect.twiml
    assert not of(h.actions, EndCallLeg)
    out = h.take(h.call.transfer_finished(None, h.now))
    assert records(out, "transferred")[0].fields["mode"] == "warm" and of(out, HangUp)


def test_declined_the_leg_ends_and_the_agent_tells_the_caller() -> None:
    h = warm()
    ask_for_the_pharmacist(h)
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    out = h.take(h.call.consult_answered("declined:busy", h.now))
    assert of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)]
    assert injected_texts(out) == [CallerLines().transfer_declined]
    assert records(out, "transfer_declined") == [Record("transfer_declined", {"mode": "warm", "reason": "busy"})]
    assert not of(h.actions, HangUp) and not of(h.actions, TransferCall)
    assert of(ask_for_the_pharmacist(h), DialPharmacist), "the agent may try again"


def test_no_answer_in_time_counts_as_declined() -> None:
    h = warm()
    ask_for_the_pharmacist(h)
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    out = h.fire(Timer.CONSULT)
    assert of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)] and of(out, StopWatchingForNote)
    assert records(out, "transfer_declined")[0].fields["reason"] == "no-answer"


def test_the_caller_hanging_up_while_the_pharmacist_is_dialled_ends_the_pharmacists_leg() -> None:
    h = warm()
    ask_for_the_pharmacist(h)
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    out = h.stop()
    assert of(out, NoteCallerLeft) == [NoteCallerLeft(CALL_SID)] and of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)]
    assert h.hangups and not of(h.actions, TransferCall)


def test_a_move_twilio_refuses_after_acceptance_ends_the_waiting_pharmacists_leg() -> None:
    h = accepted_warm()
    h.echo(h.turn(800))
    out = h.take(h.call.transfer_finished("Twilio said 400", h.now))
    assert of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)] and injected_texts(out) == [CallerLines().transfer_failed]
    assert not h.hangups


def test_a_caller_who_leaves_before_the_pharmacists_call_exists_still_gets_that_call_ended() -> None:
    """The caller hangs up while the create request is under way (no Call SID yet): the pharmacist's
    call is hung up as soon as its SID arrives, even though the caller's call has ended."""
    h = warm()
    ask_for_the_pharmacist(h)
    out = h.stop()
    assert of(out, NoteCallerLeft) == [NoteCallerLeft(CALL_SID)] and not of(out, EndCallLeg) and h.hangups
    assert of(h.take(h.call.consult_dialled(PHARMACIST, None, h.now)), EndCallLeg) == [EndCallLeg(PHARMACIST)]
    assert not of(h.take(h.call.consult_dialled(PHARMACIST, None, h.now)), EndCallLeg), "ended once"


def test_the_consult_waits_transfer_timeout_seconds_and_the_record_says_when_it_was_accepted() -> None:
    h = Harness(**REST, transfer_mode="warm", transfer_timeout_seconds=17.0)
    h.open()
    asked_at = h.now
    ask_for_the_pharmacist(h)
    assert h.armed[Timer.CONSULT] == asked_at + 17.0
    h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    h.at(asked_at + 6.5)
    out = h.take(h.call.consult_answered("accepted", h.now))
    assert records(out, "transfer_accepted") == [Record("transfer_accepted", {"seconds_waited": 6.5})]


def test_the_caller_is_moved_only_once_the_connecting_line_has_played_however_long_it_is() -> None:
    """Accepted: the move waits for the mark after the agent's line, not for a fixed grace."""
    h = accepted_warm()
    h.advance(2.0)  # the agent's voice takes a moment to start saying the injected line
    assert not of(h.actions, TransferCall), "moved before the caller heard the line"
    mark = h.turn(8000 * 8)  # eight seconds of "The pharmacist can take your call now..."
    h.advance(6.0)
    assert not of(h.actions, TransferCall), "moved while the caller was still hearing the line"
    assert of(h.echo(mark), TransferCall)


def test_a_stream_twilio_ends_before_the_move_answers_still_records_a_warm_transfer() -> None:
    """Twilio usually ends the stream as it moves the call, before the REST answer: still mode warm."""
    h = accepted_warm()
    h.echo(h.turn(800))
    h.stop()
    out = h.take(h.call.transfer_finished(None, h.now))
    assert records(out, "transferred") == [Record("transferred", {"reason": "refill", "mode": "warm"})]


def test_an_agent_file_that_transfers_warm_does_so_on_a_cold_bridge() -> None:
    """``bridge.transfer_mode`` in an agent's file beats the process's TRANSFER_MODE for its calls."""
    h = with_agent({"transfer_mode": "warm"}, **REST, transfer_mode="cold")
    h.open()
    out = ask_for_the_pharmacist(h)
    assert of(out, DialPharmacist) and not of(out, TransferCall)


@pytest.mark.parametrize("stage", ["dialling", "ringing"])
@pytest.mark.parametrize("ending", ["shutdown", "agent gone"])
def test_a_call_that_ends_any_other_way_during_the_consult_ends_the_pharmacists_call_too(stage: str, ending: str) -> None:
    """Not only the caller's hang-up: a shutdown, or an agent that can't go on, leaves nobody to put through."""
    h = warm()
    ask_for_the_pharmacist(h)
    if stage == "ringing":
        h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    out = h.shutdown() if ending == "shutdown" else h.agent_closed(1000)
    assert of(out, HangUp) and of(out, NoteCallerLeft) == [NoteCallerLeft(CALL_SID)]
    if stage == "dialling":
        out = h.take(h.call.consult_dialled(PHARMACIST, None, h.now))
    assert of(out, EndCallLeg) == [EndCallLeg(PHARMACIST)]
