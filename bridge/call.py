"""The life of one call as a state machine with no I/O: events in, actions out, time passed in.

Built the way h11 and websockets' Sans-I/O core are: ``Call`` never touches a socket, a task, a
clock or a file. Each method is an event (something Twilio or the agent sent, a socket that
closed, a function that finished, a timer that fired) given the current clock value, and returns
the actions the asyncio session must carry out, in order. So every rule of a call (turns, marks,
barge-in, hang-up, function bookkeeping, resume, why the call ended) lives here and is tested with
a fake clock and no sockets (tests/test_call.py).

Theory of operation
===================

Phases (``Call.phase``):

``WAITING_FOR_START``
    The Twilio socket is open but ``start`` hasn't come. Nothing Twilio sends is kept, only
    counted (a peer that never starts can't grow the call). The ``START`` timer ends the call
    if ``start`` never comes.
``OPENING_AGENT``
    ``start`` came; the first agent session is being opened (``OpenAgent``). Its handshake is
    ours to drive: wait for ``Welcome``, send Settings, wait for ``SettingsApplied``, all within
    the ``AGENT_OPEN`` timer. Caller audio is held (up to ``agent_queue_max_bytes``, then the
    caller's socket stops being read: ``PauseCaller``) and sent the moment the agent is ready:
    the caller's first words are never lost. If the session can't be opened, the call ends.
``CONVERSING``
    The agent is ready. Caller audio goes to the agent in ``inbound_buffer_bytes`` chunks; agent
    audio goes to the caller as ``media``; KeepAlive is sent when no audio has gone out for
    ``keepalive_seconds``.
``RESUMING``
    The agent connection dropped (a close code that means "try again"). Running functions are
    waited for first (``FUNCTIONS_WAIT``) so their results are in the history the new session
    starts from; then up to ``1 + len(agent_reconnect_delays)`` attempts open a new session with
    the conversation so far. Caller audio meanwhile is dropped and counted: answering stale
    speech out of turn would be worse than the gap.
``ENDED``
    A ``HangUp`` action was returned; the first reason given is the one recorded. Later events
    only add to the record (a function cut off by the hang-up), never send anything.

Turns and marks. ``AgentAudioDone`` means Deepgram has *sent* the last byte of a turn, not that
the caller heard it, so after each one a Twilio ``mark`` is sent behind the audio; Twilio echoes
it when playback reaches it. ``UserStartedSpeaking`` is a barge-in: ``ClearCaller`` drops what
Twilio had queued, and Twilio then echoes every pending mark at once, unplayed; those names move
to ``marks_cleared`` so their echoes aren't taken as "heard". A mark name the bridge never sent
is bad input (counted), so a flood of forged marks changes nothing and writes nothing.

Hang-up after ``end_call``. The agent is answered at once, and the call ends when the goodbye has
been heard, which is decided by the first of:

1. the goodbye comes *after* the request: the mark sent after its ``AgentAudioDone`` (an
   ``end-call-N`` mark) is echoed: hang up;
2. the goodbye came *before* the request (the prompt asks for this order) and nothing is being
   spoken: after ``HANGUP_GRACE`` (1.5 s, for last words) hang up once every mark sent has
   been heard;
3. neither is confirmed: the ``HANGUP_FALLBACK`` timer (``hangup_timeout_seconds``, plus the
   playing time of audio still queued at Twilio) hangs up anyway.

A barge-in, or ``FunctionCallCancelled`` naming the ``end_call``, cancels all of that: the caller
stays with the agent. A repeated ``end_call`` re-arms the timers, never adds a second set.

``transfer_call`` follows the same rules to the same moment, and then, instead of hanging up,
returns ``TransferCall``: the shell moves the live call to ``<Dial>TRANSFER_NUMBER`` through the
REST API. The number is never taken from the agent's arguments (a caller who talks the agent into
it must not be able to make the line dial anywhere else); only a ``reason`` is, for the record.
``transfer_finished`` reports the outcome: success ends the call as ``transferred``; failure
tells the agent (it says so to the caller) and the conversation goes on.

Voicemail. A stream started with the ``<Parameter>`` ``bridge_mode=voicemail`` (the answering-
machine callback of an outbound call sends one) opens the agent with the voicemail message as its
greeting, ignores barge-in (the machine is recording, not talking), and hangs up once the message
has been heard, as ``voicemail``.

Fallback. When the agent session can't be opened, or is lost and can't be resumed, and Twilio's
REST API is set up, the ``HangUp`` carries ``fallback=True``: the shell first moves the call to a
short apology and ``<Dial>FALLBACK_NUMBER`` (or the apology and a hang-up), so no caller is left
in silence.

Functions. Each client-side ``FunctionCallRequest`` entry becomes a ``StartFunction``; its result
comes back as ``function_finished`` and is answered only if the agent session that asked is still
the current one (``generation``). ``FunctionCallCancelled``: an ``async def`` still running is
cancelled (``CancelFunction``; asyncio code cleans up at its awaits); a plain ``def`` already
running in a thread can't be stopped safely (it may be halfway through placing an order), so it
finishes, its result is recorded as ``withdrawn`` and never sent as an answer.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import agent_protocol as agent
from . import twilio
from .agents import AgentCatalog
from .config import Settings
from .functions import FunctionOutcome
from .logsafe import clean
from .records import percentile

# Close codes after which the agent session is worth resuming rather than ending the call:
# no close frame at all (1006), or the server going away / failing / restarting.
RESUMABLE_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
# Reconnecting must be quick or the caller hears dead air; cap each attempt's handshake.
RECONNECT_HANDSHAKE_SECONDS = 3.0
# How long a hung-up caller's last audio may wait for an agent still opening.
TAIL_FLUSH_SECONDS = 1.0
HANGUP_MARK = "end-call"
MODE_PARAMETER = "bridge_mode"  # the <Parameter> the answering-machine callback sets
VOICEMAIL_MODE = "voicemail"
# A voicemail stream whose message never finishes playing is ended after this much more.
VOICEMAIL_EXTRA_SECONDS = 60.0
TRANSFER_FAILED_MESSAGE = (
    "I'm sorry, I couldn't connect you to a pharmacist just now. Is there anything else I can help you with?"
)
TURN_MARK = "agent-turn"
# end_call after the goodbye was sent: how long to allow for any last words before hanging up.
HANGUP_GRACE_SECONDS = 1.5
AGENT_HANGUP_REASON = "agent ended the call"
IDLE_HANGUP_REASON = "caller silent"
MULAW_BYTES_PER_SECOND = 8000
# Distinct kinds of bad input counted per call; more kinds than this share one counter.
MAX_BAD_INPUT_KINDS = 32
# Transcript text kept for the resume history and sent to the browser page.
MAX_TEXT_CHARS = 8000
# The resume history keeps the newest this many items (turns and function calls): about two
# hours of conversation, and a Settings message Deepgram still takes.
MAX_HISTORY_ITEMS = 400
# Ours and Deepgram's copy of the same turn arrive close together: matched within this many items.
HISTORY_MATCH_WINDOW = 16
# A mid-call Error resumes the session (Deepgram ends a session on every Error); a call that
# keeps getting them ends after this many, as it would after a drop that can't be resumed.
MAX_ERROR_RESUMES = 3
# Request ids kept per call (one per agent session; resumes are bounded, this is a backstop).
MAX_REQUEST_IDS = 32
# Keypad digits gathered before they go to the agent without waiting for # or the timeout.
MAX_DTMF_DIGITS = 32
# Injected texts kept to recognise the agent's echo of them (keypad digits are kept out of records).
KEYPAD_ECHOES_KEPT = 8
KEYPAD_REDACTED = "(keypad digits)"
KEY_WORDS = {"*": "star", "#": "pound"}


class Phase(enum.Enum):
    WAITING_FOR_START = "waiting for start"
    OPENING_AGENT = "opening the agent session"
    CONVERSING = "conversing"
    RESUMING = "resuming the agent session"
    ENDED = "ended"


class Timer(enum.Enum):
    START = "start"
    AGENT_OPEN = "agent-open"
    RECONNECT = "reconnect"
    FUNCTIONS_WAIT = "functions-wait"
    KEEPALIVE = "keepalive"
    HANGUP_FALLBACK = "hangup-fallback"
    HANGUP_GRACE = "hangup-grace"
    TAIL_FLUSH = "tail-flush"
    DTMF = "dtmf"
    IDLE = "idle"


# ------------------------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class SendToAgent:
    """A message to the agent: ``bytes`` are caller audio, ``str`` a JSON control message."""

    data: bytes | str


@dataclass(frozen=True, slots=True)
class SendToCaller:
    """A text frame to the caller's socket (a ``media`` event, or a browser-page event)."""

    text: str


@dataclass(frozen=True, slots=True)
class ClearCaller:
    """Twilio ``clear``: drop the audio queued for playback."""

    text: str


@dataclass(frozen=True, slots=True)
class MarkCaller:
    """Twilio ``mark``: echoed when playback reaches it."""

    name: str
    text: str


@dataclass(frozen=True, slots=True)
class OpenAgent:
    """Open a new agent WebSocket; report ``agent_connected`` or ``agent_open_failed``."""

    resuming: bool


@dataclass(frozen=True, slots=True)
class CloseAgent:
    """Close the current agent socket (after what was sent to it); ignore its later events."""


@dataclass(frozen=True, slots=True)
class StartFunction:
    call: agent.FunctionCall


@dataclass(frozen=True, slots=True)
class CancelFunction:
    call_id: str


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Call ``timer_fired(timer, now)`` at clock value ``at``; re-arming replaces the old one."""

    timer: Timer
    at: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer: Timer


@dataclass(frozen=True, slots=True)
class PauseCaller:
    """Stop reading the caller's socket: the audio held for the agent is at its cap."""


@dataclass(frozen=True, slots=True)
class ResumeCaller:
    pass


@dataclass(frozen=True, slots=True)
class Identify:
    """Twilio said which call this is: name the log lines and the record after ``call_sid``."""

    call_sid: str


@dataclass(frozen=True, slots=True)
class Record:
    """Add one event line to the call record."""

    event: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Log:
    """One log line; every argument that came from a peer is already escaped and cut."""

    level: int
    message: str
    args: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class HangUp:
    """End the call: close both sockets, settle running functions, write the record.

    ``fallback``: first move the call to the apology and the fallback line (REST API).
    """

    reason: str
    fallback: bool = False


@dataclass(frozen=True, slots=True)
class TransferCall:
    """Move the live call to ``<Dial>TRANSFER_NUMBER``; report ``transfer_finished``."""

    reason: str


Action = (
    SendToAgent
    | SendToCaller
    | ClearCaller
    | MarkCaller
    | OpenAgent
    | CloseAgent
    | StartFunction
    | CancelFunction
    | ArmTimer
    | CancelTimer
    | PauseCaller
    | ResumeCaller
    | Identify
    | Record
    | Log
    | HangUp
    | TransferCall
)
NO_ACTIONS: Sequence[Action] = ()


@dataclass(slots=True)
class RunningFunction:
    call: agent.FunctionCall
    generation: int
    is_async: bool


class _HistoryEntry:
    __slots__ = ("key", "item", "from_deepgram", "unmatched")

    def __init__(self, key: str, item: str, from_deepgram: bool, unmatched: tuple[str, ...]) -> None:
        self.key = key  # a turn's item is its own key: no second copy of the text
        self.item = item
        self.from_deepgram = from_deepgram
        self.unmatched = unmatched  # what the other side's copy has yet to match


def _history_parts(key: str) -> tuple[str, ...]:
    """A function-calls key names each call; Deepgram may put several calls in one item."""
    if key.startswith("f:"):
        return tuple(f"f:{call_id}" for call_id in key[2:].split(","))
    return (key,)


class ResumeHistory:
    """The conversation so far, for a resumed session's ``agent.context.messages``.

    Deepgram sends ``History`` messages as the conversation goes, server-side function calls
    included: those are the faithful record and are preferred. The bridge keeps its own copy of
    each turn (``ConversationText``) and each client-side function call, used only where
    Deepgram's is missing (``flags.history`` off, a message lost in a drop). Each item has a key
    (``agent_protocol.history_item``); the two copies of one thing are matched within a short
    window, whichever comes first, and Deepgram's text wins. Items are JSON text: a call holds
    one per turn for as long as it lasts, and text is half the memory of dicts.
    """

    def __init__(self) -> None:
        self._entries: list[_HistoryEntry] = []
        # Keys of what a new session was given as context, which Deepgram may echo as History.
        self._replay: deque[str] = deque()

    def ours(self, key: str, item: str) -> None:
        parts = _history_parts(key)
        for entry in self._recent():
            if entry.from_deepgram and set(parts) <= set(entry.unmatched):
                entry.unmatched = tuple(part for part in entry.unmatched if part not in parts)
                return
        self._append(_HistoryEntry(key, item, False, parts))

    def theirs(self, key: str, item: str) -> None:
        """Deepgram's item; skipped if it only echoes context the session was given."""
        if self._replay:
            if self._replay[0] == key:
                self._replay.popleft()
                return
            self._replay.clear()
        unmatched = set(_history_parts(key))
        replaced: _HistoryEntry | None = None
        for entry in self._recent():
            if not entry.from_deepgram and entry.unmatched and set(entry.unmatched) <= unmatched:
                unmatched -= set(entry.unmatched)
                if replaced is None:
                    replaced = entry
                else:  # Deepgram put several of our calls in one item: it replaces them all
                    self._entries.remove(entry)
        left = tuple(part for part in _history_parts(key) if part in unmatched)
        if replaced is None:
            self._append(_HistoryEntry(key, item, True, left))
        else:
            replaced.key, replaced.item, replaced.from_deepgram, replaced.unmatched = key, item, True, left

    def given_as_context(self, keys: list[str]) -> None:
        """A new session starts from these items; echoes of them are not new history."""
        self._replay = deque(keys)

    def conversation_moved_on(self) -> None:
        self._replay.clear()

    def keys(self) -> list[str]:
        return [entry.key for entry in self._entries]

    def items(self) -> list[str]:
        return [entry.item for entry in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> str:
        return self._entries[index].item

    def _recent(self) -> list[_HistoryEntry]:
        return self._entries[:-HISTORY_MATCH_WINDOW - 1:-1]

    def _append(self, entry: _HistoryEntry) -> None:
        self._entries.append(entry)
        if len(self._entries) > MAX_HISTORY_ITEMS:
            del self._entries[0]


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class Call:
    """One call's rules. See the module docstring for what each phase means."""

    def __init__(
        self,
        settings: Settings,
        agent_settings: dict[str, Any],
        settings_json: str,
        async_functions: frozenset[str] = frozenset(),
        *,
        browser: bool = False,
        agents: AgentCatalog | None = None,
    ) -> None:
        self.settings = settings
        self.agent_settings = agent_settings
        self.settings_json = settings_json  # the Settings message of a fresh session, encoded once
        # The agents as they were when the call was admitted: a reload later changes only new calls.
        # With them, the start event picks the agent and fills in its placeholders.
        self.agents = agents
        self.async_functions = async_functions
        self.browser = browser
        self.phase = Phase.WAITING_FOR_START
        self.end_reason: str | None = None
        self.stream: twilio.StreamStart | None = None
        self.outbound: twilio.TwilioOutbound | None = None
        self.caller_gone = False

        # The agent session.
        self.agent_ready = False
        self.agent_stage: str | None = None  # what the attempt in progress waits for
        self.generation = 0  # bumped per ready session; answers for an older one are not sent
        self.attempt = 0  # resume attempts made for the current drop
        self.history = ResumeHistory()
        self.request_ids: list[str] = []  # each session's Welcome request_id: what Deepgram support asks for
        self._error_resumes = 0
        self._agent_timeout = 0.0
        self._last_agent_send = 0.0

        # Caller audio on its way to the agent.
        self._buffer = bytearray()
        self._chunk_bytes = settings.inbound_buffer_bytes
        self._held: deque[bytes] = deque()  # chunks held until the agent is ready
        self._held_bytes = 0
        self._caller_paused = False

        # Turns, marks and hang-up.
        self.agent_turn_open = False  # the agent began a turn whose AgentAudioDone hasn't come
        self.audio_since_mark = 0
        self._marks_sent = 0
        self.marks_out: set[str] = set()  # sent, not yet echoed
        self.marks_cleared: set[str] = set()  # a clear made Twilio echo these unplayed
        self.hangup_requested = False
        self.hangup_call_id: str | None = None
        self.hangup_when_heard = False
        # What the goodbye leads to once heard: None hangs up; a reason transfers the call.
        self.transfer_reason: str | None = None
        self.transferring = False  # TransferCall returned; transfer_finished not yet
        self.voicemail = False
        self._hangup_reason = AGENT_HANGUP_REASON  # what the call ends as once the goodbye is heard

        # Keypad digits, silence and the texts injected into the conversation for them.
        self._digits: list[str] = []
        self._keypad_echoes: list[str] = []  # the newest KEYPAD_ECHOES_KEPT
        self._idle_stage = 0  # 0: waiting to re-prompt; 1: re-prompted, waiting to say goodbye
        self._injections_waiting: list[tuple[str, str]] = []  # (kind, message) until the agent is ready
        self._last_injection: tuple[str, str] | None = None
        self._injection_retry: tuple[str, str] | None = None
        self._injection_retried = False

        # Functions.
        self.functions: dict[str, RunningFunction] = {}
        self.withdrawn: set[str] = set()

        # What the record's summary says.
        self.bytes_from_caller = 0
        self.bytes_to_agent = 0
        self.bytes_to_caller = 0
        self.gap_bytes_dropped = 0
        self.bad_input: dict[str, int] = {}
        self.turns = 0
        self.barge_ins = 0
        self.function_calls = 0
        self.function_errors = 0
        self.warnings = 0
        self.errors = 0
        self.agent_latencies: list[float] = []
        self.latency_reports = 0
        self.keypad_entries = 0
        self.idle_reprompts = 0
        self._last_transfer_reason: str | None = None

    # ------------------------------------------------------------------------ the Twilio side

    def connected(self, now: float) -> list[Action]:
        """The caller's WebSocket is open."""
        return [
            Log(logging.INFO, "call connected%s", (" (browser phone)" if self.browser else "",)),
            ArmTimer(Timer.START, now + self.settings.start_timeout_seconds),
        ]

    def caller_text(self, text: str, now: float) -> Sequence[Action]:
        """One text frame from Twilio."""
        if self.caller_gone or self.phase is Phase.ENDED:
            return NO_ACTIONS  # after stop, nothing Twilio sends matters
        # The hot path, 50 times a second: caller audio once the stream has started.
        audio = twilio.fast_media_payload(text)
        if audio is not None and self.outbound is not None:
            return self._caller_audio(audio, now)
        return self._caller_event(text, now)

    def caller_binary(self, data: bytes, now: float) -> Sequence[Action]:
        if self.caller_gone or self.phase is Phase.ENDED:
            return NO_ACTIONS
        return self._reject("twilio", "binary", "Twilio sent a binary frame; Media Streams frames are JSON text")

    def caller_closed(self, now: float, *, stalled: bool = False) -> Sequence[Action]:
        """The caller's socket is gone (a close, a dropped connection, or cut off as stalled)."""
        if self.caller_gone or self.phase is Phase.ENDED:
            return NO_ACTIONS
        return self._caller_finished(now, "caller stopped reading" if stalled else "caller hung up")

    def _caller_event(self, text: str, now: float) -> Sequence[Action]:
        try:
            event, message = twilio.parse_event(text)
            started = self.outbound is not None
            if event == "media":
                if not started:
                    return self._reject("twilio", "media-before-start", "Twilio sent media before start")
                return self._caller_audio(twilio.media_payload(message), now)
            if event == "mark":
                if not started:
                    return self._reject("twilio", "mark-before-start", "Twilio sent a mark before start")
                return self._mark_echoed(twilio.mark_name(message), now)
            if event == "start":
                return self._on_start(twilio.parse_start(message), now)
            if event == "stop":
                actions = self._caller_finished(now, "caller hung up")
                actions.insert(0, Log(logging.INFO, "Twilio stopped the stream"))
                return actions
            if event == "dtmf":
                if not started:
                    return self._reject("twilio", "dtmf-before-start", "Twilio sent a dtmf event before start")
                return self._key_pressed(twilio.dtmf_digit(message), now)
            if event == "connected":
                return [Log(logging.DEBUG, "Twilio connected")]
            return self._reject("twilio", "unknown-event", f"unknown Twilio event {clean(event, 40)}")
        except twilio.TwilioProtocolError as exc:
            return self._reject("twilio", exc.kind, str(exc))

    def _on_start(self, stream: twilio.StreamStart, now: float) -> list[Action]:
        if self.stream is not None:
            return self._reject("twilio", "second-start", "Twilio sent a second start event")
        self.stream = stream
        self.outbound = twilio.TwilioOutbound(stream.stream_sid)
        params = sorted(stream.custom_parameters)
        started: dict[str, Any] = {"stream_sid": stream.stream_sid, "custom_parameters": stream.custom_parameters}
        chosen: list[Action] = []
        if self.agents is not None:
            choice = self.agents.for_call(stream.custom_parameters)
            started["agent"] = choice.name
            self.agent_settings, self.settings_json = choice.settings, choice.settings_json
            if choice.unknown is not None:
                chosen.append(
                    Log(logging.WARNING, "no agent is named %s: the call gets the default agent", (clean(choice.unknown, 64),))
                )
            chosen.append(Log(logging.INFO, "agent %s", (choice.name,)))
        actions: list[Action] = [
            CancelTimer(Timer.START),
            Identify(stream.call_sid),
            Log(
                logging.INFO,
                "stream %s started%s",
                (clean(stream.stream_sid, 64), f" with parameters {clean(params, 300)}" if params else ""),
            ),
            Record("start", started),
            *chosen,
        ]
        if stream.custom_parameters.get(MODE_PARAMETER) == VOICEMAIL_MODE:
            # An answering machine took an outbound call: the agent's greeting is the message,
            # and the call ends once it has been heard.
            self.voicemail = True
            self.settings_json = agent.voicemail_settings(self.agent_settings, self.settings.voicemail_message)
            self.hangup_requested = True
            actions.append(Log(logging.INFO, "leaving the voicemail message"))
        self.phase = Phase.OPENING_AGENT
        actions += self._open_agent(now, resuming=False)
        return actions

    def _caller_audio(self, audio: bytes, now: float) -> Sequence[Action]:
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
            actions += self._audio_to_agent(chunk, now)
        return actions

    def _audio_to_agent(self, chunk: bytes, now: float) -> Sequence[Action]:
        if self.agent_ready:
            self.bytes_to_agent += len(chunk)
            self._last_agent_send = now
            return (SendToAgent(chunk),)
        if self.phase is Phase.RESUMING:
            self.gap_bytes_dropped += len(chunk)
            return NO_ACTIONS
        self._held.append(chunk)
        self._held_bytes += len(chunk)
        if self._held_bytes >= self.settings.agent_queue_max_bytes and not self._caller_paused:
            self._caller_paused = True
            return (
                Log(
                    logging.WARNING,
                    "%d bytes of caller audio wait for the agent session; not reading the caller until it is ready",
                    (self._held_bytes,),
                ),
                PauseCaller(),
            )
        return NO_ACTIONS

    def _caller_finished(self, now: float, reason: str) -> list[Action]:
        """The caller is gone: every byte they sent still reaches the agent if it can."""
        self.caller_gone = True
        tail = bytes(self._buffer)
        self._buffer.clear()
        actions: list[Action] = []
        if self.transferring:
            # Twilio ends the stream when the call moves to <Dial>, often before the REST answer;
            # transfer_finished still records what the answer was.
            reason = "transferred"
        if self.agent_ready:
            if tail:
                actions += self._audio_to_agent(tail, now)
            actions += self._end(reason)
        elif self.phase is Phase.OPENING_AGENT:
            # The agent may still take what the caller said: wait a moment for it.
            if tail:
                self._held.append(tail)
                self._held_bytes += len(tail)
            self.end_reason = reason
            actions.append(ArmTimer(Timer.TAIL_FLUSH, now + TAIL_FLUSH_SECONDS))
        else:
            actions += self._end(reason)
        return actions

    def _mark_echoed(self, name: str | None, now: float) -> list[Action]:
        if name is not None and name in self.marks_cleared:
            # A clear makes Twilio echo every pending mark at once: that audio was never heard.
            self.marks_cleared.discard(name)
            return [Record("mark_cleared", {"name": name})]
        if name is None or name not in self.marks_out:
            return self._reject("twilio", "unknown-mark", "Twilio echoed a mark the bridge never sent")
        self.marks_out.discard(name)
        actions: list[Action] = [Record("mark_played", {"name": name})]
        if self.hangup_requested and name.startswith(HANGUP_MARK):
            actions += self._goodbye_heard()
        elif self.hangup_when_heard:
            actions += self._hang_up_if_all_heard()
        return actions + self._rearm_idle(now)

    # ------------------------------------------------------------------------- the agent side

    def agent_connected(self, now: float) -> Sequence[Action]:
        """The agent WebSocket of the attempt in progress is open; its Welcome comes next."""
        if self.phase is Phase.ENDED or self.agent_stage != "connecting":
            return NO_ACTIONS
        self.agent_stage = "welcome"
        return NO_ACTIONS

    def agent_open_failed(self, reason: str, now: float) -> Sequence[Action]:
        """The attempt in progress could not connect; ``reason`` is one sentence."""
        if self.phase is Phase.ENDED or self.agent_stage is None:
            return NO_ACTIONS
        return self._attempt_failed(reason, now)

    def agent_binary(self, audio: bytes, now: float) -> Sequence[Action]:
        """Agent speech: to the caller as it comes (Twilio queues it and plays it in order)."""
        outbound = self.outbound
        if not self.agent_ready or outbound is None or self.phase is Phase.ENDED:
            return NO_ACTIONS
        self.bytes_to_caller += len(audio)
        self.audio_since_mark += len(audio)
        return (SendToCaller(outbound.media(audio)),)

    def agent_text(self, text: str, now: float) -> Sequence[Action]:
        """One JSON message from the agent."""
        if self.phase is Phase.ENDED or self.agent_stage is None and not self.agent_ready:
            return NO_ACTIONS
        try:
            message = agent.parse_message(text)
            if not self.agent_ready:
                return self._agent_handshake(message, now)
            return self._agent_message(message, now)
        except agent.AgentProtocolError as exc:
            return self._reject("deepgram", exc.kind, str(exc))

    def agent_closed(self, code: int | None, reason: str | None, now: float, *, stalled: bool = False) -> Sequence[Action]:
        """The current agent socket is gone. ``code`` is the close code received, if any."""
        if self.phase is Phase.ENDED:
            return NO_ACTIONS
        code = code or 1006  # 1006: the connection was lost without a close frame
        if not self.agent_ready:
            if self.agent_stage is None:
                return NO_ACTIONS
            stage = self._stage_text()
            return self._attempt_failed(f"Deepgram closed the connection while {stage} (code {code})", now)
        self.agent_ready = False
        actions: list[Action] = [CancelTimer(Timer.KEEPALIVE)]
        if self.caller_gone:
            return actions + self._end(self.end_reason or "caller hung up")
        if stalled:
            actions.append(Log(logging.WARNING, "the agent stopped reading what the bridge sent; ending the call"))
            return actions + self._end("agent stopped reading")
        if code in RESUMABLE_CLOSE_CODES:
            self.errors += 1
            actions += [
                Log(logging.WARNING, "the agent connection dropped (close code %d); resuming", (code,)),
                Record("error", {"source": "deepgram", "code": code, "description": "connection dropped"}),
            ]
            return actions + self._start_resume(now)
        detail = f": {clean(reason, 120)}" if reason else ""
        actions.append(Log(logging.INFO, "Deepgram closed the session (code %d%s)", (code, detail)))
        return actions + self._end(f"Deepgram closed the session (code {code})", fallback=True)

    def _stage_text(self) -> str:
        return {
            "connecting": "connecting to Deepgram",
            "welcome": "waiting for Deepgram's Welcome",
            "settings": "waiting for SettingsApplied",
        }.get(self.agent_stage or "", "opening the session")

    def _open_agent(self, now: float, *, resuming: bool) -> list[Action]:
        timeout = self.settings.agent_connect_timeout_seconds
        if resuming:
            timeout = min(timeout, RECONNECT_HANDSHAKE_SECONDS)
        self._agent_timeout = timeout
        self.agent_stage = "connecting"
        return [ArmTimer(Timer.AGENT_OPEN, now + timeout), OpenAgent(resuming=resuming)]

    def _agent_handshake(self, message: dict[str, Any], now: float) -> list[Action]:
        kind = message["type"]
        if kind == "Welcome" and self.agent_stage == "welcome":
            self.agent_stage = "settings"
            request_id = clean(message.get("request_id"), 100)
            if len(self.request_ids) < MAX_REQUEST_IDS:
                self.request_ids.append(request_id)
            context_keys = agent.context_keys(self.agent_settings)
            if self.phase is Phase.RESUMING and not self.voicemail:
                settings = agent.settings_message(self.agent_settings, self.history.items())
                context_keys += self.history.keys()
            else:
                settings = self.settings_json  # a voicemail stream says its message again after a drop
            self.history.given_as_context(context_keys)
            return [
                Log(logging.INFO, "Deepgram session request_id %s", (request_id,)),
                Record("agent_session", {"request_id": request_id}),
                SendToAgent(settings),
            ]
        if kind == "SettingsApplied" and self.agent_stage == "settings":
            return self._agent_ready(now)
        if kind == "Error":
            code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
            return self._attempt_failed(f"Deepgram refused the session: {code}: {description}", now)
        if kind == "Warning":
            return self._on_warning(message)
        return []

    def _agent_ready(self, now: float) -> list[Action]:
        resumed = self.phase is Phase.RESUMING
        if resumed:
            # Less than a chunk may have gathered while the agent was away: as stale as the rest.
            self.gap_bytes_dropped += len(self._buffer)
            self._buffer.clear()
        self.agent_ready = True
        self.agent_stage = None
        self.generation += 1
        self.phase = Phase.CONVERSING
        self._last_agent_send = now
        actions: list[Action] = [
            CancelTimer(Timer.AGENT_OPEN),
            ArmTimer(Timer.KEEPALIVE, now + self.settings.keepalive_seconds),
            Log(logging.INFO, "agent session ready"),
        ]
        if resumed:
            actions += [
                Log(
                    logging.INFO,
                    "agent session resumed (attempt %d) with %d history items",
                    (self.attempt, len(self.history)),
                ),
                Record("agent_resumed", {"attempt": self.attempt, "history_items": len(self.history)}),
            ]
            self.attempt = 0
        # What the caller said while the first session opened goes out now, in order.
        while self._held:
            chunk = self._held.popleft()
            self.bytes_to_agent += len(chunk)
            actions.append(SendToAgent(chunk))
        self._held_bytes = 0
        if self._caller_paused:
            self._caller_paused = False
            actions.append(ResumeCaller())
        if self.voicemail and not resumed:
            bound = self.settings.hangup_timeout_seconds + VOICEMAIL_EXTRA_SECONDS
            actions.append(ArmTimer(Timer.HANGUP_FALLBACK, now + bound))
        if self.voicemail and not isinstance(self.agent_settings.get("agent"), dict):
            # A saved agent's greeting can't be replaced: the agent says the message instead.
            actions += self._inject("voicemail", agent.inject_agent_message(self.settings.voicemail_message))
        waiting, self._injections_waiting = self._injections_waiting, []
        for kind, text in waiting:  # keypad digits pressed while the session opened
            actions += self._inject(kind, text)
        actions += self._rearm_idle(now)
        if self.caller_gone:
            actions.append(CancelTimer(Timer.TAIL_FLUSH))
            actions += self._end(self.end_reason or "caller hung up")
        return actions

    def _attempt_failed(self, reason: str, now: float) -> list[Action]:
        self.agent_stage = None
        actions: list[Action] = [CancelTimer(Timer.AGENT_OPEN), CloseAgent()]
        if self.phase is Phase.RESUMING:
            attempts = 1 + len(self.settings.agent_reconnect_delays)
            actions.append(
                Log(logging.WARNING, "reconnect attempt %d of %d failed: %s", (self.attempt, attempts, reason))
            )
            if self.attempt < attempts and not self.caller_gone:
                return actions + self._next_attempt(now)
            actions.append(
                Log(logging.ERROR, "could not resume the agent session after %d attempts; ending the call", (attempts,))
            )
            return actions + self._end("agent connection lost", fallback=True)
        actions.append(Log(logging.ERROR, "could not start the agent session: %s", (reason,)))
        return actions + self._end(f"agent unavailable: {reason}", fallback=True)

    def _start_resume(self, now: float) -> list[Action]:
        self.phase = Phase.RESUMING
        self.attempt = 0
        # What queued while the agent was away is stale: it would be answered out of turn.
        self.gap_bytes_dropped += len(self._buffer)
        self._buffer.clear()
        # A turn the lost session was speaking gets no AgentAudioDone: its end is marked now, so
        # that the silence clock (and a pending hang-up) go on once the caller has heard it.
        actions = self._end_turn(now) if self._agent_speaking() else []
        if self.functions:
            # A function still running (an order being placed) must be in the history the new
            # session starts from, or the agent never learns its result and may ask again.
            return actions + [ArmTimer(Timer.FUNCTIONS_WAIT, now + self.settings.function_timeout_seconds + 1)]
        return actions + self._next_attempt(now)

    def _next_attempt(self, now: float) -> list[Action]:
        delays = (0.0, *self.settings.agent_reconnect_delays)
        delay = delays[self.attempt]
        self.attempt += 1
        if delay <= 0:
            return self._open_agent(now, resuming=True)
        return [ArmTimer(Timer.RECONNECT, now + delay)]

    def _agent_message(self, message: dict[str, Any], now: float) -> Sequence[Action]:
        kind = message["type"]
        if kind == "UserStartedSpeaking":
            return self._barge_in(now)
        if kind == "ConversationText":
            return self._conversation_text(message, now)
        if kind == "AgentAudioDone":
            return self._agent_audio_done(now)
        if kind == "FunctionCallRequest":
            return self._function_call_request(message, now)
        if kind == "FunctionCallCancelled":
            return self._function_call_cancelled(message, now)
        if kind == "AgentStartedSpeaking":
            return self._agent_started_speaking(message)
        if kind == "History":
            return self._history(message)
        if kind == "LatencyReport":
            return self._latency_report(message)
        if kind == "InjectionRefused":
            return self._injection_refused(message)
        if kind == "Warning":
            return self._on_warning(message)
        if kind == "Error":
            return self._error_mid_call(message, now)
        # Welcome, AgentThinking, PromptUpdated and types that don't exist yet.
        return [Log(logging.DEBUG, "agent message %s", (clean(kind, 40),))]

    def _error_mid_call(self, message: dict[str, Any], now: float) -> list[Action]:
        """Deepgram ends a session on every Error: resume it, as after a drop, a bounded number of times."""
        code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
        self.errors += 1
        self._error_resumes += 1
        actions: list[Action] = [Record("error", {"source": "deepgram", "code": code, "description": description})]
        if self._error_resumes > MAX_ERROR_RESUMES or self.caller_gone:
            actions.append(Log(logging.ERROR, "Deepgram error %s: %s; ending the call", (code, description)))
            return actions + self._end(f"Deepgram error {code}", fallback=True)
        self.agent_ready = False
        actions += [
            Log(
                logging.WARNING,
                "Deepgram error %s: %s; resuming the session (%d of %d)",
                (code, description, self._error_resumes, MAX_ERROR_RESUMES),
            ),
            CancelTimer(Timer.KEEPALIVE),
            CloseAgent(),
        ]
        return actions + self._start_resume(now)

    def _history(self, message: dict[str, Any]) -> list[Action]:
        parsed = agent.history_item(message, MAX_TEXT_CHARS)
        if parsed is None:
            return self._reject("deepgram", "bad-history", "a History message that is neither a turn nor function calls")
        self.history.theirs(*parsed)
        return []

    def _latency_report(self, message: dict[str, Any]) -> list[Action]:
        figures = {key: _number(message.get(key)) for key in agent.LATENCY_REPORT_FIELDS}
        self.latency_reports += 1
        actions: list[Action] = [Record("latency_report", figures)]
        if self.browser:
            actions.append(SendToCaller(json.dumps({"event": "latency_report", **figures})))
        return actions

    def _on_warning(self, message: dict[str, Any]) -> list[Action]:
        code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
        self.warnings += 1
        return [
            Log(logging.WARNING, "Deepgram warning %s: %s", (code, description)),
            Record("warning", {"code": code, "description": description}),
        ]

    def _barge_in(self, now: float) -> list[Action]:
        assert self.outbound is not None
        if self.voicemail:
            return [Log(logging.DEBUG, "speech during the voicemail message: the machine is recording; not clearing")]
        self.marks_cleared |= self.marks_out
        self.marks_out.clear()
        self.audio_since_mark = 0  # Twilio drops what it had not played
        self.agent_turn_open = False
        self.barge_ins += 1
        actions: list[Action] = [
            ClearCaller(self.outbound.clear()),
            Record("barge_in", {}),
            Log(logging.DEBUG, "barge-in: cleared the caller's playback"),
        ]
        actions += self._cancel_hangup("the caller spoke during the goodbye", now)
        return actions + self._rearm_idle(now, caller_active=True)

    def _conversation_text(self, message: dict[str, Any], now: float) -> list[Action]:
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return self._reject("deepgram", "bad-conversation-text", "a ConversationText without role and content")
        role, content = agent.turn(role, content, MAX_TEXT_CHARS)
        self.turns += 1
        self.history.conversation_moved_on()
        item = agent.history_text(role, content)
        self.history.ours(item, item)
        shown = content
        if role == "user" and content in self._keypad_echoes:
            # The agent's echo of injected keypad digits: they may be a PIN, kept out of logs and records.
            self._keypad_echoes.remove(content)
            shown = KEYPAD_REDACTED
        actions: list[Action] = [
            Log(logging.INFO, "%s: %s", ("User" if role == "user" else "Agent", clean(shown, 300))),
            Record("transcript", {"role": role, "content": shown}),
        ]
        if self.browser:
            actions.append(SendToCaller(json.dumps({"event": "transcript", "role": role, "content": shown})))
        if role == "user":
            actions += self._rearm_idle(now, caller_active=True)
        return actions

    def _agent_started_speaking(self, message: dict[str, Any]) -> list[Action]:
        self.agent_turn_open = True
        latencies = {key: _number(message.get(key)) for key in ("total_latency", "tts_latency", "ttt_latency")}
        total = latencies["total_latency"]
        if total is not None:
            self.agent_latencies.append(total)
        actions: list[Action] = [Record("agent_started_speaking", latencies), *self._stop_idle()]
        if self.browser:
            actions.append(SendToCaller(json.dumps({"event": "agent_latency", **latencies})))
        return actions

    def _agent_audio_done(self, now: float) -> list[Action]:
        actions = self._end_turn(now)
        retry, self._injection_retry = self._injection_retry, None
        if retry is not None and self._still_wanted(retry[0]):
            # Refused earlier (the agent was busy); now it has finished speaking. Only once.
            actions += self._inject(*retry)
            self._injection_retried = True
        return actions

    def _end_turn(self, now: float) -> list[Action]:
        """The agent's turn is over (AgentAudioDone, or its session lost mid-turn): mark its end."""
        assert self.outbound is not None
        self.agent_turn_open = False
        # A mark tells when the caller has actually heard the turn: AgentAudioDone only means sent.
        self._marks_sent += 1
        actions: list[Action] = []
        if self.hangup_requested:
            name = f"{HANGUP_MARK}-{self._marks_sent}"
            # Twilio plays in real time what it was sent faster: allow for what is still queued there.
            queued_seconds = self.audio_since_mark / MULAW_BYTES_PER_SECOND
            actions.append(ArmTimer(Timer.HANGUP_FALLBACK, now + self.settings.hangup_timeout_seconds + queued_seconds))
        else:
            name = f"{TURN_MARK}-{self._marks_sent}"
        self.audio_since_mark = 0
        self.marks_out.add(name)
        actions.append(MarkCaller(name, self.outbound.mark(name)))
        return actions

    # ------------------------------------------------------------------------------ functions

    def _function_call_request(self, message: dict[str, Any], now: float) -> list[Action]:
        calls, malformed = agent.client_side_calls(message)
        self.history.conversation_moved_on()
        actions: list[Action] = self._stop_idle()
        if malformed:
            actions += self._reject("deepgram", "bad-function-call", "a FunctionCallRequest entry without a usable id and name")
        for call in calls:
            if call.name == "end_call":
                actions += self._end_call_requested(call, now)
            elif call.name == "transfer_call":
                actions += self._transfer_requested(call, now)
            elif call.id in self.functions:
                actions += self._reject("deepgram", "duplicate-function-id", "a second FunctionCallRequest for a running id")
            else:
                self.functions[call.id] = RunningFunction(call, self.generation, call.name in self.async_functions)
                actions += [Log(logging.INFO, "agent calls %s", (clean(call.name, 60),)), StartFunction(call)]
        return actions

    def _function_call_cancelled(self, message: dict[str, Any], now: float) -> list[Action]:
        actions: list[Action] = []
        for call_id in agent.cancelled_ids(message):
            if call_id == self.hangup_call_id:
                actions += self._cancel_hangup("the agent cancelled end_call", now)
            running = self.functions.get(call_id)
            if running is None or call_id in self.withdrawn:
                continue
            self.withdrawn.add(call_id)
            actions.append(Record("function_cancelled", {"id": call_id, "name": running.call.name}))
            if running.is_async:
                actions += [
                    Log(logging.INFO, "agent cancelled %s; cancelling it", (clean(running.call.name, 60),)),
                    CancelFunction(call_id),
                ]
            else:
                # Stopping a thread halfway could leave an order half placed: it finishes, unanswered.
                actions.append(
                    Log(logging.INFO, "agent cancelled %s; it finishes, unanswered", (clean(running.call.name, 60),))
                )
        return actions

    def function_finished(self, call_id: str, outcome: FunctionOutcome, now: float) -> Sequence[Action]:
        """A function started by ``StartFunction`` returned, failed, timed out or was cancelled."""
        running = self.functions.pop(call_id, None)
        if running is None:
            return NO_ACTIONS
        call = running.call
        withdrawn = call_id in self.withdrawn
        self.withdrawn.discard(call_id)
        self.function_calls += 1
        if outcome.error is not None:
            self.function_errors += 1
        actions: list[Action] = [
            Record(
                "function_call",
                {
                    "name": call.name,
                    "arguments": call.arguments,
                    "result": outcome.result,
                    "error": outcome.error,
                    "outcome": outcome.outcome,
                    "duration_seconds": round(outcome.duration_seconds, 4),
                    "withdrawn": withdrawn,
                },
            )
        ]
        if self.phase is Phase.ENDED:
            return actions
        self.history.ours(f"f:{call.id}", agent.history_function_call(call, outcome.content))
        if not withdrawn:
            if running.generation == self.generation and self.agent_ready:
                actions.append(SendToAgent(agent.function_call_response(call, outcome.content)))
            else:
                actions.append(
                    Log(
                        logging.INFO,
                        "%s finished after the agent session was replaced; its result is in the history",
                        (clean(call.name, 60),),
                    )
                )
            actions.append(Log(logging.DEBUG, "%s answered in %.3f s", (clean(call.name, 60), outcome.duration_seconds)))
            if self.browser:
                actions.append(
                    SendToCaller(
                        json.dumps(
                            {
                                "event": "function_call",
                                "name": call.name,
                                "arguments": _json_or_text(call.arguments),
                                "result": json.loads(outcome.content),  # exactly what the agent was told
                                "duration_ms": round(outcome.duration_seconds * 1000, 1),
                            }
                        )
                    )
                )
        if self.phase is Phase.RESUMING and not self.functions and self.agent_stage is None and self.attempt == 0:
            actions += [CancelTimer(Timer.FUNCTIONS_WAIT), *self._next_attempt(now)]
        return actions + self._rearm_idle(now)

    def function_finished_late(self, call: agent.FunctionCall, outcome: FunctionOutcome) -> Sequence[Action]:
        """A ``def`` abandoned at its timeout, or by the hang-up, has returned after all."""
        return (
            Record(
                "function_finished_late",
                {
                    "id": call.id,
                    "name": call.name,
                    "result": outcome.result,
                    "error": outcome.error,
                    "duration_seconds": round(outcome.duration_seconds, 4),
                },
            ),
        )

    def _transfer_requested(self, call: agent.FunctionCall, now: float) -> list[Action]:
        if not self.settings.transfer_enabled or self.voicemail or self.browser:
            self.function_calls += 1
            self.function_errors += 1
            answer = {"error": "Transferring calls is not set up on this line."}
            return [
                SendToAgent(agent.function_call_response(call, json.dumps(answer))),
                Record("function_call", {"name": call.name, "arguments": call.arguments, "result": None,
                                         "error": answer["error"], "outcome": "error", "duration_seconds": 0.0,
                                         "withdrawn": False}),
            ]
        # Only a reason is taken from the agent, for the record; never a number to dial.
        reason = _argument_text(call.arguments, "reason") or "the agent transferred the call"
        self.transfer_reason = self._last_transfer_reason = reason
        return self._departure_requested(
            call,
            now,
            {"result": "The caller will be transferred to a pharmacist once your last words have played."},
            "agent asked to transfer the call; transferring after its last words have played",
        )

    def _end_call_requested(self, call: agent.FunctionCall, now: float) -> list[Action]:
        self.transfer_reason = None
        self._hangup_reason = AGENT_HANGUP_REASON
        return self._departure_requested(
            call,
            now,
            {"result": "The call will end after your goodbye has played."},
            "agent asked to end the call; hanging up after its goodbye has played",
        )

    def _departure_requested(
        self, call: agent.FunctionCall, now: float, answer: dict[str, str], log_line: str
    ) -> list[Action]:
        """end_call or transfer_call: answered at once, carried out once the last words are heard."""
        self.function_calls += 1
        self.hangup_requested = True
        self.hangup_call_id = call.id
        self.hangup_when_heard = False  # a repeated request gets a fresh grace
        actions: list[Action] = [
            Log(logging.INFO, log_line),
            *self._stop_idle(),
            SendToAgent(agent.function_call_response(call, json.dumps(answer))),
            Record(
                "function_call",
                {
                    "name": call.name,
                    "arguments": call.arguments,
                    "result": answer,
                    "error": None,
                    "outcome": "ok",
                    "duration_seconds": 0.0,
                    "withdrawn": False,
                },
            ),
            # If no AgentAudioDone follows (nothing more to say), hang up anyway.
            ArmTimer(Timer.HANGUP_FALLBACK, now + self.settings.hangup_timeout_seconds),
            CancelTimer(Timer.HANGUP_GRACE),  # a repeated end_call starts the grace afresh
        ]
        if not self._agent_speaking():
            # The goodbye was sent (and marked) before the request, as the prompt asks: once the
            # caller has heard it, and a moment has passed for any last words, hang up.
            actions.append(ArmTimer(Timer.HANGUP_GRACE, now + HANGUP_GRACE_SECONDS))
        return actions

    def _agent_speaking(self) -> bool:
        return self.agent_turn_open or self.audio_since_mark > 0

    def _hang_up_if_all_heard(self) -> list[Action]:
        if not self.marks_out and not self._agent_speaking():
            return self._goodbye_heard()
        return []

    def _goodbye_heard(self, *, confirmed: bool = True) -> list[Action]:
        """The agent's last words before leaving have played (or the wait for them is over)."""
        reason = self._hangup_reason if confirmed else f"{self._hangup_reason} (goodbye not confirmed)"
        if self.voicemail:
            return [Log(logging.INFO, "the voicemail message has played; hanging up"), *self._end(VOICEMAIL_MODE)]
        if self.transfer_reason is None:
            return [Log(logging.INFO, "the agent's goodbye has played; hanging up"), *self._end(reason)]
        why = self.transfer_reason
        self._forget_departure()
        self.transferring = True
        return [
            CancelTimer(Timer.HANGUP_FALLBACK),
            CancelTimer(Timer.HANGUP_GRACE),
            Log(logging.INFO, "the agent's last words have played; transferring the call"),
            TransferCall(why),
        ]

    def fallback_finished(self, dialled: str | None, error: str | None) -> Sequence[Action]:
        """The shell moved (or failed to move) the caller to the fallback after ``HangUp(fallback=True)``."""
        target = "fallback number" if dialled else "apology and hang-up"
        if error is not None:
            return [
                Log(logging.ERROR, "could not send the caller to the %s: %s", (target, error)),
                Record("fallback", {"to": target, "ok": False, "error": error}),
            ]
        return [Log(logging.INFO, "sent the caller to the %s", (target,)), Record("fallback", {"to": target, "ok": True, "error": None})]

    def transfer_finished(self, error: str | None, now: float) -> Sequence[Action]:
        """The REST update for ``TransferCall`` is done; ``error`` says why it failed, if it did."""
        if not self.transferring:
            return NO_ACTIONS
        self.transferring = False
        if self.phase is Phase.ENDED:  # the stream ended first, as Twilio ends it on a transfer
            if error is None:
                return [Record("transferred", {"reason": self._last_transfer_reason})]
            self.end_reason = "caller hung up during a failed transfer"
            return [Record("transfer_failed", {"reason": self._last_transfer_reason, "error": error})]
        if error is None:
            return [Record("transferred", {"reason": self._last_transfer_reason}), *self._end("transferred")]
        actions: list[Action] = [
            Log(logging.WARNING, "the transfer failed: %s; the agent tells the caller", (error,)),
            Record("transfer_failed", {"reason": self._last_transfer_reason, "error": error}),
        ]
        if self.agent_ready:
            actions += self._inject("transfer-failed", agent.inject_agent_message(TRANSFER_FAILED_MESSAGE))
        return actions + self._rearm_idle(now)

    def _forget_departure(self) -> None:
        """No end_call, transfer_call or silence goodbye is pending any more."""
        self.hangup_requested = False
        self.hangup_call_id = None
        self.hangup_when_heard = False
        self.transfer_reason = None
        self._hangup_reason = AGENT_HANGUP_REASON

    def _cancel_hangup(self, why: str, now: float) -> list[Action]:
        """The conversation goes on after end_call: the caller spoke, or the agent took it back."""
        if not self.hangup_requested or self.phase is Phase.ENDED:
            return []
        if self.voicemail:
            return []  # the message plays to the end whatever the machine does
        self._forget_departure()
        return [
            CancelTimer(Timer.HANGUP_FALLBACK),
            CancelTimer(Timer.HANGUP_GRACE),
            Log(logging.INFO, "not hanging up: %s", (why,)),
            Record("hangup_cancelled", {"reason": why}),
            *self._rearm_idle(now),
        ]

    # ------------------------------------------------------------ keypad, silence, injections

    def _key_pressed(self, digit: str, now: float) -> list[Action]:
        """A keypad digit. Digits go to the agent together, on # or after a pause."""
        if self.voicemail:
            return [Log(logging.DEBUG, "keypad digit during the voicemail message: ignored")]
        actions: list[Action] = [CancelTimer(Timer.DTMF)]
        if digit == "#":
            if not self._digits:
                self._digits.append(digit)  # # alone is an answer too ("press pound to confirm")
            actions += self._send_keypad_digits()
        else:
            if len(self._digits) >= MAX_DTMF_DIGITS:
                actions += self._send_keypad_digits()
            self._digits.append(digit)
            actions.append(ArmTimer(Timer.DTMF, now + self.settings.dtmf_timeout_seconds))
        return actions + self._rearm_idle(now, caller_active=True)

    def _send_keypad_digits(self) -> list[Action]:
        if not self._digits:
            return []
        words = " ".join(KEY_WORDS.get(digit, digit) for digit in self._digits)
        count = len(self._digits)
        self._digits.clear()
        text = f"The caller pressed {words}"
        self._keypad_echoes.append(text)
        del self._keypad_echoes[:-KEYPAD_ECHOES_KEPT]
        self.keypad_entries += 1
        # The digits may be a PIN: the log and the record say how many, never which.
        actions: list[Action] = [
            Log(logging.INFO, "caller entered %d keypad keys; passing them to the agent", (count,)),
            Record("dtmf", {"keys": count}),
        ]
        message = agent.inject_user_message(text)
        if not self.agent_ready:
            if len(self._injections_waiting) < MAX_DTMF_DIGITS:
                self._injections_waiting.append(("keypad", message))
            return actions
        return actions + self._inject("keypad", message)

    def _inject(self, kind: str, message: str) -> list[Action]:
        """Send an Inject* message; a refusal of it is retried once (``_injection_refused``)."""
        self._last_injection = (kind, message)
        self._injection_retried = False
        return [SendToAgent(message)]

    def _injection_refused(self, message: dict[str, Any]) -> list[Action]:
        last, self._last_injection = self._last_injection, None
        why = clean(message.get("message"), 200)
        if last is None:
            return [Log(logging.DEBUG, "Deepgram refused an injection: %s", (why,))]
        kind = last[0]
        if self._injection_retried or self._injection_retry is not None:
            return [
                Log(logging.WARNING, "Deepgram refused the %s message again (%s); not retrying", (kind, why)),
                Record("injection_refused", {"kind": kind, "retry": False}),
            ]
        self._injection_retry = last
        return [
            Log(logging.INFO, "Deepgram refused the %s message (%s); retrying once the agent has spoken", (kind, why)),
            Record("injection_refused", {"kind": kind, "retry": True}),
        ]

    def _still_wanted(self, kind: str) -> bool:
        """A refused injection still makes sense: the caller hasn't spoken since the re-prompt."""
        if kind == "idle-reprompt":
            return self._idle_stage == 1 and not self.hangup_requested
        if kind == "idle-goodbye":
            return self.hangup_requested and self._hangup_reason == IDLE_HANGUP_REASON
        return True

    def _caller_may_be_idle(self) -> bool:
        """Nobody is talking and nothing is under way: the silence is the caller's."""
        return (
            self.phase is Phase.CONVERSING
            and self.agent_ready
            and not self.voicemail
            and not self.hangup_requested
            and not self.transferring
            and not self.functions
            and not self.marks_out
            and not self._agent_speaking()
        )

    def _rearm_idle(self, now: float, *, caller_active: bool = False) -> list[Action]:
        """(Re)start the silence clock from ``now`` if the caller is the one to speak next."""
        if self.settings.idle_reprompt_seconds <= 0:
            return []
        if caller_active:
            self._idle_stage = 0
        if not self._caller_may_be_idle():
            return [CancelTimer(Timer.IDLE)]
        wait = self.settings.idle_reprompt_seconds if self._idle_stage == 0 else self.settings.idle_hangup_seconds
        return [ArmTimer(Timer.IDLE, now + wait)]

    def _stop_idle(self) -> list[Action]:
        return [CancelTimer(Timer.IDLE)] if self.settings.idle_reprompt_seconds > 0 else []

    def _caller_idle(self, now: float) -> list[Action]:
        if not self._caller_may_be_idle():
            return []  # something happened meanwhile; its event re-arms the clock
        if self._idle_stage == 0:
            self._idle_stage = 1
            self.idle_reprompts += 1
            seconds = self.settings.idle_reprompt_seconds
            return [
                Log(logging.INFO, "the caller has said nothing for %.0f s; the agent re-prompts", (seconds,)),
                Record("idle_reprompt", {"seconds": seconds}),
                *self._inject("idle-reprompt", agent.inject_agent_message(self.settings.idle_reprompt_message)),
                # Re-armed once the re-prompt has played; this one holds if it never plays.
                ArmTimer(Timer.IDLE, now + self.settings.idle_hangup_seconds),
            ]
        # Silent through the re-prompt too: the agent says goodbye and the call ends as with end_call.
        self._forget_departure()
        self.hangup_requested = True
        self._hangup_reason = IDLE_HANGUP_REASON
        return [
            Log(logging.INFO, "the caller is still silent; the agent says goodbye and the call ends"),
            Record("idle_hangup", {"seconds": self.settings.idle_hangup_seconds}),
            *self._inject("idle-goodbye", agent.inject_agent_message(self.settings.idle_goodbye_message)),
            ArmTimer(Timer.HANGUP_FALLBACK, now + self.settings.hangup_timeout_seconds),
        ]

    # --------------------------------------------------------------------------------- timers

    def timer_fired(self, timer: Timer, now: float) -> Sequence[Action]:
        if self.phase is Phase.ENDED:
            return NO_ACTIONS
        if timer is Timer.KEEPALIVE:
            return self._keepalive_due(now)
        if timer is Timer.START:
            seconds = self.settings.start_timeout_seconds
            return [
                Log(logging.WARNING, "Twilio sent no start event within %.0f s", (seconds,)),
                *self._end("no start event from Twilio"),
            ]
        if timer is Timer.AGENT_OPEN:
            if self.agent_stage is None:
                return NO_ACTIONS
            return self._attempt_failed(f"timed out after {self._agent_timeout:.1f} s {self._stage_text()}", now)
        if timer is Timer.RECONNECT:
            if self.caller_gone:
                return self._end(self.end_reason or "caller hung up")
            return self._open_agent(now, resuming=True)
        if timer is Timer.FUNCTIONS_WAIT:
            if self.phase is Phase.RESUMING and self.attempt == 0 and self.agent_stage is None:
                return self._next_attempt(now)
            return NO_ACTIONS
        if timer is Timer.HANGUP_FALLBACK:
            if not self.hangup_requested:
                return NO_ACTIONS
            return self._goodbye_heard(confirmed=False)
        if timer is Timer.HANGUP_GRACE:
            if self.hangup_requested and not self._agent_speaking():
                self.hangup_when_heard = True
                return self._hang_up_if_all_heard()
            # Otherwise the agent is speaking again, and the mark after its AgentAudioDone decides.
            return NO_ACTIONS
        if timer is Timer.TAIL_FLUSH:
            return self._end(self.end_reason or "caller hung up")
        if timer is Timer.DTMF:
            return self._send_keypad_digits()
        if timer is Timer.IDLE:
            return self._caller_idle(now)
        raise AssertionError(f"unknown timer {timer}")

    def _keepalive_due(self, now: float) -> Sequence[Action]:
        if not self.agent_ready:
            return NO_ACTIONS
        interval = self.settings.keepalive_seconds
        actions: list[Action] = []
        idle = now - self._last_agent_send
        if idle >= interval - 0.01:
            actions += [SendToAgent(agent.KEEPALIVE), Log(logging.DEBUG, "no audio for %.1f s: sent KeepAlive", (idle,))]
            self._last_agent_send = now
        actions.append(ArmTimer(Timer.KEEPALIVE, self._last_agent_send + interval))
        return actions

    # --------------------------------------------------------------------------------- ending

    def shutdown(self, now: float) -> Sequence[Action]:
        """The server is stopping and the drain time is over."""
        return self._end("server shutting down")

    def failed(self, now: float) -> Sequence[Action]:
        """The session itself hit a bug; end the call rather than leave it hanging."""
        return self._end("internal error")

    def _end(self, reason: str, *, fallback: bool = False) -> list[Action]:
        if self.phase is Phase.ENDED:
            return []
        self.phase = Phase.ENDED
        if self.end_reason is None:  # the first reason given is the one recorded
            self.end_reason = reason
        self.agent_ready = False
        actions: list[Action] = []
        if self.browser and not self.caller_gone:
            actions.append(SendToCaller(json.dumps({"event": "call_ended", "reason": self.end_reason})))
        # The caller is still there but the agent can't be: hand them to the fallback line.
        # Not while a transfer is under way (the last REST update would win), and never for the
        # browser phone, whose callSid is whatever the page says.
        send_to_fallback = (
            fallback
            and self.settings.rest_enabled
            and self.stream is not None
            and not self.caller_gone
            and not self.transferring
            and not self.browser
        )
        actions.append(HangUp(self.end_reason, fallback=send_to_fallback))
        return actions

    def _reject(self, source: str, kind: str, detail: str) -> list[Action]:
        """Count bad input for the record, and log the first of each kind; ``detail`` is ours."""
        key = f"{source}:{kind}"
        if key not in self.bad_input and len(self.bad_input) >= MAX_BAD_INPUT_KINDS:
            key = f"{source}:other"
        seen = self.bad_input.get(key, 0)
        self.bad_input[key] = seen + 1
        if seen:
            return []
        return [Log(logging.WARNING, "ignoring bad input: %s (further ones of this kind are counted, not logged)", (detail,))]

    def summary(self) -> dict[str, Any]:
        """The summary line's fields that this call knows."""
        stream = self.stream
        return {
            "call_sid": stream.call_sid if stream else None,
            "stream_sid": stream.stream_sid if stream else None,
            "custom_parameters": stream.custom_parameters if stream else {},
            "ended_by": self.end_reason,
            "audio_bytes_from_caller": self.bytes_from_caller,
            "audio_bytes_to_agent": self.bytes_to_agent,
            "audio_bytes_to_caller": self.bytes_to_caller,
            "audio_bytes_dropped_in_reconnect": self.gap_bytes_dropped,
            "bad_input": dict(self.bad_input),
            "turns": self.turns,
            "barge_ins": self.barge_ins,
            "function_calls": self.function_calls,
            "function_errors": self.function_errors,
            "warnings": self.warnings,
            "errors": self.errors,
            "agent_latency_p50": percentile(self.agent_latencies, 0.50),
            "agent_latency_p95": percentile(self.agent_latencies, 0.95),
            "latency_reports": self.latency_reports,
            "keypad_entries": self.keypad_entries,
            "idle_reprompts": self.idle_reprompts,
            "agent_request_ids": list(self.request_ids),
        }


def _argument_text(arguments: str, name: str, limit: int = 200) -> str | None:
    """A short text argument of a function call, if the agent gave one."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    text = value.get(name) if isinstance(value, dict) else None
    return " ".join(text.split())[:limit] if isinstance(text, str) and text.strip() else None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
