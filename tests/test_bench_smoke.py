"""The benchmark (`python -m bench`): its byte checker, and a short run against the real bridge."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from bench.frames import FRAME, MAGIC_DOWN, MAGIC_UP, StreamChecker, frame

REPO = Path(__file__).resolve().parent.parent


def stream(n: int, cid: int = 7, magic: int = MAGIC_UP) -> bytes:
    return b"".join(frame(magic, cid, seq, 1000 + seq) for seq in range(n))


def feed_in_pieces(checker: StreamChecker, data: bytes, seed: int = 1) -> None:
    rng = random.Random(seed)
    i = 0
    while i < len(data):
        step = rng.randint(1, 700)
        checker.feed(data[i:i + step], 5000)
        i += step
    checker.finish()


def test_checker_accepts_any_message_boundaries_and_a_partial_tail():
    data = stream(50) + frame(MAGIC_UP, 7, 50, 0)[:96]
    samples = array("q")
    checker = StreamChecker(MAGIC_UP, None, samples, 0, 10**9)
    feed_in_pieces(checker, data)
    assert checker.error is None
    assert checker.call_id == 7 and checker.nbytes == len(data)
    assert len(samples) == 51  # one latency per frame, taken when its header arrives
    assert samples[0] == 5000 - 1000


@pytest.mark.parametrize("damage", [
    lambda d: d[:3000] + d[3001:],  # a byte lost
    lambda d: d[:3000] + bytes([d[3000] ^ 1]) + d[3001:],  # a byte changed
    lambda d: d[:FRAME * 3] + d[FRAME * 4:FRAME * 5] + d[FRAME * 3:FRAME * 4] + d[FRAME * 5:],  # reordered
    lambda d: d[:FRAME * 2] + d[FRAME:],  # a frame repeated
    lambda d: d + bytes(96),  # a trailing partial frame that is not the next frame's start
])
def test_checker_catches_damage(damage):
    checker = StreamChecker(MAGIC_UP, 7, array("q"))
    feed_in_pieces(checker, damage(stream(40)))
    assert checker.error is not None


def test_checker_rejects_the_other_direction_and_another_call():
    for magic, cid in ((MAGIC_DOWN, 7), (MAGIC_UP, 8)):
        checker = StreamChecker(MAGIC_UP, 7, array("q"))
        checker.feed(stream(3, cid, magic), 0)
        assert checker.error is not None


@pytest.mark.timeout(60)
def test_bench_smoke_run_is_byte_exact(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--calls", "3", "--seconds", "2", "--no-pin", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert set(r) == {"config", "server", "generator", "machine", "inconclusive", "latency_ms", "integrity",
                      "events"}
    assert {"cpu_percent", "cpu_us_per_call_second", "rss_idle_kb", "rss_peak_kb", "rss_per_call_kb",
            "saturated"} <= set(r["server"])
    assert {"cpu_percent", "tick_lag_ms"} <= set(r["generator"])
    assert r["config"]["event_loop"].startswith(("uvloop ", "asyncio's own")), r["config"]
    assert "uss" not in r["events"]  # spelled out: user_started_speaking, when a run has barge-ins
    assert f"event loop {r['config']['event_loop']}" in proc.stdout
    assert isinstance(r["inconclusive"], list)
    assert set(r["latency_ms"]) == {"caller_to_agent", "agent_to_caller", "barge_in_to_clear", "function_call",
                                    "caller_to_agent_incl_buffering"}
    for stats in r["latency_ms"].values():
        assert set(stats) == {"n", "p50", "p99", "max"}
    integrity = r["integrity"]
    assert integrity["ok"] and integrity["calls_ok"] == 3, integrity
    for direction in ("caller_to_agent_bytes", "agent_to_caller_bytes"):
        assert integrity[direction]["sent"] == integrity[direction]["received"] > 0
    assert r["latency_ms"]["caller_to_agent"]["n"] > 0 and r["latency_ms"]["agent_to_caller"]["n"] > 0


def test_the_benchmark_says_it_needs_linux(monkeypatch, capsys):
    from bench import runner

    monkeypatch.setattr(sys, "platform", "darwin")
    assert runner.main(["--calls", "1"]) == 2
    assert capsys.readouterr().err == "bench: python -m bench needs Linux (it reads /proc and pins with taskset).\n"
