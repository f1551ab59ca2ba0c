"""Per-call context, several agents, /twiml and live reload (docs/agents.md).

Template and catalog units first; then calls through real sockets with the fake agent, which
records the Settings it received; then /twiml signed by Twilio's own ``RequestValidator``; then
SIGHUP on the real main.py, alone and with --workers.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator

import pharmacy_functions
from bridge.binding import binding_key, binding_mac
from bridge.agents import MAX_VALUE_CHARS, AgentCatalog, check_functions, compile_template, load_catalog
from bridge.config import load_agent_config
from bridge.caller_lines import CallerLines
from bridge.settings import ConfigError
from bridge.server import BridgeServer
from conftest import ROOT, bridge_settings, empty_env, free_port, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually

BASE = json.loads((ROOT / "config.json").read_text())
HOST = "bridge.example.ngrok.app"
PUBLIC = f"https://{HOST}"
TWIML_URL = f"{PUBLIC}/twiml"
TOKEN = "test-auth-token-not-secret"


def agent_json(prompt: str, greeting: str | None = None, **agent: Any) -> str:
    """config.json with another prompt (and greeting, and other ``agent`` keys)."""
    settings = copy.deepcopy(BASE)
    settings["agent"]["think"]["prompt"] = prompt
    if greeting is not None:
        settings["agent"]["greeting"] = greeting
    settings["agent"].update(agent)
    return json.dumps(settings)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def template_of(prompt: str, greeting: str | None = None, **agent: Any) -> Any:
    return compile_template(json.loads(agent_json(prompt, greeting, **agent)), "config.json")


def prompt_of(settings: dict[str, Any]) -> str:
    return str(settings["agent"]["think"]["prompt"])


TEMPLATE_FOR_PROPERTY = template_of("{y} {{To|nobody}}", "Hi {{name|there}}, from {{From}}.")


# ------------------------------------------------------------------------------ templates


def test_placeholders_take_the_parameter_the_default_or_nothing() -> None:
    template = template_of("Caller {{From|unknown}} dialled {{To}}.", "Hello {{name|there}}, {{name}}!")
    assert template.placeholders == ("From", "To", "name")
    settings, text = template.render({"From": "+15551230000", "name": "Ana"})
    assert prompt_of(settings) == "Caller +15551230000 dialled ."
    assert settings["agent"]["greeting"] == "Hello Ana, Ana!"
    assert json.loads(text) == settings
    settings, text = template.render({})
    assert prompt_of(settings) == "Caller unknown dialled ." and settings["agent"]["greeting"] == "Hello there, !"
    assert json.loads(text) == settings


@pytest.mark.parametrize(
    "value",
    [
        '"}, "x": {{y}}',  # JSON and a placeholder of its own: both stay text
        "back\\slash \"quotes\" \n newline \t tab \x00 nul",
        "Zoë 山田 👋 \u2028\u2029",
        "{{name}}",
        "",
    ],
)
def test_values_are_inserted_as_text_never_as_json_or_placeholders(value: str) -> None:
    template = template_of("Hi {{From}} ({{name|n}}).")
    settings, text = template.render({"From": value, "y": "EXPANDED"})
    assert prompt_of(settings) == f"Hi {value} (n)."
    assert json.loads(text) == settings  # the message is valid JSON holding exactly that text
    assert "EXPANDED" not in text


@given(st.dictionaries(st.sampled_from(["From", "To", "name", "y"]), st.text(max_size=600)))
@settings(max_examples=200, deadline=None)
def test_any_values_render_to_the_json_of_the_same_settings(parameters: dict[str, str]) -> None:
    template = TEMPLATE_FOR_PROPERTY
    settings_dict, text = template.render(parameters)
    assert json.loads(text) == settings_dict
    cut = {name: value[:MAX_VALUE_CHARS] for name, value in parameters.items()}
    assert settings_dict["agent"]["greeting"] == f"Hi {cut.get('name', 'there')}, from {cut.get('From', '')}."
    assert prompt_of(settings_dict) == "{y} " + cut.get("To", "nobody")


def test_values_are_cut_to_a_bound() -> None:
    settings, _ = template_of("{{From}}").render({"From": "9" * 10_000})
    assert prompt_of(settings) == "9" * MAX_VALUE_CHARS


def test_an_agent_without_placeholders_hands_every_call_the_same_encoded_settings() -> None:
    config = load_agent_config(ROOT / "config.json", {})
    catalog = AgentCatalog.single(config)
    first, second = catalog.for_call({"From": "+1555"}), catalog.for_call({})
    assert first.settings is config.settings and second.settings_json is first.settings_json
    assert first.settings_json == json.dumps(config.settings)
    assert first.name == "default" and catalog.describe() == ["agent default (config.json) uses no placeholders"]


def test_rendering_copies_only_the_path_to_a_placeholder_and_never_changes_the_agent() -> None:
    messages = [{"type": "History", "role": "assistant", "content": "Hello {{From|friend}}."}]
    template = template_of("Plain prompt.", context={"messages": messages})
    original = copy.deepcopy(template.settings)
    settings, text = template.render({"From": "+15551230000"})
    assert settings["agent"]["context"]["messages"][0]["content"] == "Hello +15551230000."
    assert json.loads(text) == settings
    assert template.settings == original  # the shared Settings keep their placeholders
    assert settings["audio"] is template.settings["audio"]  # untouched branches are shared, not copied
    assert settings["agent"]["think"] is template.settings["agent"]["think"]


@pytest.mark.parametrize("bad", ["{{ From }}", "{{From", "{{Fr-om}}", "{{a|b|c}}", "{{a|{x}}}", "x {{}} y"])
def test_a_malformed_placeholder_stops_startup_in_one_sentence(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        template_of(f"Hello {bad}.")
    message = str(caught.value)
    assert message.startswith('config.json: "agent.think.prompt" has a malformed placeholder')
    assert "\n" not in message and message.endswith(".")


def test_a_value_without_double_braces_is_left_alone() -> None:
    template = template_of("JSON like {\"a\": 1} and {single} braces stay.")
    assert not template.strings and template.placeholders == ()


# -------------------------------------------------------------------------------- catalog


def two_agents(directory: Path, numbers: dict[str, str] | None = None) -> Path:
    """config.json (English) and agents/spanish.json; returns config.json's path."""
    config = write(directory / "config.json", agent_json("English prompt for {{From|an unknown caller}}."))
    write(directory / "agents" / "spanish.json", agent_json("Spanish prompt for {{From|alguien}}.", "¡Hola!"))
    if numbers is not None:
        write(directory / "agents" / "numbers.json", json.dumps(numbers))
    return config


def test_the_agent_parameter_wins_then_the_called_number_then_the_default(tmp_path: Path) -> None:
    catalog = load_catalog(two_agents(tmp_path, {"+15550009999": "spanish", "+15550008888": "default"}), {})
    assert sorted(catalog.named) == ["spanish"]
    pick = catalog.for_call
    assert pick({"agent": "spanish"}).name == "spanish"
    assert pick({"agent": "default", "To": "+15550009999"}).name == "default"
    assert pick({"To": "+15550009999"}).name == "spanish"
    assert pick({"To": "+15550008888"}).name == "default"
    assert pick({"To": "+15550007777"}).name == "default"
    unknown = pick({"agent": "klingon", "To": "+15550009999"})
    assert (unknown.name, unknown.unknown) == ("default", "klingon")
    spanish = pick({"agent": "spanish", "From": "+15551230000"})
    assert prompt_of(spanish.settings) == "Spanish prompt for +15551230000." and spanish.settings["agent"]["greeting"] == "¡Hola!"
    assert catalog.describe() == [
        "agent default (config.json) uses placeholders From",
        "agent spanish (agents/spanish.json) uses placeholders From",
        "called numbers pick agents: +15550008888 -> default, +15550009999 -> spanish",
    ]


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("broken.json", "{", "agents/broken.json is not valid JSON: Expecting property name"),
        ("default.json", agent_json("x"), "agents/default.json: the name 'default' is config.json's"),
        ("two words.json", agent_json("x"), "agents/two words.json: an agent's file name must be"),
        ("numbers.json", '{"555": "default"}', "agents/numbers.json: '555' is not a phone number in E.164 form"),
        ("numbers.json", '{"+15550009999": "french"}', "agents/numbers.json: +15550009999 maps to 'french', which is no agent"),
        ("numbers.json", '["+15550009999"]', "agents/numbers.json must be a JSON object"),
        ("typo.json", agent_json("{{From"), "agents/typo.json: \"agent.think.prompt\" has a malformed placeholder"),
        ("wrong.json", json.dumps({**BASE, "type": "Nope"}), "agents/wrong.json: \"type\" must be \"Settings\""),
    ],
)
def test_a_bad_agent_file_is_named_in_one_sentence(tmp_path: Path, name: str, text: str, expected: str) -> None:
    config = two_agents(tmp_path)
    write(tmp_path / "agents" / name, text)
    with pytest.raises(ConfigError) as caught:
        load_catalog(config, {})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_every_agents_functions_are_checked_against_the_function_map(tmp_path: Path) -> None:
    config = two_agents(tmp_path)
    settings = bridge_settings(tmp_path)
    assert check_functions(load_catalog(config, {}), pharmacy_functions.function_map, settings) == []
    extra = json.loads(agent_json("x"))
    extra["agent"]["think"]["functions"].append({"name": "refill", "description": "Refill.", "parameters": {"type": "object", "properties": {}}})
    write(tmp_path / "agents" / "refills.json", json.dumps(extra))
    with pytest.raises(ConfigError, match=r"^agents/refills.json declares function 'refill' but"):
        check_functions(load_catalog(config, {}), pharmacy_functions.function_map, settings)
    transfer = json.loads(agent_json("x"))
    transfer["agent"]["think"]["functions"].append({"name": "transfer_call", "description": "Transfer."})
    write(tmp_path / "agents" / "refills.json", json.dumps(transfer))
    with pytest.raises(ConfigError, match=r"^agents/refills.json declares transfer_call, but transfer needs"):
        check_functions(load_catalog(config, {}), pharmacy_functions.function_map, settings)


# ------------------------------------------------------------------ calls through sockets


@asynccontextmanager
async def bridge(tmp_path: Path, agent: FakeAgent, config: Path, **overrides: Any) -> AsyncIterator[BridgeServer]:
    """The real server with every agent of ``config``'s folder; ``server.reload_agents`` rereads them."""
    settings = bridge_settings(tmp_path, deepgram_agent_url=agent.url, **overrides)
    server = BridgeServer(
        settings, load_catalog(config, {}), pharmacy_functions.function_map, load_agents=lambda: load_catalog(config, {})
    )
    async with server:
        yield server


async def call(server: BridgeServer, agent: FakeAgent, parameters: dict[str, str]) -> FakeAgentSession:
    return await call_at(twilio_url(server), agent, parameters)


async def call_at(url: str, agent: FakeAgent, parameters: dict[str, str]) -> FakeAgentSession:
    """One call that lasts until its agent has the Settings; returns the agent's session."""
    before = len(agent.sessions)
    async with FakeTwilioCaller(url) as caller:
        await caller.start(parameters)
        session = await agent.session(before)
        await eventually(lambda: session.settings is not None, what="the agent's Settings")
        await caller.stop()
    return session


async def test_the_agent_greets_the_caller_by_the_number_they_called_from(tmp_path: Path) -> None:
    config = write(
        tmp_path / "config.json",
        agent_json("The caller's number is {{From|unknown}}; they called {{To}}.", "Hello, caller from {{From}}!"),
    )
    async with FakeAgent() as agent, bridge(tmp_path, agent, config) as server:
        session = await call(server, agent, {"From": "+15551230000", "To": "+15550009999"})
        nobody = await call(server, agent, {})
    assert session.settings is not None and nobody.settings is not None
    assert prompt_of(session.settings) == "The caller's number is +15551230000; they called +15550009999."
    assert session.settings["agent"]["greeting"] == "Hello, caller from +15551230000!"
    assert json.loads(session.settings_raw or "") == session.settings
    assert prompt_of(nobody.settings) == "The caller's number is unknown; they called ."
    starts = [line for line in read_record_lines(tmp_path / "calls") if line["event"] == "start"]
    assert [start["agent"] for start in starts] == ["default", "default"]


def read_record_lines(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted(directory.glob("*.jsonl")) for line in path.read_text().splitlines()]


async def test_a_resumed_agent_session_keeps_the_callers_values(tmp_path: Path) -> None:
    """After a drop, the Settings with history are built from this call's rendered Settings."""
    config = write(tmp_path / "config.json", agent_json("Caller {{From}}.", "Hi {{From}}."))
    async with FakeAgent() as agent, bridge(tmp_path, agent, config) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start({"From": "+15551230000"})
            first = await agent.session(0)
            await eventually(lambda: first.settings is not None, what="the first Settings")
            await first.send_json({"type": "ConversationText", "role": "assistant", "content": "Hi +15551230000."})
            first.drop()
            second = await agent.session(1)
            await eventually(lambda: second.settings is not None, what="the resumed Settings")
    assert second.settings is not None
    assert prompt_of(second.settings) == "Caller +15551230000."
    assert "greeting" not in second.settings["agent"]  # resumed mid-conversation


async def test_two_agents_by_parameter_by_number_and_an_unknown_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = two_agents(tmp_path, {"+15550009999": "spanish"})
    async with FakeAgent() as agent, bridge(tmp_path, agent, config) as server:
        by_name = await call(server, agent, {"agent": "spanish", "From": "+15551230000"})
        by_number = await call(server, agent, {"To": "+15550009999"})
        with caplog.at_level(logging.INFO, logger="bridge"):
            unknown = await call(server, agent, {"agent": "klin\ngon", "From": "+15551230001"})
    assert by_name.settings and by_number.settings and unknown.settings
    assert prompt_of(by_name.settings) == "Spanish prompt for +15551230000." and by_name.settings["agent"]["greeting"] == "¡Hola!"
    assert prompt_of(by_number.settings) == "Spanish prompt for alguien."
    assert prompt_of(unknown.settings) == "English prompt for +15551230001."
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "no agent is named" in r.getMessage()]
    assert len(warnings) == 1 and "klin\\ngon" in warnings[0] and "\n" not in warnings[0]
    assert any(r.getMessage().endswith("agent default") for r in caplog.records)
    starts = [line for line in read_record_lines(tmp_path / "calls") if line["event"] == "start"]
    assert sorted(start["agent"] for start in starts) == ["default", "spanish", "spanish"]


async def test_a_reload_changes_new_calls_only_and_an_invalid_file_keeps_the_old_agents(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = write(tmp_path / "config.json", agent_json("Old prompt."))
    async with FakeAgent() as agent, bridge(tmp_path, agent, config) as server:
        async with FakeTwilioCaller(twilio_url(server)) as admitted:  # admitted before the reload
            await eventually(lambda: server.calls, what="the call to be admitted")
            write(config, agent_json("New prompt for {{From}}."))
            with caplog.at_level(logging.INFO, logger="bridge"):
                assert await server.reload_agents()
            await admitted.start({"From": "+15551230000"})
            live = await agent.session(0)
            await eventually(lambda: live.settings is not None)
        fresh = await call(server, agent, {"From": "+15551230000"})
        write(config, "{ not json")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bridge"):
            assert not await server.reload_agents()
        kept = await call(server, agent, {"From": "+15551230002"})
    assert live.settings and fresh.settings and kept.settings
    assert prompt_of(live.settings) == "Old prompt."
    assert prompt_of(fresh.settings) == "New prompt for +15551230000."
    assert prompt_of(kept.settings) == "New prompt for +15551230002."
    [refused] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert refused.getMessage().startswith("reload refused, the agents stay as they were: ")
    assert "config.json is not valid JSON" in refused.getMessage()


# ---------------------------------------------------------------------------------- /twiml


def fetch(port: int, public_url: str, *, method: str = "GET", params: dict[str, str] | None = None,
          signature: str | None = None) -> tuple[int, str, str]:
    """A request to ``public_url`` as Twilio would send it, on loopback: (status, type, body)."""
    parts = urllib.parse.urlsplit(public_url)
    url = f"http://127.0.0.1:{port}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    headers = {"X-Twilio-Signature": signature} if signature is not None else {}
    data = None
    if method == "POST":
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        data = urllib.parse.urlencode(params or {}).encode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


WEBHOOK = {
    "CallSid": "CA" + "a" * 32, "AccountSid": "AC" + "0" * 32, "From": "+15551230000", "To": "+15550009999",
    "Direction": "inbound", "CallStatus": "ringing", "CallerName": "Mallory",
}
# Signed by Twilio, so the stream is bound to the call: the MAC the bridge writes for its CallSid.
BINDING = binding_mac(binding_key(None, TOKEN) or b"", WEBHOOK["CallSid"], WEBHOOK["AccountSid"])
EXPECTED_TWIML = (
    '<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://bridge.example.ngrok.app/twilio">'
    '<Parameter name="From" value="+15551230000"/><Parameter name="To" value="+15550009999"/>'
    f'<Parameter name="CallSid" value="CA{"a" * 32}"/><Parameter name="Direction" value="inbound"/>'
    f'<Parameter name="bridge_binding" value="{BINDING}"/></Stream></Connect></Response>'
)


async def test_twiml_answers_a_voice_webhook_post_signed_by_twilio(tmp_path: Path) -> None:
    async with FakeAgent() as agent, bridge(tmp_path, agent, ROOT / "config.json", public_url=PUBLIC, twilio_auth_token=TOKEN) as server:
        good = RequestValidator(TOKEN).compute_signature(TWIML_URL, WEBHOOK)
        answer = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="POST", params=WEBHOOK, signature=good)
        assert answer == (200, "text/xml", EXPECTED_TWIML)
        # The query string is signed too; ?agent= picks the agent.
        url = f"{TWIML_URL}?agent=spanish"
        signed = RequestValidator(TOKEN).compute_signature(url, WEBHOOK)
        status, _, body = await asyncio.to_thread(fetch, server.port, url, method="POST", params=WEBHOOK, signature=signed)
        assert status == 200 and body.endswith(
            f'<Parameter name="agent" value="spanish"/><Parameter name="bridge_binding" value="{BINDING}"/></Stream></Connect></Response>'
        )
        for signature in (None, "", good[:-2] + "AA", RequestValidator("other").compute_signature(TWIML_URL, WEBHOOK)):
            status, _, _ = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="POST", params=WEBHOOK, signature=signature)
            assert status == 403
        tampered = {**WEBHOOK, "From": "+15550000000"}
        status, _, _ = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="POST", params=tampered, signature=good)
        assert status == 403
        # A GET webhook: the parameters are in the signed query string.
        get_url = f"{TWIML_URL}?{urllib.parse.urlencode(WEBHOOK)}"
        signed = RequestValidator(TOKEN).compute_signature(get_url, {})
        assert await asyncio.to_thread(fetch, server.port, get_url, signature=signed) == (200, "text/xml", EXPECTED_TWIML)
        status, _, _ = await asyncio.to_thread(fetch, server.port, get_url, signature=good)
        assert status == 403


async def test_twiml_escapes_values_bounds_them_and_skips_absent_ones(tmp_path: Path) -> None:
    async with FakeAgent() as agent, bridge(tmp_path, agent, ROOT / "config.json", public_url=PUBLIC) as server:
        params = {"From": '"><Hangup/>&\'', "To": "9" * 5000, "CallSid": ""}
        status, kind, body = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="POST", params=params)
        assert (status, kind) == (200, "text/xml")
        assert '<Parameter name="From" value="&quot;&gt;&lt;Hangup/&gt;&amp;\'"/>' in body
        assert f'<Parameter name="To" value="{"9" * 200}"/></Stream>' in body
        assert "CallSid" not in body and "Direction" not in body and "<Hangup/>" not in body
        import xml.etree.ElementTree as ElementTree

        stream = ElementTree.fromstring(body.split("?>", 1)[1]).find("Connect/Stream")
        assert stream is not None and stream.find("Parameter").get("value") == params["From"]  # type: ignore[union-attr]
        status, _, _ = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="PUT")
        assert status == 405


async def test_twiml_without_public_url_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with FakeAgent() as agent, bridge(tmp_path, agent, ROOT / "config.json") as server:
        with caplog.at_level(logging.INFO, logger="bridge"):
            status, _, body = await asyncio.to_thread(fetch, server.port, TWIML_URL, method="POST", params=WEBHOOK)
    assert status == 503 and body == "PUBLIC_URL is not set, so the bridge cannot name its own host in TwiML.\n"
    assert any("set PUBLIC_URL" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ SIGHUP on the real main.py


class MainProcess:
    """``main.py --config DIR/config.json`` against the fake agent, its log in a file."""

    def __init__(self, tmp_path: Path, agent: FakeAgent, config: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = tmp_path / "bridge.log"
        self.command = [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(self.port),
                        "--config", str(config), "--env-file", str(empty_env(tmp_path)), *extra]
        self.env = {**os.environ, "DEEPGRAM_API_KEY": "test-key-not-secret", "DEEPGRAM_AGENT_URL": agent.url,
                    "RECORD_CALLS": "false", "PHARMACY_DB": str(tmp_path / "pharmacy.db")}
        self.process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> MainProcess:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=log)
        await eventually(lambda: self.process.poll() is not None or self.up(), 20, "the bridge to start")  # type: ignore[union-attr]
        assert self.process.poll() is None, self.log()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                await asyncio.to_thread(self.process.wait, 15)
            except subprocess.TimeoutExpired:  # a wedged bridge must not outlive the test
                self.process.kill()
                self.process.wait()
                if exc_info[0] is None:
                    raise AssertionError("the bridge ignored SIGTERM for 15 s") from None
        if exc_info[0] is None:  # whatever the test checked, the bridge must not have failed unseen
            assert "Traceback" not in self.log(), self.log()

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, text: str) -> int:
        return self.log().count(text)

    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/twilio"


async def process_call(bridge: MainProcess, agent: FakeAgent, parameters: dict[str, str]) -> FakeAgentSession:
    return await call_at(bridge.url(), agent, parameters)


async def test_sighup_reloads_the_agents_of_the_real_process(tmp_path: Path) -> None:
    config = two_agents(tmp_path)
    async with FakeAgent() as agent, MainProcess(tmp_path, agent, config) as bridge:
        assert bridge.count("agent default (config.json) uses placeholders From") == 1
        assert bridge.count("agent spanish (agents/spanish.json) uses placeholders From") == 1
        before = await process_call(bridge, agent, {"From": "+15551230000"})
        async with FakeTwilioCaller(bridge.url()) as live:  # admitted before the SIGHUP, started after
            write(config, agent_json("Reloaded prompt for {{From}} calling {{To|us}}."))
            write(tmp_path / "agents" / "numbers.json", json.dumps({"+15550009999": "spanish"}))
            assert bridge.process is not None
            bridge.process.send_signal(signal.SIGHUP)
            await eventually(lambda: bridge.count("reloaded the agents for new calls") == 1, 10, "the reload")
            await live.start({"From": "+15551230001"})
            live_session = await agent.session(1)
            await eventually(lambda: live_session.settings is not None)
        after = await process_call(bridge, agent, {"From": "+15551230002"})
        by_number = await process_call(bridge, agent, {"To": "+15550009999"})
        # An invalid file: one sentence, and the agents stay as they were.
        write(tmp_path / "agents" / "spanish.json", agent_json("{{oops"))
        bridge.process.send_signal(signal.SIGHUP)
        await eventually(lambda: bridge.count("reload refused") == 1, 10, "the refused reload")
        kept = await process_call(bridge, agent, {"From": "+15551230003", "agent": "spanish"})
        assert bridge.process.poll() is None
        log = bridge.log()
    assert before.settings and live_session.settings and after.settings and by_number.settings and kept.settings
    assert prompt_of(before.settings) == "English prompt for +15551230000."
    assert prompt_of(live_session.settings) == "English prompt for +15551230001."
    assert prompt_of(after.settings) == "Reloaded prompt for +15551230002 calling us."
    assert prompt_of(by_number.settings) == "Spanish prompt for alguien."
    assert prompt_of(kept.settings) == "Spanish prompt for +15551230003."
    [refused] = [line for line in log.splitlines() if "reload refused" in line]
    assert refused.endswith(
        "reload refused, the agents stay as they were: agents/spanish.json: \"agent.think.prompt\" has a malformed "
        "placeholder near '{{oops'; write {{name}} or {{name|default text}} (name: letters, digits, underscores)."
    )


async def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    config = write(tmp_path / "config.json", agent_json("Old prompt."))
    async with FakeAgent() as agent, MainProcess(tmp_path, agent, config, "--workers", "2") as bridge:
        await eventually(lambda: bridge.count("worker (pid") == 2, 15, "both workers listening")
        write(config, agent_json("New prompt for {{From}}."))
        assert bridge.process is not None
        bridge.process.send_signal(signal.SIGHUP)
        await eventually(lambda: bridge.count("reloaded the agents for new calls") == 2, 15, "both workers to reload")
        sessions = [await process_call(bridge, agent, {"From": f"+1555123000{n}"}) for n in range(6)]
        assert bridge.process.poll() is None
    assert [prompt_of(s.settings or {}) for s in sessions] == [f"New prompt for +1555123000{n}." for n in range(6)]


def refused_lines(bridge: MainProcess) -> list[str]:
    return [line for line in bridge.log().splitlines() if "reload refused" in line]


def bytes_read(pid: int) -> int:
    """What the process has read so far through read() and the like (Linux's /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/PID/io")


def huge_file(path: Path, size: int = 150_000_000) -> Path:
    """A sparse file of ``size`` bytes: as big as a real one to the bridge, nothing on disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(size)
    return path


def deep_agent(levels: int) -> str:
    """An agent file that is valid but for ``levels`` nested lists in a function's free-form parameters.

    Json parses 500 levels, and the recursive walks after it would fail there: the depth check
    must catch it. 100,000 levels are too deep for the parser itself.
    """
    settings = copy.deepcopy(BASE)
    settings["agent"]["think"]["functions"][0]["parameters"]["properties"]["deep"] = "@"
    return json.dumps(settings).replace('"@"', "[" * levels + "]" * levels)


async def test_a_fifo_in_agents_is_refused_on_reload_while_calls_health_and_sigterm_carry_on(tmp_path: Path) -> None:
    """Reading a FIFO would wait for a writer, with the event loop stopped; it is refused instead."""
    config = two_agents(tmp_path)
    async with FakeAgent() as agent, MainProcess(tmp_path, agent, config) as bridge:
        assert bridge.process is not None
        async with FakeTwilioCaller(bridge.url()) as caller:
            await caller.start({"From": "+15551230000"})
            session = await agent.ready_session(0)
            os.mkfifo(tmp_path / "agents" / "pipe.json")
            bridge.process.send_signal(signal.SIGHUP)
            await eventually(lambda: refused_lines(bridge), 5, "the refused reload")
            assert await asyncio.to_thread(bridge.up)
            await session.send_json({"type": "FunctionCallRequest", "functions": [
                {"id": "f1", "name": "get_drug_info", "arguments": '{"drug_name": "ibuprofen"}', "client_side": True}]})
            [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), 5, "the function's answer")
            bridge.process.send_signal(signal.SIGTERM)
            await eventually(lambda: bridge.count("draining: waiting up to") == 1, 5, "the drain")
            await caller.stop()
            assert await asyncio.to_thread(bridge.process.wait, 10) == 0
        kept = await asyncio.to_thread(bridge.log)
    assert answer["id"] == "f1" and json.loads(answer["content"])["price"] == 8.99
    [refused] = [line for line in kept.splitlines() if "reload refused" in line]
    assert " ERROR " in refused and refused.endswith(
        "reload refused, the agents stay as they were: agents/pipe.json is a named pipe (FIFO), not a regular file; "
        "the bridge reads only regular files, so put the JSON file itself there."
    )
    assert "drained; exiting" in kept


async def test_reload_refuses_a_file_too_deep_or_too_big_without_reading_it_all(tmp_path: Path) -> None:
    config = two_agents(tmp_path)
    async with FakeAgent() as agent, MainProcess(tmp_path, agent, config) as bridge:
        assert bridge.process is not None
        deep = write(tmp_path / "agents" / "deep.json", deep_agent(500))
        bridge.process.send_signal(signal.SIGHUP)
        await eventually(lambda: len(refused_lines(bridge)) == 1, 5, "the first refused reload")
        deep.unlink()
        huge = huge_file(tmp_path / "agents" / "huge.json")
        before = bytes_read(bridge.process.pid)
        bridge.process.send_signal(signal.SIGHUP)
        await eventually(lambda: len(refused_lines(bridge)) == 2, 5, "the second refused reload")
        read = bytes_read(bridge.process.pid) - before
        huge.unlink()
        kept = await process_call(bridge, agent, {"agent": "spanish"})
        first, second = refused_lines(bridge)
    assert first.endswith(
        "reload refused, the agents stay as they were: agents/deep.json nests objects and lists more than 64 levels "
        "deep; a Settings message needs about 8, so check the file for runaway brackets."
    )
    assert second.endswith(
        "reload refused, the agents stay as they were: agents/huge.json is 150,000,000 bytes, over the limit of "
        "1,000,000 bytes for a config file; an agent's Settings are a few kilobytes, so check that this is the right file."
    )
    assert read < 1_000_000, f"the reload read {read} bytes"
    assert kept.settings and prompt_of(kept.settings) == "Spanish prompt for alguien."


STARTUP_REFUSALS = {
    "fifo": ("agents/pipe.json", lambda path: os.mkfifo(path), "agents/pipe.json is a named pipe (FIFO), not a regular file"),
    "huge": ("agents/huge.json", huge_file, "agents/huge.json is 150,000,000 bytes, over the limit of 1,000,000 bytes"),
    "deep config": ("config.json", lambda path: write(path, deep_agent(100_000)), "config.json nests objects and lists more than 64"),
    "deep agent": ("agents/deep.json", lambda path: write(path, deep_agent(500)), "agents/deep.json nests objects and lists more than 64"),
    "deep numbers": (
        "agents/numbers.json",
        lambda path: write(path, '{"+15550009999": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "agents/numbers.json nests objects and lists more than 64",
    ),
}


@pytest.mark.parametrize("case", sorted(STARTUP_REFUSALS))
def test_startup_refuses_a_fifo_a_huge_or_a_deep_file_in_one_sentence(tmp_path: Path, case: str) -> None:
    name, make, expected = STARTUP_REFUSALS[case]
    config = two_agents(tmp_path)
    make(tmp_path / name)
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "--env-file", str(empty_env(tmp_path))],
        env=env, capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


async def test_a_slow_reload_is_refused_at_its_deadline_and_sighups_meanwhile_make_one_more(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The files are read off the event loop; a stuck read holds no call up and starts no second thread."""
    config = write(tmp_path / "config.json", agent_json("Old prompt."))
    release = threading.Event()
    readers: list[str] = []  # the thread each read ran on

    def slow_load() -> AgentCatalog:
        readers.append(threading.current_thread().name)
        if len(readers) == 1:
            release.wait(10)  # as a read from a hung network file system would
        return load_catalog(config, {})

    async with FakeAgent() as agent:
        server = BridgeServer(
            bridge_settings(tmp_path, deepgram_agent_url=agent.url), load_catalog(config, {}), pharmacy_functions.function_map,
            load_agents=slow_load, reload_timeout_seconds=0.3,
        )
        async with server:
            with caplog.at_level(logging.INFO, logger="bridge"):
                server.request_reload()
                await eventually(lambda: readers, what="the first read")
                during = await call(server, agent, {})
                server.request_reload()  # two SIGHUPs while the read is stuck
                server.request_reload()
                await eventually(lambda: "took longer than" in caplog.text, 5, "the deadline")
                status, _, health = await asyncio.to_thread(fetch, server.port, "http://bridge/health")
                assert status == 200 and json.loads(health)["status"] == "ok"
                stuck = [t.name for t in threading.enumerate() if t.name == "agent-reload"]
                write(config, agent_json("New prompt."))
                release.set()
                await eventually(lambda: "reloaded the agents for new calls" in caplog.text, 5, "the one more reload")
                after = await call(server, agent, {})
    assert readers == ["agent-reload", "agent-reload"] and stuck == ["agent-reload"]
    assert during.settings and prompt_of(during.settings) == "Old prompt."
    assert after.settings and prompt_of(after.settings) == "New prompt."
    [error] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error == (
        "reload refused, the agents stay as they were: reading them took longer than 0.3 s (a hung network file system?); "
        "no other reload starts until that read ends"
    )


# ------------------------------------------------------------------- the call's state machine


def start_event(parameters: dict[str, str]) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": {
        "accountSid": "AC1", "streamSid": "MZ1", "callSid": "CA1", "tracks": ["inbound"],
        "customParameters": parameters, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


def settings_sent(call: Any, parameters: dict[str, str]) -> tuple[list[Any], dict[str, Any]]:
    """Start a pure ``Call`` with ``parameters``; the start's actions and the Settings it sends."""
    from bridge.call import SendToAgent

    call.connected(0.0)
    actions = list(call.caller_text(start_event(parameters), 0.0))
    call.agent_connected(0.1)
    [sent] = [a for a in call.agent_text('{"type": "Welcome", "request_id": "r"}', 0.2) if isinstance(a, SendToAgent)]
    return actions, json.loads(sent.data)


def test_the_call_picks_its_agent_at_start_and_records_it(tmp_path: Path) -> None:
    from bridge.call import Call, Log, Record

    catalog = load_catalog(two_agents(tmp_path), {})
    call = Call(bridge_settings(tmp_path), catalog)
    actions, sent = settings_sent(call, {"agent": "nobody\x1b[31m", "From": "+15551230000"})
    [start] = [a for a in actions if isinstance(a, Record) and a.event == "start"]
    assert start.fields["agent"] == "default"
    logs = [(a.level, a.message % a.args) for a in actions if isinstance(a, Log)]
    assert (logging.WARNING, "no agent is named nobody\\x1b[31m: the call gets the default agent") in logs
    assert (logging.INFO, "agent default") in logs
    assert prompt_of(sent) == "English prompt for +15551230000."


def test_a_voicemail_stream_leaves_its_message_with_the_agents_rendered_settings(tmp_path: Path) -> None:
    from bridge.call import Call

    # The bridge's default line (an agent's file may set its own: test_an_agents_own_lines_...).
    catalog = load_catalog(two_agents(tmp_path), {}, CallerLines(voicemail="Your refill is ready."))
    call = Call(bridge_settings(tmp_path), catalog)
    _, sent = settings_sent(call, {"agent": "spanish", "From": "+15551230000", "bridge_mode": "voicemail"})
    assert sent["agent"]["greeting"] == "Your refill is ready."
    assert prompt_of(sent) == "Spanish prompt for +15551230000."


def test_startup_refuses_an_invalid_agent_file_in_one_sentence(tmp_path: Path) -> None:
    config = two_agents(tmp_path, {"+15550009999": "french"})
    env = {**os.environ, "DEEPGRAM_API_KEY": "k", "RECORD_CALLS": "false"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--config", str(config), "--env-file", str(empty_env(tmp_path))],
        env=env, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: agents/numbers.json: +15550009999 maps to 'french', which is no agent (the agents are default, spanish).\n"
    )


# ------------------------------------------------------------------------- docs/agents.md


DOC = (ROOT / "docs" / "agents.md").read_text(encoding="utf-8")


def json_blocks() -> list[Any]:
    import re

    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", DOC, flags=re.S) if block.strip().startswith("{")]


def merged(base: Any, change: Any) -> Any:
    """``base`` with the keys of ``change`` put in, recursively (the docs show only changed keys)."""
    if not isinstance(base, dict) or not isinstance(change, dict):
        return change
    return {**base, **{key: merged(base.get(key), value) for key, value in change.items()}}


def test_the_documented_examples_are_valid_agents_that_do_what_the_docs_say(tmp_path: Path) -> None:
    from test_config import validate_settings

    greeting_example, numbers, spanish = [b for b in json_blocks() if "agent" in b or "+15550009999" in b][:3]
    greeting_example = merged(BASE, greeting_example)
    # Deepgram keeps a call's data for model improvement unless told not to: the example says so
    # itself, so a reader who copies only the keys shown doesn't lose it.
    assert spanish.get("mip_opt_out") is True and BASE.get("mip_opt_out") is True
    settings, text = compile_template(greeting_example, "config.json").render({"From": "+15551230000"})
    documented = "I see you're calling from +15551230000. How can I help?"
    assert settings["agent"]["greeting"].endswith(documented) and f'{documented}"' in DOC
    assert compile_template(greeting_example, "config.json").render({})[0]["agent"]["greeting"].endswith(
        "calling from a withheld number. How can I help?"
    )
    validate_settings(text)
    # The two-agent example, with the numbers file: startup's checks and Deepgram's schema pass.
    config = write(tmp_path / "config.json", json.dumps(BASE))
    write(tmp_path / "agents" / "spanish.json", json.dumps(merged(BASE, spanish)))
    write(tmp_path / "agents" / "numbers.json", json.dumps(numbers))  # the docs' numbers.json block
    documented_numbers = load_catalog(config, {})
    assert [documented_numbers.for_call({"To": n}).name for n in ("+15550008888", "+15550009999")] == ["default", "spanish"]
    # The two-agent example's layout, with the numbers file its comment shows.
    write(tmp_path / "agents" / "numbers.json", json.dumps({"+15550009999": "spanish"}))
    assert '# {"+15550009999": "spanish"}' in DOC
    catalog = load_catalog(config, {})
    assert check_functions(catalog, pharmacy_functions.function_map, bridge_settings(tmp_path)) == []
    choice = catalog.for_call({"To": "+15550009999", "From": "+15551230000"})
    assert choice.name == "spanish" and "El cliente llama desde +15551230000." in prompt_of(choice.settings)
    validate_settings(choice.settings_json)
    for line in catalog.describe():
        assert line in DOC
