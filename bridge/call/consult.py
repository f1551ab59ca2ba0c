"""A warm transfer's consult leg: the pharmacist is called and briefed while the caller stays with the agent.

With ``TRANSFER_MODE=warm`` (or an agent's own ``bridge.transfer_mode``), ``transfer_call`` does
not move the caller at once. The bridge calls TRANSFER_NUMBER; the pharmacist hears the model's
summary of the call and presses 1 to take it or 2 to decline. Their key press reaches whichever
process Twilio sends it to (bridge/warm_transfer.py), which leaves a note in the shared state;
the process holding the caller watches for that note.

==========  ===========================================  ===========================================
stage       waits for                                    then
==========  ===========================================  ===========================================
IDLE        (no warm transfer under way)
DIALLING    the REST create of the pharmacist's call     RINGING; a failure counts as declined
RINGING     the note: ``accepted`` or ``declined:why``,  accepted: the caller is moved into the
            within TRANSFER_TIMEOUT_SECONDS              conference once the agent's current line
                                                         is heard (departure.py, as a cold
                                                         transfer); declined or no note in time:
                                                         the pharmacist's leg is ended, the agent
                                                         is told, the call goes on
ACCEPTED    the caller's move (the departure)
==========  ===========================================  ===========================================

The caller hanging up while the pharmacist is dialled or briefed ends the pharmacist's leg and
leaves a note saying so, so a pharmacist who then presses 1 hears that the caller has gone.

This module also owns the notes' vocabulary, shared with the callbacks that write them: the keys
(``note_key``, ``caller_left_key``), what a note says (``accepted``, ``declined:<reason>``) and
``parse_note``. Each attempt of a call has its own ``note_key``: a pharmacist who declined the
first attempt, or a late callback of it, says nothing about the second.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .. import twilio
from ..logsafe import clean
from .actions import (
    Action,
    ArmTimer,
    CancelTimer,
    DialPharmacist,
    EndCallLeg,
    NoteCallerLeft,
    StopWatchingForNote,
    Timer,
    WatchForNote,
)

ACCEPTED: Final = "accepted"
DECLINED_PREFIX: Final = "declined:"
# Why a transfer was declined: a key other than 1, Twilio's call statuses, a machine, no key at all.
DECLINE_REASONS: Final = frozenset({"declined", "busy", "no-answer", "failed", "canceled", "machine", "not-answered"})
UNREADABLE: Final = "unreadable"  # what parse_note makes of a note that is none of the above
# What the holder posts under caller_left_key (any note there means the caller has gone).
CALLER_LEFT_NOTE: Final = "caller-left"
# Attempts of one call are numbered from 1; a call asking more often than this is refused.
MAX_ATTEMPTS: Final = 5
# Of the model's summary, at most this much is read to the pharmacist.
SUMMARY_CHARS: Final = 300


def _call_sid(value: str) -> str:
    if not isinstance(value, str) or not twilio.CALL_SID.fullmatch(value):
        raise ValueError(f"not a Twilio Call SID (CA + 32 hex digits): {clean(value, 40)!r}")
    return value


def conference_name(caller_call_sid: str) -> str:
    """The conference a warm transfer of this caller meets in."""
    return f"transfer-{_call_sid(caller_call_sid)}"


def note_key(caller_call_sid: str, attempt: int) -> str:
    """Where the callbacks leave the pharmacist's answer to this attempt, for the caller's process."""
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= MAX_ATTEMPTS:
        raise ValueError(f"a warm transfer's attempt is a number from 1 to {MAX_ATTEMPTS}")
    return f"warm-transfer:{_call_sid(caller_call_sid)}:{attempt}"


def caller_left_key(caller_call_sid: str) -> str:
    """Where the caller's process leaves ``CALLER_LEFT_NOTE`` when the caller hung up during a transfer."""
    return f"warm-transfer-caller-left:{_call_sid(caller_call_sid)}"


@dataclass(frozen=True, slots=True)
class TransferAnswer:
    """The pharmacist's answer, as a note says it: accepted, or declined and why."""

    accepted: bool
    reason: str | None = None  # one of DECLINE_REASONS or UNREADABLE when declined; None when accepted


def parse_note(text: str | None) -> TransferAnswer | None:
    """The answer a note under ``note_key`` holds: None for no note yet; anything unexpected is
    ``declined:unreadable``."""
    if text is None:
        return None
    note = text.strip() if isinstance(text, str) else ""
    if note == ACCEPTED:
        return TransferAnswer(True)
    reason = note.removeprefix(DECLINED_PREFIX)
    if note.startswith(DECLINED_PREFIX) and reason in DECLINE_REASONS:
        return TransferAnswer(False, reason)
    return TransferAnswer(False, UNREADABLE)


def briefing_for(template: str, summary: str, fallback: str) -> str:
    """The briefing the pharmacist hears: ``template`` with the model's ``summary`` in it, cleaned
    (``twilio.summary_for_briefing``: the model wrote it, so it is untrusted); ``fallback`` (the
    transfer's reason) if nothing of the summary is left to say."""
    said = twilio.summary_for_briefing(summary, SUMMARY_CHARS) or twilio.summary_for_briefing(fallback, SUMMARY_CHARS)
    return template.format(summary=said)


class ConsultStage(enum.Enum):
    IDLE = "idle"
    DIALLING = "dialling the pharmacist"
    # The caller left before the pharmacist's call had a SID: that call is ended once it has one.
    ABANDONED = "the caller left while the pharmacist's call was being placed"
    RINGING = "waiting for the pharmacist's answer"
    ACCEPTED = "accepted: moving the caller"


class Consult:
    __slots__ = ("stage", "pharmacist_sid", "dialled_at", "attempts", "_timeout")

    def __init__(self, timeout_seconds: float) -> None:
        self.stage = ConsultStage.IDLE
        self.pharmacist_sid: str | None = None
        self.dialled_at: float | None = None
        self.attempts = 0  # warm transfers this call has begun
        self._timeout = timeout_seconds

    @property
    def under_way(self) -> bool:
        return self.stage is not ConsultStage.IDLE

    @property
    def attempts_left(self) -> bool:
        return self.attempts < MAX_ATTEMPTS

    def dial(
        self, caller_call_sid: str, agent_name: str, briefing: str, no_answer: str, now: float,
        voice: twilio.SayVoice = twilio.DEFAULT_SAY,
    ) -> list[Action]:
        self.stage = ConsultStage.DIALLING
        self.dialled_at = now
        self.attempts += 1
        return [
            ArmTimer(Timer.CONSULT, now + self._timeout),
            DialPharmacist(caller_call_sid, agent_name, self.attempts, briefing, no_answer, voice),
        ]

    def dialled(self, pharmacist_sid: str | None, caller_call_sid: str) -> list[Action]:
        """The pharmacist's call exists (its SID); watch for their answer."""
        if self.stage is not ConsultStage.DIALLING or pharmacist_sid is None:
            return []
        self.stage = ConsultStage.RINGING
        self.pharmacist_sid = pharmacist_sid
        return [WatchForNote(caller_call_sid, self.attempts)]

    def placed_after_the_caller_left(self, pharmacist_sid: str | None) -> list[Action]:
        """The create of an abandoned consult answered: the call, if it was made, is ended."""
        self._reset()
        return [EndCallLeg(pharmacist_sid)] if pharmacist_sid is not None else []

    def accepted(self) -> list[Action]:
        """The pharmacist pressed 1: the caller is to be moved (departure.py)."""
        if self.stage is not ConsultStage.RINGING:
            return []
        self.stage = ConsultStage.ACCEPTED
        return [CancelTimer(Timer.CONSULT), StopWatchingForNote()]

    def declined(self) -> list[Action]:
        """Declined, unanswered, failed or timed out: the pharmacist's leg ends, the consult is over."""
        leg = self.pharmacist_sid
        self._reset()
        actions: list[Action] = [CancelTimer(Timer.CONSULT), StopWatchingForNote()]
        if leg is not None:
            actions.append(EndCallLeg(leg))
        return actions

    def caller_left(self, caller_call_sid: str) -> list[Action]:
        """The call ended (the caller hung up, or not) while the pharmacist was dialled or briefed (or moved)."""
        if self.stage in (ConsultStage.IDLE, ConsultStage.ABANDONED):
            return []
        if self.stage is ConsultStage.DIALLING:
            # Nobody is put through to silence: the call being placed is ended as soon as it exists.
            self.stage = ConsultStage.ABANDONED
            return [NoteCallerLeft(caller_call_sid), CancelTimer(Timer.CONSULT), StopWatchingForNote()]
        accepted = self.stage is ConsultStage.ACCEPTED
        actions: list[Action] = [NoteCallerLeft(caller_call_sid)]
        if not accepted:  # an accepted pharmacist is in the conference the caller was moved to
            actions += self.declined()
        return actions

    def finished(self) -> None:
        """The caller was moved into the conference (or the move failed): nothing more to watch."""
        self._reset()

    def _reset(self) -> None:
        self.stage = ConsultStage.IDLE
        self.pharmacist_sid = None
