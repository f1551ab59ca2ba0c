"""Summaries of a run: percentiles, per-call integrity, and the printed table."""

from __future__ import annotations

import collections
from array import array

from .model import Run


def percentiles(samples: array) -> dict:
    """p50/p99/max in ms of nanosecond samples."""
    n = len(samples)
    if not n:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    s = sorted(samples)
    pick = lambda q: round(s[min(n - 1, int(q * (n - 1) + 0.5))] / 1e6, 3)  # noqa: E731
    return {"n": n, "p50": pick(0.50), "p99": pick(0.99), "max": round(s[-1] / 1e6, 3)}


def integrity(run: Run, agent_connections: int) -> dict:
    """Per call: every byte sent arrived, in order, unchanged, both ways; and no protocol errors.
    The bridge must also open exactly one agent connection per call."""
    failed = []
    up_sent = up_recv = down_sent = down_recv = 0
    for c in sorted(run.calls.values(), key=lambda c: c.cid):
        up_n = c.up.nbytes if c.up is not None else 0
        problems = list(c.errors)
        if not c.connected:
            problems.append("never connected")
        if c.up is None:
            problems.append("no caller audio reached the agent")
        elif c.up.error:
            problems.append(f"caller->agent: {c.up.error}")
        if up_n != c.up_sent:
            problems.append(f"caller->agent: sent {c.up_sent} B, agent got {up_n} B")
        if c.down.error:
            problems.append(f"agent->caller: {c.down.error}")
        if c.down.nbytes != c.down_sent:
            problems.append(f"agent->caller: agent sent {c.down_sent} B, caller got {c.down.nbytes} B")
        if c.down_sent == 0:
            problems.append("the agent never spoke")
        if problems:
            failed.append({"call": c.cid, "problems": problems})
        up_sent += c.up_sent
        up_recv += up_n
        down_sent += c.down_sent
        down_recv += c.down.nbytes
    return {
        "ok": not failed and bool(run.calls) and agent_connections == len(run.calls),
        "agent_connections": agent_connections,
        "calls": len(run.calls),
        "calls_ok": len(run.calls) - len(failed),
        "caller_to_agent_bytes": {"sent": up_sent, "received": up_recv},
        "agent_to_caller_bytes": {"sent": down_sent, "received": down_recv},
        "failed": failed[:20],
        "run_notes": dict(run.notes),
    }


def events(run: Run) -> dict:
    total: collections.Counter = collections.Counter()
    for c in run.calls.values():
        total.update(c.counts)
    return dict(sorted(total.items()))


def _fmt(v, width=8, prec=2) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{prec}f}"


def print_result(r: dict) -> None:
    cfg, srv, gen, lat, integ, ev = (r["config"], r["server"], r["generator"], r["latency_ms"],
                                     r["integrity"], r["events"])
    buf = cfg["inbound_buffer_bytes"]
    pin = "bridge on CPU 0, generator on CPU 1" if cfg["pinned"] else "not pinned"
    print()
    print(f"bench: {cfg['calls']} calls, {cfg['seconds']:.1f} s window, {cfg['workers']} worker(s) "
          f"({cfg['bridge_processes']} process(es)), INBOUND_CHUNK_BYTES {buf}, {pin}, "
          f"event loop {cfg['event_loop']}")
    print(f"  bridge CPU      {srv['cpu_percent']:6.1f} % of one core   "
          f"{srv['cpu_us_per_call_second']:7.0f} CPU µs per call-second")
    print(f"  bridge RSS      idle {srv['rss_idle_kb'] / 1024:.1f} MB, peak {srv['rss_peak_kb'] / 1024:.1f} MB"
          f"  -> {srv['rss_per_call_kb']:.0f} KB per call   (/health calls mid-window: "
          f"{srv['health_calls_mid_window']})")
    lag = gen["tick_lag_ms"]
    if srv["saturated"]:
        print(f"  ** SATURATED: the bridge used all of its {srv['cores']} CPU(s); µs per call-second is a floor, "
              "and latency is its backlog **")
    m = r["machine"]
    print(f"  generator CPU   {gen['cpu_percent']:6.1f} % (with the fake agent); tick lag p99 {_fmt(lag['p99'], 0)} ms")
    cores = (f" (CPU 0 {m['other_programs_cpu0_percent']} %, CPU 1 {m['other_programs_cpu1_percent']} %)"
             if "other_programs_cpu0_percent" in m else "")
    print(f"  other programs  {m['other_programs_percent']:6.1f} % of a core{cores}; interrupts (loopback "
          f"networking) {m['interrupts_percent']:.1f} %")
    print(f"  machine speed   {m['reference_op_us']:.2f} µs per reference op before the run, "
          f"{m['reference_op_us_after']:.2f} after (json.loads + b64decode of a media message); compare runs only "
          "when these agree")
    if r["inconclusive"]:
        print(f"  ** INCONCLUSIVE: {'; '.join(r['inconclusive'])} **")
    print(f"  added latency (ms)                      {'p50':>8} {'p99':>8} {'max':>8} {'samples':>9}")
    rows = [("a caller -> agent (completing frame)", "caller_to_agent"),
            ("b agent -> caller", "agent_to_caller"),
            ("c UserStartedSpeaking -> clear", "barge_in_to_clear"),
            ("d FunctionCallRequest -> Response", "function_call"),
            (f"  caller -> agent incl. {buf} B buffering", "caller_to_agent_incl_buffering")]
    for label, key in rows:
        s = lat[key]
        print(f"  {label:<39} {_fmt(s['p50'])} {_fmt(s['p99'])} {_fmt(s['max'])} {s['n']:>9}")
    up, down = integ["caller_to_agent_bytes"], integ["agent_to_caller_bytes"]
    status = "OK" if integ["ok"] else "FAILED"
    print(f"  integrity {status}: {integ['calls_ok']}/{integ['calls']} calls byte-exact both ways, no protocol "
          f"errors (caller->agent {up['received']}/{up['sent']} B, agent->caller {down['received']}/{down['sent']} B)")
    if integ["agent_connections"] != integ["calls"]:
        print(f"    the bridge opened {integ['agent_connections']} agent connections for {integ['calls']} calls")
    for f in integ["failed"][:5]:
        print(f"    call {f['call']}: {'; '.join(f['problems'][:3])}")
    if integ["run_notes"]:
        print(f"  notes: {integ['run_notes']}")
    print("  events (counted by the fake peers): " + ", ".join(f"{k} {v}" for k, v in ev.items()))


def print_sweep(results: list[dict]) -> None:
    print()
    print("caller -> agent latency by INBOUND_CHUNK_BYTES (ms; 'incl.' counts each frame from when the caller")
    print("sent it, so it includes waiting for the buffer to fill; 'added' counts from the completing frame)")
    print(f"  {'buffer':>7} {'audio':>7} {'incl p50':>9} {'incl p99':>9} {'added p50':>10} {'added p99':>10}"
          f" {'bridge CPU %':>13} {'µs/call-s':>10}")
    for r in results:
        b = r["config"]["inbound_buffer_bytes"]
        inc, exc = r["latency_ms"]["caller_to_agent_incl_buffering"], r["latency_ms"]["caller_to_agent"]
        print(f"  {b:>7} {b / 8:>5.0f}ms {_fmt(inc['p50'], 9)} {_fmt(inc['p99'], 9)} {_fmt(exc['p50'], 10)}"
              f" {_fmt(exc['p99'], 10)} {r['server']['cpu_percent']:>13.1f}"
              f" {r['server']['cpu_us_per_call_second']:>10.0f}" + ("  (inconclusive)" if r["inconclusive"] else ""))
