"""A fake of Twilio's REST API (calls and their recordings) on a real loopback socket, with scriptable faults.

``FakeTwilioRest`` answers ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (create a call),
``POST .../Calls/{CallSid}.json`` (update one), ``POST .../Calls/{CallSid}/Recordings.json`` (start
recording it) and ``POST .../Calls/{CallSid}/Recordings/{RecordingSid}.json`` (pause, resume or
stop a recording) the way Twilio does: HTTP Basic auth checked
against the Account SID and auth token it was given, form-encoded requests, JSON answers, and
Twilio's JSON error bodies (``{"code", "message", "more_info", "status"}``). It records every
request, so tests can assert on what a client sent, and it can be told to misbehave, one request
at a time, so tests can see how a client copes. HTTP is parsed with h11, like the bridge does;
the fake depends on nothing in ``bridge/``.

Usage::

    async with FakeTwilioRest() as fake:
        client = TwilioRestClient(fake.account_sid, fake.auth_token, fake.url)
        fake.script("create", 500, "normal")          # a 500, then the usual 201
        created = await client.create_call("+15551230000", "+15559870000", twiml="<Response/>")
        first, second = await fake.wait_for_requests(2)
        assert second.field("To") == "+15551230000"

**Scripting faults.** ``fake.script(target, *steps)`` queues steps for requests that match
``target``: ``"create"``, ``"update"``, ``"start-recording"``, ``"update-recording"``, a Recording SID (updates
of that recording), a Call SID (any request about that call: its updates and its recordings'),
an exact request path, or ``"*"`` (any request). The most specific non-empty queue is used (path,
then Recording SID, then Call SID, then operation, then ``"*"``); each matching request consumes
one step, and once the queues are empty
the fake answers normally again. A step is one of:

- ``"normal"`` (or ``200``/``201``): answer as Twilio would (auth checked, the call created or updated);
- an ``asyncio.Event``: answer normally once the test sets it (``fake.held`` lists the requests
  waiting so; a request made while a call is being created, say);
- another ``int`` status: that status with a Twilio-style JSON error body (e.g. ``500``, ``404``);
- ``Reply(status, body, headers)``: exactly this answer; ``twilio_error(status, code, message)``
  and ``rate_limited(retry_after)`` build common ones;
- ``"hang"``: read the request, never answer (the connection stays open until the client gives up);
- ``"drop"``: read the request, then close the connection without answering;
- ``"reset"``: read the request, then abort the connection (TCP RST).

Scripted steps other than ``"normal"`` are served without looking at auth or the call's state.
A normal create is checked as Twilio checks it: ``To``, ``From``, inline ``Twiml`` (at most 4000
characters) or a ``Url``, and the values of the options the bridge sends (``Timeout``,
``MachineDetection``, ``AsyncAmd``, the callback methods and events); a 400 with Twilio's JSON
error answers anything else.

**Reading what was sent.** ``fake.requests`` lists every ``RecordedRequest`` in arrival order
(method, path, lower-cased headers, form fields as lists, Basic auth user and password, the
operation, Call SID and Recording SID, and what the fake did with it). ``requests_for(operation,
call_sid)`` filters it; ``await fake.wait_for_requests(n, operation=...)`` waits (without polling)
until ``n`` matching requests have arrived, and returns them. ``fake.calls`` holds the calls it
knows, ``fake.recordings`` the recordings it started (Recording SID -> the resource as last answered).

**Calls' state.** Calls the fake created are known; ``add_call(sid)`` adds one (an inbound call,
say). By default an update of an unknown call succeeds, as if the call existed; with
``unknown_calls_404=True`` it answers 404 with Twilio's code 20404. ``end_call(sid)`` (or an
update with ``Status=completed``/``canceled``) ends a call, after which updates answer 400 with
code 21220, "call is not in-progress", as Twilio does.

**Recordings.** Starting one answers 201 with a recording resource as Twilio's (``sid`` ``RE`` + 32
hex digits, ``call_sid``, ``status`` ``in-progress``, ``channels`` 1 or 2, ``source``
``StartCallRecordingAPI``, ``start_time`` ...); for an unknown call it behaves like an update
(succeeds, or 404 with ``unknown_calls_404``), for an ended call 400 with 21220. An update sets
the recording's ``status`` (``paused`` / ``in-progress`` / ``stopped``); ``Twilio.CURRENT`` names
the call's recording that is going on (none: 404), an unknown or stopped one is 404, and an ended
call 21220. Ending a call completes its recordings. Form values Twilio would refuse (an unknown
``RecordingChannels``, ``Status`` or ``PauseBehavior``) answer 400 with code 20001.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Literal
from urllib.parse import parse_qs

import h11

DEFAULT_ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
DEFAULT_AUTH_TOKEN = "fake-auth-token-0123456789abcdef"
API_VERSION = "2010-04-01"
MAX_REQUEST_BODY_BYTES = 1024 * 1024

NORMAL, HANG, DROP, RESET = "normal", "hang", "drop", "reset"
Operation = Literal["create", "update", "start-recording", "update-recording", "other"]

# Twilio's error codes for the statuses a script names by number alone.
DEFAULT_ERRORS: dict[int, tuple[int, str]] = {
    400: (20001, "Bad request"),
    401: (20003, "Authenticate"),
    403: (20403, "Forbidden"),
    404: (20404, "The requested resource was not found"),
    405: (20004, "Method not allowed"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    502: (20502, "Bad Gateway"),
    503: (20503, "Service Unavailable"),
    504: (20504, "Gateway Timeout"),
}
CALL_NOT_IN_PROGRESS = (21220, "Call is not in-progress. Cannot redirect.")
# What a create may hold besides To and From, as Twilio checks it (docs/protocols.md section 7).
MAX_TWIML_CHARS = 4000
TWIML_TOO_LONG = (32018, "Twiml size exceeded maximum allowed value of 4000 characters")
NO_TWIML = (21205, "Url parameter is required.")
CHOICES = {
    "Method": {"GET", "POST"},
    "StatusCallbackMethod": {"GET", "POST"},
    "AsyncAmdStatusCallbackMethod": {"POST"},
    "MachineDetection": {"Enable", "DetectMessageEnd"},
    "AsyncAmd": {"true", "false"},
    "StatusCallbackEvent": {"initiated", "ringing", "answered", "completed"},
}
ENDED_STATUSES = frozenset({"completed", "canceled", "failed", "busy", "no-answer"})
CURRENT_RECORDING = "Twilio.CURRENT"
LIVE_RECORDING_STATUSES = frozenset({"in-progress", "paused"})
RECORDING_UPDATE_STATUSES = frozenset({"paused", "in-progress", "stopped"})


@dataclass(frozen=True)
class Reply:
    """An exact answer for a script: ``body`` is JSON-encoded if a dict or list, sent as is if bytes/str."""

    status: int
    body: Any = b""
    headers: Mapping[str, str] = field(default_factory=dict)


Step = int | str | Reply | asyncio.Event


def twilio_error(status: int, code: int | None, message: str, *, headers: Mapping[str, str] | None = None) -> Reply:
    """Twilio's JSON error body, e.g. ``twilio_error(400, 21210, "The source phone number ...")``."""
    body: dict[str, Any] = {"message": message, "status": status}
    if code is not None:
        body["code"] = code
        body["more_info"] = f"https://www.twilio.com/docs/errors/{code}"
    return Reply(status, body, dict(headers or {}))


def rate_limited(retry_after: float | int | None = None) -> Reply:
    """A 429 as Twilio sends it, with ``Retry-After`` (seconds) when given."""
    headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
    code, message = DEFAULT_ERRORS[429]
    return twilio_error(429, code, message, headers=headers)


@dataclass
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    form: dict[str, list[str]]  # the form-encoded body; a repeated field keeps every value, in order
    username: str | None  # from HTTP Basic auth; None when there was none (or it was malformed)
    password: str | None
    operation: Operation
    account_sid: str | None  # from the path
    call_sid: str | None  # from the path, for an update or a recording
    recording_sid: str | None = None  # from the path, for a recording's update
    outcome: int | str = ""  # the status answered, or "hang" / "drop" / "reset"

    def field(self, name: str) -> str | None:
        """The first value of form field ``name``, or None."""
        values = self.form.get(name)
        return values[0] if values else None

    @property
    def auth(self) -> tuple[str, str] | None:
        """``(user, password)`` from Basic auth, like ``requests``' ``auth`` tuple."""
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    def form_pairs(self) -> list[tuple[str, str]]:
        """Every (name, value) field, repeated fields once per value: compare these as multisets."""
        return [(name, value) for name, values in self.form.items() for value in values]


class FakeTwilioRest:
    """Twilio's Calls API on 127.0.0.1 and an ephemeral port; see the module docstring."""

    def __init__(
        self,
        account_sid: str = DEFAULT_ACCOUNT_SID,
        auth_token: str = DEFAULT_AUTH_TOKEN,
        *,
        unknown_calls_404: bool = False,
    ) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.unknown_calls_404 = unknown_calls_404
        self.requests: list[RecordedRequest] = []
        self.calls: dict[str, dict[str, Any]] = {}  # Call SID -> the call resource as last answered
        self.recordings: dict[str, dict[str, Any]] = {}  # Recording SID -> the recording as last answered
        self.port = 0
        self._scripts: dict[str, deque[Step]] = {}
        self.held: list[RecordedRequest] = []  # requests waiting for an Event step to be set
        self._server: asyncio.Server | None = None
        self._handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._arrived = asyncio.Condition()
        self._sids = (f"CA{n:032x}" for n in itertools.count(0xCA11))
        self._recording_sids = (f"RE{n:032x}" for n in itertools.count(0xEC0D))

    @property
    def url(self) -> str:
        """The base URL to give a client as its API URL."""
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> FakeTwilioRest:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # Hung and kept-alive connections wait forever by design; end them so the test's loop shuts
        # down clean. Aborted, not cancelled: asyncio's stream callback on Python 3.11 logs an error
        # for a connection handler that ends cancelled.
        for writer in list(self._handlers.values()):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=2)
        for task in list(self._handlers):
            task.cancel()  # still running after its connection was aborted: should not happen
        await self._server.wait_closed()

    # -- configuration ----------------------------------------------------------------------

    def script(self, target: str, *steps: Step) -> None:
        """Queue ``steps`` for requests matching ``target`` (an operation, a Recording or Call SID, a path, "*")."""
        for step in steps:
            if isinstance(step, str) and step not in (NORMAL, HANG, DROP, RESET):
                raise ValueError(f"unknown script step {step!r}")
        self._scripts.setdefault(target, deque()).extend(steps)

    def pending_steps(self, target: str) -> int:
        """How many scripted steps for ``target`` have not been used yet."""
        return len(self._scripts.get(target, ()))

    def add_call(self, call_sid: str, status: str = "in-progress", **fields: Any) -> dict[str, Any]:
        """Make a call known (an inbound call, say), so updates of it succeed."""
        call = self._call_resource(call_sid, status, **fields)
        self.calls[call_sid] = call
        return call

    def end_call(self, call_sid: str, status: str = "completed") -> None:
        """End a call: updates of it then answer 400 with Twilio's code 21220; its recordings complete."""
        call = self.calls.get(call_sid) or self.add_call(call_sid)
        call["status"] = status
        for recording in self.recordings.values():
            if recording["call_sid"] == call_sid and recording["status"] in LIVE_RECORDING_STATUSES:
                recording["status"] = "completed"

    # -- reading what arrived ---------------------------------------------------------------

    def requests_for(self, operation: Operation | None = None, call_sid: str | None = None) -> list[RecordedRequest]:
        """The recorded requests of one operation and/or call, in arrival order."""
        return [
            request
            for request in self.requests
            if (operation is None or request.operation == operation)
            and (call_sid is None or request.call_sid == call_sid)
        ]

    async def wait_for_requests(
        self, count: int, *, operation: Operation | None = None, call_sid: str | None = None, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Wait until ``count`` matching requests have arrived; returns all matching ones so far."""

        def enough() -> bool:
            return len(self.requests_for(operation, call_sid)) >= count

        async with self._arrived:
            try:
                await asyncio.wait_for(self._arrived.wait_for(enough), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"FakeTwilioRest: {len(self.requests_for(operation, call_sid))} of {count} "
                    f"requests (operation={operation}, call_sid={call_sid}) after {timeout} s"
                ) from None
        return self.requests_for(operation, call_sid)

    @property
    def created_sids(self) -> list[str]:
        """The SIDs of the calls the fake created, in order."""
        return [sid for sid, call in self.calls.items() if call.get("direction") == "outbound-api"]

    # -- serving ----------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers[task] = writer
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                received = await self._read_request(connection, reader)
                if received is None:
                    return
                request, body = received
                recorded = self._record(request, body)
                step = self._next_step(recorded)
                if isinstance(step, asyncio.Event):
                    self.held.append(recorded)
                    async with self._arrived:
                        self._arrived.notify_all()
                    await step.wait()
                    self.held.remove(recorded)
                    step = NORMAL
                if step == HANG:
                    recorded.outcome = HANG
                    await self._publish(recorded)
                    # Keep the connection open, unanswered, until the client gives up on it.
                    while await reader.read(65536):
                        pass
                    return
                if step in (DROP, RESET):
                    recorded.outcome = step
                    await self._publish(recorded)
                    if step == RESET:
                        writer.transport.abort()
                    return
                reply = self._answer(recorded) if step == NORMAL else _reply_for(step, recorded.path)
                recorded.outcome = reply.status
                await self._publish(recorded)
                writer.write(_encode(connection, reply))
                await writer.drain()
                if connection.our_state is h11.MUST_CLOSE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            return  # the client went away or sent garbage: nothing to answer
        finally:
            self._handlers.pop(task, None)
            writer.close()

    async def _read_request(
        self, connection: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BODY_BYTES:
                    raise h11.RemoteProtocolError("request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _record(self, request: h11.Request, body: bytes) -> RecordedRequest:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        path = request.target.decode("latin-1")
        form: dict[str, list[str]] = {}
        if headers.get("content-type", "").split(";")[0].strip() == "application/x-www-form-urlencoded":
            form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        username, password = _basic_auth(headers.get("authorization"))
        operation, account_sid, call_sid, recording_sid = _route(path)
        recorded = RecordedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            headers=headers,
            body=body,
            form=form,
            username=username,
            password=password,
            operation=operation,
            account_sid=account_sid,
            call_sid=call_sid,
            recording_sid=recording_sid,
        )
        return recorded

    async def _publish(self, recorded: RecordedRequest) -> None:
        # Listed (and waiters woken) once the fake has decided what to do with it, so a test that
        # waited for a request can assert on its outcome.
        self.requests.append(recorded)
        async with self._arrived:
            self._arrived.notify_all()

    def _next_step(self, request: RecordedRequest) -> Step:
        for target in (request.path, request.recording_sid, request.call_sid, request.operation, "*"):
            queue = self._scripts.get(target) if target else None
            if queue:
                step = queue.popleft()
                return NORMAL if step in (200, 201) else step
        return NORMAL

    def _answer(self, request: RecordedRequest) -> Reply:
        """What Twilio would answer."""
        if request.operation == "other":
            return _reply_for(404, request.path)
        if request.method != "POST":
            return _reply_for(405, request.path)
        if request.username != self.account_sid or request.password != self.auth_token:
            return _reply_for(401, request.path)
        if request.account_sid != self.account_sid:
            return _reply_for(404, request.path)
        if request.operation == "create":
            return self._create(request)
        assert request.call_sid is not None
        if request.operation == "start-recording":
            return self._start_recording(request, request.call_sid)
        if request.operation == "update-recording":
            assert request.recording_sid is not None
            return self._update_recording(request, request.call_sid, request.recording_sid)
        return self._update(request, request.call_sid)

    def _create(self, request: RecordedRequest) -> Reply:
        to, from_ = request.field("To"), request.field("From")
        if not to:
            return twilio_error(400, 21201, "No 'To' number is specified")
        if not from_:
            return twilio_error(400, 21213, "No 'From' number is specified")
        refusal = _create_refusal(request)
        if refusal is not None:
            return refusal
        sid = next(self._sids)
        call = self._call_resource(sid, "queued", to=to, **{"from": from_, "direction": "outbound-api"})
        self.calls[sid] = call
        return Reply(201, call)

    def _live_call(self, request: RecordedRequest, call_sid: str) -> dict[str, Any] | Reply:
        """The call a request changes, or Twilio's error: unknown (with ``unknown_calls_404``), or over."""
        call = self.calls.get(call_sid)
        if call is None:
            if self.unknown_calls_404:
                return _reply_for(404, request.path)
            call = self.add_call(call_sid)
        if call["status"] in ENDED_STATUSES:
            return twilio_error(400, *CALL_NOT_IN_PROGRESS)
        return call

    def _update(self, request: RecordedRequest, call_sid: str) -> Reply:
        call = self._live_call(request, call_sid)
        if isinstance(call, Reply):
            return call
        status = request.field("Status")
        if status:
            call["status"] = status
        elif request.field("Twiml") is not None or request.field("Url") is not None:
            call["status"] = "in-progress"
        call["date_updated"] = formatdate(usegmt=True)
        return Reply(200, dict(call))

    def _start_recording(self, request: RecordedRequest, call_sid: str) -> Reply:
        call = self._live_call(request, call_sid)
        if isinstance(call, Reply):
            return call
        channels = request.field("RecordingChannels") or "mono"
        events = request.form.get("RecordingStatusCallbackEvent", [])
        if channels not in ("mono", "dual") or not set(events) <= {"in-progress", "completed", "absent"}:
            return twilio_error(400, 20001, "Invalid RecordingChannels or RecordingStatusCallbackEvent")
        sid = next(self._recording_sids)
        now = formatdate(usegmt=True)
        recording = {
            "sid": sid,
            "account_sid": self.account_sid,
            "call_sid": call_sid,
            "conference_sid": None,
            "status": "in-progress",
            "channels": 2 if channels == "dual" else 1,
            "source": "StartCallRecordingAPI",
            "track": request.field("RecordingTrack") or "both",
            "start_time": now,
            "date_created": now,
            "date_updated": now,
            "duration": "-1",
            "price": None,
            "price_unit": "USD",
            "error_code": None,
            "encryption_details": None,
            "api_version": API_VERSION,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{call_sid}/Recordings/{sid}.json",
        }
        self.recordings[sid] = recording
        return Reply(201, dict(recording))

    def _update_recording(self, request: RecordedRequest, call_sid: str, recording_sid: str) -> Reply:
        call = self._live_call(request, call_sid)
        if isinstance(call, Reply):
            return call
        status, pause = request.field("Status"), request.field("PauseBehavior")
        if status not in RECORDING_UPDATE_STATUSES or pause not in (None, "skip", "silence"):
            return twilio_error(400, 20001, "Invalid Status or PauseBehavior")
        if recording_sid == CURRENT_RECORDING:
            live = [r for r in self.recordings.values() if r["call_sid"] == call_sid and r["status"] in LIVE_RECORDING_STATUSES]
            recording = live[-1] if live else None
        else:
            recording = self.recordings.get(recording_sid)
        if recording is None or recording["call_sid"] != call_sid or recording["status"] not in LIVE_RECORDING_STATUSES:
            return _reply_for(404, request.path)
        recording["status"] = status
        recording["date_updated"] = formatdate(usegmt=True)
        return Reply(200, dict(recording))

    def _call_resource(self, sid: str, status: str, **fields: Any) -> dict[str, Any]:
        now = formatdate(usegmt=True)
        return {
            "sid": sid,
            "account_sid": self.account_sid,
            "status": status,
            "direction": "inbound",
            "api_version": API_VERSION,
            "date_created": now,
            "date_updated": now,
            "uri": f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}.json",
            **fields,
        }


def _create_refusal(request: RecordedRequest) -> Reply | None:
    """Twilio's 400 for a create it would refuse beyond To and From: the TwiML, the options' values."""
    twiml, url = request.field("Twiml"), request.field("Url")
    if twiml is None and url is None:
        return twilio_error(400, *NO_TWIML)
    if twiml is not None and len(twiml) > MAX_TWIML_CHARS:
        return twilio_error(400, *TWIML_TOO_LONG)
    for name, allowed in CHOICES.items():
        for value in request.form.get(name, []):
            if value not in allowed:
                return twilio_error(400, 20001, f"{name} must be one of {', '.join(sorted(allowed))}, not {value!r}")
    timeout = request.field("Timeout")
    if timeout is not None and not (timeout.isdigit() and 1 <= int(timeout) <= 600):
        return twilio_error(400, 20001, f"Timeout must be a whole number of seconds up to 600, not {timeout!r}")
    return None



def _route(path: str) -> tuple[Operation, str | None, str | None, str | None]:
    """The operation a path names, with the Account SID, Call SID and Recording SID in it."""
    parts = path.split("?", 1)[0].split("/")
    # "", "2010-04-01", "Accounts", AC…, "Calls.json"  or  …, "Calls", "CA….json"
    # or …, "Calls", CA…, "Recordings.json"  or  …, "Calls", CA…, "Recordings", "RE….json"
    if len(parts) >= 5 and parts[1] == API_VERSION and parts[2] == "Accounts":
        if len(parts) == 5 and parts[4] == "Calls.json":
            return "create", parts[3], None, None
        if len(parts) == 6 and parts[4] == "Calls" and parts[5].endswith(".json"):
            return "update", parts[3], parts[5].removesuffix(".json"), None
        if len(parts) == 7 and parts[4] == "Calls" and parts[6] == "Recordings.json":
            return "start-recording", parts[3], parts[5], None
        if len(parts) == 8 and parts[4] == "Calls" and parts[6] == "Recordings" and parts[7].endswith(".json"):
            return "update-recording", parts[3], parts[5], parts[7].removesuffix(".json")
    return "other", None, None, None


def _basic_auth(header: str | None) -> tuple[str | None, str | None]:
    if not header or not header.lower().startswith("basic "):
        return None, None
    try:
        user, sep, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return (user, password) if sep else (None, None)


def _reply_for(step: Step, path: str) -> Reply:
    if isinstance(step, Reply):
        return step
    assert isinstance(step, int), step
    code, message = DEFAULT_ERRORS.get(step, (None, f"HTTP {step}"))
    if step == 404:
        message = f"The requested resource {path} was not found"  # Twilio quotes the path
    return twilio_error(step, code, message)


def _encode(connection: h11.Connection, reply: Reply) -> bytes:
    body = reply.body
    if isinstance(body, (dict, list)):
        payload = json.dumps(body).encode()
        content_type = "application/json; charset=utf-8"
    else:
        payload = body.encode() if isinstance(body, str) else bytes(body)
        content_type = "application/json; charset=utf-8" if payload else "text/plain"
    headers: list[tuple[str, str]] = [("Content-Type", content_type), ("Content-Length", str(len(payload)))]
    overridden = {name.lower() for name in reply.headers} - {"content-length"}  # ours is the true length
    headers = [(name, value) for name, value in headers if name.lower() not in overridden]
    headers += [(name, value) for name, value in reply.headers.items() if name.lower() != "content-length"]
    events = (h11.Response(status_code=reply.status, headers=headers), h11.Data(data=payload), h11.EndOfMessage())
    return b"".join(connection.send(event) or b"" for event in events)


__all__ = [
    "DEFAULT_ACCOUNT_SID",
    "DEFAULT_AUTH_TOKEN",
    "DROP",
    "FakeTwilioRest",
    "HANG",
    "NORMAL",
    "RESET",
    "RecordedRequest",
    "Reply",
    "rate_limited",
    "twilio_error",
]
