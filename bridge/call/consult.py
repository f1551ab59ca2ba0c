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
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .actions import Action, ArmTimer, CancelTimer, DialPharmacist, EndCallLeg, NoteCallerLeft, Timer, WatchForNote

ACCEPTED_NOTE = "accepted"


def conference_name(caller_call_sid: str) -> str:
    """The conference a warm transfer meets in, named for the caller's call."""
    return f"transfer-{caller_call_sid}"


class ConsultStage(enum.Enum):
    IDLE = "idle"
    DIALLING = "dialling the pharmacist"
    RINGING = "waiting for the pharmacist's answer"
    ACCEPTED = "accepted: moving the caller"


@dataclass(frozen=True, slots=True)
class ConsultAnswer:
    accepted: bool
    reason: str | None = None  # why not: declined, busy, no-answer, failed, canceled, machine, not-answered


class Consult:
    __slots__ = ("stage", "pharmacist_sid", "dialled_at", "_timeout")

    def __init__(self, timeout_seconds: float) -> None:
        self.stage = ConsultStage.IDLE
        self.pharmacist_sid: str | None = None
        self.dialled_at: float | None = None
        self._timeout = timeout_seconds

    @property
    def under_way(self) -> bool:
        return self.stage is not ConsultStage.IDLE

    def dial(self, caller_call_sid: str, agent_name: str, summary: str, now: float) -> list[Action]:
        self.stage = ConsultStage.DIALLING
        self.dialled_at = now
        return [
            ArmTimer(Timer.CONSULT, now + self._timeout),
            DialPharmacist(caller_call_sid, agent_name, summary),
        ]

    def dialled(self, pharmacist_sid: str | None, caller_call_sid: str) -> list[Action]:
        """The pharmacist's call exists (its SID); watch for their answer."""
        if self.stage is not ConsultStage.DIALLING or pharmacist_sid is None:
            return []
        self.stage = ConsultStage.RINGING
        self.pharmacist_sid = pharmacist_sid
        return [WatchForNote(caller_call_sid)]

    def accepted(self) -> bool:
        if self.stage is not ConsultStage.RINGING:
            return False
        self.stage = ConsultStage.ACCEPTED
        return True

    def declined(self) -> list[Action]:
        """Declined, unanswered, failed or timed out: the pharmacist's leg ends, the consult is over."""
        leg = self.pharmacist_sid
        self._reset()
        actions: list[Action] = [CancelTimer(Timer.CONSULT)]
        if leg is not None:
            actions.append(EndCallLeg(leg))
        return actions

    def caller_left(self, caller_call_sid: str) -> list[Action]:
        """The caller hung up while the pharmacist was dialled or briefed (or moved)."""
        if self.stage is ConsultStage.IDLE:
            return []
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


def parse_note(text: str | None) -> ConsultAnswer | None:
    """The note the pharmacist's answer left for the call: ``accepted`` or ``declined:<why>``; None for none."""
    if text is None:
        return None
    if text == ACCEPTED_NOTE:
        return ConsultAnswer(True)
    kind, _, why = text.partition(":")
    if kind == "declined" and why.replace("-", "").isalpha() and len(why) <= 32:
        return ConsultAnswer(False, why)
    return ConsultAnswer(False, "unreadable")
