"""What a call counts for its summary line: turns, barge-ins, functions, errors, latencies, bad input.

The byte counts live with the machines that move the bytes (inbound audio, playback), on the hot
path; everything else a call counts is here, with the one rule about bad input: each kind is
logged the first time and counted after that, and a flood of new kinds shares one counter.
"""

from __future__ import annotations

import logging
import statistics

from .actions import Action, Log

# Distinct kinds of bad input counted per call; more kinds than this share one counter.
MAX_BAD_INPUT_KINDS = 32
# Request ids kept per call (one per agent session; resumes are bounded, this is a backstop).
MAX_REQUEST_IDS = 32


def percentile(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile of ``values``, interpolated between the observed values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[int(fraction * 100) - 1], 4)


class CallStats:
    __slots__ = (
        "turns", "barge_ins", "function_calls", "function_errors", "warnings", "errors",
        "agent_latencies", "latency_reports", "keypad_entries", "idle_reprompts", "request_ids", "bad_input",
    )

    def __init__(self) -> None:
        self.turns = 0
        self.barge_ins = 0
        self.function_calls = 0
        self.function_errors = 0
        self.warnings = 0
        self.errors = 0
        self.agent_latencies: list[float] = []
        self.latency_reports = 0
        self.keypad_entries = 0
        self.idle_reprompts = 0
        self.request_ids: list[str] = []  # each session's Welcome request_id: what Deepgram support asks for
        self.bad_input: dict[str, int] = {}

    def agent_session(self, request_id: str) -> None:
        if len(self.request_ids) < MAX_REQUEST_IDS:
            self.request_ids.append(request_id)

    def function_answered(self, error: str | None) -> None:
        self.function_calls += 1
        if error is not None:
            self.function_errors += 1

    def reject(self, source: str, kind: str, detail: str) -> list[Action]:
        """Count bad input, and log the first of each kind; ``detail`` is ours, not the peer's."""
        key = f"{source}:{kind}"
        if key not in self.bad_input and len(self.bad_input) >= MAX_BAD_INPUT_KINDS:
            key = f"{source}:other"
        seen = self.bad_input.get(key, 0)
        self.bad_input[key] = seen + 1
        if seen:
            return []
        return [Log(logging.WARNING, "ignoring bad input: %s (further ones of this kind are counted, not logged)", (detail,))]

    def summary(self) -> dict[str, object]:
        return {
            "bad_input": dict(self.bad_input),
            "turns": self.turns,
            "barge_ins": self.barge_ins,
            "function_calls": self.function_calls,
            "function_errors": self.function_errors,
            "warnings": self.warnings,
            "errors": self.errors,
            "agent_latency_p50": percentile(self.agent_latencies, 0.50),
            "agent_latency_p95": percentile(self.agent_latencies, 0.95),
            "latency_reports": self.latency_reports,
            "keypad_entries": self.keypad_entries,
            "idle_reprompts": self.idle_reprompts,
            "agent_request_ids": list(self.request_ids),
        }
