"""Every message the bridge sends to Deepgram, checked against deepgram-sdk 7.17.0's models.

Each goes through ``assert_valid_client_message`` (tests/sdk_oracle.py): the SDK model picked by
``type`` must accept it, with no extra key at any depth. The builders of bridge/agent_protocol.py
are checked directly, and the call's state machine is driven (tests/test_call.py's harness)
through every path that sends text to the agent, so a message built inline is caught too.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import agent_protocol
from bridge.agent_protocol import FunctionCall, function_call_response, history_function_call, history_text
from bridge.call import Call, SendToAgent, Timer
from bridge.config import load_agent_config
from conftest import ROOT
from sdk_oracle import CLIENT_MESSAGE_MODELS, assert_valid_client_message, sdk_problem
from test_call import REST, Harness, catalog_of, dtmf_frame, outcome, request, text

CONFIG = load_agent_config(ROOT / "config.json", {}).settings
CALL = FunctionCall(id="f1", name="get_drug_info", arguments='{"drug_name": "ibuprofen"}')


def test_the_oracle_fails_on_an_extra_key_at_any_depth_and_on_unknown_types() -> None:
    assert sdk_problem({"type": "KeepAlive"}) is None
    assert "unknown keys ['extra']" in (sdk_problem({"type": "KeepAlive", "extra": 1}) or "")
    deep = json.loads(agent_protocol.settings_message(CONFIG, []))
    deep["agent"]["think"]["functions"][0]["parameters"]["properties"]["x"] = {"free": "JSON Schema is free-form"}
    assert sdk_problem(deep) is None
    deep["agent"]["think"]["functions"][0]["endpoint"] = {"url": "https://x", "verb": "POST"}
    assert "agent.think.functions[0].endpoint.verb" in (sdk_problem(deep) or "")
    assert "not a message a client sends" in (sdk_problem({"type": "SettingsApplied"}) or "")
    assert "FunctionCallResponse" in (sdk_problem({"type": "FunctionCallResponse", "id": "1", "name": "f"}) or "")
    # InjectAgentMessage has two shapes in the SDK; either one will do, nothing beyond them.
    assert sdk_problem({"type": "InjectAgentMessage", "message": "One moment."}) is None
    assert sdk_problem({"type": "InjectAgentMessage", "message": "x", "is_dynamic": True}) is not None
    assert set(CLIENT_MESSAGE_MODELS) >= {"Settings", "FunctionCallResponse", "KeepAlive", "InjectUserMessage", "InjectAgentMessage"}


def test_the_builders_make_valid_messages() -> None:
    assert_valid_client_message(agent_protocol.KEEPALIVE)
    assert_valid_client_message(agent_protocol.settings_message(CONFIG, []))
    assert_valid_client_message(json.dumps(agent_protocol.with_greeting(CONFIG, "Please call us back.")))
    assert_valid_client_message(function_call_response(CALL, json.dumps({"price": 8.99})))
    history = [history_text("assistant", "Hello!"), history_text("user", "Ibuprofen?"), history_function_call(CALL, '{"price": 8.99}')]
    resumed = agent_protocol.settings_message(CONFIG, history)
    assert_valid_client_message(resumed)
    assert len(json.loads(resumed)["agent"]["context"]["messages"]) == 3
    assert_valid_client_message(agent_protocol.inject_user_message("The caller pressed 1 2 3 4"))
    assert_valid_client_message(agent_protocol.inject_agent_message("Are you still there?"))
    # A resume built from Deepgram's own History items (a server-side call, a thought_signature).
    server_side = {"type": "History", "function_calls": [
        {"id": "s1", "name": "stock", "client_side": False, "arguments": "{}", "response": "yes", "thought_signature": "t"}
    ]}
    parsed = agent_protocol.history_item(server_side, 8000)
    assert parsed is not None
    assert_valid_client_message(agent_protocol.settings_message(CONFIG, [*history, parsed[1]]))


def test_a_saved_agent_is_sent_as_its_id_on_resume_and_for_voicemail() -> None:
    saved = {**CONFIG, "agent": "0f1e2d3c-saved-agent"}
    history = [history_text("user", "Hello?")]
    for message in (agent_protocol.settings_message(saved, history), json.dumps(agent_protocol.with_greeting(saved, "Call us."))):
        assert_valid_client_message(message)
        assert json.loads(message)["agent"] == "0f1e2d3c-saved-agent"


def test_history_is_added_to_a_context_or_messages_given_as_null() -> None:
    history = [history_text("user", "Hello?")]
    for context in (None, {"messages": None}, {}):
        config = {**CONFIG, "agent": {**CONFIG["agent"], "context": context}}
        resumed = agent_protocol.settings_message(config, history)
        assert_valid_client_message(resumed)
        assert json.loads(resumed)["agent"]["context"]["messages"] == [json.loads(history[0])]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["user", "assistant"]), st.text()).map(lambda item: history_text(*item)),
            st.tuples(st.text(min_size=1), st.text(min_size=1), st.text(), st.text()).map(
                lambda item: history_function_call(FunctionCall(item[0], item[1], item[2]), item[3])
            ),
        ),
        max_size=5,
    ),
    st.text(),
)
def test_resumed_settings_and_answers_are_valid_whatever_the_conversation_held(history: list[str], content: str) -> None:
    assert_valid_client_message(agent_protocol.settings_message(CONFIG, history))
    assert_valid_client_message(function_call_response(FunctionCall("id-1", "any_name", "{}"), content))


def config_harness(**overrides: Any) -> Harness:
    """tests/test_call.py's harness, with the real config.json as the agent's settings."""
    harness = Harness(**overrides)
    harness.call = Call(harness.settings, catalog_of(CONFIG), frozenset(), browser=False)
    return harness


def sent_text(harness: Harness) -> list[str]:
    return [action.data for action in harness.actions if isinstance(action, SendToAgent) and isinstance(action.data, str)]


def test_every_text_the_call_sends_to_the_agent_is_valid() -> None:
    sent: list[str] = []

    # A conversation: Settings, answers to functions (one failing), end_call, KeepAlive, a resume.
    h = config_harness(keepalive_seconds=5.0)
    h.open()
    h.agent(text("assistant", "Thank you for calling."))
    h.agent(text("user", "Do you have ibuprofen?"))
    h.agent(request(("f1", "get_drug_info", {"drug_name": "ibuprofen"}), ("f2", "lookup_order", {"order_id": "x"})))
    h.finished("f1", outcome({"price": 8.99}))
    h.finished("f2", outcome(error="no such order"))
    h.fire_next()  # KeepAlive: no audio went out
    h.agent_closed(1011)
    h.resume_ready()
    h.agent(request(("e1", "end_call", {})))
    sent += sent_text(h)

    # A voicemail stream: its own Settings.
    v = config_harness()
    v.open({"bridge_mode": "voicemail"})
    sent += sent_text(v)

    # A transfer that fails: the agent is told to say so.
    t = config_harness(**REST)
    t.open()
    t.agent(request(("t1", "transfer_call", {"reason": "pharmacist"})))
    t.advance(2.0)
    t.take(t.call.transfer_finished("Twilio said 400", t.now))
    sent += sent_text(t)

    # Keypad digits, then a silent caller: re-prompted, then the goodbye.
    k = config_harness(idle_reprompt_seconds=10.0, idle_hangup_seconds=30.0)
    k.open()
    k.twilio(dtmf_frame("1"))
    k.twilio(dtmf_frame("#"))
    k.fire(Timer.IDLE)
    k.fire(Timer.IDLE)
    keypad_and_idle = [json.loads(message) for message in sent_text(k)][1:]  # after its Settings
    assert [m["type"] for m in keypad_and_idle] == ["InjectUserMessage", "InjectAgentMessage", "InjectAgentMessage"]
    sent += sent_text(k)

    for message in sent:
        assert_valid_client_message(message)
    kinds = [json.loads(message)["type"] for message in sent]
    assert set(kinds) == {"Settings", "FunctionCallResponse", "KeepAlive", "InjectAgentMessage", "InjectUserMessage"}, kinds
    resumed = [json.loads(m) for m in sent if json.loads(m)["type"] == "Settings" and "context" in json.loads(m)["agent"]]
    assert resumed and len(resumed[0]["agent"]["context"]["messages"]) == 4  # two turns, two function calls
    assert kinds.count("FunctionCallResponse") == 4  # f1, f2, end_call, transfer_call


def test_config_json_as_loaded_and_sent_is_valid() -> None:
    assert_valid_client_message(CONFIG)
    assert "language" not in CONFIG["agent"]
