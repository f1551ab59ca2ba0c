"""The protocol functions, tested directly: no sockets, no event loop."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import twilio
from bridge.agent_protocol import (
    AgentProtocolError,
    cancelled_ids,
    client_side_calls,
    function_call_response,
    parse_message,
    FunctionCall,
)


def slow_media_payload(text: str) -> bytes | None:
    try:
        event, message = twilio.parse_event(text)
        return twilio.media_payload(message) if event == "media" else None
    except twilio.TwilioProtocolError:
        return None


extra_values = st.one_of(st.text(max_size=20), st.integers(), st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))


@given(
    audio=st.binary(max_size=400),
    extras=st.dictionaries(st.sampled_from(["sequenceNumber", "streamSid", "track", "x\\\"y"]), extra_values, max_size=3),
    media_extras=st.dictionaries(st.sampled_from(["track", "chunk", "timestamp", "note"]), extra_values, max_size=3),
    compact=st.booleans(),
    payload_first=st.booleans(),
)
def test_fast_media_path_agrees_with_the_full_parse(
    audio: bytes, extras: dict[str, Any], media_extras: dict[str, Any], compact: bool, payload_first: bool
) -> None:
    payload = base64.b64encode(audio).decode()
    media = {"payload": payload, **media_extras} if payload_first else {**media_extras, "payload": payload}
    text = json.dumps({"event": "media", **extras, "media": media}, separators=(",", ":") if compact else None)
    fast = twilio.fast_media_payload(text)
    assert fast == audio
    assert slow_media_payload(text) == audio


@pytest.mark.parametrize(
    "text",
    [
        '{"event":"media","media":{"payload":"AAA\\u0041"}}',  # an escape: full parse needed
        '{"event":"media","media":{"payload":"%%%"}}',  # not base64
        '{"event":"media","media":{"payload":"AAAA"',  # truncated
        '{"event":"media","x":{"payload":"AAAA"},"media":{"payload":"BBBB"}}',  # two payload keys
        '{"event":"mark","mark":{"name":"payload"}}',
        '{"event":"media","media":{"payload":1}}',
    ],
)
def test_fast_media_path_declines_anything_unusual(text: str) -> None:
    assert twilio.fast_media_payload(text) is None


def test_fast_media_path_with_odd_spacing_still_agrees() -> None:
    text = '{"event":"media","media":{"payload":"AAAA" , "z": "}"}}'
    assert twilio.fast_media_payload(text) == slow_media_payload(text) == b"\x00\x00\x00"


def test_twilio_events_are_parsed_defensively() -> None:
    start = twilio.parse_start({"event": "start", "start": {"streamSid": "MZ1", "callSid": "CA1", "customParameters": {"a": 1}}})
    assert start == twilio.StreamStart("MZ1", "CA1", "", {"a": "1"})
    assert twilio.parse_start({"event": "start", "streamSid": "MZ2"}).call_sid == "MZ2"
    with pytest.raises(twilio.TwilioProtocolError) as missing:
        twilio.parse_start({"event": "start", "start": {}})
    assert missing.value.kind == "bad-start"
    for text, kind in [("nope", "not-json"), ("[1]", "not-object"), ('{"x":1}', "no-event"), ("[" * 5000, "not-json")]:
        with pytest.raises(twilio.TwilioProtocolError) as error:
            twilio.parse_event(text)
        assert error.value.kind == kind
    with pytest.raises(twilio.TwilioProtocolError) as bad:
        twilio.media_payload({"media": {"payload": "!!"}})
    assert bad.value.kind == "bad-base64"
    assert twilio.mark_name({"mark": {"name": "n"}}) == "n" and twilio.mark_name({"mark": 5}) is None


def test_outbound_twilio_messages_are_exact_json() -> None:
    out = twilio.TwilioOutbound('MZ"odd')
    assert json.loads(out.media(b"\x00\xff")) == {"event": "media", "streamSid": 'MZ"odd', "media": {"payload": "AP8="}}
    assert json.loads(out.clear()) == {"event": "clear", "streamSid": 'MZ"odd'}
    assert json.loads(out.mark("end-call")) == {"event": "mark", "streamSid": 'MZ"odd', "mark": {"name": "end-call"}}


def test_agent_messages() -> None:
    assert parse_message('{"type":"Welcome","request_id":"r"}')["type"] == "Welcome"
    for bad in ("x", "[]", '{"type": 3}'):
        with pytest.raises(AgentProtocolError):
            parse_message(bad)
    request = {
        "type": "FunctionCallRequest",
        "functions": [
            {"id": "a", "name": "f", "arguments": '{"x": 1}', "client_side": True},
            {"id": "b", "name": "g", "arguments": "{}", "client_side": False},
            {"id": "c", "name": "h", "arguments": {"y": 2}, "client_side": True},
            "junk",
            {"id": 5, "name": "i", "client_side": True},
        ],
    }
    assert client_side_calls(request) == ([FunctionCall("a", "f", '{"x": 1}'), FunctionCall("c", "h", '{"y": 2}')], 2)
    for functions in (None, 5, True, "x", {"id": "a"}):
        with pytest.raises(AgentProtocolError):
            client_side_calls({"type": "FunctionCallRequest", "functions": functions})
        with pytest.raises(AgentProtocolError):
            cancelled_ids({"type": "FunctionCallCancelled", "functions": functions})
    long_id = {"id": "x" * 257, "name": "f", "client_side": True}
    assert client_side_calls({"type": "FunctionCallRequest", "functions": [long_id]}) == ([], 1)
    assert cancelled_ids({"type": "FunctionCallCancelled", "functions": [{"id": "a"}, None, {"name": "x"}]}) == ["a"]
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(AgentProtocolError):
            parse_message(f'{{"type":"AgentStartedSpeaking","total_latency":{constant}}}')
    response = json.loads(function_call_response(FunctionCall("a", "f", "{}"), '{"ok": true}'))
    assert response == {"type": "FunctionCallResponse", "id": "a", "name": "f", "content": '{"ok": true}'}


# Any text, surrogates included: json.dumps writes each one as its "\udXXX" escape.
text_with_surrogates = st.text(st.characters(codec=None, categories=["Cs", "L", "N", "P", "Zs"]), max_size=8)
json_values = st.recursive(
    st.none() | st.integers() | text_with_surrogates,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_with_surrogates, inner, max_size=3),
    max_leaves=12,
)


def without_lone_surrogates(value: Any) -> Any:
    """The oracle: the same value, each surrogate code point replaced by U+FFFD, however deep."""
    if isinstance(value, str):
        return "".join("\ufffd" if 0xD800 <= ord(char) <= 0xDFFF else char for char in value)
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(key): without_lone_surrogates(item) for key, item in value.items()}
    return value


@given(value=json_values)
def test_both_codecs_hand_on_only_valid_unicode(value: Any) -> None:
    """A lone surrogate anywhere in a peer's frame (a key, a nested value) becomes U+FFFD."""
    twilio_text = json.dumps({"event": "start", "x": value})
    agent_text = json.dumps({"type": "ConversationText", "x": value})
    for message, text in ((twilio.parse_event(twilio_text)[1], twilio_text), (parse_message(agent_text), agent_text)):
        assert message == without_lone_surrogates(json.loads(text))
        json.dumps(message, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate


def test_a_valid_pair_of_surrogate_escapes_is_one_character_and_stays() -> None:
    assert twilio.parse_event('{"event":"x","e":"\\ud83d\\ude00\\ud800"}')[1]["e"] == "\U0001f600\ufffd"
    assert parse_message('{"type":"x","\\uDFFF":"\\\\ud800"}') == {"type": "x", "\ufffd": "\\ud800"}
