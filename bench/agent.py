"""A fake Deepgram Voice Agent on loopback.

Per connection: check the Authorization header, send Welcome, take Settings,
answer SettingsApplied after a short delay (audio the bridge sends before that
is a protocol error), then learn which call it serves from the call id in the
first audio frame. From then on it checks every caller byte and plays a script
until the window ends: TTS utterances faster than real time in chunks of
random size, barge-ins (UserStartedSpeaking in the middle of an utterance)
and `get_drug_info` function calls.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

from websockets.exceptions import ConnectionClosed
from websockets.frames import apply_mask
from websockets.utils import accept_key

from .frames import FILLS, FRAME, HDR, HEADER, MAGIC_DOWN, MAGIC_UP, StreamChecker, ws_frame_at
from .model import Call, Run

TTS_SPEED = 4.0  # TTS is sent this many times faster than real time
SETTINGS_DELAY = 0.1  # s between Settings and SettingsApplied
FC_WAIT = 5.0  # s the script waits for a FunctionCallResponse before it goes on (a late one still counts)
DRUGS = ["ibuprofen", "amoxicillin", "metformin", "lisinopril", "atorvastatin"]

_monotonic_ns = time.monotonic_ns


def _is_json_text(content: object) -> bool:
    """FunctionCallResponse.content must be a string; the bridge puts a JSON document in it."""
    if not isinstance(content, str):
        return False
    try:
        json.loads(content)
    except ValueError:
        return False
    return True


class TtsStream:
    """The agent's audio for one call: an endless run of tagged frames, cut anywhere."""

    def __init__(self, cid: int):
        self.cid = cid
        self.seq = 0
        self.pos = 0
        self.buf = bytearray()

    def take(self, size: int) -> bytes:
        # Never end a chunk inside a frame header: a frame's send time is the time its header goes.
        into = (self.pos + size) % FRAME
        if 0 < into < HDR:
            size += HDR - into
        now = _monotonic_ns()
        buf = self.buf
        while len(buf) < size:
            buf += HEADER.pack(MAGIC_DOWN, self.cid, self.seq, now) + FILLS[self.seq & 0xFF]
            self.seq += 1
        out = bytes(buf[:size])
        del buf[:size]
        self.pos += size
        return out


class Session:
    def __init__(self, run: Run, ws: AgentSocket):
        self.run = run
        self.ws = ws
        self.call: Call | None = None
        self.up: StreamChecker | None = None
        self.script: asyncio.Task | None = None
        self.fc_pending: dict[str, tuple[int, asyncio.Future]] = {}
        self.odd_sizes = 0  # audio messages not of INBOUND_CHUNK_BYTES (one, the flush at stop, is fine)
        self.last_odd = False

    def note(self, what: str) -> None:
        if self.call is not None:
            self.call.error(what)
        else:
            self.run.notes["agent: " + what] += 1

    # --- from the bridge --------------------------------------------------------------------

    def on_audio(self, data: bytes) -> None:
        now = _monotonic_ns()
        run = self.run
        if self.call is None:
            if len(data) < HDR:
                self.note("first audio message shorter than a frame header")
                return
            magic, cid, _, _ = HEADER.unpack_from(data)
            call = run.calls.get(cid)
            if magic != MAGIC_UP or call is None or call.agent_seen:
                self.note(f"audio of unknown or taken call {cid}")
                return
            call.agent_seen = True
            self.call = call
            self.up = call.up = StreamChecker(MAGIC_UP, cid, run.up_incl, run.plan.lo, run.plan.hi)
            self.script = asyncio.get_running_loop().create_task(self.play(random.Random(cid)))
        t = self.up.feed(data, now)
        if len(data) == run.buffer_bytes:
            self.last_odd = False
            if t is not None and run.plan.lo <= t <= run.plan.hi:
                run.up_excl.append(now - t)
        else:
            self.odd_sizes += 1
            self.last_odd = True

    def on_text(self, text: str) -> None:
        try:
            msg = json.loads(text)
            kind = msg["type"]
        except (ValueError, KeyError, TypeError):
            self.note(f"unparsable text to agent: {text[:80]!r}")
            return
        if kind == "FunctionCallResponse":
            now = _monotonic_ns()
            entry = self.fc_pending.pop(msg.get("id"), None)
            if entry is None:
                self.note(f"FunctionCallResponse for unknown id {msg.get('id')!r}")
                return
            t0, fut = entry
            if msg.get("name") != "get_drug_info" or not _is_json_text(msg.get("content")):
                self.note(f"bad FunctionCallResponse {text[:120]}")
            if self.run.in_window(t0):
                self.run.fc.append(now - t0)
            if not fut.done():
                fut.set_result(None)
            self.count("fc_responses")
        elif kind == "KeepAlive":
            self.count("keepalives")
        else:
            self.count("agent_got_" + str(kind))

    def count(self, what: str) -> None:
        if self.call is not None:
            self.call.counts[what] += 1
        else:
            self.run.notes["agent: " + what] += 1

    def finish(self) -> None:
        if self.script is not None:
            self.script.cancel()
        for _, fut in self.fc_pending.values():
            fut.cancel()
        if self.call is None:
            return
        for fid in self.fc_pending:
            self.call.error(f"no FunctionCallResponse for {fid} before the call ended")
        self.call.agent_closed = True
        self.up.finish()
        if self.odd_sizes > 1 or (self.odd_sizes == 1 and not self.last_odd):
            self.call.error(f"{self.odd_sizes} audio messages to the agent not of "
                            f"{self.run.buffer_bytes} bytes before the end")

    # --- to the bridge ----------------------------------------------------------------------

    async def play(self, rng: random.Random) -> None:
        """The agent's side of the conversation, until the measuring window ends."""
        tts = TtsStream(self.call.cid)
        try:
            await asyncio.sleep(rng.uniform(0.1, 0.6))
            await self.speak(tts, rng, rng.uniform(1.5, 2.5), "Hello, this is the pharmacy.")
            act = rng.randrange(3)
            while True:
                await asyncio.sleep(rng.uniform(1.0, 2.5))  # the caller talks
                if _monotonic_ns() >= self.run.plan.hi:
                    return
                act = (act + 1) % 3
                if act == 0:
                    await self.speak(tts, rng, rng.uniform(1.5, 3.0), "Anything else?")
                elif act == 1:
                    await self.speak(tts, rng, 3.0, "Let me tell you about...", barge=rng.uniform(0.3, 0.6))
                else:
                    await self.function_call(rng)
                    await self.speak(tts, rng, rng.uniform(1.0, 2.0), "Here is what I found.")
        except ConnectionClosed:
            pass

    async def speak(self, tts: TtsStream, rng: random.Random, seconds: float, words: str,
                    barge: float | None = None) -> None:
        ws = self.ws
        call = self.call
        total = int(seconds * 8000)
        barge_at = int(total * barge) if barge else None
        ws.send('{"type":"AgentStartedSpeaking","total_latency":0.4,"tts_latency":0.1,'
                      '"ttt_latency":0.3}')
        ws.send(json.dumps({"type": "ConversationText", "role": "assistant", "content": words}))
        sent = 0
        while sent < total:
            chunk = tts.take(min(rng.randint(240, 2400), total - sent))
            ws.send(chunk)
            sent += len(chunk)
            call.down_sent += len(chunk)
            if barge_at is not None and sent >= barge_at:
                call.uss_sent.append(_monotonic_ns())
                ws.send('{"type":"UserStartedSpeaking"}')
                call.counts["user_started_speaking"] += 1
                return
            await asyncio.sleep(len(chunk) / 8000 / TTS_SPEED)
        ws.send('{"type":"AgentAudioDone"}')
        call.counts["audio_done"] += 1

    async def function_call(self, rng: random.Random) -> None:
        call = self.call
        call.counts["fc_requests"] += 1
        fid = f"fc-{call.cid}-{call.counts['fc_requests']}"
        fut = asyncio.get_running_loop().create_future()
        msg = json.dumps({"type": "FunctionCallRequest", "functions": [{
            "id": fid, "name": "get_drug_info",
            "arguments": json.dumps({"drug_name": rng.choice(DRUGS)}), "client_side": True}]})
        self.fc_pending[fid] = (_monotonic_ns(), fut)
        self.ws.send(msg)
        try:
            await asyncio.wait_for(asyncio.shield(fut), FC_WAIT)
        except asyncio.TimeoutError:
            call.counts["fc_slow"] += 1


class AgentSocket(asyncio.Protocol):
    """The server side of one agent WebSocket, spoken directly: the handshake, then frames.

    websockets' server costs about as much per message as the bridge does; the generator shares
    one core with the fake agent, so both speak the framing themselves. Frames to the bridge are
    unmasked (server frames); frames from it must be masked, and are unmasked here.
    """

    def __init__(self, agent: "FakeAgent"):
        self.agent = agent
        self.run = agent.run
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.handshaking = True
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = 0
        self.session: Session | None = None
        self.stage = "settings"  # then "early" (Settings taken, SettingsApplied not yet sent), "live"
        self.early_audio = 0
        self.closed = False

    # --- sending -----------------------------------------------------------------------------

    def send(self, message: str | bytes) -> None:
        """One unmasked frame; raises ConnectionClosed once the connection is going."""
        if self.closed:
            raise ConnectionClosed(None, None)
        if type(message) is str:
            data, first = message.encode(), 0x81
        else:
            data, first = message, 0x82
        n = len(data)
        if n < 126:
            head = bytes((first, n))
        elif n < 65536:
            head = bytes((first, 126)) + n.to_bytes(2, "big")
        else:
            head = bytes((first, 127)) + n.to_bytes(8, "big")
        self.transport.write(head + data)

    def close(self, code: int = 1000) -> None:
        if not self.closed:
            self.closed = True
            self.transport.write(b"\x88\x02" + code.to_bytes(2, "big"))
            self.transport.close()

    # --- receiving ---------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.agent.connections += 1

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.session is not None:
            self.session.finish()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.handshaking:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            request = bytes(buf[:end]).decode("latin-1")
            del buf[:end + 4]
            self.handshaking = False
            if not self.handshake(request):
                return
        off = 0
        while not self.closed and (found := ws_frame_at(buf, off)) is not None:
            b0, start, end = found
            if not buf[off + 1] & 0x80:
                self.note("unmasked frame from the bridge")
                self.close(1002)
                return
            self.on_frame(b0, apply_mask(bytes(buf[start:end]), bytes(buf[start - 4:start])))
            off = end
        if off:
            del buf[:off]

    def handshake(self, request: str) -> bool:
        lines = request.split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        key = headers.get("sec-websocket-key")
        if not lines[0].startswith("GET ") or key is None:
            self.note("not a WebSocket handshake")
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()
            self.closed = True
            return False
        if not headers.get("authorization", "").startswith("Token "):
            self.note("connection without Authorization: Token")
        if "permessage-deflate" in headers.get("sec-websocket-extensions", ""):
            self.note("bridge offered compression")
        accept = accept_key(key)
        self.transport.write((
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
        self.session = Session(self.run, self)
        self.send(json.dumps({"type": "Welcome", "request_id": str(uuid.uuid4())}))
        return True

    def note(self, what: str) -> None:
        self.run.notes["agent: " + what] += 1

    def on_frame(self, b0: int, payload: bytes) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x8:
            self.close()
            return
        if opcode == 0x9:
            self.transport.write(bytes((0x8A, len(payload))) + payload)
            return
        if opcode == 0xA:
            return
        if opcode == 0x0:
            if self.fragments is None:
                self.note("stray continuation frame")
                return
            self.fragments.append(payload)
            if not b0 & 0x80:
                return
            opcode, payload, self.fragments = self.fragment_opcode, b"".join(self.fragments), None
        elif not b0 & 0x80:
            self.fragments, self.fragment_opcode = [payload], opcode
            return
        if opcode == 0x1:
            self.on_message(payload.decode())
        elif opcode == 0x2:
            self.on_message(payload)
        else:
            self.note(f"unknown opcode {opcode}")

    def on_message(self, msg: str | bytes) -> None:
        session = self.session
        if self.stage == "live":
            if type(msg) is bytes:
                session.on_audio(msg)
            else:
                session.on_text(msg)
        elif self.stage == "settings":
            try:
                is_settings = type(msg) is str and json.loads(msg).get("type") == "Settings"
            except ValueError:
                is_settings = False
            if not is_settings:
                self.note("first message was not Settings")
            self.stage = "early"
            asyncio.get_running_loop().call_later(SETTINGS_DELAY, self.settings_applied)
        else:  # "early": anything arriving before SettingsApplied is read; audio would be an error
            if type(msg) is bytes:
                self.early_audio += 1
                session.on_audio(msg)
            else:
                session.on_text(msg)

    def settings_applied(self) -> None:
        if self.closed:
            return
        if self.early_audio:
            self.session.note(f"{self.early_audio} audio messages before SettingsApplied")
        self.stage = "live"
        self.send('{"type":"SettingsApplied"}')


class FakeAgent:
    def __init__(self, run: Run):
        self.run = run
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: AgentSocket(self), "127.0.0.1", 0, backlog=1024)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
