"""Prometheus metrics of one server process, written in Prometheus' text format by hand.

This module owns the metric values (counters, gauges, histograms), what a call reports into them,
the text exposition format (version 0.0.4), the usual ``process_*`` metrics, and, with
``--workers``, the snapshots through which one scrape shows every worker. It depends on nothing
outside the standard library; the tests read its output with ``prometheus_client``'s own parser.

Label values are a closed vocabulary, so a peer can't grow the number of series: ``ended_by`` is
one of ``END_LABELS`` (the ``EndReason`` values), a function ``name`` one the process knows (others count as
``unknown``), a bad-input ``kind`` one of the state machine's own names.

With ``--workers`` the kernel hands each scrape to any worker. Each worker writes a snapshot of its
values to a private directory the parent made, every ``SHARE_SECONDS`` and when it stops; the
worker that is scraped adds the others' latest snapshots to its own live values. Counters and
histograms are summed, ``bridge_calls_active`` too (at most ``SHARE_SECONDS`` old for the other
workers), and each worker's process metrics carry a ``worker`` label. When a worker exits and the
parent starts another in its place, its counts move into a ``retired`` snapshot, so that no sum
ever goes down.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .call_events import CallEnd, EndReason, RecordEvent
from .functions import BUILTIN_FUNCTIONS

logger = logging.getLogger("bridge.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
SHARE_SECONDS = 1.0  # how often a worker writes its snapshot for the others
RETIRED = "retired"  # the snapshot that keeps the counts of workers that have exited
MAX_SNAPSHOT_BYTES = 1_000_000  # a snapshot file bigger than this is not ours: ignored

DURATION_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LATENCY_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
FUNCTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UNKNOWN_FUNCTION = "unknown"

# A call that somehow ended without a reason (a bug) is counted here rather than lost.
OTHER_END = "other"
# Every label ``ended_by`` can take: the end reasons' own values, and ``other``.
END_LABELS = (*(reason.value for reason in EndReason), OTHER_END)


def ended_by_label(end: CallEnd | None) -> str:
    """The ``ended_by`` label of how a call ended."""
    return end.reason.value if end is not None else OTHER_END


@dataclass(frozen=True, slots=True)
class Family:
    """One metric: its name, type, help text, label names and (for a histogram) buckets."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


FAMILIES = (
    Family("bridge_calls_active", "gauge", "Calls in progress."),
    Family("bridge_calls_total", "counter", "Calls that have ended, by how they ended.", ("ended_by",)),
    Family("bridge_call_duration_seconds", "histogram", "How long ended calls lasted.", (), DURATION_BUCKETS),
    Family(
        "bridge_agent_latency_seconds",
        "histogram",
        "Deepgram's total latency of each agent turn (AgentStartedSpeaking total_latency).",
        (),
        LATENCY_BUCKETS,
    ),
    Family(
        "bridge_function_duration_seconds",
        "histogram",
        "How long the agent's function calls took, by function and outcome.",
        ("name", "outcome"),
        FUNCTION_BUCKETS,
    ),
    Family("bridge_agent_reconnects_total", "counter", "Agent sessions resumed mid-call (a drop or a Deepgram Error)."),
    Family("bridge_bad_input_total", "counter", "Malformed or unexpected messages from peers, by kind.", ("kind",)),
    Family(
        "bridge_transfers_total",
        "counter",
        "Transfers to a person, by mode (cold, warm) and outcome (transferred, declined, failed).",
        ("mode", "outcome"),
    ),
)
# The record events that end a transfer, as the outcome label of bridge_transfers_total.
TRANSFER_OUTCOMES = {
    RecordEvent.TRANSFERRED: "transferred",
    RecordEvent.TRANSFER_DECLINED: "declined",
    RecordEvent.TRANSFER_FAILED: "failed",
}
TRANSFER_MODES = frozenset({"cold", "warm"})
BY_NAME = {family.name: family for family in FAMILIES}

Labels = tuple[str, ...]
# A counter's or gauge's value is a float; a histogram's is [count per bucket (not cumulative,
# the last one for +Inf), sum, count].
Values = dict[str, dict[Labels, Any]]


class Metrics:
    """The metric values of one server process. Every method is cheap: none runs per audio frame."""

    def __init__(self, function_names: Iterable[str] = ()) -> None:
        self.function_names = frozenset(function_names) | BUILTIN_FUNCTIONS
        self.values: Values = {family.name: {} for family in FAMILIES}
        self.values["bridge_calls_active"][()] = 0.0
        self.started = process_start_time()

    # -- primitives
    def inc(self, name: str, labels: Labels = (), amount: float = 1.0) -> None:
        series = self.values[name]
        series[labels] = series.get(labels, 0.0) + amount

    def observe(self, name: str, value: float, labels: Labels = ()) -> None:
        if not math.isfinite(value):
            return
        buckets = BY_NAME[name].buckets
        series = self.values[name]
        histogram = series.get(labels)
        if histogram is None:
            histogram = series[labels] = [[0] * (len(buckets) + 1), 0.0, 0]
        index = next((i for i, bound in enumerate(buckets) if value <= bound), len(buckets))
        histogram[0][index] += 1
        histogram[1] += value
        histogram[2] += 1

    # -- what calls report
    def call_started(self) -> None:
        self.inc("bridge_calls_active")

    def call_ended(self, end: CallEnd | None, duration_seconds: float, bad_input: Mapping[str, int]) -> None:
        self.inc("bridge_calls_active", amount=-1.0)
        self.inc("bridge_calls_total", (ended_by_label(end),))
        self.observe("bridge_call_duration_seconds", duration_seconds)
        for kind, count in bad_input.items():
            self.inc("bridge_bad_input_total", (kind,), count)

    def on_record(self, event: str, fields: Mapping[str, Any]) -> None:
        """A call's record event; the few that are metrics are counted here as they happen."""
        if event == RecordEvent.AGENT_STARTED_SPEAKING:
            latency = fields.get("total_latency")
            if isinstance(latency, float):
                self.observe("bridge_agent_latency_seconds", latency)
        elif event == RecordEvent.FUNCTION_CALL:
            name = fields.get("name")
            label = name if name in self.function_names else UNKNOWN_FUNCTION
            outcome = fields.get("outcome") or "ok"
            duration = fields.get("duration_seconds")
            if isinstance(duration, float):
                self.observe("bridge_function_duration_seconds", duration, (label, outcome))
        elif event == RecordEvent.AGENT_RESUMED:
            self.inc("bridge_agent_reconnects_total")
        elif event in TRANSFER_OUTCOMES:
            mode = fields.get("mode")
            self.inc("bridge_transfers_total", (mode if mode in TRANSFER_MODES else "cold", TRANSFER_OUTCOMES[RecordEvent(event)]))

    def _current(self, live_bad_input: Iterable[Mapping[str, int]]) -> Values:
        """A copy of the values with the bad input of calls still running added in.

        A call counts its bad input itself, and hands the totals over when it ends; adding the
        live calls' counts at each scrape keeps the counter current (a flood shows while it
        happens) and monotonic (a call's counts move from live to ended, never both).
        """
        current: Values = {name: dict(series) for name, series in self.values.items()}
        bad_input = current["bridge_bad_input_total"]
        for counts in live_bad_input:
            for kind, count in counts.items():
                bad_input[(kind,)] = bad_input.get((kind,), 0.0) + count
        return current

    # -- snapshots, for --workers
    def snapshot(self, live_bad_input: Iterable[Mapping[str, int]] = ()) -> dict[str, Any]:
        """The values and process metrics as JSON-ready data."""
        return {"values": _jsonable(self._current(live_bad_input)), "process": process_metrics(self.started)}

    def render(
        self,
        others: Iterable[tuple[str, dict[str, Any]]] = (),
        worker: str | None = None,
        live_bad_input: Iterable[Mapping[str, int]] = (),
    ) -> str:
        """The text exposition: this process's values (with its live calls' bad input) plus
        ``others`` (worker name, snapshot)."""
        merged = self._current(live_bad_input)
        processes = [(worker, process_metrics(self.started))]
        for name, snapshot in others:
            try:
                _add_snapshot(merged, snapshot["values"])
                if "process" in snapshot:  # the retired workers' counts have no process
                    processes.append((name, dict(snapshot["process"])))
            except (KeyError, TypeError, ValueError, IndexError):
                logger.warning("ignoring worker %s's metrics snapshot: it is not in the expected form", name)
        lines: list[str] = []
        for family in FAMILIES:
            lines += _family_lines(family, merged[family.name])
        lines += _process_lines(processes, labelled=worker is not None)
        return "\n".join(lines) + "\n"


def _jsonable(values: Values) -> dict[str, list[list[Any]]]:
    return {name: [[list(labels), value] for labels, value in series.items()] for name, series in values.items()}


def _add_snapshot(merged: Values, values: Mapping[str, Any]) -> None:
    for name, series in values.items():
        family = BY_NAME.get(name)
        if family is None:
            continue
        target = merged[name]
        for labels_list, value in series:
            labels = tuple(str(item) for item in labels_list)
            if family.kind == "histogram":
                counts, total, count = value
                if len(counts) != len(family.buckets) + 1:
                    raise ValueError("bucket count")
                mine = target.get(labels)
                if mine is None:
                    target[labels] = [list(counts), float(total), int(count)]
                else:
                    target[labels] = [[a + b for a, b in zip(mine[0], counts)], mine[1] + total, mine[2] + count]
            else:
                target[labels] = target.get(labels, 0.0) + float(value)


# ---------------------------------------------------------------------------- text format

_LABEL_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{name}="{str(value).translate(_LABEL_ESCAPES)}"' for name, value in zip(names, values)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _family_lines(family: Family, series: Mapping[Labels, Any]) -> list[str]:
    assert _NAME.fullmatch(family.name)
    lines = [f"# HELP {family.name} {family.help}", f"# TYPE {family.name} {family.kind}"]
    for labels in sorted(series):
        value = series[labels]
        if family.kind != "histogram":
            lines.append(f"{family.name}{_labels(family.labels, labels)} {_number(value)}")
            continue
        counts, total, count = value
        cumulative = 0
        for bound, bucket_count in zip((*family.buckets, math.inf), counts):
            cumulative += bucket_count
            le = _labels((*family.labels, "le"), (*labels, "+Inf" if bound == math.inf else repr(bound)))
            lines.append(f"{family.name}_bucket{le} {cumulative}")
        lines.append(f"{family.name}_sum{_labels(family.labels, labels)} {_number(total)}")
        lines.append(f"{family.name}_count{_labels(family.labels, labels)} {count}")
    return lines


PROCESS_FAMILIES = (
    ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes."),
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_max_fds", "gauge", "Maximum number of open file descriptors."),
    ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds."),
)


def _process_lines(processes: list[tuple[str | None, dict[str, float]]], *, labelled: bool) -> list[str]:
    # One process: the usual unlabelled series. Workers: one series each, by ``worker``.
    lines: list[str] = []
    for name, kind, help_text in PROCESS_FAMILIES:
        rows = [(worker, values[name]) for worker, values in processes if isinstance(values.get(name), int | float)]
        if not rows:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for worker, value in sorted(rows, key=lambda row: str(row[0])):
            labels = _labels(("worker",), (worker or "0",)) if labelled else ""
            lines.append(f"{name}{labels} {_number(float(value))}")
    return lines


# ---------------------------------------------------------------------------- the process


def process_start_time() -> float:
    """When this process started (Linux: from /proc; elsewhere: now, close enough at startup)."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        ticks = int(fields[19])  # starttime, the 22nd field, after pid and comm
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def process_metrics(started: float) -> dict[str, float]:
    """The usual process metrics; those this system can't tell are left out."""
    times = os.times()
    values: dict[str, float] = {
        "process_cpu_seconds_total": times.user + times.system,
        "process_start_time_seconds": started,
    }
    try:
        pages = Path("/proc/self/statm").read_text().split()
        page_size = os.sysconf("SC_PAGE_SIZE")
        values["process_virtual_memory_bytes"] = float(int(pages[0]) * page_size)
        values["process_resident_memory_bytes"] = float(int(pages[1]) * page_size)
        values["process_open_fds"] = float(len(os.listdir("/proc/self/fd")))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        values["process_max_fds"] = float(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, OSError, ValueError):
        pass
    return values


# ---------------------------------------------------------------------------- --workers


class WorkerShare:
    """The directory through which the workers of one ``--workers`` run see each other's metrics."""

    def __init__(self, directory: Path, worker: str) -> None:
        self.directory = directory
        self.worker = worker
        self.path = directory / f"worker-{worker}.json"

    def write(self, snapshot: dict[str, Any]) -> None:
        """Replace this worker's snapshot at once, so a reader never sees half of one."""
        temporary = self.path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(snapshot, separators=(",", ":")), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:
            logger.warning("cannot write this worker's metrics for the others: %s", exc.strerror or exc)

    @staticmethod
    def retire(directory: Path, worker: str) -> None:
        """Worker ``worker`` has exited: fold its last snapshot into the retired workers' one.

        Its counters and histograms are kept, since a sum over the workers that fell would read as
        a counter reset to Prometheus; its ``bridge_calls_active`` and process metrics go, since
        its calls and its process are over. Only the parent calls this, for one worker at a time,
        before it starts the worker's replacement.
        """
        gone = directory / f"worker-{worker}.json"
        retired = directory / f"worker-{RETIRED}.json"
        merged: Values = {family.name: {} for family in FAMILIES}
        for path in (retired, gone):
            try:
                _add_snapshot(merged, json.loads(path.read_text(encoding="utf-8"))["values"])
            except FileNotFoundError:
                continue
            except (OSError, KeyError, TypeError, ValueError, IndexError) as exc:
                logger.warning("cannot keep the counts of %s: %s", path.name, exc)
        merged["bridge_calls_active"] = {}
        WorkerShare(directory, RETIRED).write({"values": _jsonable(merged)})
        gone.unlink(missing_ok=True)

    def others(self) -> list[tuple[str, dict[str, Any]]]:
        """The other workers' latest snapshots, as (worker, snapshot)."""
        found = []
        try:
            paths = sorted(self.directory.glob("worker-*.json"))
        except OSError:
            return []
        for path in paths:
            worker = path.stem.removeprefix("worker-")
            if path == self.path:
                continue
            try:
                if path.stat().st_size > MAX_SNAPSHOT_BYTES:
                    continue
                found.append((worker, json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                continue  # being replaced right now, or gone: the next scrape sees it
        return found
