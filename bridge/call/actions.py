"""What the call's state machine asks its shell to do: the actions, and the timers they name.

Every method of ``Call`` returns a sequence of these, in the order they must be carried out.
They are plain frozen data, so a test compares them with ``==``; the shell (bridge/session.py)
matches on their type and does the I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..agent_protocol import FunctionCall
from ..call_events import CallEnd
from ..twilio import DEFAULT_SAY, SayVoice


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
    CONSULT = "consult"


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
    call: FunctionCall


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
    """Stop reading the caller's socket until ``ResumeCaller``."""


@dataclass(frozen=True, slots=True)
class ResumeCaller:
    """Read the caller's socket again."""


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
class RedirectCall:
    """Move the live call ``call_sid`` to ``twiml`` through Twilio's REST API (Calls update).

    The TwiML and the call it applies to are decided by the machine; the shell only sends it.
    """

    call_sid: str
    twiml: str


@dataclass(frozen=True, slots=True)
class HangUp:
    """End the call: close both sockets, settle running functions, write the record.

    ``fallback``: first move the caller to the apology and the fallback line, and report
    ``fallback_finished``; the stream closes after that, since closing it hangs up.
    """

    end: CallEnd
    fallback: RedirectCall | None = None


@dataclass(frozen=True, slots=True)
class TransferCall:
    """Carry out ``redirect`` (the caller to the transfer number); report ``transfer_finished``."""

    redirect: RedirectCall


@dataclass(frozen=True, slots=True)
class StartRecording:
    """Start recording the call ``call_sid`` (two channels); report ``recording_started``."""

    call_sid: str


@dataclass(frozen=True, slots=True)
class UpdateRecording:
    """Pause (skipping the span) or resume the call's current recording; report ``recording_updated``."""

    call_sid: str
    pause: bool


@dataclass(frozen=True, slots=True)
class DialPharmacist:
    """Call TRANSFER_NUMBER for a warm transfer and brief the pharmacist; report ``consult_dialled``."""

    caller_call_sid: str
    agent_name: str  # whose lines the callbacks answer the pharmacist with
    attempt: int  # this call's warm transfers are numbered from 1: each has its own note
    briefing: str  # what the pharmacist hears, the model's summary in it
    no_answer: str  # what they hear when they press no key
    voice: SayVoice = DEFAULT_SAY  # the language and voice Twilio reads both in (the agent's twilio_say)


@dataclass(frozen=True, slots=True)
class WatchForNote:
    """Read the note the pharmacist's answer leaves for this attempt until there is one; report ``consult_answered``."""

    caller_call_sid: str
    attempt: int


@dataclass(frozen=True, slots=True)
class StopWatchingForNote:
    """The transfer is over (answered, timed out or the caller gone): stop reading for its note."""


@dataclass(frozen=True, slots=True)
class NoteCallerLeft:
    """Leave the note that the caller hung up, for a pharmacist who presses 1 later (any process)."""

    caller_call_sid: str


@dataclass(frozen=True, slots=True)
class EndCallLeg:
    """Hang up another leg of the call (the pharmacist's) through the REST API."""

    call_sid: str


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
    | StartRecording
    | UpdateRecording
    | DialPharmacist
    | WatchForNote
    | StopWatchingForNote
    | NoteCallerLeft
    | EndCallLeg
)
NO_ACTIONS: Sequence[Action] = ()
