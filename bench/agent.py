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

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from .frames import FILLS, FRAME, HDR, HEADER, MAGIC_DOWN, MAGIC_UP, StreamChecker
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
    def __init__(self, run: Run, ws: ServerConnection):
        self.run = run
        self.ws = ws
        self.call: Call | None = None
        self.up: StreamChecker | None = None
        self.script: asyncio.Task | None = None
        self.fc_pending: dict[str, tuple[int, asyncio.Future]] = {}
        self.odd_sizes = 0  # audio messages not of INBOUND_BUFFER_BYTES (one, the flush at stop, is fine)
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
        await ws.send('{"type":"AgentStartedSpeaking","total_latency":0.4,"tts_latency":0.1,'
                      '"ttt_latency":0.3}')
        await ws.send(json.dumps({"type": "ConversationText", "role": "assistant", "content": words}))
        sent = 0
        while sent < total:
            chunk = tts.take(min(rng.randint(240, 2400), total - sent))
            await ws.send(chunk)
            sent += len(chunk)
            call.down_sent += len(chunk)
            if barge_at is not None and sent >= barge_at:
                call.uss_sent.append(_monotonic_ns())
                await ws.send('{"type":"UserStartedSpeaking"}')
                call.counts["uss"] += 1
                return
            await asyncio.sleep(len(chunk) / 8000 / TTS_SPEED)
        await ws.send('{"type":"AgentAudioDone"}')
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
        await self.ws.send(msg)
        try:
            await asyncio.wait_for(asyncio.shield(fut), FC_WAIT)
        except asyncio.TimeoutError:
            call.counts["fc_slow"] += 1


class FakeAgent:
    def __init__(self, run: Run):
        self.run = run
        self.server = None
        self.port = 0
        self.connections = 0

    async def start(self) -> None:
        self.server = await serve(self.handler, "127.0.0.1", 0, compression=None, ping_interval=None,
                                  max_size=None)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        run = self.run
        if not ws.request.headers.get("Authorization", "").startswith("Token "):
            run.notes["agent: connection without Authorization: Token"] += 1
        if "permessage-deflate" in ws.request.headers.get("Sec-WebSocket-Extensions", ""):
            run.notes["agent: bridge offered compression"] += 1
        session = Session(run, ws)
        try:
            await ws.send(json.dumps({"type": "Welcome", "request_id": str(uuid.uuid4())}))
            settings = await ws.recv()
            if isinstance(settings, bytes) or json.loads(settings).get("type") != "Settings":
                run.notes["agent: first message was not Settings"] += 1
            # Anything arriving before SettingsApplied is read here: audio would be an error.
            deadline = asyncio.get_running_loop().time() + SETTINGS_DELAY
            early_audio = 0
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    msg = await asyncio.wait_for(ws.recv(), left)
                except asyncio.TimeoutError:
                    break
                if isinstance(msg, bytes):
                    early_audio += 1
                    session.on_audio(msg)
                else:
                    session.on_text(msg)
            if early_audio:
                session.note(f"{early_audio} audio messages before SettingsApplied")
            await ws.send('{"type":"SettingsApplied"}')
            async for msg in ws:
                if isinstance(msg, bytes):
                    session.on_audio(msg)
                else:
                    session.on_text(msg)
        except ConnectionClosed:
            pass
        finally:
            session.finish()
