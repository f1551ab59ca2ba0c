"""Sockets: HTTP and WebSocket over asyncio, on websockets' Sans-I/O core and h11.

Each TCP connection is an ``asyncio.Protocol`` of ours. Parsing is left to the libraries' public
Sans-I/O objects: ``h11.Connection`` reads HTTP requests (any method, so webhooks can POST), and
websockets' ``ServerProtocol`` / ``ClientProtocol`` read and write WebSocket frames. This module
owns what those objects leave to their caller, which is where a hostile or broken peer does harm:

- **Deadlines.** An HTTP request must arrive whole within ``handshake_timeout``; a closing
  handshake gets ``close_timeout`` and then the connection is aborted; a peer whose write buffer
  stays over the high-water mark for ``stall_timeout`` (it stopped reading) is aborted and marked
  ``stalled``; keepalive pings fail a silent peer after ``ping_timeout``; while we aren't reading
  a peer, its socket is looked at every ``PAUSED_PEER_CHECK_SECONDS``, and a peer that has
  closed or reset its end meanwhile is aborted (the event loop sees neither while not reading).
- **Caps.** Messages are limited by websockets' ``max_size``; at most ``inbox_max_bytes`` of received
  messages wait for the call's coroutine before reading pauses; reading also pauses while our own
  writes to the peer are stuck (so a ping flood from a peer that never reads queues no pongs).
- **Fair share.** Each WebSocket has a token bucket of frames: a peer sending faster than
  ``frames_per_second`` (beyond a burst) stops being read until its budget refills, and a large
  read is parsed in slices, so one flooding connection can't hold the event loop.

Nothing above the transport sees bytes: a call's coroutines ``await receive()`` whole messages
(``str`` or ``bytes``, ``None`` once the connection is gone) and call ``send_text``/``send_binary``,
which never block; ``await drained()`` is the backpressure point.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, Protocol as TypingProtocol, TypeVar

import h11
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from .logsafe import clean

logger = logging.getLogger("bridge.transport")
T = TypeVar("T")

# websockets' own protocol objects log each connection at INFO; ours say what matters.
WEBSOCKETS_LOGGER = logging.getLogger("websockets.bridge")

TEXT, BINARY = Opcode.TEXT, Opcode.BINARY
FIN_TEXT = 0x81  # first header byte of a whole text frame: FIN, no RSV bits, opcode 1
FIN_BINARY = 0x82
SEND_EOF = b""  # websockets' Sans-I/O signal to half-close the TCP connection
# A large read is parsed this much at a time, so the frame budget is checked between slices.
PARSE_SLICE_BYTES = 16 * 1024
# Reads kept for a frame still arriving are joined once they average less than this.
MIN_KEPT_READ_BYTES = 512
# An HTTP request head (request line and headers) and a webhook's body are small.
MAX_HTTP_HEAD_BYTES = 16 * 1024
MAX_HTTP_BODY_BYTES = 64 * 1024
# While reading from a peer is paused, this often its socket is checked for a close or a reset.
PAUSED_PEER_CHECK_SECONDS = 1.0
# Linux's TCP states (include/net/tcp_states.h) once the peer has sent its FIN or a reset:
# TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING.
_LINUX_PEER_DONE_STATES = frozenset({6, 7, 8, 9, 11})
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None


@dataclass(frozen=True, slots=True)
class PeerLimits:
    """The deadlines and caps of one kind of WebSocket peer (Twilio's side or the agent's)."""

    max_message_bytes: int
    frames_per_second: float
    frame_burst: int
    stall_timeout: float = 5.0
    close_timeout: float = 1.0
    ping_interval: float | None = 20.0
    ping_timeout: float = 20.0
    inbox_max_bytes: int = 256 * 1024


def frame_extent(data: bytes, pos: int) -> tuple[int, int] | None:
    """Where the payload of the masked frame starting at ``pos`` begins, and its length.

    RFC 6455 section 5.2: a 7-bit length, or 126 and a 16-bit length, or 127 and a 64-bit
    length, then the 4-byte masking key if the mask bit is set. None while the header hasn't
    all arrived. (An unmasked frame from a client is websockets' to refuse.)
    """
    available = len(data) - pos
    if available < 2:
        return None
    length = data[pos + 1] & 0x7F
    start = pos + 2
    if length == 126:
        if available < 4:
            return None
        length = int.from_bytes(data[start : start + 2], "big")
        start += 2
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(data[start : start + 8], "big")
        start += 8
    if data[pos + 1] & 0x80:
        start += 4
    if len(data) < start:
        return None
    return start, length


def peer_has_hung_up(sock: Any) -> bool:
    """Whether the peer of a TCP socket we aren't reading has closed or reset its end.

    ``sock`` is what ``transport.get_extra_info("socket")`` gives, or None. Nothing is read.
    SO_ERROR shows a reset (or a network error) on every platform. A close (a FIN) waits behind
    the bytes not yet read, so only the connection's state shows it: Linux gives that in the first
    byte of TCP_INFO (``tcpi_state``). Elsewhere a close is seen once reading resumes.
    """
    if sock is None:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        if _TCP_INFO is not None:
            return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] in _LINUX_PEER_DONE_STATES
    except OSError:
        pass  # not a TCP socket, or closed already: nothing to tell
    return False


def unmask(payload: bytes, key: bytes) -> bytes:
    """XOR the payload with the 4-byte key repeated (RFC 6455 section 5.3), in C via int."""
    size = len(payload)
    repeated = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(size, "little")


class PeerGone(Exception):
    """The connection ended while a coroutine waited on it."""


class MessageQueue(Generic[T]):
    """A FIFO between a callback and one coroutine, cheaper than ``asyncio.Queue`` per item.

    On CPython 3.11, ``asyncio.Queue.get`` looks up the running loop, which calls ``getpid()``:
    a system call per message on glibc, measured at a fifth of the bridge's CPU under load.
    This queue keeps its loop and creates at most one waiter at a time.
    """

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: deque[T] = deque()
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def get(self) -> T:
        while not self._items:
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)


class WebSocketPeer(asyncio.Protocol):
    """One WebSocket connection driven through a websockets Sans-I/O protocol object."""

    # Two of these a call, each with some 35 fields: slots instead of a dict each save memory per call.
    __slots__ = (
        "limits", "loop", "protocol", "transport", "inbox", "_inbox_bytes", "_queued", "closed", "stalled",
        "_reading_paused_for", "_writing_paused", "_drain_waiters", "_stall_timer", "_close_timer", "_ping_timer",
        "_ping_sent_at", "_reads", "_reads_at_check", "take", "_tokens", "_tokens_at", "_budget_timer", "_paused_check",
        "_fragments", "_fragmented_text", "_failed", "_pending", "_pending_from", "_pending_size", "_pending_needed",
        "_in_fragmented_message", "_websockets_only", "_shortcut", "_length16", "frames_throttled",
    )

    receives_masked = True  # a server receives masked frames; a client plain ones

    def __init__(self, limits: PeerLimits) -> None:
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.protocol: Protocol | None = None  # set by the subclass once the handshake starts
        self.transport: asyncio.Transport | None = None
        self.inbox: MessageQueue[str | bytes | None] = MessageQueue(self.loop)
        self._inbox_bytes = 0
        self._queued = 0  # messages in the inbox: while any wait, later ones queue behind them
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.stalled = False  # aborted because the peer stopped reading what we sent
        self._reading_paused_for: set[str] = set()
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._stall_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._reads = 0  # reads so far, for the keepalive check
        self._reads_at_check = 0
        self.take: Callable[[str | bytes], bool] | None = None
        self._tokens = float(limits.frame_burst)
        self._tokens_at = self.loop.time()
        self._budget_timer: asyncio.TimerHandle | None = None
        self._paused_check: asyncio.TimerHandle | None = None
        self._fragments: list[bytes] = []
        self._fragmented_text = False
        self._failed = False  # we failed (websockets stops parsing then) or aborted the connection
        # Reads not cut into frames yet, from ``_pending_from`` in the first on (a frame boundary):
        # the start of a frame whose end hasn't arrived, or frames held back while the frame budget
        # is spent. Kept as the reads themselves and joined once, when ``_pending_size`` (their
        # bytes from there on) reaches ``_pending_needed`` (0: as soon as the budget allows).
        self._pending: list[bytes] = []
        self._pending_from = 0
        self._pending_size = 0
        self._pending_needed = 0
        self._in_fragmented_message = False
        self._websockets_only = False  # after a fragmented message, or once closing, it gets every byte
        # The one-frame shortcut is open while none of the above (and no throttling) applies.
        self._shortcut = True
        self._length16 = (0x80 if self.receives_masked else 0) | 126  # header byte 2 of a 16-bit length
        self.frames_throttled = 0  # times this peer ran out of frame budget

    # ------------------------------------------------------------------- the call's interface

    @property
    def open(self) -> bool:
        return self.protocol is not None and self.protocol.state is State.OPEN and not self.closed.done()

    @property
    def close_code(self) -> int | None:
        return self.protocol.close_code if self.protocol is not None else None

    @property
    def close_reason(self) -> str | None:
        return self.protocol.close_reason if self.protocol is not None else None

    async def receive(self) -> str | bytes | None:
        """The next whole message, or None once the connection is gone."""
        message = await self.inbox.get()
        if message is None:
            self.inbox.put(None)  # every later receive() sees the end too
            return None
        self._queued -= 1
        self._inbox_bytes -= len(message)
        if "inbox" in self._reading_paused_for and self._inbox_bytes <= self.limits.inbox_max_bytes // 2:
            self._resume_reading("inbox")
        return message

    @property
    def writing_paused(self) -> bool:
        """Our writes to this peer are over the high-water mark: ``await drained()`` before more."""
        return self._writing_paused

    def send_text(self, text: str) -> None:
        protocol = self.protocol
        if protocol is None or protocol.state is not State.OPEN:
            return
        if self.receives_masked:
            # We are the server: our frames are unmasked, so a whole text frame is a header and the
            # payload (RFC 6455 section 5.2). websockets keeps no state for a sent data frame, and
            # framing it here saves a third of the cost of each media event to the caller.
            payload = text.encode()
            size = len(payload)
            if size < 126:
                header = bytes((FIN_TEXT, size))
            elif size < 65536:
                header = bytes((FIN_TEXT, 126, size >> 8, size & 0xFF))
            else:
                header = bytes((FIN_TEXT, 127)) + size.to_bytes(8, "big")
            assert self.transport is not None
            self.transport.write(header + payload)
            return
        protocol.send_text(text.encode())
        self._flush()

    def send_binary(self, data: bytes) -> None:
        if self.protocol is not None and self.protocol.state is State.OPEN:
            self.protocol.send_binary(data)
            self._flush()

    async def drained(self) -> None:
        """Return once what we wrote has room to go out; raise PeerGone if the connection ended."""
        if self.closed.done():
            raise PeerGone
        if not self._writing_paused:
            return
        waiter = self.loop.create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake; the connection is aborted if it takes over ``close_timeout``."""
        if self.closed.done() or self.transport is None:
            return
        protocol = self.protocol
        if protocol is not None and protocol.state is State.OPEN:
            protocol.send_close(code, reason)
            self._flush()
        elif protocol is None or protocol.state is State.CONNECTING:
            self.transport.close()
        if self._close_timer is None and not self.closed.done():
            self._close_timer = self.loop.call_later(self.limits.close_timeout, self.abort)

    def abort(self) -> None:
        self._failed = True  # nothing more is delivered, not even frames parsed in the read under way
        if self.transport is not None and not self.closed.done():
            self.transport.abort()

    # ------------------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's too)

    def data_received(self, data: bytes) -> None:
        if self.protocol is not None:
            self._split(data)

    def _split(self, data: bytes) -> None:
        """Cut whole frames out of the stream; plain text and binary frames are delivered here.

        websockets' Sans-I/O parser costs about as much CPU per frame as all the rest of a
        call's work on it (measured: +50% CPU per call-second), and a call is 50 frames a
        second from Twilio and as many chunks of speech from the agent. So the common frame
        (unfragmented, FIN set, no RSV bits, masked exactly when it comes from a client, within
        the size limit) is unmasked and delivered here; every other
        frame is handed to websockets' ``receive_data`` *whole*, so its parser always stands at
        a frame boundary and judges it (control frames, fragments, protocol errors, 1009, 1002).
        Inside a fragmented message every frame goes to websockets. Once the connection is closing,
        or has been failed (by websockets, or here: bad UTF-8, the keepalive), websockets gets every
        byte and processes none (RFC 6455 section 7.1.7). A frame whose end hasn't arrived waits as
        the reads themselves, joined once its header says it is all in: one copy however many reads.
        """
        protocol = self.protocol
        assert protocol is not None
        self._reads += 1
        # The usual read: exactly one whole frame of 126 to 65535 bytes (a media event, a chunk of
        # agent audio): FIN, no RSV bits, a 16-bit length, masked if it comes from a client.
        if self._shortcut and len(data) >= 4 and data[1] == self._length16 and not self._pending:
            first = data[0]
            size = (data[2] << 8) | data[3]
            start = 8 if self.receives_masked else 4
            if (first == FIN_TEXT or first == FIN_BINARY) and size + start == len(data) and size <= self.limits.max_message_bytes:
                payload = unmask(data[8:], data[4:8]) if start == 8 else data[4:]
                self._tokens -= 1
                self._deliver(first == FIN_TEXT, payload)
                if self._tokens < 0 and not self._failed:
                    self._shortcut = False
                    self._out_of_budget()
                return
        pending = self._pending
        if pending:
            # Kept, not copied: a 4 MB frame in 64 KB reads is joined once, when its last read is in.
            pending.append(data)
            self._pending_size += len(data)
            if self._pending_size >= self._pending_needed and "budget" not in self._reading_paused_for:
                self._cut_pending(protocol)
            elif len(pending) > 16 and len(pending) * MIN_KEPT_READ_BYTES > self._pending_size:
                # Tiny reads (a peer trickling a frame byte by byte) are joined as they come, so each
                # doesn't cost an object; joined only this rarely, that stays linear too.
                self._pending = [self._joined_pending()]
        elif "budget" in self._reading_paused_for:
            self._hold(data, 0, 0)  # out of frame budget: cut when the budget allows
        else:
            self._cut(protocol, data, 0)

    def _cut(self, protocol: Protocol, data: bytes, pos: int) -> None:
        """Cut the frames out of ``data`` from ``pos`` (a frame boundary) on; hold what is left."""
        if self._websockets_only:
            self._parse_slices(protocol, data, pos)
            return
        end = len(data)
        limit = self.limits.max_message_bytes
        while pos < end:
            extent = frame_extent(data, pos)
            if extent is None:
                self._hold(data, pos, end - pos + 1)  # the header is cut short: try again with more
                break
            start, length = extent
            if length > limit:
                self._websockets_only = True  # it answers an oversize frame with 1009
                self._shortcut = False
                self._parse_slices(protocol, data, pos)
                return
            frame_end = start + length
            if frame_end > end:
                self._hold(data, pos, frame_end - pos)
                break
            first = data[pos]
            if (
                (first == FIN_TEXT or first == FIN_BINARY)
                and bool(data[pos + 1] & 0x80) == self.receives_masked
                and not self._in_fragmented_message
            ):
                payload = data[start:frame_end]
                if self.receives_masked:
                    payload = unmask(payload, data[start - 4 : start])
                self._tokens -= 1
                self._deliver(first == FIN_TEXT, payload)
                if self._failed:
                    return
            else:
                self._to_websockets(protocol, data[pos:frame_end])
                if protocol.state is not State.OPEN:
                    self._websockets_only = True  # closing: whatever follows is websockets' to discard
                    self._shortcut = False
                    if frame_end < end:
                        self._to_websockets(protocol, data[frame_end:])
                    return
            pos = frame_end
            if self._tokens < 0:
                self._out_of_budget()
                if "budget" in self._reading_paused_for:
                    self._shortcut = False  # until what is held back has been cut, in order
                    self._hold(data, pos, 0)
                    return
        self._shortcut = not (self._websockets_only or self._in_fragmented_message)

    def _hold(self, data: bytes, pos: int, needed: int) -> None:
        """Keep ``data[pos:]`` (without copying it) to be cut once ``needed`` bytes of it are in."""
        self._pending = [data] if pos < len(data) else []
        self._pending_from = pos
        self._pending_size = len(data) - pos
        self._pending_needed = needed

    def _joined_pending(self) -> bytes:
        """The pending bytes as one, from ``_pending_from`` on (which becomes 0)."""
        chunks, start = self._pending, self._pending_from
        chunks[0] = chunks[0][start:]  # what was cut already is not carried on
        self._pending_from = 0
        return b"".join(chunks)

    def _cut_pending(self, protocol: Protocol) -> None:
        if len(self._pending) == 1:
            data, pos = self._pending[0], self._pending_from  # held back by the budget: not copied
        else:
            data, pos = self._joined_pending(), 0
        self._pending = []
        self._cut(protocol, data, pos)

    def _to_websockets(self, protocol: Protocol, data: bytes) -> None:
        """Let websockets parse whole frames, and follow whether a fragmented message is open."""
        protocol.receive_data(data)
        events = protocol.events_received()
        for event in events:
            if type(event) is Frame:
                if event.opcode is TEXT or event.opcode is BINARY:
                    self._in_fragmented_message = not event.fin
                elif event.opcode is Opcode.CONT and event.fin:
                    self._in_fragmented_message = False
        if events:
            self._handle_events(events)
        self._flush()

    def eof_received(self) -> bool | None:
        protocol = self.protocol
        if protocol is not None:
            if self._pending:
                # At EOF, what was read is parsed whatever the budget; a frame cut short by EOF
                # is failed by websockets with 1006, as it would be unaided.
                pending = self._joined_pending()
                self._pending = []
                protocol.receive_data(pending)
            protocol.receive_eof()
            events = protocol.events_received()
            if events:
                self._handle_events(events)
            self._flush()
        return None  # let asyncio close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._stall_timer, self._close_timer, self._ping_timer, self._budget_timer, self._paused_check):
            if timer is not None:
                timer.cancel()
        if self.protocol is not None and self.protocol.state is not State.CLOSED:
            try:
                self.protocol.receive_eof()
            except Exception:  # noqa: BLE001 - already at EOF; nothing more to learn
                pass
            self.protocol.events_received()  # nothing more is delivered after the connection ends
        self._wake_drain_waiters()
        if not self.closed.done():
            self.closed.set_result(None)
        self.inbox.put(None)

    def pause_writing(self) -> None:
        self._writing_paused = True
        # While our writes to it are stuck, stop reading from it: its pings would queue pongs.
        self._pause_reading("write")
        if self._stall_timer is None:
            self._stall_timer = self.loop.call_later(self.limits.stall_timeout, self._stall)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._resume_reading("write")
        self._wake_drain_waiters()

    # ----------------------------------------------------------------------------- internals

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                if self.closed.done() or (self.transport is not None and self.transport.is_closing()):
                    waiter.set_exception(PeerGone())
                else:
                    waiter.set_result(None)

    def _stall(self) -> None:
        self._stall_timer = None
        self.stalled = True
        self.abort()

    def _pause_reading(self, reason: str) -> None:
        if not self._reading_paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
            if self._paused_check is None:  # one timer at most, re-armed only while paused
                self._paused_check = self.loop.call_later(PAUSED_PEER_CHECK_SECONDS, self._check_paused_peer)
        self._reading_paused_for.add(reason)

    def _resume_reading(self, reason: str) -> None:
        if reason not in self._reading_paused_for:
            return
        self._reading_paused_for.discard(reason)
        if not self._reading_paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _check_paused_peer(self) -> None:
        """A peer we aren't reading can hang up unseen (no read, no EOF): look at its socket.

        Otherwise a caller who floods the bridge until it stops reading them and then resets
        their connection would hold their call, and its place under ``MAX_CALLS``, until the
        other side failed. Aborting ends the connection as if the loop had seen the hang-up.
        """
        self._paused_check = None
        transport = self.transport
        if not self._reading_paused_for or transport is None or self.closed.done():
            return
        if peer_has_hung_up(transport.get_extra_info("socket")):
            logger.debug(
                "a peer not being read (%s) closed or reset its connection", ", ".join(sorted(self._reading_paused_for))
            )
            self.abort()
            return
        self._paused_check = self.loop.call_later(PAUSED_PEER_CHECK_SECONDS, self._check_paused_peer)

    def _parse_slices(self, protocol: Protocol, data: bytes, pos: int) -> None:
        for start in range(pos, len(data), PARSE_SLICE_BYTES):
            protocol.receive_data(data[start : start + PARSE_SLICE_BYTES])
            events = protocol.events_received()
            if events:
                self._handle_events(events)
            self._flush()
            if self._tokens < 0:
                self._out_of_budget()
                if "budget" in self._reading_paused_for:
                    self._hold(data, start + PARSE_SLICE_BYTES, 0)
                    return

    def _out_of_budget(self) -> None:
        self._refill()
        if self._tokens >= 0 or "budget" in self._reading_paused_for or self.closed.done():
            return
        self.frames_throttled += 1
        self._pause_reading("budget")
        delay = -self._tokens / self.limits.frames_per_second
        self._budget_timer = self.loop.call_later(delay, self._budget_refilled)

    def _budget_refilled(self) -> None:
        self._budget_timer = None
        self._refill()
        self._reading_paused_for.discard("budget")
        if self._pending and self._pending_size >= self._pending_needed and self.protocol is not None:
            self._cut_pending(self.protocol)
        if not self._reading_paused_for and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _refill(self) -> None:
        """Add the frames earned since the last refill (done only when the budget looks spent)."""
        now = self.loop.time()
        limits = self.limits
        self._tokens = min(float(limits.frame_burst), self._tokens + (now - self._tokens_at) * limits.frames_per_second)
        self._tokens_at = now

    def _handle_events(self, events: list[Any]) -> None:
        self._tokens -= len(events)
        for event in events:
            if type(event) is not Frame:
                self._on_handshake_event(event)
                continue
            opcode = event.opcode
            if event.fin and (opcode is TEXT or opcode is BINARY):
                self._deliver(opcode is TEXT, event.data)
            else:
                self._on_other_frame(event)

    def _on_handshake_event(self, event: Request | Response) -> None:
        """A handshake request or response; only the client side gets one after connecting."""

    def _on_other_frame(self, frame: Frame) -> None:
        """Fragments and control frames: rare, so they take the long way."""
        opcode = frame.opcode
        if opcode is TEXT or opcode is BINARY:
            self._fragmented_text = opcode is TEXT
            self._fragments = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._fragments.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                self._deliver(self._fragmented_text, data)
        elif opcode is Opcode.PONG:
            self._ping_sent_at = None
        # PING is answered by websockets itself; CLOSE moves its state, seen in _flush.

    def _deliver(self, is_text: bool, data: bytes | bytearray) -> None:
        """Hand a whole message over: at once to ``take`` while nothing is queued, else to the inbox."""
        if self._failed:
            return  # frames parsed in the same read after we failed the connection are dropped
        message: str | bytes
        if is_text:
            try:
                message = data.decode()
            except UnicodeDecodeError:
                self._fail(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
                return
        else:
            message = data if type(data) is bytes else bytes(data)
        take = self.take
        if take is not None and not self._queued and take(message):
            return
        self._queued += 1
        self._inbox_bytes += len(message)
        self.inbox.put(message)
        if self._inbox_bytes >= self.limits.inbox_max_bytes:
            self._pause_reading("inbox")  # the receiver is behind: let TCP hold the rest

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 section 7.1.7): websockets sends the close frame and
        stops parsing; nothing more is delivered here either, so websockets gets every byte."""
        assert self.protocol is not None
        self.protocol.fail(code, reason)
        self._failed = True
        self._websockets_only = True
        self._shortcut = False
        self._flush()

    def _write(self, writes: list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        for data in writes:
            if data == SEND_EOF:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
            else:
                transport.write(data)
        self._check_state()

    def _flush(self) -> None:
        """Write what websockets has to send, and close the TCP connection when it says so."""
        if self.protocol is None or self.transport is None:
            return
        writes = self.protocol.data_to_send()
        if writes:
            self._write(writes)
        else:
            self._check_state()

    def _check_state(self) -> None:
        protocol, transport = self.protocol, self.transport
        assert protocol is not None and transport is not None
        if protocol.state is State.CLOSED:
            transport.close()
        elif protocol.close_expected() and self._close_timer is None:
            self._close_timer = self.loop.call_later(self.limits.close_timeout, self.abort)

    def _start_keepalive(self) -> None:
        if self.limits.ping_interval is not None:
            self._ping_timer = self.loop.call_later(self.limits.ping_interval, self._keepalive_due)

    def _keepalive_due(self) -> None:
        """Ping a peer that has been silent, and fail it with 1011 if the pong doesn't come."""
        protocol = self.protocol
        interval = self.limits.ping_interval
        if protocol is None or interval is None or protocol.state is not State.OPEN:
            return
        # A read counter rather than a clock per read: the hot path stays free of clock calls.
        # While we aren't reading it (backpressure, its frame budget), silence proves nothing.
        heard_since_last_check = self._reads != self._reads_at_check or bool(self._reading_paused_for - {"write"})
        self._reads_at_check = self._reads
        if self._ping_sent_at is not None:
            if not heard_since_last_check:
                self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                return
            self._ping_sent_at = None  # data arrived after the ping: the peer is alive
        elif not heard_since_last_check:
            protocol.send_ping(os.urandom(4))
            self._ping_sent_at = self.loop.time()
            self._flush()
            self._ping_timer = self.loop.call_later(self.limits.ping_timeout, self._keepalive_due)
            return
        self._ping_timer = self.loop.call_later(interval, self._keepalive_due)


# --------------------------------------------------------------------------- the server side


@dataclass(slots=True)
class HttpRequest:
    """One HTTP request as the router sees it; header names are lower case."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The value of a header that appears once; None if absent or repeated."""
        values = [value for key, value in self.headers if key == name]
        return values[0] if len(values) == 1 else None

    @property
    def wants_websocket(self) -> bool:
        upgrade = self.header("upgrade") or ""
        return self.method == "GET" and upgrade.strip().lower() == "websocket"


@dataclass(frozen=True, slots=True)
class HttpReply:
    """A plain HTTP response; the connection closes after it."""

    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class DeferredReply:
    """A reply still being worked out: a callback that must ask the shared state first, say.

    The connection answers with ``reply``'s result once it is done, and reads nothing more
    meanwhile. The request's deadline (``handshake_timeout``) still runs: a connection whose reply
    comes later is aborted, and the reply dropped. A ``reply`` that raises answers 500.
    """

    reply: asyncio.Future[HttpReply]


@dataclass(frozen=True, slots=True)
class AcceptWebSocket:
    """Upgrade this request; ``on_open`` gets the open peer."""

    on_open: Callable[[ServerPeer], None]
    limits: PeerLimits


class Router(TypingProtocol):
    """What the server gives each connection: the route for a request and the handshake count."""

    def route(self, request: HttpRequest) -> HttpReply | DeferredReply | AcceptWebSocket: ...

    def handshake_started(self, peer: ServerPeer) -> bool: ...

    def handshake_finished(self, peer: ServerPeer) -> None: ...


class ServerPeer(WebSocketPeer):
    """An accepted TCP connection: an HTTP request first, then a WebSocket if it asked for one."""

    __slots__ = (
        "router", "handshake_timeout", "_http", "_head", "_request", "_handshake_timer", "_counted", "_deferred",
        "peer_address",
    )

    def __init__(self, router: Router, handshake_timeout: float) -> None:
        super().__init__(_HANDSHAKE_LIMITS)
        self.router = router
        self.handshake_timeout = handshake_timeout
        self._http: h11.Connection | None = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HTTP_HEAD_BYTES)
        self._head = bytearray()  # the raw request, replayed into websockets' ServerProtocol
        self._request: HttpRequest | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._counted = False  # counted among the connections still in their handshake
        self._deferred = False  # the request was read and its reply is being worked out

        self.peer_address = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.peer_address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
        if not self.router.handshake_started(self):
            self._http = None
            transport.abort()
            return
        self._counted = True
        self._handshake_timer = self.loop.call_later(self.handshake_timeout, self._handshake_too_slow)

    def data_received(self, data: bytes) -> None:
        if self.protocol is None:
            self._http_data(data)
        else:
            self._split(data)

    def _http_data(self, data: bytes) -> None:
        if self._http is None or self._deferred:
            return  # answered already (the connection is closing), or the answer is on its way
        if len(self._head) + len(data) > MAX_HTTP_HEAD_BYTES + MAX_HTTP_BODY_BYTES:
            self._reply(HttpReply(413, "Request too large.\n"))
            return
        self._head += data
        try:
            self._http.receive_data(data)
            self._next_http_events()
        except h11.RemoteProtocolError as exc:
            logger.debug("bad HTTP request from %s: %s", self.peer_address, clean(exc))
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
            self._reply(HttpReply(status, "Bad request.\n"))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._handshake_over()
        super().connection_lost(exc)

    def _handshake_over(self) -> None:
        if self._counted:
            self._counted = False
            self.router.handshake_finished(self)

    def _handshake_too_slow(self) -> None:
        self._handshake_timer = None
        logger.debug("closed a connection from %s that did not finish its request in time", self.peer_address)
        self.abort()

    def _next_http_events(self) -> None:
        assert self._http is not None
        while self._http is not None:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Request):
                target = event.target.decode("latin-1")
                path, _, query = target.partition("?")
                headers = [(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in event.headers]
                self._request = HttpRequest(event.method.decode("latin-1"), path, query, headers)
            elif isinstance(event, h11.Data):
                assert self._request is not None
                if len(self._request.body) + len(event.data) > MAX_HTTP_BODY_BYTES:
                    self._reply(HttpReply(413, "Request body too large.\n"))
                    return
                self._request.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                # PAUSED: h11 stops at a request asking to switch protocols (a WebSocket upgrade).
                assert self._request is not None
                self._answer(self._request)
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.abort()
                return

    def _answer(self, request: HttpRequest) -> None:
        try:
            answer = self.router.route(request)
        except Exception:
            logger.exception("the route for %s failed", clean(request.path, 80))
            answer = HttpReply(500, "Internal error.\n")
        if isinstance(answer, HttpReply):
            self._reply(answer)
        elif isinstance(answer, DeferredReply):
            self._deferred = True
            answer.reply.add_done_callback(self._deferred_reply_done)
        else:
            self._upgrade(answer)

    def _deferred_reply_done(self, reply: asyncio.Future[HttpReply]) -> None:
        if reply.cancelled():
            self._reply(HttpReply(503, "Unavailable; retry.\n"))
            return
        error = reply.exception()
        if error is not None:
            path = self._request.path if self._request is not None else "?"
            logger.error("the route for %s failed", clean(path, 80), exc_info=error)
            self._reply(HttpReply(500, "Internal error.\n"))
            return
        self._reply(reply.result())

    def _reply(self, reply: HttpReply) -> None:
        """Send a plain HTTP response and close; the handshake timer still bounds the close."""
        http, self._http = self._http, None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = reply.body.encode()
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
            *reply.headers,
        ]
        if http is not None:
            try:
                data = http.send(h11.Response(status_code=reply.status, headers=headers))
                if not (http.our_state is h11.DONE or (self._request and self._request.method == "HEAD")):
                    data += http.send(h11.Data(data=body)) or b""
                data += http.send(h11.EndOfMessage()) or b""
                transport.write(data)
            except h11.LocalProtocolError:
                pass  # the request was too broken to answer in HTTP; just close
        transport.close()

    def _upgrade(self, accept: AcceptWebSocket) -> None:
        http, self._http = self._http, None
        self.limits = accept.limits
        self._tokens = float(accept.limits.frame_burst)
        self._tokens_at = self.loop.time()
        protocol = ServerProtocol(max_size=accept.limits.max_message_bytes, logger=WEBSOCKETS_LOGGER)
        self.protocol = protocol
        # websockets reads exactly the request; anything after it (frames a peer sent early)
        # goes through data_received below, so websockets' parser stands at a frame boundary.
        trailing = http.trailing_data[0] if http is not None else b""
        received, self._head = bytes(self._head), bytearray()
        protocol.receive_data(received[: len(received) - len(trailing)])
        events = protocol.events_received()
        if not events or not isinstance(events[0], Request):
            self._flush()  # websockets answered the broken handshake itself
            return
        response = protocol.accept(events[0])
        protocol.send_response(response)
        self._flush()
        if response.status_code != 101:
            logger.info("refused a WebSocket handshake from %s: HTTP %d", self.peer_address, response.status_code)
            return
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._handshake_over()
        self._start_keepalive()
        accept.on_open(self)
        if trailing:
            self.data_received(bytes(trailing))


# Until the request says what the connection is for, it gets nothing a WebSocket would.
_HANDSHAKE_LIMITS = PeerLimits(max_message_bytes=0, frames_per_second=1.0, frame_burst=1)


async def start_server(
    router_for: Callable[[], Router],
    host: str,
    port: int,
    *,
    handshake_timeout: float,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Listen on host:port; each connection gets a ``ServerPeer`` of the router."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: ServerPeer(router_for(), handshake_timeout), host, port, reuse_port=reuse_port or None
    )


# --------------------------------------------------------------------------- the client side


class AgentPeer(WebSocketPeer):
    """Our client connection to the agent; ``opened`` resolves when the handshake has succeeded."""

    __slots__ = ("opened", "_response_reader", "_response")

    receives_masked = False

    def __init__(self, protocol: ClientProtocol, limits: PeerLimits) -> None:
        super().__init__(limits)
        self.protocol = protocol
        self.opened: asyncio.Future[None] = self.loop.create_future()
        # h11 finds where the handshake response ends, so that websockets reads exactly the
        # response and the frames behind it (Deepgram's Welcome, often) go through _split.
        self._response_reader: h11.Connection | None = h11.Connection(
            h11.CLIENT, max_incomplete_event_size=MAX_HTTP_HEAD_BYTES
        )
        self._response = bytearray()

    def send_request(self, request: Request) -> None:
        """Send the handshake request websockets built, and tell h11 about it too."""
        assert isinstance(self.protocol, ClientProtocol) and self._response_reader is not None
        headers = [(name.encode(), value.encode()) for name, value in request.headers.raw_items()]
        self._response_reader.send(h11.Request(method="GET", target=request.path.encode(), headers=headers))
        self._response_reader.send(h11.EndOfMessage())
        self.protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self._response_reader is None:
            self._split(data)
            return
        reader = self._response_reader
        self._response += data
        try:
            reader.receive_data(data)
            event = reader.next_event()
        except h11.RemoteProtocolError:
            event = None  # not HTTP: websockets reads it and says what is wrong
        if event is h11.NEED_DATA:
            return
        self._response_reader = None
        assert self.protocol is not None
        received, self._response = bytes(self._response), bytearray()
        if isinstance(event, h11.InformationalResponse) and event.status_code == 101:
            trailing = reader.trailing_data[0]
            self.protocol.receive_data(received[: len(received) - len(trailing)])
            self._handle_events(self.protocol.events_received())
            self._flush()
            # ``opened`` may be cancelled: the call ended while the response was on its way, and
            # open_websocket aborts this connection next. Its frames are nobody's then.
            if trailing and self.opened.done() and not self.opened.cancelled() and self.opened.exception() is None:
                self._split(bytes(trailing))
        else:
            # A refusal (401, say) or something else: websockets reads all of it from here on.
            self._websockets_only = True
            self._shortcut = False
            self._to_websockets(self.protocol, received)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("the connection closed during the WebSocket handshake"))

    def _on_handshake_event(self, event: Request | Response) -> None:
        if self.opened.done():
            return
        assert self.protocol is not None
        handshake_exc = self.protocol.handshake_exc
        if handshake_exc is not None:
            self.opened.set_exception(handshake_exc)
            self.abort()
        else:
            self._start_keepalive()
            self.opened.set_result(None)


async def open_websocket(url: str, headers: Iterable[tuple[str, str]], limits: PeerLimits) -> AgentPeer:
    """Connect to a ws:// or wss:// URL and finish the WebSocket handshake.

    The caller bounds the whole of it with a timeout; cancelling closes the connection.
    """
    uri = parse_uri(url)
    protocol = ClientProtocol(uri, max_size=limits.max_message_bytes, logger=WEBSOCKETS_LOGGER)
    peer = AgentPeer(protocol, limits)
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if uri.secure else None
    try:
        await loop.create_connection(
            lambda: peer, uri.host, uri.port, ssl=context, server_hostname=uri.host if uri.secure else None
        )
        request = protocol.connect()
        for name, value in headers:
            request.headers[name] = value
        peer.send_request(request)
        await peer.opened
    except BaseException:
        peer.abort()
        raise
    return peer


def handshake_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake, if that is what ``exc`` is."""
    if isinstance(exc, InvalidStatus):
        return exc.response.status_code
    return None


