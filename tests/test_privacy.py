"""Callers' words kept only as the operator chooses (STORE_TRANSCRIPTS), lines in the agent's own
words, Deepgram's retention opt-out, and the settings that trade safety away — through the real
main.py process on 127.0.0.1 against the fake agent and a fake webhook receiver.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bridge.config import parse_agent_config
from bridge.settings import ConfigError, load_settings
from conftest import ROOT
from fakes import FakeAgent, FakeTwilioCaller, eventually
from test_agents import MainProcess, bridge, two_agents, write
from test_config import start_main
from test_webhook import SECRET, FakeReceiver

CALLER = "+15551234567"
SAID = "My number is 415 555 0134 and my e-mail is ann.lee@example.com"
PRIVATE = ("415 555 0134", "0134", "ann.lee", "example.com", "Ann Lee", "5551234567")
# What the bridge writes of its own (request and webhook ids, times, durations, ports) can hold
# "0134" by chance.
BRIDGE_OWN = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}|\d+[.,:]\d+|:\d+")


def config_with_a_sensitive_name(directory: Path) -> Path:
    """config.json, with place_order's customer_name marked sensitive."""
    settings = json.loads((ROOT / "config.json").read_text())
    for function in settings["agent"]["think"]["functions"]:
        if function["name"] == "place_order":
            function["parameters"]["properties"]["customer_name"]["sensitive"] = True
    return write(directory / "config.json", json.dumps(settings))


@pytest.mark.parametrize("mode", ["full", "redacted", "none"])
async def test_each_store_transcripts_mode_keeps_what_it_says_in_the_record_the_webhook_and_the_log(
    tmp_path: Path, mode: str
) -> None:
    calls = tmp_path / "calls"
    async with FakeAgent() as agent, FakeReceiver() as receiver:
        process = MainProcess(tmp_path, agent, config_with_a_sensitive_name(tmp_path))
        process.env.update(
            RECORD_CALLS="true", CALLS_DIR=str(calls), STORE_TRANSCRIPTS=mode, LOG_LEVEL="INFO",
            CALL_WEBHOOK_URL=receiver.url, CALL_WEBHOOK_SECRET=SECRET,
        )
        async with process as bridge_process:
            async with FakeTwilioCaller(bridge_process.url()) as caller:
                await caller.start({"From": CALLER})
                session = await agent.ready_session()
                assert session.settings_raw is not None and '"sensitive"' not in session.settings_raw
                await session.send_json({"type": "ConversationText", "role": "user", "content": SAID})
                # A name said in free speech is what the redactor cannot catch (docs/privacy.md): the
                # test keeps the name to the function's argument, which is declared sensitive.
                await session.send_json({"type": "ConversationText", "role": "assistant", "content": "Thank you."})
                await session.send_json({"type": "FunctionCallRequest", "functions": [{
                    "id": "f1", "name": "place_order", "client_side": True,
                    "arguments": json.dumps({"customer_name": "Ann Lee", "drug_name": "Ibuprofen", "quantity": 2}),
                }]})
                [answer] = await eventually(lambda: session.of_type("FunctionCallResponse"), what="the order")
                assert json.loads(answer["content"])["customer_name"] == "Ann Lee"  # the agent hears it all
                await caller.stop()
            await eventually(lambda: receiver.requests, 10, "the webhook")
        log = bridge_process.log()
    [record_file] = calls.glob("*.jsonl")
    record = [json.loads(line) for line in record_file.read_text().splitlines()]
    webhook = json.loads(receiver.requests[0].body)
    stored = {"record": record_file.read_text(), "webhook": receiver.requests[0].body.decode(), "log": log}
    transcript = [line["content"] for line in record if line["event"] == "transcript"]
    [order] = [line for line in record if line["event"] == "function_call"]
    assert order["name"] == "place_order" and order["outcome"] == "ok"
    if mode == "full":
        assert transcript == [SAID, "Thank you."]
        assert order["result"]["customer_name"] == "Ann Lee" and record[-1]["custom_parameters"] == {"From": CALLER}
        for where in ("record", "webhook", "log"):
            assert "415 555 0134" in stored[where], where
        return
    for where, text in stored.items():
        for private in PRIVATE:
            assert private not in BRIDGE_OWN.sub("#", text), f"{mode}: {private!r} in the {where}"
    if mode == "redacted":
        assert transcript == ["My number is [redacted] and my e-mail is [redacted]", "Thank you."]
        assert json.loads(order["arguments"]) == {"customer_name": "[redacted]", "drug_name": "Ibuprofen", "quantity": "[redacted]"}
        assert order["result"]["customer_name"] == "[redacted]" and order["result"]["drug_name"] == "Ibuprofen"
        assert [turn["content"] for turn in webhook["transcript"]] == transcript
    else:
        assert transcript == [] and webhook["transcript"] == []
        assert (order["arguments"], order["result"], order["error"]) == (None, None, None)
        assert record[-1]["custom_parameters"] == {"From": "[redacted]"} and record[-1]["turns"] == 2
        assert "User: (" in log, "the log says a turn happened, not what it said"


def test_the_sensitive_marker_is_checked_and_never_sent() -> None:
    settings = json.loads((ROOT / "config.json").read_text())
    properties = settings["agent"]["think"]["functions"][1]["parameters"]["properties"]
    properties["customer_name"]["sensitive"] = True
    config = parse_agent_config(json.dumps(settings), Path("config.json"), {})
    assert config.sensitive_parameters == {settings["agent"]["think"]["functions"][1]["name"]: frozenset({"customer_name"})}
    assert '"sensitive"' not in json.dumps(config.settings)
    properties["customer_name"]["sensitive"] = "yes"
    with pytest.raises(ConfigError, match=r'"sensitive" of parameter .customer_name. .* must be true or false'):
        parse_agent_config(json.dumps(settings), Path("config.json"), {})


# ----------------------------------------------------------------- lines in the agent's own words


async def test_each_agent_says_its_own_lines(tmp_path: Path) -> None:
    """The Spanish agent re-prompts a silent caller in Spanish; the default agent in English."""
    config = two_agents(tmp_path)
    spanish = json.loads((tmp_path / "agents" / "spanish.json").read_text())
    spanish["bridge"] = {"lines": {"idle_reprompt": "¿Sigue ahí? Estoy aquí si necesita algo."}}
    write(tmp_path / "agents" / "spanish.json", json.dumps(spanish))
    async with FakeAgent() as agent, bridge(tmp_path, agent, config, idle_reprompt_seconds=0.2, idle_hangup_seconds=30) as server:
        heard = {}
        for name in ("spanish", "default"):
            async with FakeTwilioCaller(f"ws://127.0.0.1:{server.port}/twilio") as caller:
                before = len(agent.sessions)
                await caller.start({"agent": name})
                session = await agent.session(before)
                await eventually(lambda: session.of_type("InjectAgentMessage"), what=f"{name}'s re-prompt")
                heard[name] = session.of_type("InjectAgentMessage")[0]["message"]
                await caller.stop()
    assert heard == {"spanish": "¿Sigue ahí? Estoy aquí si necesita algo.", "default": "Are you still there? I'm here if you need anything."}


@pytest.mark.parametrize(
    "bridge_section, expected",
    [
        ({"line": {}}, '"bridge" has an unknown key \'line\' (did you mean "lines"?).'),
        ({"lines": {"idle_reprompts": "x"}}, '"bridge.lines" has an unknown key \'idle_reprompts\' (did you mean "idle_reprompt"?).'),
        ({"lines": {"voicemail": 7}}, '"bridge.lines.voicemail" must be a sentence (text), got 7.'),
        ({"lines": {"voicemail": "x" * 1001}}, '"bridge.lines.voicemail" must be at most 1000 characters, got 1001.'),
        ({"transfer_mode": "lukewarm"}, '"bridge.transfer_mode" must be "cold" or "warm", got \'lukewarm\'.'),
        ({"twilio_say": "es-ES"}, '"bridge.twilio_say" must be a JSON object.'),
        ({"twilio_say": {"lang": "es-ES"}}, '"bridge.twilio_say" has an unknown key \'lang\' (did you mean "language"?).'),
        (
            {"twilio_say": {"language": "Spanish"}},
            '"bridge.twilio_say.language" must be one of Twilio\'s <Say> language names, like \'es-ES\', got \'Spanish\'.',
        ),
        (
            {"twilio_say": {"voice": '"/><Hangup/>'}},
            '"bridge.twilio_say.voice" must be one of Twilio\'s <Say> voice names, like \'Polly.Lucia-Neural\', '
            'got \'"/><Hangup/>\'.',
        ),
    ],
)
def test_the_bridge_section_of_an_agent_file_is_checked(bridge_section: dict[str, Any], expected: str) -> None:
    settings = json.loads((ROOT / "config.json").read_text())
    settings["bridge"] = bridge_section
    with pytest.raises(ConfigError) as caught:
        parse_agent_config(json.dumps(settings), Path("agents/x.json"), {})
    assert str(caught.value) == f"agents/x.json: {expected}"


# ---------------------------------------------------------------------- what startup says


def test_startup_warns_once_per_agent_that_lets_deepgram_keep_its_calls(tmp_path: Path) -> None:
    settings = json.loads((ROOT / "config.json").read_text())
    del settings["mip_opt_out"]
    write(tmp_path / "project" / "config.json", json.dumps(settings))
    write(tmp_path / "project" / "agents" / "kept.json", json.dumps({**settings, "mip_opt_out": False}))
    write(tmp_path / "project" / "agents" / "private.json", json.dumps({**settings, "mip_opt_out": True}))
    _, log, _ = start_main(
        tmp_path, "DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nRECORD_CALLS=false\n", "--config", str(tmp_path / "project" / "config.json")
    )
    warnings = [line for line in log.splitlines() if "mip_opt_out" in line]
    assert len(warnings) == 2, warnings
    assert any("config.json leaves \"mip_opt_out\" unset" in line for line in warnings)
    assert any("agents/kept.json leaves \"mip_opt_out\" false" in line for line in warnings)
    assert all("Model Improvement Program" in line and "WARNING" in line for line in warnings)
    _, shipped, _ = start_main(tmp_path, "DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nRECORD_CALLS=false\n")
    assert "mip_opt_out" not in shipped, "the shipped config.json opts out"


def test_old_variable_names_still_work_with_one_warning_each(tmp_path: Path) -> None:
    _, log, _ = start_main(
        tmp_path,
        "DEEPGRAM_API_KEY=k\nPHONE_PAGE=true\nRECORD_CALLS=false\nINBOUND_BUFFER_BYTES=800\nDRAIN_SECONDS=5\n"
        "IDLE_REPROMPT_MESSAGE=Still there?\n",
    )
    for old, new in (("INBOUND_BUFFER_BYTES", "INBOUND_CHUNK_BYTES"), ("DRAIN_SECONDS", "DRAIN_TIMEOUT_SECONDS")):
        assert log.count(f"{old} is now called {new}") == 1, log
    assert log.count("IDLE_REPROMPT_MESSAGE is deprecated") == 1
    # And the old variable still does what it did: the default agent says it.
    old = load_settings({"DEEPGRAM_API_KEY": "k", "IDLE_REPROMPT_MESSAGE": "Still there?", "INBOUND_BUFFER_BYTES": "800"})
    assert old.caller_lines.idle_reprompt == "Still there?" and old.inbound_chunk_bytes == 800


def test_allowing_unbound_call_control_is_said_at_startup(tmp_path: Path) -> None:
    account = "AC" + "1" * 32
    _, log, _ = start_main(
        tmp_path,
        f"DEEPGRAM_API_KEY=k\nRECORD_CALLS=false\nPUBLIC_URL=https://abc.ngrok.app\nTWILIO_AUTH_TOKEN=t0ken-t0ken\n"
        f"TWILIO_ACCOUNT_SID={account}\nALLOW_UNBOUND_CALL_CONTROL=true\n",
    )
    [line] = [line for line in log.splitlines() if "ALLOW_UNBOUND_CALL_CONTROL" in line]
    assert "WARNING" in line and "replayed signature" in line
