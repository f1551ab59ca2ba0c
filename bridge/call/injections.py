"""Messages the bridge puts into the conversation: keypad digits, re-prompts, goodbyes, notices.

Deepgram refuses an ``Inject*`` message it can't take now (``InjectionRefused``, for example while
the caller is speaking). The newest refused one is sent again once, after the agent's next turn,
if it still makes sense then (the call says); a second refusal is logged and left. Injections
asked for before the agent session is ready wait for it, in order, up to a cap.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable

from ..logsafe import clean
from .actions import Action, Log, Record, SendToAgent
from ..call_events import RecordEvent

# Injections that may wait for the agent session (keypad entries pressed while it opens).
MAX_WAITING_INJECTIONS = 32


class Injection(enum.Enum):
    KEYPAD = "keypad"
    IDLE_REPROMPT = "idle-reprompt"
    IDLE_GOODBYE = "idle-goodbye"
    TRANSFER_FAILED = "transfer-failed"
    VOICEMAIL = "voicemail"
    RECORDING_NOTICE = "recording-notice"
    TRANSFER_CONNECTING = "transfer-connecting"
    TRANSFER_DECLINED = "transfer-declined"


# Injections whose refusal their owner handles itself (the recording machine says the notice again).
NOT_RETRIED = frozenset({Injection.RECORDING_NOTICE})


class Injections:
    __slots__ = ("_last", "_retry", "_retried", "_waiting")

    def __init__(self) -> None:
        self._last: tuple[Injection, str] | None = None
        self._retry: tuple[Injection, str] | None = None
        self._retried = False
        self._waiting: list[tuple[Injection, str]] = []

    def send(self, kind: Injection, message: str) -> list[Action]:
        self._last = (kind, message)
        self._retried = False
        return [SendToAgent(message)]

    def wait_for_agent(self, kind: Injection, message: str) -> None:
        if len(self._waiting) < MAX_WAITING_INJECTIONS:
            self._waiting.append((kind, message))

    def agent_ready(self) -> list[Action]:
        waiting, self._waiting = self._waiting, []
        actions: list[Action] = []
        for kind, message in waiting:
            actions += self.send(kind, message)
        return actions

    @property
    def last_kind(self) -> Injection | None:
        """What the newest injection was: an InjectionRefused is about that one."""
        return self._last[0] if self._last is not None else None

    def refused(self, why: str | None) -> list[Action]:
        last, self._last = self._last, None
        reason = clean(why, 200)
        if last is None:
            return [Log(logging.DEBUG, "Deepgram refused an injection: %s", (reason,))]
        kind = last[0]
        if kind in NOT_RETRIED:
            return [Log(logging.INFO, "Deepgram refused the %s message (%s)", (kind.value, reason))]
        if self._retried or self._retry is not None:
            return [
                Log(logging.WARNING, "Deepgram refused the %s message again (%s); not retrying", (kind.value, reason)),
                Record(RecordEvent.INJECTION_REFUSED, {"kind": kind.value, "retry": False}),
            ]
        self._retry = last
        return [
            Log(logging.INFO, "Deepgram refused the %s message (%s); retrying once the agent has spoken", (kind.value, reason)),
            Record(RecordEvent.INJECTION_REFUSED, {"kind": kind.value, "retry": True}),
        ]

    def agent_turn_done(self, still_wanted: Callable[[Injection], bool]) -> list[Action]:
        """The agent finished speaking: a refused injection that still makes sense goes again, once."""
        retry, self._retry = self._retry, None
        if retry is None or not still_wanted(retry[0]):
            return []
        actions = self.send(*retry)
        self._retried = True
        return actions
