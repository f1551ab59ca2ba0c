"""``--workers N``: N server processes sharing one port, supervised by the process that started them.

The parent checks the port is free (``claim_port``), starts N copies of main.py with
``--worker-index`` (each with SO_REUSEPORT on the same port, each in its own process group),
passes SIGTERM, SIGINT and SIGHUP on to every worker, and starts a new worker in place of one that
dies, within a restart budget (``RestartBudget``): workers that keep dying mean every start fails
the same way, and the parent then stops the others and exits, so that systemd or Kubernetes above
it can act. A worker whose parent is killed outright drains and exits too
(``stop_when_parent_dies``). The workers share their metrics through a private folder
(bridge/metrics.py, ``METRICS_DIR_VARIABLE``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

from .metrics import WorkerShare

logger = logging.getLogger("bridge")

# Workers that exit while the service runs are replaced, up to this many within the window.
MAX_WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW_SECONDS = 60.0
WORKER_POLL_SECONDS = 0.2
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
# The private directory through which --workers share their metrics: set by the parent only.
METRICS_DIR_VARIABLE = "BRIDGE_WORKER_METRICS_DIR"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def claim_port(host: str, port: int) -> int:
    """Check that nothing listens on ``host:port`` yet, and pick the port if it is 0.

    Workers share the port with SO_REUSEPORT, which would also let them share it, silently,
    with a bridge that is already running. A plain bind fails if anything listens there.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        probe.bind(address)
        probe.listen()
        return int(probe.getsockname()[1])


def stop_when_parent_dies(parent: int) -> None:
    """A worker whose parent is killed outright (SIGKILL, the OOM killer) drains and exits too.

    Otherwise it would go on holding the port, unseen, and take part of the next bridge's calls.
    Linux only (prctl PR_SET_PDEATHSIG); elsewhere the worker outlives its parent.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request could take effect
        signal.raise_signal(signal.SIGTERM)


def run_workers(script: Path, argv: Sequence[str], workers: int, phone_page_token: str) -> int:
    """Start N copies of ``script`` (main.py) on one port, keep N running, and pass signals on to them."""
    # Every worker must accept the one phone-page token the parent printed, and each puts its
    # metrics where the others can add them to a scrape (bridge/metrics.py).
    with tempfile.TemporaryDirectory(prefix="bridge-metrics-") as metrics_dir:
        env = {**os.environ, "PHONE_PAGE_TOKEN": phone_page_token, METRICS_DIR_VARIABLE: metrics_dir}
        return supervise_workers(script, argv, workers, env, Path(metrics_dir))


class RestartBudget:
    """At most ``limit`` worker restarts within any ``window`` seconds; time is passed in.

    A worker that dies now and then (the OOM killer, a bug) is replaced. Workers that keep dying
    mean every start fails the same way, and restarting them forever would hide that from the
    supervisor above (systemd, Kubernetes), which can only act on a process that exits.
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._restarts: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._restarts and now - self._restarts[0] >= self.window:
            self._restarts.popleft()
        if len(self._restarts) >= self.limit:
            return False
        self._restarts.append(now)
        return True


def exit_status(code: int) -> int:
    """A Popen returncode as a shell reports it: a signal's death is 128 + its number."""
    return 128 - code if code < 0 else code


def exit_description(code: int) -> str:
    """A Popen returncode in words: "exit code 1", "killed by SIGKILL"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def supervise_workers(
    script: Path, argv: Sequence[str], workers: int, env: dict[str, str], metrics_dir: Path | None = None
) -> int:
    """Run the workers until a stop signal (or too many deaths); returns the exit code to use."""

    @contextlib.contextmanager
    def signals_held() -> Iterator[None]:
        # Held while a worker starts and joins ``running``: a stop signal then reaches it through
        # forward() once it is there, and never twice (a worker's second signal means "exit now").
        # The child inherits the held mask and releases it once its own handlers exist, so a
        # signal sent while it is still importing waits for it instead of killing it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS | {signal.SIGHUP})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def start(index: int) -> None:
        # Each worker is in a process group of its own: a Ctrl-C at the terminal then reaches the
        # parent only, and each worker hears it once, forwarded, instead of twice.
        running[index] = subprocess.Popen(
            [sys.executable, str(script), *argv, "--worker-index", str(index),
             "--parent-pid", str(os.getpid())],
            env=env,
            process_group=0,
        )

    running: dict[int, subprocess.Popen[bytes]] = {}
    codes: list[int] = []
    stopping = False
    budget = RestartBudget(MAX_WORKER_RESTARTS, WORKER_RESTART_WINDOW_SECONDS)

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:  # SIGHUP reloads; the others stop the service
            stopping = True
        for child in running.values():
            if child.poll() is None:
                child.send_signal(signum)

    with signals_held():
        for index in range(workers):
            start(index)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGHUP, forward)  # each worker reloads its own agents
    while running:
        time.sleep(WORKER_POLL_SECONDS)  # a signal's handler runs at once; this only paces the checks
        for index, child in list(running.items()):
            code = child.poll()
            if code is None:
                continue
            del running[index]
            if stopping:
                codes.append(exit_status(code))
                continue
            if metrics_dir is not None:
                WorkerShare.retire(metrics_dir, str(index))
            if budget.allow(time.monotonic()):
                logger.warning("worker %d (pid %d) exited (%s); starting another", index, child.pid, exit_description(code))
                with signals_held():
                    start(index)
                continue
            logger.error(
                "worker %d (pid %d) exited (%s), more than %d worker exits within %.0f s: stopping the others",
                index, child.pid, exit_description(code), MAX_WORKER_RESTARTS, WORKER_RESTART_WINDOW_SECONDS,
            )
            codes.append(exit_status(code) or 1)
            forward(signal.SIGTERM, None)
    return max(codes)
