"""The link to the agent: opening a session, its handshake, resume attempts, and KeepAlive.

One attempt at a time goes through the stages below, all within the ``AGENT_OPEN`` timer; a
session that becomes ready bumps ``generation``, so an answer meant for an older session is
never sent to a newer one.

=====================  ======================================  =========================
stage                  waits for                               then
=====================  ======================================  =========================
IDLE                   (no attempt under way)
CONNECTING             the WebSocket to open                   AWAITING_WELCOME
AWAITING_WELCOME       Deepgram's ``Welcome``                  send Settings, AWAITING_SETTINGS_APPLIED
AWAITING_APPLIED       ``SettingsApplied``                     ready (IDLE, generation + 1)
=====================  ======================================  =========================

A lost session is resumed with up to ``1 + len(agent_reconnect_delays)`` attempts, the first at
once and each later one after its delay; a Deepgram ``Error`` mid-call resumes it too, at most
``MAX_ERROR_RESUMES`` times a call. KeepAlive goes out when no audio has gone to the agent for
``keepalive_seconds`` (Deepgram ends a session that hears nothing for about 10 s).
"""

from __future__ import annotations

import enum
import logging

from .. import agent_protocol as agent
from .actions import Action, ArmTimer, CancelTimer, CloseAgent, Log, OpenAgent, SendToAgent, Timer

# Close codes after which the agent session is worth resuming rather than ending the call:
# no close frame at all (1006), or the server going away / failing / restarting.
RESUMABLE_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
# Reconnecting must be quick or the caller hears dead air; cap each attempt's handshake.
RECONNECT_HANDSHAKE_SECONDS = 3.0
# A mid-call Error resumes the session (Deepgram ends a session on every Error); a call that
# keeps getting them ends after this many, as it would after a drop that can't be resumed.
MAX_ERROR_RESUMES = 3


class LinkStage(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting to Deepgram"
    AWAITING_WELCOME = "waiting for Deepgram's Welcome"
    AWAITING_APPLIED = "waiting for SettingsApplied"


class AgentLink:
    __slots__ = (
        "stage", "generation", "attempt", "error_resumes", "_timeout", "_connect_timeout", "_reconnect_delays",
        "_keepalive_seconds", "_keepalive_at",
    )

    def __init__(self, connect_timeout: float, reconnect_delays: tuple[float, ...], keepalive_seconds: float) -> None:
        self.stage = LinkStage.IDLE
        self.generation = 0  # bumped per ready session; answers for an older one are not sent
        self.attempt = 0  # resume attempts made for the current loss
        self.error_resumes = 0
        self._timeout = 0.0
        self._connect_timeout = connect_timeout
        self._reconnect_delays = reconnect_delays
        self._keepalive_seconds = keepalive_seconds
        self._keepalive_at = 0.0  # when a KeepAlive (or readiness) last counted as something sent

    @property
    def opening(self) -> bool:
        """An attempt is under way."""
        return self.stage is not LinkStage.IDLE

    @property
    def attempts_allowed(self) -> int:
        return 1 + len(self._reconnect_delays)

    def open(self, now: float, *, resuming: bool) -> list[Action]:
        timeout = self._connect_timeout
        if resuming:
            timeout = min(timeout, RECONNECT_HANDSHAKE_SECONDS)
        self._timeout = timeout
        self.stage = LinkStage.CONNECTING
        return [ArmTimer(Timer.AGENT_OPEN, now + timeout), OpenAgent(resuming=resuming)]

    def connected(self) -> None:
        if self.stage is LinkStage.CONNECTING:
            self.stage = LinkStage.AWAITING_WELCOME

    def welcomed(self) -> bool:
        """A Welcome arrived; True if it was the one awaited (Settings go out now)."""
        if self.stage is not LinkStage.AWAITING_WELCOME:
            return False
        self.stage = LinkStage.AWAITING_APPLIED
        return True

    def applied(self) -> bool:
        return self.stage is LinkStage.AWAITING_APPLIED

    def ready(self, now: float) -> list[Action]:
        self.stage = LinkStage.IDLE
        self.generation += 1
        self.attempt = 0
        self._keepalive_at = now
        return [CancelTimer(Timer.AGENT_OPEN), ArmTimer(Timer.KEEPALIVE, now + self._keepalive_seconds)]

    def failed(self) -> list[Action]:
        """The attempt under way failed: it is abandoned."""
        self.stage = LinkStage.IDLE
        return [CancelTimer(Timer.AGENT_OPEN), CloseAgent()]

    def timeout_text(self) -> str:
        return f"timed out after {self._timeout:.1f} s {self.stage_text()}"

    def stage_text(self) -> str:
        return self.stage.value if self.stage is not LinkStage.IDLE else "opening the session"

    # ------------------------------------------------------------------------- resuming

    def start_resuming(self) -> None:
        self.attempt = 0

    def may_retry(self) -> bool:
        return self.attempt < self.attempts_allowed

    @property
    def waiting_to_resume(self) -> bool:
        """A loss is being resumed, but no attempt is made yet (running functions come first)."""
        return self.attempt == 0 and self.stage is LinkStage.IDLE

    def next_attempt(self, now: float) -> list[Action]:
        delays = (0.0, *self._reconnect_delays)
        delay = delays[self.attempt]
        self.attempt += 1
        if delay <= 0:
            return self.open(now, resuming=True)
        return [ArmTimer(Timer.RECONNECT, now + delay)]

    def error_resume_allowed(self) -> bool:
        self.error_resumes += 1
        return self.error_resumes <= MAX_ERROR_RESUMES

    # ------------------------------------------------------------------------ KeepAlive

    def keepalive_due(self, now: float, last_audio_at: float) -> list[Action]:
        interval = self._keepalive_seconds
        last = max(self._keepalive_at, last_audio_at)
        actions: list[Action] = []
        idle = now - last
        if idle >= interval - 0.01:
            actions += [SendToAgent(agent.KEEPALIVE), Log(logging.DEBUG, "no audio for %.1f s: sent KeepAlive", (idle,))]
            self._keepalive_at = last = now
        actions.append(ArmTimer(Timer.KEEPALIVE, last + interval))
        return actions
