"""The call's phase, and the one table of how it changes.

Kept as h11 keeps its connection states (h11/_state.py): the phases, the events that move a call
between them, and a table of every allowed move. ``PhaseMachine.move`` is the only place a phase
changes; a move the table lacks is a bug in the machine, so it raises rather than guesses.

=====================  ===============  =====================
phase                  event            next phase
=====================  ===============  =====================
WAITING_FOR_START      STARTED          OPENING_AGENT
OPENING_AGENT          AGENT_READY      CONVERSING
CONVERSING             AGENT_LOST       RESUMING
RESUMING               AGENT_READY      CONVERSING
any but ENDED          ENDED            ENDED
=====================  ===============  =====================
"""

from __future__ import annotations

import enum


class Phase(enum.Enum):
    WAITING_FOR_START = "waiting for start"
    OPENING_AGENT = "opening the agent session"
    CONVERSING = "conversing"
    RESUMING = "resuming the agent session"
    ENDED = "ended"


class PhaseEvent(enum.Enum):
    STARTED = "Twilio's start event"
    AGENT_READY = "the agent session is ready"
    AGENT_LOST = "the agent session was lost and is being resumed"
    ENDED = "the call ended"


TRANSITIONS: dict[Phase, dict[PhaseEvent, Phase]] = {
    Phase.WAITING_FOR_START: {PhaseEvent.STARTED: Phase.OPENING_AGENT, PhaseEvent.ENDED: Phase.ENDED},
    Phase.OPENING_AGENT: {PhaseEvent.AGENT_READY: Phase.CONVERSING, PhaseEvent.ENDED: Phase.ENDED},
    Phase.CONVERSING: {PhaseEvent.AGENT_LOST: Phase.RESUMING, PhaseEvent.ENDED: Phase.ENDED},
    Phase.RESUMING: {PhaseEvent.AGENT_READY: Phase.CONVERSING, PhaseEvent.ENDED: Phase.ENDED},
    Phase.ENDED: {},
}


class PhaseError(AssertionError):
    """The machine asked for a move the table doesn't allow: a bug, never a peer's doing."""


class PhaseMachine:
    """The current phase; ``move`` applies one event through ``TRANSITIONS``."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.WAITING_FOR_START

    def move(self, event: PhaseEvent) -> Phase:
        try:
            self.phase = TRANSITIONS[self.phase][event]
        except KeyError:
            raise PhaseError(f"no move from {self.phase.name} on {event.name}") from None
        return self.phase

    @property
    def ended(self) -> bool:
        return self.phase is Phase.ENDED

    @property
    def conversing(self) -> bool:
        """The agent session is ready: audio flows both ways (what ``agent_ready`` used to be)."""
        return self.phase is Phase.CONVERSING
