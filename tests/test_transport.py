"""The transport of bridge/transport.py through real sockets, checked against websockets' own framing.

Frames are cut, coalesced and interleaved with control and fragmented frames as TCP may deliver
them; the bytes must come out whole and in order on the far side either way.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from bridge.transport import AgentPeer, PeerLimits, ServerPeer
from bridge.server import BridgeServer
from conftest import BridgeFactory, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually, media_event

def only_call(server: BridgeServer) -> Any:
    assert len(server.calls) == 1
    return next(iter(server.calls))


class RawTwilio:
    """A Twilio client that writes frame bytes itself, cut wherever the test likes.

    websockets' sans-I/O client does the handshake and reads the bridge's frames, so what this
    client sees is judged by websockets, not by the code under test.
    """

    def __init__(self, url: str, stream_sid: str = "MZraw") -> None:
        self.url = url
        self.stream_sid = stream_sid
        self.uri = parse_uri(url)
        self.protocol = ClientProtocol(self.uri)
        self.events: list[dict[str, Any]] = []
        self.pongs: list[bytes] = []
        self.audio = bytearray()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, receive_buffer: int | None = None) -> None:
        sock = socket.socket()
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.setblocking(False)
        host, port = self.uri.host, self.uri.port
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=2**16)
        self.protocol.send_request(self.protocol.connect())
        await self.flush()
        while self.protocol.handshake_exc is None and self.protocol.state.name == "CONNECTING":
            await self.read_some()
        assert self.protocol.handshake_exc is None

    async def flush(self) -> None:
        assert self.writer is not None
        for data in self.protocol.data_to_send():
            self.writer.write(data)
        await self.writer.drain()

    async def write(self, data: bytes, cut: random.Random | None = None) -> None:
        """Write raw frame bytes, in random pieces when ``cut`` is given."""
        assert self.writer is not None
        pos = 0
        while pos < len(data):
            step = cut.randint(1, 40) if cut else len(data)
            self.writer.write(data[pos : pos + step])
            await self.writer.drain()
            pos += step
            if cut:
                await asyncio.sleep(0)

    async def read_some(self) -> bool:
        assert self.reader is not None
        data = await self.reader.read(65536)
        if not data:
            self.protocol.receive_eof()
        else:
            self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.PONG:
                self.pongs.append(bytes(event.data))
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                message = json.loads(event.data)
                self.events.append(message)
                if message.get("event") == "media":
                    self.audio += base64.b64decode(message["media"]["payload"])
        await self.flush()
        return bool(data)

    async def read_until(self, condition: Any, timeout: float = 5.0) -> None:
        async def loop() -> None:
            while not condition():
                if not await self.read_some():
                    raise AssertionError("the bridge closed the connection")

        await asyncio.wait_for(loop(), timeout)

    def text(self, message: dict[str, Any] | str) -> bytes:
        data = message if isinstance(message, str) else json.dumps(message)
        return Frame(Opcode.TEXT, data.encode()).serialize(mask=True)

    def opening(self) -> bytes:
        start = {"streamSid": self.stream_sid, "callSid": "CAraw", "accountSid": "AC" + "0" * 32, "tracks": ["inbound"]}
        return self.text({"event": "connected", "protocol": "Call", "version": "1.0.0"}) + self.text(
            {"event": "start", "sequenceNumber": "1", "streamSid": self.stream_sid, "start": start}
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.asynccontextmanager
async def raw_call(
    server: BridgeServer, fake_agent: FakeAgent, receive_buffer: int | None = None
) -> AsyncIterator[tuple[RawTwilio, FakeAgentSession, ServerPeer]]:
    """A started call from a RawTwilio caller, once the agent has its Settings."""
    caller = RawTwilio(twilio_url(server))
    await caller.open(receive_buffer)
    try:
        await caller.write(caller.opening())
        agent = await fake_agent.session()
        await eventually(lambda: agent.settings is not None)
        connection = only_call(server).caller
        assert isinstance(connection, ServerPeer)
        yield caller, agent, connection
    finally:
        caller.close()


async def test_twilio_frames_cut_anywhere_and_mixed_with_others_arrive_whole_and_in_order(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    rng = random.Random(7)
    audio = bytes(rng.randrange(256) for _ in range(160 * 40))
    async with make_bridge(fake_agent, inbound_chunk_bytes=160) as server, raw_call(server, fake_agent) as (
        caller,
        agent,
        connection,
    ):
        frames = [caller.text(media_event(caller.stream_sid, i, i, audio[i * 160 : (i + 1) * 160])) for i in range(40)]
        # A ping, and one media event sent as two fragments, in the middle of the stream.
        frames.insert(10, Frame(Opcode.PING, b"are you there").serialize(mask=True))
        twentieth = media_event(caller.stream_sid, 20, 20, audio[20 * 160 : 21 * 160]).encode()
        frames[21] = Frame(Opcode.TEXT, twentieth[:50], fin=False).serialize(mask=True) + Frame(
            Opcode.CONT, twentieth[50:]
        ).serialize(mask=True)
        everything = b"".join(frames)
        await caller.write(everything[: len(everything) // 2])  # half in one write: many frames per read
        await caller.write(everything[len(everything) // 2 :], cut=rng)  # the rest in 1-40 byte pieces

        await eventually(lambda: len(agent.audio) >= len(audio), what="all caller audio at the agent")
        assert bytes(agent.audio) == audio
        await caller.read_until(lambda: caller.pongs)
        assert caller.pongs == [b"are you there"]


async def test_agent_frames_cut_anywhere_reach_the_caller_in_order_with_their_events(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    rng = random.Random(11)
    chunks = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000))) for _ in range(30)]
    async with make_bridge(fake_agent) as server:
        async with FakeTwilioCaller(twilio_url(server), echo_marks=False) as caller:
            await caller.start()
            agent = await fake_agent.session()
            await eventually(lambda: agent.settings is not None)
            connection = only_call(server).agent
            assert isinstance(connection, AgentPeer)

            # Raw server frames: all the audio, then AgentAudioDone, coalesced and cut at random.
            raw = b"".join(Frame(Opcode.BINARY, chunk).serialize(mask=False) for chunk in chunks)
            raw += Frame(Opcode.TEXT, b'{"type":"AgentAudioDone"}').serialize(mask=False)
            pos = 0
            while pos < len(raw):
                step = rng.randint(1, 5000)
                agent.socket.transport.write(raw[pos : pos + step])
                pos += step
                await asyncio.sleep(0)
            pong = await agent.socket.ping(b"ping from the agent")
            await asyncio.wait_for(pong, 2)

            await eventually(lambda: caller.of_event("mark"), what="the mark after the audio")
            assert bytes(caller.audio) == b"".join(chunks)
            media_and_marks = [e["event"] for e in caller.events if e.get("event") in ("media", "mark")]
            assert media_and_marks == ["media"] * len(chunks) + ["mark"]  # the mark follows all of the audio


async def test_a_caller_who_reads_slowly_still_gets_every_byte_in_order(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """Flow control: while the caller's socket is full, agent audio waits in order, then flows."""
    rng = random.Random(5)
    chunks = [bytes(rng.randrange(256) for _ in range(4000)) for _ in range(120)]  # 480 KB of audio
    async with make_bridge(fake_agent) as server, raw_call(server, fake_agent, receive_buffer=4096) as (
        caller,
        agent,
        connection,
    ):
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

        for chunk in chunks:
            await agent.send_audio(chunk)
        await agent.send_json({"type": "AgentAudioDone"})
        await eventually(lambda: connection.writing_paused, what="the bridge pausing writes to the slow caller")
        await caller.read_until(lambda: any(e.get("event") == "mark" for e in caller.events), timeout=20)
        assert bytes(caller.audio) == b"".join(chunks)
        assert caller.events[-1]["event"] == "mark"


async def test_a_new_message_inside_a_fragmented_one_is_a_protocol_error(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    async with make_bridge(fake_agent) as server, raw_call(server, fake_agent) as (caller, _, _):
        await caller.write(Frame(Opcode.TEXT, b'{"event":', fin=False).serialize(mask=True))
        await caller.write(caller.text({"event": "mark", "mark": {"name": "x" * 200}}))  # not a continuation
        await caller.read_until(lambda: caller.protocol.close_rcvd is not None)
        assert caller.protocol.close_rcvd is not None and caller.protocol.close_rcvd.code == 1002, caller.protocol.close_rcvd
        assert "continuation" in caller.protocol.close_rcvd.reason, caller.protocol.close_rcvd


async def test_keepalive_pings_a_silent_peer_and_fails_it_with_1011_if_no_pong_comes(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    async with make_bridge(fake_agent, ping_interval_seconds=0.2) as server:
        # A peer that answers pings (websockets does, unasked) stays connected over many intervals.
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await asyncio.sleep(1.0)  # five intervals with nothing sent: only pings keep it alive
            assert server.calls and not caller.closed.is_set()
            await caller.stop()
        await eventually(lambda: not server.calls)

        # A peer that reads but never answers is failed with 1011, as websockets' keepalive does.
        silent = RawTwilio(twilio_url(server))
        await silent.open()
        try:
            received = bytearray()  # read, but never answer: the bytes are parsed only afterwards
            with contextlib.suppress(ConnectionResetError):
                assert silent.reader is not None
                while chunk := await asyncio.wait_for(silent.reader.read(65536), 3):
                    received += chunk
            silent.protocol.receive_data(bytes(received))
            assert silent.protocol.close_rcvd is not None
            assert (silent.protocol.close_rcvd.code, silent.protocol.close_rcvd.reason) == (1011, "keepalive ping timeout")
        finally:
            silent.close()


@pytest.mark.parametrize("one_read", [True, False])
async def test_a_text_frame_that_is_not_utf8_fails_the_connection_with_1007(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, one_read: bool
) -> None:
    async with make_bridge(fake_agent) as server, raw_call(server, fake_agent) as (caller, agent, _):
        media = caller.text({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "AAAA"}})
        bad = Frame(Opcode.TEXT, b'{"event":"media","x":"' + b"\xff" * 200 + b'"}').serialize(mask=True)
        if one_read:  # the general loop, with a frame after the bad one
            await caller.write(media + bad + media)
        else:  # the one-frame shortcut
            await caller.write(media)
            await asyncio.sleep(0.05)
            await caller.write(bad)
            await asyncio.sleep(0.05)
            await caller.write(media)
        await caller.read_until(lambda: caller.protocol.close_rcvd is not None)
        assert caller.protocol.close_rcvd is not None and caller.protocol.close_rcvd.code == 1007, caller.protocol.close_rcvd
        await eventually(lambda: not server.calls, 3, "the call to end")
    assert bytes(agent.audio) == b"\x00" * 3, "the frame before the bad one arrived; the one after it did not"


@pytest.mark.parametrize(
    "frame, code",
    [
        (Frame(Opcode.TEXT, b'{"event":"mark"}').serialize(mask=False), 1002),  # a client frame must be masked
        (bytes([0xC1]) + Frame(Opcode.TEXT, b'{"event":"mark"}').serialize(mask=True)[1:], 1002),  # RSV1: no extension
        (Frame(Opcode.CONT, b"stray continuation").serialize(mask=True), 1002),
        (Frame(Opcode.TEXT, b"x" * (70 * 1024)).serialize(mask=True), 1009),  # over the 64 KB limit
    ],
    ids=["unmasked", "rsv1", "stray-continuation", "oversize"],
)
async def test_frames_the_shortcut_must_not_take_are_judged_by_websockets(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, frame: bytes, code: int
) -> None:
    async with make_bridge(fake_agent) as server, raw_call(server, fake_agent) as (caller, agent, _):
        media = caller.text({"event": "media", "streamSid": caller.stream_sid, "media": {"payload": "AAAA"}})
        await caller.write(media + frame + media)
        await caller.read_until(lambda: caller.protocol.close_rcvd is not None)
        assert caller.protocol.close_rcvd is not None and caller.protocol.close_rcvd.code == code, caller.protocol.close_rcvd
        await eventually(lambda: not server.calls, 3, "the call to end")
    assert bytes(agent.audio) == b"\x00" * 3, "only the frame before the bad one was delivered"


async def test_frames_sent_with_the_handshake_request_are_not_lost(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """A peer may send frames right behind its upgrade request, in the same TCP segment."""
    async with make_bridge(fake_agent, inbound_chunk_bytes=160) as server:
        caller = RawTwilio(twilio_url(server))
        sock = socket.create_connection((caller.uri.host, caller.uri.port))
        sock.setblocking(False)
        caller.reader, caller.writer = await asyncio.open_connection(sock=sock)
        caller.protocol.send_request(caller.protocol.connect())
        request = b"".join(caller.protocol.data_to_send())
        audio = bytes(range(160))
        media = caller.text(media_event(caller.stream_sid, 2, 1, audio))
        caller.writer.write(request + caller.opening() + media[:100])  # and half a frame
        await caller.writer.drain()
        while caller.protocol.state.name == "CONNECTING":
            await caller.read_some()
        await caller.write(media[100:])
        agent = await fake_agent.session()
        await eventually(lambda: bytes(agent.audio) == audio, what="the early audio at the agent")
        caller.close()


async def test_a_caller_over_its_frame_budget_is_slowed_down_but_loses_nothing(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """Past its burst, a connection is read only as fast as its budget refills; order is kept."""
    rng = random.Random(3)
    audio = rng.randbytes(160 * 600)
    async with make_bridge(
        fake_agent, inbound_chunk_bytes=160, caller_frames_per_second=1000.0, max_caller_frame_burst=100
    ) as server, raw_call(server, fake_agent) as (caller, agent, connection):
        frames = b"".join(
            caller.text(media_event(caller.stream_sid, i, i, audio[i * 160 : (i + 1) * 160])) for i in range(600)
        )
        started = asyncio.get_running_loop().time()
        await caller.write(frames[:70_000])  # many frames per read: the general path
        await caller.write(frames[70_000:], cut=random.Random(4))  # and frames cut anywhere
        await eventually(lambda: len(agent.audio) >= len(audio), 10, "all caller audio at the agent")
        elapsed = asyncio.get_running_loop().time() - started
        assert bytes(agent.audio) == audio
        assert connection.frames_throttled >= 1
        assert elapsed >= 0.4, f"600 frames at 1000 a second past a burst of 100 took only {elapsed:.2f} s"


class MemoryTransport(asyncio.Transport):
    """A transport that keeps what is written to it and whether reading is paused; aborting it does nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.reading = True

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def agent_peer_answered(limits: PeerLimits = PeerLimits(1 << 20, 100.0, 100)) -> tuple[AgentPeer, ServerProtocol]:
    """An AgentPeer whose handshake request the (Sans-I/O) agent has accepted, the 101 not yet sent."""
    transport = MemoryTransport()
    peer = AgentPeer(
        ClientProtocol(parse_uri("ws://agent.test/v1/agent/converse"), max_size=limits.max_message_bytes), limits
    )
    peer.connection_made(transport)
    assert isinstance(peer.protocol, ClientProtocol)
    peer.send_request(peer.protocol.connect())
    agent = ServerProtocol(max_size=limits.max_message_bytes)
    agent.receive_data(b"".join(transport.written))
    [request] = agent.events_received()
    agent.send_response(agent.accept(request))
    return peer, agent


async def test_a_handshake_answered_after_the_call_gave_up_on_it_is_dropped_quietly() -> None:
    """The call ends (its open_websocket is cancelled) just as the agent's 101 and first frame arrive."""
    peer, agent = agent_peer_answered()
    agent.send_text(b'{"type": "Welcome", "request_id": "r"}')
    peer.opened.cancel()  # what cancelling ``await peer.opened`` does
    peer.data_received(b"".join(agent.data_to_send()))  # the 101 with the Welcome behind it
    assert peer.opened.cancelled()
    assert len(peer.inbox) == 0, "a frame was delivered for a call that is gone"


@pytest.mark.parametrize("later", ["text", "audio"])
async def test_an_aborted_peer_delivers_nothing_more_not_even_from_the_read_under_way(later: str) -> None:
    """The session aborts the agent socket on an Error; frames behind it in one read are no one's."""
    peer, agent = agent_peer_answered()
    peer.data_received(b"".join(agent.data_to_send()))
    assert peer.opened.done() and peer.opened.exception() is None
    taken: list[str | bytes] = []

    def take(message: str | bytes) -> bool:
        taken.append(message)
        if message == '{"type": "Error"}':
            peer.abort()  # what the session does
        return True

    peer.take = take
    agent.send_text(b'{"type": "Error"}')
    if later == "text":
        agent.send_text(b'{"type": "ConversationText"}')
    else:
        agent.send_binary(b"\x10" * 400)
    peer.data_received(b"".join(agent.data_to_send()))  # both frames in one read
    assert taken == ['{"type": "Error"}']
    assert len(peer.inbox) == 0


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
async def test_text_frames_the_bridge_writes_itself_are_the_ones_websockets_writes(size: int) -> None:
    """The server frames its text messages itself; byte for byte, they must be websockets' frames."""
    written: list[bytes] = []

    class Transport(asyncio.Transport):
        def write(self, data: bytes) -> None:  # type: ignore[override]
            written.append(bytes(data))

    peer = ServerPeer(None, 10.0)  # type: ignore[arg-type]  # no router: the HTTP phase is skipped
    peer.transport = Transport()
    peer.protocol = ServerProtocol()
    peer.protocol.state = State.OPEN
    text = "é" * (size // 2) + "x" * (size % 2)
    peer.send_text(text)
    assert b"".join(written) == Frame(Opcode.TEXT, text.encode()).serialize(mask=False)


@pytest.mark.parametrize("first", ["close", "oversize"])
async def test_no_message_is_delivered_after_a_close_frame_or_an_oversize_frame(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, first: str
) -> None:
    """Once the connection is closing, later data frames (even ones the shortcut could take) are dropped."""
    async with make_bridge(fake_agent, inbound_chunk_bytes=160) as server, raw_call(server, fake_agent) as (
        caller,
        agent,
        _,
    ):
        if first == "close":
            opening = Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True)
        else:
            opening = Frame(Opcode.BINARY, b"x" * (70 * 1024)).serialize(mask=True)
        await caller.write(opening)
        await asyncio.sleep(0.05)
        await caller.write(caller.text(media_event(caller.stream_sid, 2, 1, bytes(range(160)))))
        await asyncio.sleep(0.2)
        assert bytes(agent.audio) == b"", "a frame sent after the close was delivered"


async def test_no_message_is_delivered_after_the_keepalive_failed_the_connection(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """RFC 6455 section 7.1.7: once the keepalive has failed a connection (1011), nothing more it sends counts."""
    async with make_bridge(fake_agent, inbound_chunk_bytes=160, ping_interval_seconds=0.1) as server, raw_call(
        server, fake_agent
    ) as (caller, agent, _):
        assert caller.reader is not None
        while caller.protocol.close_rcvd is None:  # read, but never send the pong websockets queues
            data = await asyncio.wait_for(caller.reader.read(65536), 3)
            assert data, "the bridge closed the connection without a close frame"
            caller.protocol.receive_data(data)
        assert (caller.protocol.close_rcvd.code, caller.protocol.close_rcvd.reason) == (1011, "keepalive ping timeout")
        # One whole media frame, alone in its read: the frame shortcut would take it.
        await caller.write(caller.text(media_event(caller.stream_sid, 2, 1, bytes(range(160)))))
        caller.close()
        await asyncio.wait_for(agent.closed.wait(), 5)  # the agent has processed all it was sent
        assert bytes(agent.audio) == b"", "a frame sent after the connection failed was delivered"


async def test_the_keepalive_does_not_take_a_peer_held_back_by_its_frame_budget_for_a_silent_one(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """While the bridge isn't reading a peer (here its frame budget is spent), no pong can be seen: no 1011."""
    audio = bytes(range(160)) * 4
    async with make_bridge(
        fake_agent,
        inbound_chunk_bytes=160,
        ping_interval_seconds=0.05,
        caller_frames_per_second=4.0,
        max_caller_frame_burst=3,
    ) as server, raw_call(server, fake_agent) as (caller, agent, connection):
        # connected and start took two frames of the burst: the second of these waits 0.25 s, and so on.
        frames = [caller.text(media_event(caller.stream_sid, i + 2, i, audio[i * 160 : (i + 1) * 160])) for i in range(4)]
        await caller.write(b"".join(frames))
        await eventually(lambda: len(agent.audio) >= len(audio), 3, "all caller audio at the agent")
        assert bytes(agent.audio) == audio
        assert connection.frames_throttled >= 1  # it was held back, for longer than two ping intervals


async def test_frames_that_each_come_in_a_read_of_their_own_are_held_to_the_frame_budget(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    """The one-frame-per-read shortcut (the usual read) spends the frame budget like every other path."""
    audio = random.Random(9).randbytes(160 * 40)
    async with make_bridge(
        fake_agent, inbound_chunk_bytes=160, caller_frames_per_second=50.0, max_caller_frame_burst=12
    ) as server, raw_call(server, fake_agent) as (caller, agent, connection):
        loop = asyncio.get_running_loop()
        started = loop.time()
        for i in range(40):  # 10 within what is left of the burst, then 30 at 50 a second: at least 0.6 s
            await caller.write(caller.text(media_event(caller.stream_sid, i + 2, i, audio[i * 160 : (i + 1) * 160])))
            # The next frame is sent once this one has been read: one frame per read.
            await eventually(lambda: len(agent.audio) >= (i + 1) * 160, 3, f"frame {i} at the agent")
        elapsed = loop.time() - started
        assert bytes(agent.audio) == audio
        assert connection.frames_throttled >= 1
        assert elapsed >= 0.5, f"30 frames past the burst at 50 a second took only {elapsed:.2f} s"


def call_record(calls_dir: Path, call_sid: str) -> list[dict[str, Any]]:
    """The lines of one call's record, found by its callSid."""
    [path] = calls_dir.glob(f"*_{call_sid}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


async def normal_call_carries_audio(caller: FakeTwilioCaller, agent: FakeAgentSession, n: int) -> None:
    """400 ms of caller audio reach the agent, and 100 ms of agent audio the caller."""
    audio_in, audio_out = len(agent.audio), len(caller.audio)
    await caller.send_audio(bytes([n]) * 3200)
    await agent.send_audio(bytes([n]) * 800)
    await eventually(lambda: len(agent.audio) >= audio_in + 3200, 3, "the normal call's audio at its agent")
    await eventually(lambda: len(caller.audio) >= audio_out + 800, 3, "the normal call's agent audio at its caller")


async def test_a_flooding_caller_the_bridge_stopped_reading_who_then_resets_ends_its_call_within_seconds(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Its agent reads nothing, the caller floods until the bridge stops reading them, then resets.

    Nothing else would end the call: the silence hang-up is off, and the agent socket's stall
    timeout is long. The reset must be noticed although the bridge isn't reading the socket.
    """
    async with make_bridge(
        fake_agent,
        idle_reprompt_seconds=0,
        stall_timeout_seconds=60,
        close_timeout_seconds=0.3,
        inbound_chunk_bytes=3200,
        max_agent_queue_bytes=16_000,
        caller_frames_per_second=1e6,  # the pause to test is backpressure, not the frame budget
        max_caller_frame_burst=10**6,
    ) as server, raw_call(server, fake_agent) as (flooder, flood_agent, connection):
        flood_agent.socket.transport.pause_reading()  # the agent reads nothing more
        async with FakeTwilioCaller(twilio_url(server)) as normal:
            await normal.start()
            normal_agent = await fake_agent.ready_session(1)
            await normal_call_carries_audio(normal, normal_agent, 1)

            assert flooder.writer is not None
            frame = flooder.text(media_event(flooder.stream_sid, 3, 2, b"\x5a" * 32_000))

            async def flood() -> None:
                assert flooder.writer is not None
                while True:
                    flooder.writer.write(frame)
                    await flooder.writer.drain()

            flooding = asyncio.create_task(flood())
            [session] = [call for call in server.calls if call.caller is connection]
            # Once the agent socket is full too, the bridge has stopped reading the flooder for good.
            await eventually(
                lambda: not connection.transport.is_reading() and session.agent is not None and session.agent.writing_paused,
                10,
                "the bridge to stop reading the flooder",
            )
            flooding.cancel()
            await asyncio.gather(flooding, return_exceptions=True)
            sock = flooder.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            flooder.writer.transport.abort()  # with SO_LINGER 0: a reset

            await eventually(lambda: len(server.calls) == 1, 5, "the flooder's call to end")
            assert call_record(tmp_path / "calls", "CAraw")[-1]["ended_by"] == "caller hung up"
            assert normal.socket is not None and not normal.closed.is_set()
            await normal_call_carries_audio(normal, normal_agent, 2)
        flood_agent.socket.transport.resume_reading()  # so the fake agent sees its socket end, and stops at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a close behind unread bytes shows only in Linux's TCP_INFO")
async def test_a_caller_the_bridge_stopped_reading_who_then_closes_ends_its_call_within_seconds(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """The caller reads nothing while the agent speaks, so the bridge stops reading it; then it closes (a FIN)."""
    async with make_bridge(
        fake_agent, idle_reprompt_seconds=0, stall_timeout_seconds=60, close_timeout_seconds=0.3
    ) as server, raw_call(server, fake_agent, receive_buffer=4096) as (caller, agent, connection):
        connection.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        agent_socket = only_call(server).agent
        assert isinstance(agent_socket, AgentPeer)

        async def speak() -> None:
            while True:
                await agent.send_audio(b"\x55" * 32_000)

        speaking = asyncio.create_task(speak())
        # Writes to the caller stuck, so reading from it paused (no pong could go out); and for good once
        # a megabyte of speech waits behind them, so that the bridge stops reading the agent too.
        await eventually(
            lambda: not connection.transport.is_reading() and not agent_socket.transport.is_reading(),
            10,
            "the bridge to stop reading the caller, and then the agent",
        )
        speaking.cancel()
        await asyncio.gather(speaking, return_exceptions=True)
        assert caller.writer is not None
        caller.writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
        await eventually(lambda: not server.calls, 5, "the call to end")
        assert call_record(tmp_path / "calls", "CAraw")[-1]["ended_by"] == "caller hung up"  # not "stopped reading"
