"""Starting the bridge under test and reading its CPU time and memory from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (the bridge's worker processes)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found = [pid]
    for p in found:
        found.extend(c for c, pp in parent.items() if pp == p)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def machine_busy_seconds() -> dict[str, float]:
    """CPU seconds since boot from /proc/stat: busy in processes (user, nice, system, steal) as "cpu"
    (all cores) and "cpuN", and in interrupts (irq, softirq: loopback networking, charged to no
    process) as "irq_cpu" and "irq_cpuN"."""
    busy = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *rest = line.split()
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in rest[:8])
            busy[name] = (user + nice + system + steal) / CLK_TCK
            busy["irq_" + name] = (irq + softirq) / CLK_TCK
    return busy


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


class Bridge:
    """The server as a subprocess: `python main.py --host --port --config [--workers]`."""

    def __init__(self, *, workdir: Path, agent_url: str, buffer_bytes: int, calls: int, workers: int,
                 config: Path, pin: bool, record: bool, main: Path, log_level: str = "WARNING"):
        self.port = free_port()
        self.log_path = workdir / "server.log"
        cmd = [sys.executable, str(main), "--host", "127.0.0.1", "--port", str(self.port),
               "--config", str(config)]
        if workers != 1:
            cmd += ["--workers", str(workers)]
        self.pinned = bool(pin and shutil.which("taskset"))
        if self.pinned:
            cmd = ["taskset", "-c", "0"] + cmd
        env = dict(os.environ)
        env.update({
            "DEEPGRAM_API_KEY": "bench-key",
            "DEEPGRAM_AGENT_URL": agent_url,
            "INBOUND_CHUNK_BYTES": str(buffer_bytes),
            "MAX_CALLS": str(calls + 50),
            "RECORD_CALLS": "true" if record else "false",
            "CALLS_DIR": str(workdir / "calls"),
            "PHARMACY_DB": str(workdir / "pharmacy.db"),
            "LOG_LEVEL": log_level,
            "PYTHONUNBUFFERED": "1",
            "TWILIO_AUTH_TOKEN": "",  # an empty value keeps a local .env from turning signature checks on
        })
        self.cmd = cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=str(main.parent), env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return descendants(self.proc.pid)

    async def health(self) -> tuple[int, dict | None]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    async def wait_ready(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the bridge exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = await self.health()
                if status == 200 and body and body.get("status") == "ok":
                    return body
                last = f"HTTP {status} {body}"
            except (OSError, asyncio.TimeoutError, ValueError, IndexError) as e:
                last = repr(e)
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the bridge was not healthy within {timeout} s ({last}):\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.closed:
            self.log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
