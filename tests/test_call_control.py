"""Call control through real sockets: transfer, the fallback line, outbound calls, answering machines.

The bridge talks to a fake Twilio REST API on loopback (tests/fake_twilio_rest.py), which records
every request; Twilio's own ``RequestValidator`` signs the callbacks, as Twilio would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from bridge import twilio
from bridge.server import BridgeServer
from conftest import ROOT, BridgeFactory, empty_env, read_record, twilio_url
from fake_twilio_rest import FakeTwilioRest, twilio_error
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually

HOST = "bridge.example.ngrok.app"
PUBLIC = f"https://{HOST}"
TRANSFER = "+15550001111"
FALLBACK = "+15550002222"


def rest_settings(fake: FakeTwilioRest, **extra: Any) -> dict[str, Any]:
    return {
        "twilio_account_sid": fake.account_sid,
        "twilio_auth_token": fake.auth_token,
        "twilio_api_url": fake.url,
        "public_url": PUBLIC,
        "twilio_api_timeout_seconds": 0.5,
        "twilio_api_backoff_seconds": 0.01,
        **extra,
    }


def signed_caller(server: BridgeServer, fake: FakeTwilioRest, **kwargs: Any) -> FakeTwilioCaller:
    signature = twilio.expected_signature(fake.auth_token, f"wss://{HOST}/twilio")
    return FakeTwilioCaller(twilio_url(server), headers={"X-Twilio-Signature": signature}, **kwargs)


@asynccontextmanager
async def call_with_agent(
    server: BridgeServer, fake: FakeTwilioRest, agent: FakeAgent, **kwargs: Any
) -> AsyncIterator[tuple[FakeTwilioCaller, FakeAgentSession]]:
    async with signed_caller(server, fake, **kwargs) as caller:
        await caller.start()
        session = await agent.session()
        await eventually(lambda: session.settings is not None)
        yield caller, session


def transfer_request(call_id: str = "t1", **arguments: str) -> dict[str, Any]:
    return {"type": "FunctionCallRequest", "functions": [
        {"id": call_id, "name": "transfer_call", "arguments": json.dumps(arguments), "client_side": True}]}


# ---------------------------------------------------------------------------------- transfer


async def test_transfer_dials_the_configured_number_only_after_the_last_words_are_heard(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake, transfer_number=TRANSFER)) as server:
        async with call_with_agent(server, fake, fake_agent, echo_marks=False) as (caller, session):
            await session.send_json(transfer_request(reason="wants a pharmacist", number="+19005550000"))
            await eventually(lambda: session.of_type("FunctionCallResponse"), what="the answer")
            await session.send_json({"type": "AgentStartedSpeaking"})
            await session.send_audio(b"\x01" * 1600)  # "Let me transfer you to a pharmacist."
            await session.send_json({"type": "AgentAudioDone"})
            [mark] = await eventually(lambda: caller.of_event("mark"), what="the mark after the last words")
            await asyncio.sleep(0.3)
            assert not fake.requests_for("update"), "transferred before the caller heard the last words"
            await caller.echo_mark(mark["mark"]["name"])
            [update] = await fake.wait_for_requests(1, operation="update")
            await eventually(lambda: not server.calls, what="the call to end")
    assert update.call_sid == caller.call_sid
    assert update.field("Twiml") == f"<Response><Dial>{TRANSFER}</Dial></Response>"
    assert update.auth == (fake.account_sid, fake.auth_token)
    lines = read_record(tmp_path / "calls")
    assert [line["reason"] for line in lines if line["event"] == "transferred"] == ["wants a pharmacist"]
    assert lines[-1]["ended_by"] == "transferred"


async def test_a_barge_in_after_the_transfer_request_keeps_the_caller_with_the_agent(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(
        fake_agent, hangup_timeout_seconds=0.5, **rest_settings(fake, transfer_number=TRANSFER)
    ) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await session.send_json(transfer_request())
            await session.send_json({"type": "UserStartedSpeaking"})
            await asyncio.sleep(2.5)  # past the grace and the fallback timer
            assert server.calls and not fake.requests
            await caller.stop()
        await eventually(lambda: not server.calls)
    assert "hangup_cancelled" in [line["event"] for line in read_record(tmp_path / "calls")]


async def test_a_failed_transfer_tells_the_agent_and_the_call_goes_on(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake, transfer_number=TRANSFER)) as server:
        fake.script("update", twilio_error(400, 21210, "The source phone number provided is not yet verified."))
        async with call_with_agent(server, fake, fake_agent) as (caller, session):
            await session.send_json(transfer_request())
            injected = await eventually(lambda: session.of_type("InjectAgentMessage"), 5, "the agent to be told")
            assert "couldn't connect you" in injected[0]["message"]
            await session.send_audio(b"\x02" * 800)
            await caller.send_audio(b"\x03" * 3200)
            await eventually(lambda: len(caller.audio) >= 800 and len(session.audio) >= 3200, what="audio both ways")
            assert server.calls
            await caller.stop()
        await eventually(lambda: not server.calls)
    [failed] = [line for line in read_record(tmp_path / "calls") if line["event"] == "transfer_failed"]
    assert "21210" in failed["error"]


# ---------------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("fallback_number", [FALLBACK, None])
async def test_a_caller_is_sent_to_the_fallback_when_the_agent_fails_at_start(
    make_bridge: BridgeFactory, tmp_path: Path, fallback_number: str | None
) -> None:
    async with FakeTwilioRest() as fake, FakeAgent(refuse_status=401) as agent, make_bridge(
        agent, **rest_settings(fake, fallback_number=fallback_number)
    ) as server:
        async with signed_caller(server, fake) as caller:
            await caller.start()
            [update] = await fake.wait_for_requests(1, operation="update")
            assert not caller.closed.is_set() or update.outcome is not None
            await asyncio.wait_for(caller.closed.wait(), 5)
        await eventually(lambda: not server.calls)
    twiml = update.field("Twiml")
    assert twiml is not None and twiml.startswith("<Response><Say>")
    if fallback_number:
        assert twiml.endswith(f"<Dial>{FALLBACK}</Dial></Response>")
    else:
        assert twiml.endswith("<Hangup/></Response>")
    lines = read_record(tmp_path / "calls")
    [fallback] = [line for line in lines if line["event"] == "fallback"]
    assert fallback["ok"] and fallback["to"] == ("fallback number" if fallback_number else "apology and hang-up")
    assert lines[-1]["ended_by"].startswith("agent unavailable")


async def test_without_twilio_credentials_a_failed_agent_just_ends_the_call(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with FakeAgent(refuse_status=401) as agent, make_bridge(agent) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            await asyncio.wait_for(caller.closed.wait(), 5)
    assert not [line for line in read_record(tmp_path / "calls") if line["event"] == "fallback"]


async def test_a_caller_is_sent_to_the_fallback_after_a_failed_resume(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    agent = FakeAgent()
    await agent.__aenter__()
    try:
        async with FakeTwilioRest() as fake, make_bridge(
            agent, agent_reconnect_delays=(0.05,), **rest_settings(fake, fallback_number=FALLBACK)
        ) as server:
            async with call_with_agent(server, fake, agent) as (caller, session):
                await agent.__aexit__(None, None, None)  # Deepgram goes away: nothing to resume
                session.drop()
                [update] = await fake.wait_for_requests(1, operation="update", timeout=10)
                await asyncio.wait_for(caller.closed.wait(), 5)
    finally:
        await agent.__aexit__(None, None, None)
    assert (update.field("Twiml") or "").endswith(f"<Dial>{FALLBACK}</Dial></Response>")
    assert read_record(tmp_path / "calls")[-1]["ended_by"] == "agent connection lost"


# ----------------------------------------------------------------------------- outbound calls


def run_main(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args, "--env-file", str(empty_env(tmp_path))],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=20,
    )


def outbound_env(fake: FakeTwilioRest) -> dict[str, str]:
    return {
        "DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": fake.account_sid, "TWILIO_AUTH_TOKEN": fake.auth_token,
        "TWILIO_PHONE_NUMBER": "+15559990000", "PUBLIC_URL": PUBLIC, "TWILIO_API_URL": fake.url,
    }


async def test_an_outbound_call_request_is_exact(tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake:
        done = await asyncio.to_thread(
            run_main, ["call", "+15551230000", "--param", "reason=refill_ready", "--param", "name=Ann"],
            outbound_env(fake), tmp_path,
        )
        assert done.returncode == 0, done.stderr
        [create] = fake.requests_for("create")
    assert done.stdout.strip() == fake.created_sids[0]
    assert sorted(create.form_pairs()) == sorted([
        ("To", "+15551230000"),
        ("From", "+15559990000"),
        ("Twiml", twilio.connect_twiml(f"wss://{HOST}/twilio", {"reason": "refill_ready", "name": "Ann"})),
        ("MachineDetection", "DetectMessageEnd"),
        ("AsyncAmd", "true"),
        ("AsyncAmdStatusCallback", f"{PUBLIC}/twilio/amd?name=Ann&reason=refill_ready"),
        ("AsyncAmdStatusCallbackMethod", "POST"),
    ])


async def test_an_outbound_call_without_its_settings_is_refused_in_one_sentence(tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake:
        env = {**outbound_env(fake), "TWILIO_PHONE_NUMBER": ""}
        done = await asyncio.to_thread(run_main, ["call", "+15551230000"], env, tmp_path)
        bad = await asyncio.to_thread(run_main, ["call", "5551230000"], outbound_env(fake), tmp_path)
        assert not fake.requests
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "TWILIO_PHONE_NUMBER" in done.stderr
    assert bad.returncode == 2 and "E.164" in bad.stderr


# ------------------------------------------------------------------- answering-machine verdicts


def post_callback(port: int, url: str, params: dict[str, str], signature: str | None) -> int:
    """POST a callback to the bridge on ``port`` as Twilio would send it to the public ``url``."""
    parts = urllib.parse.urlsplit(url)
    local = f"http://127.0.0.1:{port}{parts.path}" + (f"?{parts.query}" if parts.query else "")
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    request = urllib.request.Request(local, data=urllib.parse.urlencode(params).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def get_callback(port: int, url: str, signature: str) -> int:
    parts = urllib.parse.urlsplit(url)
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{parts.path}?{parts.query}", headers={"X-Twilio-Signature": signature}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


AMD_URL = f"{PUBLIC}/twilio/amd?name=Ann&reason=refill_ready"


def verdict(call_sid: str, answered_by: str) -> dict[str, str]:
    return {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "AnsweredBy": answered_by}


async def test_a_machine_verdict_leads_to_the_voicemail_message_and_a_hang_up(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        sid = "CA" + "1" * 32
        params = verdict(sid, "machine_end_beep")
        signature = RequestValidator(fake.auth_token).compute_signature(AMD_URL, params)
        assert await asyncio.to_thread(post_callback, server.port, AMD_URL, params, signature) == 204
        [update] = await fake.wait_for_requests(1, operation="update")
        expected = twilio.connect_twiml(
            f"wss://{HOST}/twilio", {"name": "Ann", "reason": "refill_ready", "bridge_mode": "voicemail"}
        )
        assert update.call_sid == sid and update.field("Twiml") == expected
        # The redirected call's new stream, taken by whichever process: the message, then a hang-up.
        async with signed_caller(server, fake) as caller:
            await caller.start({"name": "Ann", "reason": "refill_ready", "bridge_mode": "voicemail"})
            session = await fake_agent.session()
            await eventually(lambda: session.settings is not None)
            assert session.settings["agent"]["greeting"] == server.settings.voicemail_message
            await session.send_json({"type": "AgentStartedSpeaking"})
            await session.send_audio(b"\x04" * 1600)
            await session.send_json({"type": "UserStartedSpeaking"})  # a beep: the message goes on
            await session.send_json({"type": "AgentAudioDone"})
            await asyncio.wait_for(caller.closed.wait(), 5)
            assert not caller.of_event("clear")
        await eventually(lambda: not server.calls)
    assert read_record(tmp_path / "calls")[-1]["ended_by"] == "voicemail"


@pytest.mark.parametrize("answered_by, twiml", [("human", None), ("unknown", None), ("fax", "<Response><Hangup/></Response>")])
async def test_a_person_changes_nothing_and_a_fax_is_hung_up_on(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, answered_by: str, twiml: str | None
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        params = verdict("CA" + "2" * 32, answered_by)
        signature = RequestValidator(fake.auth_token).compute_signature(AMD_URL, params)
        assert await asyncio.to_thread(post_callback, server.port, AMD_URL, params, signature) == 204
        if twiml is None:
            await asyncio.sleep(0.3)
            assert not fake.requests
        else:
            [update] = await fake.wait_for_requests(1, operation="update")
            assert update.field("Twiml") == twiml


async def test_a_callback_reaching_a_second_bridge_process_works(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """The verdict goes to a process that holds no call at all: it redirects the call by itself."""
    from conftest import free_port

    async with FakeTwilioRest() as fake:
        port = free_port()
        env = {**os.environ, **outbound_env(fake), "DEEPGRAM_AGENT_URL": fake_agent.url, "CALLS_DIR": str(tmp_path / "c")}
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--host", "127.0.0.1", "--port", str(port),
             "--env-file", str(empty_env(tmp_path))],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            def up() -> bool:
                try:
                    return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
                except OSError:
                    return False

            await eventually(lambda: up(), 10, "the second bridge to start")
            params = verdict("CA" + "3" * 32, "machine_end_silence")
            signature = RequestValidator(fake.auth_token).compute_signature(AMD_URL, params)
            assert await asyncio.to_thread(post_callback, port, AMD_URL, params, signature) == 204
            [update] = await fake.wait_for_requests(1, operation="update", timeout=10)
            assert "bridge_mode" in (update.field("Twiml") or "")
        finally:
            process.terminate()
            process.wait(10)


async def test_callback_signatures_on_post_and_get(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake)) as server:
        validator = RequestValidator(fake.auth_token)
        params = verdict("CA" + "4" * 32, "human")
        good = validator.compute_signature(AMD_URL, params)
        tampered = {**params, "AnsweredBy": "machine_end_beep"}
        port = server.port
        assert await asyncio.to_thread(post_callback, port, AMD_URL, params, good) == 204
        assert await asyncio.to_thread(post_callback, port, AMD_URL, tampered, good) == 403
        assert await asyncio.to_thread(post_callback, port, AMD_URL, params, None) == 403
        assert await asyncio.to_thread(post_callback, port, AMD_URL, params, "bm90IGEgc2lnbmF0dXJl") == 403
        get_url = f"{PUBLIC}/twilio/amd?" + urllib.parse.urlencode(params)
        assert await asyncio.to_thread(get_callback, port, get_url, validator.compute_signature(get_url, {})) == 204
        assert await asyncio.to_thread(get_callback, port, get_url, good) == 403
        await asyncio.sleep(0.2)
        assert not fake.requests, "a refused callback must change no call"


def config_with_transfer(tmp_path: Path) -> Path:
    config = json.loads((ROOT / "config.json").read_text())
    config["agent"]["think"]["functions"].append(
        {"name": "transfer_call", "description": "Transfer the caller to a pharmacist.",
         "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}}, "defer_until_eot": True}
    )
    path = tmp_path / "with_transfer.json"
    path.write_text(json.dumps(config))
    return path


def test_declaring_transfer_call_without_its_settings_is_a_startup_error(tmp_path: Path) -> None:
    done = run_main(["--config", str(config_with_transfer(tmp_path)), "--port", "0"], {"DEEPGRAM_API_KEY": "k"}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "TRANSFER_NUMBER" in done.stderr


def test_startup_says_once_which_call_control_features_are_off() -> None:
    from bridge.config import load_settings
    from main import call_control_status

    none = call_control_status(load_settings({"DEEPGRAM_API_KEY": "k"}))
    assert len(none) == 1 and "TWILIO_ACCOUNT_SID" in none[0]
    rest = load_settings({"DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t",
                          "PUBLIC_URL": HOST})
    lines = call_control_status(rest)
    assert [line.split(":")[0] for line in lines] == [
        "call transfer is off", "FALLBACK_NUMBER is not set", "outbound calls are off"]
    everything = load_settings({"DEEPGRAM_API_KEY": "k", "TWILIO_ACCOUNT_SID": "AC" + "a" * 32, "TWILIO_AUTH_TOKEN": "t",
                                "PUBLIC_URL": HOST, "TRANSFER_NUMBER": TRANSFER, "FALLBACK_NUMBER": FALLBACK,
                                "TWILIO_PHONE_NUMBER": "+15559990000"})
    assert call_control_status(everything) == []


@pytest.mark.parametrize("env, expected", [
    ({"TWILIO_ACCOUNT_SID": "ACnope", "TWILIO_AUTH_TOKEN": "t"}, "TWILIO_ACCOUNT_SID must be AC"),
    ({"TWILIO_ACCOUNT_SID": "AC" + "a" * 32}, "TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not"),
    ({"TRANSFER_NUMBER": "555-1234"}, "TRANSFER_NUMBER must be a phone number in E.164"),
    ({"FALLBACK_NUMBER": "+0123"}, "FALLBACK_NUMBER must be a phone number in E.164"),
    ({"TWILIO_API_URL": "ftp://x"}, "TWILIO_API_URL must be an http(s)"),
])
def test_call_control_settings_are_validated_in_one_sentence(env: dict[str, str], expected: str) -> None:
    from bridge.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as caught:
        load_settings({"DEEPGRAM_API_KEY": "k", **env})
    assert str(caught.value).startswith(expected) and str(caught.value).endswith(".")
