"""One phone call's asyncio shell: it carries out what the call's state machine decides.

The rules of a call live in ``call.Call`` (no I/O). This module owns the call's sockets and
tasks, and nothing else:

- the **Twilio receiver** coroutine takes the caller's messages and feeds them to the machine;
  caller audio comes out of it in ``INBOUND_CHUNK_BYTES`` chunks and goes into the agent queue;
- the **Deepgram sender** coroutine takes that queue (audio, then control messages such as
  function answers, in order) to the agent socket, waiting whenever the socket can take no more;
- the **Deepgram receiver** coroutine takes the agent's messages and feeds them to the machine;
  agent audio comes out of it as Twilio ``media`` frames for the caller.

Backpressure runs through the same chain: while the agent socket is full the queue grows, and
past ``agent_queue_max_bytes`` the Twilio receiver stops taking messages, so the caller's socket
stops being read; while the caller's socket is full, the Deepgram receiver stops taking the
agent's messages. A peer that stays full for ``stall_seconds`` is cut off by the transport.

``CallSession.run`` ends when the machine says ``HangUp`` (or the caller's socket ends). Then,
with a deadline on each step: what is queued for the agent goes out, both sockets close, running
functions get a moment to finish, every task is awaited, and the record is written (and, with
``CALL_WEBHOOK_URL``, the call's summary is queued for the webhook, without waiting).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import InvalidHandshake, InvalidURI

from .agent_protocol import FunctionCall
from .agents import AgentCatalog
from .call import (
    Action,
    ArmTimer,
    Call,
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
    Phase,
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
from .call_requests import REST_SECONDS, CallRequests
from .settings import Settings
from .functions import FunctionOutcome, FunctionRunner
from .logsafe import clean
from .metrics import Metrics
from .records import CallRecord, RecordWriter
from .storage.shared import SharedState
from .twilio_rest import TwilioRestClient
from .transport import AgentPeer, MessageQueue, PeerGone, PeerLimits, ServerPeer, handshake_status, open_websocket
from .webhook import CallDigest, WebhookSender, call_ended_payload

logger = logging.getLogger("bridge.call")

# Running functions (an order being placed) get this long to finish once the call has ended,
# so the record says what they did; nobody is left to hear their answers.
FUNCTION_GRACE_SECONDS = 2.0
# What was queued for the agent (the caller's last words) gets this long to go out at the end.
AGENT_FLUSH_SECONDS = 1.0

AgentConnector = Callable[[], Awaitable[AgentPeer]]


def agent_limits(settings: Settings) -> PeerLimits:
    """The agent is a service we chose, but it gets deadlines and caps all the same."""
    return PeerLimits(
        max_message_bytes=2**22,  # TTS chunks have no fixed size
        frames_per_second=2000.0,
        frame_burst=10_000,
        stall_timeout=settings.limits.stall_timeout_seconds,
        close_timeout=settings.limits.close_timeout_seconds,
        ping_interval=settings.limits.ping_interval_seconds,
        ping_timeout=settings.limits.ping_interval_seconds,
        inbox_max_bytes=1024 * 1024,
    )


def caller_limits(settings: Settings, max_message_bytes: int) -> PeerLimits:
    """Twilio's side (or the browser phone's): public, so it gets a fair share and no more."""
    return PeerLimits(
        max_message_bytes=max_message_bytes,
        frames_per_second=settings.limits.caller_frames_per_second,
        frame_burst=settings.limits.max_caller_frame_burst,
        stall_timeout=settings.limits.stall_timeout_seconds,
        close_timeout=settings.limits.close_timeout_seconds,
        ping_interval=settings.limits.ping_interval_seconds,
        ping_timeout=settings.limits.ping_interval_seconds,
    )


def websocket_agent_connector(settings: Settings) -> AgentConnector:
    """The production seam: open the Deepgram agent WebSocket. Tests pass their own URL or connector."""
    headers = (("Authorization", f"Token {settings.deepgram_api_key}"),)
    limits = agent_limits(settings)

    async def connect_agent() -> AgentPeer:
        return await open_websocket(settings.deepgram_agent_url, headers, limits)

    return connect_agent


@dataclass(frozen=True, slots=True)
class CallServices:
    """What every call of a server process shares; all of it is read-only once serving."""

    settings: Settings
    functions: FunctionRunner
    connect_agent: AgentConnector
    records: RecordWriter
    rest: TwilioRestClient | None = None  # Twilio's REST API, when TWILIO_ACCOUNT_SID is set
    metrics: Metrics = field(default_factory=Metrics)  # the process's Prometheus metrics
    webhook: WebhookSender | None = None  # the end-of-call webhook, when CALL_WEBHOOK_URL is set
    shared: SharedState | None = None  # what the processes share (warm transfers' notes), with the REST API


def rest_client(settings: Settings) -> TwilioRestClient | None:
    """The production seam for Twilio's REST API; tests point TWILIO_API_URL at a fake."""
    if not settings.rest_enabled:
        return None
    assert settings.twilio_account_sid is not None and settings.twilio_auth_token is not None
    return TwilioRestClient(
        settings.twilio_account_sid,
        settings.twilio_auth_token,
        settings.twilio_api_url,
        timeout=settings.limits.twilio_api_timeout_seconds,
        backoff=settings.limits.twilio_api_backoff_seconds,
    )


class CallLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with the call it belongs to (the callSid once Twilio has told us)."""

    def __init__(self, logger: logging.Logger, call_name: str) -> None:
        super().__init__(logger, {})
        self.call_name = call_name

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.call_name}] {msg}", kwargs


class CallSession:
    """One call, from the Twilio handshake to the written record."""

    # One a call, alive for its whole length: slots instead of a dict save memory per call.
    __slots__ = (
        "caller", "services", "settings", "loop", "started", "log", "call", "record", "digest", "_timers", "_hung_up",
        "agent", "_agent_opening", "_agent_tasks", "_to_agent", "_to_agent_bytes", "_agent_backlogged",
        "_may_read_caller", "_function_tasks", "_cancel_reasons", "_fallback", "requests", "_requests", "_watching",
    )

    def __init__(
        self,
        caller: ServerPeer,
        services: CallServices,
        connection_id: str,
        *,
        agents: AgentCatalog,
        browser: bool = False,
    ) -> None:
        settings = services.settings
        self.caller = caller
        self.services = services
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.log = CallLog(logger, connection_id)
        # ``agents``: the server's agents when the call was admitted; the start event picks one.
        self.call = Call(settings, agents, services.functions.async_functions, browser=browser)
        self.record = CallRecord(settings.calls_dir, settings.record_calls, services.records, max_bytes=settings.limits.max_record_bytes)
        # What the webhook's payload needs of the call, kept in memory (bounded) only when one is set.
        self.digest = CallDigest() if services.webhook is not None else None
        self._timers: dict[Timer, asyncio.TimerHandle] = {}
        self._hung_up: asyncio.Future[None] = self.loop.create_future()

        self.agent: AgentPeer | None = None
        self._agent_opening: asyncio.Task[None] | None = None
        self._agent_tasks: list[asyncio.Task[None]] = []
        # The agent queue: what the Deepgram sender takes to the current agent socket. Its audio
        # bytes are counted so the machine hears when it goes over (and back under) its cap.
        self._to_agent: MessageQueue[bytes | str | None] = MessageQueue(self.loop)
        self._to_agent_bytes = 0
        self._agent_backlogged = False
        # Whether the caller's socket is read: set only by the machine's PauseCaller/ResumeCaller.
        # An Event for the Twilio receiver coroutine to wait on; the data callback reads it too.
        self._may_read_caller = asyncio.Event()
        self._may_read_caller.set()

        self._function_tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel_reasons: dict[str, str] = {}
        self._fallback: RedirectCall | None = None  # where to send the caller before hanging up
        # What the call asked of Twilio's REST API and the shared state (call_requests.py): a
        # transfer, the recording, a warm transfer's steps. Each is awaited before the record is
        # written; the watch for a pharmacist's answer is cancelled when the call ends.
        self.requests = CallRequests(settings, services.rest, services.shared, self.log)
        self._requests: set[asyncio.Task[None]] = set()
        self._watching: asyncio.Task[None] | None = None

    @property
    def ended(self) -> bool:
        return self._hung_up.done()

    def shut_down(self) -> None:
        """End the call now: the server is stopping and the drain time is over."""
        self._carry_out(self.call.shutdown(self.loop.time()))

    async def run(self) -> None:
        self._carry_out(self.call.connected(self.loop.time()))
        self.caller.take = self._caller_message_now
        twilio_receiver = asyncio.create_task(self._receive_from_twilio())
        try:
            await asyncio.wait((twilio_receiver, self._hung_up), return_when=asyncio.FIRST_COMPLETED)
            if not self._hung_up.done():
                # The receiver ended without the machine hanging up: a bug; end the call anyway.
                self._carry_out(self.call.failed(self.loop.time()))
        finally:
            await self._shutdown(twilio_receiver)

    # ------------------------------------------------------------------------- carrying out

    def _carry_out(self, actions: Sequence[Action]) -> None:
        for action in actions:
            match action:
                case SendToAgent(data=data):
                    self._send_to_agent(data)
                case SendToCaller(text=text) | ClearCaller(text=text) | MarkCaller(text=text):
                    self.caller.send_text(text)
                case Record(event=event, fields=fields):
                    self.record.add(event, **fields)
                    self.services.metrics.on_record(event, fields)
                    if self.digest is not None:
                        self.digest.add(event, fields)
                case Log(level=level, message=message, args=args):
                    self.log.log(level, message, *args)
                case ArmTimer(timer=timer, at=at):
                    self._arm(timer, at)
                case CancelTimer(timer=timer):
                    handle = self._timers.pop(timer, None)
                    if handle is not None:
                        handle.cancel()
                case StartFunction(call=function_call):
                    self._start_function(function_call)
                case CancelFunction(call_id=call_id):
                    self._cancel_function(call_id, "cancelled: the agent withdrew the call")
                case OpenAgent():
                    self._open_agent()
                case CloseAgent():
                    self._drop_agent()
                case PauseCaller():
                    self._may_read_caller.clear()
                case ResumeCaller():
                    self._may_read_caller.set()
                case Identify(call_sid=call_sid):
                    self.log.call_name = clean(call_sid, 64)
                    self.record.name_after(call_sid)
                case HangUp(fallback=fallback):
                    if not self._hung_up.done():
                        self._fallback = fallback
                        self._hung_up.set_result(None)
                case TransferCall(redirect=redirect):
                    self._request(self._transfer_call(redirect))
                case StartRecording(call_sid=call_sid):
                    self._request(self._start_recording(call_sid))
                case UpdateRecording(call_sid=call_sid, pause=pause):
                    self._request(self._update_recording(call_sid, pause))
                case DialPharmacist() as dial:
                    self._request(self._dial_pharmacist(dial))
                case WatchForNote() as watch:
                    self._stop_watching()
                    self._watching = asyncio.create_task(self._watch_for_note(watch))
                case StopWatchingForNote():
                    self._stop_watching()
                case NoteCallerLeft(caller_call_sid=caller_call_sid):
                    self._request(self.requests.note_caller_left(caller_call_sid))
                case EndCallLeg(call_sid=call_sid):
                    self._request(self.requests.end_leg(call_sid))
                case _:
                    raise AssertionError(f"unknown action {action!r}")

    def _arm(self, timer: Timer, at: float) -> None:
        handle = self._timers.pop(timer, None)
        if handle is not None:
            handle.cancel()
        self._timers[timer] = self.loop.call_at(at, self._timer_fired, timer)

    def _timer_fired(self, timer: Timer) -> None:
        self._timers.pop(timer, None)
        self._carry_out(self.call.timer_fired(timer, self.loop.time()))

    # ----------------------------------------------------------------------- Twilio receiver

    # The two receivers take a message straight from the socket's data callback whenever they are
    # idle and may read (the usual case: 50 media events a second a call); a message that finds
    # them busy or held back waits in the socket's inbox for the coroutine, in order. A task
    # switch per message would cost more CPU than all the rest of the bridge's work on it.

    def _caller_message_now(self, message: str | bytes) -> bool:
        if not self._may_read_caller.is_set():
            return False
        try:
            self._caller_message(message)
        except Exception:
            self._crashed()
        return True

    def _agent_message_now(self, message: str | bytes) -> bool:
        # A dropped socket (frames behind an Error in one read) delivers nothing more: abort() stops it.
        if self.caller.writing_paused:
            return False
        try:
            self._agent_message(message)
        except Exception:
            self._crashed()
        return True

    def _caller_message(self, message: str | bytes) -> None:
        now = self.loop.time()
        if type(message) is str:
            actions = self.call.caller_text(message, now)
        else:
            actions = self.call.caller_binary(message, now)  # type: ignore[arg-type]
        if actions:
            self._carry_out(actions)

    def _agent_message(self, message: str | bytes) -> None:
        now = self.loop.time()
        if type(message) is bytes:
            actions = self.call.agent_binary(message, now)
        else:
            actions = self.call.agent_text(message, now)  # type: ignore[arg-type]
        if actions:
            self._carry_out(actions)

    def _crashed(self) -> None:
        self.log.exception("the call failed unexpectedly")
        self._carry_out(self.call.failed(self.loop.time()))

    async def _receive_from_twilio(self) -> None:
        caller, call, loop = self.caller, self.call, self.loop
        may_read = self._may_read_caller
        while not self._hung_up.done():
            if not may_read.is_set() and not caller.closed.done():
                await self._caller_readable()  # backpressure: the agent side can take no more for now
                continue
            message = await caller.receive()
            if message is None:
                break
            if not may_read.is_set() and not caller.closed.done():
                await self._caller_readable()  # the hold began while this message was on its way
            self._caller_message(message)
        self._carry_out(call.caller_closed(loop.time(), stalled=caller.stalled))

    async def _caller_readable(self) -> None:
        """Wait until the caller may be read again, or until their socket has closed.

        A held caller is not read, so their hang-up can't arrive as a message: the transport
        notices it on the socket and closes the connection (bridge/transport.py). Then what the
        caller sent before it, which waits in the socket's inbox (bounded), is taken at once,
        hold or not, and the end of the inbox ends the call.
        """
        waiting = asyncio.ensure_future(self._may_read_caller.wait())
        try:
            await asyncio.wait((waiting, self.caller.closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()

    # --------------------------------------------------------------------- the agent session

    def _open_agent(self) -> None:
        self._drop_agent()
        self._agent_opening = asyncio.create_task(self._connect_agent())

    async def _connect_agent(self) -> None:
        try:
            peer = await self.services.connect_agent()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is one sentence for the machine
            self._carry_out(self.call.agent_open_failed(_connect_failure(exc), self.loop.time()))
            return
        if self._agent_opening is not asyncio.current_task() or self.ended:
            peer.abort()  # the attempt was abandoned while its handshake finished
            return
        self._agent_opening = None
        self.agent = peer
        peer.take = self._agent_message_now
        self._to_agent = MessageQueue(self.loop)
        self._agent_tasks = [
            asyncio.create_task(self._send_to_agent_loop(peer, self._to_agent)),
            asyncio.create_task(self._receive_from_agent(peer)),
        ]
        self._carry_out(self.call.agent_connected(self.loop.time()))

    def _drop_agent(self) -> None:
        """Abandon the current agent socket or attempt; its late events are ignored."""
        opening, self._agent_opening = self._agent_opening, None
        if opening is not None and opening is not asyncio.current_task():
            opening.cancel()
        peer, self.agent = self.agent, None
        if peer is not None:
            peer.abort()
        for task in self._agent_tasks:
            task.cancel()
        self._to_agent_bytes = 0
        self._report_backlog()

    def _send_to_agent(self, data: bytes | str) -> None:
        if self.agent is None:
            return  # the machine sends only to a connected session; this one just went away
        self._to_agent.put(data)
        if type(data) is bytes:
            self._to_agent_bytes += len(data)
            if not self._agent_backlogged and self._to_agent_bytes > self.settings.limits.max_agent_queue_bytes:
                self._report_backlog()

    def _report_backlog(self) -> None:
        """Tell the machine when the agent queue's audio crosses its cap, either way."""
        backlogged = self._to_agent_bytes > self.settings.limits.max_agent_queue_bytes
        if backlogged != self._agent_backlogged:
            self._agent_backlogged = backlogged
            self._carry_out(self.call.agent_backlog(backlogged, self.loop.time()))

    async def _send_to_agent_loop(self, peer: AgentPeer, queue: MessageQueue[bytes | str | None]) -> None:
        """The Deepgram sender: the agent queue to the socket, in order, one writer."""
        try:
            while True:
                item = await queue.get()
                if item is None:
                    peer.close()  # the call is over; what was queued before this has gone out
                    return
                if type(item) is bytes:
                    peer.send_binary(item)
                    if peer is self.agent:
                        self._to_agent_bytes -= len(item)
                        if self._agent_backlogged:
                            self._report_backlog()
                else:
                    peer.send_text(item)  # type: ignore[arg-type]
                if peer.writing_paused:
                    await peer.drained()
        except PeerGone:
            pass  # the receiver sees the same closed socket and the machine decides what it means

    async def _receive_from_agent(self, peer: AgentPeer) -> None:
        """The Deepgram receiver: the agent's messages into the machine."""
        call, loop, caller = self.call, self.loop, self.caller
        try:
            while True:
                message = await peer.receive()
                if message is None or peer is not self.agent:
                    break
                self._agent_message(message)
                if caller.writing_paused:
                    await caller.drained()  # backpressure: the caller's socket can take no more
        except PeerGone:
            return  # the caller is gone; the Twilio receiver ends the call
        if peer is self.agent:
            self.agent = None
            self._carry_out(call.agent_closed(peer.close_code, peer.close_reason, loop.time(), stalled=peer.stalled))

    # ---------------------------------------------------------------------------- functions

    def _start_function(self, call: FunctionCall) -> None:
        self._function_tasks[call.id] = asyncio.create_task(self._run_function(call))

    def _cancel_function(self, call_id: str, reason: str) -> None:
        task = self._function_tasks.get(call_id)
        if task is not None and not task.done():
            self._cancel_reasons[call_id] = reason
            task.cancel()

    async def _run_function(self, call: FunctionCall) -> None:
        started = self.loop.time()
        try:
            outcome = await self.services.functions.run(
                call.name, call.arguments, self.log, functools.partial(self._function_returned_late, call)
            )
        except asyncio.CancelledError:
            reason = self._cancel_reasons.pop(call.id, "the call ended before it finished")
            outcome = FunctionOutcome(json.dumps({"error": reason}), None, reason, self.loop.time() - started, "cancelled")
        finally:
            self._function_tasks.pop(call.id, None)
        self._carry_out(self.call.function_finished(call.id, outcome, self.loop.time()))

    def _function_returned_late(self, call: FunctionCall, outcome: FunctionOutcome) -> None:
        # Dropped if the record is already written; the runner's log line remains.
        self._carry_out(self.call.function_finished_late(call, outcome))

    # ------------------------------------------------------------------------- call control

    def _request(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    def _stop_watching(self) -> None:
        watching, self._watching = self._watching, None
        if watching is not None:
            watching.cancel()
            # Awaited with the rest at the end of the call.
            self._requests.add(watching)
            watching.add_done_callback(self._requests.discard)

    async def _transfer_call(self, redirect: RedirectCall) -> None:
        error = await self.requests.redirect(redirect)
        self._carry_out(self.call.transfer_finished(error, self.loop.time()))

    async def _start_recording(self, call_sid: str) -> None:
        path = self.record.path
        recording_sid, error = await self.requests.start_recording(call_sid, path.name if path is not None else None)
        self._carry_out(self.call.recording_started(recording_sid, error))

    async def _update_recording(self, call_sid: str, pause: bool) -> None:
        self._carry_out(self.call.recording_updated(pause, await self.requests.update_recording(call_sid, pause)))

    async def _dial_pharmacist(self, dial: DialPharmacist) -> None:
        pharmacist_sid, error = await self.requests.dial_pharmacist(dial)
        self._carry_out(self.call.consult_dialled(pharmacist_sid, error, self.loop.time()))

    async def _watch_for_note(self, watch: WatchForNote) -> None:
        note = await self.requests.wait_for_note(watch)
        self._watching = None
        self._carry_out(self.call.consult_answered(note, self.loop.time()))

    # ------------------------------------------------------------------------------ ending

    async def _shutdown(self, twilio_receiver: asyncio.Task[None]) -> None:
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if not self.call.phase is Phase.ENDED:
            self._carry_out(self.call.failed(self.loop.time()))
        if self._fallback is not None:
            # Before the stream closes: with <Connect> as the last verb, closing it hangs up.
            self._carry_out(self.call.fallback_finished(await self.requests.redirect(self._fallback)))
        # The caller's socket closes now; the agent's once what was queued for it has gone out.
        self.caller.close()
        opening, self._agent_opening = self._agent_opening, None
        if opening is not None:
            opening.cancel()
        agent, sender = self.agent, self._agent_tasks[0] if self._agent_tasks else None
        if agent is not None and sender is not None:
            self._to_agent.put(None)
            await asyncio.wait((sender,), timeout=AGENT_FLUSH_SECONDS)
            agent.close()
        closing = [peer.closed for peer in (self.caller, agent) if peer is not None]
        await asyncio.wait(closing, timeout=self.settings.limits.close_timeout_seconds + 0.5)
        for peer in (self.caller, agent):
            if peer is not None:
                peer.abort()  # a no-op for a socket that closed
        if self._function_tasks:
            await asyncio.wait(list(self._function_tasks.values()), timeout=FUNCTION_GRACE_SECONDS)
            for call_id in list(self._function_tasks):
                self._cancel_function(call_id, "the call ended before it finished")
        self._stop_watching()
        # Twilio ends the stream as the call moves to <Dial>: let the REST answer be recorded.
        # The same for the recording's start, and the pharmacist's leg hung up when the caller left,
        # including one a request still under way asks for when it answers (hence the loop).
        deadline = self.loop.time() + REST_SECONDS
        while self._requests and (left := deadline - self.loop.time()) > 0:
            await asyncio.wait(list(self._requests), timeout=left)
        tasks = [twilio_receiver, *self._agent_tasks, *self._function_tasks.values(), *self._requests]
        if opening is not None:
            tasks.append(opening)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._write_record()
        call = self.call
        self.log.info(
            "call ended: %s; audio from caller %d bytes, to agent %d, to caller %d",
            call.end_reason,
            call.inbound.bytes_from_caller,
            call.inbound.bytes_to_agent,
            call.playback.bytes_to_caller,
        )

    async def _write_record(self) -> None:
        call = self.call
        summary = self.record.summary(**call.summary())
        stream = call.stream
        try:
            path = await self.record.finish(stream.call_sid if stream else self.log.call_name, summary)
        except OSError as exc:
            self.log.error("could not write the call record: %s", exc)
        else:
            if path is not None:
                self.log.debug("record written to %s", path)
        webhook = self.services.webhook
        # A connection that never sent ``start`` was no call: nothing to report.
        if webhook is not None and self.digest is not None and stream is not None:
            # Never waits: the summary joins the sender's queue, or is dropped if it is full.
            webhook.submit(call_ended_payload(summary, self.digest))


def _connect_failure(exc: Exception) -> str:
    """One sentence for why the agent socket could not be opened."""
    status = handshake_status(exc)
    if status is not None:
        hint = " (check DEEPGRAM_API_KEY)" if status in (401, 403) else ""
        return f"Deepgram refused the connection with HTTP {status}{hint}"
    if isinstance(exc, InvalidURI | InvalidHandshake | OSError):
        return f"cannot reach Deepgram: {clean(exc, 200)}"
    return f"unexpected {type(exc).__name__} while connecting to Deepgram: {clean(exc, 200)}"
