"""Tagged audio frames and a stream checker shared by both ends of the benchmark.

Every 160-byte frame (20 ms of mulaw) starts with an 18-byte header:
magic (2 bytes: which direction), call id, sequence number, and the
`time.monotonic_ns()` at which the frame was handed to the socket. The other
142 bytes are one of 256 fixed patterns chosen by the sequence number, so a
dropped, repeated, reordered or corrupted byte anywhere shows up.

The far side feeds whatever bytes arrive, whatever the message boundaries, to a
`StreamChecker`, which reassembles frames, checks every byte, and samples the
latency of each frame when its header arrives.
"""

from __future__ import annotations

import base64
import struct
from array import array

FRAME = 160  # bytes: 20 ms of 8 kHz mulaw
HEADER = struct.Struct("<HIIQ")  # magic, call id, seq, send time (monotonic ns)
HDR = HEADER.size  # 18: a multiple of 3, so base64(header + fill) == b64(header) + b64(fill)
FILL_LEN = FRAME - HDR

MAGIC_UP = 0xB75E  # caller -> bridge -> agent
MAGIC_DOWN = 0xD0A7  # agent -> bridge -> caller

FILLS = [bytes((k * 7 + i * 13 + 1) & 0xFF for i in range(FILL_LEN)) for k in range(256)]
FILLS_B64 = [base64.b64encode(f).decode("ascii") for f in FILLS]

_pack = HEADER.pack
_unpack_from = HEADER.unpack_from


def ws_frame_at(buf: bytearray, off: int) -> tuple[int, int, int] | None:
    """(first header byte, payload start, frame end) of the WebSocket frame at ``off``, or None
    while it is incomplete. A masked frame's key is the 4 bytes before the payload."""
    n = len(buf) - off
    if n < 2:
        return None
    b1 = buf[off + 1]
    ln = b1 & 0x7F
    start = off + 2
    if ln == 126:
        if n < 4:
            return None
        ln = (buf[off + 2] << 8) | buf[off + 3]
        start += 2
    elif ln == 127:
        if n < 10:
            return None
        ln = int.from_bytes(buf[off + 2:off + 10], "big")
        start += 8
    if b1 & 0x80:
        start += 4
    end = start + ln
    return None if end > len(buf) else (buf[off], start, end)


def frame(magic: int, call_id: int, seq: int, t_ns: int) -> bytes:
    return _pack(magic, call_id, seq, t_ns) + FILLS[seq & 0xFF]


def frame_b64(magic: int, call_id: int, seq: int, t_ns: int) -> str:
    """base64 of `frame(...)`, with the 142 fixed bytes pre-encoded."""
    return base64.b64encode(_pack(magic, call_id, seq, t_ns)).decode("ascii") + FILLS_B64[seq & 0xFF]


class StreamChecker:
    """Reassembles one direction of one call and checks it byte for byte.

    `feed()` returns the send time of the frame holding the last byte fed (the
    frame that completed this message), or None if its header has not arrived.
    Per-frame latencies (arrival of the header minus its send time) whose send
    time falls inside [lo, hi] are appended to `samples`.
    """

    __slots__ = ("magic", "call_id", "buf", "seq", "nbytes", "error", "sampled", "last_t",
                 "samples", "lo", "hi")

    def __init__(self, magic: int, call_id: int | None, samples: array, lo: int = 0, hi: int = 0):
        self.magic = magic
        self.call_id = call_id  # None: learn it from the first header
        self.buf = bytearray()
        self.seq = 0  # next expected sequence number
        self.nbytes = 0
        self.error: str | None = None
        self.sampled = False  # latency of the frame at the head of buf already taken
        self.last_t = 0
        self.samples = samples
        self.lo = lo
        self.hi = hi

    def _fail(self, what: str, off: int = 0) -> None:
        if self.error is None:
            self.error = f"{what} at byte {self.nbytes - len(self.buf) + off} (frame seq {self.seq})"
        self.buf.clear()

    def _header(self, off: int, now: int) -> bool:
        magic, cid, seq, t = _unpack_from(self.buf, off)
        if magic != self.magic:
            self._fail(f"bad magic {magic:#x}", off)
            return False
        if self.call_id is None:
            self.call_id = cid
        elif cid != self.call_id:
            self._fail(f"audio of call {cid} in call {self.call_id}", off)
            return False
        if seq != self.seq:
            self._fail(f"sequence {seq}, expected {self.seq}", off)
            return False
        self.last_t = t
        if self.lo <= t <= self.hi:
            self.samples.append(now - t)
        self.sampled = True
        return True

    def feed(self, data: bytes, now: int) -> int | None:
        self.nbytes += len(data)
        if self.error is not None:
            return None
        buf = self.buf
        buf += data
        n = len(buf)
        off = 0
        while n - off >= HDR:
            if not self.sampled and not self._header(off, now):
                return None
            if n - off < FRAME:
                break
            if buf[off + HDR:off + FRAME] != FILLS[self.seq & 0xFF]:
                self._fail("corrupted frame body", off)
                return None
            self.seq += 1
            self.sampled = False
            off += FRAME
        if off:
            del buf[:off]
        if 0 < len(buf) < HDR:
            return None
        return self.last_t

    def finish(self) -> None:
        """The stream ended: a trailing partial frame must be a true prefix of the next frame."""
        buf = self.buf
        n = len(buf)
        if self.error is not None or not n:
            return
        cid = self.call_id if self.call_id is not None else _unpack_from(buf.ljust(HDR, b"\0"))[1]
        expect = frame(self.magic, cid, self.seq, 0)
        k = min(n, 10)  # magic, call id and seq; the send time (bytes 10-17) is not known here
        if buf[:k] != expect[:k] or (n > HDR and buf[HDR:] != expect[HDR:n]):
            self._fail("bad trailing partial frame")
