"""Running the business functions the agent asks for, and checking them against config.json.

The contract: every client-side function call gets exactly one answer, a JSON string. A failure
of any kind (unknown name, bad arguments, an exception, a result JSON can't encode, a timeout)
is answered with ``{"error": "<short reason the agent can say>"}``; the traceback goes to the log
only. Plain ``def`` functions run in a worker thread, ``async def`` ones on the event loop, so a
slow function never holds up the call's audio.

Nothing the agent sends, and nothing a function returns, can make the runner itself raise: the
arguments and the result are both held to ``MAX_NESTING`` levels (Python's JSON parser and encoder
recurse, and past about a thousand levels they raise RecursionError, as would the call record's
encoder and the browser page's), and a result to ``MAX_RESULT_CHARS`` of JSON.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .settings import ConfigError
from .logsafe import clean

# Functions the bridge implements itself; config.json declares them like any other.
BUILTIN_FUNCTIONS = frozenset({"end_call", "transfer_call"})

# Levels of objects and arrays allowed in a call's arguments and in a function's result. Real ones
# have two or three; the bound is far below where anything that encodes or parses JSON recurses
# too deep, wherever on the stack it runs.
MAX_NESTING = 32
# Characters of JSON a function's answer may have: it goes to the LLM, the conversation history
# that a resumed session is given, and the call record. The same bound as the agent's arguments.
MAX_RESULT_CHARS = 64 * 1024


@dataclass(frozen=True, slots=True)
class FunctionOutcome:
    content: str  # what goes into FunctionCallResponse.content
    result: Any  # the decoded result, for records and the browser page
    error: str | None
    duration_seconds: float
    # For metrics, a closed set: ok, error (the function answered {"error": ...}), bad_call (no such
    # function, bad arguments), timeout, failed (it raised, or its result isn't JSON), cancelled.
    # Left out, it is "ok" or "error" by ``error``.
    outcome: str = ""

    def __post_init__(self) -> None:
        if not self.outcome:
            object.__setattr__(self, "outcome", "ok" if self.error is None else "error")


def check_function_map(
    function_map: Mapping[str, Callable[..., Any]],
    declared: Mapping[str, Mapping[str, Any]],
    config_name: str = "config.json",
) -> list[str]:
    """Check config.json's client-side functions against ``function_map``; returns warnings.

    ``config_name`` names the agent file (``--config``) in the messages.
    Raises ``ConfigError`` for a declared function that doesn't exist or whose Python signature
    doesn't accept a parameter the declaration names, required or optional (unless it takes
    ``**kwargs``): the LLM may send any declared parameter, and a call that does would otherwise
    get "Bad arguments" every time.
    """
    for name, function in function_map.items():
        if not callable(function):
            raise ConfigError(
                f"pharmacy_functions.function_map entry {name!r} is a {type(function).__name__}, not a function."
            )
    for name, definition in declared.items():
        if name in BUILTIN_FUNCTIONS:
            continue
        function = function_map.get(name)
        if function is None:
            raise ConfigError(
                f"{config_name} declares function {name!r} but pharmacy_functions.function_map has no such entry."
            )
        signature = inspect.signature(function)
        if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            continue  # **kwargs takes whatever is declared
        required, optional = _declared_parameters(definition)
        for parameter in [*required, *optional]:
            accepted = signature.parameters.get(parameter)
            if accepted is not None and accepted.kind in (accepted.POSITIONAL_OR_KEYWORD, accepted.KEYWORD_ONLY):
                continue
            if parameter in required:
                raise ConfigError(
                    f"{config_name} marks parameter {parameter!r} of function {name!r} as required, "
                    f"but the Python function {name}() does not accept it."
                )
            raise ConfigError(
                f"{config_name} declares the optional parameter {parameter!r} of function {name!r}, but the "
                f"Python function {name}() does not accept it, so every call that passes it would fail."
            )
    return [
        f"function_map entry {name!r} is not declared in {config_name}, so the agent cannot call it."
        for name in function_map
        if name not in declared
    ]


def _declared_parameters(definition: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The parameter names a function's declaration gives: (required, optional), each in order.

    ``parameters`` is a JSON Schema object: ``properties`` names every parameter and ``required``
    those the LLM must send (a name may be required without a property of its own).
    """
    parameters = definition.get("parameters")
    if not isinstance(parameters, dict):
        return [], []
    listed, properties = parameters.get("required"), parameters.get("properties")
    required = [name for name in listed if isinstance(name, str)] if isinstance(listed, list) else []
    named = [name for name in properties if isinstance(name, str)] if isinstance(properties, dict) else []
    return required, [name for name in named if name not in required]


def _error(reason: str, started: float, outcome: str) -> FunctionOutcome:
    return FunctionOutcome(json.dumps({"error": reason}), None, reason, time.monotonic() - started, outcome)


class FunctionRunner:
    """Calls functions from ``function_map`` for every call of one server process."""

    def __init__(
        self,
        function_map: Mapping[str, Callable[..., Any]],
        timeout_seconds: float,
        max_threads: int = 32,
    ) -> None:
        self.function_map = dict(function_map)
        # Worked out once: inspect.signature costs tens of microseconds, and function calls are hot.
        self._signatures = {name: inspect.signature(function) for name, function in self.function_map.items()}
        self._is_async = {name: inspect.iscoroutinefunction(function) for name, function in self.function_map.items()}
        # Which functions a FunctionCallCancelled can stop (asyncio code cleans up at its awaits).
        self.async_functions = frozenset(name for name, is_async in self._is_async.items() if is_async)
        self.timeout_seconds = timeout_seconds
        # A pool of our own: slow business functions must not starve the loop's default executor.
        self._executor = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="function")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def run(
        self,
        name: str,
        arguments_text: str,
        log: logging.LoggerAdapter[Any],
        on_late: Callable[[FunctionOutcome], None] | None = None,
    ) -> FunctionOutcome:
        """Run one call and return its answer.

        Cancelling the awaiting task cancels an ``async def``. A plain ``def`` can't be stopped: if
        it is abandoned (timed out, or its task cancelled) it runs on in its thread, and when it
        returns its outcome is logged and given to ``on_late``, because it may have done something
        (placed an order) that must not go unrecorded.
        """
        started = time.monotonic()
        function = self.function_map.get(name)
        if function is None:
            log.warning("agent called unknown function %r", name)
            return _error(f"There is no function called {name}.", started, "bad_call")
        try:
            arguments = json.loads(arguments_text) if arguments_text.strip() else {}
            too_deep = _nested_deeper_than(arguments, MAX_NESTING)
        except json.JSONDecodeError:
            log.warning("function %s: arguments are not JSON", name)
            return _error(f"The arguments for {name} were not valid JSON.", started, "bad_call")
        except RecursionError:  # thousands of levels: deeper than the parser can go
            too_deep = True
        if too_deep:
            log.warning("function %s: arguments are nested more than %d levels deep", name, MAX_NESTING)
            return _error(f"The arguments for {name} are nested too deeply.", started, "bad_call")
        if not isinstance(arguments, dict):
            log.warning("function %s: arguments are not a JSON object", name)
            return _error(f"The arguments for {name} must be a JSON object.", started, "bad_call")
        try:
            self._signatures[name].bind(**arguments)
        except TypeError as exc:
            log.warning("function %s: bad arguments: %s", name, clean(exc, 300))  # it quotes the agent's keys
            return _error(f"Bad arguments for {name}: {exc}.", started, "bad_call")

        try:
            if self._is_async[name]:
                result = await asyncio.wait_for(function(**arguments), self.timeout_seconds)
            else:
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(self._executor, functools.partial(function, **arguments))
                try:
                    # Shielded: the thread runs on whatever happens here, and its result is wanted.
                    result = await asyncio.wait_for(asyncio.shield(job), self.timeout_seconds)
                except (TimeoutError, asyncio.CancelledError):
                    job.add_done_callback(functools.partial(self._finished_late, name, started, log, on_late))
                    raise
        except TimeoutError:
            log.warning("function %s timed out after %.1f s", name, self.timeout_seconds)
            return _error(f"{name} took too long to answer.", started, "timeout")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("function %s raised", name)
            return _error(f"{name} failed with an internal error.", started, "failed")
        return _outcome(name, result, started, log)

    @staticmethod
    def _finished_late(
        name: str,
        started: float,
        log: logging.LoggerAdapter[Any],
        on_late: Callable[[FunctionOutcome], None] | None,
        job: asyncio.Future[Any],
    ) -> None:
        if job.cancelled():
            return  # it never started: the pool was shut down
        exc = job.exception()
        if exc is not None:
            log.error("function %s failed after it was abandoned", name, exc_info=exc)
            outcome = _error(f"{name} failed with an internal error.", started, "failed")
        else:
            outcome = _outcome(name, job.result(), started, log)
            # Its result (an order placed, say) is in the call record, which keeps the caller's
            # words only as STORE_TRANSCRIPTS allows; the log line says that it came, not what.
            log.warning(
                "function %s returned after it was abandoned (%.1f s in all; its answer was not sent, the call record has it)",
                name,
                outcome.duration_seconds,
            )
        if on_late is not None:
            on_late(outcome)


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` has objects or arrays (dicts, lists, tuples) more than ``limit`` levels deep.

    A loop, not recursion, so that it cannot itself run out of stack; a circular structure counts
    as too deep.
    """
    pending: list[tuple[Any, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        # A tuple of types, not dict | list | tuple: isinstance checks it twice as fast.
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def _outcome(name: str, result: Any, started: float, log: logging.LoggerAdapter[Any]) -> FunctionOutcome:
    """A function's return value as the answer the agent gets; this never raises."""
    try:
        too_deep = _nested_deeper_than(result, MAX_NESTING)
        content = "" if too_deep else json.dumps(result)
        error = result.get("error") if isinstance(result, dict) and isinstance(result.get("error"), str) else None
    except Exception:  # not JSON (TypeError, ValueError), or a dict or list subclass that raises
        log.error("function %s returned a %s, which is not JSON-serialisable", name, type(result).__name__)
        return _error(f"{name} returned a result that could not be read.", started, "failed")
    if too_deep:
        log.error("function %s returned a result nested more than %d levels deep", name, MAX_NESTING)
        return _error(f"{name} returned a result that could not be read.", started, "failed")
    if len(content) > MAX_RESULT_CHARS:
        log.error("function %s returned %d characters of JSON, more than %d", name, len(content), MAX_RESULT_CHARS)
        return _error(f"{name} returned a result too large to pass on.", started, "failed")
    return FunctionOutcome(content, result, error, time.monotonic() - started)
