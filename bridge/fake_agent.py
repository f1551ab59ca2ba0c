"""A FAKE Deepgram Voice Agent, to try the bridge and the browser phone without a Deepgram key.

    python -m bridge.fake_agent [--host 127.0.0.1] [--port 8765] [--voice auto|speech|chime]

Then run the bridge with ``DEEPGRAM_AGENT_URL=ws://127.0.0.1:8765`` and any ``DEEPGRAM_API_KEY``
(``local-fake``): the README's "Try it without a Deepgram key" says how. This is not Deepgram and
not an AI: it has no speech recognition, no LLM and no real voice. It speaks the Voice Agent API
v1 wire protocol (docs/protocols.md sections 5 and 6) faithfully enough for the bridge: Welcome,
Settings then SettingsApplied, mulaw 8 kHz audio both ways in binary frames, ConversationText,
History, UserStartedSpeaking, AgentStartedSpeaking, AgentAudioDone, LatencyReport, client-side
FunctionCallRequest (arguments as JSON text) and the FunctionCallResponse that answers it,
KeepAlive, InjectAgentMessage (spoken, or InjectionRefused while the caller speaks),
InjectUserMessage, ForceEndTurn, the Update* messages, Warning and Error, and Deepgram's close
after about 10 s without audio or KeepAlive.

What it does:

- **Greets** the caller with a scripted line that explains the rest.
- **Echoes turns.** It can't hear words, so it finds the caller's turn by the audio's energy:
  speech, then 0.8 s of silence. It answers by playing the caller's own audio back, byte for
  byte, with ConversationText saying what happened: the caller "(you spoke for 2.3 s)", the agent
  "Here is what you said."
- **Runs a keypad menu**, since keypad digits reach it as text (the bridge injects "The caller
  pressed 1"): 1 asks the bridge to run ``get_drug_info`` for Ibuprofen, 2 ``place_order``
  (one pack of Ibuprofen), 3 ``lookup_order`` for the last order placed in this call, 9 or # calls
  ``end_call`` and says goodbye; any other key hears the menu. It says each function's result.

Its lines are spoken by espeak-ng when that is installed (resampled to 8 kHz by sox when present,
otherwise here), else each is a short chime and the words are in the transcript (the browser
phone shows it); the startup line says which. It ignores the Authorization header, and says so.

Built like the bridge: ``FakeConversation`` is one session's rules with no I/O (messages and
audio in, with the time; actions out), ``FakeAgentServer`` is the asyncio shell around it. Only
the standard library and websockets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import logging
import math
import re
import shutil
import signal
import sys
import tempfile
import uuid
import wave
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .logsafe import clean, counted

logger = logging.getLogger("bridge.fake_agent")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
RATE = 8000  # mulaw samples a second, one byte each: the only audio format this fake speaks
WINDOW = 160  # bytes: the 20 ms the turn detector judges at a time
SPEECH_RMS = 0.01  # a window at least this loud (-40 dBFS) is speech; a phone line's hiss is far below
ONSET_WINDOWS = 3  # loud windows (60 ms) before the caller counts as speaking: a click doesn't
END_OF_TURN_WINDOWS = 40  # 0.8 s of quiet ends the caller's turn
MIN_TURN_BYTES = RATE // 5  # a turn shorter than 0.2 s (a cough) gets no answer
MAX_TURN_BYTES = 30 * RATE  # a 30 s monologue is answered then; the turn's audio never grows past it
SETTINGS_TIMEOUT_SECONDS = 10.0  # Welcome to Settings
IDLE_TIMEOUT_SECONDS = 10.0  # no audio and no KeepAlive this long: Deepgram ends the session
SEND_TIMEOUT_SECONDS = 10.0  # a client that doesn't read for this long is dropped
MAX_MESSAGE_BYTES = 1 << 20
MAX_PENDING_ACTIONS = 64  # what waits to be sent to one client; past it the client isn't reading
MAX_SESSIONS = 32
MAX_SPOKEN_CHARS = 240  # a function's result is cut to this before it is spoken
AUDIO_CHUNK = 1600  # bytes per binary frame of agent audio (200 ms); Deepgram's vary
SYNTHESIS_TIMEOUT_SECONDS = 10.0
SPOKEN_LINES_CACHED = 32

# Keypad digits reach an agent as text: the bridge injects "The caller pressed 1" (or "... pound").
KEYPAD = re.compile(r"The caller pressed (\S+)")
# The keypad menu: the keys (as the bridge words them), the function each runs, how it is offered.
MENU = (
    (("1",), "get_drug_info", "for drug information, press 1"),
    (("2",), "place_order", "to order Ibuprofen, press 2"),
    (("3",), "lookup_order", "to look up that order, press 3"),
    (("9", "pound"), "end_call", "to hang up, press 9 or pound"),
)
MENU_ARGUMENTS: dict[str, dict[str, Any]] = {
    "get_drug_info": {"drug_name": "Ibuprofen"},
    "place_order": {"customer_name": "Fake Agent Caller", "drug_name": "Ibuprofen", "quantity": 1},
    "end_call": {},
}  # lookup_order's is the last order placed in the call


def menu(functions: frozenset[str]) -> str:
    """The keypad menu, offering only what the agent's Settings gave it functions for."""
    offers = [offer for _, name, offer in MENU if name in functions]
    return f"On the keypad: {'; '.join(offers)}." if offers else "This agent has no functions to try on the keypad."


def greeting(functions: frozenset[str]) -> str:
    """The scripted greeting: what this is, and the menu."""
    return (
        "Hello! This is the fake agent, for trying the bridge without Deepgram. I can't understand words: "
        f"say something, pause, and I'll play it back to you. {menu(functions)}"
    )


# ------------------------------------------------------------------------------------- mulaw


def _mulaw_to_linear(byte: int) -> int:
    """G.711 mu-law decoding of one byte to a 16-bit sample."""
    u = ~byte & 0xFF
    magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
    return -magnitude if u & 0x80 else magnitude


MULAW_ENERGY = [_mulaw_to_linear(b) ** 2 for b in range(256)]  # each byte's sample, squared
SPEECH_WINDOW_ENERGY = (SPEECH_RMS * 32768) ** 2 * WINDOW


def mulaw_encode(samples: Sequence[float]) -> bytes:
    """G.711 mu-law encoding of samples in -1..1 (the standard library's audioop is gone in 3.13)."""
    out = bytearray(len(samples))
    for index, x in enumerate(samples):
        s = max(-32768, min(32767, round(x * 32767)))
        sign = 0x80 if s < 0 else 0
        s = min(-s if sign else s, 32635) + 0x84
        exponent = (s >> 7).bit_length() - 1  # s >= 0x84, so at least 0
        out[index] = ~(sign | (exponent << 4) | ((s >> (exponent + 3)) & 0x0F)) & 0xFF
    return bytes(out)


def chime() -> bytes:
    """A short two-note chime (0.4 s), the voice of every line when there is no speech synthesiser."""
    samples: list[float] = []
    for frequency, seconds in ((880.0, 0.14), (1318.5, 0.26)):
        for i in range(int(RATE * seconds)):
            t = i / RATE
            envelope = min(1.0, t / 0.005) * math.exp(-t * 9)
            samples.append(0.3 * envelope * math.sin(2 * math.pi * frequency * t))
    return mulaw_encode(samples)


CHIME = chime()


def wav_to_mulaw(data: bytes) -> bytes:
    """A 16-bit mono WAV (espeak-ng writes 22050 Hz) as 8 kHz mulaw.

    Windowed-sinc resampling, band-limited below 3.6 kHz so nothing above 4 kHz folds back in.
    """
    with wave.open(io.BytesIO(data), "rb") as reader:
        if reader.getsampwidth() != 2 or reader.getnchannels() != 1:
            raise ValueError("expected a 16-bit mono WAV")
        rate = reader.getframerate()
        frames = reader.readframes(reader.getnframes())
    pcm = memoryview(frames).cast("h")
    half = 16  # taps each side
    cutoff = min(3600, 0.45 * rate) / rate  # cycles per input sample
    padded = [0.0] * half + [v / 32768 for v in pcm] + [0.0] * half
    step = rate / RATE
    out = []
    position = 0.0
    kernels: dict[int, list[float]] = {}
    while position < len(pcm):
        base = int(position)
        phase = round((position - base) * 64)  # 64 sub-sample phases are plenty for speech
        kernel = kernels.get(phase)
        if kernel is None:
            kernel = kernels[phase] = _kernel(phase / 64, half, cutoff)
        window = padded[base + 1 : base + 1 + 2 * half]
        out.append(sum(k * v for k, v in zip(kernel, window)))
        position += step
    return mulaw_encode(out)


def _kernel(fraction: float, half: int, cutoff: float) -> list[float]:
    """Low-pass taps for input samples ``base - half + 1 .. base + half`` at ``base + fraction``."""
    taps = []
    for j in range(2 * half):
        distance = (j - half + 1) - fraction
        x = 2 * cutoff * distance
        sinc = 1.0 if abs(x) < 1e-9 else math.sin(math.pi * x) / (math.pi * x)
        hann = 0.5 + 0.5 * math.cos(math.pi * distance / half) if abs(distance) < half else 0.0
        taps.append(2 * cutoff * sinc * hann)
    total = sum(taps)
    return [tap / total for tap in taps]


# ------------------------------------------------------------------------- one session's rules


@dataclass(frozen=True, slots=True)
class SendMessage:
    """A JSON text frame to the client."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Say:
    """An agent turn: the shell gives ``text`` a voice (unless ``audio`` is given) and sends
    AgentStartedSpeaking, ConversationText (and History if ``history``), the audio, AgentAudioDone
    and a LatencyReport, in that order. ``since`` is when what it answers happened (the clock the
    conversation is given), for the latency figures."""

    text: str
    audio: bytes | None
    since: float
    history: bool


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


Action = SendMessage | Say | Close


def error(code: str, description: str) -> SendMessage:
    return SendMessage({"type": "Error", "description": description, "code": code})


def warning(code: str, description: str) -> SendMessage:
    return SendMessage({"type": "Warning", "description": description, "code": code})


UPDATE_ANSWERS = {
    "UpdatePrompt": "PromptUpdated",
    "UpdateSpeak": "SpeakUpdated",
    "UpdateThink": "ThinkUpdated",
    "UpdateListen": "ListenUpdated",
}


class FakeConversation:
    """One fake agent session, with no I/O: each method takes what arrived and the time, and
    returns what to send. ``deadline`` is when ``timed_out`` must be called if nothing arrives."""

    def __init__(self, now: float) -> None:
        self.request_id = str(uuid.uuid4())
        self.stage = "settings"  # then "ready", then "closed"
        self.functions: frozenset[str] = frozenset()
        self.history = True  # Settings' flags.history, on unless turned off
        self.deadline = now + SETTINGS_TIMEOUT_SECONDS
        self.pending_calls: dict[str, tuple[str, str]] = {}  # id -> (name, arguments) asked of the client
        self.last_order_id: str | None = None
        self.turns = 0
        self._call_ids = itertools.count(1)
        self._carry = b""  # caller audio short of a whole window
        self._turn: bytearray | None = None  # the caller's audio since their turn began
        self._loud_windows = 0
        self._speech_end = 0  # bytes of ``_turn`` up to the end of its last loud window
        self._quiet_windows = 0
        self._speaking = False  # UserStartedSpeaking was sent for this turn

    @property
    def closed(self) -> bool:
        return self.stage == "closed"

    def start(self) -> list[Action]:
        return [SendMessage({"type": "Welcome", "request_id": self.request_id})]

    def timed_out(self, now: float) -> list[Action]:
        if self.stage == "settings":
            return self._fail("SETTINGS_TIMEOUT", "no Settings message within 10 seconds of Welcome")
        return self._fail(
            "CLIENT_MESSAGE_TIMEOUT", "no audio or KeepAlive for 10 seconds; closing the session, as Deepgram does"
        )

    # ------------------------------------------------------------------ text frames

    def text(self, frame: str, now: float) -> list[Action]:
        if self.closed:
            return []
        try:
            message = json.loads(frame)
        except (json.JSONDecodeError, RecursionError):
            message = None
        kind = message.get("type") if isinstance(message, dict) else None
        if not isinstance(kind, str):
            return self._fail("UNPARSABLE_CLIENT_MESSAGE", "a text frame that is not a JSON object with a type")
        assert isinstance(message, dict)
        if self.stage == "settings":
            if kind != "Settings":
                return self._fail("SETTINGS_REQUIRED", f"the first message must be Settings, not {kind[:40]}")
            return self._settings(message, now)
        self.deadline = now + IDLE_TIMEOUT_SECONDS
        if kind == "KeepAlive":
            return []
        if kind == "InjectUserMessage":
            return self._user_message(message.get("content"), now)
        if kind == "InjectAgentMessage":
            return self._agent_message(message.get("message"), now)
        if kind == "FunctionCallResponse":
            return self._function_answer(message, now)
        if kind == "ForceEndTurn":
            return self._end_turn(now) if self._turn is not None else []
        if kind in UPDATE_ANSWERS:
            if kind == "UpdateThink":
                self.functions = _function_names(message.get("think"))
            return [SendMessage({"type": UPDATE_ANSWERS[kind]})]
        if kind == "Settings":
            return [warning("SETTINGS_ALREADY_APPLIED", "Settings can be sent only once; this one was ignored")]
        return self._fail("UNPARSABLE_CLIENT_MESSAGE", f"unknown message type {kind[:40]}")

    def _settings(self, settings: dict[str, Any], now: float) -> list[Action]:
        audio = settings.get("audio") if isinstance(settings.get("audio"), dict) else {}
        wanted = {"encoding": "mulaw", "sample_rate": RATE}
        for side in ("input", "output"):
            given = audio.get(side) if isinstance(audio.get(side), dict) else {}
            if any(given.get(key) != value for key, value in wanted.items()) or given.get("container", "none") != "none":
                return self._fail(
                    "UNSUPPORTED_AUDIO", f"the fake agent speaks only mulaw at 8000 Hz with no container (audio.{side})"
                )
        agent = settings.get("agent") if isinstance(settings.get("agent"), dict) else {}
        self.functions = _function_names(agent.get("think"))
        flags = settings.get("flags")
        self.history = not (isinstance(flags, dict) and flags.get("history") is False)
        self.stage = "ready"
        self.deadline = now + IDLE_TIMEOUT_SECONDS
        return [SendMessage({"type": "SettingsApplied"}), self._say(greeting(self.functions), now)]

    def _user_message(self, content: object, now: float) -> list[Action]:
        if not isinstance(content, str) or not content:
            return [warning("INVALID_INJECTION", "InjectUserMessage needs a content string")]
        actions = self._conversation("user", content)
        key = KEYPAD.match(content)
        if key is None:
            # Typed text, not a key: the fake can't answer words either, but it can read them back.
            return actions + [self._say(f"You wrote: {content[:MAX_SPOKEN_CHARS]}", now)]
        return actions + self._menu(key.group(1), now)

    def _menu(self, key: str, now: float) -> list[Action]:
        name = next((name for keys, name, _ in MENU if key in keys), None)
        if name is None:
            return [self._say(menu(self.functions), now)]
        if name not in self.functions:
            return [self._say(f"This agent has no {name} function.", now)]
        if name == "end_call":
            # The request first, then the goodbye: the bridge hangs up once the goodbye has been heard.
            return [self._call(name, MENU_ARGUMENTS[name]), self._say("Goodbye!", now)]
        if name == "lookup_order":
            if self.last_order_id is None:
                return [self._say("There is no order to look up yet: press 2 to place one first.", now)]
            return [self._call(name, {"order_id": self.last_order_id})]
        return [self._call(name, MENU_ARGUMENTS[name])]

    def _call(self, name: str, arguments: dict[str, Any]) -> SendMessage:
        call_id = f"fake-call-{next(self._call_ids)}"
        encoded = json.dumps(arguments)
        self.pending_calls[call_id] = (name, encoded)
        return SendMessage(
            {
                "type": "FunctionCallRequest",
                "functions": [{"id": call_id, "name": name, "arguments": encoded, "client_side": True}],
            }
        )

    def _function_answer(self, message: dict[str, Any], now: float) -> list[Action]:
        call_id, content = message.get("id"), message.get("content")
        asked = self.pending_calls.pop(call_id, None) if isinstance(call_id, str) else None
        if asked is None:
            return [warning("UNKNOWN_FUNCTION_CALL", "a FunctionCallResponse whose id was never asked for")]
        name, arguments = asked
        if not isinstance(content, str):
            return [warning("INVALID_FUNCTION_RESPONSE", "a FunctionCallResponse whose content is not a string")]
        actions: list[Action] = []
        if self.history:
            item = {"id": call_id, "name": name, "client_side": True, "arguments": arguments, "response": content}
            actions.append(SendMessage({"type": "History", "function_calls": [item]}))
        if name == "end_call":
            return actions  # the goodbye was said with the request
        result = _json_or_text(content)
        if name == "place_order" and isinstance(result, dict) and result.get("order_id") is not None:
            self.last_order_id = str(result["order_id"])
        return actions + [self._say(spoken_result(name, result), now)]

    def _agent_message(self, text: object, now: float) -> list[Action]:
        if not isinstance(text, str) or not text:
            return [warning("INVALID_INJECTION", "InjectAgentMessage needs a message string")]
        if self._speaking:
            return [SendMessage({"type": "InjectionRefused", "message": "the user is speaking"})]
        return [self._say(text[:MAX_SPOKEN_CHARS], now)]

    # ------------------------------------------------------------------ caller audio

    def audio(self, data: bytes, now: float) -> list[Action]:
        """Caller audio: find where their turns begin and end (by energy, 20 ms at a time)."""
        if self.stage != "ready":
            return []  # before SettingsApplied the bridge sends none; anything else is dropped
        self.deadline = now + IDLE_TIMEOUT_SECONDS
        data = self._carry + data
        usable = len(data) - len(data) % WINDOW
        self._carry = data[usable:]
        actions: list[Action] = []
        for start in range(0, usable, WINDOW):
            actions += self._window(data[start : start + WINDOW], now)
        return actions

    def _window(self, window: bytes, now: float) -> list[Action]:
        loud = sum(MULAW_ENERGY[b] for b in window) >= SPEECH_WINDOW_ENERGY
        if self._turn is None:
            if not loud:
                return []
            self._turn, self._loud_windows, self._quiet_windows, self._speaking = bytearray(), 0, 0, False
        self._turn += window
        actions: list[Action] = []
        if loud:
            self._loud_windows += 1
            self._quiet_windows = 0
            self._speech_end = len(self._turn)
            if self._loud_windows == ONSET_WINDOWS:
                self._speaking = True
                actions.append(SendMessage({"type": "UserStartedSpeaking"}))
        else:
            self._quiet_windows += 1
            if not self._speaking and self._quiet_windows >= ONSET_WINDOWS:
                self._turn = None  # a click: not speech
                return []
        if self._quiet_windows >= END_OF_TURN_WINDOWS or len(self._turn) >= MAX_TURN_BYTES:
            actions += self._end_turn(now)
        return actions

    def _end_turn(self, now: float) -> list[Action]:
        assert self._turn is not None
        speech = bytes(self._turn[: self._speech_end])
        spoke = self._speaking
        self._turn, self._speaking = None, False
        if not spoke or len(speech) < MIN_TURN_BYTES:
            return []
        self.turns += 1
        actions = self._conversation("user", f"(you spoke for {len(speech) / RATE:.1f} s)")
        return actions + [Say("Here is what you said.", speech, now, self.history)]

    # ------------------------------------------------------------------ helpers

    def _say(self, text: str, now: float) -> Say:
        return Say(text, None, now, self.history)

    def _conversation(self, role: str, content: str) -> list[Action]:
        actions: list[Action] = [SendMessage({"type": "ConversationText", "role": role, "content": content})]
        if self.history:
            actions.append(SendMessage({"type": "History", "role": role, "content": content}))
        return actions

    def _fail(self, code: str, description: str) -> list[Action]:
        """Deepgram's way: an Error, then the session ends."""
        self.stage = "closed"
        return [error(code, description), Close(1000, code)]


def _function_names(think: object) -> frozenset[str]:
    """The function names in Settings' ``agent.think`` (one provider, or a list of fallbacks)."""
    names = set()
    for provider in think if isinstance(think, list) else [think]:
        functions = provider.get("functions") if isinstance(provider, dict) else None
        for function in functions if isinstance(functions, list) else []:
            if isinstance(function, dict) and isinstance(function.get("name"), str):
                names.add(function["name"])
    return frozenset(names)


def _json_or_text(content: str) -> Any:
    try:
        return json.loads(content)
    except (json.JSONDecodeError, RecursionError):
        return content


def spoken_result(name: str, result: Any) -> str:
    """A function's result as one line to say: its fields in order, cut to MAX_SPOKEN_CHARS."""
    if isinstance(result, dict) and "error" in result:
        text = f"{name} failed: {result['error']}"
    elif isinstance(result, dict):
        fields = [f"{key.replace('_', ' ')} {value}" for key, value in result.items() if not isinstance(value, dict | list)]
        text = f"{name} says: " + "; ".join(fields)
    else:
        text = f"{name} says: {result}"
    return text if len(text) <= MAX_SPOKEN_CHARS else text[: MAX_SPOKEN_CHARS - 1] + "…"


# ------------------------------------------------------------------------------------ voices


class ChimeVoice:
    """Every line is the same chime; the words are in the transcript."""

    description = "a chime for each line (espeak-ng is not installed; the words are in the transcript)"

    async def render(self, text: str) -> bytes:
        return CHIME


class SpeechVoice:
    """espeak-ng speech at 8 kHz mulaw: resampled by sox if given, else by ``wav_to_mulaw``."""

    def __init__(self, espeak: str, sox: str | None) -> None:
        self.espeak = espeak
        self.sox = sox
        self.description = f"espeak-ng speech ({'sox' if sox else 'resampled here'})"
        self._cache: OrderedDict[str, bytes] = OrderedDict()

    async def render(self, text: str) -> bytes:
        cached = self._cache.get(text)
        if cached is not None:
            self._cache.move_to_end(text)
            return cached
        try:
            audio = await self._synthesise(text)
        except (OSError, ValueError, EOFError, wave.Error, TimeoutError) as exc:
            logger.warning("espeak-ng could not speak a line (%s); a chime instead", clean(exc))
            return CHIME
        self._cache[text] = audio
        if len(self._cache) > SPOKEN_LINES_CACHED:
            self._cache.popitem(last=False)
        return audio

    async def _synthesise(self, text: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="fake-agent-") as folder:
            wav, raw = Path(folder) / "line.wav", Path(folder) / "line.raw"
            # The text goes in on stdin: whatever a peer put in it, it is never an option.
            await _run([self.espeak, "-v", "en-us", "-s", "165", "-w", str(wav), "--stdin"], text.encode())
            if self.sox is None:
                return await asyncio.to_thread(wav_to_mulaw, wav.read_bytes())
            await _run([self.sox, str(wav), "-t", "raw", "-r", str(RATE), "-e", "mu-law", "-b", "8", "-c", "1", str(raw)])
            return raw.read_bytes()


async def _run(command: list[str], stdin: bytes = b"") -> None:
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(SYNTHESIS_TIMEOUT_SECONDS):
            _, stderr = await process.communicate(stdin)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise OSError(f"{Path(command[0]).name} exited {process.returncode}: {stderr.decode(errors='replace')[:200]}")


Voice = ChimeVoice | SpeechVoice


class VoiceUnavailable(Exception):
    """``--voice speech`` on a machine without espeak-ng."""


def choose_voice(wanted: str) -> Voice:
    """``auto``: espeak-ng speech if installed, else chimes. ``speech`` insists; ``chime`` never speaks."""
    espeak = shutil.which("espeak-ng")
    if wanted == "chime" or (wanted == "auto" and espeak is None):
        return ChimeVoice()
    if espeak is None:
        raise VoiceUnavailable("--voice speech needs espeak-ng (sudo apt-get install espeak-ng)")
    return SpeechVoice(espeak, shutil.which("sox"))


# ------------------------------------------------------------------------------------ the shell


class FakeAgentServer:
    """The WebSocket server: one ``FakeConversation`` per connection, on any path.

    ``async with FakeAgentServer(voice, host, port) as server``; ``server.url`` is its address.
    """

    def __init__(self, voice: Voice, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.voice = voice
        self.host = host
        self.port = port
        self.sessions = 0  # open now
        self._ids = itertools.count(1)
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"ws://{host}:{port}"

    async def __aenter__(self) -> FakeAgentServer:
        self._server = await serve(
            self._session, self.host, self.port, process_request=self._admit, max_size=MAX_MESSAGE_BYTES,
            compression=None,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        if self.sessions >= MAX_SESSIONS:
            logger.warning("refused a session: %d are open already", MAX_SESSIONS)
            return connection.respond(503, "the fake agent has too many sessions\n")
        return None

    async def _session(self, socket: ServerConnection) -> None:
        name = f"session {next(self._ids)}"
        self.sessions += 1
        logger.info("%s opened (this is the fake agent: the Authorization header is not checked)", name)
        loop = asyncio.get_running_loop()
        conversation = FakeConversation(loop.time())
        outbox: asyncio.Queue[Action] = asyncio.Queue(MAX_PENDING_ACTIONS)
        sender = asyncio.create_task(self._send(socket, outbox, name))
        try:
            actions = conversation.start()
            while True:
                for action in actions:
                    outbox.put_nowait(action)
                if conversation.closed:
                    break
                try:
                    async with asyncio.timeout_at(conversation.deadline):
                        frame = await socket.recv()
                except TimeoutError:
                    actions = conversation.timed_out(loop.time())
                    continue
                if isinstance(frame, bytes):
                    actions = conversation.audio(frame, loop.time())
                else:
                    actions = conversation.text(frame, loop.time())
            await sender  # it sends what is queued, then closes the socket
        except asyncio.QueueFull:
            logger.warning("%s: the client is not reading what it is sent; closing", name)
            await socket.close(1011, "client not reading")
        except ConnectionClosed:
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            self.sessions -= 1
            logger.info("%s closed after %s", name, counted(conversation.turns, "caller turn"))

    async def _send(self, socket: ServerConnection, outbox: asyncio.Queue[Action], name: str) -> None:
        """The only writer to the socket: sends the actions in order, giving each line its voice."""
        try:
            while True:
                action = await outbox.get()
                if isinstance(action, Close):
                    await socket.close(action.code, action.reason)
                    return
                if isinstance(action, SendMessage):
                    self._log_sent(name, action.message)
                    async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                        await socket.send(json.dumps(action.message))
                else:
                    started = asyncio.get_running_loop().time()
                    audio = action.audio if action.audio is not None else await self.voice.render(action.text)
                    tts = asyncio.get_running_loop().time() - started
                    async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
                        await self._speak(socket, action, audio, tts, name)
        except TimeoutError:
            logger.warning("%s: the client has not read for %.0f s; closing", name, SEND_TIMEOUT_SECONDS)
            await socket.close(1011, "client not reading")
        except ConnectionClosed:
            pass

    @staticmethod
    async def _speak(socket: ServerConnection, line: Say, audio: bytes, tts: float, name: str) -> None:
        """An agent turn as Deepgram sends one: the audio comes faster than real time.

        Latencies: speech is the time the voice took, the rest of the wait since what it answers
        counts as thinking (queueing behind earlier lines, mostly)."""
        total = round(asyncio.get_running_loop().time() - line.since, 3)
        tts = round(min(tts, total), 3)
        if line.audio is None:
            logger.info("%s: agent says %s", name, clean(line.text, 100))
        else:
            logger.info("%s: the caller spoke for %.1f s; playing it back", name, len(audio) / RATE)
        messages: list[dict[str, Any]] = [
            {"type": "AgentStartedSpeaking", "total_latency": total, "tts_latency": tts, "ttt_latency": round(total - tts, 3)},
            {"type": "ConversationText", "role": "assistant", "content": line.text},
        ]
        if line.history:
            messages.append({"type": "History", "role": "assistant", "content": line.text})
        for message in messages:
            await socket.send(json.dumps(message))
        for start in range(0, len(audio), AUDIO_CHUNK):
            await socket.send(audio[start : start + AUDIO_CHUNK])
        await socket.send(json.dumps({"type": "AgentAudioDone"}))
        await socket.send(json.dumps({"type": "LatencyReport", "tts_latency": tts, "total_latency": total}))

    @staticmethod
    def _log_sent(name: str, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "FunctionCallRequest":
            logger.info("%s: asking the bridge to run %s", name, message["functions"][0]["name"])
        elif kind in ("Error", "Warning"):
            logger.warning("%s: sending %s %s: %s", name, kind, message["code"], message["description"])


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bridge.fake_agent",
        description="A FAKE Deepgram Voice Agent for trying the bridge without a Deepgram key "
        "(no speech recognition, no LLM: it plays your turns back and runs a keypad menu).",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)"
    )
    parser.add_argument(
        "--voice", choices=("auto", "speech", "chime"), default="auto",
        help="speech (espeak-ng), chime, or auto: speech when espeak-ng is installed (the default)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 2 with one sentence on stderr if it can't start."""
    try:
        voice = choose_voice(args.voice)
    except VoiceUnavailable as exc:
        print(f"error: {exc}.", file=sys.stderr)
        return 2
    config_json_functions = frozenset(name for _, name, _ in MENU)  # the greeting most callers hear
    if isinstance(voice, SpeechVoice) and await voice.render(greeting(config_json_functions)) == CHIME:
        voice = ChimeVoice()  # espeak-ng is there but fails (its warning said why)
    server = FakeAgentServer(voice, args.host, args.port)
    try:
        await server.__aenter__()
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}.", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        logger.info(
            "FAKE Deepgram agent (no speech recognition, no LLM) listening on %s; voice: %s. Start the bridge "
            "with DEEPGRAM_AGENT_URL=%s and any DEEPGRAM_API_KEY, such as local-fake",
            server.url, voice.description, server.url,
        )
        await stop.wait()
    finally:
        await server.__aexit__(None, None, None)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s %(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)  # failed handshakes: one line is ours
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
