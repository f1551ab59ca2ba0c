"""What the browser phone's page is told besides the audio: transcript, latencies, functions, the end.

A call from the browser phone gets a ``BrowserFeed``; a phone call gets ``NO_FEED``, which says
nothing. That is the one place the call decides whether its caller is a page.
"""

from __future__ import annotations

import json
from typing import Any

from ..agent_protocol import FunctionCall
from ..functions import FunctionOutcome
from .actions import Action, SendToCaller


class NoFeed:
    """A phone call: Twilio takes only Media Streams events."""

    peer = "Twilio"

    def transcript(self, role: str, content: str) -> list[Action]:
        return []

    def agent_latency(self, latencies: dict[str, float | None]) -> list[Action]:
        return []

    def latency_report(self, figures: dict[str, float | None]) -> list[Action]:
        return []

    def function_call(self, call: FunctionCall, outcome: FunctionOutcome) -> list[Action]:
        return []

    def call_ended(self, ended_by: str) -> list[Action]:
        return []


class BrowserFeed(NoFeed):
    """The browser phone: the page shows these events beside the audio."""

    peer = "the browser phone"

    def transcript(self, role: str, content: str) -> list[Action]:
        return _event("transcript", role=role, content=content)

    def agent_latency(self, latencies: dict[str, float | None]) -> list[Action]:
        return _event("agent_latency", **latencies)

    def latency_report(self, figures: dict[str, float | None]) -> list[Action]:
        return _event("latency_report", **figures)

    def function_call(self, call: FunctionCall, outcome: FunctionOutcome) -> list[Action]:
        return _event(
            "function_call",
            name=call.name,
            arguments=_json_or_text(call.arguments),
            result=json.loads(outcome.content),  # exactly what the agent was told
            duration_ms=round(outcome.duration_seconds * 1000, 1),
        )

    def call_ended(self, ended_by: str) -> list[Action]:
        return _event("call_ended", reason=ended_by)


NO_FEED = NoFeed()


def _event(event: str, /, **fields: Any) -> list[Action]:
    return [SendToCaller(json.dumps({"event": event, **fields}))]


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text
