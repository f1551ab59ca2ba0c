"""Faithful fakes of the bridge's two peers, on real loopback sockets.

``FakeAgent`` plays the Deepgram Voice Agent API v1 (Welcome, Settings, SettingsApplied, binary
audio both ways, JSON events); ``FakeTwilioCaller`` plays Twilio Media Streams (connected, start,
media in 160-byte frames, mark echoes, stop). Both record everything they receive so tests can
assert on bytes and messages.
"""

from __future__ import annotations

import asyncio
import re
import base64
import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from sdk_oracle import sdk_problem


def shows_digits(text: str | bytes, digits: str) -> bool:
    """Whether ``text`` holds ``digits`` in order, however separated ("8642", "8 6 4 2", "['8', '6'...")."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return re.search("[^0-9A-Za-z]{0,6}".join(digits), text) is not None


async def eventually(condition: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll until ``condition()`` is truthy; fail the test with ``what`` if it never is."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


class FakeAgentSession:
    """One agent WebSocket as the fake agent sees it."""

    def __init__(self, socket: ServerConnection) -> None:
        self.socket = socket
        self.headers = socket.request.headers if socket.request else None
        self.settings: dict[str, Any] | None = None  # the Settings message, set once it has been answered
        self.settings_raw: str | None = None
        self.audio = bytearray()
        self.audio_frames: list[int] = []  # sizes of the binary frames, in order
        self.audio_before_settings_applied = 0
        self.messages: list[dict[str, Any]] = []  # JSON received after Settings
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.request_id = str(uuid.uuid4())  # what its Welcome says

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.socket.send(json.dumps(message))

    async def send_audio(self, audio: bytes) -> None:
        await self.socket.send(audio)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.socket.close(code, reason)

    def drop(self) -> None:
        """Lose the connection without a close frame, as a network fault would."""
        self.socket.transport.abort()


class FakeAgent:
    """A fake Deepgram agent server.

    ``settings_mode``: "apply" answers SettingsApplied (after ``settings_delay`` seconds),
    "ignore" never answers, "error" answers with an Error. ``refuse_status`` fails the
    handshake with that HTTP status. ``welcome=False`` sends no Welcome.

    Every text message received is checked against deepgram-sdk's models (tests/sdk_oracle.py),
    as the real server would refuse it; leaving the ``async with`` fails the test if one was
    invalid (about 0.2 ms for a Settings message, a few microseconds for the others).
    """

    def __init__(
        self,
        *,
        settings_mode: str = "apply",
        settings_delay: float = 0.0,
        refuse_status: int | None = None,
        welcome: bool = True,
    ) -> None:
        self.settings_mode = settings_mode
        self.settings_delay = settings_delay
        self.refuse_status = refuse_status
        self.welcome = welcome
        self.sessions: list[FakeAgentSession] = []
        self.handshakes = 0
        self.invalid_messages: list[str] = []  # what the SDK's models refused, with the message
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1/agent/converse"

    async def __aenter__(self) -> FakeAgent:
        self._server = await serve(
            self._handle, "127.0.0.1", 0, process_request=self._process_request, compression=None, max_size=None
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        if exc_info[0] is None:  # a failing test keeps its own error
            assert not self.invalid_messages, f"the bridge sent invalid messages: {self.invalid_messages}"

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.handshakes += 1
        if self.refuse_status is not None:
            return connection.respond(self.refuse_status, "refused\n")
        return None

    async def session(self, index: int = 0, timeout: float = 5.0) -> FakeAgentSession:
        await eventually(lambda: len(self.sessions) > index, timeout, f"agent session #{index + 1}")
        return self.sessions[index]

    async def ready_session(self, index: int = 0) -> FakeAgentSession:
        """Session ``index`` once the bridge has sent its Settings."""
        session = await self.session(index)
        await eventually(lambda: session.settings is not None, what=f"agent session #{index + 1} to be set up")
        return session

    async def _handle(self, socket: ServerConnection) -> None:
        session = FakeAgentSession(socket)
        self.sessions.append(session)
        applied = False
        try:
            if self.welcome:
                await session.send_json({"type": "Welcome", "request_id": session.request_id})
            async for frame in socket:
                if isinstance(frame, bytes):
                    session.audio += frame
                    session.audio_frames.append(len(frame))
                    if not applied:
                        session.audio_before_settings_applied += len(frame)
                    continue
                message = json.loads(frame)
                problem = sdk_problem(message)
                if problem is not None:
                    self.invalid_messages.append(problem)
                if session.settings is None and message.get("type") == "Settings":
                    if self.settings_mode == "apply":
                        await asyncio.sleep(self.settings_delay)
                        applied = True
                        await session.send_json({"type": "SettingsApplied"})
                    elif self.settings_mode == "error":
                        await session.send_json(
                            {"type": "Error", "code": "INVALID_SETTINGS", "description": "bad settings"}
                        )
                    # Exposed only once answered: whatever a test sends after seeing ``settings``
                    # then reaches the bridge after SettingsApplied, as it would from Deepgram.
                    session.settings, session.settings_raw = message, frame
                    continue
                session.messages.append(message)
        except ConnectionClosed:
            pass
        finally:
            session.close_code = await close_code(socket)
            session.closed.set()


async def close_code(socket: ServerConnection | ClientConnection) -> int:
    """The close code a closed connection received (1006 for none), on every websockets version."""
    try:
        await socket.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    raise AssertionError("the connection is still open")


def media_event(stream_sid: str, sequence: int, chunk: int, audio: bytes) -> str:
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": str(sequence),
            "streamSid": stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(chunk * 20),
                "payload": base64.b64encode(audio).decode(),
            },
        }
    )


class FakeTwilioCaller:
    """A fake Twilio Media Streams client for one call."""

    _ids = itertools.count(1)

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        echo_marks: bool = True,
        mark_delay: float = 0.0,
        account_sid: str = "AC" + "0" * 32,
    ) -> None:
        n = next(self._ids)
        self.url = url
        self.account_sid = account_sid
        self.headers = headers or {}
        self.stream_sid = f"MZ{n:032x}"
        self.call_sid = f"CA{n:032x}"
        self.echo_marks = echo_marks
        self.mark_delay = mark_delay
        self.socket: ClientConnection | None = None
        self.events: list[dict[str, Any]] = []
        self.audio = bytearray()
        self.media_arrivals: list[tuple[float, int]] = []  # (monotonic time, bytes)
        self.foreign_stream_events: list[dict[str, Any]] = []
        self.closed = asyncio.Event()
        self._sequence = itertools.count(1)
        self._chunk = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeTwilioCaller:
        self.socket = await connect(self.url, additional_headers=self.headers, compression=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.socket is not None and self._reader is not None
        await self.socket.close()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    def of_event(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == kind]

    async def send_json(self, message: dict[str, Any]) -> None:
        assert self.socket is not None
        await self.socket.send(json.dumps(message))

    async def send_raw(self, frame: str | bytes) -> None:
        assert self.socket is not None
        await self.socket.send(frame)

    async def start(self, custom_parameters: dict[str, str] | None = None) -> None:
        await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send_json(
            {
                "event": "start",
                "sequenceNumber": str(next(self._sequence)),
                "streamSid": self.stream_sid,
                "start": {
                    "streamSid": self.stream_sid,
                    "accountSid": self.account_sid,
                    "callSid": self.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": custom_parameters or {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )

    async def send_audio(self, audio: bytes, frame: int = 160, pace: float = 0.0) -> None:
        """Send audio as Twilio does, in ``frame``-byte media events (``pace`` seconds apart)."""
        assert self.socket is not None
        for offset in range(0, len(audio), frame):
            await self.socket.send(
                media_event(self.stream_sid, next(self._sequence), next(self._chunk), audio[offset : offset + frame])
            )
            if pace:
                await asyncio.sleep(pace)

    async def stop(self) -> None:
        await self.send_json(
            {
                "event": "stop",
                "sequenceNumber": str(next(self._sequence)),
                "streamSid": self.stream_sid,
                "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.call_sid},
            }
        )

    async def press(self, digit: str) -> None:
        """A keypad key, as Twilio reports it on a bidirectional stream."""
        await self.send_json(
            {
                "event": "dtmf",
                "streamSid": self.stream_sid,
                "sequenceNumber": str(next(self._sequence)),
                "dtmf": {"track": "inbound_track", "digit": digit},
            }
        )

    async def echo_mark(self, name: str) -> None:
        await self.send_json({"event": "mark", "streamSid": self.stream_sid, "mark": {"name": name}})

    async def _read(self) -> None:
        assert self.socket is not None
        try:
            async for frame in self.socket:
                assert isinstance(frame, str), "the bridge must send Twilio only JSON text frames"
                event = json.loads(frame)
                self.events.append(event)
                if event.get("event") in ("media", "mark", "clear") and event.get("streamSid") != self.stream_sid:
                    self.foreign_stream_events.append(event)
                if event.get("event") == "media":
                    audio = base64.b64decode(event["media"]["payload"])
                    self.audio += audio
                    self.media_arrivals.append((time.monotonic(), len(audio)))
                elif event.get("event") == "mark" and self.echo_marks:
                    asyncio.get_running_loop().call_later(
                        self.mark_delay, lambda n=event["mark"]["name"]: asyncio.ensure_future(self._echo(n))
                    )
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def _echo(self, name: str) -> None:
        try:
            await self.echo_mark(name)
        except ConnectionClosed:
            pass
