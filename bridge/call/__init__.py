"""One call's rules as small state machines with no I/O: events in, actions out, time passed in.

``Call`` (core.py) is the one event API; the machines it is made of, and the theory of
operation, are described there and in docs/architecture.md. This package's public names are
re-exported here.
"""

from .actions import (
    NO_ACTIONS,
    Action,
    ArmTimer,
    CancelFunction,
    CancelTimer,
    ClearCaller,
    CloseAgent,
    DialPharmacist,
    EndCallLeg,
    HangUp,
    Identify,
    Log,
    MarkCaller,
    NoteCallerLeft,
    OpenAgent,
    PauseCaller,
    Record,
    RedirectCall,
    ResumeCaller,
    SendToAgent,
    SendToCaller,
    StartFunction,
    StartRecording,
    StopWatchingForNote,
    Timer,
    TransferCall,
    UpdateRecording,
    WatchForNote,
)
from .agent_link import MAX_ERROR_RESUMES
from .core import Call
from .phase import Phase
from ..call_events import CallEnd, EndReason, RecordEvent

__all__ = [
    "MAX_ERROR_RESUMES", "NO_ACTIONS", "Action", "ArmTimer", "Call", "CallEnd", "CancelFunction",
    "CancelTimer", "ClearCaller", "CloseAgent", "DialPharmacist", "EndCallLeg", "EndReason",
    "HangUp", "Identify", "Log", "MarkCaller", "NoteCallerLeft", "OpenAgent", "PauseCaller",
    "Phase", "Record", "RecordEvent", "RedirectCall", "ResumeCaller", "SendToAgent", "SendToCaller",
    "StartFunction", "StartRecording", "StopWatchingForNote", "Timer", "TransferCall",
    "UpdateRecording", "WatchForNote",
]
