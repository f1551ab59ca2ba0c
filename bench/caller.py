"""Simulated Twilio callers, cheap enough to drive hundreds of calls from one core.

The WebSocket client side is spoken directly: a client frame may use an all-zero
mask key, so every media message is a fixed header plus the JSON text, built
from a template and written without awaiting. Callers are spread over phases
of the 20 ms period; one timer per phase sends a frame for each of its calls.
Mark echoes are scheduled with `loop.call_later` from the audio queued so far.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
import time

from .frames import FILLS, FILLS_B64, FRAME, HEADER, MAGIC_UP, ws_frame_at
from .model import Call, Run

PERIOD = 0.020  # s between a call's media frames
TAIL = 96  # bytes of the last, partial frame sent just before `stop`

_ZMASK = b"\x00\x00\x00\x00"
_monotonic_ns = time.monotonic_ns
_pack = HEADER.pack
_b64 = base64.b64encode


def ws_frame(data: bytes, opcode: int = 0x1) -> bytes:
    """One final, masked (with an all-zero key) client frame."""
    n = len(data)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0xFF)) + n.to_bytes(8, "big")
    return head + _ZMASK + data


_FILLS_B64_BYTES = [fill.encode() for fill in FILLS_B64]
# Header (FIN text, masked, 16-bit length, zero key) of a text frame of each size from 126 bytes
# (a media message is about 350).
_TEXT_HEAD_16 = [b"\x81\xfe" + n.to_bytes(2, "big") + _ZMASK if n >= 126 else b"" for n in range(2048)]

_MEDIA = ('{"event":"media","sequenceNumber":"%d","streamSid":"SID",'
          '"media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s"}}')


class Caller(asyncio.Protocol):
    """One simulated Twilio Media Stream."""

    def __init__(self, run: Run, call: Call, phases: list, host: str, port: int, opened: asyncio.Future):
        self.run = run
        self.call = call
        self.phases = phases
        self.host = host
        self.port = port
        self.opened = opened
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.handshaking = True
        self.rbuf = bytearray()
        self.fragments: list[bytes] | None = None
        self.msg_seq = 0  # Twilio sequenceNumber
        self.up_seq = 0  # frame sequence number (also Twilio chunk - 1)
        self.media_tmpl = _MEDIA.replace("SID", call.sid)
        self.media_tmpl_bytes = self.media_tmpl.encode()
        self.cid = call.cid
        # What the bridge's media messages to this call start and end with, for the exact fast path.
        self.media_prefix = ('{"event":"media","streamSid":%s,"media":{"payload":"' % json.dumps(call.sid)).encode()
        self.play_end = 0.0  # loop.time() at which queued audio finishes playing
        self.marks: collections.deque = collections.deque()  # (name, TimerHandle) not yet echoed
        self.sent_close = False
        self.rx_ns = 0

    # --- sending -----------------------------------------------------------------------------

    def send_text(self, text: str) -> None:
        self.transport.write(ws_frame(text.encode()))

    def send_event(self, event: str, **fields) -> None:
        self.msg_seq += 1
        msg = {"event": event, "sequenceNumber": str(self.msg_seq), "streamSid": self.call.sid}
        msg.update(fields)
        self.send_text(json.dumps(msg, separators=(",", ":")))

    def send_media(self) -> None:
        """The per-frame hot path: one template, one write, no await."""
        seq = self.up_seq
        self.up_seq = seq + 1
        self.msg_seq += 1
        payload = _b64(_pack(MAGIC_UP, self.cid, seq, _monotonic_ns())) + _FILLS_B64_BYTES[seq & 0xFF]
        data = self.media_tmpl_bytes % (self.msg_seq, seq + 1, seq * 20, payload)
        self.transport.write(_TEXT_HEAD_16[len(data)] + data)
        self.call.up_sent += FRAME

    def start(self) -> None:
        c = self.call
        self.send_text('{"event":"connected","protocol":"Call","version":"1.0.0"}')
        self.send_event("start", start={
            "streamSid": c.sid, "accountSid": "AC" + "0" * 32, "callSid": f"CA{c.cid:032x}",
            "tracks": ["inbound"], "customParameters": {"bench": "1"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}})
        self.phases[c.phase].calls.append(self)

    def hangup(self) -> None:
        """A last partial frame, `stop`, then close the WebSocket."""
        c = self.call
        if c.stopped or self.transport is None or self.transport.is_closing():
            return
        self._leave()
        seq = self.up_seq
        self.up_seq += 1
        tail = (_pack(MAGIC_UP, c.cid, seq, _monotonic_ns()) + FILLS[seq & 0xFF])[:TAIL]
        self.msg_seq += 1
        self.send_text(self.media_tmpl % (self.msg_seq, seq + 1, seq * 20, _b64(tail).decode()))
        c.up_sent += len(tail)
        self.send_event("stop", stop={"accountSid": "AC" + "0" * 32, "callSid": f"CA{c.cid:032x}"})
        c.stopped = True
        self.close()

    def _leave(self) -> None:
        """No more media frames, no more mark echoes."""
        try:
            self.phases[self.call.phase].calls.remove(self)
        except ValueError:
            pass
        for _, handle in self.marks:
            handle.cancel()
        self.marks.clear()

    def close(self) -> None:
        if not self.sent_close and self.transport is not None and not self.transport.is_closing():
            self.sent_close = True
            self.transport.write(ws_frame((1000).to_bytes(2, "big"), 0x8))

    # --- receiving ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((
            f"GET /twilio HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "User-Agent: TwilioProxy/1.1\r\n\r\n").encode())

    def connection_lost(self, exc) -> None:
        c = self.call
        c.caller_closed = True
        if not c.stopped:
            c.error("the bridge closed the Twilio socket before `stop`")
        self._leave()
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.rx_ns = _monotonic_ns()  # arrival time of everything in `data`
        buf = self.rbuf
        buf += data
        if self.handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[:buf.find(b"\r\n")])
            del buf[:end + 4]
            self.handshaking = False
            if status.split(b" ")[1:2] != [b"101"]:
                self.call.error(f"handshake refused: {status.decode(errors='replace')}")
                self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
                self.transport.close()
                return
            self.call.connected = True
            self.opened.set_result(None)
            self.start()
        off = 0
        while (found := ws_frame_at(buf, off)) is not None:
            b0, start, end = found
            if buf[off + 1] & 0x80:
                self.call.error("masked frame from the bridge")
                self.transport.close()
                return
            self.on_frame(b0, bytes(buf[start:end]))
            off = end
        if off:
            del buf[:off]

    def on_frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        fin = b0 & 0x80
        if opcode == 0x1 or opcode == 0x2 or opcode == 0x0:
            if opcode != 0x0:
                self.fragments = [payload] if not fin else None
                if opcode == 0x2:
                    self.call.error("binary frame sent to Twilio")
                    return
                if fin:
                    self.on_text(payload)
                return
            if self.fragments is None:
                self.call.error("stray continuation frame")
                return
            self.fragments.append(payload)
            if fin:
                text, self.fragments = b"".join(self.fragments), None
                self.on_text(text)
        elif opcode == 0x8:
            self.close()
            self.transport.close()
        elif opcode == 0x9:
            self.transport.write(ws_frame(payload, 0xA))

    def on_text(self, text: bytes) -> None:
        c = self.call
        prefix = self.media_prefix
        if text.startswith(prefix) and text.endswith(b'"}}'):
            # The bridge's own layout of a media message: exact, or the full parse below says why not.
            try:
                audio = base64.b64decode(text[len(prefix):-3], validate=True)
            except ValueError:
                pass
            else:
                self.on_audio(audio)
                return
        try:
            msg = json.loads(text)
            event = msg["event"]
        except (ValueError, KeyError, TypeError):
            c.error(f"unparsable message to Twilio: {text[:80]!r}")
            return
        if msg.get("streamSid") != c.sid:
            c.error(f"{event} with streamSid {msg.get('streamSid')!r}")
            return
        if event == "media":
            try:
                audio = base64.b64decode(msg["media"]["payload"], validate=True)
            except (KeyError, TypeError, ValueError):
                c.error("media without a valid base64 payload")
                return
            self.on_audio(audio)
        elif event == "mark":
            try:
                name = msg["mark"]["name"]
            except (KeyError, TypeError):
                c.error("mark without a name")
                return
            c.counts["marks"] += 1
            delay = max(0.0, self.play_end - self.loop.time())
            self.marks.append((name, self.loop.call_later(delay, self.echo_mark)))
        elif event == "clear":
            c.counts["clears"] += 1
            if c.uss_sent:
                t = c.uss_sent.popleft()
                if self.run.in_window(t):
                    self.run.clear.append(self.rx_ns - t)
            else:
                c.error("clear without UserStartedSpeaking")
            self.play_end = 0.0
            while self.marks:
                name, handle = self.marks.popleft()
                handle.cancel()
                self._send_mark(name)
        else:
            c.counts["other_" + str(event)] += 1

    def on_audio(self, audio: bytes) -> None:
        self.call.down.feed(audio, self.rx_ns)
        now = self.loop.time()
        self.play_end = max(now, self.play_end) + len(audio) / 8000
        self.call.counts["media_out"] += 1

    def echo_mark(self) -> None:
        if self.marks:
            name, _ = self.marks.popleft()
            self._send_mark(name)

    def _send_mark(self, name: str) -> None:
        if not self.call.stopped and not self.transport.is_closing():
            self.send_event("mark", mark={"name": name})
            self.call.counts["marks_echoed"] += 1


class Phase:
    """Sends one frame for each of its calls every 20 ms, at a fixed offset in the period."""

    def __init__(self, run: Run, first_at: float):
        self.run = run
        self.loop = asyncio.get_running_loop()
        self.calls: list[Caller] = []
        self.next_at = first_at
        self.handle = self.loop.call_at(first_at, self.tick)

    def tick(self) -> None:
        if self.run.in_window(_monotonic_ns()):
            self.run.tick_lag.append(int((self.loop.time() - self.next_at) * 1e9))
        for caller in self.calls:
            caller.send_media()
        self.next_at += PERIOD
        self.handle = self.loop.call_at(self.next_at, self.tick)

    def cancel(self) -> None:
        self.handle.cancel()
