"""The agent's voice on its way to the caller: turns, Twilio marks, and barge-in.

``AgentAudioDone`` means Deepgram *sent* the last byte of a turn, not that the caller heard it
(docs/protocols.md section 5), so each turn ends with a Twilio ``mark`` behind its audio; Twilio
echoes it when playback reaches it, and that echo is "heard". A barge-in ``clear``s Twilio's
queue, and Twilio then echoes every pending mark at once, unplayed (section 1): those names move
to ``cleared`` so their echoes don't count as heard. A mark name the bridge never sent is bad
input. The marks of a turn that ends with the call leaving (end_call, transfer, voicemail, the
silence goodbye) are named ``end-call-N``, the others ``agent-turn-N``.
"""

from __future__ import annotations

import enum

from .. import twilio
from .actions import ClearCaller, MarkCaller, SendToCaller

TURN_MARK = "agent-turn"
HANGUP_MARK = "end-call"
MULAW_BYTES_PER_SECOND = 8000


class EchoedMark(enum.Enum):
    HEARD = "heard"  # one of ours, played
    HEARD_LAST_WORDS = "heard last words"  # one of ours after a departing turn, played
    CLEARED = "cleared"  # one of ours, echoed by a clear: never heard
    UNKNOWN = "unknown"  # not a mark we sent: bad input


class Playback:
    __slots__ = ("_outbound", "_turn_open", "_audio_since_mark", "_marks_sent", "_marks_out", "_cleared", "bytes_to_caller")

    def __init__(self) -> None:
        self._outbound: twilio.TwilioOutbound | None = None
        self._turn_open = False  # the agent began a turn whose AgentAudioDone hasn't come
        self._audio_since_mark = 0
        self._marks_sent = 0
        self._marks_out: set[str] = set()  # sent, not yet echoed
        self._cleared: set[str] = set()  # a clear made Twilio echo these unplayed
        self.bytes_to_caller = 0

    def stream_started(self, stream_sid: str) -> None:
        self._outbound = twilio.TwilioOutbound(stream_sid)

    @property
    def started(self) -> bool:
        return self._outbound is not None

    # -------------------------------------------------------------------- the hot path

    def agent_audio(self, audio: bytes) -> SendToCaller | None:
        outbound = self._outbound
        if outbound is None:
            return None
        self.bytes_to_caller += len(audio)
        self._audio_since_mark += len(audio)
        return SendToCaller(outbound.media(audio))

    # ---------------------------------------------------------------------------- turns

    def turn_started(self) -> None:
        self._turn_open = True

    def end_turn(self, *, last_words: bool) -> tuple[MarkCaller, float]:
        """Mark the end of the turn; returns the mark and the seconds of its audio still queued at Twilio.

        Twilio plays in real time what it was sent faster, so a deadline waiting for the mark must
        allow for that much more.
        """
        assert self._outbound is not None
        self._turn_open = False
        self._marks_sent += 1
        name = f"{HANGUP_MARK if last_words else TURN_MARK}-{self._marks_sent}"
        queued_seconds = self._audio_since_mark / MULAW_BYTES_PER_SECOND
        self._audio_since_mark = 0
        self._marks_out.add(name)
        return MarkCaller(name, self._outbound.mark(name)), queued_seconds

    def barge_in(self) -> ClearCaller:
        """The caller spoke: drop what Twilio has queued; its marks will echo unplayed."""
        assert self._outbound is not None
        self._cleared |= self._marks_out
        self._marks_out.clear()
        self._audio_since_mark = 0
        self._turn_open = False
        return ClearCaller(self._outbound.clear())

    def mark_echoed(self, name: str | None) -> EchoedMark:
        if name is not None and name in self._cleared:
            self._cleared.discard(name)
            return EchoedMark.CLEARED
        if name is None or name not in self._marks_out:
            return EchoedMark.UNKNOWN
        self._marks_out.discard(name)
        return EchoedMark.HEARD_LAST_WORDS if name.startswith(HANGUP_MARK) else EchoedMark.HEARD

    # ---------------------------------------------------------------------------- views

    @property
    def speaking(self) -> bool:
        """The agent is mid-turn, or sent audio whose turn hasn't been marked yet."""
        return self._turn_open or self._audio_since_mark > 0

    @property
    def all_heard(self) -> bool:
        """Nothing is being said and every mark sent has been echoed: the caller heard it all."""
        return not self._marks_out and not self.speaking
