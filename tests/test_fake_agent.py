"""The fake Deepgram agent (bridge/fake_agent.py): its rules, its voices, and a call through the bridge.

Every message it sends as the agent is checked against deepgram-sdk's models of the agent's
messages (tests/sdk_oracle.py), as the bridge relies on it to speak the real protocol.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect

from bridge.fake_agent import (
    CHIME,
    END_OF_TURN_WINDOWS,
    IDLE_TIMEOUT_SECONDS,
    MAX_TURN_BYTES,
    WINDOW,
    Action,
    ChimeVoice,
    Close,
    FakeAgentServer,
    FakeConversation,
    Say,
    SendMessage,
    SpeechVoice,
    greeting,
    mulaw_encode,
    wav_to_mulaw,
)
from conftest import ROOT, BridgeFactory, read_record, require_tools, twilio_url
from fakes import FakeTwilioCaller, eventually
from sdk_oracle import server_problem

SETTINGS = json.loads((ROOT / "config.json").read_text(encoding="utf-8"))
ALL_FUNCTIONS = frozenset({"get_drug_info", "place_order", "lookup_order", "end_call"})
SILENCE = b"\xff"  # mulaw's zero


def tone(seconds: float, frequency: float = 440.0, amplitude: float = 0.3) -> bytes:
    return mulaw_encode([amplitude * math.sin(2 * math.pi * frequency * i / 8000) for i in range(int(8000 * seconds))])


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    """The JSON messages among ``actions``, each one checked against the SDK's model of it."""
    messages = [action.message for action in actions if isinstance(action, SendMessage)]
    for message in messages:
        problem = server_problem(message)
        assert problem is None, f"{problem} in {message}"
    return messages


def kinds(actions: list[Action]) -> list[str]:
    """What ``actions`` send, in order: message types, "Say: <text>", "Close"."""
    return [
        action.message["type"] if isinstance(action, SendMessage)
        else f"Say: {action.text}" if isinstance(action, Say) else "Close"
        for action in actions
    ]


def ready(settings: dict[str, Any] | None = None) -> FakeConversation:
    conversation = FakeConversation(0.0)
    conversation.start()
    conversation.text(json.dumps(settings or SETTINGS), 0.0)
    return conversation


def feed(conversation: FakeConversation, audio: bytes, chunk: int = 3200, now: float = 1.0) -> list[Action]:
    """Caller audio in the bridge's chunks (INBOUND_BUFFER_BYTES)."""
    actions: list[Action] = []
    for start in range(0, len(audio), chunk):
        actions += conversation.audio(audio[start : start + chunk], now)
    return actions


def answer(conversation: FakeConversation, request: dict[str, Any], result: Any) -> list[Action]:
    """The bridge's FunctionCallResponse to ``request``."""
    [call] = request["functions"]
    response = {"type": "FunctionCallResponse", "id": call["id"], "name": call["name"], "content": json.dumps(result)}
    return conversation.text(json.dumps(response), 2.0)


# ------------------------------------------------------------------------------ the rules


def test_welcome_then_settings_applied_then_the_greeting_with_the_menu() -> None:
    conversation = FakeConversation(0.0)
    [welcome] = sent(conversation.start())
    assert welcome == {"type": "Welcome", "request_id": conversation.request_id}
    actions = conversation.text(json.dumps(SETTINGS), 0.5)
    assert sent(actions) == [{"type": "SettingsApplied"}]
    [line] = [action for action in actions if isinstance(action, Say)]
    assert line == Say(greeting(ALL_FUNCTIONS), None, 0.5, True)
    for offer in ("press 1", "press 2", "press 3", "press 9 or pound"):
        assert offer in line.text


@pytest.mark.parametrize(
    "first, code",
    [
        ({"type": "KeepAlive"}, "SETTINGS_REQUIRED"),
        ({**SETTINGS, "audio": {**SETTINGS["audio"], "input": {"encoding": "linear16", "sample_rate": 16000}}},
         "UNSUPPORTED_AUDIO"),
        ({**SETTINGS, "audio": {**SETTINGS["audio"], "output": {"encoding": "mulaw", "sample_rate": 8000,
                                                                "container": "wav"}}}, "UNSUPPORTED_AUDIO"),
        ("not json", "UNPARSABLE_CLIENT_MESSAGE"),
    ],
    ids=["keepalive-first", "linear16-in", "wav-out", "not-json"],
)
def test_what_the_fake_cannot_take_first_is_an_error_and_the_end(first: Any, code: str) -> None:
    conversation = FakeConversation(0.0)
    conversation.start()
    actions = conversation.text(first if isinstance(first, str) else json.dumps(first), 0.1)
    assert kinds(actions) == ["Error", "Close"] and sent(actions)[0]["code"] == code
    assert conversation.closed and conversation.text(json.dumps(SETTINGS), 0.2) == []


def test_a_spoken_turn_ends_after_0_8_s_of_silence_and_is_played_back_byte_for_byte() -> None:
    conversation = ready()
    speech = tone(0.5)
    actions = feed(conversation, SILENCE * 1600 + speech, chunk=1000)  # chunks that don't fall on windows
    assert kinds(actions) == ["UserStartedSpeaking"]  # once, at the speech's 3rd window
    actions = feed(conversation, SILENCE * WINDOW * (END_OF_TURN_WINDOWS - 1), chunk=1000)
    assert actions == [], "the turn ended before 0.8 s of silence"
    actions = feed(conversation, SILENCE * (WINDOW + 50), now=3.0)
    assert sent(actions) == [
        {"type": "ConversationText", "role": "user", "content": "(you spoke for 0.5 s)"},
        {"type": "History", "role": "user", "content": "(you spoke for 0.5 s)"},
    ]
    [line] = [action for action in actions if isinstance(action, Say)]
    assert line == Say("Here is what you said.", speech, 3.0, True)
    assert conversation.turns == 1


def test_clicks_and_coughs_get_no_answer_and_a_monologue_is_answered_at_30_s() -> None:
    conversation = ready()
    assert feed(conversation, tone(0.04) + SILENCE * 8000) == []  # a click: not even UserStartedSpeaking
    actions = feed(conversation, tone(0.1) + SILENCE * 8000)
    assert kinds(actions) == ["UserStartedSpeaking"]  # a cough: speech, but too short to answer
    actions = feed(conversation, tone(31.0))
    # 30 s are answered; the last second goes on as the next turn.
    assert kinds(actions) == ["UserStartedSpeaking", "ConversationText", "History", "Say: Here is what you said.",
                              "UserStartedSpeaking"]
    assert len(actions[3].audio or b"") == MAX_TURN_BYTES


def test_the_keypad_menu_calls_functions_with_json_text_arguments_and_says_their_results() -> None:
    conversation = ready()
    actions = conversation.text(json.dumps({"type": "InjectUserMessage", "content": "The caller pressed 1"}), 2.0)
    assert kinds(actions) == ["ConversationText", "History", "FunctionCallRequest"]
    request = sent(actions)[-1]
    [call] = request["functions"]
    assert (call["name"], call["client_side"]) == ("get_drug_info", True)
    assert isinstance(call["arguments"], str) and json.loads(call["arguments"]) == {"drug_name": "Ibuprofen"}
    actions = answer(conversation, request, {"name": "Ibuprofen", "price": 8.99, "prescription_required": False})
    assert sent(actions) == [{"type": "History", "function_calls": [
        {"id": call["id"], "name": "get_drug_info", "client_side": True, "arguments": call["arguments"],
         "response": json.dumps({"name": "Ibuprofen", "price": 8.99, "prescription_required": False})}]}]
    assert kinds(actions)[-1] == "Say: get_drug_info says: name Ibuprofen; price 8.99; prescription required False"

    def press(key: str) -> list[Action]:
        return conversation.text(json.dumps({"type": "InjectUserMessage", "content": f"The caller pressed {key}"}), 2.0)

    assert kinds(press("3"))[-1] == "Say: There is no order to look up yet: press 2 to place one first."
    request = sent(press("2"))[-1]
    assert json.loads(request["functions"][0]["arguments"]) == {
        "customer_name": "Fake Agent Caller", "drug_name": "Ibuprofen", "quantity": 1}
    assert kinds(answer(conversation, request, {"order_id": 7, "status": "placed"}))[-1] == (
        "Say: place_order says: order id 7; status placed")
    request = sent(press("3"))[-1]
    assert request["functions"][0]["name"] == "lookup_order"
    assert json.loads(request["functions"][0]["arguments"]) == {"order_id": "7"}
    assert kinds(answer(conversation, request, {"error": "There is no order 7."}))[-1] == (
        "Say: lookup_order failed: There is no order 7.")
    assert kinds(press("5"))[-1].startswith("Say: On the keypad: for drug information, press 1;")
    for hang_up in ("9", "pound"):
        actions = press(hang_up)
        # The request before the goodbye: the bridge hangs up once the goodbye has been heard.
        assert kinds(actions) == ["ConversationText", "History", "FunctionCallRequest", "Say: Goodbye!"]
        request = sent(actions)[-1]
        assert request["functions"][0]["name"] == "end_call" and request["functions"][0]["arguments"] == "{}"
        assert kinds(answer(conversation, request, {"result": "bye"})) == ["History"]  # the goodbye was said
    assert conversation.pending_calls == {}


def test_a_menu_entry_without_its_function_says_so() -> None:
    settings = json.loads(json.dumps(SETTINGS))
    settings["agent"]["think"]["functions"] = [f for f in settings["agent"]["think"]["functions"]
                                              if f["name"] == "get_drug_info"]
    conversation = ready(settings)
    pressed = conversation.text(json.dumps({"type": "InjectUserMessage", "content": "The caller pressed 2"}), 2.0)
    assert kinds(pressed)[-1] == "Say: This agent has no place_order function."
    assert greeting(frozenset({"get_drug_info"})).endswith("On the keypad: for drug information, press 1.")


def test_injections_keepalive_updates_and_what_the_fake_does_not_expect() -> None:
    conversation = ready()

    def send(message: dict[str, Any], now: float = 2.0) -> list[Action]:
        return conversation.text(json.dumps(message), now)

    assert kinds(send({"type": "InjectAgentMessage", "message": "Are you still there?"})) == [
        "Say: Are you still there?"]
    assert kinds(send({"type": "InjectUserMessage", "content": "hello"})) == [
        "ConversationText", "History", "Say: You wrote: hello"]
    assert feed(conversation, tone(0.1), now=2.0)  # the caller is speaking...
    refused = send({"type": "InjectAgentMessage", "message": "Are you still there?"})
    assert sent(refused) == [{"type": "InjectionRefused", "message": "the user is speaking"}]
    ended = send({"type": "ForceEndTurn"})
    assert kinds(ended) == []  # ... only 0.1 s: too short to answer
    assert send({"type": "KeepAlive"}, now=20.0) == [] and conversation.deadline == 20.0 + IDLE_TIMEOUT_SECONDS
    for update, answered in (("UpdatePrompt", "PromptUpdated"), ("UpdateSpeak", "SpeakUpdated"),
                             ("UpdateThink", "ThinkUpdated"), ("UpdateListen", "ListenUpdated")):
        assert sent(send({"type": update})) == [{"type": answered}]
    assert conversation.functions == frozenset()  # an UpdateThink without functions leaves none
    assert [m["code"] for m in sent(send({"type": "FunctionCallResponse", "id": "never", "name": "x", "content": ""}))] == [
        "UNKNOWN_FUNCTION_CALL"]
    assert [m["code"] for m in sent(send(SETTINGS))] == ["SETTINGS_ALREADY_APPLIED"]
    actions = send({"type": "Hello"})
    assert kinds(actions) == ["Error", "Close"] and sent(actions)[0]["code"] == "UNPARSABLE_CLIENT_MESSAGE"


def test_history_off_sends_no_history() -> None:
    conversation = ready({**SETTINGS, "flags": {"history": False}})
    actions = feed(conversation, tone(0.5) + SILENCE * 8000)
    assert kinds(actions) == ["UserStartedSpeaking", "ConversationText", "Say: Here is what you said."]
    assert not [a for a in actions if isinstance(a, Say) and a.history]


def test_silence_without_keepalive_ends_the_session_as_deepgram_does() -> None:
    waiting = FakeConversation(0.0)
    assert waiting.deadline == 10.0
    actions = waiting.timed_out(10.0)
    assert kinds(actions) == ["Error", "Close"] and sent(actions)[0]["code"] == "SETTINGS_TIMEOUT"
    conversation = ready()
    feed(conversation, SILENCE * 3200, now=5.0)
    assert conversation.deadline == 5.0 + IDLE_TIMEOUT_SECONDS
    actions = conversation.timed_out(15.0)
    assert kinds(actions) == ["Error", "Close"] and sent(actions)[0]["code"] == "CLIENT_MESSAGE_TIMEOUT"
    assert actions[-1] == Close(1000, "CLIENT_MESSAGE_TIMEOUT")


# ------------------------------------------------------------------------------ audio


def decode(byte: int) -> int:
    """G.711 mu-law, written out independently of the module's table."""
    u = ~byte & 0xFF
    sample = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
    return -sample if u & 0x80 else sample


def test_the_mulaw_encoder_inverts_the_decoder() -> None:
    # Every code but 0x7F ("negative zero", which encodes as 0xFF) comes back as itself.
    assert mulaw_encode([decode(b) / 32767 for b in range(256) if b != 0x7F]) == bytes(b for b in range(256) if b != 0x7F)
    assert mulaw_encode([0.0, 1.0, -1.0, 2.0]) == bytes([0xFF, 0x80, 0x00, 0x80])


def test_wav_to_mulaw_resamples_to_8_khz_without_folding_high_tones_back() -> None:
    def wav(frequency: float, rate: int = 22050, seconds: float = 0.5) -> bytes:
        import io

        buffer = io.BytesIO()
        with wave.open(buffer, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(rate)
            samples = [round(16000 * math.sin(2 * math.pi * frequency * i / rate)) for i in range(int(rate * seconds))]
            writer.writeframes(b"".join(s.to_bytes(2, "little", signed=True) for s in samples))
        return buffer.getvalue()

    def rms(audio: bytes) -> float:
        middle = [decode(b) / 32768 for b in audio[400:-400]]
        return math.sqrt(sum(x * x for x in middle) / len(middle))

    in_band = wav_to_mulaw(wav(1000))
    assert abs(len(in_band) - 4000) <= 1
    crossings = sum(1 for a, b in zip(in_band[400:-400], in_band[401:-400]) if (decode(a) < 0) != (decode(b) < 0))
    assert abs(crossings / (len(in_band) - 800) * 8000 - 2000) < 20  # still 1 kHz
    assert abs(rms(in_band) - 16000 / 32768 / math.sqrt(2)) < 0.02
    assert rms(wav_to_mulaw(wav(6000))) < 0.01, "6 kHz folded back into the phone band"


def test_espeak_speech_with_and_without_sox() -> None:
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    require_tools([tool for tool, path in (("espeak-ng", espeak), ("sox", sox)) if path is None],
                  "sudo apt-get install espeak-ng sox")
    assert espeak is not None and sox is not None

    async def both() -> tuple[bytes, bytes]:
        line = "Here is what you said."
        return await SpeechVoice(espeak, sox).render(line), await SpeechVoice(espeak, None).render(line)

    by_sox, by_us = asyncio.run(both())
    assert 0.8 < len(by_sox) / 8000 < 3.0, len(by_sox)
    assert abs(len(by_us) - len(by_sox)) <= 8, (len(by_us), len(by_sox))  # the same 8 kHz length
    for audio in (by_sox, by_us):
        assert audio != CHIME and math.sqrt(sum(decode(b) ** 2 for b in audio) / len(audio)) > 0.03 * 32768


# ------------------------------------------------------------------------------ on the wire


async def test_on_the_wire_every_message_is_the_sdks_and_a_turn_comes_in_deepgrams_order() -> None:
    """A raw client: the frames of the greeting and of a function's answer, in order, each valid."""
    async with FakeAgentServer(ChimeVoice(), port=0) as fake, connect(fake.url) as socket:

        async def frames_until(last: str) -> list[Any]:
            """Text frames as parsed (and checked) messages, binary frames as their bytes, up to ``last``."""
            received: list[Any] = []
            while True:
                frame = await asyncio.wait_for(socket.recv(), 5)
                if isinstance(frame, bytes):
                    received.append(frame)
                    continue
                message = json.loads(frame)
                assert server_problem(message) is None, (server_problem(message), message)
                received.append(message)
                if message["type"] == last:
                    return received

        def shape(frames: list[Any]) -> list[str]:
            return ["audio" if isinstance(f, bytes) else f["type"] for f in frames]

        assert shape(await frames_until("Welcome")) == ["Welcome"]
        await socket.send(json.dumps(SETTINGS))
        frames = await frames_until("LatencyReport")
        audio_frames = len(CHIME) // 1600 + bool(len(CHIME) % 1600)
        assert shape(frames) == ["SettingsApplied", "AgentStartedSpeaking", "ConversationText", "History",
                                 *["audio"] * audio_frames, "AgentAudioDone", "LatencyReport"]
        assert b"".join(f for f in frames if isinstance(f, bytes)) == CHIME
        assert frames[2] == {"type": "ConversationText", "role": "assistant", "content": greeting(ALL_FUNCTIONS)}
        started, report = frames[1], frames[-1]
        assert 0 <= started["tts_latency"] <= started["total_latency"] < 1
        assert report["total_latency"] == started["total_latency"]

        await socket.send(json.dumps({"type": "InjectUserMessage", "content": "The caller pressed 1"}))
        frames = await frames_until("FunctionCallRequest")
        assert shape(frames) == ["ConversationText", "History", "FunctionCallRequest"]
        [call] = frames[-1]["functions"]
        await socket.send(json.dumps({"type": "FunctionCallResponse", "id": call["id"], "name": call["name"],
                                      "content": json.dumps({"name": "Ibuprofen"})}))
        frames = await frames_until("LatencyReport")
        assert shape(frames) == ["History", "AgentStartedSpeaking", "ConversationText", "History",
                                 *["audio"] * audio_frames, "AgentAudioDone", "LatencyReport"]
        assert frames[2]["content"] == "get_drug_info says: name Ibuprofen"


# ------------------------------------------------------------------------------ through the bridge


async def test_a_call_through_the_real_bridge_to_the_fake_agent(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """Greeting, a spoken turn played back byte for byte, keypad 1 runs get_drug_info, # hangs up."""
    speech = tone(0.6)
    async with FakeAgentServer(ChimeVoice(), port=0) as fake, make_bridge(
        deepgram_agent_url=fake.url, dtmf_timeout_seconds=0.1
    ) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await eventually(lambda: len(caller.audio) >= len(CHIME), 5, "the greeting")
            assert caller.audio == CHIME
            # Speech, then 1.2 s of silence (the bridge passes audio on 400 ms at a time).
            await caller.send_audio(SILENCE * 1600 + speech + SILENCE * 9600)
            await eventually(lambda: len(caller.audio) >= len(CHIME) + len(speech), 5, "the turn played back")
            assert caller.audio == CHIME + speech
            assert len(caller.of_event("clear")) == 1  # UserStartedSpeaking: a barge-in
            await caller.press("1")
            await eventually(lambda: len(caller.audio) >= 2 * len(CHIME) + len(speech), 5, "the function's result")
            await caller.press("#")
            await asyncio.wait_for(caller.closed.wait(), 10)  # the bridge hung up after the goodbye
        assert caller.audio == CHIME + speech + CHIME + CHIME
        await eventually(lambda: not server.calls and fake.sessions == 0, 5, "the call and the session to end")
    lines = read_record(tmp_path / "calls")
    [function_call] = [line for line in lines if line["event"] == "function_call" and line["name"] == "get_drug_info"]
    assert json.loads(function_call["arguments"]) == {"drug_name": "Ibuprofen"} and function_call["outcome"] == "ok"
    assert function_call["result"]["name"] == "Ibuprofen"
    transcript = [(line["role"], line["content"]) for line in lines if line["event"] == "transcript"]
    assert transcript[:3] == [("assistant", greeting(ALL_FUNCTIONS)), ("user", "(you spoke for 0.6 s)"),
                              ("assistant", "Here is what you said.")]
    assert transcript[4][0] == "assistant" and transcript[4][1].startswith("get_drug_info says: name Ibuprofen;")
    assert transcript[-1] == ("assistant", "Goodbye!")
    assert lines[-1]["event"] == "summary" and lines[-1]["ended_by"] == "agent ended the call"


async def test_python_m_bridge_fake_agent_starts_says_what_it_is_and_stops_on_sigterm(tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.fake_agent", "--port", "0", "--voice", "chime", cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    try:
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        assert "FAKE Deepgram agent" in line and "voice: a chime for each line" in line, line
        url = re.search(r"listening on (ws://127\.0\.0\.1:\d+);", line)
        assert url is not None, line
        async with connect(url.group(1), additional_headers={"Authorization": "Token local-fake"}) as socket:
            welcome = json.loads(await asyncio.wait_for(socket.recv(), 5))
            assert welcome["type"] == "Welcome" and server_problem(welcome) is None
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        rest = (await process.stdout.read()).decode()
        assert "the Authorization header is not checked" in rest and "local-fake" not in rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    # Speech asked for on a machine without espeak-ng: one sentence, status 2.
    bare = tmp_path / "bin"
    bare.mkdir()
    done = subprocess.run([sys.executable, "-m", "bridge.fake_agent", "--voice", "speech"], cwd=ROOT,
                          env={**os.environ, "PATH": str(bare)}, capture_output=True, text=True, timeout=20)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "error: --voice speech needs espeak-ng (sudo apt-get install espeak-ng).\n"
