"""The call's rules (bridge/call/), driven with a fake clock: no sockets, no event loop.

``Harness`` owns the clock (a float the test moves), feeds ``Call`` its events, keeps every action
it returns, and tracks the timers those actions arm and cancel, so a test can move to the next
timer and fire it only if it is armed at that moment, as the asyncio shell does.

The hang-up fixes in the history each have tests here:
  3de8d92 a repeated end_call cancels the earlier grace timer -> test_repeated_end_call_*
  8590bd8 a goodbye before end_call hangs up once heard, after the grace -> test_goodbye_before_end_call_*
  f8f08d5 barge-in / a cancelled end_call keep the call up; cleared marks aren't "heard";
          a handshake finished after the hang-up arms no KeepAlive -> test_barge_in_*,
          test_function_call_cancelled_*, test_cleared_marks_*, test_handshake_finished_after_the_hang_up_*
  e2e4001 withdrawn calls finish and are recorded, late threads are recorded, a resume waits for
          running functions, a hang-up records the function it cut off -> test_withdrawn_*,
          test_thread_that_outlived_*, test_resume_waits_*, test_function_cut_off_*
"""

from __future__ import annotations

import base64
import json
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bridge.call as call_module
import bridge.call.stats as call_stats
from bridge import agent_protocol, twilio
from bridge.agent_protocol import FunctionCall
from bridge.call import (
    CallEnd,
    EndReason,
    RedirectCall,
    ArmTimer,
    Call,
    CancelFunction,
    CancelTimer,
    ClearCaller,
    CloseAgent,
    HangUp,
    Identify,
    Log,
    MarkCaller,
    OpenAgent,
    PauseCaller,
    Phase,
    Record,
    ResumeCaller,
    SendToAgent,
    SendToCaller,
    StartFunction,
    Timer,
)
from bridge.agents import AgentCatalog
from bridge.binding import BINDING_PARAMETER, binding_mac
from bridge.config import AgentConfig
from bridge.settings import Settings
from conftest import with_overrides
from bridge.functions import FunctionOutcome

# ------------------------------------------------------------------------------------ fixtures

SID = "MZ00000000000000000000000000000001"
CALL_SID = "CA00000000000000000000000000000001"
GREETING = "Thanks for calling the pharmacy!"
AGENT_SETTINGS: dict[str, Any] = {
    "type": "Settings",
    "audio": {
        "input": {"encoding": "mulaw", "sample_rate": 8000},
        "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
    },
    "agent": {
        "greeting": GREETING,
        "context": {"messages": [{"type": "History", "role": "assistant", "content": "(configured)"}]},
        "think": {"provider": {"type": "open_ai", "model": "gpt-4o-mini"}, "functions": []},
    },
}
SETTINGS_JSON = json.dumps(AGENT_SETTINGS)
CHUNK = 400
BASE = with_overrides(
    Settings(deepgram_api_key="k"),
    inbound_chunk_bytes=CHUNK,
    max_agent_queue_bytes=2000,
    keepalive_seconds=100.0,  # out of the way unless a test is about it
    idle_reprompt_seconds=0.0,  # likewise the silence clock (tests/test_conversation.py)
    start_timeout_seconds=10.0,
    agent_connect_timeout_seconds=10.0,
    hangup_timeout_seconds=10.0,
    function_timeout_seconds=10.0,
    agent_reconnect_delays=(0.25, 0.75, 1.5),
)
END_CALL_ANSWER = json.dumps({"result": "The call will end after your goodbye has played."})

WELCOME = {"type": "Welcome", "request_id": "req-1"}
APPLIED = {"type": "SettingsApplied"}
STARTED = {"type": "AgentStartedSpeaking", "total_latency": 0.5, "tts_latency": 0.2, "ttt_latency": 0.3}
DONE = {"type": "AgentAudioDone"}
BARGE = {"type": "UserStartedSpeaking"}


# Twilio frames, as Twilio writes them ("event" first, compact JSON).
def compact(message: dict[str, Any]) -> str:
    return json.dumps(message, separators=(",", ":"))


def start_frame(params: dict[str, str] | None = None, account_sid: str = "AC1") -> str:
    return compact(
        {
            "event": "start",
            "sequenceNumber": "1",
            "start": {
                "accountSid": account_sid,
                "streamSid": SID,
                "callSid": CALL_SID,
                "tracks": ["inbound"],
                "customParameters": params or {},
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
            "streamSid": SID,
        }
    )


def media_frame(audio: bytes, *, slow: bool = False) -> str:
    payload = base64.b64encode(audio).decode("ascii")
    if slow:  # "event" not first: takes the full JSON parse instead of the fast path
        return json.dumps({"streamSid": SID, "media": {"payload": payload, "track": "inbound"}, "event": "media"})
    return compact(
        {
            "event": "media",
            "sequenceNumber": "2",
            "media": {"track": "inbound", "chunk": "1", "timestamp": "20", "payload": payload},
            "streamSid": SID,
        }
    )


def mark_frame(name: str) -> str:
    return compact({"event": "mark", "sequenceNumber": "3", "streamSid": SID, "mark": {"name": name}})


def stop_frame() -> str:
    return compact({"event": "stop", "sequenceNumber": "4", "streamSid": SID, "stop": {"callSid": CALL_SID}})


def dtmf_frame(digit: str) -> str:
    return compact({"event": "dtmf", "streamSid": SID, "dtmf": {"track": "inbound_track", "digit": digit}})


# What the bridge sends to Twilio.
def media_out(audio: bytes) -> str:
    return '{"event":"media","streamSid":"%s","media":{"payload":"%s"}}' % (SID, base64.b64encode(audio).decode())


def mark_out(name: str) -> MarkCaller:
    return MarkCaller(name, '{"event":"mark","streamSid":"%s","mark":{"name":"%s"}}' % (SID, name))


def hang_up(ended_by: str, fallback: RedirectCall | None = None) -> HangUp:
    """The ``HangUp`` whose record says ``ended_by``: the reason whose words start it, and the rest."""
    reason = max((r for r in EndReason if ended_by.startswith(r.text)), key=lambda r: len(r.text))
    return HangUp(CallEnd(reason, ended_by[len(reason.text):]), fallback)


CLEAR = ClearCaller('{"event":"clear","streamSid":"%s"}' % SID)


# Agent messages.
def request(*calls: tuple[str, str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "FunctionCallRequest",
        "functions": [
            {"id": call_id, "name": name, "arguments": json.dumps(arguments), "client_side": True}
            for call_id, name, arguments in calls
        ],
    }


def cancelled(*ids: str) -> dict[str, Any]:
    return {"type": "FunctionCallCancelled", "functions": [{"id": call_id, "name": "whatever"} for call_id in ids]}


def text(role: str, content: str) -> dict[str, Any]:
    return {"type": "ConversationText", "role": role, "content": content}


def outcome(result: Any = None, *, error: str | None = None, duration: float = 0.25) -> FunctionOutcome:
    content = json.dumps({"error": error} if error is not None else result)
    return FunctionOutcome(content, None if error is not None else result, error, duration)


def answer(call_id: str, name: str, content: str) -> SendToAgent:
    return SendToAgent(json.dumps({"type": "FunctionCallResponse", "id": call_id, "name": name, "content": content}))


def end_call_record() -> Record:
    return Record(
        "function_call",
        {
            "name": "end_call",
            "arguments": "{}",
            "result": json.loads(END_CALL_ANSWER),
            "error": None,
            "outcome": "ok",
            "duration_seconds": 0.0,
            "withdrawn": False,
        },
    )


# Reading actions.
def quiet(actions: Iterable[Any]) -> list[Any]:
    """The actions without their log lines (whose wording isn't a rule)."""
    return [action for action in actions if not isinstance(action, Log)]


def logs(actions: Iterable[Any]) -> list[Log]:
    return [action for action in actions if isinstance(action, Log)]


def of(actions: Iterable[Any], kind: type) -> list[Any]:
    return [action for action in actions if isinstance(action, kind)]


def audio_sent(actions: Iterable[Any]) -> list[bytes]:
    return [a.data for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, bytes)]


def json_sent(actions: Iterable[Any]) -> list[dict[str, Any]]:
    return [json.loads(a.data) for a in actions if isinstance(a, SendToAgent) and isinstance(a.data, str)]


def records(actions: Iterable[Any], event: str | None = None) -> list[Record]:
    return [a for a in actions if isinstance(a, Record) and (event is None or a.event == event)]


# ------------------------------------------------------------------------------------ harness


def catalog_of(settings: dict[str, Any]) -> AgentCatalog:
    """One agent with these Settings, as the server would hand a call its agents."""
    return AgentCatalog.single(AgentConfig(settings=settings, client_functions={}))



class Harness:
    """One ``Call`` with a fake clock and the shell's timer bookkeeping."""

    def __init__(self, *, browser: bool = False, async_functions: Iterable[str] = (), **overrides: Any) -> None:
        self.settings = with_overrides(BASE, **overrides)
        self.call = Call(self.settings, catalog_of(AGENT_SETTINGS), frozenset(async_functions), browser=browser)
        self.now = 0.0
        self.armed: dict[Timer, float] = {}
        self.actions: list[Any] = []  # everything the call returned, in order
        self.hangups: list[HangUp] = []
        self.hung_up_at: float | None = None

    # -- bookkeeping
    def take(self, actions: Sequence[Any]) -> list[Any]:
        actions = list(actions)
        for action in actions:
            if isinstance(action, ArmTimer):
                assert action.at >= self.now, f"{action} armed in the past (now {self.now})"
                self.armed[action.timer] = action.at
            elif isinstance(action, CancelTimer):
                self.armed.pop(action.timer, None)
            elif isinstance(action, HangUp):
                self.hangups.append(action)
                if self.hung_up_at is None:
                    self.hung_up_at = self.now
        self.actions += actions
        return actions

    def at(self, when: float) -> Harness:
        """Move the clock without firing anything (for events between timers)."""
        assert when >= self.now
        due = [timer for timer, at in self.armed.items() if at <= when]
        assert not due, f"timers {due} would fire before {when}: use advance_to"
        self.now = when
        return self

    # -- time
    def advance_to(self, when: float) -> list[Any]:
        """Fire, in order, every timer due up to ``when``, each at its own time; then set the clock."""
        assert when >= self.now
        out: list[Any] = []
        for _ in range(10_000):
            due = [(at, timer) for timer, at in self.armed.items() if at <= when]
            if not due:
                break
            at, timer = min(due, key=lambda item: item[0])
            del self.armed[timer]  # the shell forgets a timer as it fires
            self.now = max(self.now, at)
            out += self.take(self.call.timer_fired(timer, self.now))
        else:
            raise AssertionError(f"timers keep firing without the clock moving: {self.armed}")
        self.now = when
        return out

    def advance(self, seconds: float) -> list[Any]:
        return self.advance_to(self.now + seconds)

    def fire(self, timer: Timer) -> list[Any]:
        """Move to when ``timer`` is due (firing anything due before it) and fire it."""
        assert timer in self.armed, f"{timer} is not armed; armed: {self.armed}"
        return self.advance_to(self.armed[timer])

    def fire_next(self) -> list[Any]:
        assert self.armed, "no timer is armed"
        return self.advance_to(min(self.armed.values()))

    # -- events
    def connected(self) -> list[Any]:
        return self.take(self.call.connected(self.now))

    def twilio(self, frame: str) -> list[Any]:
        return self.take(self.call.caller_text(frame, self.now))

    def start(self, params: dict[str, str] | None = None, *, bound: bool = True) -> list[Any]:
        """Twilio's start. With a binding key (REST settings), the stream carries the MAC the
        bridge's TwiML would have given it, unless ``bound`` is False."""
        account = self.settings.twilio_account_sid or "AC1"
        key = self.settings.binding_key
        if bound and key is not None:
            params = {**(params or {}), BINDING_PARAMETER: binding_mac(key, CALL_SID, account)}
        return self.twilio(start_frame(params, account))

    def media(self, audio: bytes, *, slow: bool = False) -> list[Any]:
        return self.twilio(media_frame(audio, slow=slow))

    def echo(self, name: str) -> list[Any]:
        return self.twilio(mark_frame(name))

    def stop(self) -> list[Any]:
        return self.twilio(stop_frame())

    def caller_binary(self, data: bytes) -> list[Any]:
        return self.take(self.call.caller_binary(data, self.now))

    def caller_closed(self, *, stalled: bool = False) -> list[Any]:
        return self.take(self.call.caller_closed(self.now, stalled=stalled))

    def agent_connected(self) -> list[Any]:
        return self.take(self.call.agent_connected(self.now))

    def agent_open_failed(self, reason: str = "refused") -> list[Any]:
        return self.take(self.call.agent_open_failed(reason, self.now))

    def agent(self, message: dict[str, Any] | str) -> list[Any]:
        raw = message if isinstance(message, str) else json.dumps(message)
        return self.take(self.call.agent_text(raw, self.now))

    def speak(self, audio: bytes) -> list[Any]:
        return self.take(self.call.agent_binary(audio, self.now))

    def agent_closed(self, code: int | None, reason: str | None = None, *, stalled: bool = False) -> list[Any]:
        return self.take(self.call.agent_closed(code, reason, self.now, stalled=stalled))

    def finished(self, call_id: str, result: FunctionOutcome) -> list[Any]:
        return self.take(self.call.function_finished(call_id, result, self.now))

    def shutdown(self) -> list[Any]:
        return self.take(self.call.shutdown(self.now))

    def failed(self) -> list[Any]:
        return self.take(self.call.failed(self.now))

    # -- common stretches
    def open(self, params: dict[str, str] | None = None, *, bound: bool = True) -> list[Any]:
        """Connected, started (with ``params``), agent session ready; the actions of the step that made it ready."""
        self.connected()
        self.start(params, bound=bound)
        self.agent_connected()
        self.agent(WELCOME)
        return self.agent(APPLIED)

    def turn(self, audio: bytes | int, *, started: bool = True) -> str:
        """The agent speaks one turn; returns the name of the mark sent after it."""
        if started:
            self.agent(STARTED)
        self.speak(b"\x10" * audio if isinstance(audio, int) else audio)
        [mark] = of(self.agent(DONE), MarkCaller)
        return mark.name

    def resume_ready(self) -> list[Any]:
        """The reconnect attempt in progress completes its handshake."""
        self.agent_connected()
        self.agent(WELCOME)
        return self.agent(APPLIED)


def ready(**kwargs: Any) -> Harness:
    harness = Harness(**kwargs)
    harness.open()
    return harness


def pattern(size: int, seed: int = 0) -> bytes:
    """Bytes whose position can be told apart, so order and boundaries show."""
    return bytes((seed * 37 + i * 7 + i // 256) % 256 for i in range(size))


# ======================================================================= start and the opening


def test_connected_arms_the_start_timer() -> None:
    h = Harness()
    h.now = 2.0
    assert quiet(h.connected()) == [ArmTimer(Timer.START, 12.0)]
    assert h.call.phase is Phase.WAITING_FOR_START


def test_no_start_event_ends_the_call_when_the_start_timer_fires() -> None:
    h = Harness()
    h.connected()
    assert h.advance_to(9.99) == []
    out = h.advance_to(10.0)
    assert quiet(out) == [hang_up("no start event from Twilio")]
    assert h.hung_up_at == 10.0 and h.call.phase is Phase.ENDED


def test_start_cancels_the_start_timer_identifies_the_call_and_opens_the_agent() -> None:
    h = Harness()
    h.connected()
    h.now = 1.0
    out = h.start({"b": "2", "a": "1"})
    assert quiet(out) == [
        CancelTimer(Timer.START),
        Identify(CALL_SID),
        Record("start", {"stream_sid": SID, "custom_parameters": {"b": "2", "a": "1"}, "agent": "default", "bound": False}),
        ArmTimer(Timer.AGENT_OPEN, 11.0),
        OpenAgent(resuming=False),
    ]
    assert h.call.phase is Phase.OPENING_AGENT and h.armed == {Timer.AGENT_OPEN: 11.0}
    # The start timer can no longer end the call.
    h.at(10.5)
    assert h.hangups == []


def test_handshake_is_welcome_then_settings_then_settings_applied() -> None:
    h = Harness()
    h.connected()
    h.start()
    assert h.agent_connected() == []
    assert h.agent(APPLIED) == []  # not before Welcome: still waiting
    out = h.agent(WELCOME)
    assert out == [
        Log(logging.INFO, "Deepgram session request_id %s", ("req-1",)),
        Record("agent_session", {"request_id": "req-1"}),
        SendToAgent(SETTINGS_JSON),
    ]
    h.now = 0.5
    out = h.agent(APPLIED)
    assert quiet(out) == [CancelTimer(Timer.AGENT_OPEN), ArmTimer(Timer.KEEPALIVE, 100.5)]
    assert h.call.phase is Phase.CONVERSING and h.call.agent_ready and h.call.link.generation == 1


def test_caller_audio_held_during_the_opening_is_flushed_in_order_when_the_agent_is_ready() -> None:
    h = Harness()
    h.connected()
    h.start()
    audio = pattern(1000)
    for offset in range(0, 1000, 160):
        assert audio_sent(h.media(audio[offset : offset + 160])) == []
    h.agent_connected()
    h.agent(WELCOME)
    out = h.agent(APPLIED)
    assert quiet(out) == [
        CancelTimer(Timer.AGENT_OPEN),
        ArmTimer(Timer.KEEPALIVE, 100.0),
        SendToAgent(audio[:400]),
        SendToAgent(audio[400:800]),
    ]
    # The 200 bytes short of a chunk wait for the next frame.
    more = pattern(300, seed=1)
    assert quiet(h.media(more)) == [SendToAgent(audio[800:] + more[:200])]
    assert h.call.summary()["audio_bytes_to_agent"] == 1200


def test_held_audio_at_its_cap_pauses_the_caller_and_ready_resumes_it() -> None:
    h = Harness(max_agent_queue_bytes=1200)
    h.connected()
    h.start()
    assert quiet(h.media(pattern(800))) == []
    out = h.media(pattern(400, seed=2))
    assert quiet(out) == [PauseCaller()]
    assert logs(out)[0].level == logging.WARNING
    assert quiet(h.media(pattern(400, seed=3))) == []  # paused once, not again
    h.agent_connected()
    h.agent(WELCOME)
    out = quiet(h.agent(APPLIED))
    assert out[-1] == ResumeCaller()
    assert audio_sent(out) == [pattern(800)[:400], pattern(800)[400:], pattern(400, seed=2), pattern(400, seed=3)]


def test_error_before_settings_applied_ends_the_call() -> None:
    h = Harness()
    h.connected()
    h.start()
    h.agent_connected()
    h.agent(WELCOME)
    out = h.agent({"type": "Error", "code": "BAD_SETTINGS", "description": "unknown key"})
    assert quiet(out) == [
        CancelTimer(Timer.AGENT_OPEN),
        CloseAgent(),
        hang_up("agent unavailable: Deepgram refused the session: BAD_SETTINGS: unknown key"),
    ]
    assert logs(out)[0].level == logging.ERROR


def test_agent_open_timer_ends_a_handshake_that_never_finishes() -> None:
    h = Harness(agent_connect_timeout_seconds=4.0)
    h.connected()
    h.now = 1.0
    h.start()
    h.agent_connected()
    h.agent(WELCOME)
    assert h.advance_to(4.99) == []
    out = h.advance_to(5.0)
    assert quiet(out) == [
        CancelTimer(Timer.AGENT_OPEN),
        CloseAgent(),
        hang_up("agent unavailable: timed out after 4.0 s waiting for SettingsApplied"),
    ]
    assert h.hung_up_at == 5.0


def test_agent_open_failures_name_the_stage() -> None:
    h = Harness()
    h.connected()
    h.start()
    out = h.agent_open_failed("Deepgram refused the connection with HTTP 401 (check DEEPGRAM_API_KEY)")
    assert h.hangups == [hang_up("agent unavailable: Deepgram refused the connection with HTTP 401 (check DEEPGRAM_API_KEY)")]
    assert of(out, CloseAgent) == [CloseAgent()]

    h = Harness()
    h.connected()
    h.start()
    h.agent_connected()
    h.agent_closed(None)
    assert h.hangups == [
        hang_up("agent unavailable: Deepgram closed the connection while waiting for Deepgram's Welcome (code 1006)")
    ]


def test_handshake_finished_after_the_hang_up_arms_no_keepalive() -> None:
    """f8f08d5: a call ended mid-handshake must not start a KeepAlive chain when it completes."""
    h = Harness(keepalive_seconds=5.0)
    h.connected()
    h.start()
    h.agent_connected()
    h.agent(WELCOME)
    h.media(pattern(800))
    assert quiet(h.shutdown()) == [hang_up("server shutting down")]
    assert h.agent(APPLIED) == []
    assert Timer.KEEPALIVE not in h.armed
    assert h.advance(60) == []  # AGENT_OPEN firing after the hang-up does nothing either


# ================================================================================ caller audio


def test_caller_audio_goes_out_in_inbound_buffer_bytes_chunks() -> None:
    h = ready()
    audio = pattern(1500)
    sent: list[bytes] = []
    for size in (100, 299, 1, 400, 700):
        start = sum(len(chunk) for chunk in sent) + len(h.call.inbound.partial)
        sent += audio_sent(h.media(audio[start : start + size]))
    assert sent == [audio[0:400], audio[400:800], audio[800:1200]]
    assert h.call.inbound.partial == audio[1200:1500]


def test_the_tail_is_flushed_to_the_agent_when_twilio_stops() -> None:
    h = ready()
    audio = pattern(950)
    h.media(audio[:500])
    h.media(audio[500:])
    out = h.stop()
    assert quiet(out) == [SendToAgent(audio[800:]), hang_up("caller hung up")]
    assert h.call.summary()["audio_bytes_to_agent"] == 950


def test_the_tail_is_flushed_when_the_socket_closes_and_a_stalled_caller_is_named() -> None:
    h = ready()
    h.media(pattern(50))
    assert quiet(h.caller_closed(stalled=True)) == [SendToAgent(pattern(50)), hang_up("caller stopped reading")]
    h = ready()
    assert quiet(h.caller_closed()) == [hang_up("caller hung up")]  # nothing buffered: no empty frame


def test_stop_during_the_opening_waits_for_the_agent_then_flushes_the_tail() -> None:
    h = Harness()
    h.connected()
    h.start()
    audio = pattern(500)
    h.media(audio)
    h.now = 2.0
    out = h.stop()
    assert quiet(out) == [ArmTimer(Timer.TAIL_FLUSH, 3.0)]
    assert h.hangups == []
    h.agent_connected()
    h.agent(WELCOME)
    h.now = 2.5
    out = quiet(h.agent(APPLIED))
    assert audio_sent(out) == [audio[:400], audio[400:]]
    assert out[-2:] == [CancelTimer(Timer.TAIL_FLUSH), hang_up("caller hung up")]
    assert Timer.TAIL_FLUSH not in h.armed


def test_stop_during_the_opening_hangs_up_when_the_tail_flush_timer_fires() -> None:
    h = Harness()
    h.connected()
    h.start()
    h.media(pattern(100))
    h.now = 1.0
    h.stop()
    assert quiet(h.fire(Timer.TAIL_FLUSH)) == [hang_up("caller hung up")]
    assert h.hung_up_at == 2.0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    chunk=st.integers(160, 1000),
    frames=st.lists(st.tuples(st.integers(0, 1200), st.booleans()), max_size=20),
    ready_after=st.integers(0, 20),
    how=st.sampled_from(["stop", "close", "stop while opening"]),
)
def test_caller_audio_in_any_frame_sizes_reaches_the_agent_byte_exact(
    chunk: int, frames: list[tuple[int, bool]], ready_after: int, how: str
) -> None:
    """Every byte, in order, in inbound_chunk_bytes chunks as soon as a chunk is whole, then the tail."""
    if how == "stop while opening":
        ready_after = len(frames)  # the caller is gone before the agent is ready
    h = Harness(inbound_chunk_bytes=chunk, max_agent_queue_bytes=10**9)
    h.connected()
    h.start()
    h.agent_connected()
    h.agent(WELCOME)
    data = b""
    for index, (size, slow) in enumerate(frames):
        if index == ready_after:
            h.agent(APPLIED)
        audio = pattern(size, seed=index)
        data += audio
        h.media(audio, slow=slow)
        if h.call.agent_ready:  # every whole chunk has gone out, no more
            assert sum(map(len, audio_sent(h.actions))) == len(data) - len(data) % chunk
    if how == "stop while opening":
        h.stop()
    if not h.call.agent_ready and not h.hangups:
        h.agent(APPLIED)
    if how == "stop":
        h.stop()
    elif how == "close":
        h.caller_closed()
    whole = len(data) - len(data) % chunk
    expected = [data[i : i + chunk] for i in range(0, whole, chunk)] + ([data[whole:]] if whole < len(data) else [])
    assert audio_sent(h.actions) == expected
    assert h.hangups == [hang_up("caller hung up")]
    summary = h.call.summary()
    assert summary["audio_bytes_from_caller"] == summary["audio_bytes_to_agent"] == len(data)


# ========================================================================= marks and barge-in


def test_agent_audio_goes_to_the_caller_and_each_turn_ends_with_a_mark() -> None:
    h = ready()
    assert h.speak(b"\x01\x02\x03") == [SendToCaller(media_out(b"\x01\x02\x03"))]
    assert quiet(h.agent(DONE)) == [mark_out("agent-turn-1")]
    h.speak(b"\x04")
    assert quiet(h.agent(DONE)) == [mark_out("agent-turn-2")]
    assert quiet(h.echo("agent-turn-1")) == [Record("mark_played", {"name": "agent-turn-1"})]
    assert quiet(h.echo("agent-turn-2")) == [Record("mark_played", {"name": "agent-turn-2"})]
    assert h.call.playback.all_heard and h.call.summary()["audio_bytes_to_caller"] == 4


def test_agent_audio_before_ready_or_after_the_end_is_dropped() -> None:
    h = Harness()
    h.connected()
    h.start()
    assert h.speak(b"\x01") == []
    h.agent_connected()
    h.agent(WELCOME)
    h.agent(APPLIED)
    h.shutdown()
    assert h.speak(b"\x01") == []
    assert h.call.summary()["audio_bytes_to_caller"] == 0


def test_unknown_marks_are_bad_input_counted_not_recorded_and_never_hang_up() -> None:
    h = ready()
    h.agent(request(("bye", "end_call", {})))  # even with a hang-up pending
    out = h.echo("end-call-1")  # never sent
    assert quiet(out) == [] and len(logs(out)) == 1 and logs(out)[0].level == logging.WARNING
    for _ in range(300):
        assert h.echo("end-call-1") == []  # a flood: counted, not logged, not recorded
    assert h.twilio(compact({"event": "mark", "streamSid": SID, "mark": {}})) == []  # no name at all
    assert h.hangups == [] and records(h.actions, "mark_played") == []
    assert h.call.bad_input == {"twilio:unknown-mark": 302}


def test_a_mark_echoed_twice_counts_once_as_heard() -> None:
    h = ready()
    name = h.turn(160)
    assert quiet(h.echo(name)) == [Record("mark_played", {"name": name})]
    assert quiet(h.echo(name)) == []
    assert h.call.bad_input == {"twilio:unknown-mark": 1}


def test_barge_in_clears_the_caller_and_its_flushed_marks_are_recorded_as_cleared() -> None:
    h = ready()
    first = h.turn(800)
    second = h.turn(800)
    out = h.agent(BARGE)
    assert quiet(out) == [CLEAR, Record("barge_in", {})]
    # Twilio echoes every pending mark at once, unplayed.
    assert quiet(h.echo(first)) == [Record("mark_cleared", {"name": first})]
    assert quiet(h.echo(second)) == [Record("mark_cleared", {"name": second})]
    assert quiet(h.echo(second)) == []  # a third echo is a forgery
    assert h.call.bad_input == {"twilio:unknown-mark": 1}
    assert records(h.actions, "mark_played") == [] and h.call.summary()["barge_ins"] == 1


def test_cleared_marks_do_not_hold_up_a_later_goodbye() -> None:
    """f8f08d5: the marks a clear flushed are neither heard nor still awaited."""
    h = ready()
    pending = h.turn(800)
    h.agent(BARGE)
    h.at(1.0)
    h.turn(800)  # the agent's answer; the caller hears it
    h.echo(pending)  # the cleared echo arrives late
    h.echo("agent-turn-2")
    h.at(3.0)
    h.agent(request(("bye", "end_call", {})))
    h.advance_to(4.5)
    assert h.hangups == [hang_up("agent ended the call")] and h.hung_up_at == 4.5


# ==================================================================================== hang-up


def test_end_call_is_answered_at_once_and_recorded() -> None:
    h = ready()
    h.at(1.0)
    h.agent(STARTED)  # the goodbye has begun: no grace
    out = h.agent(request(("bye", "end_call", {})))
    assert quiet(out) == [
        answer("bye", "end_call", END_CALL_ANSWER),
        end_call_record(),
        ArmTimer(Timer.HANGUP_FALLBACK, 11.0),
        CancelTimer(Timer.HANGUP_GRACE),
    ]
    assert h.call.summary()["function_calls"] == 1


def test_goodbye_after_end_call_hangs_up_when_its_end_call_mark_is_echoed() -> None:
    h = ready()
    h.at(1.0)
    h.agent(STARTED)
    h.agent(request(("bye", "end_call", {})))
    h.speak(b"\x10" * 4000)  # half a second of "Goodbye!"
    h.at(1.2)
    out = h.agent(DONE)
    # The fallback allows for the half second still queued at Twilio.
    assert quiet(out) == [ArmTimer(Timer.HANGUP_FALLBACK, 11.7), mark_out("end-call-1")]
    h.advance_to(5.0)
    assert h.hangups == []  # heard only when echoed
    out = h.echo("end-call-1")
    assert quiet(out) == [Record("mark_played", {"name": "end-call-1"}), hang_up("agent ended the call")]
    assert h.hung_up_at == 5.0


def test_goodbye_after_a_silent_end_call_is_decided_by_its_mark_not_the_grace() -> None:
    """8590bd8: last words after end_call are heard before the hang-up."""
    h = ready()
    h.at(1.0)
    assert ArmTimer(Timer.HANGUP_GRACE, 2.5) in h.agent(request(("bye", "end_call", {})))
    h.at(2.0)
    h.agent(STARTED)
    h.speak(b"\x10" * 800)
    assert h.advance_to(2.5) == []  # the grace ends mid-turn: nothing
    assert not h.call.departure.leaving_when_all_heard
    h.speak(b"\x11" * 800)
    h.at(3.0)
    assert of(h.agent(DONE), MarkCaller) == [mark_out("end-call-1")]
    h.advance_to(6.0)
    assert h.hangups == []
    h.echo("end-call-1")
    assert h.hangups == [hang_up("agent ended the call")] and h.hung_up_at == 6.0


def test_goodbye_before_end_call_hangs_up_after_the_grace_once_every_mark_is_heard() -> None:
    """8590bd8: the prompt's order (goodbye, then end_call): no 10 s wait once it is heard."""
    h = ready()
    goodbye = h.turn(4000)
    h.at(2.0)
    out = h.agent(request(("bye", "end_call", {})))
    assert quiet(out)[-3:] == [
        ArmTimer(Timer.HANGUP_FALLBACK, 12.0),
        CancelTimer(Timer.HANGUP_GRACE),
        ArmTimer(Timer.HANGUP_GRACE, 3.5),
    ]
    assert h.advance_to(3.5) == []  # the grace is over but the goodbye is still playing
    assert h.call.departure.leaving_when_all_heard
    h.at(4.0)
    out = h.echo(goodbye)
    assert quiet(out) == [Record("mark_played", {"name": goodbye}), hang_up("agent ended the call")]
    assert h.hung_up_at == 4.0


def test_goodbye_before_end_call_already_heard_hangs_up_exactly_after_the_grace() -> None:
    h = ready()
    goodbye = h.turn(4000)
    h.at(2.0)
    h.agent(request(("bye", "end_call", {})))
    h.at(2.5)
    assert quiet(h.echo(goodbye)) == [Record("mark_played", {"name": goodbye})]  # not yet: last words
    assert h.advance_to(3.49) == []
    assert quiet(h.advance_to(3.5)) == [hang_up("agent ended the call")]
    assert h.hung_up_at == 3.5


def test_unmarked_agent_audio_keeps_the_grace_from_hanging_up() -> None:
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.speak(b"\x10" * 800)  # audio with no AgentStartedSpeaking and no AgentAudioDone yet
    h.advance_to(2.5)
    assert h.hangups == []
    h.advance_to(11.0)
    assert h.hangups == [hang_up("agent ended the call (goodbye not confirmed)")]


def test_agent_audio_after_the_grace_is_heard_before_the_hang_up() -> None:
    h = ready()
    goodbye = h.turn(4000)
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.advance_to(2.5)  # grace over, the goodbye still playing
    h.at(3.0)
    h.speak(b"\x11" * 800)  # more audio, not yet marked
    h.echo(goodbye)
    assert h.hangups == []
    assert of(h.agent(DONE), MarkCaller) == [mark_out("end-call-2")]
    h.echo("end-call-2")
    assert h.hangups == [hang_up("agent ended the call")]


def test_fallback_hangs_up_when_no_goodbye_is_confirmed() -> None:
    h = ready()
    h.turn(800)  # its mark is never echoed
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.advance_to(10.99)
    assert h.hangups == []
    assert quiet(h.advance_to(11.0)) == [hang_up("agent ended the call (goodbye not confirmed)")]
    assert h.hung_up_at == 11.0


def test_fallback_waits_for_the_audio_still_queued_at_twilio() -> None:
    h = ready()
    h.at(1.0)
    h.agent(STARTED)
    h.agent(request(("bye", "end_call", {})))
    h.speak(b"\x10" * 16000)  # two seconds of audio sent in a burst
    h.at(1.5)
    h.agent(DONE)
    assert h.armed[Timer.HANGUP_FALLBACK] == 13.5
    h.advance_to(13.49)
    assert h.hangups == []
    h.advance_to(13.5)
    assert h.hangups == [hang_up("agent ended the call (goodbye not confirmed)")]


def test_barge_in_during_the_goodbye_keeps_the_call_up() -> None:
    """f8f08d5: the caller spoke after end_call: cancel the hang-up, the mark is flushed unheard."""
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.speak(b"\x10" * 4000)
    mark = of(h.agent(DONE), MarkCaller)[0].name
    assert mark == "end-call-1"
    h.at(1.2)
    out = h.agent(BARGE)
    assert quiet(out) == [
        CLEAR,
        Record("barge_in", {}),
        CancelTimer(Timer.HANGUP_FALLBACK),
        CancelTimer(Timer.HANGUP_GRACE),
        Record("hangup_cancelled", {"reason": "the caller spoke during the goodbye"}),
    ]
    assert set(h.armed) == {Timer.KEEPALIVE}
    assert quiet(h.echo(mark)) == [Record("mark_cleared", {"name": mark})]
    h.advance(30)
    next_turn = h.turn(800)
    assert next_turn == "agent-turn-2"
    h.echo(next_turn)
    h.advance(30)
    assert h.hangups == [] and h.call.phase is Phase.CONVERSING


def test_barge_in_before_the_grace_ends_keeps_the_call_up() -> None:
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))  # silent: grace armed
    h.at(2.0)
    h.agent(BARGE)
    h.advance(60)
    assert h.hangups == []


def test_a_turn_cut_short_by_a_barge_in_is_not_still_speaking() -> None:
    """The clear dropped what Twilio had queued: a later silent end_call gets its grace."""
    h = ready()
    h.agent(STARTED)
    h.speak(b"\x10" * 4000)  # no AgentAudioDone: the caller interrupts mid-turn
    h.agent(BARGE)
    h.at(1.0)
    assert ArmTimer(Timer.HANGUP_GRACE, 2.5) in h.agent(request(("bye", "end_call", {})))
    h.advance_to(2.5)
    assert h.hangups == [hang_up("agent ended the call")]


def test_barge_in_without_a_hang_up_pending_cancels_nothing() -> None:
    h = ready()
    assert records(h.agent(BARGE), "hangup_cancelled") == []


def test_function_call_cancelled_naming_end_call_keeps_the_call_up() -> None:
    """f8f08d5: Deepgram took end_call back."""
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.speak(b"\x10" * 800)
    h.agent(DONE)
    out = h.agent(cancelled("bye"))
    assert quiet(out) == [
        CancelTimer(Timer.HANGUP_FALLBACK),
        CancelTimer(Timer.HANGUP_GRACE),
        Record("hangup_cancelled", {"reason": "the agent cancelled end_call"}),
    ]
    assert quiet(h.echo("end-call-1")) == [Record("mark_played", {"name": "end-call-1"})]  # heard, no hang-up
    h.advance(60)
    assert h.hangups == []


def test_function_call_cancelled_naming_another_call_does_not_cancel_the_hang_up() -> None:
    h = ready()
    h.agent(request(("bye", "end_call", {})))
    out = h.agent(cancelled("something-else"))
    assert out == []
    h.advance(1.5)
    assert h.hangups == [hang_up("agent ended the call")]


def test_repeated_end_call_while_speaking_cancels_the_earlier_grace() -> None:
    """3de8d92: the second request re-arms the fallback and leaves no grace timer from the first."""
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    assert h.armed[Timer.HANGUP_GRACE] == 2.5
    h.at(2.0)
    h.agent(STARTED)
    out = h.agent(request(("bye-again", "end_call", {})))
    assert quiet(out) == [
        answer("bye-again", "end_call", END_CALL_ANSWER),
        end_call_record(),
        ArmTimer(Timer.HANGUP_FALLBACK, 12.0),
        CancelTimer(Timer.HANGUP_GRACE),
    ]
    assert set(h.armed) == {Timer.KEEPALIVE, Timer.HANGUP_FALLBACK}
    assert h.call.summary()["function_calls"] == 2


def test_repeated_silent_end_call_restarts_the_grace() -> None:
    h = ready()
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.at(2.0)
    out = quiet(h.agent(request(("bye-again", "end_call", {}))))
    assert out[-3:] == [
        ArmTimer(Timer.HANGUP_FALLBACK, 12.0),
        CancelTimer(Timer.HANGUP_GRACE),
        ArmTimer(Timer.HANGUP_GRACE, 3.5),
    ]
    assert [a for a in out if isinstance(a, ArmTimer) and a.timer is Timer.HANGUP_GRACE] == [ArmTimer(Timer.HANGUP_GRACE, 3.5)]
    h.advance_to(3.49)
    assert h.hangups == []  # the first grace (2.5) is gone
    h.advance_to(3.5)
    assert h.hangups == [hang_up("agent ended the call")]


def test_only_the_first_end_reason_is_recorded_and_only_one_hang_up() -> None:
    h = ready()
    h.agent(request(("bye", "end_call", {})))
    h.advance(1.5)
    assert h.hangups == [hang_up("agent ended the call")]
    assert h.shutdown() == [] and h.failed() == [] and h.stop() == [] and h.agent_closed(1006) == []
    assert h.call.summary()["ended_by"] == "agent ended the call"


def test_a_turn_begun_after_the_grace_is_not_cut_off_by_an_earlier_marks_echo() -> None:
    h = ready()
    goodbye = h.turn(4000)
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.advance_to(2.5)  # grace over, the goodbye still playing
    h.at(3.0)
    h.agent(STARTED)  # "...and don't forget your prescription" begins
    h.at(3.01)
    h.echo(goodbye)  # arrives before the new turn's first audio
    assert h.hangups == [], "hung up as the agent began its last words"


def test_a_repeated_end_call_after_the_first_grace_ran_out_gets_a_fresh_grace() -> None:
    h = ready()
    goodbye = h.turn(4000)
    h.at(1.0)
    h.agent(request(("bye", "end_call", {})))
    h.advance_to(2.5)  # first grace over, the goodbye still playing
    h.at(3.0)
    h.agent(request(("bye-again", "end_call", {})))  # grace afresh: until 4.5
    h.at(3.2)
    h.echo(goodbye)
    assert h.hangups == [], "hung up inside the fresh grace"
    h.advance_to(4.5)
    assert h.hangups == [hang_up("agent ended the call")]


# ---------------------------------------------------------------- hang-up, random interleavings

GRACE = 1.5  # HANGUP_GRACE_SECONDS, as the docstring states it
# Each op is (kind, amount): amount is the seconds of agent "audio" or of a "wait". Kinds that
# move a goodbye along come more often than the ones that call it off.
OPS = st.lists(
    st.tuples(
        st.sampled_from(
            ["wait", "done", "audio", "echo", "end_call", "started", "wait", "echo", "done", "end_call",
             "audio", "barge", "cancel_end_call", "cancel_other"]
        ),
        st.sampled_from([1.5, 0.5, 2.0, 0.1, 1.0, 12.0, 0.0, 1.49, 5.0]),
    ),
    max_size=30,
)


class TwilioModel:
    """Drives a Harness as Twilio and the agent would, and checks the hang-up rules at every step.

    It keeps what the rules need: the marks Twilio will echo (in order, and whether a clear
    flushed them), whether the agent is speaking, the end_call in force, and when its grace and
    fallback are due. Safety: a hang-up only as one of the three ways allows. Liveness: a hang-up
    as soon as one of them says so (the end-call mark of the request in force echoed; the grace
    over with nothing being spoken and every mark heard; the fallback due).
    """

    def __init__(self) -> None:
        self.h = ready()
        self.pending: deque[list[Any]] = deque()  # [name, cleared, request in force when sent]
        self.turn_open = False
        self.unmarked = 0  # agent audio since the last mark or clear
        self.ended_calls = 0
        self.requested: str | None = None  # the end_call id in force
        self.requested_since = 0.0  # the first end_call since the last cancel
        self.grace_at: float | None = None
        self.when_heard = False
        self.fallback_at: float | None = None

    @property
    def speaking(self) -> bool:
        return self.turn_open or self.unmarked > 0

    def all_heard(self) -> bool:
        return self.unmarked == 0 and all(cleared for _, cleared, _ in self.pending)

    def cancel(self) -> None:
        self.requested = self.grace_at = self.fallback_at = None
        self.when_heard = False

    def run(self, op: tuple[Any, ...]) -> None:
        h, kind = self.h, op[0]
        if h.hangups:
            return
        echoed: list[Any] | None = None
        if kind == "started":
            h.agent(STARTED)
            self.turn_open = True
        elif kind == "audio":
            size = int(op[1] * 8000)  # that many seconds of audio
            h.speak(b"\x10" * size)
            self.unmarked += size
        elif kind == "done":
            for mark in of(h.agent(DONE), MarkCaller):
                self.pending.append([mark.name, False, self.requested])
            if self.requested is not None:
                self.fallback_at = h.now + h.settings.limits.hangup_timeout_seconds + self.unmarked / 8000
            self.unmarked = 0
            self.turn_open = False
        elif kind == "echo" and self.pending:
            echoed = self.pending.popleft()
            h.echo(echoed[0])
        elif kind == "barge":
            h.agent(BARGE)
            for item in self.pending:
                item[1] = True
            self.unmarked = 0
            self.turn_open = False
            self.cancel()
        elif kind == "wait":
            self.wait(op[1])
            return
        elif kind == "end_call":
            self.ended_calls += 1
            call_id = f"bye-{self.ended_calls}"
            h.agent(request((call_id, "end_call", {})))
            if self.requested is None:
                self.requested_since = h.now
            self.requested = call_id
            self.fallback_at = h.now + h.settings.limits.hangup_timeout_seconds
            self.grace_at = None if self.speaking else h.now + GRACE
            self.when_heard = False  # a fresh grace
        elif kind == "cancel_end_call" and self.requested is not None:
            h.agent(cancelled(self.requested))
            self.cancel()
        elif kind == "cancel_other":
            h.agent(cancelled("not-end-call"))
        if h.hangups:
            self.check_hang_up(echoed)
            return
        # Liveness.
        if echoed is not None and not echoed[1] and echoed[0].startswith("end-call"):
            assert echoed[2] != self.requested, "the goodbye's end-call mark was heard but no hang-up"
        if self.requested is not None and self.when_heard and not self.turn_open:
            assert not self.all_heard(), "every mark heard after the grace, but no hang-up"

    def wait(self, seconds: float) -> None:
        h = self.h
        target = h.now + seconds
        while not h.hangups:
            due = [at for at in (self.grace_at, self.fallback_at) if at is not None and at <= target]
            if not due:
                h.advance_to(target)
                if h.hangups:
                    self.check_hang_up(None)
                return
            at = min(due)
            h.advance_to(at)
            if h.hangups:
                self.check_hang_up(None)
                return
            if at == self.fallback_at:
                raise AssertionError("the fallback was due but did not hang up")
            self.grace_at = None
            if not self.speaking:
                self.when_heard = True
                assert not self.all_heard(), "the grace ran out with everything heard, but no hang-up"

    def check_hang_up(self, echoed: list[Any] | None) -> None:
        h = self.h
        assert self.requested is not None, "hung up with no end_call in force"
        [hang_up] = h.hangups
        if hang_up.end.ended_by == "agent ended the call (goodbye not confirmed)":
            assert self.fallback_at is not None and h.hung_up_at == pytest.approx(self.fallback_at)
        else:
            assert hang_up.end.ended_by == "agent ended the call"
            if echoed is not None and not echoed[1] and echoed[0].startswith("end-call"):
                return  # way 1: a goodbye after the request, heard
            # Way 2: the goodbye came before the request: after the grace, once everything sent was heard.
            assert h.hung_up_at is not None
            assert h.hung_up_at >= self.requested_since + GRACE - 1e-9, "hung up in the grace"
            assert self.all_heard(), "hung up with a mark still playing or agent audio not yet marked"


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_turns_marks_and_barge_ins_hang_up_only_and_always_as_the_rules_say(ops: list[tuple[Any, ...]]) -> None:
    model = TwilioModel()
    h = model.h
    for op in ops:
        model.run(op)
    if h.hangups:
        return
    in_force = model.requested is not None
    while model.pending and not h.hangups:
        model.run(("echo",))
    model.run(("wait", 120.0))
    if in_force:
        assert len(h.hangups) == 1
    else:
        assert h.hangups == [], "hung up with no end_call in force"


# ================================================================================== functions


def test_client_side_calls_start_and_their_results_are_answered_and_recorded() -> None:
    h = ready()
    message = {
        "type": "FunctionCallRequest",
        "functions": [
            {"id": "f1", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True},
            {"id": "s1", "name": "server_side", "arguments": "{}", "client_side": False},
            {"id": "", "name": "nameless", "arguments": "{}", "client_side": True},
        ],
    }
    out = h.agent(message)
    assert quiet(out) == [StartFunction(FunctionCall("f1", "get_drug_info", '{"drug_name": "ibuprofen"}'))]
    assert h.call.bad_input == {"deepgram:bad-function-call": 1}
    h.at(0.5)
    out = h.finished("f1", outcome({"price": 5}, duration=0.123456))
    assert quiet(out) == [
        Record(
            "function_call",
            {
                "name": "get_drug_info",
                "arguments": '{"drug_name": "ibuprofen"}',
                "result": {"price": 5},
                "error": None,
                "outcome": "ok",
                "duration_seconds": 0.1235,
                "withdrawn": False,
            },
        ),
        answer("f1", "get_drug_info", '{"price": 5}'),
    ]
    assert h.finished("f1", outcome({"price": 5})) == []  # only once
    assert h.call.summary()["function_calls"] == 1 and not h.call.functions.any_running


def test_a_second_request_for_a_running_id_is_bad_input() -> None:
    h = ready()
    h.agent(request(("f1", "slow", {})))
    assert quiet(h.agent(request(("f1", "slow", {})))) == []
    assert h.call.bad_input == {"deepgram:duplicate-function-id": 1}
    assert len(of(h.actions, StartFunction)) == 1


def test_withdrawn_thread_finishes_is_recorded_and_is_never_answered() -> None:
    """e2e4001: a plain def may be halfway through placing an order: it runs on, unanswered."""
    h = ready()
    h.agent(request(("t1", "place_order", {"drug_name": "ibuprofen"})))
    out = h.agent(cancelled("t1"))
    assert quiet(out) == [Record("function_cancelled", {"id": "t1", "name": "place_order"})]
    assert h.agent(cancelled("t1")) == []  # withdrawn once
    out = h.finished("t1", outcome({"order_id": 7}))
    assert quiet(out) == [
        Record(
            "function_call",
            {
                "name": "place_order",
                "arguments": '{"drug_name": "ibuprofen"}',
                "result": {"order_id": 7},
                "error": None,
                "outcome": "ok",
                "duration_seconds": 0.25,
                "withdrawn": True,
            },
        )
    ]
    assert json.loads(h.call.history[-1])["function_calls"][0]["id"] == "t1"


def test_withdrawn_async_function_is_cancelled_and_its_end_recorded_unanswered() -> None:
    h = ready(async_functions={"async_lookup"})
    h.agent(request(("a1", "async_lookup", {}), ("a2", "async_lookup", {})))
    out = h.agent(cancelled("a1"))
    assert quiet(out) == [Record("function_cancelled", {"id": "a1", "name": "async_lookup"}), CancelFunction("a1")]
    out = h.finished("a1", outcome(error="cancelled: the agent withdrew the call", duration=0.1))
    assert json_sent(out) == []
    assert records(out)[0].fields["withdrawn"] is True and records(out)[0].fields["error"] == (
        "cancelled: the agent withdrew the call"
    )
    out = h.finished("a2", outcome({"ok": True}))
    assert json_sent(out) == [{"type": "FunctionCallResponse", "id": "a2", "name": "async_lookup", "content": '{"ok": true}'}]
    assert h.call.summary()["function_errors"] == 1 and h.call.summary()["function_calls"] == 2


def test_thread_that_outlived_its_timeout_is_recorded_when_it_returns() -> None:
    """e2e4001: the agent heard "took too long"; the thread may still have placed the order."""
    h = ready()
    late = FunctionCall("late", "slow", '{"seconds": 0.6}')
    out = h.call.function_finished_late(late, outcome({"slept": 0.6}, duration=0.61234))
    assert list(out) == [
        Record(
            "function_finished_late",
            {"id": "late", "name": "slow", "result": {"slept": 0.6}, "error": None, "duration_seconds": 0.6123},
        )
    ]
    h.shutdown()
    assert len(h.call.function_finished_late(late, outcome({"slept": 0.6}))) == 1  # after the hang-up too


def test_function_cut_off_by_the_hang_up_is_still_recorded_but_nothing_is_sent() -> None:
    """e2e4001: a hang-up records the function it cut off."""
    h = ready(browser=True)
    h.agent(request(("o1", "place_order", {})))
    h.stop()
    out = h.finished("o1", outcome(error="the call ended before it finished", duration=2.0))
    assert out == [
        Record(
            "function_call",
            {
                "name": "place_order",
                "arguments": "{}",
                "result": None,
                "error": "the call ended before it finished",
                "outcome": "error",
                "duration_seconds": 2.0,
                "withdrawn": False,
            },
        )
    ]
    assert h.call.summary()["function_calls"] == 1 and h.call.summary()["function_errors"] == 1


# ===================================================================================== resume


@pytest.mark.parametrize("code", [1001, 1006, 1011, 1012, 1013, 1014, None])
def test_a_resumable_close_starts_a_resume(code: int | None) -> None:
    h = ready()
    h.at(2.0)
    out = h.agent_closed(code)
    assert quiet(out) == [
        CancelTimer(Timer.KEEPALIVE),
        Record("error", {"source": "deepgram", "code": code or 1006, "description": "connection dropped"}),
        ArmTimer(Timer.AGENT_OPEN, 5.0),  # a reconnect's handshake gets at most 3 s
        OpenAgent(resuming=True),
    ]
    assert h.call.phase is Phase.RESUMING and h.hangups == [] and h.call.summary()["errors"] == 1
    assert not h.call.agent_ready, "audio does not flow both ways while the session is being reopened"


@pytest.mark.parametrize("code", [1000, 1002, 1003, 1007, 1008, 1009, 1010, 1015, 4000])
def test_other_close_codes_end_the_call(code: int) -> None:
    h = ready()
    out = h.agent_closed(code, "bye")
    assert quiet(out) == [CancelTimer(Timer.KEEPALIVE), hang_up(f"Deepgram closed the session (code {code})")]
    assert of(h.actions, OpenAgent) == [OpenAgent(resuming=False)]


def test_an_agent_that_stopped_reading_ends_the_call() -> None:
    h = ready()
    assert quiet(h.agent_closed(1006, stalled=True)) == [CancelTimer(Timer.KEEPALIVE), hang_up("agent stopped reading")]


def test_resumed_session_gets_the_history_without_the_greeting() -> None:
    h = ready()
    h.agent(text("assistant", GREETING))
    h.agent(text("user", "Do you have ibuprofen?"))
    h.agent(request(("f1", "get_drug_info", {"drug_name": "ibuprofen"})))
    h.finished("f1", outcome({"stock": 3}))
    h.at(1.0)
    h.agent_closed(1011)
    h.agent_connected()
    out = h.agent(WELCOME)
    [settings_sent] = json_sent(out)
    assert "greeting" not in settings_sent["agent"]
    assert settings_sent["agent"]["context"]["messages"] == [
        {"type": "History", "role": "assistant", "content": "(configured)"},
        {"type": "History", "role": "assistant", "content": GREETING},
        {"type": "History", "role": "user", "content": "Do you have ibuprofen?"},
        {
            "type": "History",
            "function_calls": [
                {
                    "id": "f1",
                    "name": "get_drug_info",
                    "client_side": True,
                    "arguments": '{"drug_name": "ibuprofen"}',
                    "response": '{"stock": 3}',
                }
            ],
        },
    ]
    assert AGENT_SETTINGS["agent"]["greeting"] == GREETING  # the configured settings are untouched
    h.at(1.5)
    out = h.agent(APPLIED)
    assert quiet(out) == [
        CancelTimer(Timer.AGENT_OPEN),
        ArmTimer(Timer.KEEPALIVE, 101.5),
        Record("agent_resumed", {"attempt": 1, "history_items": 3}),
    ]
    assert h.call.phase is Phase.CONVERSING and h.call.link.generation == 2


def test_a_first_session_gets_the_settings_as_configured() -> None:
    h = Harness()
    h.connected()
    h.start()
    h.agent_connected()
    assert json_sent(h.agent(WELCOME)) == [AGENT_SETTINGS]


def test_resume_waits_for_running_functions_before_reconnecting() -> None:
    """e2e4001: a function running across the drop must be in the new session's history."""
    h = ready()
    h.agent(request(("o1", "place_order", {"drug_name": "ibuprofen"})))
    h.at(2.0)
    out = h.agent_closed(1006)
    assert quiet(out)[-1] == ArmTimer(Timer.FUNCTIONS_WAIT, 13.0)
    assert of(out, OpenAgent) == []
    h.at(2.5)
    out = h.finished("o1", outcome({"order_id": 7}))
    assert json_sent(out) == []  # no session to answer
    assert quiet(out)[1:] == [CancelTimer(Timer.FUNCTIONS_WAIT), ArmTimer(Timer.AGENT_OPEN, 5.5), OpenAgent(resuming=True)]
    h.agent_connected()
    [settings_sent] = json_sent(h.agent(WELCOME))
    assert settings_sent["agent"]["context"]["messages"][-1]["function_calls"][0]["response"] == '{"order_id": 7}'


def test_resume_reconnects_when_the_functions_wait_runs_out() -> None:
    h = ready()
    h.agent(request(("o1", "place_order", {})))
    h.at(2.0)
    h.agent_closed(1006)
    h.advance_to(12.99)
    assert of(h.actions, OpenAgent) == [OpenAgent(resuming=False)]
    out = h.advance_to(13.0)
    assert quiet(out) == [ArmTimer(Timer.AGENT_OPEN, 16.0), OpenAgent(resuming=True)]
    h.agent_connected()
    h.at(13.5)
    out = h.finished("o1", outcome({"order_id": 7}))  # during the handshake: no second attempt
    assert of(out, OpenAgent) == [] and json_sent(out) == []


def test_an_answer_for_an_older_agent_session_is_not_sent() -> None:
    h = ready()
    h.agent(request(("o1", "place_order", {})))
    h.agent_closed(1006)
    h.fire(Timer.FUNCTIONS_WAIT)
    h.resume_ready()
    assert h.call.link.generation == 2
    h.agent(request(("o2", "lookup_order", {})))
    out = h.finished("o1", outcome({"order_id": 7}))
    assert json_sent(out) == []
    assert "agent session was replaced" in logs(out)[0].message
    assert json.loads(h.call.history[-1])["function_calls"][0]["id"] == "o1"
    out = h.finished("o2", outcome({"status": "ready"}))  # asked by this session: answered
    assert json_sent(out) == [{"type": "FunctionCallResponse", "id": "o2", "name": "lookup_order", "content": '{"status": "ready"}'}]


@pytest.mark.parametrize("delays", [(), (0.5,), (0.25, 0.75, 1.5)])
def test_resume_makes_one_attempt_plus_one_per_delay_then_ends_the_call(delays: tuple[float, ...]) -> None:
    h = ready(agent_reconnect_delays=delays)
    h.at(1.0)
    out = h.agent_closed(1006)
    opened_at: list[float] = []
    for _ in range(20):
        if h.hangups:
            break
        if of(out, OpenAgent):
            opened_at.append(h.now)
            out = h.agent_open_failed("cannot reach Deepgram")
        else:
            out = h.fire(Timer.RECONNECT)
    assert opened_at == pytest.approx([1.0 + sum(delays[:n]) for n in range(len(delays) + 1)])
    assert h.hangups == [hang_up("agent connection lost")]


def test_each_kind_of_failed_attempt_counts_and_a_later_attempt_resumes() -> None:
    h = ready(agent_connect_timeout_seconds=2.0)
    h.at(1.0)
    h.agent_closed(1012)
    assert h.armed[Timer.AGENT_OPEN] == 3.0  # min(2.0, 3.0)
    h.agent_connected()
    h.fire(Timer.AGENT_OPEN)  # attempt 1: timed out waiting for Welcome
    assert h.armed[Timer.RECONNECT] == 3.25
    h.fire(Timer.RECONNECT)
    h.agent_connected()
    h.agent(WELCOME)
    h.agent({"type": "Error", "code": "X", "description": "no"})  # attempt 2 refused
    h.fire(Timer.RECONNECT)
    h.agent_connected()
    h.agent_closed(1011)  # attempt 3 closed mid-handshake
    h.fire(Timer.RECONNECT)
    out = h.resume_ready()  # attempt 4
    assert records(out, "agent_resumed") == [Record("agent_resumed", {"attempt": 4, "history_items": 0})]
    assert h.hangups == [] and h.call.link.attempt == 0
    assert len(of(h.actions, OpenAgent)) == 5 and len(of(h.actions, CloseAgent)) == 3


def test_a_resumed_session_that_drops_again_gets_all_its_attempts_again() -> None:
    h = ready(agent_reconnect_delays=(0.5,))
    h.agent_closed(1006)
    h.agent_open_failed()
    h.fire(Timer.RECONNECT)
    h.resume_ready()
    h.agent_closed(1006)  # attempts count afresh
    h.agent_open_failed()
    assert Timer.RECONNECT in h.armed and h.hangups == []


def test_gap_audio_is_dropped_and_counted_and_later_audio_goes_to_the_new_session() -> None:
    h = ready()
    h.media(pattern(150))  # short of a chunk when the agent drops
    h.agent_closed(1006)
    assert h.call.inbound.bytes_dropped == 150
    assert audio_sent(h.media(pattern(800, seed=4))) == []
    h.resume_ready()
    assert audio_sent(h.actions) == []
    fresh = pattern(400, seed=5)
    assert quiet(h.media(fresh)) == [SendToAgent(fresh)]
    assert h.call.summary()["audio_bytes_dropped_in_reconnect"] == 950


def test_gap_audio_shorter_than_a_chunk_is_dropped_too() -> None:
    h = ready()
    h.agent_closed(1006)
    h.media(pattern(100, seed=6))  # stale speech during the gap
    h.resume_ready()
    fresh = pattern(400, seed=7)
    assert audio_sent(h.media(fresh)) == [fresh]
    assert h.call.inbound.bytes_dropped == 100


def test_caller_hanging_up_during_a_resume_ends_the_call() -> None:
    h = ready()
    h.agent_closed(1006)
    h.agent_open_failed()
    assert quiet(h.stop()) == [hang_up("caller hung up")]


def test_a_failed_resume_ends_the_call_even_with_a_hang_up_pending() -> None:
    h = ready(agent_reconnect_delays=())
    h.agent(request(("bye", "end_call", {})))
    h.agent_closed(1006)
    h.agent_open_failed()
    assert h.hangups == [hang_up("agent connection lost")]


# ================================================================================== keepalive


def test_keepalive_only_when_no_audio_went_out_for_keepalive_seconds() -> None:
    h = ready(keepalive_seconds=5.0)
    assert h.armed[Timer.KEEPALIVE] == 5.0
    h.at(3.0)
    h.media(pattern(400))  # a whole chunk goes out at 3.0
    out = h.fire(Timer.KEEPALIVE)
    assert quiet(out) == [ArmTimer(Timer.KEEPALIVE, 8.0)]
    out = h.fire(Timer.KEEPALIVE)
    assert quiet(out) == [SendToAgent(agent_protocol.KEEPALIVE), ArmTimer(Timer.KEEPALIVE, 13.0)]
    assert h.now == 8.0


def test_audio_still_short_of_a_chunk_is_not_audio_sent() -> None:
    h = ready(keepalive_seconds=5.0)
    h.at(3.0)
    h.media(pattern(399))  # buffered, not sent
    assert json_sent(h.fire(Timer.KEEPALIVE)) == [{"type": "KeepAlive"}]


def test_keepalive_chain_stops_with_the_call() -> None:
    h = ready(keepalive_seconds=5.0)
    h.shutdown()
    assert h.fire(Timer.KEEPALIVE) == [] and Timer.KEEPALIVE not in h.armed


# ============================================================================ how calls end


def test_the_first_end_reason_wins() -> None:
    h = Harness()
    h.connected()
    h.start()
    h.stop()  # caller gone while the agent opens: the tail waits
    h.agent_connected()
    h.agent(WELCOME)
    h.agent({"type": "Error", "code": "BUSY", "description": "later"})
    assert h.hangups == [hang_up("caller hung up")]
    assert h.call.summary()["ended_by"] == "caller hung up"


def test_shutdown_and_failure_reasons() -> None:
    h = ready()
    assert quiet(h.shutdown()) == [hang_up("server shutting down")]
    h = ready()
    assert quiet(h.failed()) == [hang_up("internal error")]
    assert h.shutdown() == [] and h.call.phase is Phase.ENDED


def test_after_the_hang_up_nothing_twilio_or_the_agent_sends_does_anything() -> None:
    h = ready()
    h.shutdown()
    assert h.media(pattern(800)) == [] and h.caller_binary(b"x") == [] and h.echo("agent-turn-1") == []
    assert h.agent(text("user", "hello?")) == [] and h.agent(BARGE) == [] and h.agent_closed(1006) == []
    assert h.call.bad_input == {} and h.call.summary()["audio_bytes_from_caller"] == 0


def test_deepgram_error_mid_call_resumes_the_session() -> None:
    h = ready()
    out = h.agent({"type": "Error", "code": "CLIENT_MESSAGE_TIMEOUT", "description": "no audio"})
    assert quiet(out) == [
        Record("error", {"source": "deepgram", "code": "CLIENT_MESSAGE_TIMEOUT", "description": "no audio"}),
        CancelTimer(Timer.KEEPALIVE),
        CloseAgent(),
        ArmTimer(Timer.AGENT_OPEN, 3.0),
        OpenAgent(resuming=True),
    ]
    assert h.call.phase is Phase.RESUMING and h.call.summary()["errors"] == 1


def test_deepgram_errors_mid_call_resume_a_bounded_number_of_times_then_end_the_call() -> None:
    h = ready()
    error = {"type": "Error", "code": "E", "description": "d"}
    for _ in range(call_module.MAX_ERROR_RESUMES):
        h.agent(error)
        assert h.call.phase is Phase.RESUMING
        h.agent_connected()
        h.agent(WELCOME)
        h.agent(APPLIED)  # ready again, and the attempt count starts afresh: not the error count
        assert h.call.phase is Phase.CONVERSING
    out = h.agent(error)
    assert quiet(out)[-1] == hang_up("Deepgram error E")
    assert h.call.summary()["errors"] == call_module.MAX_ERROR_RESUMES + 1


# ======================================================================== before start, bad input


def test_nothing_before_start_is_kept_only_counted() -> None:
    h = Harness()
    h.connected()
    for _ in range(3):
        h.media(pattern(800))
    h.echo("agent-turn-1")
    h.twilio(dtmf_frame("7"))
    assert quiet(h.actions) == [ArmTimer(Timer.START, 10.0)]
    assert h.call.bad_input == {"twilio:media-before-start": 3, "twilio:mark-before-start": 1, "twilio:dtmf-before-start": 1}
    assert len(h.call.inbound.partial) == 0 and h.call.summary()["audio_bytes_from_caller"] == 0
    h.start()
    h.agent_connected()
    h.agent(WELCOME)
    assert audio_sent(h.agent(APPLIED)) == []


def test_bad_input_is_logged_once_per_kind_and_counted() -> None:
    h = ready()
    out: list[Any] = []
    for _ in range(2):
        out += h.caller_binary(b"\x00")
        out += h.twilio("not json")
        out += h.twilio("[1, 2]")
        out += h.twilio('{"no": "event"}')
        out += h.twilio(compact({"event": "media", "media": {"payload": "%%%"}}))
        out += h.twilio(compact({"event": "surprise"}))
        out += h.start()
        out += h.agent("{oops")
        out += h.agent({"type": "ConversationText", "role": 1})
        out += h.agent({"type": "FunctionCallRequest", "functions": "nope"})
    assert quiet(out) == []
    assert len(logs(out)) == 10 and all(log.level == logging.WARNING for log in logs(out))
    assert h.call.bad_input == {
        "twilio:binary": 2,
        "twilio:not-json": 2,
        "twilio:not-object": 2,
        "twilio:no-event": 2,
        "twilio:bad-base64": 2,
        "twilio:unknown-event": 2,
        "twilio:second-start": 2,
        "deepgram:not-json": 2,
        "deepgram:bad-conversation-text": 2,
        "deepgram:bad-functions": 2,
    }
    assert h.call.stream is not None and h.call.phase is Phase.CONVERSING


def test_bad_input_kinds_are_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(call_stats, "MAX_BAD_INPUT_KINDS", 2)
    h = ready()
    out = h.caller_binary(b"\x00") + h.twilio("nope") + h.twilio("[]") + h.twilio("{}") + h.agent("{oops")
    out += h.twilio("[]")
    assert h.call.bad_input == {"twilio:binary": 1, "twilio:not-json": 1, "twilio:other": 3, "deepgram:other": 1}
    assert len(logs(out)) == 4


def test_dtmf_is_recorded_without_the_digit() -> None:
    h = ready()
    out = [*h.twilio(dtmf_frame("4")), *h.twilio(dtmf_frame("#"))]
    sent = [action for action in out if isinstance(action, SendToAgent)]
    assert sent == [SendToAgent(agent_protocol.inject_user_message("The caller pressed 4"))]
    assert Record("dtmf", {"keys": 1}) in out
    assert "4" not in repr([action for action in out if not isinstance(action, SendToAgent)]).replace(SID, "").replace(CALL_SID, "")


def test_media_on_the_full_parse_path_is_the_same_audio() -> None:
    h = ready()
    audio = pattern(400, seed=9)
    assert quiet(h.media(audio, slow=True)) == [SendToAgent(audio)]


# ===================================================================== transcripts and browser


def test_transcripts_warnings_and_latency_are_recorded() -> None:
    h = ready()
    assert quiet(h.agent(text("user", "hi"))) == [Record("transcript", {"role": "user", "content": "hi"})]
    assert quiet(h.agent(text("system", "x"))) == [Record("transcript", {"role": "assistant", "content": "x"})]
    assert quiet(h.agent(STARTED)) == [
        Record("agent_started_speaking", {"total_latency": 0.5, "tts_latency": 0.2, "ttt_latency": 0.3})
    ]
    assert quiet(h.agent({"type": "Warning", "code": "W", "description": "slow"})) == [
        Record("warning", {"code": "W", "description": "slow"})
    ]
    assert quiet(h.agent({"type": "History", "role": "user", "content": "x"})) == []


def test_browser_events_go_to_the_browser_only() -> None:
    def script(h: Harness) -> list[str]:
        h.agent(text("user", "hi"))
        h.agent({"type": "AgentStartedSpeaking", "total_latency": 0.5, "tts_latency": "x"})
        h.agent(request(("f1", "get_drug_info", {"drug_name": "ibuprofen"})))
        h.finished("f1", outcome({"stock": 3}, duration=0.0123))
        h.shutdown()
        return [a.text for a in of(h.actions, SendToCaller)]

    assert script(ready()) == []
    assert [json.loads(t) for t in script(ready(browser=True))] == [
        {"event": "transcript", "role": "user", "content": "hi"},
        {"event": "agent_latency", "total_latency": 0.5, "tts_latency": None, "ttt_latency": None},
        {
            "event": "function_call",
            "name": "get_drug_info",
            "arguments": {"drug_name": "ibuprofen"},
            "result": {"stock": 3},
            "duration_ms": 12.3,
        },
        {"event": "call_ended", "reason": "server shutting down"},
    ]


def test_the_browser_is_not_told_the_call_ended_when_it_hung_up_itself() -> None:
    h = ready(browser=True)
    assert quiet(h.stop()) == [hang_up("caller hung up")]


def test_summary_fields() -> None:
    h = Harness()
    h.connected()
    h.start({"caller": "+15550100"})
    h.agent_connected()
    h.agent(WELCOME)
    h.agent(APPLIED)
    h.media(pattern(900))
    h.agent({"type": "AgentStartedSpeaking", "total_latency": 1.0})
    h.speak(b"\x10" * 320)
    h.agent({"type": "AgentStartedSpeaking", "total_latency": 2.0})
    h.agent(text("user", "hi"))
    h.agent(BARGE)
    h.agent({"type": "Warning", "code": "W", "description": "d"})
    h.agent(request(("f1", "get_drug_info", {})))
    h.finished("f1", outcome(error="boom"))
    h.caller_binary(b"x")
    h.stop()
    assert h.call.summary() == {
        "call_sid": CALL_SID,
        "stream_sid": SID,
        "custom_parameters": {"caller": "+15550100"},
        "ended_by": "caller hung up",
        "end_reason": "caller_hung_up",
        "audio_bytes_from_caller": 900,
        "audio_bytes_to_agent": 900,
        "audio_bytes_to_caller": 320,
        "audio_bytes_dropped_in_reconnect": 0,
        "recording_sid": None,
        "bad_input": {"twilio:binary": 1},
        "turns": 1,
        "barge_ins": 1,
        "function_calls": 1,
        "function_errors": 1,
        "warnings": 1,
        "errors": 0,
        "agent_latency_p50": 1.5,
        "agent_latency_p95": 1.95,
        "latency_reports": 0,
        "keypad_entries": 0,
        "idle_reprompts": 0,
        "agent_request_ids": ["req-1"],
    }


def test_summary_of_a_call_that_never_started() -> None:
    h = Harness()
    h.connected()
    h.fire(Timer.START)
    summary = h.call.summary()
    assert (summary["call_sid"], summary["stream_sid"], summary["custom_parameters"]) == (None, None, {})
    assert summary["ended_by"] == "no start event from Twilio"
    assert summary["agent_latency_p50"] is None and summary["agent_latency_p95"] is None


# ---------------------------------------------------------------------- call control (issue 12)

REST = {"twilio_account_sid": "AC" + "a" * 32, "twilio_auth_token": "t", "transfer_number": "+15550001111"}


def test_an_agent_lost_during_a_transfer_sends_no_fallback_update_over_the_transfer() -> None:
    from bridge.call import HangUp, TransferCall

    h = ready(**REST)
    h.agent(request(("t1", "transfer_call", {"reason": "pharmacist"})))
    h.advance_to(h.now + 2.0)  # the grace: nothing was being said, so the transfer goes out
    assert of(h.actions, TransferCall) and h.call.departure.transferring
    actions = h.agent_closed(1000)  # Deepgram ends its session while the REST update is in flight
    [hang_up] = of(actions, HangUp)
    assert not hang_up.fallback, "a fallback update would race the transfer and could win"


def test_the_browser_phone_gets_no_transfer_and_no_fallback() -> None:
    """Its callSid is whatever the page says: the bridge must never change a Twilio call for it."""
    from bridge.call import HangUp, TransferCall

    h = ready(browser=True, **REST)
    h.agent(request(("t1", "transfer_call", {})))
    h.advance_to(h.now + 20.0)
    assert not of(h.actions, TransferCall)
    [hang_up] = of(h.agent_closed(1000), HangUp)
    assert not hang_up.fallback


def test_the_phase_changes_only_as_its_table_allows() -> None:
    """phase.TRANSITIONS is the whole truth: every listed move is made, every other one refused."""
    from bridge.call.phase import TRANSITIONS, PhaseError, PhaseEvent, PhaseMachine

    for phase, moves in TRANSITIONS.items():
        for event in PhaseEvent:
            machine = PhaseMachine()
            machine.phase = phase
            if event in moves:
                assert machine.move(event) is moves[event]
            else:
                with pytest.raises(PhaseError):
                    machine.move(event)
    assert TRANSITIONS[Phase.ENDED] == {}
    assert all(PhaseEvent.ENDED in TRANSITIONS[phase] for phase in Phase if phase is not Phase.ENDED)


@pytest.mark.parametrize("mode", ["redacted", "none"])
def test_a_function_error_and_a_transfer_reason_keep_the_callers_words_only_as_the_mode_says(mode: str) -> None:
    """Besides turns, arguments and results, the model writes the caller's words into a transfer's
    reason, and a function's error may quote them: under STORE_TRANSCRIPTS=redacted and none, no
    record line and no log line holds them (docs/privacy.md)."""
    from bridge.call import TransferCall

    private = ("415 555 0134", "0134", "ann.lee", "example.com")
    said = "order 415 555 0134 for ann.lee@example.com"
    h = ready(store_transcripts=mode, **REST)
    h.agent(request(("f1", "get_drug_info", {"drug_name": "ibuprofen"})))
    h.finished("f1", outcome(error=f"no {said}"))
    h.agent(request(("t1", "transfer_call", {"reason": f"wants {said}"})))
    h.advance_to(h.now + 2.0)
    assert of(h.actions, TransferCall)
    h.take(h.call.transfer_finished(None, h.now))
    lines = [record.fields for record in records(h.actions)]
    logged = [log.message % log.args for log in logs(h.actions)]
    for private_text in private:
        assert private_text not in json.dumps(lines), f"{private_text!r} in a record line"
        assert not any(private_text in line for line in logged), f"{private_text!r} in a log line"
    [failed] = [line for line in lines if line.get("name") == "get_drug_info"]
    [transferred] = records(h.actions, "transferred")
    if mode == "redacted":
        assert failed["error"] == "no order [redacted] for [redacted]"
        assert transferred.fields["reason"] == "wants order [redacted] for [redacted]"
    else:
        assert failed["error"] == "[redacted]" and transferred.fields["reason"] is None


def test_a_binding_holds_for_one_call_of_one_account_only() -> None:
    """The MAC covers the AccountSid as well as the CallSid: a stream naming the same CallSid under
    another account (which TWILIO_ACCOUNT_SID, when unset, would not catch) is not bound."""
    from bridge.binding import binding_key, binding_matches

    key = binding_key(None, "t0ken")
    assert key is not None
    mac = binding_mac(key, CALL_SID, "AC" + "a" * 32)
    assert binding_matches(key, CALL_SID, "AC" + "a" * 32, mac)
    assert not binding_matches(key, CALL_SID, "AC" + "b" * 32, mac)
    assert not binding_matches(key, "CA" + "e" * 32, "AC" + "a" * 32, mac)


def test_allow_unbound_call_control_lets_an_unbound_stream_be_transferred() -> None:
    """The operator's opt-in (for a TwiML Bin) is what it says: REST acts on the unbound stream."""
    from bridge.call import TransferCall

    h = Harness(**REST, allow_unbound_call_control=True)
    h.open(bound=False)
    h.agent(request(("t1", "transfer_call", {"reason": "pharmacist"})))
    h.advance_to(h.now + 2.0)
    assert [transfer.redirect.call_sid for transfer in of(h.actions, TransferCall)] == [CALL_SID]


def test_an_unbound_stream_gets_no_warm_transfer_either() -> None:
    """The pharmacist is never dialled for a call whose stream isn't bound: the agent hears why."""
    from bridge.call import DialPharmacist, TransferCall

    h = Harness(**REST, transfer_mode="warm", twilio_phone_number="+15550002222", public_url="https://bridge.example")
    h.open(bound=False)
    out = h.agent(request(("t1", "transfer_call", {"reason": "pharmacist", "summary": "Ann, order 12"})))
    h.advance_to(h.now + 40.0)
    assert not of(h.actions, DialPharmacist) and not of(h.actions, TransferCall)
    [answer] = [m for m in json_sent(out) if m.get("type") == "FunctionCallResponse"]
    assert "not available" in json.loads(answer["content"])["error"]


# ------------------------------------------------------------------ every line in the agent's words

OWN_LINES = {
    name: f"({name} in the agent's own words)"
    for name in ("idle_reprompt", "idle_goodbye", "transfer_failed", "fallback_transfer", "fallback_goodbye",
                 "voicemail", "recording_notice", "transfer_connecting", "transfer_declined")
}


def with_agent(file: dict[str, Any], **overrides: Any) -> Harness:
    """A call whose one agent's file sets what ``file`` gives (its "bridge" section's parts)."""
    from bridge.agents import AgentCatalog
    from bridge.config import AgentConfig

    h = Harness(**overrides)
    h.call = Call(h.settings, AgentCatalog.single(AgentConfig(settings=AGENT_SETTINGS, client_functions={}, **file)))
    return h


def with_own_lines(**overrides: Any) -> Harness:
    """A call whose agent's file sets every line the caller can hear (docs/agents.md)."""
    return with_agent({"lines": OWN_LINES}, **overrides)


def injected_texts(actions: Iterable[Any]) -> list[str]:
    """What the bridge told the agent to say (InjectAgentMessage), in order."""
    return [m["message"] for m in json_sent(actions) if m.get("type") == "InjectAgentMessage"]


def said_by_silence(line: str) -> list[str]:
    h = with_own_lines(idle_reprompt_seconds=5.0, idle_hangup_seconds=10.0)
    h.open()
    h.advance(5.0)
    if line == "idle_reprompt":
        return injected_texts(h.actions)
    h.advance(10.0)
    return injected_texts(h.actions)[1:]


def said_after_a_failed_transfer(line: str) -> list[str]:
    h = with_own_lines(**REST)
    h.open()
    h.agent(request(("t1", "transfer_call", {"reason": "pharmacist"})))
    h.advance(2.0)
    return injected_texts(h.take(h.call.transfer_finished("Twilio said 400", h.now)))


def said_by_the_fallback(line: str) -> list[str]:
    h = with_own_lines(**REST, fallback_number="+15550003333" if line == "fallback_transfer" else None)
    h.open()
    [hang_up] = of(h.agent_closed(1000), HangUp)
    assert hang_up.fallback is not None
    return [said for said in OWN_LINES.values() if f">{said}</Say>" in hang_up.fallback.twiml]


def said_as_the_greeting(line: str) -> list[str]:
    h = with_own_lines(**REST, call_recording="dual" if line == "recording_notice" else "off")
    h.connected()
    h.start({twilio.MODE_PARAMETER: twilio.VOICEMAIL_MODE} if line == "voicemail" else None)
    h.agent_connected()
    [settings] = [m for m in json_sent(h.agent(WELCOME)) if m.get("type") == "Settings"]
    return [settings["agent"]["greeting"].removesuffix(f" {GREETING}")]


def said_in_a_warm_transfer(line: str) -> list[str]:
    h = with_own_lines(**REST, transfer_mode="warm", twilio_phone_number="+15550002222", public_url="https://bridge.example")
    h.open()
    h.agent(request(("t1", "transfer_call", {"reason": "refill", "summary": "Ann, order 12"})))
    h.take(h.call.consult_dialled("CA" + "f" * 32, None, h.now))
    note = "accepted" if line == "transfer_connecting" else "declined:busy"
    return injected_texts(h.take(h.call.consult_answered(note, h.now)))


@pytest.mark.parametrize(
    "line, scene",
    [
        ("idle_reprompt", said_by_silence),
        ("idle_goodbye", said_by_silence),
        ("transfer_failed", said_after_a_failed_transfer),
        ("fallback_transfer", said_by_the_fallback),
        ("fallback_goodbye", said_by_the_fallback),
        ("voicemail", said_as_the_greeting),
        ("recording_notice", said_as_the_greeting),
        ("transfer_connecting", said_in_a_warm_transfer),
        ("transfer_declined", said_in_a_warm_transfer),
    ],
)
def test_every_line_a_caller_hears_is_the_agents_own(line: str, scene: Any) -> None:
    """Whatever the process's defaults, a call hears the lines its agent's file sets, each where it belongs."""
    assert scene(line) == [OWN_LINES[line]]


def test_the_caller_is_read_again_only_when_the_last_reason_to_hold_them_back_is_gone() -> None:
    """Held audio at its cap and a backed-up agent socket both stop reading the caller: one
    PauseCaller for both, and one ResumeCaller, once neither holds."""
    from bridge.call import PauseCaller, ResumeCaller
    from bridge.call.inbound import InboundAudio

    inbound = InboundAudio(160, max_held_bytes=320)
    assert not inbound.audio(bytes(160), 0.0)
    assert of(inbound.audio(bytes(160), 0.0), PauseCaller) == [PauseCaller()]  # the held audio is at its cap
    assert inbound.agent_backlog(True) == []  # already paused: no second pause
    assert not of(inbound.forward(1.0), ResumeCaller), "the agent socket is still backed up"
    assert inbound.reading_paused
    assert inbound.agent_backlog(False) == [ResumeCaller()]
    assert not inbound.reading_paused and inbound.agent_backlog(False) == []
