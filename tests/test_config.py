"""Startup validation: every problem is one sentence naming the file and what is wrong."""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from deepgram.agent.v1 import AgentV1Settings

import main
from bridge import workers
from bridge.agent_protocol import history_function_call, history_text, settings_message, FunctionCall
from bridge.config import MAX_JSON_DEPTH, parse_agent_config, parse_json, read_config_file
from bridge.settings import ConfigError, load_settings
from conftest import ROOT, empty_env, free_port
from sdk_oracle import assert_valid_client_message

CONFIG = json.loads((ROOT / "config.json").read_text())


def validate_settings(message: str | dict[str, Any]) -> AgentV1Settings:
    """The SDK's model of a Settings message, failing on any unknown key (tests/sdk_oracle.py)."""
    data = json.loads(message) if isinstance(message, str) else message
    assert_valid_client_message(data)
    return AgentV1Settings.model_validate(data)


def test_config_json_is_a_valid_v1_settings_message() -> None:
    model = validate_settings(CONFIG)
    assert model.audio.input.encoding == "mulaw" and model.audio.input.sample_rate == 8000
    assert model.audio.output.container == "none"


def test_the_model_walk_catches_unknown_keys() -> None:
    broken = json.loads(json.dumps(CONFIG))
    broken["agent"]["think"]["provider"]["temprature"] = 0.5
    with pytest.raises(AssertionError, match="temprature"):
        validate_settings(broken)


def test_resumed_settings_with_history_are_valid() -> None:
    call = FunctionCall(id="f1", name="get_drug_info", arguments='{"drug_name": "ibuprofen"}')
    history = [history_text("user", "Do you have ibuprofen?"), history_function_call(call, '{"price": 8.99}')]
    message = settings_message(CONFIG, history)
    validate_settings(message)
    assert json.loads(message)["agent"]["context"]["messages"] == [
        {"type": "History", "role": "user", "content": "Do you have ibuprofen?"},
        {"type": "History", "function_calls": [{"id": "f1", "name": "get_drug_info", "client_side": True,
                                                "arguments": '{"drug_name": "ibuprofen"}', "response": '{"price": 8.99}'}]},
    ]
    assert "greeting" not in json.loads(message)["agent"], "a resumed call must not be greeted again"
    assert "greeting" in json.loads(settings_message(CONFIG, []))["agent"]
    assert "context" not in CONFIG["agent"], "the loaded config must not be mutated"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def edited(edit: Any) -> str:
    config = json.loads(json.dumps(CONFIG))
    edit(config)
    return json.dumps(config, indent=2)


STARTUP_ERRORS = {
    "invalid json": ('{"type": "Settings",\n  "audio": }', "is not valid JSON: Expecting value at line 2, column 12."),
    "missing type": (edited(lambda c: c.pop("type")), 'is missing the "type" key'),
    "missing audio": (edited(lambda c: c.pop("audio")), 'is missing the "audio" key'),
    "missing agent": (edited(lambda c: c.pop("agent")), 'is missing the "agent" key'),
    "linear16 input": (
        edited(lambda c: c["audio"]["input"].update(encoding="linear16", sample_rate=16000)),
        '"audio.input" must be encoding "mulaw" with sample_rate 8000',
    ),
    "wav output": (edited(lambda c: c["audio"]["output"].update(container="wav")), '"audio.output.container" must be "none"'),
    "unknown top-level key": (edited(lambda c: c.update(voice="x")), '"voice" is not a v1 Settings key'),
    "old agent key": (edited(lambda c: c["agent"].update(speaking={})), '"agent.speaking" is not a v1 Settings key'),
    "typo below agent": (
        edited(lambda c: c["agent"]["think"].update(promt="x")),
        '"agent.think.promt" is not a v1 Settings key; did you mean "prompt"?',
    ),
    "typo in a provider": (
        edited(lambda c: c["agent"]["listen"]["provider"].update(modle="nova-3")),
        '"agent.listen.provider.modle" is not a v1 Settings key',
    ),
    "unset variable": (
        edited(lambda c: c["agent"]["think"].update(endpoint={"url": "https://llm.example", "headers": {"authorization": "Bearer ${LLM_API_KEY}"}})),
        "uses ${LLM_API_KEY} but LLM_API_KEY is not set in the environment (.env).",
    ),
    "client_side set": (
        edited(lambda c: c["agent"]["think"]["functions"][0].update(client_side=True)),
        "must not set \"client_side\"",
    ),
}


@pytest.mark.parametrize("case", sorted(STARTUP_ERRORS))
def test_startup_refuses_a_bad_config_in_one_sentence(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    text, expected = STARTUP_ERRORS[case]
    path = write_config(tmp_path, text)
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    monkeypatch.delenv("LLM_API_KEY", raising=False)
    assert main.main(["--config", str(path), "--env-file", str(empty_env(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err



def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_json_nested_up_to_the_limit_is_taken_and_one_level_more_is_not() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH), "x.json") == eval(nested(MAX_JSON_DEPTH))
    assert parse_json('{"a": ' + nested(MAX_JSON_DEPTH - 1) + "}", "x.json") == {"a": eval(nested(MAX_JSON_DEPTH - 1))}
    for text in (nested(MAX_JSON_DEPTH + 1), '{"a": ' + nested(MAX_JSON_DEPTH) + "}", nested(100_000)):
        with pytest.raises(ConfigError) as caught:
            parse_json(text, "x.json")
        assert str(caught.value) == (
            "x.json nests objects and lists more than 64 levels deep; a Settings message needs about 8, "
            "so check the file for runaway brackets."
        )


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": NaN}', "x.json is not valid JSON: NaN is not a JSON number."),
        ('[-Infinity]', "x.json is not valid JSON: -Infinity is not a JSON number."),
        ("9" * 5000, "x.json has a number of more than 4300 digits."),
    ],
)
def test_json_that_python_would_take_but_is_no_valid_settings_is_one_sentence(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_json(text, "x.json")
    assert str(caught.value) == expected


def test_a_config_file_must_be_a_regular_file_within_the_cap(tmp_path: Path) -> None:
    (tmp_path / "folder.json").mkdir()
    (tmp_path / "ok.json").write_bytes(b"x" * 99)
    (tmp_path / "big.json").write_bytes(b"x" * 100)
    (tmp_path / "latin1.json").write_bytes(b'{"a": "caf\xe9"}')
    assert read_config_file(tmp_path / "ok.json", "ok.json", max_bytes=99) == "x" * 99
    over = "over the limit of 99 bytes for a config file; an agent's Settings are a few kilobytes, so check that this is the right file."
    not_regular = "not a regular file; the bridge reads only regular files, so put the JSON file itself there."
    cases = [
        ("folder.json", f"folder.json is a folder, {not_regular}"),
        ("/dev/zero", f"/dev/zero is a device, {not_regular}"),
        ("missing.json", "Cannot read missing.json: No such file or directory."),
        ("big.json", f"big.json is 100 bytes, {over}"),
        # Its size says 0 and it holds about 150 KB: only reading finds it is too big.
        ("/proc/self/smaps", f"/proc/self/smaps is more than 99 bytes, {over}"),
        ("latin1.json", "latin1.json is not UTF-8 text."),
    ]
    for name, expected in cases:
        before = bytes_read()
        with pytest.raises(ConfigError) as caught:
            read_config_file(tmp_path / name, name, max_bytes=99)
        assert str(caught.value) == expected
        assert bytes_read() - before < 16_000, f"{name}: read past the cap"


def bytes_read() -> int:
    """What this process has read so far, through read() and the like (Linux's /proc/self/io)."""
    [line] = [line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")]
    return int(line.split()[1])

def test_missing_api_key_says_to_copy_env_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
    assert main.main(["--env-file", str(empty_env(tmp_path))]) == 2
    assert capsys.readouterr().err == (
        "error: DEEPGRAM_API_KEY is not set: copy .env.example to .env and put your Deepgram API key in it.\n"
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"INBOUND_CHUNK_BYTES": "lots"}, "INBOUND_CHUNK_BYTES must be a whole number, got 'lots'."),
        ({"INBOUND_BUFFER_BYTES": "lots"}, "INBOUND_CHUNK_BYTES must be a whole number, got 'lots'."),  # the old name
        ({"MAX_CALLS": "0"}, "MAX_CALLS must be between 1 and 100000, got 0."),
        ({"RECORD_CALLS": "maybe"}, "RECORD_CALLS must be true or false, got 'maybe'."),
        ({"TWILIO_AUTH_TOKEN": "t"}, "TWILIO_AUTH_TOKEN is set but PUBLIC_URL is not"),
        ({"DEEPGRAM_AGENT_URL": "https://x"}, "DEEPGRAM_AGENT_URL must start with wss:// or ws://"),
    ],
)
def test_bad_environment_values(env: dict[str, str], expected: str) -> None:
    with pytest.raises(Exception, match="^" + expected.replace("(", r"\(").replace(")", r"\)")[:40]):
        load_settings({"DEEPGRAM_API_KEY": "k", **env})


def test_variables_are_substituted_from_the_environment() -> None:
    text = edited(lambda c: c["agent"]["think"].update(endpoint={"url": "https://llm.example/v1", "headers": {"authorization": "Bearer ${LLM_API_KEY}"}}))
    config = parse_agent_config(text, Path("config.json"), {"LLM_API_KEY": "sk-123"})
    assert config.settings["agent"]["think"]["endpoint"]["headers"]["authorization"] == "Bearer sk-123"


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "-1"])
def test_seconds_must_be_a_real_number_of_seconds(raw: str) -> None:
    """nan would pass a plain comparison and then break every timer that uses it."""
    for name, minimum in (("FUNCTION_TIMEOUT_SECONDS", 0.1), ("DRAIN_TIMEOUT_SECONDS", 0.0), ("AGENT_CONNECT_TIMEOUT_SECONDS", 0.5)):
        with pytest.raises(ConfigError) as caught:
            load_settings({"DEEPGRAM_API_KEY": "k", name: raw})
        assert str(caught.value) == f"{name} must be a number of seconds of at least {minimum:g}, got {raw!r}."


def test_port_flag_out_of_range_is_one_sentence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    assert main.main(["--port", "70000", "--env-file", str(empty_env(tmp_path))]) == 2
    assert capsys.readouterr().err == "error: --port must be between 0 and 65535, got 70000.\n"


def test_an_env_file_named_on_the_command_line_must_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    missing = tmp_path / "prod.env"
    assert main.main(["--env-file", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: --env-file {missing} does not exist.\n"


def test_settings_defaults_and_twiml() -> None:
    settings = load_settings({"DEEPGRAM_API_KEY": "k", "PUBLIC_URL": "https://abc.ngrok.app/"})
    # Only this machine until told otherwise: ngrok reaches 127.0.0.1 (the Dockerfile sets 0.0.0.0).
    assert (settings.host, settings.port, settings.inbound_chunk_bytes, settings.max_calls) == ("127.0.0.1", 5000, 3200, 200)
    assert settings.twiml == '<Response><Connect><Stream url="wss://abc.ngrok.app/twilio"/></Connect></Response>'
    assert load_settings({"DEEPGRAM_API_KEY": "k"}, host="127.0.0.1", port=6000).port == 6000


def test_main_starts_prints_twiml_and_serves_health(tmp_path: Path) -> None:
    """The real program: .env is loaded, TwiML printed, /health answers, SIGTERM exits 0."""
    env_file = tmp_path / ".env"
    env_file.write_text("DEEPGRAM_API_KEY=from-dotenv\nPUBLIC_URL=https://abc.ngrok.app\nRECORD_CALLS=false\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DEEPGRAM_API_KEY", "PUBLIC_URL")}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", "0", "--env-file", str(env_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )
    try:
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "serving on" in line:
                break
        output = "".join(lines)
        assert "serving on http://127.0.0.1:" in output
    finally:
        process.terminate()
        process.wait(timeout=10)
    output += process.stdout.read()
    assert '<Response><Connect><Stream url="wss://abc.ngrok.app/twilio"/></Connect></Response>' in output
    assert process.returncode == 0
    assert "from-dotenv" not in output


def test_main_on_an_old_python_says_so_in_one_sentence(tmp_path: Path) -> None:
    """Before 3.11, main.py stops with one sentence and status 2, before importing what needs 3.11.

    The old Python is faked (sys.version_info replaced before main.py runs); that main.py parses
    on one is checked with ast's grammar of Python 3.8, as an old Python compiles the whole file
    before it runs the check.
    """
    ast.parse((ROOT / "main.py").read_text(encoding="utf-8"), feature_version=(3, 8))
    as_python_3_8 = f"""
import atexit, runpy, sys
sys.version_info = (3, 8, 10, "final", 0)
sys.argv = ["main.py", "--port", "0", "--env-file", sys.argv[1]]
sys.path.insert(0, {str(ROOT)!r})  # as "python main.py" would
# What main.py had imported by the time it stopped: none of it should have been.
atexit.register(lambda: print(sorted(m for m in sys.modules if m.split(".")[0] in ("argparse", "asyncio", "bridge", "dotenv"))))
runpy.run_path({str(ROOT / "main.py")!r}, run_name="__main__")
"""
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRAM_API_KEY"}  # past the check, it would stop there
    result = subprocess.run(
        [sys.executable, "-c", as_python_3_8, str(empty_env(tmp_path))],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=30,
    )
    assert (result.returncode, result.stdout) == (2, "[]\n"), result
    assert result.stderr == (
        f"error: the bridge needs Python 3.11 or newer, and this is Python 3.8.10 ({sys.executable}): make the "
        "virtual environment with a newer one, for example python3.11 -m venv .venv.\n"
    )


def test_serving_freezes_what_startup_built(tmp_path: Path) -> None:
    """Startup's objects are moved out of the collector's sight once the server listens."""
    probe = f"""
import asyncio, gc, os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import main
settings, agent_config, function_map, _ = main.load(main.parse_args(["--host", "127.0.0.1", "--port", "0", "--env-file", {str(empty_env(tmp_path))!r}]))
gc.collect()
assert gc.get_freeze_count() == 0

async def probe():
    serving = asyncio.create_task(main.serve(settings, agent_config, function_map, reuse_port=False, announce_startup=False))
    for _ in range(500):  # up to 5 s
        if gc.get_freeze_count() or serving.done():
            break
        await asyncio.sleep(0.01)
    tracked = {{id(o) for o in gc.get_objects()}}
    print(gc.get_freeze_count(), id(sys.modules["bridge.session"].__dict__) in tracked, id(function_map) in tracked)
    os.kill(os.getpid(), signal.SIGTERM)
    await serving

asyncio.run(probe())
"""
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"}
    result = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    frozen, module_tracked, functions_tracked = result.stdout.split()
    assert int(frozen) > 10_000
    assert (module_tracked, functions_tracked) == ("False", "False")


def worker_pids(parent: subprocess.Popen[Any], count: int = 2) -> list[str]:
    """The pids of a --workers parent's children, once all ``count`` have started."""
    import time

    deadline = time.monotonic() + 15
    children: list[str] = []
    while time.monotonic() < deadline and len(children) < count:
        children = subprocess.run(["pgrep", "-P", str(parent.pid)], capture_output=True, text=True).stdout.split()
        time.sleep(0.1)
    assert len(children) == count, children
    return children


def test_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    import re
    import time

    port = free_port()
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false", "PHONE_PAGE": "true"}
    env.pop("PHONE_PAGE_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        token = None
        for line in process.stdout:
            found = re.search(r"/phone\?token=(\S+)", line)
            if found:
                token = found.group(1)
                break
        assert token
        children = worker_pids(process)
        # Both workers accept the one printed token (each new connection may land on either).
        deadline = time.monotonic() + 15
        statuses = set()
        while time.monotonic() < deadline and len(statuses) < 20:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/phone?token={token}", timeout=2) as response:
                    statuses.add((response.status, len(statuses)))
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"a worker refused the printed token: {exc.code}") from None
            except OSError:
                time.sleep(0.1)
        assert len(statuses) == 20
        process.send_signal(__import__("signal").SIGTERM)
        assert process.wait(timeout=10) == 0
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    finally:
        if process.poll() is None:
            process.kill()


def test_ctrl_c_at_the_terminal_drains_the_workers(tmp_path: Path) -> None:
    """A terminal's Ctrl-C goes to its whole foreground process group; each worker must hear it once."""
    import signal

    port = free_port()
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false", "LOG_LEVEL": "INFO"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--env-file", str(empty_env(tmp_path))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        children = worker_pids(process)
        assert process.stderr is not None
        started = []
        for line in process.stderr:  # until both workers listen, so both have their signal handlers
            started.append(line)
            if sum("worker (pid" in seen for seen in started) == 2:
                break
        assert all(os.getpgid(int(child)) != os.getpgid(process.pid) for child in children)
        os.killpg(process.pid, signal.SIGINT)  # what the terminal does
        assert process.wait(timeout=15) == 0
        log = "".join(started) + process.stderr.read()
        assert log.count("received SIGINT: no new calls; draining") == 2, log
        assert "exiting now without draining" not in log
    finally:
        if process.poll() is None:
            process.kill()



def test_workers_refuse_a_port_another_bridge_already_serves(tmp_path: Path) -> None:
    """SO_REUSEPORT would let the workers share the port, silently, with a bridge already running."""
    import socket as socketlib

    with socketlib.socket() as running:
        running.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEPORT, 1)
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        result = subprocess.run(
            [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
             "--env-file", str(empty_env(tmp_path))],
            env={**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"}, capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 2
    assert result.stderr.strip().endswith(f"error: cannot listen on 127.0.0.1:{port}: Address already in use."), result.stderr


def test_calls_dir_that_cannot_take_files_is_refused_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "calls"
    blocker.write_text("a file, not a directory")
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    monkeypatch.setenv("CALLS_DIR", str(blocker / "sub"))
    assert main.main(["--env-file", str(empty_env(tmp_path))]) == 2
    assert capsys.readouterr().err == f"error: CALLS_DIR {blocker / 'sub'} cannot be created: Not a directory.\n"
    monkeypatch.setenv("RECORD_CALLS", "false")  # not recording: the directory doesn't matter
    settings, *_ = main.load(main.parse_args(["--env-file", str(empty_env(tmp_path))]))
    assert not settings.record_calls


def test_the_calls_dir_startup_makes_is_owner_only_under_the_usual_umask(tmp_path: Path) -> None:
    """The real program makes CALLS_DIR and its missing parents 0700, as the records module does."""
    previous = os.umask(0o022)  # the usual one, which gives os.makedirs' folders 0755
    try:
        start_main(tmp_path, f"DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nHOST=127.0.0.1\nCALLS_DIR={tmp_path}/new/deeper/calls\n")
    finally:
        os.umask(previous)
    made = [tmp_path / "new", tmp_path / "new" / "deeper", tmp_path / "new" / "deeper" / "calls"]
    assert [oct(stat.S_IMODE(folder.stat().st_mode)) for folder in made] == [oct(0o700)] * 3


def test_workers_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    import signal
    import time

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--env-file", str(empty_env(tmp_path))],
        env={**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    children: list[str] = []
    try:
        children = worker_pids(process)
        process.send_signal(signal.SIGKILL)  # no chance to pass anything on
        process.wait(timeout=5)

        def gone(pid: str) -> bool:
            status = Path(f"/proc/{pid}/status")
            try:
                return "zombie" in status.read_text().lower()
            except OSError:
                return True

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(gone(pid) for pid in children):
            time.sleep(0.1)
        assert all(gone(pid) for pid in children), "a worker outlived its parent and still holds the port"
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_the_restart_budget_allows_a_few_deaths_in_a_window_and_no_more() -> None:
    budget = workers.RestartBudget(limit=3, window=60.0)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0)] == [True, True, True]
    assert not budget.allow(30.0)  # a fourth within 60 s
    assert budget.allow(60.5)  # the first has left the window (the refused one never counted)
    assert budget.allow(61.0)  # and the second
    assert not budget.allow(61.5)  # 2.0, 60.5 and 61.0 are within it
    assert [workers.exit_status(code) for code in (0, 3, -9, -15)] == [0, 3, 137, 143]
    assert [workers.exit_description(code) for code in (1, -9)] == ["exit code 1", "killed by SIGKILL"]


def test_workers_that_keep_dying_stop_the_service(tmp_path: Path) -> None:
    """A worker that dies is replaced; the sixth death within a minute stops the parent, nonzero."""
    import re
    import signal
    import time

    log_path = tmp_path / "bridge.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(free_port()),
             "--workers", "2", "--env-file", str(empty_env(tmp_path))],
            env={**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"},
            stdout=subprocess.DEVNULL, stderr=log_file, start_new_session=True,
        )

    def listening() -> list[str]:
        return re.findall(r"worker \(pid (\d+)\) listening", log_path.read_text())

    def wait_for(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 15
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {log_path.read_text()}"
            time.sleep(0.05)

    try:
        for death in range(1, workers.MAX_WORKER_RESTARTS + 2):
            wait_for(lambda: len(listening()) == death + 1, "the workers to listen")
            os.kill(int(listening()[-1]), signal.SIGKILL)
            if death <= workers.MAX_WORKER_RESTARTS:
                wait_for(lambda: log_path.read_text().count("starting another") == death, "the replacement")
        assert process.wait(timeout=15) == 137  # 128 + SIGKILL, the way the last worker died
        log = log_path.read_text()
        assert "more than 5 worker exits within 60 s: stopping the others" in log
        assert log.count("received SIGTERM: no new calls; draining") == 1  # the one worker left
        assert "Traceback" not in log
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


# ------------------------------------------------------------------- first-run frictions

@pytest.mark.parametrize("placeholder", ["your-deepgram-api-key", " YOUR-DEEPGRAM-API-KEY ", "your_api_key", "changeme"])
def test_the_placeholder_api_key_is_refused_in_one_sentence(placeholder: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DEEPGRAM_API_KEY": placeholder})
    assert str(caught.value) == (
        "DEEPGRAM_API_KEY is still the placeholder from .env.example: put your Deepgram API key in .env."
    )


def test_env_example_copied_unchanged_does_not_start(tmp_path: Path) -> None:
    # Its own process: loading a .env fills os.environ, which later tests' bridges would inherit.
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    env = {k: v for k, v in os.environ.items() if k != "DEEPGRAM_API_KEY"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--env-file", str(env_file)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == "error: DEEPGRAM_API_KEY is still the placeholder from .env.example: put your Deepgram API key in .env.\n"


def test_log_level_error_names_every_level() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DEEPGRAM_API_KEY": "k", "LOG_LEVEL": "loud"})
    assert str(caught.value) == "LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got 'loud'."
    assert load_settings({"DEEPGRAM_API_KEY": "k", "LOG_LEVEL": "critical"}).log_level == "CRITICAL"


def test_a_missing_function_error_names_the_config_file_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((ROOT / "config.json").read_text())
    config["agent"]["think"]["functions"].append({"name": "refill", "description": "d", "parameters": {"type": "object", "properties": {}}})
    path = tmp_path / "my-agent.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    assert main.main(["--config", str(path), "--env-file", str(empty_env(tmp_path))]) == 2
    assert capsys.readouterr().err == (
        f"error: {path.name} declares function 'refill' but pharmacy_functions.function_map has no such entry.\n"
    )


TWILIO_VARIABLES = {
    "PUBLIC_URL": "https://abc.ngrok.app",
    "TWILIO_AUTH_TOKEN": "t",
    "TWILIO_PHONE_NUMBER": "+15551234567",
    "TRANSFER_NUMBER": "+15551234567",
    "FALLBACK_NUMBER": "+15551234567",
}


def test_browser_only_means_the_phone_page_and_nothing_of_twilios() -> None:
    assert load_settings({"DEEPGRAM_API_KEY": "k", "PHONE_PAGE": "true"}).browser_only
    assert not load_settings({"DEEPGRAM_API_KEY": "k"}).browser_only
    for name, value in TWILIO_VARIABLES.items():
        env = {"DEEPGRAM_API_KEY": "k", "PHONE_PAGE": "true", name: value}
        if name == "TWILIO_AUTH_TOKEN":
            env["PUBLIC_URL"] = "https://abc.ngrok.app"
        assert not load_settings(env).browser_only, name
    sid = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t", "PUBLIC_URL": "https://abc.ngrok.app"}
    assert not load_settings({"DEEPGRAM_API_KEY": "k", "PHONE_PAGE": "true", **sid}).browser_only


def test_routes_lists_what_is_on() -> None:
    from bridge.server import routes

    plain = [path for path, _ in routes(load_settings({"DEEPGRAM_API_KEY": "k"}))]
    assert plain == ["/twilio", "/twiml", "/health", "/metrics", "/"]
    phone = [path for path, _ in routes(load_settings({"DEEPGRAM_API_KEY": "k", "PHONE_PAGE": "true"}))]
    assert phone == ["/twilio", "/phone", "/health", "/metrics", "/"]
    rest = {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t", "PUBLIC_URL": "https://abc.ngrok.app"}
    assert "/twilio/amd" in [path for path, _ in routes(load_settings({"DEEPGRAM_API_KEY": "k", **rest}))]


def test_the_call_control_line_names_only_the_missing_twilio_settings() -> None:
    from main import call_control_status

    # (A SID without the token stops startup: the REST API needs both.)
    token = {"TWILIO_AUTH_TOKEN": "t", "PUBLIC_URL": "https://abc.ngrok.app"}
    off = "call transfer, the fallback line and outbound calls are off: set {} to use Twilio's REST API"
    assert call_control_status(load_settings({"DEEPGRAM_API_KEY": "k", **token})) == [off.format("TWILIO_ACCOUNT_SID")]
    assert call_control_status(load_settings({"DEEPGRAM_API_KEY": "k"})) == [
        off.format("TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
    ]


def parenthesis_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        deepest = max(deepest, depth)
    return deepest


@pytest.mark.parametrize("env", [
    {},
    {"PHONE_PAGE": "true"},
    {"PHONE_PAGE": "true", "HOST": "0.0.0.0", "METRICS_PORT": "9100"},
    {"TWILIO_ACCOUNT_SID": "AC" + "0" * 32, "TWILIO_AUTH_TOKEN": "t", "PUBLIC_URL": "https://abc.ngrok.app", "PHONE_PAGE": "true"},
], ids=["plain", "phone", "phone-anywhere", "twilio"])
def test_the_startup_banner_has_no_parentheses_inside_parentheses(
    env: dict[str, str], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each route's description sits in parentheses in the banner, so none may hold its own."""
    from main import announce

    settings = load_settings({"DEEPGRAM_API_KEY": "k", **env})
    with caplog.at_level(logging.INFO):
        announce(settings, 2, 5000)
    said = [record.getMessage() for record in caplog.records] + capsys.readouterr().out.splitlines()
    serving = next(line for line in said if line.startswith("serving on "))
    assert [line for line in said if parenthesis_depth(line) > 1] == []
    if settings.phone_page:
        assert "/phone (GET: the browser phone, with the token main.py printed)" in serving


def start_main(tmp_path: Path, env_text: str, *flags: str) -> tuple[str, str, int]:
    """Run main.py (with ``flags``) until it serves; returns (stdout, log, port) after SIGTERM ends it."""
    env_file = tmp_path / "first-run.env"
    env_file.write_text(env_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DEEPGRAM_", "TWILIO_", "PUBLIC_URL", "PHONE_PAGE", "HOST", "PORT"))}
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--port", str(port), "--env-file", str(env_file), *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )
    try:
        assert process.stderr is not None
        log = []
        for line in process.stderr:
            log.append(line)
            if "serving on" in line:
                break
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            index = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/plain")
    finally:
        process.terminate()
        # Read on through the same reader: communicate() would read the pipe underneath it and
        # lose the lines it had already buffered past "serving on".
        assert process.stderr is not None and process.stdout is not None
        rest = process.stderr.read()
        stdout = process.stdout.read()
        process.wait(timeout=10)
    return stdout, "".join(log) + rest + "\n---index---\n" + index, port


def test_browser_only_startup_says_nothing_about_twilio(tmp_path: Path) -> None:
    stdout, log, port = start_main(tmp_path, "DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nPHONE_PAGE_TOKEN=tok123\nRECORD_CALLS=false\nHOST=127.0.0.1\n")
    log, index = log.split("\n---index---\n")
    assert stdout.strip() == f"Browser phone: http://127.0.0.1:{port}/phone?token=tok123"
    assert "TwiML" not in log + stdout and "TWILIO" not in log and "PUBLIC_URL" not in log, log
    assert "WARNING" not in log, log
    serving = next(line for line in log.splitlines() if "serving on" in line)
    for path in ("/twilio (", "/phone (", "/health (", "/ ("):
        assert path in serving, serving
    assert "/phone" in index and "tok123" not in index


def test_browser_only_on_every_address_warns_that_twilio_is_open(tmp_path: Path) -> None:
    _, log, port = start_main(tmp_path, "DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nRECORD_CALLS=false\nHOST=0.0.0.0\n")
    assert f"anyone who can reach port {port} can talk to the agent" in log
    assert "TwiML" not in log and "TWILIO" not in log


def test_phone_startup_lists_the_routes_and_says_what_unsigned_twilio_exposes(tmp_path: Path) -> None:
    stdout, log, _ = start_main(tmp_path, "DEEPGRAM_API_KEY=k\nRECORD_CALLS=false\nPUBLIC_URL=https://abc.ngrok.app\n")
    log, index = log.split("\n---index---\n")
    assert '<Response><Connect><Stream url="wss://abc.ngrok.app/twilio"/></Connect></Response>' in stdout
    serving = next(line for line in log.splitlines() if "serving on" in line)
    assert serving.endswith(
        ": /twilio (WebSocket: Twilio Media Streams), /twiml (GET or POST: TwiML for a number's voice webhook), "
        "/health (GET: health check), /metrics (GET: Prometheus metrics), / (GET: this list)"
    )
    assert "anyone who finds this address can open agent sessions on your Deepgram account" in log
    assert "/twilio" in index and "/health" in index and "/phone" not in index


def test_relative_folders_are_taken_from_the_project_folder_wherever_the_bridge_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CALLS_DIR and STATE_DIR as PHARMACY_DB: a relative path is the project's, not the current
    directory's (started from /, "calls" must not become /calls)."""
    from bridge.settings import PROJECT_DIR

    monkeypatch.chdir(tmp_path)
    settings = load_settings({"DEEPGRAM_API_KEY": "k", "CALLS_DIR": "records/here", "STATE_DIR": "shared"})
    assert settings.calls_dir == PROJECT_DIR / "records" / "here"
    assert settings.state_dir == PROJECT_DIR / "shared"
    assert load_settings({"DEEPGRAM_API_KEY": "k", "CALLS_DIR": str(tmp_path / "abs")}).calls_dir == tmp_path / "abs"
