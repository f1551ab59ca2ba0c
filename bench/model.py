"""State shared by the simulated callers and the fake agent (one process, one event loop)."""

from __future__ import annotations

import collections
from array import array
from dataclasses import dataclass, field

from .frames import MAGIC_DOWN, StreamChecker


@dataclass
class Plan:
    """The run's timeline, all in time.monotonic_ns()."""

    lo: int  # measuring window start
    hi: int  # measuring window end; the agent starts no new speech after it
    hangup: int  # hang-ups begin


@dataclass
class Call:
    cid: int
    sid: str  # Twilio streamSid
    phase: int
    down: StreamChecker  # agent -> caller bytes, checked at the caller
    up: StreamChecker | None = None  # caller -> agent bytes, checked at the agent
    up_sent: int = 0  # bytes the caller sent
    down_sent: int = 0  # bytes the agent sent
    uss_sent: collections.deque = field(default_factory=collections.deque)  # UserStartedSpeaking times
    counts: collections.Counter = field(default_factory=collections.Counter)
    errors: list = field(default_factory=list)
    connected: bool = False  # the caller's WebSocket opened
    stopped: bool = False  # the caller sent `stop`
    caller_closed: bool = False
    agent_seen: bool = False
    agent_closed: bool = False

    def error(self, msg: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(msg)


class Run:
    def __init__(self, plan: Plan, buffer_bytes: int):
        self.plan = plan
        self.buffer_bytes = buffer_bytes
        self.calls: dict[int, Call] = {}
        # latency samples in ns, only for events sent inside the window
        self.up_excl = array("q")  # frame completing a buffer -> agent
        self.up_incl = array("q")  # every frame -> agent, buffering included
        self.down = array("q")  # agent audio frame -> caller
        self.clear = array("q")  # UserStartedSpeaking -> clear
        self.fc = array("q")  # FunctionCallRequest -> FunctionCallResponse
        self.tick_lag = array("q")  # generator lateness of each 20 ms tick (ns)
        self.notes: collections.Counter = collections.Counter()  # run-wide oddities

    def new_call(self, cid: int, phase: int) -> Call:
        p = self.plan
        call = Call(cid=cid, sid=f"MZ{cid:032x}", phase=phase,
                    down=StreamChecker(MAGIC_DOWN, cid, self.down, p.lo, p.hi))
        self.calls[cid] = call
        return call

    def in_window(self, t: int) -> bool:
        return self.plan.lo <= t <= self.plan.hi
