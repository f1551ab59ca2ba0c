"""One phone call: the Twilio stream, its Deepgram agent session, and the coroutines between them.

Three coroutines joined by a queue carry a call:

- the Twilio receiver reads Twilio's events, buffers caller audio and queues it in
  ``INBOUND_BUFFER_BYTES`` chunks (flushing the tail when the caller hangs up);
- the Deepgram sender takes the queue (audio, then control messages such as function answers)
  to the agent socket, in order, from one place;
- the Deepgram receiver turns agent audio into Twilio ``media`` events and agent JSON into
  actions (barge-in, marks, function calls, transcripts, records).

``CallSession.run`` supervises them: whichever side ends, the other is ended, both sockets are
closed, every task of the call is awaited and the record is written. The protocol details live
in ``twilio.py`` and ``agent_protocol.py``; this module only moves things between sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from . import agent_protocol as agent
from . import twilio
from .config import AgentConfig, Settings
from .connection import AgentConnection, TwilioConnection
from .functions import FunctionOutcome, FunctionRunner
from .records import CallRecord, RecordWriter

logger = logging.getLogger("bridge.call")

# Close codes after which the agent session is worth resuming rather than ending the call:
# no close frame at all (1006), or the server going away / failing / restarting.
RESUMABLE_CLOSE_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
# How long a hung-up caller's last audio may take to reach the agent before we close anyway.
TAIL_FLUSH_SECONDS = 1.0
# Reconnecting must be quick or the caller hears dead air; cap each attempt's handshake.
RECONNECT_HANDSHAKE_SECONDS = 3.0
CLOSE_TIMEOUT_SECONDS = 1.0
FUNCTION_GRACE_SECONDS = 2.0
HANGUP_MARK = "end-call"
# end_call after the goodbye was sent: how long to allow for any last words before hanging up.
HANGUP_GRACE_SECONDS = 1.5

AgentConnector = Callable[[], Awaitable[ClientConnection]]


def websocket_agent_connector(url: str, api_key: str) -> AgentConnector:
    """The production seam: open the Deepgram agent WebSocket. Tests pass their own URL or connector."""

    async def connect_agent() -> ClientConnection:
        return await connect(
            url,
            additional_headers={"Authorization": f"Token {api_key}"},
            create_connection=AgentConnection,
            compression=None,  # audio doesn't compress; deflate would only cost CPU and memory
            max_size=2**22,  # TTS chunks have no fixed size
            open_timeout=None,  # the caller bounds the whole handshake
            close_timeout=CLOSE_TIMEOUT_SECONDS,
        )

    return connect_agent


@dataclass(frozen=True, slots=True)
class CallServices:
    """What every call of a server process shares; all of it is read-only once serving."""

    settings: Settings
    agent_config: AgentConfig
    functions: FunctionRunner
    connect_agent: AgentConnector
    settings_json: str  # the Settings message, encoded once for every fresh session
    records: RecordWriter


class AgentUnavailable(Exception):
    """The agent session could not be opened; the message is the reason, for one log line."""


class CallLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes each line with the call it belongs to (the callSid once Twilio has told us)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['call']}] {msg}", kwargs  # type: ignore[index]


class CallSession:
    """One call, from the Twilio handshake to the written record."""

    def __init__(
        self,
        twilio_socket: ServerConnection,
        services: CallServices,
        connection_id: str,
        *,
        browser: bool = False,
    ) -> None:
        self.twilio_socket = twilio_socket
        self.services = services
        self.settings = services.settings
        self.browser = browser
        self.log = CallLog(logger, {"call": connection_id})
        self.record = CallRecord(self.settings.calls_dir, self.settings.record_calls, services.records)
        loop = asyncio.get_running_loop()
        self._loop = loop

        # Caller audio chunks (bytes), control messages (str), and None once the caller is gone.
        self.queue: asyncio.Queue[bytes | str | None] = asyncio.Queue()
        self._buffer = bytearray()
        self._chunk_bytes = self.settings.inbound_buffer_bytes
        self.stream: twilio.StreamStart | None = None
        self._outbound: twilio.TwilioOutbound | None = None
        self._started: asyncio.Future[None] = loop.create_future()
        self._ended: asyncio.Future[None] = loop.create_future()
        self._caller_done: asyncio.Future[None] = loop.create_future()
        self.end_reason: str | None = None
        self.caller_gone = False

        self.agent_socket: ClientConnection | None = None
        self._agent_ready = False
        # Bumped on every agent (re)connection; a function answer for an older one is not sent.
        self._generation = 0
        self.history: list[str] = []  # the conversation so far, for a resumed agent session
        self.function_tasks: dict[str, asyncio.Task[None]] = {}
        self._withdrawn_calls: set[str] = set()  # FunctionCallCancelled: run on, but send no answer

        self._last_agent_send = loop.time()
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._hangup_requested = False
        self._hangup_call_id: str | None = None
        self._hangup_timer: asyncio.TimerHandle | None = None
        self._hangup_grace_timer: asyncio.TimerHandle | None = None
        self._hangup_when_heard = False  # hang up as soon as every mark sent has been heard
        self._agent_turn_open = False  # the agent has begun a turn whose AgentAudioDone hasn't come
        self._marks_sent = 0
        # Marks sent and not yet echoed; and those a clear made Twilio echo without playing them.
        self._marks_out: set[str] = set()
        self._marks_cleared: set[str] = set()
        self._audio_since_mark = 0
        self._bad_input: dict[str, int] = {}

        self.bytes_from_caller = 0
        self.bytes_to_agent = 0
        self.bytes_to_caller = 0
        self.gap_bytes_dropped = 0

    # ----------------------------------------------------------------------------- supervision

    def end(self, reason: str) -> None:
        """Ask the call to end; the first reason given is the one recorded."""
        if self.end_reason is None:
            self.end_reason = reason
        if not self._ended.done():
            self._ended.set_result(None)

    async def run(self) -> None:
        self.log.info("call connected%s", " (browser phone)" if self.browser else "")
        twilio_task = asyncio.create_task(self._receive_from_twilio())
        agent_task = asyncio.create_task(self._run_agent())
        try:
            await asyncio.wait(
                (twilio_task, agent_task, self._ended, self._caller_done), return_when=asyncio.FIRST_COMPLETED
            )
            if self.caller_gone and not self._ended.done():
                # The caller is gone and the tail of their audio is queued: let the sender deliver it.
                await asyncio.wait((agent_task,), timeout=TAIL_FLUSH_SECONDS)
        finally:
            await self._shutdown(twilio_task, agent_task)

    async def _shutdown(self, *tasks: asyncio.Task[None]) -> None:
        self.end("call ended")
        self._cancel_timers()
        if self.browser:
            # The page shows why the call ended; a stuck socket must not hold up the hang-up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_browser({"event": "call_ended", "reason": self.end_reason}), 0.5)
        # Close both sockets at once; each close is bounded by its close_timeout.
        sockets = [self.twilio_socket.close()]
        agent_socket = self.agent_socket
        if agent_socket is not None:
            sockets.append(agent_socket.close())
        await asyncio.gather(*sockets, return_exceptions=True)
        if self.function_tasks:
            # A function already running (an order being placed) gets a moment to finish so the
            # record says what it did; nobody is left to hear its answer.
            await asyncio.wait(list(self.function_tasks.values()), timeout=FUNCTION_GRACE_SECONDS)
        pending = [*tasks, *self.function_tasks.values()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self.agent_socket is not agent_socket and self.agent_socket is not None:
            # An agent handshake finished while the sockets above were closing: close that one too.
            await self.agent_socket.close()
        self._cancel_timers()
        await self._write_record()
        self.log.info(
            "call ended: %s; audio from caller %d bytes, to agent %d, to caller %d",
            self.end_reason,
            self.bytes_from_caller,
            self.bytes_to_agent,
            self.bytes_to_caller,
        )

    def _cancel_timers(self) -> None:
        for timer in (self._keepalive_timer, self._hangup_timer, self._hangup_grace_timer):
            if timer is not None:
                timer.cancel()

    async def _write_record(self) -> None:
        stream = self.stream
        summary = self.record.summary(
            call_sid=stream.call_sid if stream else None,
            stream_sid=stream.stream_sid if stream else None,
            custom_parameters=stream.custom_parameters if stream else {},
            ended_by=self.end_reason,
            audio_bytes_from_caller=self.bytes_from_caller,
            audio_bytes_to_agent=self.bytes_to_agent,
            audio_bytes_to_caller=self.bytes_to_caller,
            audio_bytes_dropped_in_reconnect=self.gap_bytes_dropped,
            bad_input=self._bad_input,
        )
        try:
            path = await self.record.finish(stream.call_sid if stream else str(self.log.extra["call"]), summary)  # type: ignore[index]
        except OSError as exc:
            self.log.error("could not write the call record: %s", exc)
            return
        if path is not None:
            self.log.debug("record written to %s", path)

    def _reject(self, source: str, kind: str, detail: str) -> None:
        """Log bad input once per kind per call, and count every occurrence for the record."""
        key = f"{source}:{kind}"
        seen = self._bad_input.get(key, 0)
        self._bad_input[key] = seen + 1
        if not seen:
            self.log.warning("ignoring bad input: %s (further ones of this kind are counted, not logged)", detail)

    # ---------------------------------------------------------------------- 1. Twilio receiver

    async def _receive_from_twilio(self) -> None:
        socket = self.twilio_socket
        if isinstance(socket, TwilioConnection):
            # Whole text frames (all of Twilio's) now arrive through _on_twilio_frame directly;
            # this loop still owns the socket's life and gets binary and fragmented messages.
            socket.on_text = self._on_twilio_frame
        try:
            async for message in socket:
                if type(message) is not str:
                    self._reject("twilio", "binary", "Twilio sent a binary frame; Media Streams frames are JSON text")
                    continue
                self._on_twilio_frame(message)
                if self.caller_gone:
                    break
        except ConnectionClosed:
            pass  # the caller's socket dropped without a close frame: same as a hang-up
        finally:
            if isinstance(socket, TwilioConnection):
                socket.on_text = None
            self._caller_finished()

    def _on_twilio_frame(self, text: str) -> None:
        if self.caller_gone:
            return  # after stop, nothing Twilio sends matters
        try:
            # The hot path, 50 times a second per call: caller audio once the stream has started.
            audio = twilio.fast_media_payload(text)
            if audio is not None and self._outbound is not None:
                self._on_caller_audio(audio)
            elif not self._on_twilio_text(text):
                self._caller_finished()
        except Exception:
            self.log.exception("the Twilio side failed unexpectedly")
            self.end("internal error")

    def _caller_finished(self) -> None:
        """The caller is gone (stop or close): flush their audio and let the agent side finish."""
        if self.caller_gone:
            return
        self.caller_gone = True
        # Every byte the caller sent reaches the agent, the partial buffer included.
        if self._buffer:
            self.queue.put_nowait(bytes(self._buffer))
            self._buffer.clear()
        self.queue.put_nowait(None)
        if self.end_reason is None:
            self.end_reason = "caller hung up"
        self._caller_done.set_result(None)

    def _on_twilio_text(self, text: str) -> bool:
        """Handle one Twilio event; False when the stream has stopped."""
        try:
            event, message = twilio.parse_event(text)
            if event == "media":
                self._on_caller_audio(twilio.media_payload(message))
            elif event == "mark":
                self._on_mark_echo(twilio.mark_name(message))
            elif event == "start":
                self._on_start(twilio.parse_start(message))
            elif event == "stop":
                self.log.info("Twilio stopped the stream")
                return False
            elif event == "dtmf":
                # The digit itself may be a PIN: it stays out of the log.
                self.log.info("caller pressed a key")
                self.record.add("dtmf")
            elif event == "connected":
                self.log.debug("Twilio connected")
            else:
                self._reject("twilio", "unknown-event", f"unknown Twilio event {event[:40]!r}")
        except twilio.TwilioProtocolError as exc:
            self._reject("twilio", exc.kind, str(exc))
        return True

    def _on_caller_audio(self, audio: bytes) -> None:
        if self._outbound is None:
            self._reject("twilio", "media-before-start", "Twilio sent media before start")
            return
        buffer = self._buffer
        buffer += audio
        self.bytes_from_caller += len(audio)
        size = self._chunk_bytes
        while len(buffer) >= size:
            self.queue.put_nowait(bytes(buffer[:size]))
            del buffer[:size]

    def _on_start(self, stream: twilio.StreamStart) -> None:
        if self.stream is not None:
            self._reject("twilio", "second-start", "Twilio sent a second start event")
            return
        self.stream = stream
        self._outbound = twilio.TwilioOutbound(stream.stream_sid)
        self.log.extra["call"] = stream.call_sid  # type: ignore[index]
        self.record.name_after(stream.call_sid)
        self.log.info(
            "stream %s started%s",
            stream.stream_sid,
            f" with parameters {sorted(stream.custom_parameters)}" if stream.custom_parameters else "",
        )
        self.record.add("start", stream_sid=stream.stream_sid, custom_parameters=stream.custom_parameters)
        self._started.set_result(None)

    def _on_mark_echo(self, name: str | None) -> None:
        if name in self._marks_cleared:
            # A clear makes Twilio echo every pending mark at once: that audio was never heard.
            self._marks_cleared.discard(name)  # type: ignore[arg-type]
            self.record.add("mark_cleared", name=name)
            return
        self._marks_out.discard(name)  # type: ignore[arg-type]
        self.record.add("mark_played", name=name)
        if self._hangup_requested and name is not None and name.startswith(HANGUP_MARK):
            self.log.info("the agent's goodbye has played; hanging up")
            self.end("agent ended the call")
        elif self._hangup_when_heard:
            self._hang_up_if_all_heard()

    # ---------------------------------------------------------------- the agent session's life

    async def _run_agent(self) -> None:
        try:
            await self._agent_session()
        except Exception:
            self.log.exception("the agent side failed unexpectedly")
            self.end("internal error")
        finally:
            self.end("agent session ended")

    async def _agent_session(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._started), self.settings.start_timeout_seconds)
        except TimeoutError:
            self.log.warning("Twilio sent no start event within %.0f s", self.settings.start_timeout_seconds)
            self.end("no start event from Twilio")
            return
        try:
            await self._open_agent(resuming=False)
        except AgentUnavailable as exc:
            self.log.error("could not start the agent session: %s", exc)
            self.end(f"agent unavailable: {exc}")
            return
        while await self._converse() == "dropped":
            if not await self._resume_agent():
                return

    async def _resume_agent(self) -> bool:
        """Reconnect after a drop, with the conversation so far; False when it can't be done."""
        if self.function_tasks:
            # A function still running (an order being placed) must be in the history the new
            # session starts from, or the agent never learns its result and may ask again.
            # The runner's own timeout bounds this wait.
            await asyncio.wait(list(self.function_tasks.values()), timeout=self.settings.function_timeout_seconds + 1)
        delays = (0.0, *self.settings.agent_reconnect_delays)
        for attempt, delay in enumerate(delays, start=1):
            await asyncio.sleep(delay)
            if self.caller_gone:
                return False
            try:
                await self._open_agent(resuming=True)
            except AgentUnavailable as exc:
                self.log.warning("reconnect attempt %d of %d failed: %s", attempt, len(delays), exc)
                continue
            self.log.info("agent session resumed (attempt %d) with %d history items", attempt, len(self.history))
            self.record.add("agent_resumed", attempt=attempt, history_items=len(self.history))
            return True
        self.log.error("could not resume the agent session after %d attempts; ending the call", len(delays))
        self.end("agent connection lost")
        return False

    async def _open_agent(self, *, resuming: bool) -> None:
        """Connect, send Settings, and wait for SettingsApplied, all within one time bound."""
        timeout = self.settings.agent_connect_timeout_seconds
        if resuming:
            timeout = min(timeout, RECONNECT_HANDSHAKE_SECONDS)
        stage = "connecting to Deepgram"
        socket: ClientConnection | None = None
        try:
            async with asyncio.timeout(timeout):
                socket = await self.services.connect_agent()
                stage = "waiting for Deepgram's Welcome"
                await self._await_agent_message(socket, "Welcome")
                settings = (
                    agent.settings_message(self.services.agent_config.settings, self.history)
                    if resuming
                    else self.services.settings_json
                )
                await socket.send(settings)
                stage = "waiting for SettingsApplied"
                await self._await_agent_message(socket, "SettingsApplied")
        except BaseException as exc:
            if socket is not None:
                socket.transport.abort()
            if not isinstance(exc, Exception):
                raise  # cancelled: the call is ending anyway
            raise AgentUnavailable(_handshake_failure(exc, stage, timeout)) from exc
        self.agent_socket = socket
        self._generation += 1
        self._agent_ready = True
        if resuming:
            self._drop_gap_audio()
        self._last_agent_send = self._loop.time()
        self._schedule_keepalive(self.settings.keepalive_seconds)
        self.log.info("agent session ready")

    async def _await_agent_message(self, socket: ClientConnection, wanted: str) -> None:
        while True:
            frame = await socket.recv()
            if type(frame) is not str:
                continue  # no audio is expected before SettingsApplied; nothing to play it on yet
            message = agent.parse_message(frame)
            kind = message["type"]
            if kind == wanted:
                return
            if kind == "Error":
                raise AgentUnavailable(
                    f"Deepgram refused the session: {message.get('code')}: {message.get('description')}"
                )
            if kind == "Warning":
                self._on_warning(message)

    def _drop_gap_audio(self) -> None:
        """Discard what queued while the agent was away: stale speech would be answered out of turn."""
        kept: list[bytes | str | None] = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if type(item) is bytes:
                self.gap_bytes_dropped += len(item)
            elif item is None:
                kept.append(item)
        self.gap_bytes_dropped += len(self._buffer)
        self._buffer.clear()
        for item in kept:
            self.queue.put_nowait(item)

    async def _converse(self) -> str:
        """Run the sender and receiver on the current agent socket until it ends.

        Returns "dropped" when the socket was lost and the call should resume, else "done".
        """
        socket = self.agent_socket
        assert socket is not None
        sender = asyncio.create_task(self._send_to_agent(socket))
        try:
            return await self._receive_from_agent(socket)
        finally:
            self._agent_ready = False
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)

    # ----------------------------------------------------------------------- 2. Deepgram sender

    async def _send_to_agent(self, socket: ClientConnection) -> None:
        queue = self.queue
        try:
            while True:
                item = await queue.get()
                if item is None:
                    # The caller hung up and their last audio has gone out: end the agent session.
                    await socket.close()
                    return
                await socket.send(item)
                if type(item) is bytes:
                    self.bytes_to_agent += len(item)
                    self._last_agent_send = self._loop.time()
        except ConnectionClosed:
            pass  # the receiver sees the same closed socket and decides what it means

    def _send_control(self, message: str) -> None:
        """Queue a JSON message for the agent behind the audio already queued, from one writer."""
        self.queue.put_nowait(message)

    def _schedule_keepalive(self, delay: float) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()  # a resumed session must not start a second chain
        self._keepalive_timer = self._loop.call_later(delay, self._keepalive_due)

    def _keepalive_due(self) -> None:
        # A timer, not a task per call: it costs nothing while audio flows.
        if self._ended.done():
            return  # the chain ends with the call
        interval = self.settings.keepalive_seconds
        idle = self._loop.time() - self._last_agent_send
        if idle >= interval - 0.01:
            if self._agent_ready:
                self._send_control(agent.KEEPALIVE)
                self.log.debug("no audio for %.1f s: sent KeepAlive", idle)
            self._last_agent_send = self._loop.time()
            idle = 0.0
        self._schedule_keepalive(interval - idle)

    # --------------------------------------------------------------------- 3. Deepgram receiver

    async def _receive_from_agent(self, socket: ClientConnection) -> str:
        direct = isinstance(socket, AgentConnection) and isinstance(self.twilio_socket, TwilioConnection)
        if direct:
            # Agent audio now goes to the caller from the socket's data callback (_play_now);
            # this loop gets the JSON messages, and audio only while the caller's socket is busy.
            socket.on_audio = self._play_now  # type: ignore[union-attr]
        try:
            async for frame in socket:
                if type(frame) is bytes:
                    await self._play(frame)
                elif not await self._on_agent_text(frame):
                    return "done"
        except ConnectionClosed:
            pass
        finally:
            if direct:
                socket.on_audio = None  # type: ignore[union-attr]
        if self.caller_gone or self._ended.done():
            return "done"
        code = socket.close_code or 1006  # 1006: the connection was lost without a close frame
        if code in RESUMABLE_CLOSE_CODES:
            self.log.warning("the agent connection dropped (close code %d); resuming", code)
            self.record.error("deepgram", code, "connection dropped")
            return "dropped"
        reason = socket.close_reason
        self.log.info("Deepgram closed the session (code %d%s)", code, f": {reason}" if reason else "")
        self.end(f"Deepgram closed the session (code {code})")
        return "done"

    def _play_now(self, audio: bytes) -> bool:
        """Agent audio to the caller at once; False when the caller's socket makes it wait."""
        outbound = self._outbound
        if outbound is not None:
            if not self.twilio_socket.send_now(outbound.media(audio)):  # type: ignore[attr-defined]
                return False
            self.bytes_to_caller += len(audio)
            self._audio_since_mark += len(audio)
        return True

    async def _play(self, audio: bytes) -> None:
        outbound = self._outbound
        if outbound is None:
            return
        self.bytes_to_caller += len(audio)
        self._audio_since_mark += len(audio)
        try:
            await self.twilio_socket.send(outbound.media(audio))
        except ConnectionClosed:
            pass  # the caller is gone; the Twilio receiver ends the call

    async def _send_to_caller(self, message: str) -> None:
        try:
            await self.twilio_socket.send(message)
        except ConnectionClosed:
            pass

    async def _to_browser(self, event: dict[str, Any]) -> None:
        """Extra events for the browser phone only: Twilio rejects events it doesn't know."""
        if self.browser:
            await self._send_to_caller(json.dumps(event, default=str))

    async def _on_agent_text(self, text: str) -> bool:
        """Handle one JSON message from the agent; False when the call must end."""
        try:
            message = agent.parse_message(text)
        except agent.AgentProtocolError as exc:
            self._reject("deepgram", exc.kind, str(exc))
            return True
        kind = message["type"]
        if kind == "UserStartedSpeaking":
            assert self._outbound is not None
            self._marks_cleared |= self._marks_out
            self._marks_out.clear()
            self._audio_since_mark = 0  # Twilio drops what it had not played
            self._agent_turn_open = False
            await self._send_to_caller(self._outbound.clear())
            self.record.barge_in()
            self.log.debug("barge-in: cleared the caller's playback")
            self._cancel_hangup("the caller spoke during the goodbye")
        elif kind == "ConversationText":
            await self._on_conversation_text(message)
        elif kind == "AgentAudioDone":
            await self._on_agent_audio_done()
        elif kind == "FunctionCallRequest":
            self._on_function_call_request(message)
        elif kind == "FunctionCallCancelled":
            self._on_function_call_cancelled(message)
        elif kind == "AgentStartedSpeaking":
            self._agent_turn_open = True
            self.record.agent_latency(message)
            await self._to_browser(
                {"event": "agent_latency", **{k: message.get(k) for k in ("total_latency", "tts_latency", "ttt_latency")}}
            )
        elif kind == "Warning":
            self._on_warning(message)
        elif kind == "Error":
            code, description = message.get("code"), message.get("description")
            self.log.error("Deepgram error %s: %s", code, description)
            self.record.error("deepgram", code, description)
            self.end(f"Deepgram error {code}")
            return False
        else:
            # Welcome, History, AgentThinking, PromptUpdated and types that don't exist yet.
            self.log.debug("agent message %s", kind)
        return True

    def _on_warning(self, message: dict[str, Any]) -> None:
        code, description = message.get("code"), message.get("description")
        self.log.warning("Deepgram warning %s: %s", code, description)
        self.record.warning(code, description)

    async def _on_conversation_text(self, message: dict[str, Any]) -> None:
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            self._reject("deepgram", "bad-conversation-text", "a ConversationText without role and content")
            return
        self.log.info("%s: %s", "User" if role == "user" else "Agent", content)
        self.record.turn(role, content)
        self.history.append(agent.history_text(role, content))
        await self._to_browser({"event": "transcript", "role": role, "content": content})

    async def _on_agent_audio_done(self) -> None:
        self._agent_turn_open = False
        # A mark tells when the caller has actually heard the turn: AgentAudioDone only means sent.
        assert self._outbound is not None
        self._marks_sent += 1
        if self._hangup_requested:
            name = f"{HANGUP_MARK}-{self._marks_sent}"
            # Twilio plays in real time what it was sent faster: allow for what is still queued there.
            self._arm_hangup_timer(self.settings.hangup_timeout_seconds + self._audio_since_mark / 8000)
        else:
            name = f"agent-turn-{self._marks_sent}"
        self._audio_since_mark = 0
        self._marks_out.add(name)
        await self._send_to_caller(self._outbound.mark(name))

    # ------------------------------------------------------------------------------- functions

    def _on_function_call_request(self, message: dict[str, Any]) -> None:
        for call in agent.client_side_calls(message):
            if call.name == "end_call":
                self._on_end_call(call)
            elif call.id in self.function_tasks:
                self._reject("deepgram", "duplicate-function-id", f"a second FunctionCallRequest for id {call.id!r}")
            else:
                self.log.info("agent calls %s", call.name)
                task = asyncio.create_task(self._run_function(call, self._generation))
                self.function_tasks[call.id] = task

    def _on_function_call_cancelled(self, message: dict[str, Any]) -> None:
        for call_id in agent.cancelled_ids(message):
            if call_id == self._hangup_call_id:
                self._cancel_hangup("the agent cancelled end_call")
            if call_id in self.function_tasks:
                # Only the answer is withdrawn. The function may already be placing an order, and
                # stopping it halfway could leave it half-done: it finishes and is recorded.
                self._withdrawn_calls.add(call_id)
                self.log.info("agent cancelled function call %s; it finishes, unanswered", call_id)
                self.record.add("function_cancelled", id=call_id)

    async def _run_function(self, call: agent.FunctionCall, generation: int) -> None:
        started = self._loop.time()
        try:
            outcome = await self.services.functions.run(
                call.name, call.arguments, self.log, functools.partial(self._on_function_late, call)
            )
        except asyncio.CancelledError:
            # The call ended while it ran (after the grace period): the record still says so.
            self.record.function_call(
                call.name, call.arguments, None, "the call ended before it finished", self._loop.time() - started
            )
            raise
        finally:
            if self.function_tasks.get(call.id) is asyncio.current_task():
                del self.function_tasks[call.id]
        withdrawn = call.id in self._withdrawn_calls
        self._withdrawn_calls.discard(call.id)
        self.record.function_call(
            call.name, call.arguments, outcome.result, outcome.error, outcome.duration_seconds, withdrawn=withdrawn
        )
        self.history.append(agent.history_function_call(call, outcome.content))
        if withdrawn:
            return
        if generation == self._generation and self._agent_ready:
            self._send_control(agent.function_call_response(call, outcome.content))
        else:
            self.log.info("%s finished after the agent session was replaced; its result is in the history", call.name)
        self.log.debug("%s answered in %.3f s", call.name, outcome.duration_seconds)
        await self._to_browser(
            {
                "event": "function_call",
                "name": call.name,
                "arguments": _json_or_text(call.arguments),
                "result": json.loads(outcome.content),  # exactly what the agent was told
                "duration_ms": round(outcome.duration_seconds * 1000, 1),
            }
        )

    def _on_function_late(self, call: agent.FunctionCall, outcome: FunctionOutcome) -> None:
        """A ``def`` abandoned at its timeout, or by the hang-up, has returned (the runner logged it)."""
        # Dropped if the record is already written; the runner's log line remains.
        self.record.add(
            "function_finished_late",
            id=call.id,
            name=call.name,
            result=outcome.result,
            error=outcome.error,
            duration_seconds=round(outcome.duration_seconds, 4),
        )

    def _on_end_call(self, call: agent.FunctionCall) -> None:
        self.log.info("agent asked to end the call; hanging up after its goodbye has played")
        answer = {"result": "The call will end after your goodbye has played."}
        self._send_control(agent.function_call_response(call, json.dumps(answer)))
        self.record.function_call(call.name, call.arguments, answer, None, 0.0)
        self._hangup_requested = True
        self._hangup_call_id = call.id
        # If no AgentAudioDone follows (nothing more to say), hang up anyway.
        self._arm_hangup_timer(self.settings.hangup_timeout_seconds)
        if self._hangup_grace_timer is not None:
            self._hangup_grace_timer.cancel()  # a repeated end_call starts the grace afresh
        if not self._agent_speaking():
            # The goodbye was sent (and marked) before the request, as the prompt asks: once the
            # caller has heard it, and a moment has passed for any last words, hang up.
            self._hangup_grace_timer = self._loop.call_later(HANGUP_GRACE_SECONDS, self._after_hangup_grace)

    def _agent_speaking(self) -> bool:
        return self._agent_turn_open or self._audio_since_mark > 0

    def _after_hangup_grace(self) -> None:
        self._hangup_grace_timer = None
        if self._hangup_requested and not self._agent_speaking():
            self._hangup_when_heard = True
            self._hang_up_if_all_heard()
        # Otherwise the agent is speaking again, and the mark after its AgentAudioDone decides.

    def _hang_up_if_all_heard(self) -> None:
        if not self._marks_out and not self._audio_since_mark:
            self.log.info("the agent's goodbye has played; hanging up")
            self.end("agent ended the call")

    def _cancel_hangup(self, why: str) -> None:
        """The conversation goes on after end_call: the caller spoke, or the agent took it back."""
        if not self._hangup_requested or self._ended.done():
            return
        self._hangup_requested = False
        self._hangup_call_id = None
        self._hangup_when_heard = False
        for timer in (self._hangup_timer, self._hangup_grace_timer):
            if timer is not None:
                timer.cancel()
        self._hangup_timer = self._hangup_grace_timer = None
        self.log.info("not hanging up: %s", why)
        self.record.add("hangup_cancelled", reason=why)

    def _arm_hangup_timer(self, seconds: float) -> None:
        if self._hangup_timer is not None:
            self._hangup_timer.cancel()
        self._hangup_timer = self._loop.call_later(seconds, self.end, "agent ended the call (goodbye not confirmed)")


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _handshake_failure(exc: Exception, stage: str, timeout: float) -> str:
    """One sentence for why the agent session could not open."""
    if isinstance(exc, AgentUnavailable):
        return str(exc)
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        hint = " (check DEEPGRAM_API_KEY)" if status in (401, 403) else ""
        return f"Deepgram refused the connection with HTTP {status}{hint}"
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:.1f} s {stage}"
    if isinstance(exc, ConnectionClosed):
        return f"Deepgram closed the connection while {stage} (code {exc.rcvd.code if exc.rcvd else 1006})"
    if isinstance(exc, agent.AgentProtocolError):
        return f"Deepgram sent something unreadable while {stage}"
    if isinstance(exc, InvalidURI | InvalidHandshake | OSError):
        return f"cannot reach Deepgram while {stage}: {exc}"
    return f"unexpected {type(exc).__name__} while {stage}: {exc}"
