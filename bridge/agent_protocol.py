"""The Deepgram Voice Agent API v1 messages, as plain functions with no I/O.

Building what we send (Settings, FunctionCallResponse, KeepAlive) and reading what the agent
sends (PROTOCOLS.md section 5). Audio is binary and never passes through here.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

KEEPALIVE = '{"type":"KeepAlive"}'


class AgentProtocolError(ProtocolError):
    """A text frame from the Deepgram agent we cannot use."""


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """One client-side entry of a ``FunctionCallRequest``."""

    id: str
    name: str
    arguments: str  # still JSON text: parsing it is the runner's job, so errors become answers


def parse_message(text: str) -> dict[str, Any]:
    """Parse a text frame from the agent; every valid one is an object with a string ``type``."""
    try:
        message = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise AgentProtocolError("not-json", "a text frame from Deepgram is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise AgentProtocolError("no-type", "a frame from Deepgram has no \"type\"")
    return message


def settings_message(settings: dict[str, Any], history: list[str]) -> str:
    """The Settings message: config.json, with the conversation so far preloaded when resuming.

    ``history`` holds items made by ``history_text`` and ``history_function_call``.
    """
    if not history:
        return json.dumps(settings)
    resumed = copy.deepcopy(settings)
    # The caller has been greeted already; a resumed session carries on mid-conversation.
    resumed["agent"].pop("greeting", None)
    context = resumed["agent"].setdefault("context", {})
    context["messages"] = list(context.get("messages", [])) + [json.loads(item) for item in history]
    return json.dumps(resumed)


# History items are kept as their JSON text: a call holds one per turn and function call for as
# long as it lasts, and text takes half the memory of the dicts and is no work for the collector.


def history_text(role: str, content: str) -> str:
    return json.dumps({"type": "History", "role": role, "content": content})


def history_function_call(call: FunctionCall, response: str) -> str:
    item = {"id": call.id, "name": call.name, "client_side": True, "arguments": call.arguments, "response": response}
    return json.dumps({"type": "History", "function_calls": [item]})


def function_call_response(call: FunctionCall, content: str) -> str:
    return json.dumps({"type": "FunctionCallResponse", "id": call.id, "name": call.name, "content": content})


def client_side_calls(message: dict[str, Any]) -> list[FunctionCall]:
    """The entries of a ``FunctionCallRequest`` that we must answer (``client_side: true``)."""
    calls = []
    for entry in message.get("functions") or []:
        if not isinstance(entry, dict) or entry.get("client_side") is not True:
            continue
        call_id, name = entry.get("id"), entry.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            continue
        arguments = entry.get("arguments", "{}")
        if not isinstance(arguments, str):
            # Tolerate an already-decoded object; the runner expects the JSON text.
            arguments = json.dumps(arguments)
        calls.append(FunctionCall(id=call_id, name=name, arguments=arguments))
    return calls


def cancelled_ids(message: dict[str, Any]) -> list[str]:
    """The function call ids a ``FunctionCallCancelled`` withdraws."""
    return [
        entry["id"]
        for entry in message.get("functions") or []
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]
