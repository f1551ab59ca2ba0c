"""The silence clock: a caller who says nothing is re-prompted, then told goodbye.

The clock runs only while the silence is the caller's: the call is conversing and nobody else is
to speak or act next (no departure pending, no function running, every word of the agent's heard).
The call tells the clock after each event whether that holds (``quiet``) and whether the caller
just did something (spoke, pressed a key, barged in); the clock starts counting when the silence
becomes the caller's, restarts when the caller acts, and stops when it isn't theirs any more.

=====================  ===============================  ========================================
stage                  the clock runs for               when it runs out
=====================  ===============================  ========================================
WAITING_TO_REPROMPT    ``idle_reprompt_seconds``        the agent re-prompts; REPROMPTED
REPROMPTED             ``idle_hangup_seconds``          the agent says goodbye; the call ends
=====================  ===============================  ========================================

Anything the caller does puts it back to WAITING_TO_REPROMPT. ``idle_reprompt_seconds`` 0 turns
the clock off.
"""

from __future__ import annotations

import enum

from .actions import Action, ArmTimer, CancelTimer, Timer


class SilenceStage(enum.Enum):
    WAITING_TO_REPROMPT = "waiting to re-prompt"
    REPROMPTED = "re-prompted"


class SilenceClock:
    __slots__ = ("stage", "_running", "_reprompt_seconds", "_hangup_seconds")

    def __init__(self, reprompt_seconds: float, hangup_seconds: float) -> None:
        self.stage = SilenceStage.WAITING_TO_REPROMPT
        self._running = False
        self._reprompt_seconds = reprompt_seconds
        self._hangup_seconds = hangup_seconds

    @property
    def enabled(self) -> bool:
        return self._reprompt_seconds > 0

    @property
    def reprompt_seconds(self) -> float:
        return self._reprompt_seconds

    @property
    def hangup_seconds(self) -> float:
        return self._hangup_seconds

    def follow(self, now: float, *, quiet: bool, caller_acted: bool = False) -> list[Action]:
        """The call's state after an event: start, restart or stop counting as it says."""
        if not self.enabled:
            return []
        if caller_acted:
            self.stage = SilenceStage.WAITING_TO_REPROMPT
        if not quiet:
            if not self._running:
                return []
            self._running = False
            return [CancelTimer(Timer.IDLE)]
        if self._running and not caller_acted:
            return []  # already counting since the silence became the caller's
        self._running = True
        return [ArmTimer(Timer.IDLE, now + self._wait())]

    def ran_out(self, now: float) -> tuple[SilenceStage, list[Action]]:
        """The ``IDLE`` timer fired while the silence was the caller's; returns the stage that ran out.

        After the re-prompt the clock goes on counting towards the goodbye, so that a re-prompt
        that is never heard still leads there; hearing it restarts the count.
        """
        ran_out = self.stage
        if ran_out is SilenceStage.WAITING_TO_REPROMPT:
            self.stage = SilenceStage.REPROMPTED
            return ran_out, [ArmTimer(Timer.IDLE, now + self._hangup_seconds)]
        self._running = False
        return ran_out, []

    def timer_stopped(self) -> None:
        """The ``IDLE`` timer fired when the silence was no longer the caller's: nothing runs now."""
        self._running = False

    def _wait(self) -> float:
        return self._reprompt_seconds if self.stage is SilenceStage.WAITING_TO_REPROMPT else self._hangup_seconds
