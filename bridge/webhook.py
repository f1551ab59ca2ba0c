"""The end-of-call webhook: each finished call's summary, POSTed as signed JSON to ``CALL_WEBHOOK_URL``.

And, when calls are recorded, each finished recording (``recording_completed_payload``, sent by
bridge/recordings.py through the same sender, signed the same way). Three parts, each owning one thing:

- ``CallDigest`` (one per call) keeps what the payload needs and the call record does not hold in
  memory: the last ``MAX_TRANSCRIPT_TURNS`` turns, ``MAX_FUNCTION_CALLS`` function calls and
  ``MAX_LATENCY_REPORTS`` latency reports, each string cut to ``FIELD_MAX_CHARS``. It is fed the
  same events the record is, so it says what the record says (keypad digits are already
  redacted), with ``RECORD_CALLS`` on or off.
- ``call_ended_payload`` turns the record's summary and the digest into the JSON body: compact,
  UTF-8, strict (no NaN, no lone surrogate), at most ``MAX_PAYLOAD_BYTES``; what had to be left out is counted in
  ``omitted`` and flagged by ``truncated``.
- ``WebhookSender`` (one per server process) delivers the bodies. A call only does a
  non-blocking ``submit``: the body joins a bounded queue (``webhook_queue_max`` bodies,
  ``QUEUE_MAX_BYTES`` in all) or is dropped and counted. One task sends them one at a time, each
  attempt within ``webhook_attempt_timeout_seconds`` and each body retried with exponential
  backoff for ``CALL_WEBHOOK_RETRY_SECONDS``. A 2xx is delivered the moment its status line
  and headers are in (its body is never read); of any other answer, the first
  ``REFUSAL_BODY_BYTES`` are read. The call record on disk is the source of truth: a delivery
  that fails loses nothing that is not also in ``CALLS_DIR``.

Logging follows outages, not calls: one WARNING when deliveries start failing (with the reason),
one WARNING per distinct refusal status (a 4xx is not retried), one INFO when a delivery gets
through again with the number that failed meanwhile, and the same pair for a full queue. The
secret is never logged; the URL is logged without its query (which may hold a token).

Signatures: ``X-Bridge-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` with
``X-Bridge-Timestamp: <unix seconds>``; the timestamp inside the MAC lets a receiver refuse old
requests replayed. docs/webhooks.md shows how to check both.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import ssl
import time
import uuid
from collections import deque
from typing import Any, Final
from urllib.parse import urlsplit

from .call_events import RecordEvent
from .settings import Settings
from .jsontext import valid_text
from .logsafe import clean, counted
from .records import bounded, finite
from .http_client import USER_AGENT, AttemptFailed, backoff_delay, post_once, retry_after_seconds

logger = logging.getLogger("bridge.webhook")

EVENT: Final = "call.ended"
RECORDING_EVENT: Final = "recording.completed"
SIGNATURE_HEADER: Final = "X-Bridge-Signature"
TIMESTAMP_HEADER: Final = "X-Bridge-Timestamp"
# What one call's payload may hold; the oldest entries are the ones left out.
MAX_TRANSCRIPT_TURNS: Final = 200
MAX_FUNCTION_CALLS: Final = 100
MAX_LATENCY_REPORTS: Final = 100
# A function call whose JSON is longer has its result sent as JSON text, cut.
FUNCTION_CALL_MAX_CHARS: Final = 8000
MAX_PAYLOAD_BYTES: Final = 256 * 1024
# All bodies waiting to be sent, together: 1000 typical calls (10-30 KB each) fit.
QUEUE_MAX_BYTES: Final = 64 * 1024 * 1024
# Backoff between attempts doubles from webhook_backoff_seconds up to this.
MAX_BACKOFF_SECONDS: Final = 30.0
# 408 Request Timeout and 429 Too Many Requests are worth another try; other 4xx are not.
RETRYABLE_4XX: Final = frozenset({408, 429})
# Of a refusal's body, only the start is read (for its log line); of a 2xx's, nothing: the status
# says it all, and a receiver's long or never-ending body must not turn a delivery into a failure.
REFUSAL_BODY_BYTES: Final = 4096
# The summary's fields that stand at the payload's top level; all its others go into "counts".
_TOP_LEVEL: Final = (
    "call_sid", "stream_sid", "custom_parameters", "started_at", "ended_at", "duration_seconds", "ended_by",
    "end_reason", "agent_latency_p50", "agent_latency_p95", "agent_request_ids",
)
_LISTS: Final = ("transcript", "function_calls", "functions_finished_late", "latency_reports")


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Bridge-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds, as text)."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def public_target(url: str) -> str:
    """``url`` as logs may show it: scheme, host, port and path, without the query (it may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path or '/'}"


class CallDigest:
    """What one call's webhook payload needs, bounded; fed the events the call records."""

    __slots__ = ("agent", "transcript", "function_calls", "functions_finished_late", "latency_reports", "seen")

    def __init__(self) -> None:
        self.agent: str | None = None
        self.transcript: deque[dict[str, Any]] = deque(maxlen=MAX_TRANSCRIPT_TURNS)
        self.function_calls: deque[dict[str, Any]] = deque(maxlen=MAX_FUNCTION_CALLS)
        # A function abandoned at its timeout that returned later: an order the caller was told
        # had failed may have gone through after all, which the business needs to hear of.
        self.functions_finished_late: deque[dict[str, Any]] = deque(maxlen=MAX_FUNCTION_CALLS)
        self.latency_reports: deque[dict[str, Any]] = deque(maxlen=MAX_LATENCY_REPORTS)
        self.seen = dict.fromkeys(_LISTS, 0)  # entries ever added, kept or not

    def add(self, event: str, fields: dict[str, Any]) -> None:
        """One event the call recorded (``Record`` action); the ones the payload has no use for are ignored."""
        if event == RecordEvent.TRANSCRIPT:
            self._keep("transcript", {"role": fields.get("role"), "content": fields.get("content")})
        elif event in (RecordEvent.FUNCTION_CALL, RecordEvent.FUNCTION_FINISHED_LATE):
            kind = "function_calls" if event == RecordEvent.FUNCTION_CALL else "functions_finished_late"
            self._keep(kind, _function_call(dict(fields)))  # the record's fields, all of them
        elif event == RecordEvent.LATENCY_REPORT:
            self._keep("latency_reports", dict(fields))
        elif event == RecordEvent.START:
            agent = fields.get("agent")
            self.agent = agent if isinstance(agent, str) else None

    def _keep(self, kind: str, entry: dict[str, Any]) -> None:
        self.seen[kind] += 1
        getattr(self, kind).append(bounded(entry))


def _function_call(entry: dict[str, Any]) -> dict[str, Any]:
    """A function call whose result is huge (a long list of orders) keeps that result as cut JSON text."""
    if len(_compact(entry)) > FUNCTION_CALL_MAX_CHARS:
        entry["result"] = _compact(entry.get("result")).decode("utf-8")  # cut by bounded when kept
    return entry


def _compact(value: Any) -> bytes:
    """Strict, compact UTF-8 JSON: NaN and Infinity (which JSON parsers reject) become null.

    A lone surrogate (which no UTF-8 encoder takes) becomes U+FFFD. The codecs already repair what
    Twilio and Deepgram send; this is the backstop for text from anywhere else (a function's result).
    """
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:
        text = json.dumps(finite(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # With ensure_ascii=False a surrogate is written as itself, so the JSON text can be mended.
        return valid_text(text).encode("utf-8")


def call_ended_payload(
    summary: dict[str, Any], digest: CallDigest, *, max_bytes: int = MAX_PAYLOAD_BYTES, delivery_id: str | None = None
) -> bytes:
    """The webhook body for a call that ended with this record ``summary`` (``CallRecord.summary``).

    Past ``max_bytes``, the oldest half of the longest list is left out, again until it fits;
    ``omitted`` counts what is missing from each list, for whatever reason, and ``truncated``
    says that anything is.
    """
    payload: dict[str, Any] = {"event": EVENT, "id": delivery_id or uuid.uuid4().hex}
    for name in _TOP_LEVEL:
        payload[name] = summary.get(name)
    payload["agent"] = digest.agent
    lists = {kind: list(getattr(digest, kind)) for kind in _LISTS}
    payload.update(lists)
    payload["counts"] = {
        name: value for name, value in summary.items() if name not in _TOP_LEVEL and name != "event"
    }
    omitted = {kind: digest.seen[kind] - len(lists[kind]) for kind in _LISTS}
    payload["omitted"] = omitted
    payload["truncated"] = any(omitted.values())
    while True:
        body = _compact(payload)
        if len(body) <= max_bytes:
            return body
        payload["truncated"] = True
        longest = max(_LISTS, key=lambda kind: len(payload[kind]))
        entries = payload[longest]
        if entries:
            left_out = (len(entries) + 1) // 2
            payload[longest] = entries[left_out:]
            omitted[longest] += left_out
        elif payload["custom_parameters"]:
            # Twilio's start event carries at most a few KB of them, so this is hardly ever reached.
            payload["custom_parameters"] = {}
            omitted["custom_parameters"] = len(summary.get("custom_parameters") or {})
        else:
            return body  # only fixed-size fields are left: nothing more to take out


def recording_completed_payload(
    *,
    call_sid: str,
    recording_sid: str,
    status: str,
    url: str | None,
    duration_seconds: int | None,
    channels: int | None,
    error_code: int | None,
    delivery_id: str | None = None,
) -> bytes:
    """The webhook body for a call's recording that is done: Twilio said ``completed`` (it is ready
    at ``url``) or ``absent`` (there is none: ``error_code`` 16101, too short, or 16102, silent).

    Every value was checked by bridge/recordings.py, so the body is small: no cutting is needed.
    """
    return _compact({
        "event": RECORDING_EVENT,
        "id": delivery_id or uuid.uuid4().hex,
        "call_sid": call_sid,
        "recording_sid": recording_sid,
        "status": status,
        "url": url,
        "duration_seconds": duration_seconds,
        "channels": channels,
        "error_code": error_code,
    })


class WebhookSender:
    """Delivers webhook events (call summaries, finished recordings) to one URL from a bounded queue,
    one at a time; see the module docstring."""

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        retry_seconds: float = 60.0,
        attempt_timeout: float = 10.0,
        backoff: float = 0.5,
        queue_max: int = 1000,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the webhook URL must be http(s)://host[:port][/path]")
        if not secret:
            raise ValueError("the webhook secret is empty")
        if retry_seconds < 0 or attempt_timeout <= 0 or backoff < 0 or queue_max < 1:
            raise ValueError("retry_seconds and backoff must be >= 0, attempt_timeout > 0 and queue_max >= 1")
        self.target = public_target(url)  # for logs
        self.retry_seconds = retry_seconds
        self.attempt_timeout = attempt_timeout
        self.backoff = backoff
        self.queue_max = queue_max
        self.queue_max_bytes = queue_max_bytes
        self._secret = secret.encode("utf-8")  # held privately, never logged
        self._host = parts.hostname
        https = parts.scheme == "https"
        self._port = parts.port or (443 if https else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if self._port == (443 if https else 80) else f"{host}:{self._port}"
        self._request_target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._tls = ssl.create_default_context() if https else None  # made once: loading CAs costs CPU
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued and nothing being sent
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # Totals since start, for tests and for the shutdown line.
        self.delivered = 0
        self.failed = 0  # given up on: refused, or still failing when their retry time ran out
        self.dropped = 0  # never queued: the queue was full, or the sender closed
        # The current outage: since when deliveries fail, how many failed, which refusals were said.
        self._failing_since: float | None = None
        self._failed_in_outage = 0
        self._refusals_logged: set[int] = set()
        # The current stretch of a full queue.
        self._full = False
        self._dropped_while_full = 0

    def __repr__(self) -> str:
        return f"WebhookSender({self.target!r})"

    @property
    def pending(self) -> int:
        """Bodies queued or being sent (the one being sent stays first in the queue until it is done)."""
        return len(self._queue)

    # ------------------------------------------------------------------------ the calls' side

    def submit(self, body: bytes) -> bool:
        """Queue ``body`` for delivery without waiting; False if it was dropped (queue full or closed)."""
        if self._closed:
            # Only a call still ending after the shutdown's deadline gets here; its record has it all.
            self.dropped += 1
            logger.debug("a webhook event came after the webhook sender closed: not sent")
            return False
        if len(self._queue) >= self.queue_max or self._queued_bytes + len(body) > self.queue_max_bytes:
            self.dropped += 1
            self._dropped_while_full += 1
            if not self._full:
                self._full = True
                logger.warning(
                    "webhook queue is full (%s, %s waiting for %s): new webhook events are "
                    "dropped until there is room (their call records are on disk); nothing more is logged until then",
                    counted(len(self._queue), "delivery", "deliveries"), counted(self._queued_bytes, "byte"), self.target,
                )
            return False
        self._queue.append(body)
        self._queued_bytes += len(body)
        self._idle.clear()
        self._wakeup.set()
        return True

    # --------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the sender task (on the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="call-webhook")

    async def close(self, timeout: float) -> None:
        """Send what is queued for up to ``timeout`` seconds, then stop; what is left is logged as a count."""
        self._closed = True
        if self._task is None:
            left = len(self._queue)
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._idle.wait()
            left = self.pending
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if left:
            logger.warning(
                "%s not delivered to %s before shutdown (waited %.1f s); their call records are on disk",
                counted(left, "webhook event was", "webhook events were"), self.target, timeout,
            )
        self._queue.clear()
        self._queued_bytes = 0

    # ---------------------------------------------------------------------------- sending

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            body = self._queue[0]  # stays counted as queued until it is dealt with
            try:
                await self._deliver(body)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop every later delivery
                self.failed += 1
                logger.exception("webhook delivery failed unexpectedly")
            self._queue.popleft()
            self._queued_bytes -= len(body)
            if self._full and len(self._queue) <= self.queue_max // 2:
                logger.info(
                    "webhook queue has room again; %s dropped while it was full",
                    counted(self._dropped_while_full, "webhook event was", "webhook events were"),
                )
                self._full = False
                self._dropped_while_full = 0

    async def _deliver(self, body: bytes) -> None:
        """One body, retried until it is delivered, refused, or its retry time runs out."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.retry_seconds
        attempt = 0
        while True:
            attempt += 1
            timestamp = str(int(time.time()))  # per attempt: a receiver's replay window counts from the send
            headers = [
                ("Host", self._host_header),
                ("Content-Type", "application/json"),
                ("User-Agent", USER_AGENT),
                (TIMESTAMP_HEADER, timestamp),
                (SIGNATURE_HEADER, sign(self._secret, timestamp, body)),
            ]
            retry_after: float | None = None
            try:
                answer = await post_once(
                    self._host, self._port, self._tls, self._request_target, headers, body,
                    timeout=self.attempt_timeout, peer="the webhook receiver", body_limit=_answer_body_limit,
                )
            except AttemptFailed as failure:
                reason, retryable = failure.reason, failure.retryable
            else:
                status = answer.status
                if 200 <= status < 300:
                    self._delivered(attempt)
                    return
                if (400 <= status < 500 and status not in RETRYABLE_4XX) or status < 400:  # 3xx: not followed
                    self._refused(status, answer.body)
                    return
                reason, retryable = f"HTTP {status}", True
                if status in (429, 503):
                    retry_after = retry_after_seconds(answer.headers.get("retry-after"))
            self._failing(reason)
            delay = retry_after if retry_after is not None else backoff_delay(self.backoff, attempt, MAX_BACKOFF_SECONDS)
            if not retryable or loop.time() + delay > give_up_at:
                self._given_up(reason, attempt)
                return
            logger.debug("webhook attempt %d failed (%s); retrying in %.2f s", attempt, reason, delay)
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------- outcomes, and their logs

    def _delivered(self, attempts: int) -> None:
        self.delivered += 1
        logger.debug("webhook delivered after %s", counted(attempts, "attempt"))
        if self._failing_since is not None:
            logger.info(
                "webhook %s reachable again after %.1f s; %s failed meanwhile (their call records are on disk)",
                self.target, asyncio.get_running_loop().time() - self._failing_since,
                counted(self._failed_in_outage, "delivery", "deliveries"),
            )
            self._failing_since = None
            self._failed_in_outage = 0
            self._refusals_logged.clear()

    def _failing(self, reason: str) -> None:
        """An attempt failed: the first one of an outage is logged, the rest of it is not."""
        if self._failing_since is None:
            self._failing_since = asyncio.get_running_loop().time()
            logger.warning(
                "webhook deliveries to %s are failing (%s): each is retried for up to %g s; nothing more is "
                "logged until one gets through (call records on disk are unaffected)",
                self.target, reason, self.retry_seconds,
            )

    def _refused(self, status: int, body: bytes) -> None:
        """A 4xx (but 408/429) or an unexpected status: the receiver won't take this body, so it isn't retried."""
        self.failed += 1
        self._failed_in_outage += 1
        if self._failing_since is None:
            self._failing_since = asyncio.get_running_loop().time()
        if status not in self._refusals_logged:
            self._refusals_logged.add(status)
            logger.warning(
                "the webhook receiver %s refused a webhook event with HTTP %d (%s); not retried, and further "
                "HTTP %d refusals are not logged until a delivery gets through",
                self.target, status, clean(body.decode("utf-8", "replace"), 200) or "no body", status,
            )

    def _given_up(self, reason: str, attempts: int) -> None:
        self.failed += 1
        self._failed_in_outage += 1
        logger.debug("webhook delivery given up after %d attempt%s: %s", attempts, "" if attempts == 1 else "s", reason)


def _answer_body_limit(status: int) -> int:
    """How much of an answer's body is read: none of a 2xx, the start of any other."""
    return 0 if 200 <= status < 300 else REFUSAL_BODY_BYTES


def webhook_sender(settings: Settings) -> WebhookSender | None:
    """The production seam: a sender when ``CALL_WEBHOOK_URL`` is set; tests point it at a fake receiver."""
    if not settings.call_webhook_url:
        return None
    assert settings.call_webhook_secret is not None  # load_settings requires it with the URL
    return WebhookSender(
        settings.call_webhook_url,
        settings.call_webhook_secret,
        retry_seconds=settings.call_webhook_retry_seconds,
        attempt_timeout=settings.limits.webhook_attempt_timeout_seconds,
        backoff=settings.limits.webhook_backoff_seconds,
        queue_max=settings.limits.max_webhook_deliveries_queued,
    )
