"""Twilio's recording status callback (bridge/recordings.py) through the real server.

Twilio's own ``RequestValidator`` signs every callback, as Twilio would; the webhook goes to the
fake receiver of tests/test_webhook.py, which checks each request's signature. The record the
callback adds to is either a real call's (a signed, bound call through the fake agent) or one
written by ``CallRecord`` itself, so its name is exactly the one the bridge gives records.
Everything waits on events (a record line, a webhook request, a log line), never on a sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, BridgeFactory, bridge_settings
from fake_twilio_rest import DEFAULT_ACCOUNT_SID, FakeTwilioRest
from fakes import FakeAgent, eventually
from test_call_control import PUBLIC, call_with_agent, http, local_url, post_callback, rest_settings, signed
from test_webhook import SECRET, FakeReceiver, webhook_overrides

from bridge.config import load_agent_config
from bridge.recordings import RECORDING_PATH, check_record_name, parse_recording_status, recording_callback_url
from bridge.records import CallRecord, RecordWriter
from bridge.server import BridgeServer, routes
from bridge.storage.shared import DirectoryState

LOGGER = "bridge.recordings"
CALL_SID = "CA" + "5eed" * 8
RECORDING_SID = "RE" + "0123456789abcdef" * 2
RECORDING_URL = f"https://api.twilio.com/2010-04-01/Accounts/{DEFAULT_ACCOUNT_SID}/Recordings/{RECORDING_SID}"


def recording_status(call_sid: str = CALL_SID, status: str = "completed", **changes: str | None) -> dict[str, str]:
    """The form Twilio POSTs to RecordingStatusCallback; a change to None leaves that field out."""
    form = {
        "AccountSid": DEFAULT_ACCOUNT_SID,
        "CallSid": call_sid,
        "RecordingSid": RECORDING_SID,
        "RecordingUrl": RECORDING_URL,
        "RecordingStatus": status,
        "RecordingDuration": "42",
        "RecordingChannels": "2",
        "RecordingStartTime": "Sun, 06 Dec 2026 05:15:02 +0000",
        "RecordingSource": "StartCallRecordingAPI",
        "RecordingTrack": "both",
        **changes,
    }
    return {name: value for name, value in form.items() if value is not None}


async def written_record(calls_dir: Path, call_sid: str = CALL_SID) -> Path:
    """A finished call's record, written and named by ``CallRecord`` itself."""
    writer = RecordWriter()
    record = CallRecord(calls_dir, True, writer)
    record.add("transcript", role="user", content="Is my refill ready?")
    path = await record.finish(call_sid, record.summary(call_sid=call_sid, ended_by="caller hung up"))
    writer.close()
    assert path is not None
    return path


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recording_events(receiver: FakeReceiver) -> list[dict[str, Any]]:
    return [request.json for request in receiver.requests if request.json["event"] == "recording.completed"]


def recording_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


async def post_status(server: Any, fake: FakeTwilioRest, url: str, form: dict[str, str]) -> int:
    """POST ``form`` to the bridge as Twilio would to the public ``url``, signed by Twilio's own validator."""
    return await post_callback(server.port, url, form, signed(fake.auth_token, url, form))


@pytest.fixture
async def receiver() -> Any:
    async with FakeReceiver() as fake:
        yield fake


@pytest.fixture
def info_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


# ------------------------------------------------------------------------------ the happy path


async def test_a_real_calls_recording_is_added_to_its_record_and_a_completed_one_is_sent_to_the_webhook(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path
) -> None:
    """in-progress, then completed: a line each after the call's summary; only completed is sent.

    The webhook event is signed like call.ended, with the recording's fields as Twilio gave them.
    """
    async with FakeTwilioRest() as fake, make_bridge(fake_agent, **rest_settings(fake), **webhook_overrides(receiver)) as server:
        async with call_with_agent(server, fake, fake_agent) as (caller, _):
            call_sid = caller.call_sid
            await caller.stop()
        await eventually(lambda: not server.calls, what="the call to end")
        [record] = list((tmp_path / "calls").glob("*.jsonl"))
        assert lines_of(record)[-1]["event"] == "summary"
        url = recording_callback_url(server.settings, record.name)
        assert url == f"{PUBLIC}/twilio/recording?record={record.name}"

        started = recording_status(call_sid, "in-progress", RecordingDuration="-1", RecordingUrl=None)
        assert await post_status(server, fake, url, started) == 204
        await eventually(lambda: lines_of(record)[-1]["event"] == "recording", what="the in-progress line")
        assert await post_status(server, fake, url, recording_status(call_sid)) == 204
        await eventually(lambda: lines_of(record)[-1].get("status") == "completed", what="the completed line")
        [event] = await eventually(lambda: recording_events(receiver), what="the recording.completed webhook")

    lines = lines_of(record)
    assert [line["event"] for line in lines[-3:]] == ["summary", "recording", "recording"]
    first, last = ({k: v for k, v in line.items() if k != "time"} for line in lines[-2:])
    assert first == {
        "event": "recording", "status": "in-progress", "recording_sid": RECORDING_SID, "url": None,
        "duration_seconds": None, "channels": 2, "start_time": "2026-12-06T05:15:02+00:00", "error_code": None,
    }
    assert last == {**first, "status": "completed", "url": RECORDING_URL, "duration_seconds": 42}
    [request] = [r for r in receiver.requests if r.json["event"] == "recording.completed"]
    assert request.signature_ok(SECRET) and not request.signature_ok("another-secret-0123456789")
    assert request.headers["content-type"] == "application/json"
    assert event == {
        "event": "recording.completed", "id": event["id"], "call_sid": call_sid, "recording_sid": RECORDING_SID,
        "status": "completed", "url": RECORDING_URL, "duration_seconds": 42, "channels": 2, "error_code": None,
    }
    assert len(event["id"]) == 32
    assert [r.json["event"] for r in receiver.requests] == ["call.ended", "recording.completed"]


async def test_a_replayed_callback_acts_once_across_processes_sharing_the_state_folder(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """The same signed callback, again to the same process and to a second one: one line, one webhook.

    Both bridges share STATE_DIR and CALLS_DIR, so a second claim granted would show as a second line.
    """
    record = await written_record(tmp_path / "calls")
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake), **webhook_overrides(receiver)) as first, make_bridge(
        **rest_settings(fake), **webhook_overrides(receiver)
    ) as second:
        url = recording_callback_url(first.settings, record.name)
        form = recording_status()
        signature = signed(fake.auth_token, url, form)
        assert await post_callback(first.port, url, form, signature) == 204
        await eventually(lambda: recording_events(receiver), what="the webhook")
        await eventually(lambda: lines_of(record)[-1]["event"] == "recording", what="the record line")
        for server in (first, second, second):
            assert await post_callback(server.port, url, form, signature) == 204
        await eventually(
            lambda: len([m for m in recording_logs(info_logs, logging.INFO) if "already acted on" in m]) == 3,
            what="the three replays to be turned away",
        )
        another = recording_status(status="absent", ErrorCode="16101")  # a new status of it still acts
        assert await post_status(second, fake, url, another) == 204
        await eventually(lambda: len(recording_events(receiver)) == 2, what="the absent status's webhook")
        await eventually(lambda: lines_of(record)[-1].get("status") == "absent", what="the absent line")
    assert [line["event"] for line in lines_of(record)] == ["transcript", "summary", "recording", "recording"]
    assert [event["status"] for event in recording_events(receiver)] == ["completed", "absent"]


async def test_an_absent_recording_is_recorded_with_its_error_code(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """Twilio's ``absent`` with ErrorCode 16102 (silent): in the record and the webhook as such."""
    record = await written_record(tmp_path / "calls")
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake), **webhook_overrides(receiver)) as server:
        url = recording_callback_url(server.settings, record.name)
        form = recording_status(status="absent", ErrorCode="16102", RecordingDuration="0", RecordingUrl=None)
        assert await post_status(server, fake, url, form) == 204
        [event] = await eventually(lambda: recording_events(receiver), what="the webhook")
        await eventually(lambda: lines_of(record)[-1]["event"] == "recording", what="the record line")
    line = lines_of(record)[-1]
    assert (line["status"], line["error_code"], line["url"], line["duration_seconds"]) == ("absent", 16102, None, 0)
    assert (event["status"], event["error_code"], event["url"]) == ("absent", 16102, None)
    [said] = recording_logs(info_logs, logging.INFO)
    assert f"recording {RECORDING_SID} absent (0 s, 2 channels, error 16102: silent): added to the call record" in said


async def test_a_callback_for_a_record_this_process_does_not_have_says_so_once_and_still_sends_the_webhook(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """Another pod's call (or RECORD_CALLS=false): no file is created, one INFO line, the webhook goes out."""
    name = f"20261206T051502_{CALL_SID}.jsonl"
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake), **webhook_overrides(receiver)) as server:
        url = recording_callback_url(server.settings, name)
        assert await post_status(server, fake, url, recording_status()) == 204
        await eventually(lambda: recording_events(receiver), what="the webhook")
        [said] = await eventually(lambda: recording_logs(info_logs, logging.INFO), what="the INFO line")
    assert f"the call record {name} is not in this process's CALLS_DIR" in said
    assert not (tmp_path / "calls" / name).exists()
    assert [m for m in recording_logs(info_logs, logging.INFO) + recording_logs(info_logs, logging.WARNING)] == [said]


class HeldClaims(DirectoryState):
    """A slow store: each claim waits until the test lets it through."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.release = threading.Event()

    def claim(self, key: str) -> bool:
        if not self.release.wait(5):
            raise OSError("the test never let the claim through")
        return super().claim(key)


async def test_a_call_without_a_record_still_gets_its_webhook(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """RECORD_CALLS=false: the callback URL names no record; the webhook goes out all the same."""
    async with FakeTwilioRest() as fake, make_bridge(
        record_calls=False, **rest_settings(fake), **webhook_overrides(receiver)
    ) as server:
        url = recording_callback_url(server.settings, None)
        assert await post_status(server, fake, url, recording_status()) == 204
        [event] = await eventually(lambda: recording_events(receiver), what="the webhook")
        [said] = await eventually(lambda: recording_logs(info_logs, logging.INFO), what="the INFO line")
    assert event["recording_sid"] == RECORDING_SID
    assert "the call has no record" in said
    assert not (tmp_path / "calls").exists()


async def test_a_callback_still_being_acted_on_at_shutdown_reaches_the_record_and_the_webhook(
    receiver: FakeReceiver, tmp_path: Path
) -> None:
    """Shutdown waits for a callback's work before it closes the webhook sender and the record writer.

    The claim is held until the shutdown has begun, so the work is sure to end during it.
    """
    record = await written_record(tmp_path / "calls")
    shared = HeldClaims(tmp_path / "state")
    async with FakeTwilioRest() as fake:
        settings = bridge_settings(tmp_path, **rest_settings(fake), **webhook_overrides(receiver))
        server = BridgeServer(settings, load_agent_config(ROOT / "config.json", os.environ), {}, shared=shared)
        await server.start()
        stopping: asyncio.Task[None] | None = None
        try:
            url = recording_callback_url(server.settings, record.name)
            assert await post_status(server, fake, url, recording_status()) == 204
            stopping = asyncio.create_task(server.shutdown(drain_seconds=0))
            await eventually(lambda: server.draining, what="the shutdown to begin")
        finally:
            shared.release.set()
            await (stopping or server.shutdown(drain_seconds=0))
    assert len(recording_events(receiver)) == 1
    assert lines_of(record)[-1]["status"] == "completed"


# ----------------------------------------------------------------------------------- refusals


async def test_forged_or_malformed_callbacks_are_refused_and_change_nothing(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """403 for a bad or missing signature and for another account; 400 for a record name that is not
    this call's record file (``../``, ``/``, another call's) and for malformed fields; 405 for a GET.

    Nothing is written or sent, and nothing is claimed: the genuine callback afterwards still acts.
    """
    record = await written_record(tmp_path / "calls")
    before = record.read_bytes()
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake), **webhook_overrides(receiver)) as server:
        token, port = fake.auth_token, server.port
        url = recording_callback_url(server.settings, record.name)
        form = recording_status()
        other_account = recording_status(AccountSid="AC" + "f" * 32)
        forbidden = [
            await post_callback(port, url, form, None),
            await post_callback(port, url, form, "bm90IGEgc2lnbmF0dXJl"),
            await post_callback(port, url, form, signed("another-token", url, form)),
            await post_callback(port, url, form, signed(token, url, recording_status(status="absent"))),  # status tampered
            await post_callback(port, url, form, signed(token, local_url(port, url), form)),  # not the public URL
            await post_callback(port, f"{PUBLIC}{RECORDING_PATH}?record=x", form, signed(token, url, form)),  # query tampered
            await post_callback(port, url, other_account, signed(token, url, other_account)),
        ]
        assert forbidden == [403] * len(forbidden)
        assert len([m for m in recording_logs(info_logs, logging.WARNING) if "another Twilio account" in m]) == 1

        base = f"{PUBLIC}{RECORDING_PATH}"
        bad_names = [
            f"../{record.name}", f"calls/{record.name}", f"/{record.name}", urllib.parse.quote(f"../{record.name}", safe=""),
            f"20261206T051502_{'CA' + '1' * 32}.jsonl",  # a well-formed name, of another call
            record.name.replace(".jsonl", ".json"), f"{record.name}&record={record.name}",
        ]
        bad_forms = [
            recording_status(RecordingSid="RE123"), recording_status(RecordingSid="../RE" + "0" * 32),
            recording_status(RecordingSid=None), recording_status(CallSid="CA123"), recording_status(RecordingStatus="done"),
            recording_status(RecordingUrl="javascript:alert(1)"), recording_status(RecordingDuration="4 2"),
            recording_status(RecordingChannels="3"), recording_status(ErrorCode="16102\n"),
            recording_status(RecordingStartTime="x" * 100),
        ]
        bad = [await post_status(server, fake, f"{base}?record={name}", form) for name in bad_names]
        bad += [await post_status(server, fake, url, bad_form) for bad_form in bad_forms]
        assert bad == [400] * len(bad)
        assert len([m for m in recording_logs(info_logs, logging.DEBUG) if m.startswith("refused")]) == len(bad)

        get = urllib.request.Request(local_url(port, url), headers={"X-Twilio-Signature": signed(token, url, {})})
        assert await asyncio.to_thread(http, get) == 405
        assert record.read_bytes() == before and receiver.requests == []
        assert list((tmp_path / "calls").iterdir()) == [record]
        assert recording_logs(info_logs, logging.INFO) == []

        assert await post_status(server, fake, url, form) == 204  # the genuine one, after all those
        await eventually(lambda: recording_events(receiver), what="the webhook")
        await eventually(lambda: lines_of(record)[-1]["event"] == "recording", what="the record line")
    assert len(lines_of(record)) == 3


async def test_a_record_that_is_a_symlink_is_not_written_through(
    make_bridge: BridgeFactory, tmp_path: Path, info_logs: pytest.LogCaptureFixture
) -> None:
    """A record name that is a symlink in CALLS_DIR (put there by someone else) leads nowhere."""
    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    link = tmp_path / "calls" / f"20261206T051502_{CALL_SID}.jsonl"
    link.parent.mkdir()
    link.symlink_to(outside)
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake)) as server:
        url = recording_callback_url(server.settings, link.name)
        assert await post_status(server, fake, url, recording_status()) == 204
        [said] = await eventually(lambda: recording_logs(info_logs, logging.WARNING), what="the WARNING")
    assert f"could not be added to the call record {link.name}" in said
    assert outside.read_text() == ""


async def test_the_route_is_on_only_with_twilios_rest_api(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake:
        assert (RECORDING_PATH, "Twilio's recording status callback for recorded calls") in routes(
            bridge_settings(tmp_path, **rest_settings(fake))
        )
    assert RECORDING_PATH not in [path for path, _ in routes(bridge_settings(tmp_path))]
    async with make_bridge() as server:
        form = recording_status()
        # Without the REST API it is no route: a POST gets what a POST to any unknown path gets.
        assert await post_callback(server.port, f"{PUBLIC}{RECORDING_PATH}", form, None) == 405
        assert await post_callback(server.port, f"{PUBLIC}/nowhere", form, None) == 405


async def test_a_busy_bridge_answers_503_so_twilio_retries(
    make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path
) -> None:
    record = await written_record(tmp_path / "calls")
    async with FakeTwilioRest() as fake, make_bridge(**rest_settings(fake), **webhook_overrides(receiver)) as server:
        url = recording_callback_url(server.settings, record.name)
        server.recordings.work.limit = 0
        assert await post_status(server, fake, url, recording_status()) == 503
        server.recordings.work.limit = 64
        assert await post_status(server, fake, url, recording_status()) == 204  # the retry: not claimed before
        await eventually(lambda: recording_events(receiver), what="the webhook")


# ------------------------------------------------------------------------------- the pieces


def test_the_callback_url_names_only_record_files(tmp_path: Path) -> None:
    settings = bridge_settings(tmp_path, public_url="bridge.example.ngrok.app")
    name = f"20261206T051502_{CALL_SID}.jsonl"
    assert recording_callback_url(settings, name) == f"https://bridge.example.ngrok.app/twilio/recording?record={name}"
    assert recording_callback_url(settings, None) == "https://bridge.example.ngrok.app/twilio/recording"
    for bad in (f"../{name}", f"a/{name}", "", name + "\n", "20261206T051502_CA1.json"):
        with pytest.raises(ValueError):
            recording_callback_url(settings, bad)
    assert check_record_name(name, CALL_SID) == name
    with pytest.raises(ValueError):
        check_record_name(name, "CA" + "1" * 32)


def test_twilios_fields_are_read_as_the_record_wants_them() -> None:
    def parsed(**changes: str | None) -> Any:
        return parse_recording_status({k: [v] for k, v in recording_status(**changes).items()})

    assert parsed().start_time == "2026-12-06T05:15:02+00:00"
    assert parsed(RecordingStartTime="Sun, 06 Dec 2026 06:15:02 +0100").start_time == "2026-12-06T05:15:02+00:00"
    assert parsed(RecordingStartTime="2026-12-06 05:15:02").start_time == "2026-12-06 05:15:02"  # kept as sent
    assert parsed(RecordingDuration="-1").duration_seconds is None
    assert parsed(ErrorCode="0").error_code is None
    assert parsed(RecordingChannels="1").channels == 1
    assert parsed(RecordingChannels=None, RecordingSource=None, RecordingStartTime=None).channels is None
