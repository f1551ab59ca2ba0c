"""Recording a call with consent: not a second of it before the caller has heard the notice.

With ``CALL_RECORDING=dual``, a call bound to its stream (control.py) is recorded in two channels
through Twilio's REST API, but only once a Twilio mark proves the notice (its agent's
``recording_notice`` line) has played: the notice opens the agent's greeting, or, for an agent
without one the bridge can change, is injected when the session is ready. A caller who hangs up
before then is never recorded. While the caller enters keypad digits the recording is paused, the
span skipped (a PIN is not in it), and resumed after the entry.

=================  =====================================================  =====================
stage              waits for                                              then
=================  =====================================================  =====================
OFF                (recording is off, or this call may not be recorded)
NOTICE_NEXT        the next agent turn to end: it carries the notice      NOTICE_MARKED
NOTICE_MARKED      the echo of that turn's mark: heard                    STARTING (StartRecording)
                   ... echoed as cleared (a barge-in cut the notice)      NOTICE_AGAIN
NOTICE_AGAIN       the agent to finish speaking: the notice is injected   NOTICE_NEXT
STARTING           ``recording_started``                                  RECORDING, or STOPPED
RECORDING          (keypad digits pause it: ``paused`` is the flag)
STOPPED            (failed, or the notice could not be got through)
=================  =====================================================  =====================

At most ``MAX_NOTICES`` attempts are made to have the notice heard; after that the call is not
recorded, and the record says why.
"""

from __future__ import annotations

import enum
import logging
from ..call_events import RecordEvent
from .actions import Action, Log, Record, StartRecording, UpdateRecording

# A caller who keeps talking over the notice is asked this many times, then not recorded.
MAX_NOTICES = 3


class RecordingStage(enum.Enum):
    OFF = "off"
    NOTICE_NEXT = "the next turn carries the notice"
    NOTICE_MARKED = "waiting for the notice's mark"
    NOTICE_AGAIN = "the notice is to be said again"
    STARTING = "starting"
    RECORDING = "recording"
    STOPPED = "stopped"


class Recording:
    __slots__ = ("stage", "paused", "recording_sid", "_notice_mark", "_notices", "_call_sid")

    def __init__(self) -> None:
        self.stage = RecordingStage.OFF
        self.paused = False
        self.recording_sid: str | None = None
        self._notice_mark: str | None = None
        self._notices = 0
        self._call_sid = ""

    def call_started(self, call_sid: str) -> None:
        """The call will be recorded once the notice is heard; the session's first turn carries it."""
        self._call_sid = call_sid
        self._notices = 1
        self.stage = RecordingStage.NOTICE_NEXT

    @property
    def needs_notice(self) -> bool:
        """The notice is to be injected (the agent has no greeting to carry it, or it was cut)."""
        return self.stage is RecordingStage.NOTICE_AGAIN

    def notice_injected(self) -> None:
        self.stage = RecordingStage.NOTICE_NEXT

    def notice_refused(self) -> None:
        """Deepgram refused the injected notice (someone was speaking): try again after the next turn."""
        if self.stage is RecordingStage.NOTICE_NEXT:
            self.stage = RecordingStage.NOTICE_AGAIN

    def turn_ended(self, mark_name: str) -> None:
        if self.stage is RecordingStage.NOTICE_NEXT:
            self._notice_mark = mark_name
            self.stage = RecordingStage.NOTICE_MARKED

    def mark_heard(self, name: str) -> list[Action]:
        if self.stage is not RecordingStage.NOTICE_MARKED or name != self._notice_mark:
            return []
        self.stage = RecordingStage.STARTING
        return [
            Log(logging.INFO, "the caller has heard the recording notice; starting the recording"),
            Record(RecordEvent.RECORDING_NOTICE_HEARD, {"mark": name}),
            StartRecording(self._call_sid),
        ]

    def mark_cleared(self, name: str) -> list[Action]:
        if self.stage is not RecordingStage.NOTICE_MARKED or name != self._notice_mark:
            return []
        if self._notices >= MAX_NOTICES:
            self.stage = RecordingStage.STOPPED
            return [
                Log(logging.INFO, "the caller spoke over the recording notice %d times; this call is not recorded", (self._notices,)),
                Record(RecordEvent.RECORDING_SKIPPED, {"reason": "the notice was never heard to the end"}),
            ]
        self._notices += 1
        self.stage = RecordingStage.NOTICE_AGAIN
        return [Log(logging.INFO, "the caller spoke over the recording notice; it is said again before recording")]

    def started(self, recording_sid: str | None, error: str | None) -> list[Action]:
        if self.stage is not RecordingStage.STARTING:
            return []
        if error is not None or recording_sid is None:
            self.stage = RecordingStage.STOPPED
            why = error or "the call had already ended"
            return [
                Log(logging.WARNING, "could not start recording the call: %s", (why,)),
                Record(RecordEvent.RECORDING_FAILED, {"error": why}),
            ]
        self.stage = RecordingStage.RECORDING
        self.recording_sid = recording_sid
        return [
            Log(logging.INFO, "recording the call (%s)", (recording_sid,)),
            Record(RecordEvent.RECORDING_STARTED, {"recording_sid": recording_sid}),
        ]

    def keypad_entry(self, entering: bool) -> list[Action]:
        """The caller began (``entering``) or finished an entry of keypad digits."""
        if self.stage is not RecordingStage.RECORDING or entering == self.paused:
            return []
        self.paused = entering
        return [UpdateRecording(self._call_sid, pause=entering)]

    def updated(self, pause: bool, error: str | None) -> list[Action]:
        event = RecordEvent.RECORDING_PAUSED if pause else RecordEvent.RECORDING_RESUMED
        if error is not None:
            verb = "pause" if pause else "resume"
            return [
                Log(logging.WARNING, "could not %s the recording: %s", (verb, error)),
                Record(event, {"ok": False, "error": error}),
            ]
        return [Record(event, {"ok": True, "error": None})]
