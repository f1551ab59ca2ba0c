"""What of a caller's words leaves the call: ``STORE_TRANSCRIPTS`` = full | redacted | none.

Every place the words can go from here (the call record, the webhook payload, which is built from
the record's events, and every log line) takes them through one ``TranscriptPolicy``:

==========  ====================================================================================
full        as said (today's behaviour)
redacted    through bridge/redaction.py: runs of digits, numbers said as words, e-mail addresses,
            and every value of a function parameter the agent's file marks ``"sensitive": true``
none        no transcript, no function arguments, results or errors, no custom parameter values:
            counts, times, function names and outcomes, ``ended_by`` only
==========  ====================================================================================

Keypad digits are never stored in any mode (keypad.py). The browser phone's own page shows the
caller what they said whatever the mode: it is their screen, not a store. The conversation kept
for a resumed agent session stays in memory and goes only to Deepgram, which heard it anyway.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from ..redaction import MARKER, redact_arguments, redact_result, redact_text, redact_value


class TranscriptStorage(enum.Enum):
    FULL = "full"
    REDACTED = "redacted"
    NONE = "none"


class TranscriptPolicy:
    __slots__ = ("storage", "_sensitive")

    def __init__(self, storage: TranscriptStorage, sensitive: Mapping[str, frozenset[str]] | None = None) -> None:
        self.storage = storage
        self._sensitive = sensitive or {}  # function name -> parameters declared sensitive

    @property
    def keeps_turns(self) -> bool:
        """Transcript lines are recorded at all."""
        return self.storage is not TranscriptStorage.NONE

    def turn(self, text: str) -> str:
        """A turn's text as records and logs may hold it (only asked when ``keeps_turns``)."""
        return redact_text(text) if self.storage is TranscriptStorage.REDACTED else text

    def log_turn(self, text: str) -> str:
        if self.storage is TranscriptStorage.NONE:
            return f"({len(text)} characters, not logged: STORE_TRANSCRIPTS=none)"
        return self.turn(text)

    def reason(self, text: str | None) -> str | None:
        """Words the model wrote about the caller (a transfer's reason)."""
        if text is None or self.storage is TranscriptStorage.FULL:
            return text
        return redact_text(text) if self.storage is TranscriptStorage.REDACTED else None

    def function_fields(self, name: str, arguments: str, result: Any, error: str | None) -> dict[str, Any]:
        """A function call's arguments, result and error, as records may hold them."""
        if self.storage is TranscriptStorage.FULL:
            return {"arguments": arguments, "result": result, "error": error}
        if self.storage is TranscriptStorage.NONE:
            return {"arguments": None, "result": None, "error": None if error is None else MARKER}
        sensitive = self._sensitive.get(name, frozenset())
        return {
            "arguments": redact_arguments(arguments, sensitive),
            "result": redact_result(result, sensitive),
            "error": None if error is None else redact_text(error),
        }

    def parameters(self, parameters: Mapping[str, str]) -> dict[str, Any]:
        """A stream's custom parameters (the caller's number among them): names always, values as the mode says."""
        if self.storage is TranscriptStorage.FULL:
            return dict(parameters)
        if self.storage is TranscriptStorage.NONE:
            return dict.fromkeys(parameters, MARKER)
        redacted = redact_value(dict(parameters))
        return redacted if isinstance(redacted, dict) else {}
