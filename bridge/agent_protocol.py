"""The Deepgram Voice Agent API v1 messages, as plain functions with no I/O.

Building what we send (Settings, FunctionCallResponse, KeepAlive, InjectUserMessage,
InjectAgentMessage) and reading what the agent sends (docs/protocols.md sections 5 and 6). Audio is binary and never passes through here.
Whatever shape a message has, reading it either succeeds or raises ``AgentProtocolError``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from . import jsontext
from .errors import ProtocolError

KEEPALIVE = '{"type":"KeepAlive"}'
# Deepgram's ids are short; a longer one is not a real request, and it would be echoed back.
MAX_FUNCTION_ID_CHARS = 256
MAX_FUNCTION_NAME_CHARS = 128
MAX_FUNCTION_ARGUMENTS_CHARS = 64 * 1024
LATENCY_REPORT_FIELDS = (
    "stt_latency",
    "ttt_token_latency",
    "ttt_text_latency",
    "ttt_tool_latency",
    "ttt_thinking_latency",
    "tts_latency",
    "total_latency",
)
CONTEXT_TEXT_CHARS = 1 << 20  # config.json's own context is not cut short
HISTORY_FUNCTION_CALL_KEYS = ("id", "name", "client_side", "arguments", "response")


class AgentProtocolError(ProtocolError):
    """A text frame from the Deepgram agent we cannot use."""


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One client-side entry of a ``FunctionCallRequest``."""

    id: str
    name: str
    arguments: str  # still JSON text: parsing it is the runner's job, so errors become answers
    # Some Gemini models identify a call by this too; it goes back with the call in the history.
    thought_signature: str | None = None


def _refuse_constant(name: str) -> Any:
    raise AgentProtocolError("non-finite-number", f"a frame from Deepgram holds {name}, which JSON does not allow")


_AGENT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def parse_message(text: str) -> dict[str, Any]:
    """Parse a text frame from the agent; every valid one is an object with a string ``type``.

    NaN and Infinity are refused: Python's json accepts them, but they are not JSON, and a
    record holding one could not be read back by a strict parser. A lone surrogate (``\\ud800``)
    in a string becomes U+FFFD, so every string handed on can be encoded as UTF-8.
    """
    try:
        message = jsontext.loads(text, _AGENT_DECODER)
    except (json.JSONDecodeError, RecursionError):
        raise AgentProtocolError("not-json", "a text frame from Deepgram is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise AgentProtocolError("no-type", "a frame from Deepgram has no \"type\"")
    return message


def settings_message(settings: dict[str, Any], history: list[str]) -> str:
    """The Settings message: config.json, with the conversation so far preloaded when resuming.

    ``history`` holds items made by ``history_text``, ``history_function_call`` and
    ``history_item``. An ``agent`` that is a saved agent's id can't be given a history.
    """
    if not history or not isinstance(settings.get("agent"), dict):
        return json.dumps(settings)
    resumed = copy.deepcopy(settings)
    # The caller has been greeted already; a resumed session carries on mid-conversation.
    resumed["agent"].pop("greeting", None)
    # null is allowed for both (v1 Settings table); it reads as absent.
    context = resumed["agent"]["context"] = resumed["agent"].get("context") or {}
    context["messages"] = list(context.get("messages") or []) + [json.loads(item) for item in history]
    return json.dumps(resumed)


def context_keys(settings: dict[str, Any]) -> list[str]:
    """The ``history_item`` keys of the messages config.json preloads (``agent.context.messages``)."""
    agent = settings.get("agent")
    context = agent.get("context") if isinstance(agent, dict) else None
    messages = context.get("messages") if isinstance(context, dict) else None
    if not isinstance(messages, list):
        return []
    keys = []
    for message in messages:
        parsed = history_item(message, CONTEXT_TEXT_CHARS) if isinstance(message, dict) else None
        if parsed is not None:
            keys.append(parsed[0])
    return keys


def with_greeting(settings: dict[str, Any], greeting: str) -> dict[str, Any]:
    """The Settings with ``greeting`` as the agent's greeting (a voicemail message; a notice first).

    A saved agent (``agent`` is its id) keeps its own greeting: it is returned unchanged, and the
    call injects the words instead.
    """
    if not isinstance(settings.get("agent"), dict):
        return settings
    changed = copy.deepcopy(settings)
    changed["agent"]["greeting"] = greeting
    return changed


def greeting_of(settings: dict[str, Any]) -> str | None:
    """The agent's greeting, if it has one the bridge can change."""
    agent = settings.get("agent")
    greeting = agent.get("greeting") if isinstance(agent, dict) else None
    return greeting if isinstance(greeting, str) and greeting.strip() else None


# History items are kept as their JSON text: a call holds one per turn and function call for as
# long as it lasts, and text takes half the memory of the dicts and is no work for the collector.


def history_text(role: str, content: str) -> str:
    return json.dumps({"type": "History", "role": role, "content": content})


def history_function_call(call: FunctionCall, response: str) -> str:
    item: dict[str, Any] = {
        "id": call.id, "name": call.name, "client_side": True, "arguments": call.arguments, "response": response
    }
    if call.thought_signature is not None:
        item["thought_signature"] = call.thought_signature
    return json.dumps({"type": "History", "function_calls": [item]})


def inject_user_message(content: str) -> str:
    """Text the agent takes as if the caller had said it (keypad digits)."""
    return json.dumps({"type": "InjectUserMessage", "content": content})


def inject_agent_message(message: str) -> str:
    """Text the agent says now (a re-prompt, a goodbye). The field is ``message``, not ``content``."""
    return json.dumps({"type": "InjectAgentMessage", "message": message})


def history_item(message: dict[str, Any], max_text_chars: int) -> tuple[str, str] | None:
    """A ``History`` message from Deepgram as ``(key, item JSON)``, or None if it isn't usable.

    The key says which turn or function calls the item is about, so the bridge's own copy of the
    same thing can be matched to it: a turn's item is its own key (ours is the same text), function
    calls are keyed ``f:<id>,<id>...``. Only the keys the v1 schema gives a History item are kept,
    so a resumed Settings stays valid.
    """
    role, content, calls = message.get("role"), message.get("content"), message.get("function_calls")
    if isinstance(role, str) and isinstance(content, str) and calls is None:
        item = history_text(*turn(role, content, max_text_chars))
        return item, item
    if isinstance(calls, list) and calls and role is None and content is None:
        items = []
        for entry in calls:
            if not isinstance(entry, dict):
                return None
            item = {key: entry.get(key) for key in HISTORY_FUNCTION_CALL_KEYS}
            if not _short_id_and_name(item["id"], item["name"]):
                return None
            if not isinstance(item["arguments"], str) or not isinstance(item["response"], str):
                return None
            if not isinstance(item["client_side"], bool) or len(item["arguments"]) > MAX_FUNCTION_ARGUMENTS_CHARS:
                return None
            item["response"] = item["response"][:MAX_FUNCTION_ARGUMENTS_CHARS]
            signature = _thought_signature(entry)
            if signature is not None:
                item["thought_signature"] = signature
            items.append(item)
        key = "f:" + ",".join(item["id"] for item in items)
        return key, json.dumps({"type": "History", "function_calls": items})
    return None


def turn(role: str, content: str, max_chars: int) -> tuple[str, str]:
    """A conversation turn as the bridge keeps it: ``user`` or ``assistant``, the text cut."""
    return ("user" if role == "user" else "assistant"), content[:max_chars]


def _short_id_and_name(call_id: Any, name: Any) -> bool:
    """A function call's id and name are strings of sane length (they key the history and logs)."""
    return (
        isinstance(call_id, str)
        and isinstance(name, str)
        and 0 < len(call_id) <= MAX_FUNCTION_ID_CHARS
        and 0 < len(name) <= MAX_FUNCTION_NAME_CHARS
    )


def _thought_signature(entry: dict[str, Any]) -> str | None:
    signature = entry.get("thought_signature")
    return signature if isinstance(signature, str) and len(signature) <= MAX_FUNCTION_ARGUMENTS_CHARS else None


def function_call_response(call: FunctionCall, content: str) -> str:
    return json.dumps({"type": "FunctionCallResponse", "id": call.id, "name": call.name, "content": content})


def _function_entries(message: dict[str, Any]) -> list[Any]:
    functions = message.get("functions")
    if not isinstance(functions, list):
        raise AgentProtocolError(
            "bad-functions", f"a {message['type']} whose \"functions\" is not a list"
        )
    return functions


def client_side_calls(message: dict[str, Any]) -> tuple[list[FunctionCall], int]:
    """The entries of a ``FunctionCallRequest`` that we must answer (``client_side: true``).

    Also returns how many entries were malformed (not an object, an id or name that is not a
    short string, arguments too long): those can't be answered and are counted as bad input.
    """
    calls = []
    malformed = 0
    for entry in _function_entries(message):
        if not isinstance(entry, dict):
            malformed += 1
            continue
        if entry.get("client_side") is not True:
            continue  # Deepgram runs it (it has an endpoint)
        call_id, name = entry.get("id"), entry.get("name")
        arguments = entry.get("arguments", "{}")
        if not isinstance(arguments, str):
            # Tolerate an already-decoded object; the runner expects the JSON text.
            arguments = json.dumps(arguments)
        if not _short_id_and_name(call_id, name) or len(arguments) > MAX_FUNCTION_ARGUMENTS_CHARS:
            malformed += 1
            continue
        calls.append(FunctionCall(id=call_id, name=name, arguments=arguments, thought_signature=_thought_signature(entry)))
    return calls, malformed


def cancelled_ids(message: dict[str, Any]) -> list[str]:
    """The function call ids a ``FunctionCallCancelled`` withdraws."""
    return [
        entry["id"]
        for entry in _function_entries(message)
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]
