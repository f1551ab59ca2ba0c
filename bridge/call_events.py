"""The closed vocabularies a call shares with its record, the metrics and the webhook.

``EndReason`` is why a call ended: its ``text`` starts the record's ``ended_by`` sentence, and its
value is the record's ``end_reason`` and the ``ended_by`` label of ``bridge_calls_total``.
``RecordEvent`` names the lines of a call record. Both are the one place these names are
written: the state machine (and, for a recording's status, bridge/recordings.py) emits them,
bridge/records.py writes them, bridge/metrics.py counts them and bridge/webhook.py sorts them
into its payload, so rewording a log line can't change a label, and a test checks every reason
has one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class EndReason(enum.Enum):
    """Why a call ended. The value is the metric label; ``text`` the words in the record."""

    CALLER_HUNG_UP = "caller_hung_up"
    CALLER_STALLED = "caller_stalled"
    CALLER_SILENT = "caller_silent"
    AGENT_ENDED = "agent_ended"
    TRANSFERRED = "transferred"
    VOICEMAIL = "voicemail"
    AGENT_UNAVAILABLE = "agent_unavailable"
    AGENT_LOST = "agent_lost"
    AGENT_STALLED = "agent_stalled"
    AGENT_ERROR = "agent_error"
    AGENT_CLOSED = "agent_closed"
    NO_START = "no_start"
    STREAM_REFUSED = "stream_refused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"

    @property
    def text(self) -> str:
        return _TEXTS[self]


_TEXTS = {
    EndReason.CALLER_HUNG_UP: "caller hung up",
    EndReason.CALLER_STALLED: "caller stopped reading",
    EndReason.CALLER_SILENT: "caller silent",
    EndReason.AGENT_ENDED: "agent ended the call",
    EndReason.TRANSFERRED: "transferred",
    EndReason.VOICEMAIL: "voicemail",
    EndReason.AGENT_UNAVAILABLE: "agent unavailable",
    EndReason.AGENT_LOST: "agent connection lost",
    EndReason.AGENT_STALLED: "agent stopped reading",
    EndReason.AGENT_ERROR: "Deepgram error",
    EndReason.AGENT_CLOSED: "Deepgram closed the session",
    EndReason.NO_START: "no start event from Twilio",
    EndReason.STREAM_REFUSED: "stream refused",
    EndReason.SHUTDOWN: "server shutting down",
    EndReason.INTERNAL_ERROR: "internal error",
}


@dataclass(frozen=True, slots=True)
class CallEnd:
    """How a call ended: a reason and the detail that goes after its words in ``ended_by``.

    ``detail`` carries its own separator (``": Deepgram refused ..."``, ``" (code 1000)"``), so
    ``ended_by`` reads as one sentence: "agent unavailable: Deepgram refused the connection ...".
    """

    reason: EndReason
    detail: str = ""

    @property
    def ended_by(self) -> str:
        return self.reason.text + self.detail


class RecordEvent(enum.StrEnum):
    """The ``event`` of each line of a call record (docs/call-records.md)."""

    START = "start"
    AGENT_SESSION = "agent_session"
    AGENT_RESUMED = "agent_resumed"
    TRANSCRIPT = "transcript"
    AGENT_STARTED_SPEAKING = "agent_started_speaking"
    LATENCY_REPORT = "latency_report"
    BARGE_IN = "barge_in"
    MARK_PLAYED = "mark_played"
    MARK_CLEARED = "mark_cleared"
    FUNCTION_CALL = "function_call"
    FUNCTION_CANCELLED = "function_cancelled"
    FUNCTION_FINISHED_LATE = "function_finished_late"
    HANGUP_CANCELLED = "hangup_cancelled"
    TRANSFER_DIALLING = "transfer_dialling"
    TRANSFER_ACCEPTED = "transfer_accepted"
    TRANSFER_DECLINED = "transfer_declined"
    TRANSFERRED = "transferred"
    TRANSFER_FAILED = "transfer_failed"
    FALLBACK = "fallback"
    DTMF = "dtmf"
    IDLE_REPROMPT = "idle_reprompt"
    IDLE_HANGUP = "idle_hangup"
    INJECTION_REFUSED = "injection_refused"
    WARNING = "warning"
    ERROR = "error"
    RECORDING_NOTICE_HEARD = "recording_notice_heard"
    RECORDING_STARTED = "recording_started"
    RECORDING_PAUSED = "recording_paused"
    RECORDING_RESUMED = "recording_resumed"
    RECORDING_FAILED = "recording_failed"
    RECORDING_SKIPPED = "recording_skipped"
    SUMMARY = "summary"
    # Added by Twilio's recording callback (bridge/recordings.py), usually after the summary.
    RECORDING = "recording"
