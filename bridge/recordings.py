"""Twilio's recording status callback (``POST /twilio/recording``): what became of a call's recording.

When a call is recorded (``CALL_RECORDING=dual``: the call starts a two-channel recording through
Twilio's REST API once the caller has heard the notice), Twilio reports on the recording to the
URL ``recording_callback_url`` gave it: going on (``in-progress``), ready (``completed``), or come
to nothing (``absent``, with ``ErrorCode`` 16101, too short, or 16102, silent). Such a callback may
reach any process of the deployment, most often after the call has ended, so ``RecordingCallback``
keeps nothing about calls in memory:

- The URL names the call's record file (``?record=20261206T051502_CA….jsonl``, signed by Twilio
  with the rest). The name is checked against the pattern ``CallRecord`` names files by, and
  must belong to the callback's CallSid, so no callback can reach a file outside ``CALLS_DIR`` or
  another call's record.
- Twilio's signatures carry no nonce: each (RecordingSid, RecordingStatus) is acted on once in
  the whole deployment (``call_control.claim_once``), whichever process it reaches, however often.
- The status becomes one ``recording`` line of the call's record (bridge/records.py's encoding
  and writer thread), if that record is in this process's ``CALLS_DIR``; the file is never
  created here. The line usually follows the summary: a recording completes after its call.
- ``completed`` and ``absent`` also go to ``CALL_WEBHOOK_URL`` as a ``recording.completed`` event,
  through the server's ``WebhookSender``, signed like ``call.ended``.

The request is checked and answered at once (204); the work (claim, record line, webhook) runs in
a task, bounded and awaited at shutdown like the answering machine's (``CallbackWork``).
docs/protocols.md section 7 has the REST API and callback facts; docs/call-control.md the feature.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import parse_qs, urlencode, urlsplit

from .call_control import CallbackWork, check_signature, claim_once, form_parameters
from .call_events import RecordEvent
from .settings import Settings
from .logsafe import clean
from .records import RECORD_NAME, RecordWriter, record_line
from .storage.shared import SharedState
from .transport import HttpReply, HttpRequest
from .twilio import CALL_SID, RECORDING_SID
from .webhook import WebhookSender, recording_completed_payload

logger = logging.getLogger("bridge.recordings")

RECORDING_PATH: Final = "/twilio/recording"
# The query parameter naming the call's record file.
RECORD_PARAMETER: Final = "record"
# What Twilio says a recording is (docs/protocols.md section 7); those that end it go to the webhook.
RECORDING_STATUSES: Final = frozenset({"in-progress", "paused", "stopped", "processing", "completed", "absent"})
FINAL_STATUSES: Final = frozenset({"completed", "absent"})
# Why a recording is absent, in words, for the log.
ABSENT_REASONS: Final = {16101: "too short", 16102: "silent"}
_DURATION: Final = re.compile(r"-1|[0-9]{1,9}")  # seconds; -1 while it is not known yet
_ERROR_CODE: Final = re.compile(r"[0-9]{1,6}")
_SOURCE: Final = re.compile(r"[A-Za-z]{1,40}")  # StartCallRecordingAPI, DialVerb, …
_CHANNELS: Final = {"1": 1, "2": 2}
# Twilio's recording URLs are about 120 characters; a start time in RFC 2822 about 31.
MAX_URL_CHARS: Final = 2000
MAX_START_TIME_CHARS: Final = 64


class BadCallback(ValueError):
    """A callback field of the wrong shape: the one sentence answered with 400."""


@dataclass(frozen=True, slots=True)
class RecordingStatus:
    """One recording status callback, checked: what the record line and the webhook say."""

    call_sid: str
    recording_sid: str
    status: str
    url: str | None
    duration_seconds: int | None
    channels: int | None
    start_time: str | None  # ISO 8601 when Twilio's RFC 2822 time could be read, else as sent
    source: str | None
    error_code: int | None

    def record_fields(self) -> dict[str, Any]:
        """The fields of the record's ``recording`` line (after ``time`` and ``event``)."""
        return {
            "status": self.status,
            "recording_sid": self.recording_sid,
            "url": self.url,
            "duration_seconds": self.duration_seconds,
            "channels": self.channels,
            "start_time": self.start_time,
            "error_code": self.error_code,
        }

    def webhook_body(self) -> bytes:
        return recording_completed_payload(
            call_sid=self.call_sid,
            recording_sid=self.recording_sid,
            status=self.status,
            url=self.url,
            duration_seconds=self.duration_seconds,
            channels=self.channels,
            error_code=self.error_code,
        )

    def describe(self) -> str:
        """``completed (42 s, 2 channels)``, ``absent (error 16102: silent)``: for one log line."""
        details = []
        if self.duration_seconds is not None:
            details.append(f"{self.duration_seconds} s")
        if self.channels is not None:
            details.append(f"{self.channels} channel{'' if self.channels == 1 else 's'}")
        if self.error_code is not None:
            reason = ABSENT_REASONS.get(self.error_code)
            details.append(f"error {self.error_code}" + (f": {reason}" if reason else ""))
        return self.status + (f" ({', '.join(details)})" if details else "")


def check_record_name(record_name: str, call_sid: str) -> str:
    """``record_name`` if it is a record file's name (``CallRecord``'s pattern) for ``call_sid``; else ValueError.

    The name then has no ``/`` and no ``..``: joined to ``CALLS_DIR`` it names a file in it.
    """
    if not RECORD_NAME.fullmatch(record_name) or not record_name.endswith(f"_{call_sid}.jsonl"):
        raise ValueError(f"not the name of a call record of {call_sid}: {clean(record_name, 80)!r}")
    return record_name


def recording_callback_url(settings: Settings, record_name: str | None) -> str:
    """Where Twilio reports on a call's recording: ``{public_base_url}/twilio/recording?record=<file name>``.

    ``record_name`` is the name of the call's record file as ``CallRecord`` gave it (its path's
    ``name``), e.g. ``20261206T051502_CA….jsonl``; None when the call has no record
    (``RECORD_CALLS=false``): then the callback still goes to the webhook. Raises ``ValueError``
    for a name that is not a record file's.
    """
    base = f"{settings.public_base_url}{RECORDING_PATH}"
    if record_name is None:
        return base
    if not RECORD_NAME.fullmatch(record_name):
        raise ValueError(f"not the name of a call record: {clean(record_name, 80)!r}")
    return f"{base}?{urlencode({RECORD_PARAMETER: record_name})}"


def _field(params: dict[str, list[str]], name: str) -> str:
    """The first value of form field ``name``; empty when absent."""
    return (params.get(name) or [""])[0]


def _matching(value: str, pattern: re.Pattern[str], name: str) -> str:
    if not pattern.fullmatch(value):
        raise BadCallback(f"{name} is missing or malformed")
    return value


def _optional_int(value: str, pattern: re.Pattern[str], name: str) -> int | None:
    if not value:
        return None
    number = int(_matching(value, pattern, name))
    return number if number >= 0 else None


def _recording_url(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value) if len(value) <= MAX_URL_CHARS and value.isprintable() and " " not in value else None
    if parts is None or parts.scheme != "https" or not parts.hostname or parts.username or parts.password:
        raise BadCallback("RecordingUrl is not an https URL")
    return value


def _start_time(value: str) -> str | None:
    """Twilio's RFC 2822 time (``Sun, 06 Dec 2026 05:15:02 +0000``) as ISO 8601, in UTC."""
    if not value:
        return None
    if len(value) > MAX_START_TIME_CHARS or not value.isprintable():
        raise BadCallback("RecordingStartTime is malformed")
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return value  # a format Twilio may adopt some day: kept as sent, it is short and printable
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def parse_recording_status(params: dict[str, list[str]]) -> RecordingStatus:
    """The callback's fields, checked; ``BadCallback`` names the first one that is wrong."""
    status = _field(params, "RecordingStatus")
    if status not in RECORDING_STATUSES:
        raise BadCallback("RecordingStatus is missing or unknown")
    channels = _field(params, "RecordingChannels")
    if channels and channels not in _CHANNELS:
        raise BadCallback("RecordingChannels is not 1 or 2")
    source = _field(params, "RecordingSource")
    return RecordingStatus(
        call_sid=_matching(_field(params, "CallSid"), CALL_SID, "CallSid"),
        recording_sid=_matching(_field(params, "RecordingSid"), RECORDING_SID, "RecordingSid"),
        status=status,
        url=_recording_url(_field(params, "RecordingUrl")),
        duration_seconds=_optional_int(_field(params, "RecordingDuration"), _DURATION, "RecordingDuration"),
        channels=_CHANNELS.get(channels),
        start_time=_start_time(_field(params, "RecordingStartTime")),
        source=_matching(source, _SOURCE, "RecordingSource") if source else None,
        error_code=_optional_int(_field(params, "ErrorCode"), _ERROR_CODE, "ErrorCode") or None,  # 0: no error
    )


class RecordingCallback:
    """``POST /twilio/recording``: Twilio's news of a call's recording, for the record and the webhook.

    Its collaborators are given: ``records`` is the server's writer thread, ``webhook`` its sender
    (None without ``CALL_WEBHOOK_URL``), ``shared`` what the processes share (None: no replay check).
    """

    def __init__(
        self,
        settings: Settings,
        shared: SharedState | None,
        records: RecordWriter,
        webhook: WebhookSender | None,
    ) -> None:
        self.settings = settings
        self.shared = shared
        self.records = records
        self.webhook = webhook
        self.work = CallbackWork()

    def handle(self, request: HttpRequest) -> HttpReply:
        if request.method != "POST":
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "POST"),))
        settings = self.settings
        params = form_parameters(request)
        if not settings.twilio_auth_token:  # the route is on only with the REST API, so never here
            return HttpReply(503, "Twilio's auth token is not set.\n")
        if (refused := check_signature(settings, request, params)) is not None:
            return refused
        account_sid = _field(params, "AccountSid")
        if account_sid != settings.twilio_account_sid:
            logger.warning("refused a recording callback for another Twilio account (%s)", clean(account_sid, 40) or "none")
            return HttpReply(403, "Forbidden: not this bridge's Twilio account.\n")
        try:
            recording = parse_recording_status(params)
            record_name = self._record_name(request.query, recording.call_sid)
        except BadCallback as exc:
            logger.debug("refused a recording callback: %s", exc)
            return HttpReply(400, f"{exc}.\n")
        if self.work.busy:
            return HttpReply(503, "Busy; retry.\n")
        self.work.start(self._act(recording, record_name))
        return HttpReply(204, "")

    @staticmethod
    def _record_name(query: str, call_sid: str) -> str | None:
        names = parse_qs(query, keep_blank_values=True).get(RECORD_PARAMETER)
        if not names:
            return None
        if len(names) > 1:
            raise BadCallback("the record is named more than once")
        try:
            return check_record_name(names[0], call_sid)
        except ValueError:
            raise BadCallback("the record is not a call record of this call") from None

    async def _act(self, recording: RecordingStatus, record_name: str | None) -> None:
        call = clean(recording.call_sid, 40)
        key = f"recording-status:{recording.recording_sid}:{recording.status}"
        if not await claim_once(self.shared, key, call_sid=recording.call_sid, what="the recording callback"):
            logger.info("[%s] recording %s %s again (a repeat or a replay): already acted on", call, recording.recording_sid, recording.status)
            return
        if recording.status in FINAL_STATUSES and self.webhook is not None:
            self.webhook.submit(recording.webhook_body())
        what = f"recording {recording.recording_sid} {recording.describe()}"
        if record_name is None:
            logger.info("[%s] %s; the call has no record (RECORD_CALLS=false when it was made)", call, what)
            return
        error = await self.records.write(
            self.settings.calls_dir / record_name,
            record_line(RecordEvent.RECORDING, recording.record_fields()),
            must_exist=True,
        )
        if error is None:
            logger.info("[%s] %s: added to the call record %s", call, what, record_name)
        elif isinstance(error, FileNotFoundError):
            logger.info(
                "[%s] %s; the call record %s is not in this process's CALLS_DIR (another pod's, not "
                "written yet, or RECORD_CALLS=false): not added", call, what, record_name,
            )
        else:
            logger.warning("[%s] %s, but it could not be added to the call record %s: %s", call, what, record_name, clean(error, 300))

    async def close(self) -> None:
        """Wait (a few seconds at most) for callbacks still being acted on: call before the webhook sender closes."""
        await self.work.close()


__all__ = [
    "RECORDING_PATH",
    "RecordingCallback",
    "RecordingStatus",
    "check_record_name",
    "parse_recording_status",
    "recording_callback_url",
]
