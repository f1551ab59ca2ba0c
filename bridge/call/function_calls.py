"""The business functions a call is running, and which of them the agent has withdrawn.

Each client-side ``FunctionCallRequest`` entry runs once (a second request for a running id is bad
input). Its answer goes only to the agent session that asked (``generation``). When Deepgram
withdraws a call (``FunctionCallCancelled``), an ``async def`` still running is cancelled; a
plain ``def`` already in its thread finishes (it may be halfway through placing an order), and
its result is recorded as withdrawn and never sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..agent_protocol import FunctionCall


@dataclass(slots=True)
class RunningFunction:
    call: FunctionCall
    generation: int
    is_async: bool
    withdrawn: bool = False


class FunctionCalls:
    __slots__ = ("_running", "_async_names")

    def __init__(self, async_names: frozenset[str]) -> None:
        self._running: dict[str, RunningFunction] = {}
        self._async_names = async_names

    def __contains__(self, call_id: str) -> bool:
        return call_id in self._running

    @property
    def any_running(self) -> bool:
        return bool(self._running)

    def start(self, call: FunctionCall, generation: int) -> None:
        self._running[call.id] = RunningFunction(call, generation, call.name in self._async_names)

    def withdraw(self, call_id: str) -> RunningFunction | None:
        """The agent withdrew ``call_id``; returns it if it was running and not withdrawn before."""
        running = self._running.get(call_id)
        if running is None or running.withdrawn:
            return None
        running.withdrawn = True
        return running

    def finish(self, call_id: str) -> RunningFunction | None:
        return self._running.pop(call_id, None)
