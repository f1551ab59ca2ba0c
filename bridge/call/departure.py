"""Leaving the conversation once the agent's last words have been heard.

Four things end the conversation with words the caller must hear first: the agent's ``end_call``,
its ``transfer_call``, a voicemail message on an answering machine, and the goodbye to a caller
who stayed silent. Each is one ``Departure`` value; the machine holds at most one, in one stage:

====================  ======================================================================
stage                 what ends it
====================  ======================================================================
AWAITING_LAST_WORDS   the ``end-call-N`` mark after a turn that follows the request is heard;
                      or, when nothing was being said at the request (the goodbye came
                      first, as the prompt asks), ``HANGUP_GRACE`` passes: then
WHEN_ALL_HEARD        every mark sent has been heard;
                      either way ``HANGUP_FALLBACK`` (``hangup_timeout_seconds`` plus the
                      playing time of audio still queued at Twilio) ends the wait unconfirmed
TRANSFERRING          (transfers only) the REST update's answer: ``transfer_finished``
====================  ======================================================================

A barge-in, or Deepgram cancelling the ``end_call``/``transfer_call``, takes a departure back
(the caller stays with the agent), except a voicemail message, which plays to the end whatever
the machine does, and a transfer already being carried out. A repeated request starts afresh.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .actions import Action, ArmTimer, CancelTimer, Timer
from ..call_events import CallEnd, EndReason

# end_call after the goodbye was sent: how long to allow for any last words before hanging up.
HANGUP_GRACE_SECONDS = 1.5
# A voicemail message that never finishes playing is ended after this much more.
VOICEMAIL_EXTRA_SECONDS = 60.0


class DepartureKind(enum.Enum):
    END_CALL = "end_call"
    TRANSFER = "transfer"
    VOICEMAIL = "voicemail"
    IDLE_GOODBYE = "idle goodbye"


class DepartureStage(enum.Enum):
    AWAITING_LAST_WORDS = "awaiting the last words"
    WHEN_ALL_HEARD = "leaving once every mark is heard"
    TRANSFERRING = "transferring"


_ENDS = {
    DepartureKind.END_CALL: EndReason.AGENT_ENDED,
    DepartureKind.TRANSFER: EndReason.TRANSFERRED,
    DepartureKind.VOICEMAIL: EndReason.VOICEMAIL,
    DepartureKind.IDLE_GOODBYE: EndReason.CALLER_SILENT,
}


@dataclass(frozen=True, slots=True)
class Departure:
    kind: DepartureKind
    stage: DepartureStage = DepartureStage.AWAITING_LAST_WORDS
    call_id: str | None = None  # the end_call / transfer_call request that asked for it
    reason: str | None = None  # a transfer's reason, for the record
    conference: str | None = None  # a warm transfer: the conference the pharmacist waits in

    def end(self, *, confirmed: bool = True) -> CallEnd:
        """How the call ends when this departure is carried out."""
        unconfirmed = not confirmed and self.kind is not DepartureKind.VOICEMAIL
        return CallEnd(_ENDS[self.kind], " (goodbye not confirmed)" if unconfirmed else "")


class DepartureMachine:
    __slots__ = ("pending", "_hangup_timeout")

    def __init__(self, hangup_timeout_seconds: float) -> None:
        self.pending: Departure | None = None
        self._hangup_timeout = hangup_timeout_seconds

    def request(
        self,
        kind: DepartureKind,
        now: float,
        *,
        words_to_come: bool,
        call_id: str | None = None,
        reason: str | None = None,
        conference: str | None = None,
    ) -> list[Action]:
        """A departure is asked for now; a repeated request gets a fresh grace.

        ``words_to_come``: the last words are still to be said (the agent is mid-turn, or the
        bridge has just injected them), so their turn's mark decides; otherwise they were said
        before the request, and the grace starts now.
        """
        self.pending = Departure(kind, call_id=call_id, reason=reason, conference=conference)
        actions: list[Action] = [
            # If no AgentAudioDone follows (nothing more to say), leave anyway.
            ArmTimer(Timer.HANGUP_FALLBACK, now + self._hangup_timeout),
            CancelTimer(Timer.HANGUP_GRACE),
        ]
        if not words_to_come:
            # The last words were sent (and marked) before the request: once they have been
            # heard, and a moment has passed for any more, leave.
            actions.append(ArmTimer(Timer.HANGUP_GRACE, now + HANGUP_GRACE_SECONDS))
        return actions

    def voicemail(self) -> None:
        """An answering machine took the call: the greeting is the message, then the call ends."""
        self.pending = Departure(DepartureKind.VOICEMAIL)

    def voicemail_playing(self, now: float) -> list[Action]:
        return [ArmTimer(Timer.HANGUP_FALLBACK, now + self._hangup_timeout + VOICEMAIL_EXTRA_SECONDS)]

    def last_turn_marked(self, now: float, queued_seconds: float) -> list[Action]:
        """The turn with the last words was marked: wait for its mark, allowing for queued audio."""
        return [ArmTimer(Timer.HANGUP_FALLBACK, now + self._hangup_timeout + queued_seconds)]

    @property
    def awaiting_last_words(self) -> bool:
        """The next turn's mark is the last words' (the turn is marked ``end-call-N``)."""
        pending = self.pending
        return pending is not None and pending.stage is not DepartureStage.TRANSFERRING

    @property
    def leaving_when_all_heard(self) -> bool:
        pending = self.pending
        return pending is not None and pending.stage is DepartureStage.WHEN_ALL_HEARD

    def grace_over(self) -> None:
        """``HANGUP_GRACE`` passed with nothing being said: leave once every mark is heard."""
        if self.pending is not None and self.pending.stage is DepartureStage.AWAITING_LAST_WORDS:
            self.pending = replace(self.pending, stage=DepartureStage.WHEN_ALL_HEARD)

    def carry_out(self) -> Departure:
        """The last words were heard (or the wait is over): the departure happens now.

        A transfer stays pending, as TRANSFERRING, until ``transfer_finished``; the others end
        the call, so nothing stays pending.
        """
        departure = self.pending
        assert departure is not None and departure.stage is not DepartureStage.TRANSFERRING
        if departure.kind is DepartureKind.TRANSFER:
            self.pending = replace(departure, stage=DepartureStage.TRANSFERRING)
        else:
            self.pending = None
        return departure

    def cancel_timers(self) -> list[Action]:
        """The wait for the last words is over while the call goes on (a transfer, or a departure taken back)."""
        return [CancelTimer(Timer.HANGUP_FALLBACK), CancelTimer(Timer.HANGUP_GRACE)]

    def take_back(self, call_id: str | None = None) -> Departure | None:
        """The conversation goes on (a barge-in; or ``call_id``'s request was cancelled).

        Returns the departure taken back, or None if there was none that may be.
        """
        departure = self.pending
        if departure is None or departure.kind is DepartureKind.VOICEMAIL:
            return None
        if departure.stage is DepartureStage.TRANSFERRING:
            return None
        if call_id is not None and departure.call_id != call_id:
            return None
        self.pending = None
        return departure

    def transfer_finished(self) -> Departure | None:
        """The transfer's REST update answered; returns the transfer it was for."""
        departure = self.pending
        if departure is None or departure.stage is not DepartureStage.TRANSFERRING:
            return None
        self.pending = None
        return departure

    @property
    def transferring(self) -> bool:
        pending = self.pending
        return pending is not None and pending.stage is DepartureStage.TRANSFERRING

    @property
    def voicemail_mode(self) -> bool:
        pending = self.pending
        return pending is not None and pending.kind is DepartureKind.VOICEMAIL

    def is_pending(self, kind: DepartureKind) -> bool:
        pending = self.pending
        return pending is not None and pending.kind is kind and pending.stage is not DepartureStage.TRANSFERRING
