"""`python -m bench`: run the bridge under N simulated calls and measure it per call."""

from __future__ import annotations

import argparse
import asyncio
import gc
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .agent import FakeAgent
from .caller import PERIOD, Caller, Phase
from .model import Plan, Run
from .server import REPO, Bridge, cpu_seconds, machine_busy_seconds, rss_kb

SWEEP_BUFFERS = (160, 800, 3200)
WARM = 2.0  # s between the last call dialling and the window
DRAIN = 2.5  # s between the window's end (no new agent speech) and the first hang-up
CLOSE_TIMEOUT = 15.0  # s for every socket to close after the hang-ups
GENERATOR_CPU_LIMIT = 80.0  # % of a core above which the generator's own queueing taints the run
TICK_LAG_LIMIT = 20.0  # ms: p99 lateness of the generator's 20 ms ticks above which it was starved
OTHER_LOAD_LIMIT = 20.0  # % of a core used by other programs on the machine during the window
SPEED_DRIFT_LIMIT = 0.2  # the reference op may differ by this fraction between before and after the run
SATURATED = 0.95  # share of the bridge's CPUs above which it is saturated

DEFAULT_SETTINGS = {
    "type": "Settings",
    "audio": {"input": {"encoding": "mulaw", "sample_rate": 8000},
              "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"}},
    "agent": {
        "listen": {"provider": {"type": "deepgram", "model": "nova-3", "language": "en"}},
        "think": {
            "provider": {"type": "open_ai", "model": "gpt-4o-mini", "temperature": 0.7},
            "prompt": "You are a pharmacy assistant.",
            "functions": [{"name": "get_drug_info", "description": "Look up a drug.",
                           "parameters": {"type": "object", "properties": {"drug_name": {"type": "string"}},
                                          "required": ["drug_name"]}}]},
        "speak": {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}},
        "greeting": "Hello, this is the pharmacy."}}


def bridge_event_loop() -> str:
    """The event loop the bridge runs on: main.py uses uvloop when this interpreter has it."""
    from importlib import metadata

    try:
        return f"uvloop {metadata.version('uvloop')}"
    except metadata.PackageNotFoundError:
        return "asyncio's own (uvloop is not installed)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Drive N simulated Twilio calls through the bridge against a fake Deepgram agent "
                    "and measure CPU, memory, added latency and audio integrity per call.")
    p.add_argument("--calls", type=int, default=100, help="concurrent calls (default 100)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the measuring window (default 20)")
    p.add_argument("--workers", type=int, default=1, help="bridge worker processes (default 1)")
    p.add_argument("--buffer", type=int, default=3200, help="INBOUND_CHUNK_BYTES (default 3200)")
    p.add_argument("--buffer-sweep", action="store_true",
                   help=f"run once per INBOUND_CHUNK_BYTES in {SWEEP_BUFFERS} to show the latency trade-off")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--no-pin", action="store_true",
                   help="don't pin the bridge to CPU 0 and the generator to CPU 1")
    p.add_argument("--phases", type=int, default=10, help="calls are spread over this many phases of 20 ms")
    p.add_argument("--ramp", type=float, help="seconds over which calls dial (default calls/200, at least 0.5)")
    p.add_argument("--record", action="store_true", help="run the bridge with RECORD_CALLS=true")
    p.add_argument("--config", type=Path, help="Settings file for the bridge (default: the repo's config.json)")
    p.add_argument("--main", type=Path, default=REPO / "main.py", help="the bridge's entry script")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for other programs to use under "
                        f"{OTHER_LOAD_LIMIT:.0f}%% of a core (default: don't wait)")
    p.add_argument("--log-level", default="WARNING", help="the bridge's LOG_LEVEL (default WARNING)")
    args = p.parse_args(argv)
    if args.calls < 1 or args.seconds <= 0 or args.workers < 1 or args.buffer < 1 or args.phases < 1:
        p.error("--calls, --seconds, --workers, --buffer and --phases must be positive")
    if args.ramp is None:
        args.ramp = max(0.5, args.calls / 200)
    return args


def reference_op_us() -> float:
    """The speed of this core now: µs for json.loads + b64decode of one Twilio media message (best of 5).

    Shared virtual machines change speed from minute to minute; compare runs only when this agrees.
    """
    msg = json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": "MZ" + "0" * 32,
                      "media": {"track": "inbound", "chunk": "2", "timestamp": "40",
                                "payload": base64.b64encode(bytes(160)).decode()}})
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10000):
            base64.b64decode(json.loads(msg)["media"]["payload"])
        best = min(best, (time.perf_counter() - t) / 10000 * 1e6)
    return round(best, 3)


def pin_self(pin: bool) -> bool:
    """Generator and fake agent on CPU 1, away from the bridge on CPU 0."""
    if not pin or not shutil.which("taskset") or not hasattr(os, "sched_setaffinity"):
        return False
    if len(os.sched_getaffinity(0)) < 2 or 1 not in os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(0, {1})
    return True


async def wait_quiet(limit_s: float, quiet_for: int = 3) -> None:
    """Wait (up to limit_s) for `quiet_for` seconds in a row in which other programs are nearly idle."""
    deadline = time.monotonic() + limit_s
    quiet = 0
    said = False
    while quiet < quiet_for and time.monotonic() < deadline:
        b0 = machine_busy_seconds()["cpu"]
        await asyncio.sleep(1.0)
        busy = 100.0 * (machine_busy_seconds()["cpu"] - b0)
        quiet = quiet + 1 if busy <= OTHER_LOAD_LIMIT else 0
        if not quiet and not said:
            print(f"bench: other programs use {busy:.0f}% of a core; waiting up to {limit_s:.0f} s for quiet",
                  file=sys.stderr)
            said = True
    if quiet < quiet_for:
        print("bench: the machine is still busy; measuring anyway", file=sys.stderr)


async def run_once(args: argparse.Namespace, buffer_bytes: int, pinned: bool) -> dict:
    loop = asyncio.get_running_loop()
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    config = args.config
    if config is None:
        config = REPO / "config.json"
        if not config.exists():
            config = workdir / "config.json"
            config.write_text(json.dumps(DEFAULT_SETTINGS, indent=2))
    ref_op = reference_op_us()
    run = Run(plan=None, buffer_bytes=buffer_bytes)
    agent = FakeAgent(run)
    await agent.start()
    bridge = Bridge(workdir=workdir, agent_url=f"ws://127.0.0.1:{agent.port}", buffer_bytes=buffer_bytes,
                    calls=args.calls, workers=args.workers, config=config.resolve(), pin=pinned,
                    record=args.record, main=args.main.resolve(), log_level=args.log_level)
    n = args.calls
    phases: list[Phase] = []
    callers: list[Caller] = []
    result: dict = {}
    try:
        await bridge.wait_ready()
        print(f"bench: bridge pid {bridge.pid} on port {bridge.port} (attach a profiler to it: "
              f"py-spy record --pid {bridge.pid})", file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)
        pids = bridge.pids()
        rss_idle = rss_kb(pids)

        ns = 1_000_000_000
        t0 = time.monotonic_ns() + ns // 5
        lo = t0 + int((args.ramp + WARM) * ns)
        hi = lo + int(args.seconds * ns)
        spread = min(1.0, args.ramp)
        run.plan = Plan(lo=lo, hi=hi, hangup=hi + int(DRAIN * ns))
        lt0 = loop.time() + 0.2
        phases = [Phase(run, lt0 + PERIOD * i / args.phases) for i in range(args.phases)]

        async def dial(cid: int) -> None:
            call = run.new_call(cid, (cid - 1) % args.phases)
            opened = loop.create_future()
            try:
                _, caller = await loop.create_connection(
                    lambda: Caller(run, call, phases, "127.0.0.1", bridge.port, opened), "127.0.0.1", bridge.port)
                callers.append(caller)
                await asyncio.wait_for(opened, 10)
            except Exception as e:  # noqa: BLE001 - any failure to dial is reported per call
                call.error(f"dial failed: {e!r}")

        dialling: set[asyncio.Task] = set()  # a reference to each task until it ends

        def start_dial(cid: int) -> None:
            task = loop.create_task(dial(cid))
            dialling.add(task)
            task.add_done_callback(dialling.discard)

        dials = [loop.call_later(0.2 + args.ramp * i / n, start_dial, i + 1) for i in range(n)]

        async def until(t_ns: int) -> None:
            await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / ns))

        await until(lo)
        # The generator's own garbage-collection pauses (tens of ms with 600 calls' objects) would
        # show up as the bridge's latency; like timeit, it measures with its collector off.
        gc.disable()
        live_at_start = sum(c.connected and c.up is not None and not c.caller_closed for c in run.calls.values())
        pids = bridge.pids()
        cpu0, gen0, wall0 = cpu_seconds(pids), time.process_time(), time.monotonic()
        busy0 = machine_busy_seconds()
        rss_peak = rss_kb(pids)
        health_calls = None
        mid = lo + (hi - lo) // 2
        while time.monotonic_ns() < hi - ns // 4:
            await asyncio.sleep(min(0.5, max(0.0, (hi - time.monotonic_ns()) / ns - 0.25)))
            rss_peak = max(rss_peak, rss_kb(pids))
            if health_calls is None and time.monotonic_ns() >= mid:
                try:
                    _, body = await bridge.health()
                    health_calls = (body or {}).get("calls")
                except (OSError, asyncio.TimeoutError, ValueError, IndexError):
                    health_calls = "unreachable"
        await until(hi)
        cpu1, gen1, wall1 = cpu_seconds(pids), time.process_time(), time.monotonic()
        gc.enable()
        busy1 = machine_busy_seconds()
        rss_peak = max(rss_peak, rss_kb(pids))
        window = wall1 - wall0

        await until(run.plan.hangup)
        by_cid = {c.call.cid: c for c in callers}
        for i in range(n):
            caller = by_cid.get(i + 1)
            if caller is not None:
                loop.call_later(spread * i / n, caller.hangup)
        deadline = time.monotonic() + spread + CLOSE_TIMEOUT
        while time.monotonic() < deadline:
            if all((c.caller_closed or not c.connected) and (c.agent_closed or not c.agent_seen)
                   for c in run.calls.values()):
                break
            await asyncio.sleep(0.1)
        for c in run.calls.values():
            if c.connected and not c.caller_closed:
                c.error("the Twilio socket did not close after stop")
            if c.agent_seen and not c.agent_closed:
                c.error("the bridge did not close the agent socket after stop")
            if c.up is not None and not c.agent_closed:
                c.up.finish()
            c.down.finish()
        for h in dials:
            h.cancel()

        ref_op_after = reference_op_us()
        server_cpu = cpu1 - cpu0
        try:
            bridge_cores = len(os.sched_getaffinity(bridge.pid))
        except OSError:
            bridge_cores = os.cpu_count() or 1
        saturated = server_cpu / window >= SATURATED * bridge_cores
        gen_cpu = 100.0 * (gen1 - gen0) / window

        def pct(key: str, less: float = 0.0) -> float:
            return round(100.0 * max(0.0, busy1[key] - busy0[key] - less) / window, 1)

        other = pct("cpu", server_cpu + (gen1 - gen0))
        machine = {"reference_op_us": ref_op, "reference_op_us_after": ref_op_after, "other_programs_percent": other,
                   "interrupts_percent": pct("irq_cpu")}
        if pinned:  # the bridge has CPU 0 to itself, the generator CPU 1: who else ran there?
            machine.update({"other_programs_cpu0_percent": pct("cpu0", server_cpu),
                            "other_programs_cpu1_percent": pct("cpu1", gen1 - gen0),
                            "interrupts_cpu0_percent": pct("irq_cpu0"), "interrupts_cpu1_percent": pct("irq_cpu1")})
        tick_lag = report.percentiles(run.tick_lag)
        inconclusive = []
        if gen_cpu > GENERATOR_CPU_LIMIT:
            inconclusive.append(f"generator CPU {gen_cpu:.0f}% > {GENERATOR_CPU_LIMIT:.0f}%")
        if (tick_lag["p99"] or 0) > TICK_LAG_LIMIT:
            inconclusive.append(f"generator ticks late (p99 {tick_lag['p99']:.0f} ms > {TICK_LAG_LIMIT:.0f} ms)")
        if live_at_start < n:
            inconclusive.append(f"only {live_at_start} of {n} calls were up when the window opened")
        if other > OTHER_LOAD_LIMIT:
            inconclusive.append(f"other programs used {other:.0f}% of a core > {OTHER_LOAD_LIMIT:.0f}%")
        if abs(ref_op_after - ref_op) > SPEED_DRIFT_LIMIT * min(ref_op, ref_op_after):
            inconclusive.append(f"the machine's speed changed during the run (reference op {ref_op:.2f} -> "
                                f"{ref_op_after:.2f} µs)")
        result = {
            "config": {
                "calls": n, "seconds": round(window, 3), "workers": args.workers,
                "inbound_buffer_bytes": buffer_bytes, "phases": args.phases, "ramp_s": args.ramp,
                "pinned": pinned, "server_cmd": bridge.cmd, "bridge_processes": len(pids),
                "event_loop": bridge_event_loop(),
            },
            "server": {
                "cpu_percent": round(100.0 * server_cpu / window, 2),
                "cpu_us_per_call_second": round(server_cpu * 1e6 / (n * window), 1),
                "rss_idle_kb": rss_idle, "rss_peak_kb": rss_peak,
                "rss_per_call_kb": round((rss_peak - rss_idle) / n, 1),
                "health_calls_mid_window": health_calls,
                "cores": bridge_cores,
                # At saturation the CPU is capped, so µs per call-second is a floor, not the cost,
                # and latency measures the bridge's backlog.
                "saturated": saturated,
            },
            "generator": {
                "cpu_percent": round(gen_cpu, 2),
                "tick_lag_ms": tick_lag,

                "note": "the generator's CPU includes the fake agent (same process)",
            },
            "latency_ms": {
                "caller_to_agent": report.percentiles(run.up_excl),
                "agent_to_caller": report.percentiles(run.down),
                "barge_in_to_clear": report.percentiles(run.clear),
                "function_call": report.percentiles(run.fc),
                "caller_to_agent_incl_buffering": report.percentiles(run.up_incl),
            },
            "machine": machine,
            "inconclusive": inconclusive,
            "integrity": report.integrity(run, agent.connections),
            "events": report.events(run),
        }
    finally:
        for ph in phases:
            ph.cancel()
        for c in callers:
            if c.transport is not None:
                c.transport.close()
        rc = bridge.stop()
        await agent.stop()
        if result:
            result["config"]["server_exit_code"] = rc
            result["config"]["server_log_tail"] = bridge.log_tail(20).splitlines()
        shutil.rmtree(workdir, ignore_errors=True)
    return result


async def amain(args: argparse.Namespace) -> int:
    pinned = pin_self(not args.no_pin)
    buffers = SWEEP_BUFFERS if args.buffer_sweep else (args.buffer,)
    results = []
    for b in buffers:
        if args.wait_quiet > 0:
            await wait_quiet(args.wait_quiet)
        try:
            res = await run_once(args, b, pinned)
        except RuntimeError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 2
        report.print_result(res)
        results.append(res)
    if args.buffer_sweep:
        report.print_sweep(results)
    if args.json:
        out = {"sweep": results} if args.buffer_sweep else results[0]
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if all(r["integrity"]["ok"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not sys.platform.startswith("linux"):
        # CPU and memory come from /proc, and pinning uses taskset: both Linux only.
        print("bench: python -m bench needs Linux (it reads /proc and pins with taskset).", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))
