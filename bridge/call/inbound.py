"""The caller's audio on its way to the agent, and the one decision to stop reading the caller.

Twilio's 20 ms frames are gathered into chunks of ``chunk_bytes`` (INBOUND_CHUNK_BYTES). What a
chunk becomes depends on the mode the call has put this machine in:

=============  ================================  ==============================================
mode           when                              a full chunk
=============  ================================  ==============================================
HOLDING        the first agent session opens     is held, in order, and sent once it is ready
FORWARDING     the agent session is ready        goes to the agent at once
DROPPING       a lost session is being resumed   is dropped and counted (stale speech answered
                                                 out of turn would be worse than the gap)
=============  ================================  ==============================================

Reading the caller's socket stops for either of two reasons, each owned here: the held audio
reached ``max_held_bytes`` (the agent is slow to open), or the shell reported that the agent's
socket can't take more (``agent_backlog``). ``PauseCaller`` goes out when the first reason
appears and ``ResumeCaller`` when the last one goes, so the shell keeps no reasons of its own.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Sequence

from .actions import NO_ACTIONS, Action, Log, PauseCaller, ResumeCaller, SendToAgent


class InboundMode(enum.Enum):
    HOLDING = "holding"
    FORWARDING = "forwarding"
    DROPPING = "dropping"


class PauseReason(enum.Enum):
    HELD_AUDIO_FULL = "the audio held for the agent is at its cap"
    AGENT_BACKLOG = "the agent's socket can take no more"


class InboundAudio:
    __slots__ = (
        "mode", "_buffer", "_chunk_bytes", "_held", "_held_bytes", "_max_held_bytes", "_paused_for",
        "bytes_from_caller", "bytes_to_agent", "bytes_dropped", "last_sent_at",
    )

    def __init__(self, chunk_bytes: int, max_held_bytes: int) -> None:
        self.mode = InboundMode.HOLDING
        self._buffer = bytearray()
        self._chunk_bytes = chunk_bytes
        self._held: deque[bytes] = deque()
        self._held_bytes = 0
        self._max_held_bytes = max_held_bytes
        self._paused_for: set[PauseReason] = set()
        self.bytes_from_caller = 0
        self.bytes_to_agent = 0
        self.bytes_dropped = 0  # while a lost session was being resumed
        self.last_sent_at = 0.0  # when audio last went to the agent (KeepAlive is for silence)

    # ------------------------------------------------------------------------ the hot path

    def audio(self, audio: bytes, now: float) -> Sequence[Action]:
        """One media frame's audio; 50 times a second a call, so it does as little as it can."""
        buffer = self._buffer
        buffer += audio
        self.bytes_from_caller += len(audio)
        size = self._chunk_bytes
        if len(buffer) < size:
            return NO_ACTIONS
        actions: list[Action] = []
        while len(buffer) >= size:
            chunk = bytes(buffer[:size])
            del buffer[:size]
            actions += self._chunk(chunk, now)
        return actions

    def _chunk(self, chunk: bytes, now: float) -> Sequence[Action]:
        mode = self.mode
        if mode is InboundMode.FORWARDING:
            self.bytes_to_agent += len(chunk)
            self.last_sent_at = now
            return (SendToAgent(chunk),)
        if mode is InboundMode.DROPPING:
            self.bytes_dropped += len(chunk)
            return NO_ACTIONS
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes >= self._max_held_bytes and PauseReason.HELD_AUDIO_FULL not in self._paused_for:
            return [
                Log(
                    logging.WARNING,
                    "%d bytes of caller audio wait for the agent session; not reading the caller until it is ready",
                    (self._held_bytes,),
                ),
                *self._pause(PauseReason.HELD_AUDIO_FULL),
            ]
        return NO_ACTIONS

    @property
    def held_bytes(self) -> int:
        """Caller audio held for an agent session that is not ready yet."""
        return self._held_bytes

    @property
    def partial(self) -> bytes:
        """The caller's audio that is not yet a whole chunk."""
        return bytes(self._buffer)

    # ---------------------------------------------------------------- the call's modes

    def forward(self, now: float) -> list[Action]:
        """The agent session is ready: what was held goes out first, in order."""
        if self.mode is InboundMode.DROPPING:
            self._drop_partial()  # less than a chunk gathered while the agent was away: as stale
        self.mode = InboundMode.FORWARDING
        self.last_sent_at = now
        actions: list[Action] = []
        while self._held:
            chunk = self._held.popleft()
            self.bytes_to_agent += len(chunk)
            actions.append(SendToAgent(chunk))
        self._held_bytes = 0
        return actions + self._release(PauseReason.HELD_AUDIO_FULL)

    def drop_until_resumed(self) -> None:
        """The agent session was lost: what queues until a new one is ready is stale."""
        self.mode = InboundMode.DROPPING
        self._drop_partial()

    def caller_left(self, now: float) -> Sequence[Action]:
        """The caller is gone: the partial chunk is theirs too, and reaches the agent if it can."""
        tail = bytes(self._buffer)
        self._buffer.clear()
        if not tail:
            return NO_ACTIONS
        if self.mode is InboundMode.DROPPING:
            self.bytes_dropped += len(tail)
            return NO_ACTIONS
        return self._chunk(tail, now) if self.mode is InboundMode.FORWARDING else self._hold(tail)

    def _hold(self, chunk: bytes) -> Sequence[Action]:
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        return NO_ACTIONS

    def _drop_partial(self) -> None:
        self.bytes_dropped += len(self._buffer)
        self._buffer.clear()

    # ------------------------------------------------------------- reading the caller

    def agent_backlog(self, full: bool) -> list[Action]:
        """The shell's report that the agent's socket queue went over (or back under) its cap."""
        return self._pause(PauseReason.AGENT_BACKLOG) if full else self._release(PauseReason.AGENT_BACKLOG)

    @property
    def reading_paused(self) -> bool:
        return bool(self._paused_for)

    def _pause(self, reason: PauseReason) -> list[Action]:
        first = not self._paused_for
        self._paused_for.add(reason)
        return [PauseCaller()] if first else []

    def _release(self, reason: PauseReason) -> list[Action]:
        if reason not in self._paused_for:
            return []
        self._paused_for.discard(reason)
        return [] if self._paused_for else [ResumeCaller()]
