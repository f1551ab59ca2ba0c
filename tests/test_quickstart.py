"""The README's Quick start, followed literally by a newcomer, shows what the README says it shows.

The test clones the repository at HEAD (so commit before running it: uncommitted changes are not
in a clone) into a temporary folder and runs the Quick start's shell blocks there, in one bash
session, as someone would type them: a fresh virtual environment, ``cp .env.example .env``,
``pip install -r requirements.txt && python main.py``. It first runs the bridge *before* the key
is put in (the mistake the placeholder check exists for), then makes the edit the README asks for
and runs it again, and checks the banner, the TwiML and ``/health`` against the README's text.

It needs the package index: pip installs requirements.txt into the fresh environment (from pip's
cache when it can). Without the index it fails with a message saying so, within pip's timeouts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port
from test_docs import code_blocks, section

pytestmark = [pytest.mark.network, pytest.mark.timeout(400)]

FAKE_KEY = "quickstart-test-key-not-real"
PLACEHOLDER_ERROR = (
    "error: DEEPGRAM_API_KEY is still the placeholder from .env.example: put your Deepgram API key in .env."
)
# Settings a developer's shell may carry; the newcomer's clone must see only its own .env.
INHERITED = re.compile(r"^(DEEPGRAM_|TWILIO_|PUBLIC_URL$|HOST$|PORT$|PHONE_PAGE|LOG_LEVEL$|RECORD_CALLS$|CALLS_DIR$|"
                       r"PHARMACY_DB$|VIRTUAL_ENV$|PYTHONPATH$|PYTHONHOME$|PIP_)")


def quick_start() -> tuple[str, str, str, str]:
    """(the setup block, the run block, the placeholder to replace, the expected output block)."""
    text = section("Quick start")
    setup, run = code_blocks(text, "sh")[:2]
    assert "cp .env.example .env" in setup and run.strip().endswith("python main.py"), (setup, run)
    placeholder = re.search(r"replace `([^`]+)` with your key", text)
    assert placeholder, "the Quick start must say which placeholder in .env to replace with the key"
    (expected,) = code_blocks(text, "text")
    return setup, run, placeholder.group(1), expected


def clone_head(destination: Path) -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(ROOT), str(destination)], check=True, timeout=60)
    subprocess.run(["git", "-C", str(destination), "checkout", "--quiet", head.stdout.strip()], check=True, timeout=60)


def newcomer_environment(port: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not INHERITED.match(name)}
    # python3 is this interpreter (3.11+); the venv's python and pip come first once activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        PORT=str(port),  # a real environment variable wins over .env: a free port, not 5000
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        PIP_PROGRESS_BAR="off",
        PIP_DEFAULT_TIMEOUT="20",
        PIP_RETRIES="1",
    )
    return env


class Output:
    """Lines of a process's output, gathered by a thread so waiting on them has a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert process.stdout is not None
        stream = process.stdout

        def read() -> None:
            for line in stream:
                self._queue.put(line)
            self._queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, seconds: float) -> re.Match[str] | None:
        deadline = time.monotonic() + seconds
        while (found := re.search(pattern, self.text, flags=re.M)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
            if line is None:  # the process closed its output
                return re.search(pattern, self.text, flags=re.M)
            self.lines.append(line)
        return found

    def drain(self, seconds: float) -> None:
        self.wait_for(r"\A(?!)", seconds)  # a pattern that never matches: read until the end


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read().decode()


def test_the_quick_start_works_as_written_in_a_fresh_clone(tmp_path: Path) -> None:
    setup, run, placeholder, expected = quick_start()
    clone = tmp_path / "clone"
    clone_head(clone)
    port = free_port()
    edit = f"sed -i 's/^DEEPGRAM_API_KEY={re.escape(placeholder)}$/DEEPGRAM_API_KEY={FAKE_KEY}/' .env"
    script = "\n".join([
        setup,
        run,  # the newcomer who skipped the edit
        'echo "quickstart: first run exited $?"',
        edit,  # the edit the README asks for
        run,
    ])
    process = subprocess.Popen(
        ["bash", "-c", script], cwd=clone, env=newcomer_environment(port), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    output = Output(process)
    try:
        first = output.wait_for(r"^quickstart: first run exited (\d+)$", 300)
        assert first is not None, "the first run did not finish within 300 s:\n" + output.text[-3000:]
        if first.group(1) != "2" and "ERROR:" in output.text:
            pytest.fail("pip could not install requirements.txt (is the package index reachable?):\n" + output.text[-3000:])
        assert first.group(1) == "2" and PLACEHOLDER_ERROR in output.text, output.text[-3000:]

        twiml = re.escape("<Response><Connect>")
        assert output.wait_for(twiml, 120), "the bridge printed no TwiML:\n" + output.text[-3000:]
        status, body = get(port, "/health")
        assert status == 200 and json.loads(body) == {"status": "ok", "calls": 0}
        assert '`{"status": "ok", "calls": 0}`' in section("Quick start")
        status, index = get(port, "/")
        assert status == 200 and "/twilio" in index and "/health" in index
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    output.drain(5)
    shown = output.text.split("quickstart: first run exited", 1)[1]
    for line in expected.splitlines():
        if line.strip():
            assert line.strip().replace(":5000", f":{port}") in shown, f"the README shows {line.strip()!r}; the bridge printed:\n{shown[-3000:]}"
    assert "Traceback" not in output.text
    assert FAKE_KEY not in output.text, "the API key must never be printed"
