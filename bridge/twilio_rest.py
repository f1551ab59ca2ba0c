"""Twilio's REST API, as far as the bridge uses it: create and update calls, start and update recordings.

An async client on the stdlib and h11: each request opens its own connection (TLS for https),
writes the request and reads the answer (bridge/http_client.py), and the connection is closed.
The bridge makes a handful of requests per call, so a connection pool would save little and add
state. This module owns what a caller should not
have to think about:

- **Deadlines.** Each attempt (connect, TLS, send, answer) gets ``timeout`` seconds in all.
- **Retries, and when not to.** 429 (honouring ``Retry-After``, capped), 5xx and connection
  failures are retried with exponential backoff and jitter, up to ``attempts`` in all. Creating a
  call and starting a recording are *not* idempotent: once the request may have reached Twilio
  (it was written, then the answer timed out, the connection dropped, or Twilio answered a 5xx
  other than 503), another attempt could ring the person twice, or make a second recording, so
  they retry only what certainly did nothing: failures before the request was written, 429 and
  503. Updating a call or a recording is safe to repeat.
- **Errors.** A final failure raises ``TwilioApiError`` with Twilio's ``code`` and ``message``
  (from its JSON error body) and logs exactly one warning line for the operation; attempts log at
  DEBUG. Changing a call that is already over (HTTP 404, or error 21220), or its recording,
  returns ``None``: the caller wanted the call changed, and it has ended.
- **Secrets.** Logs and exception texts never carry the auth token, the Authorization header or
  the Account SID (paths are logged with it replaced by ``AC…``); text from Twilio is escaped
  with ``clean``. Answers are read up to ``MAX_RESPONSE_BYTES``; a longer one is not read on
  and counts as unreadable.
- **Input.** Call SIDs (``CA`` + 32 hex digits) and Recording SIDs (``RE`` + 32 hex digits, or
  ``Twilio.CURRENT``) are checked before they go into a URL path, and the Account SID when the
  client is made, so no caller text can change the path; so is the SID of a new call or recording
  in Twilio's answer, which later goes into a path.

Each attempt is one ``http_client.post_once`` (a POST on a fresh connection, within a deadline),
which the call webhook uses too. docs/protocols.md section 7 has the REST API facts this follows.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from .http_client import USER_AGENT, AttemptFailed, HttpAnswer, backoff_delay, post_once, retry_after_seconds
from .logsafe import clean
from .twilio import ACCOUNT_SID, CALL_SID, MAX_TWIML_CHARS, RECORDING_SID

logger = logging.getLogger("bridge.twilio_rest")

API_VERSION = "2010-04-01"
# A path prefix in the API URL (a proxy's, say) goes into every request target as it is.
SAFE_PATH = re.compile(r"[A-Za-z0-9._~/-]*")
# How long a call created may ring unanswered (Twilio's ``Timeout``), in seconds.
MIN_RING_SECONDS = 5
MAX_RING_SECONDS = 600
# The Twilio error that means "call is not in-progress": the call has already ended.
CALL_NOT_IN_PROGRESS = 21220
# The Recording SID that names whichever recording of the call is going on.
CURRENT_RECORDING = "Twilio.CURRENT"
RECORDING_CHANNELS = frozenset({"mono", "dual"})
RECORDING_EVENTS = frozenset({"in-progress", "completed", "absent"})
# What a recording can be set to, and how a pause is kept: "skip" leaves the span out.
RECORDING_STATUSES = frozenset({"paused", "in-progress", "stopped"})
PAUSE_BEHAVIORS = frozenset({"skip", "silence"})
# Twilio's answers are a few KB; anything near this is not an answer we can use.
MAX_RESPONSE_BYTES = 1024 * 1024
# Backoff between attempts doubles from ``backoff`` up to this (three attempts never reach it).
MAX_BACKOFF_SECONDS = 30.0


def _up_to_the_cap(status: int) -> int:
    """Read a REST answer's body up to ``MAX_RESPONSE_BYTES``, whatever the status."""
    return MAX_RESPONSE_BYTES


class TwilioApiError(Exception):
    """A Twilio REST request that failed for good.

    ``status`` is the HTTP status (``None`` when no answer came), ``code`` Twilio's error code from
    its JSON body (``None`` when there was none) and ``message`` Twilio's message, unescaped, or
    our description of what went wrong. ``sent`` is False when the request certainly never reached
    Twilio (the connection failed before it was written). ``str(exc)`` is one log-safe line.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        operation: str | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.operation = operation
        self.sent = sent

    @property
    def may_have_acted(self) -> bool:
        """Whether Twilio may have done what was asked (created the call, started the recording) although this failed.

        So it may when the request was sent and no answer came, the answer was a 2xx that could
        not be read, or a 5xx other than 503 (which, like 429, means Twilio did not act).
        """
        if not self.sent:
            return False
        return self.status is None or 200 <= self.status < 300 or (self.status >= 500 and self.status != 503)

    def __str__(self) -> str:
        details = []
        if self.status is not None:
            details.append(f"HTTP {self.status}")
        if self.code is not None:
            details.append(f"Twilio error {self.code}")
        head = f"Twilio {self.operation} failed" if self.operation else ""
        if details:
            head = f"{head} ({', '.join(details)})" if head else ", ".join(details)
        text = clean(self.message, 300)
        return f"{head}: {text}" if head else text


@dataclass(frozen=True, slots=True)
class _Operation:
    """What one public method asks of Twilio."""

    name: str  # for logs and errors: "create call", "update call CA…"
    tail: str  # the path after /Accounts/{AccountSid}/
    # For an operation a repeat would do twice (a second call, a second recording): what Twilio
    # may already have done once the request may have reached it. None: safe to repeat.
    not_twice: str | None = None


def _twilio_error(body: bytes) -> tuple[int | None, str | None]:
    """Twilio's ``code`` and ``message`` from a JSON error body, where present."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    code = data.get("code")
    message = data.get("message")
    return (code if isinstance(code, int) and not isinstance(code, bool) else None), (
        message if isinstance(message, str) else None
    )


class TwilioRestClient:
    """Creates and updates calls and their recordings through Twilio's REST API; safe to share between tasks."""

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        api_url: str = "https://api.twilio.com",
        *,
        timeout: float = 10.0,
        attempts: int = 3,
        backoff: float = 0.5,
    ) -> None:
        # The Account SID goes into every path: check it here, so no setting can redirect a request.
        if not ACCOUNT_SID.fullmatch(account_sid):
            raise ValueError("the Twilio Account SID must be AC followed by 32 hexadecimal characters")
        if not auth_token:
            raise ValueError("the Twilio auth token is empty")
        if timeout <= 0 or attempts < 1 or backoff < 0:
            raise ValueError("timeout must be > 0, attempts >= 1 and backoff >= 0")
        parts = urlsplit(api_url)
        # Checked first, and the URL not echoed: it may carry a password.
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError("the Twilio API URL must not carry credentials, a query or a fragment")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the Twilio API URL must be http(s)://host[:port], got {clean(api_url, 80)!r}")
        if not SAFE_PATH.fullmatch(parts.path):
            raise ValueError(f"the Twilio API URL's path can't go into a request target: {clean(parts.path, 80)!r}")
        self.api_url = api_url
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._account_sid = account_sid
        self._auth_token = auth_token
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self._port == (443 if parts.scheme == "https" else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if default_port else f"{host}:{self._port}"
        # Made once: loading the system's CA certificates takes a few milliseconds of CPU.
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._account_path = f"{self._prefix}/{API_VERSION}/Accounts/{account_sid}"
        # Built once; held privately and never logged or put into an exception.
        credentials = base64.b64encode(f"{account_sid}:{auth_token}".encode()).decode("ascii")
        self._authorization = f"Basic {credentials}"

    def __repr__(self) -> str:
        return f"TwilioRestClient(api_url={self.api_url!r}, account_sid='AC…')"

    async def create_call(
        self,
        to: str,
        from_: str,
        *,
        twiml: str | None = None,
        url: str | None = None,
        method: str | None = None,
        machine_detection: str | None = None,
        async_amd: bool = False,
        async_amd_status_callback: str | None = None,
        async_amd_status_callback_method: str | None = None,
        status_callback: str | None = None,
        status_callback_event: list[str] | None = None,
        status_callback_method: str | None = None,
        timeout: int | None = None,
    ) -> dict[str, Any]:
        """Place a call from ``from_`` to ``to``; returns Twilio's JSON, whose ``"sid"`` is the Call SID.

        The call runs ``twiml`` (inline) or the TwiML at ``url`` (fetched with ``method``) once
        answered; give exactly one. ``timeout`` is how many seconds it may ring unanswered
        (``MIN_RING_SECONDS`` to ``MAX_RING_SECONDS``; Twilio's default is 60). Raises
        ``TwilioApiError`` if Twilio refuses or cannot be reached, or if its yes can't be read (no
        JSON object with a Call SID as its ``sid``: ``may_have_acted`` says the call may exist all the same).
        """
        if not to or not from_:
            raise ValueError("a call needs both a To and a From number")
        if isinstance(status_callback_event, str):
            # A bare string would be sent one character per field.
            raise TypeError("status_callback_event is a list of event names, e.g. ['initiated', 'completed']")
        if timeout is not None and (
            not isinstance(timeout, int) or isinstance(timeout, bool) or not MIN_RING_SECONDS <= timeout <= MAX_RING_SECONDS
        ):
            raise ValueError(f"a call's timeout is a whole number of seconds from {MIN_RING_SECONDS} to {MAX_RING_SECONDS}")
        _check_twiml_or_url(twiml, url, required=True)
        # In the order Twilio's own package sends them, so the two requests are the same bytes.
        fields: list[tuple[str, str]] = [("To", to), ("From", from_)]
        _add(fields, "Method", method)
        _add(fields, "StatusCallback", status_callback)
        # A list is sent as the same field once per value, as Twilio expects.
        fields.extend(("StatusCallbackEvent", event) for event in status_callback_event or ())
        _add(fields, "StatusCallbackMethod", status_callback_method)
        _add(fields, "Timeout", None if timeout is None else str(timeout))
        _add(fields, "MachineDetection", machine_detection)
        if async_amd:
            fields.append(("AsyncAmd", "true"))  # Twilio's (and its SDK's) spelling of a boolean
        _add(fields, "AsyncAmdStatusCallback", async_amd_status_callback)
        _add(fields, "AsyncAmdStatusCallbackMethod", async_amd_status_callback_method)
        _add(fields, "Url", url)
        _add(fields, "Twiml", twiml)
        operation = _Operation("create call", "Calls.json", not_twice="created the call")
        answer, attempts = await self._post(operation, fields)
        if 200 <= answer.status < 300:
            return self._created(operation, answer, attempts, CALL_SID, "Call SID")
        raise self._failed(operation, answer.status, attempts, answer.body)

    async def update_call(
        self,
        call_sid: str,
        *,
        twiml: str | None = None,
        url: str | None = None,
        method: str | None = None,
        status: str | None = None,
    ) -> dict[str, Any] | None:
        """Redirect a live call to new TwiML (``twiml`` or ``url``), or end it (``status="completed"``).

        Returns Twilio's JSON, or ``None`` if the call is already over (HTTP 404 or error 21220),
        which is not a fault. Raises ``ValueError`` for a malformed Call SID, before any request.
        """
        _check_call_sid(call_sid)
        _check_twiml_or_url(twiml, url, required=status is None)
        fields: list[tuple[str, str]] = []
        _add(fields, "Twiml", twiml)
        _add(fields, "Url", url)
        _add(fields, "Method", method)
        _add(fields, "Status", status)
        operation = _Operation(f"update call {call_sid}", f"Calls/{call_sid}.json")
        answer, attempts = await self._post(operation, fields)
        if 200 <= answer.status < 300:
            return self._json_object(operation, answer, attempts)
        return self._call_over(operation, answer, attempts)

    async def start_recording(
        self,
        call_sid: str,
        *,
        status_callback: str,
        channels: str = "dual",
        status_callback_events: Sequence[str] = ("in-progress", "completed", "absent"),
    ) -> dict[str, Any] | None:
        """Start recording a live call; returns Twilio's JSON, whose ``"sid"`` is the Recording SID.

        Twilio POSTs the recording's status, signed, to ``status_callback`` at each of
        ``status_callback_events``. ``channels="dual"`` puts the caller and the bridge on
        separate channels. Returns ``None`` if the call is already over (HTTP 404 or error
        21220). Like ``create_call``, never retried once the request may have reached Twilio, since
        a second start would make a second recording: a ``TwilioApiError`` whose
        ``may_have_acted`` is True says a recording may exist all the same. Raises ``ValueError``
        (or ``TypeError`` for a bare string of events) before any request for bad arguments.
        """
        _check_call_sid(call_sid)
        if isinstance(status_callback_events, str):
            raise TypeError("status_callback_events is a list of event names, e.g. ['completed']")
        if channels not in RECORDING_CHANNELS:
            raise ValueError(f"recording channels are 'mono' or 'dual', not {clean(channels, 20)!r}")
        unknown = [event for event in status_callback_events if event not in RECORDING_EVENTS]
        if unknown:
            raise ValueError(f"recording status events are in-progress, completed and absent, not {clean(unknown[0], 20)!r}")
        if not status_callback:
            raise ValueError("a recording needs a status callback URL")
        fields: list[tuple[str, str]] = [("RecordingChannels", channels), ("RecordingStatusCallback", status_callback)]
        fields.extend(("RecordingStatusCallbackEvent", event) for event in status_callback_events)
        fields.append(("RecordingStatusCallbackMethod", "POST"))
        operation = _Operation(
            f"start recording call {call_sid}", f"Calls/{call_sid}/Recordings.json", not_twice="started the recording"
        )
        answer, attempts = await self._post(operation, fields)
        if 200 <= answer.status < 300:
            return self._created(operation, answer, attempts, RECORDING_SID, "Recording SID")
        return self._call_over(operation, answer, attempts)

    async def update_recording(
        self,
        call_sid: str,
        recording_sid: str = CURRENT_RECORDING,
        *,
        status: str,
        pause_behavior: str | None = None,
    ) -> dict[str, Any] | None:
        """Pause (``status="paused"``), resume (``"in-progress"``) or stop (``"stopped"``) a call's recording.

        ``recording_sid`` is the one ``start_recording`` returned, or ``Twilio.CURRENT`` (the call's
        recording going on). ``pause_behavior="skip"`` leaves the paused span out of the recording,
        ``"silence"`` (Twilio's default) fills it with silence. Safe to retry. Returns Twilio's
        JSON, or ``None`` if the call (or the recording) is already over: HTTP 404 or error 21220.
        Raises ``ValueError`` for a malformed SID or an unknown status, before any request.
        """
        _check_call_sid(call_sid)
        if not isinstance(recording_sid, str) or not (
            recording_sid == CURRENT_RECORDING or RECORDING_SID.fullmatch(recording_sid)
        ):
            raise ValueError(f"not a Twilio Recording SID (RE + 32 hex digits, or Twilio.CURRENT): {clean(recording_sid, 40)!r}")
        if status not in RECORDING_STATUSES:
            raise ValueError(f"a recording's status is set to paused, in-progress or stopped, not {clean(status, 20)!r}")
        if pause_behavior is not None and pause_behavior not in PAUSE_BEHAVIORS:
            raise ValueError(f"a pause is 'skip' or 'silence', not {clean(pause_behavior, 20)!r}")
        fields: list[tuple[str, str]] = [("Status", status)]
        _add(fields, "PauseBehavior", pause_behavior)
        operation = _Operation(
            f"update recording {recording_sid} of call {call_sid}", f"Calls/{call_sid}/Recordings/{recording_sid}.json"
        )
        answer, attempts = await self._post(operation, fields)
        if 200 <= answer.status < 300:
            return self._json_object(operation, answer, attempts)
        return self._call_over(operation, answer, attempts)

    async def close(self) -> None:
        """Nothing to release: each request has its own connection. Safe to call any number of times."""

    # -- one operation, with its retries ------------------------------------------------------

    async def _post(self, operation: _Operation, fields: list[tuple[str, str]]) -> tuple[HttpAnswer, int]:
        """POST ``fields`` for ``operation``, retrying what is safe; returns the last answer and the attempts made.

        Any HTTP answer is returned (the caller decides what it means); no answer at all, after the
        attempts allowed, raises ``TwilioApiError`` (and logs it).
        """
        path = f"{self._account_path}/{operation.tail}"
        body = urlencode(fields).encode("ascii")  # urlencode quotes everything outside ASCII
        create = operation.not_twice is not None
        for attempt in range(1, self.attempts + 1):
            started = time.monotonic()
            try:
                answer = await self._attempt(path, body)
            except AttemptFailed as failure:
                # Retrying a create that may have reached Twilio could ring the person twice.
                safe = failure.retryable and (not create or not failure.sent)
                if safe and attempt < self.attempts:
                    delay = backoff_delay(self.backoff, attempt, MAX_BACKOFF_SECONDS)
                    logger.debug(
                        "Twilio %s: attempt %d/%d got no answer (%s); retrying in %.2f s",
                        operation.name, attempt, self.attempts, failure.reason, delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                reason = failure.reason
                if failure.retryable and create and failure.sent:
                    reason += f"; not retried, since Twilio may have {operation.not_twice}"
                raise self._failed(operation, failure.status, attempt, None, reason=reason, sent=failure.sent) from None
            logger.debug(
                "Twilio %s: attempt %d/%d answered HTTP %d in %.2f s",
                operation.name, attempt, self.attempts, answer.status, time.monotonic() - started,
            )
            # 429 and 503 mean Twilio did not act on the request; another 5xx may mean it did.
            retry = answer.status in (429, 503) or (not create and answer.status >= 500)
            if not retry or attempt == self.attempts:
                return answer, attempt
            delay = backoff_delay(self.backoff, attempt, MAX_BACKOFF_SECONDS)
            if answer.status == 429:
                hinted = retry_after_seconds(answer.headers.get("retry-after"))
                if hinted is not None:
                    delay = hinted
            logger.debug("Twilio %s: retrying in %.2f s after HTTP %d", operation.name, delay, answer.status)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failed(
        self,
        operation: _Operation,
        status: int | None,
        attempts: int,
        body: bytes | None,
        *,
        reason: str | None = None,
        sent: bool = True,
    ) -> TwilioApiError:
        """The error for a failed operation, logged here as the operation's one warning line."""
        code, message = _twilio_error(body) if body is not None else (None, None)
        if message is None:
            message = reason or (f"Twilio answered HTTP {status}" if status is not None else "no answer from Twilio")
        # Twilio's 404 message quotes the request's path, Account SID included.
        error = TwilioApiError(self._redact(message), status=status, code=code, operation=operation.name, sent=sent)
        logger.warning(
            "%s (POST %s/%s/Accounts/AC…/%s, %d attempt%s)",
            error, self._prefix, API_VERSION, operation.tail, attempts, "" if attempts == 1 else "s",
        )
        return error

    def _redact(self, text: str) -> str:
        """``text`` from Twilio without our Account SID or auth token in it."""
        text = text.replace(self._account_sid, "AC…")
        if len(self._auth_token) >= 8:  # a shorter "token" would blank out ordinary words
            text = text.replace(self._auth_token, "…")
        return text

    def _call_over(self, operation: _Operation, answer: HttpAnswer, attempts: int) -> None:
        """A non-2xx answer: ``None`` if it says the call (or the recording) is already over (404, 21220), else it raises."""
        code, message = _twilio_error(answer.body)
        if answer.status == 404 or code == CALL_NOT_IN_PROGRESS:
            logger.info(
                "Twilio %s: already over (HTTP %d, code %s: %s)",
                operation.name, answer.status, code, clean(self._redact(message or ""), 200),
            )
            return None
        raise self._failed(operation, answer.status, attempts, answer.body)

    def _created(
        self, operation: _Operation, answer: HttpAnswer, attempts: int, sid: re.Pattern[str], what: str
    ) -> dict[str, Any]:
        """A 2xx answer to a create: its JSON object, whose ``"sid"`` must be a ``what`` (it goes into paths later)."""
        created = self._json_object(operation, answer, attempts)
        if not isinstance(created.get("sid"), str) or not sid.fullmatch(created["sid"]):
            raise self._failed(operation, answer.status, attempts, None, reason=f"Twilio's answer has no {what}")
        return created

    def _json_object(self, operation: _Operation, answer: HttpAnswer, attempts: int) -> dict[str, Any]:
        """A 2xx answer's JSON object; anything else raises (``may_have_acted``: Twilio said yes)."""
        if not answer.complete:
            raise self._failed(
                operation, answer.status, attempts, None, reason=f"Twilio's answer is over {MAX_RESPONSE_BYTES} bytes"
            )
        try:
            data = json.loads(answer.body)
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise self._failed(operation, answer.status, attempts, None, reason="Twilio's answer is not a JSON object")
        return data

    # -- one attempt --------------------------------------------------------------------------

    async def _attempt(self, path: str, body: bytes) -> HttpAnswer:
        """One request on a fresh connection, all of it within ``timeout``."""
        headers = [
            ("Host", self._host_header),
            ("Authorization", self._authorization),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Accept", "application/json"),
            ("Accept-Charset", "utf-8"),
            ("User-Agent", USER_AGENT),
        ]
        return await post_once(
            self._host, self._port, self._tls, path, headers, body,
            timeout=self.timeout, peer="Twilio", body_limit=_up_to_the_cap,
        )


def _check_call_sid(call_sid: str) -> None:
    if not isinstance(call_sid, str) or not CALL_SID.fullmatch(call_sid):
        raise ValueError(f"not a Twilio Call SID (CA + 32 hex digits): {clean(call_sid, 40)!r}")


def _add(fields: list[tuple[str, str]], name: str, value: str | None) -> None:
    """Only the fields given are sent: Twilio treats an empty value differently from none."""
    if value is not None:
        fields.append((name, value))


def _check_twiml_or_url(twiml: str | None, url: str | None, *, required: bool) -> None:
    if twiml is not None and url is not None:
        raise ValueError("give the call either twiml or url, not both")
    if required and twiml is None and url is None:
        raise ValueError("the call needs TwiML: give twiml or url")
    if twiml is not None and len(twiml) > MAX_TWIML_CHARS:
        raise ValueError(f"inline TwiML is limited to {MAX_TWIML_CHARS} characters by Twilio, got {len(twiml)}")


__all__ = ["CURRENT_RECORDING", "TwilioApiError", "TwilioRestClient"]
