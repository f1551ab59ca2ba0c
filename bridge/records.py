"""The record of one call: a JSON Lines file in ``CALLS_DIR``, events first, a summary line last.

Events are kept in memory while the call runs (a call's events are a few kilobytes) and written
in a worker thread when it ends, whatever ended it, so the event loop never waits on the disk.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    # statistics.quantiles with the inclusive method interpolates between the observed values.
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return round(cuts[int(fraction * 100) - 1], 4)


class CallRecord:
    """Collects a call's events and writes them when the call ends (a no-op when disabled)."""

    def __init__(self, directory: Path, enabled: bool) -> None:
        self.directory = directory
        self.enabled = enabled
        self.started_at = _now()
        self.events: list[dict[str, Any]] = []
        self.agent_latencies: list[float] = []
        self.turns = 0
        self.barge_ins = 0
        self.function_calls = 0
        self.function_errors = 0
        self.warnings = 0
        self.errors = 0

    def add(self, event: str, **fields: Any) -> None:
        if self.enabled:
            self.events.append({"time": _now(), "event": event, **fields})

    def turn(self, role: str, content: str) -> None:
        self.turns += 1
        self.add("transcript", role=role, content=content)

    def barge_in(self) -> None:
        self.barge_ins += 1
        self.add("barge_in")

    def agent_latency(self, message: dict[str, Any]) -> None:
        latencies = {key: message.get(key) for key in ("total_latency", "tts_latency", "ttt_latency")}
        if isinstance(latencies["total_latency"], int | float):
            self.agent_latencies.append(float(latencies["total_latency"]))
        self.add("agent_started_speaking", **latencies)

    def function_call(self, name: str, arguments: str, result: Any, error: str | None, duration: float) -> None:
        self.function_calls += 1
        if error is not None:
            self.function_errors += 1
        self.add(
            "function_call",
            name=name,
            arguments=arguments,
            result=result,
            error=error,
            duration_seconds=round(duration, 4),
        )

    def warning(self, code: Any, description: Any) -> None:
        self.warnings += 1
        self.add("warning", code=code, description=description)

    def error(self, source: str, code: Any, description: Any) -> None:
        self.errors += 1
        self.add("error", source=source, code=code, description=description)

    def summary(self, **fields: Any) -> dict[str, Any]:
        ended_at = _now()
        duration = datetime.fromisoformat(ended_at) - datetime.fromisoformat(self.started_at)
        return {
            "event": "summary",
            **fields,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "duration_seconds": round(duration.total_seconds(), 3),
            "turns": self.turns,
            "barge_ins": self.barge_ins,
            "function_calls": self.function_calls,
            "function_errors": self.function_errors,
            "warnings": self.warnings,
            "errors": self.errors,
            "agent_latency_p50": _percentile(self.agent_latencies, 0.50),
            "agent_latency_p95": _percentile(self.agent_latencies, 0.95),
        }

    async def write(self, call_sid: str, summary: dict[str, Any]) -> Path | None:
        """Write the events and the summary; returns the file, or None when recording is off."""
        if not self.enabled:
            return None
        lines = [json.dumps(event, default=str) for event in self.events]
        lines.append(json.dumps(summary, default=str))
        safe_sid = re.sub(r"[^A-Za-z0-9_-]", "_", call_sid)[:64] or "unknown"
        stamp = self.started_at.replace(":", "").replace("-", "").split(".")[0]
        path = self.directory / f"{stamp}_{safe_sid}.jsonl"
        await asyncio.to_thread(_write_lines, path, lines)
        return path


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
