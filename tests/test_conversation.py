"""Keypad digits, caller silence, injections, Deepgram's History and diagnostics, in the call's
state machine (bridge/call/), driven with the fake clock of tests/test_call.py.

What is checked here is the rule; tests/test_conversation_sockets.py checks the same things
through real sockets and the fake agent.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from fakes import shows_digits
from test_call import (
    hang_up,
    APPLIED,
    DONE,
    STARTED,
    WELCOME,
    Harness,
    dtmf_frame,
    of,
    quiet,
    ready,
    request,
)

from bridge import agent_protocol
from bridge.call.keypad import MAX_DTMF_DIGITS
from bridge.call import (
    ArmTimer,
    CancelTimer,
    Log,
    MarkCaller,
    Phase,
    Record,
    SendToAgent,
    SendToCaller,
    Timer,
)
from bridge.functions import FunctionOutcome

IDLE = {"idle_reprompt_seconds": 10.0, "idle_hangup_seconds": 30.0}


def sent_to_agent(actions: list[Any]) -> list[Any]:
    """What went to the agent, JSON decoded (audio left as bytes)."""
    return [json.loads(a.data) if isinstance(a.data, str) else a.data for a in of(actions, SendToAgent)]


def injected(actions: list[Any]) -> list[dict[str, Any]]:
    return [m for m in sent_to_agent(actions) if isinstance(m, dict) and m.get("type", "").startswith("Inject")]


def ok(result: dict[str, Any]) -> FunctionOutcome:
    return FunctionOutcome(result=result, error=None, content=json.dumps(result), duration_seconds=0.01)


# =========================================================================================== keypad


def test_digits_go_to_the_agent_as_one_user_message_on_pound() -> None:
    h = ready()
    out = [*h.twilio(dtmf_frame("1")), *h.twilio(dtmf_frame("2")), *h.twilio(dtmf_frame("3")), *h.twilio(dtmf_frame("*"))]
    assert injected(out) == []  # gathered, not sent one by one
    out = h.twilio(dtmf_frame("#"))
    assert injected(out) == [{"type": "InjectUserMessage", "content": "The caller pressed 1 2 3 star"}]
    assert Record("dtmf", {"keys": 4}) in out
    assert Timer.DTMF not in h.armed
    assert h.call.summary()["keypad_entries"] == 1


def test_digits_go_to_the_agent_after_the_timeout_without_a_new_digit() -> None:
    h = ready(dtmf_timeout_seconds=2.0)
    h.twilio(dtmf_frame("9"))
    h.at(1.5).twilio(dtmf_frame("8"))  # a new digit restarts the wait
    assert h.armed[Timer.DTMF] == 3.5
    assert injected(h.advance_to(3.4)) == []
    assert injected(h.advance_to(3.5)) == [{"type": "InjectUserMessage", "content": "The caller pressed 9 8"}]


def test_pound_alone_is_passed_on() -> None:
    h = ready()
    assert injected(h.twilio(dtmf_frame("#"))) == [{"type": "InjectUserMessage", "content": "The caller pressed pound"}]


def test_digits_are_sent_in_groups_of_at_most_the_cap() -> None:
    h = ready()
    out: list[Any] = []
    for _ in range(MAX_DTMF_DIGITS + 1):
        out += h.twilio(dtmf_frame("5"))
    [message] = injected(out)
    assert message["content"] == "The caller pressed " + " ".join(["5"] * MAX_DTMF_DIGITS)
    assert injected(h.fire(Timer.DTMF)) == [{"type": "InjectUserMessage", "content": "The caller pressed 5"}]


def test_digits_stay_out_of_logs_and_records_including_the_agents_echo_of_them() -> None:
    h = ready(browser=True)
    for digit in "4711":
        h.twilio(dtmf_frame(digit))
    h.twilio(dtmf_frame("#"))
    echo = h.agent({"type": "ConversationText", "role": "user", "content": "The caller pressed 4 7 1 1"})
    not_to_agent = [a for a in h.actions if not isinstance(a, SendToAgent)]
    text = repr(not_to_agent)
    assert not shows_digits(text, "4711")
    assert Record("transcript", {"role": "user", "content": "(keypad digits)"}) in echo
    # The resume history keeps what the caller entered: the new session must know it.
    assert "The caller pressed 4 7 1 1" in h.call.history[-1]
    # Something the caller *said* that looks the same is not hidden.
    said = h.agent({"type": "ConversationText", "role": "user", "content": "The caller pressed 4 7 1 1"})
    assert Record("transcript", {"role": "user", "content": "The caller pressed 4 7 1 1"}) in said


def test_digits_pressed_while_the_session_opens_go_out_once_it_is_ready() -> None:
    h = Harness()
    h.connected()
    h.start()
    h.twilio(dtmf_frame("7"))
    assert injected(h.twilio(dtmf_frame("#"))) == []
    h.agent_connected()
    h.agent(WELCOME)
    out = h.agent(APPLIED)
    assert injected(out) == [{"type": "InjectUserMessage", "content": "The caller pressed 7"}]


def test_a_dtmf_event_without_a_digit_is_bad_input_and_a_voicemail_ignores_keys() -> None:
    h = ready()
    h.twilio(json.dumps({"event": "dtmf", "streamSid": "x", "dtmf": {"digit": "12"}}))
    assert h.call.bad_input == {"twilio:bad-dtmf": 1}
    v = Harness()
    v.open({"bridge_mode": "voicemail"})
    assert injected([*v.twilio(dtmf_frame("1")), *v.twilio(dtmf_frame("#"))]) == []


# ========================================================================================== silence


def test_silence_brings_a_reprompt_then_a_goodbye_then_the_call_ends_as_caller_silent() -> None:
    h = ready(**IDLE)
    assert h.armed[Timer.IDLE] == 10.0
    out = h.fire(Timer.IDLE)
    assert injected(out) == [{"type": "InjectAgentMessage", "message": h.settings.caller_lines.idle_reprompt}]
    assert Record("idle_reprompt", {"seconds": 10.0}) in out
    # The agent says the re-prompt; the silence clock restarts once the caller has heard it.
    h.at(11.0)
    mark = h.turn(800)
    assert Timer.IDLE not in h.armed  # the agent is speaking the re-prompt: no silence clock
    h.at(12.0).echo(mark)
    assert h.armed[Timer.IDLE] == 42.0
    out = h.fire(Timer.IDLE)
    assert injected(out) == [{"type": "InjectAgentMessage", "message": h.settings.caller_lines.idle_goodbye}]
    assert Record("idle_hangup", {"seconds": 30.0}) in out and h.hangups == []
    goodbye = h.at(43.0).turn(800)
    assert goodbye.startswith("end-call")
    h.at(45.0).echo(goodbye)
    assert h.hangups == [hang_up("caller silent")]
    assert h.call.summary()["idle_reprompts"] == 1


@pytest.mark.parametrize("loss", ["drop", "error"])
def test_a_session_lost_mid_turn_marks_the_turn_so_the_silence_clock_goes_on(loss: str) -> None:
    """No AgentAudioDone comes for a turn whose session was lost: the clock must not wait for one."""
    h = ready(**IDLE)
    h.at(5.0).agent(STARTED)
    h.speak(b"\x10" * 800)
    if loss == "drop":
        out = h.agent_closed(1011)
    else:
        out = h.agent({"type": "Error", "code": "INTERNAL", "description": "oops"})
    [mark] = of(out, MarkCaller)  # what the lost session had said is marked where it ends
    h.at(6.0).resume_ready()
    assert Timer.IDLE not in h.armed  # Twilio may still be playing it
    h.at(7.0).echo(mark.name)
    assert h.armed[Timer.IDLE] == 17.0
    assert injected(h.fire(Timer.IDLE)) == [{"type": "InjectAgentMessage", "message": h.settings.caller_lines.idle_reprompt}]


def test_the_goodbye_ends_the_call_even_if_it_is_never_heard() -> None:
    h = ready(**IDLE)
    h.fire(Timer.IDLE)
    h.fire(Timer.IDLE)  # the re-prompt never played: the clock held from it
    h.fire(Timer.HANGUP_FALLBACK)
    assert h.hangups == [hang_up("caller silent (goodbye not confirmed)")]


def test_caller_speech_or_keys_restart_the_silence_clock_from_the_first_stage() -> None:
    h = ready(**IDLE)
    h.fire(Timer.IDLE)  # re-prompted at 10
    h.at(15.0).agent({"type": "UserStartedSpeaking"})
    assert h.armed[Timer.IDLE] == 25.0  # a re-prompt again, not the goodbye
    h.at(20.0).agent({"type": "ConversationText", "role": "user", "content": "hmm"})
    assert h.armed[Timer.IDLE] == 30.0
    h.at(21.0).twilio(dtmf_frame("3"))
    assert h.armed[Timer.IDLE] == 31.0
    out = h.fire(Timer.IDLE)
    assert injected(out) == [  # the key's digits (their own timer came first), then a re-prompt, not the goodbye
        {"type": "InjectUserMessage", "content": "The caller pressed 3"},
        {"type": "InjectAgentMessage", "message": h.settings.caller_lines.idle_reprompt},
    ]


def test_no_reprompt_while_the_agent_speaks_or_a_function_runs() -> None:
    h = ready(**IDLE)
    h.at(1.0).agent(STARTED)
    assert Timer.IDLE not in h.armed
    h.speak(b"\x10" * 8000)
    [mark] = of(h.agent(DONE), MarkCaller)  # the mark sent after the turn
    assert Timer.IDLE not in h.armed  # still playing at Twilio
    h.at(3.0).echo(mark.name)
    assert h.armed[Timer.IDLE] == 13.0
    h.at(4.0).agent(request(("f1", "get_drug_info", {"drug_name": "x"})))
    assert Timer.IDLE not in h.armed
    assert injected(h.advance_to(100.0)) == [] and Timer.IDLE not in h.armed  # nothing while it runs
    h.finished("f1", ok({"name": "x"}))
    assert h.armed[Timer.IDLE] == 110.0


def test_zero_turns_the_silence_clock_off() -> None:
    h = ready(idle_reprompt_seconds=0.0)
    assert Timer.IDLE not in h.armed
    h.agent({"type": "UserStartedSpeaking"})
    assert not any(isinstance(a, (ArmTimer, CancelTimer)) and a.timer is Timer.IDLE for a in h.actions)


def test_caller_speaking_during_the_idle_goodbye_keeps_the_call_up() -> None:
    h = ready(**IDLE)
    h.fire(Timer.IDLE)
    h.fire(Timer.IDLE)
    h.at(h.now + 0.5).agent(STARTED)
    out = h.agent({"type": "UserStartedSpeaking"})
    assert Record("hangup_cancelled", {"reason": "the caller spoke during the goodbye"}) in out
    assert Timer.HANGUP_FALLBACK not in h.armed and h.armed[Timer.IDLE] == h.now + 10.0
    assert h.call.phase is Phase.CONVERSING and h.hangups == []


# ======================================================================================= injections


def test_a_refused_injection_is_retried_once_after_the_agent_has_spoken_and_never_in_a_loop() -> None:
    h = ready()
    h.twilio(dtmf_frame("2"))
    h.twilio(dtmf_frame("#"))
    out = h.agent({"type": "InjectionRefused", "message": "user is speaking"})
    assert Record("injection_refused", {"kind": "keypad", "retry": True}) in out and injected(out) == []
    h.agent(STARTED)
    h.speak(b"\x10" * 80)
    out = h.agent(DONE)
    assert injected(out) == [{"type": "InjectUserMessage", "content": "The caller pressed 2"}]
    out = h.agent({"type": "InjectionRefused", "message": "still busy"})
    assert Record("injection_refused", {"kind": "keypad", "retry": False}) in out
    h.agent(STARTED)
    h.speak(b"\x10" * 80)
    assert injected(h.agent(DONE)) == []


def test_a_refused_reprompt_is_dropped_if_the_caller_spoke_meanwhile() -> None:
    h = ready(**IDLE)
    h.fire(Timer.IDLE)
    h.agent({"type": "InjectionRefused", "message": "user is speaking"})
    h.agent({"type": "UserStartedSpeaking"})
    h.agent(STARTED)
    h.speak(b"\x10" * 80)
    assert injected(h.agent(DONE)) == []


def test_a_refusal_with_nothing_injected_is_only_logged() -> None:
    h = ready()
    assert quiet(h.agent({"type": "InjectionRefused", "message": "?"})) == []


# ========================================================================== History and resume


def user(text: str) -> dict[str, Any]:
    return {"type": "History", "role": "user", "content": text}


def resume_settings(h: Harness) -> dict[str, Any]:
    h.agent_closed(1011)
    h.agent_connected()
    [settings] = [m for m in sent_to_agent(h.agent(WELCOME)) if isinstance(m, dict)]
    return settings


def test_resume_history_prefers_deepgrams_history_and_includes_server_side_calls() -> None:
    h = ready()
    h.agent({"type": "ConversationText", "role": "user", "content": "Do you have aspirin?"})
    h.agent(user("Do you have aspirin?"))  # the same turn, from Deepgram: not twice
    server_side = {
        "type": "History",
        "function_calls": [
            {"id": "s1", "name": "weather", "client_side": False, "arguments": "{}", "response": "sunny", "extra": 1}
        ],
    }
    h.agent(server_side)
    h.agent({"type": "History", "role": "assistant", "content": "Yes, we do."})
    h.agent({"type": "ConversationText", "role": "assistant", "content": "Yes, we do."})
    messages = resume_settings(h)["agent"]["context"]["messages"]
    assert messages == [
        {"type": "History", "role": "assistant", "content": "(configured)"},
        {"type": "History", "role": "user", "content": "Do you have aspirin?"},
        {
            "type": "History",
            "function_calls": [{"id": "s1", "name": "weather", "client_side": False, "arguments": "{}", "response": "sunny"}],
        },
        {"type": "History", "role": "assistant", "content": "Yes, we do."},
    ]


def test_the_bridges_own_items_fill_in_where_deepgrams_history_is_missing() -> None:
    h = ready()
    h.agent({"type": "ConversationText", "role": "user", "content": "Order two."})
    h.agent(request(("f1", "place_order", {"quantity": 2})))
    h.finished("f1", ok({"order_id": 7}))
    messages = resume_settings(h)["agent"]["context"]["messages"]
    assert messages[1:] == [
        {"type": "History", "role": "user", "content": "Order two."},
        {
            "type": "History",
            "function_calls": [
                {"id": "f1", "name": "place_order", "client_side": True, "arguments": '{"quantity": 2}', "response": '{"order_id": 7}'}
            ],
        },
    ]


def test_deepgrams_copy_of_a_client_side_call_replaces_ours_even_grouped() -> None:
    h = ready()
    h.agent(request(("f1", "get_drug_info", {}), ("f2", "get_drug_info", {})))
    h.finished("f1", ok({"a": 1}))
    h.finished("f2", ok({"b": 2}))
    calls = [
        {"id": "f1", "name": "get_drug_info", "client_side": True, "arguments": "{}", "response": '{"a": 1}', "thought_signature": "sig"},
        {"id": "f2", "name": "get_drug_info", "client_side": True, "arguments": "{}", "response": '{"b": 2}'},
    ]
    h.agent({"type": "History", "function_calls": calls})
    messages = resume_settings(h)["agent"]["context"]["messages"]
    assert messages[1:] == [{"type": "History", "function_calls": calls}]


def test_echoes_of_the_context_a_session_was_given_are_not_new_history() -> None:
    h = ready()
    h.agent(user("first"))
    h.agent({"type": "ConversationText", "role": "user", "content": "first"})
    h.agent_closed(1011)
    h.resume_ready()
    # The new session repeats what it was given, then the conversation goes on.
    h.agent({"type": "History", "role": "assistant", "content": "(configured)"})
    h.agent(user("first"))
    h.agent(user("second"))
    assert [json.loads(item).get("content") for item in h.call.history.items()] == ["first", "second"]


def test_a_malformed_history_message_is_bad_input() -> None:
    h = ready()
    h.agent({"type": "History", "role": 3})
    h.agent({"type": "History", "function_calls": [{"id": "x"}]})
    # An id past the bound a FunctionCallRequest's has too: it would key the history unbounded.
    long_id = {"id": "x" * 257, "name": "n", "client_side": False, "arguments": "{}", "response": "r"}
    h.agent({"type": "History", "function_calls": [long_id]})
    h.agent({"type": "History", "function_calls": [{**long_id, "id": "x" * 256}]})  # at the bound: kept
    assert h.call.bad_input == {"deepgram:bad-history": 3}
    assert len(h.call.history) == 1  # only the one at the bound


def test_resumed_settings_from_history_validate_against_the_sdk() -> None:
    from sdk_oracle import assert_valid_client_message

    h = ready()
    h.agent(user("hello"))
    h.agent({"type": "History", "function_calls": [{"id": "s", "name": "n", "client_side": False, "arguments": "{}", "response": "r"}]})
    settings = resume_settings(h)
    messages = settings["agent"]["context"]["messages"]
    assert [m.get("content") or m["function_calls"][0]["id"] for m in messages[1:]] == ["hello", "s"]  # after config's own
    assert_valid_client_message(settings)  # walking model_extra: no key the SDK doesn't know, at any depth


# ===================================================================================== diagnostics


def test_latency_reports_are_recorded_and_sent_to_the_browser_phone() -> None:
    h = ready(browser=True)
    report = {"type": "LatencyReport", "stt_latency": 0.1, "ttt_text_latency": 0.4, "total_latency": 0.9, "tts_latency": "x"}
    out = h.agent(report)
    figures = {key: None for key in agent_protocol.LATENCY_REPORT_FIELDS} | {
        "stt_latency": 0.1,
        "ttt_text_latency": 0.4,
        "total_latency": 0.9,
    }
    assert Record("latency_report", figures) in out
    [browser] = [json.loads(a.text) for a in of(out, SendToCaller)]
    assert browser == {"event": "latency_report", **figures}
    assert h.call.summary()["latency_reports"] == 1


def test_each_sessions_request_id_is_logged_recorded_and_summarised() -> None:
    h = ready()
    h.agent_closed(1011)
    h.agent_connected()
    out = h.agent({"type": "Welcome", "request_id": "req-2"})
    assert Record("agent_session", {"request_id": "req-2"}) in out
    assert any(isinstance(a, Log) and a.args == ("req-2",) for a in out)
    assert h.call.summary()["agent_request_ids"] == ["req-1", "req-2"]
