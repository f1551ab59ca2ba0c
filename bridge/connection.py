"""WebSocket connections with a direct path for the frames a call is made of.

A call is hundreds of small frames a second: Twilio sends a 160-byte ``media`` frame every
20 ms and we answer with agent audio; the agent gets a binary chunk every few hundred ms and
answers with audio. websockets parses each frame through a chain of generators, queues it in
a message assembler and wakes a task, and each ``send`` goes through an async context manager
and a ``Frame`` object. On this project's benchmark that machinery was most of the bridge's CPU.

``DirectFrames`` keeps websockets for everything it is good at (the handshake, control frames,
closing, fragmentation, errors, flow control, limits) and takes only the common case:

- receiving: whole frames are cut out of the byte stream here; a complete, unfragmented text or
  binary frame within the size limit is unmasked and delivered at once. Any other frame is
  handed to websockets whole, so its parser always stands at a frame boundary and can take
  over at any point. Parsing only starts once websockets' parser is idle at a frame boundary.
- sending: an unfragmented message on an open connection with room in the write buffer is
  framed and written in one call; otherwise ``send`` is websockets' own, which waits for room.
- keepalive: websockets' pings (``ping_interval``, ``ping_timeout``) are kept, but driven by a
  timer per connection; a task exists only while a ping waits for its pong, instead of a task
  sleeping for the whole call (about 2 KB per connection, 4 KB per call).

Nothing here changes what goes over the wire: the frames are the ones RFC 6455 describes and
websockets itself would produce (server frames unmasked, client frames masked with a fresh
random key each).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, CloseCode, Frame, Opcode
from websockets.protocol import Event, State
from websockets.streams import StreamReader
from websockets.typing import Data

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

OPEN = State.OPEN
FIN_TEXT = 0x81  # first header byte of a whole text frame: FIN, no RSV bits, opcode 1
FIN_BINARY = 0x82
_AT_EOF = StreamReader.at_eof.__code__


def frame_header(first_byte: int, length: int, *, masked: bool) -> bytes:
    """The header of a frame whose payload is ``length`` bytes (RFC 6455 section 5.2)."""
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first_byte, mask_bit | length))
    if length < 65536:
        return bytes((first_byte, mask_bit | 126)) + length.to_bytes(2, "big")
    return bytes((first_byte, mask_bit | 127)) + length.to_bytes(8, "big")


def frame_extent(data: bytes, pos: int, masked: bool) -> tuple[int, int] | None:
    """Where the payload of the frame starting at ``pos`` begins, and its length.

    None when the header isn't complete yet. ``masked`` says whether the header carries a
    4-byte key (client-to-server frames); the key is included in the header's size.
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
    if masked:
        start += 4
        if len(data) < start:
            return None
    return start, length


def _parser_idle(connection: Connection) -> bool:
    """True when websockets' parser waits at a frame boundary with nothing buffered."""
    protocol = connection.protocol
    if protocol.reader.buffer or protocol.state is not OPEN:
        return False
    generator: Any = protocol.parser
    while (inner := getattr(generator, "gi_yieldfrom", None)) is not None:
        generator = inner
    return getattr(generator, "gi_code", None) is _AT_EOF


def _frame_size_limit(connection: Connection) -> int | None | bool:
    """The largest unfragmented frame websockets would accept, None for no limit.

    False when this websockets version keeps its limits in attributes we don't know, in which
    case its own parser is left to do all the work.
    """
    protocol = connection.protocol
    try:
        limits = [protocol.max_message_size, protocol.max_fragment_size]  # type: ignore[attr-defined]
        protocol.current_size  # type: ignore[attr-defined]  # noqa: B018 - checks the attribute exists
    except AttributeError:
        return False
    given = [limit for limit in limits if limit is not None]
    return min(given) if given else None


class DirectFrames(Connection):
    """The direct receive and send paths, shared by both ends of a call.

    A subclass may take whole messages as they are cut out (``take_message``), in the transport's
    data callback. Order is kept: while any message waits in websockets' queue for ``recv`` (one
    the subclass declined, a fragmented one, or one that came before the subclass was ready),
    later ones queue behind it.
    """

    # Which side's frames carry a mask: a server receives masked frames and sends plain ones.
    receives_masked: bool
    sends_masked: bool

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsing = False  # whether data_received cuts frames here instead of websockets
        self._unparsed = b""  # the start of a frame whose end hasn't arrived yet
        self._size_limit: int | None = None
        self._length16_byte = (0x80 if self.receives_masked else 0) | 126  # header byte 2 of a 16-bit length
        self._queued_messages = 0  # whole messages handed to websockets' queue, not yet received
        self._in_fragmented_message = False
        # websockets versions that track a fragmented send differently keep their own send path.
        self._direct_send = hasattr(self, "send_in_progress")
        self._keepalive_timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------------------ receiving

    def data_received(self, data: bytes) -> None:
        if not self._parsing and not self._start_parsing():
            super().data_received(data)
            return
        # By far the most common read: exactly one whole data frame of 126 to 65535 bytes (a
        # Twilio media frame, a chunk of agent audio). Handled here without the general loop.
        if not self._unparsed and len(data) >= 8 and data[1] == self._length16_byte:
            first = data[0]
            if (first == FIN_TEXT or first == FIN_BINARY) and not self._in_fragmented_message:
                start = 8 if self.receives_masked else 4
                length = (data[2] << 8) | data[3]
                if start + length == len(data) and (self._size_limit is None or length <= self._size_limit):
                    payload = data[start:]
                    if start == 8:
                        payload = apply_mask(payload, data[4:8])
                    self._whole_message(first == FIN_TEXT, payload)
                    return
        if self._unparsed:
            data = self._unparsed + data
            self._unparsed = b""
        masked = self.receives_masked
        limit = self._size_limit
        protocol = self.protocol
        pos = 0
        end = len(data)
        while pos < end:
            extent = frame_extent(data, pos, masked)
            if extent is None:
                break
            start, length = extent
            if limit is not None and length > limit:
                # websockets answers an oversize frame with 1009; it parses from here on.
                self._parsing = False
                super().data_received(data[pos:])
                return
            frame_end = start + length
            if frame_end > end:
                break
            first = data[pos]
            if (
                (first == FIN_TEXT or first == FIN_BINARY)
                and bool(data[pos + 1] & 0x80) == masked
                and protocol.current_size is None  # type: ignore[attr-defined]
            ):
                payload = data[start:frame_end]
                if masked:
                    payload = apply_mask(payload, data[start - 4 : start])
                self._whole_message(first == FIN_TEXT, payload)
                if not self._parsing:  # the message was given back to websockets, which failed it
                    if frame_end < end:
                        super().data_received(data[frame_end:])
                    return
            else:
                # Control frames, fragments, bad masking or RSV bits: websockets' own, whole.
                super().data_received(data[pos:frame_end])
                if protocol.state is not OPEN:
                    self._parsing = False
                    if frame_end < end:
                        super().data_received(data[frame_end:])
                    return
            pos = frame_end
        if pos < end:
            self._unparsed = data[pos:]

    def _start_parsing(self) -> bool:
        if not _parser_idle(self):
            return False
        limit = _frame_size_limit(self)
        if limit is False:
            return False
        self._size_limit = limit  # type: ignore[assignment]
        self._parsing = True
        return True

    def eof_received(self) -> None:
        if self._unparsed:
            # websockets fails a frame cut short by EOF with 1006, as it would unaided.
            self._parsing = False
            unparsed, self._unparsed = self._unparsed, b""
            super().data_received(unparsed)
        return super().eof_received()

    def _whole_message(self, is_text: bool, payload: bytes) -> None:
        """Deliver an unfragmented message cut out here, in order with those websockets queued."""
        if self._queued_messages or self._in_fragmented_message or not self.take_message(is_text, payload):
            self.process_event(Frame(Opcode.TEXT if is_text else Opcode.BINARY, payload))

    def take_message(self, is_text: bool, payload: bytes) -> bool:
        """Take a whole message at once; False leaves it to websockets' queue and ``recv``."""
        return False

    def _give_back(self, is_text: bool, payload: bytes) -> None:
        """Let websockets' parser read a frame cut out here, and all that follows, and judge it."""
        self._parsing = False
        frame = Frame(Opcode.TEXT if is_text else Opcode.BINARY, payload)
        super().data_received(frame.serialize(mask=self.receives_masked))

    def process_event(self, event: Event) -> None:
        if type(event) is Frame and event.opcode in DATA_OPCODES:
            if event.fin:
                self._queued_messages += 1
            self._in_fragmented_message = not event.fin
        super().process_event(event)

    async def recv(self, decode: bool | None = None) -> Data:  # type: ignore[override]
        message = await super().recv(decode)
        self._queued_messages -= 1
        return message

    # ------------------------------------------------------------------------------ keepalive

    def start_keepalive(self) -> None:
        if self.ping_interval is not None:
            self._keepalive_timer = self.loop.call_later(self.ping_interval, self._keepalive_due)

    def _keepalive_due(self) -> None:
        if self.protocol.state is not OPEN:
            return
        assert self.ping_interval is not None  # only scheduled when pings are on
        self._keepalive_timer = self.loop.call_later(self.ping_interval, self._keepalive_due)
        if self.keepalive_task is None or self.keepalive_task.done():
            # connection_lost() cancels keepalive_task, as it does websockets' own.
            self.keepalive_task = self.loop.create_task(self._keepalive_ping())

    async def _keepalive_ping(self) -> None:
        """One round of websockets' keepalive: ping, and fail with 1011 if no pong comes in time."""
        try:
            pong = await self.ping()
            if self.ping_timeout is None:
                return
            try:
                async with asyncio.timeout(self.ping_timeout):
                    await pong
            except TimeoutError:
                async with self.send_context():
                    self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        except ConnectionClosed:
            pass

    def connection_lost(self, exc: Exception | None) -> None:
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None
        super().connection_lost(exc)

    # -------------------------------------------------------------------------------- sending

    def send_now(self, message: str | bytes) -> bool:
        """Write one whole message now if nothing stands in the way; False if ``send`` must wait.

        Something stands in the way while the connection is closing, while a fragmented message
        is going out, and while the write buffer is over its high-water mark (flow control).
        """
        if not (
            self.protocol.state is OPEN and self._direct_send and self.send_in_progress is None and not self.paused
        ):
            return False
        if type(message) is str:
            first, payload = FIN_TEXT, message.encode()
        else:
            first, payload = FIN_BINARY, message
        if self.sends_masked:
            mask = os.urandom(4)
            frame = frame_header(first, len(payload), masked=True) + mask + apply_mask(payload, mask)
        else:
            frame = frame_header(first, len(payload), masked=False) + payload
        self.transport.write(frame)
        return True

    async def send(self, message: Any, *, text: bool | None = None) -> None:  # type: ignore[override]
        if text is None and type(message) in (str, bytes) and self.send_now(message):
            return
        await super().send(message, text=text)


class AgentConnection(DirectFrames, ClientConnection):
    """The client side of the Deepgram agent socket, which can give agent audio to ``on_audio``.

    ``on_audio`` runs inside the transport's data callback and returns whether it played the
    audio; when it can't (the caller's socket is busy), the audio waits in order for ``recv``.
    """

    receives_masked = False
    sends_masked = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_audio: Callable[[bytes], bool] | None = None

    def take_message(self, is_text: bool, payload: bytes) -> bool:
        on_audio = self.on_audio
        return not is_text and on_audio is not None and on_audio(payload)


class TwilioConnection(DirectFrames, ServerConnection):
    """The server side of a Twilio socket, which gives whole text frames to ``on_text`` once set.

    ``on_text`` runs inside the transport's data callback, so it must not raise and must not
    block; the call session's handler does neither.
    """

    receives_masked = True
    sends_masked = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_text: Callable[[str], None] | None = None

    def take_message(self, is_text: bool, payload: bytes) -> bool:
        on_text = self.on_text
        if not is_text or on_text is None:
            return False
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            self._give_back(is_text, payload)  # websockets fails the connection with 1007
            return True
        on_text(text)
        return True
