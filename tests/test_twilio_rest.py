"""bridge.twilio_rest against FakeTwilioRest: the requests it builds, and how it copes with faults.

The requests are checked against Twilio's own Python package (a test-only dependency), which is
given a recording HTTP client instead of the network: for the same operation, our client must
send the same method, path, Basic auth and form fields (as multisets, since a repeated field such
as StatusCallbackEvent is sent once per value). The fault tests script the fake (a 500, a 429, a
hang, a dropped connection...) and check both what the client returns or raises and how many
requests reached the fake, since retrying the wrong thing could ring a person twice. Every wait
is on an event or a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from fake_twilio_rest import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    DROP,
    HANG,
    NORMAL,
    RESET,
    FakeTwilioRest,
    RecordedRequest,
    Reply,
    rate_limited,
    twilio_error,
)
from twilio.http import HttpClient
from twilio.http.response import Response
from twilio.rest import Client

from bridge import http_client
from bridge.http_client import MAX_RETRY_AFTER_SECONDS, retry_after_seconds
from bridge.twilio_rest import CURRENT_RECORDING, TwilioApiError, TwilioRestClient

ACCOUNT_SID = DEFAULT_ACCOUNT_SID
AUTH_TOKEN = DEFAULT_AUTH_TOKEN
CALL_SID = "CA" + "fedcba9876543210" * 2
TWIML = (
    '<Response><Connect><Stream url="wss://bridge.example/twilio">'
    '<Parameter name="a" value="b &amp; c"/></Stream></Connect></Response>'
)
LOGGER = "bridge.twilio_rest"
RECORDING_CALLBACK = "https://bridge.example/twilio/recording?record=20261206T051502_" + CALL_SID + ".jsonl"
RECORDING_EVENTS = ["in-progress", "completed", "absent"]

# Every create_call field, with the values both clients are given.
CREATE_FIELDS: dict[str, Any] = {
    "machine_detection": "DetectMessageEnd",
    "async_amd_status_callback": "https://bridge.example/twilio/amd?x=1&y=é",
    "async_amd_status_callback_method": "POST",
    "status_callback": "https://bridge.example/status",
    "status_callback_event": ["initiated", "ringing", "answered", "completed"],
    "status_callback_method": "POST",
}


# -- helpers ------------------------------------------------------------------------------------


class RecordingHttpClient(HttpClient):
    """Twilio's HTTP client seam: records each request and answers with a canned JSON body."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(logger=logging.getLogger("tests.twilio_oracle"), is_async=False)
        self.status = status
        self.payload = payload
        self.recorded: list[dict[str, Any]] = []

    def request(
        self,
        method: str,
        uri: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        self.recorded.append(
            {"method": method, "url": uri, "params": params, "data": data, "headers": headers, "auth": auth}
        )
        return Response(self.status, json.dumps(self.payload))


def official_request(status: int, run: Callable[[Client], object], answer: dict[str, Any] | None = None) -> dict[str, Any]:
    """What Twilio's own package sends for ``run(client)``."""
    http = RecordingHttpClient(status, answer or {"sid": CALL_SID, "account_sid": ACCOUNT_SID, "status": "queued"})
    # environment={}: a developer's TWILIO_REGION / TWILIO_EDGE must not change the URL.
    run(Client(ACCOUNT_SID, AUTH_TOKEN, http_client=http, environment={}))
    [recorded] = http.recorded
    return recorded


def official_pairs(data: dict[str, object] | None) -> Counter[tuple[str, str]]:
    """Twilio's form data as a multiset: requests sends a list as one field per value."""
    pairs: Counter[tuple[str, str]] = Counter()
    for name, value in (data or {}).items():
        for item in value if isinstance(value, list) else [value]:
            pairs[(name, str(item))] += 1
    return pairs


def assert_same_request(ours: RecordedRequest, theirs: dict[str, Any]) -> None:
    assert ours.method == theirs["method"] == "POST"
    assert ours.path == urlsplit(theirs["url"]).path
    assert ours.auth == theirs["auth"] == (ACCOUNT_SID, AUTH_TOKEN)
    assert Counter(ours.form_pairs()) == official_pairs(theirs["data"])
    assert ours.headers["content-type"] == theirs["headers"]["Content-Type"]
    assert ours.headers["accept"] == theirs["headers"]["Accept"]


def make_client(fake: FakeTwilioRest, **options: Any) -> TwilioRestClient:
    """A client with deadlines small enough for tests."""
    options.setdefault("timeout", 0.5)
    options.setdefault("attempts", 3)
    options.setdefault("backoff", 0.01)
    return TwilioRestClient(fake.account_sid, fake.auth_token, fake.url, **options)


async def create(client: TwilioRestClient) -> dict[str, Any]:
    return await client.create_call("+15551230000", "+15559870000", twiml=TWIML)


def problems(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The client's warning-or-worse lines."""
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def assert_no_secrets(text: str) -> None:
    credentials = base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    for secret in (AUTH_TOKEN, ACCOUNT_SID, credentials, "Authorization", "authorization"):
        assert secret not in text


@pytest.fixture(autouse=True)
def debug_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    # DEBUG too, so the per-attempt lines are checked for secrets as well.
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    yield
    assert_no_secrets(caplog.text)


@pytest.fixture
async def fake() -> Any:
    async with FakeTwilioRest() as server:
        yield server


# -- 1. the same requests as Twilio's own package ---------------------------------------------


@pytest.mark.parametrize(
    "source",
    [{"twiml": TWIML}, {"url": "https://bridge.example/voice?a=1", "method": "GET"}],
    ids=["twiml", "url"],
)
async def test_create_call_sends_what_twilios_package_sends(fake: FakeTwilioRest, source: dict[str, str]) -> None:
    fields = {**CREATE_FIELDS, **source}
    created = await make_client(fake).create_call("+15551230000", "+15559870000", async_amd=True, **fields)
    theirs = official_request(
        201, lambda c: c.calls.create(to="+15551230000", from_="+15559870000", async_amd="true", **fields)
    )
    [ours] = fake.requests
    assert_same_request(ours, theirs)
    assert ours.form["StatusCallbackEvent"] == fields["status_callback_event"]  # repeated, in order
    assert ours.field("AsyncAmd") == "true"
    assert created["sid"] == fake.created_sids[0] and created["status"] == "queued"


async def test_create_call_sends_only_the_fields_given(fake: FakeTwilioRest) -> None:
    await make_client(fake).create_call("+15551230000", "+15559870000", twiml=TWIML)
    theirs = official_request(201, lambda c: c.calls.create(to="+15551230000", from_="+15559870000", twiml=TWIML))
    [ours] = fake.requests
    assert_same_request(ours, theirs)
    assert set(ours.form) == {"To", "From", "Twiml"}


@pytest.mark.parametrize(
    "fields",
    [
        {"twiml": "<Response><Dial>+15550001111</Dial></Response>"},
        {"status": "completed"},
        {"url": "https://x.example/t", "method": "POST"},
    ],
    ids=["twiml", "status-completed", "url"],
)
async def test_update_call_sends_what_twilios_package_sends(fake: FakeTwilioRest, fields: dict[str, str]) -> None:
    updated = await make_client(fake).update_call(CALL_SID, **fields)
    theirs = official_request(200, lambda c: c.calls(CALL_SID).update(**fields))
    [ours] = fake.requests
    assert_same_request(ours, theirs)
    assert ours.call_sid == CALL_SID
    assert updated is not None and updated["sid"] == CALL_SID


@pytest.mark.parametrize(
    "channels, events", [("dual", RECORDING_EVENTS), ("mono", ["completed"])], ids=["dual-every-event", "mono-completed"]
)
async def test_start_recording_sends_what_twilios_package_sends(
    fake: FakeTwilioRest, channels: str, events: list[str]
) -> None:
    started = await make_client(fake).start_recording(
        CALL_SID, status_callback=RECORDING_CALLBACK, channels=channels, status_callback_events=events
    )
    theirs = official_request(
        201,
        lambda c: c.calls(CALL_SID).recordings.create(
            recording_channels=channels,
            recording_status_callback=RECORDING_CALLBACK,
            recording_status_callback_event=events,
            recording_status_callback_method="POST",
        ),
        answer={"sid": "RE" + "0" * 32, "call_sid": CALL_SID, "status": "in-progress"},
    )
    [ours] = fake.requests
    assert_same_request(ours, theirs)
    assert urlsplit(theirs["url"]).path.endswith(f"/Calls/{CALL_SID}/Recordings.json")
    assert ours.form["RecordingStatusCallbackEvent"] == events  # repeated, in order
    assert ours.operation == "start-recording" and ours.call_sid == CALL_SID
    assert started is not None
    assert started == fake.recordings[started["sid"]]
    assert (started["call_sid"], started["status"], started["source"]) == (CALL_SID, "in-progress", "StartCallRecordingAPI")
    assert started["channels"] == (2 if channels == "dual" else 1)


async def test_start_recording_defaults_to_two_channels_and_every_status(fake: FakeTwilioRest) -> None:
    await make_client(fake).start_recording(CALL_SID, status_callback=RECORDING_CALLBACK)
    [ours] = fake.requests
    assert ours.form == {
        "RecordingChannels": ["dual"],
        "RecordingStatusCallback": [RECORDING_CALLBACK],
        "RecordingStatusCallbackEvent": RECORDING_EVENTS,
        "RecordingStatusCallbackMethod": ["POST"],
    }


@pytest.mark.parametrize(
    "which, fields",
    [
        ("current", {"status": "paused", "pause_behavior": "skip"}),
        ("current", {"status": "in-progress"}),
        ("by-sid", {"status": "paused", "pause_behavior": "silence"}),
        ("by-sid", {"status": "stopped"}),
    ],
    ids=["pause-skip-current", "resume-current", "pause-silence-by-sid", "stop-by-sid"],
)
async def test_update_recording_sends_what_twilios_package_sends(
    fake: FakeTwilioRest, which: str, fields: dict[str, str]
) -> None:
    client = make_client(fake)
    started = await client.start_recording(CALL_SID, status_callback=RECORDING_CALLBACK)
    assert started is not None
    recording_sid = CURRENT_RECORDING if which == "current" else started["sid"]
    updated = await client.update_recording(CALL_SID, recording_sid, **fields)
    theirs = official_request(
        200,
        lambda c: c.calls(CALL_SID).recordings(recording_sid).update(**fields),
        answer={"sid": started["sid"], "call_sid": CALL_SID, "status": fields["status"]},
    )
    [ours] = fake.requests_for("update-recording")
    assert_same_request(ours, theirs)
    assert urlsplit(theirs["url"]).path.endswith(f"/Calls/{CALL_SID}/Recordings/{recording_sid}.json")
    assert ours.recording_sid == recording_sid
    assert updated is not None and (updated["sid"], updated["status"]) == (started["sid"], fields["status"])


async def test_default_api_url_is_twilios_host_over_tls(fake: FakeTwilioRest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default API URL the client dials api.twilio.com:443 with TLS and names that host."""
    dialled: list[tuple[str, int, ssl.SSLContext | None]] = []

    async def to_the_fake(host: str, port: int, tls: ssl.SSLContext | None) -> Any:
        dialled.append((host, port, tls))
        return await asyncio.open_connection("127.0.0.1", fake.port)  # no network in tests

    monkeypatch.setattr(http_client, "open_stream", to_the_fake)
    client = TwilioRestClient(ACCOUNT_SID, AUTH_TOKEN, timeout=0.5)
    await create(client)
    theirs = official_request(201, lambda c: c.calls.create(to="+15551230000", from_="+15559870000", twiml=TWIML))
    url = urlsplit(theirs["url"])
    [(host, port, tls)] = dialled
    assert (url.scheme, url.hostname, url.port or 443) == ("https", host, port)
    assert isinstance(tls, ssl.SSLContext) and tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
    [ours] = fake.requests
    assert ours.headers["host"] == url.netloc
    assert ours.path == url.path
    assert "bridge" in ours.headers["user-agent"]


# -- 2. faults ----------------------------------------------------------------------------------


async def test_update_retries_a_500_once_and_succeeds_quietly(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture) -> None:
    fake.script("update", 500, NORMAL)
    updated = await make_client(fake).update_call(CALL_SID, twiml=TWIML)
    assert updated is not None and updated["status"] == "in-progress"
    assert [r.outcome for r in fake.requests] == [500, 200]
    assert problems(caplog) == []


@pytest.mark.parametrize("status, retried", [(503, True), (429, True), (500, False), (502, False), (504, False)])
async def test_create_retries_only_statuses_that_mean_nothing_was_done(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, status: int, retried: bool
) -> None:
    fake.script("create", status, NORMAL)
    if retried:
        created = await create(make_client(fake))
        assert created["sid"] == fake.created_sids[0]
        assert [r.outcome for r in fake.requests] == [status, 201]
        assert problems(caplog) == []
    else:
        # A 500 may come after the call was created: another attempt could ring the person twice.
        with pytest.raises(TwilioApiError) as caught:
            await create(make_client(fake))
        assert caught.value.status == status
        assert len(fake.requests) == 1 and fake.pending_steps("create") == 1
        assert len(problems(caplog)) == 1


async def test_429_retry_after_is_honoured(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture) -> None:
    fake.script("create", rate_limited(retry_after=0), NORMAL)
    # A backoff this long would blow the deadline: only Retry-After: 0 lets the retry come at once.
    async with asyncio.timeout(3):
        created = await create(make_client(fake, backoff=30))
    assert created["sid"]
    assert [r.outcome for r in fake.requests] == [429, 201]
    assert problems(caplog) == []


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("0") == 0
    assert retry_after_seconds(" 2.5 ") == 2.5
    assert retry_after_seconds("3600") == MAX_RETRY_AFTER_SECONDS
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") is None  # HTTP-date: our own backoff
    assert retry_after_seconds("-1") is None
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds(None) is None


async def test_429_every_time_raises_after_the_attempts(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture) -> None:
    fake.script("update", rate_limited(0), rate_limited(0), rate_limited(0))
    with pytest.raises(TwilioApiError) as caught:
        await make_client(fake).update_call(CALL_SID, status="completed")
    assert (caught.value.status, caught.value.code) == (429, 20429)
    assert len(fake.requests) == 3
    [line] = problems(caplog)
    assert "3 attempts" in line.getMessage()


async def test_update_hang_times_out_each_attempt_then_raises(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture) -> None:
    fake.script("update", HANG, HANG, HANG)
    client = make_client(fake, timeout=0.2)
    with pytest.raises(TwilioApiError) as caught:
        await client.update_call(CALL_SID, twiml=TWIML)
    assert caught.value.status is None and caught.value.code is None
    assert "no answer within 0.2 s" in str(caught.value)
    requests = await fake.wait_for_requests(3)
    assert [r.outcome for r in requests] == [HANG, HANG, HANG]
    [line] = problems(caplog)
    assert f"update call {CALL_SID}" in line.getMessage()


async def test_create_hang_is_not_retried(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture) -> None:
    fake.script("create", HANG, NORMAL)
    with pytest.raises(TwilioApiError) as caught:
        await create(make_client(fake, timeout=0.2))
    assert "may have created the call" in str(caught.value)
    await fake.wait_for_requests(1)
    # The client has returned, so no retry can still be on its way.
    assert len(fake.requests) == 1 and fake.pending_steps("create") == 1
    [line] = problems(caplog)
    assert "create call" in line.getMessage()


@pytest.mark.parametrize("fault", [DROP, RESET])
async def test_create_dropped_after_sending_is_not_retried(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    fake.script("create", fault, NORMAL)
    with pytest.raises(TwilioApiError) as caught:
        await create(make_client(fake))
    assert caught.value.status is None
    assert [r.outcome for r in fake.requests] == [fault]
    assert len(problems(caplog)) == 1


@pytest.mark.parametrize("fault", [DROP, RESET])
async def test_update_dropped_is_retried(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, fault: str) -> None:
    fake.script(CALL_SID, fault, NORMAL)
    updated = await make_client(fake).update_call(CALL_SID, status="completed")
    assert updated is not None and updated["status"] == "completed"
    assert [r.outcome for r in fake.requests] == [fault, 200]
    assert problems(caplog) == []


async def test_create_retries_a_connection_refused_before_sending(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing was sent, so nothing can have been created: retrying is safe even for a create."""
    real = http_client.open_stream
    dialled = 0

    async def refuse_once(host: str, port: int, tls: ssl.SSLContext | None) -> Any:
        nonlocal dialled
        dialled += 1
        if dialled == 1:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real(host, port, tls)

    monkeypatch.setattr(http_client, "open_stream", refuse_once)
    created = await create(make_client(fake))
    assert created["sid"] and dialled == 2 and len(fake.requests) == 1
    assert problems(caplog) == []


async def test_unreachable_twilio_raises_after_every_attempt(caplog: pytest.LogCaptureFixture) -> None:
    # A port that was just free: connecting to it is refused at once.
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    client = TwilioRestClient(ACCOUNT_SID, AUTH_TOKEN, f"http://127.0.0.1:{port}", timeout=0.5, backoff=0.01)
    with pytest.raises(TwilioApiError) as caught:
        await create(client)
    assert caught.value.status is None and "connection failed" in caught.value.message
    [line] = problems(caplog)
    assert "3 attempts" in line.getMessage()
    retries = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.DEBUG and "retrying" in r.getMessage()]
    assert len(retries) == 2


@pytest.mark.parametrize("ended", ["unknown-404", "ended-21220", "scripted-404"])
async def test_update_of_a_call_that_is_over_returns_none(
    caplog: pytest.LogCaptureFixture, ended: str
) -> None:
    async with FakeTwilioRest(unknown_calls_404=ended == "unknown-404") as fake:
        if ended == "ended-21220":
            fake.end_call(CALL_SID)
        if ended == "scripted-404":
            fake.script(CALL_SID, 404)
        result = await make_client(fake).update_call(CALL_SID, twiml=TWIML)
        assert result is None
        [request] = fake.requests
        assert request.outcome == (400 if ended == "ended-21220" else 404)
    assert problems(caplog) == []


async def test_twilio_error_is_raised_with_its_code_and_logged_once(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture
) -> None:
    message = "The source phone number provided, +15559870000, is not yet verified for your account."
    fake.script("create", twilio_error(400, 21210, message))
    with pytest.raises(TwilioApiError) as caught:
        await create(make_client(fake))
    error = caught.value
    assert (error.status, error.code, error.message) == (400, 21210, message)
    assert str(error) == f"Twilio create call failed (HTTP 400, Twilio error 21210): {message}"
    assert len(fake.requests) == 1  # a 400 is final
    [line] = problems(caplog)
    text = line.getMessage()
    assert "400" in text and "21210" in text and message in text and "create call" in text
    assert "/Accounts/AC…/Calls.json" in text
    assert_no_secrets(text + str(error))


async def test_twilios_message_is_escaped_and_the_account_sid_redacted(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture
) -> None:
    # Twilio's 404 quotes the request path, Account SID and all; a hostile body could carry newlines.
    fake.script("create", twilio_error(404, 20404, f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json\nFAKE LOG LINE"))
    with pytest.raises(TwilioApiError) as caught:
        await create(make_client(fake))
    assert ACCOUNT_SID not in caught.value.message
    assert "\n" not in str(caught.value)
    [line] = problems(caplog)
    assert "\n" not in line.getMessage() and "\\nFAKE LOG LINE" in line.getMessage()


async def test_wrong_auth_token_is_refused_without_retrying(caplog: pytest.LogCaptureFixture) -> None:
    async with FakeTwilioRest(auth_token="the-right-token-0123456789abcdef") as fake:
        client = TwilioRestClient(fake.account_sid, AUTH_TOKEN, fake.url, timeout=0.5, backoff=0.01)
        with pytest.raises(TwilioApiError) as caught:
            await create(client)
        assert (caught.value.status, caught.value.code) == (401, 20003)
        [request] = fake.requests
        assert request.auth == (ACCOUNT_SID, AUTH_TOKEN)
    assert len(problems(caplog)) == 1


@pytest.mark.parametrize(
    "reply",
    [
        Reply(201, b"<html>not json</html>"),
        Reply(201, b"[1, 2]"),
        Reply(201, b"[" * 100_000),
        Reply(201, b"x" * (2 * 1024 * 1024)),
    ],
    ids=["html", "not-an-object", "deeply-nested", "over-1MB"],
)
async def test_unusable_answers_raise(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, reply: Reply) -> None:
    fake.script("create", reply, NORMAL)
    with pytest.raises(TwilioApiError) as caught:
        await create(make_client(fake))
    assert caught.value.status == 201
    assert len(fake.requests) == 1
    assert len(problems(caplog)) == 1


async def test_api_url_path_prefix_is_kept(fake: FakeTwilioRest) -> None:
    """A proxy in front of Twilio may live under a path; the client keeps it in front of Twilio's."""
    client = TwilioRestClient(ACCOUNT_SID, AUTH_TOKEN, f"{fake.url}/proxy/", timeout=0.5)
    fake.script(f"/proxy/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json", Reply(200, {"sid": CALL_SID}))
    assert await client.update_call(CALL_SID, status="completed") == {"sid": CALL_SID}
    [request] = fake.requests
    assert request.path == f"/proxy/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_SID}.json"


async def test_concurrent_requests_share_one_client(fake: FakeTwilioRest) -> None:
    client = make_client(fake)
    sids = [f"CA{n:032x}" for n in range(5)]
    results = await asyncio.gather(*(client.update_call(sid, status="completed") for sid in sids))
    assert sorted(r["sid"] for r in results if r) == sids
    await client.close()
    await client.close()  # idempotent


async def start_recording(client: TwilioRestClient) -> dict[str, Any] | None:
    return await client.start_recording(CALL_SID, status_callback=RECORDING_CALLBACK)


@pytest.mark.parametrize("status, retried", [(503, True), (429, True), (500, False), (502, False)])
async def test_start_recording_retries_only_statuses_that_mean_nothing_was_done(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, status: int, retried: bool
) -> None:
    fake.script("start-recording", status, NORMAL)
    if retried:
        started = await start_recording(make_client(fake))
        assert started is not None and list(fake.recordings) == [started["sid"]]
        assert [r.outcome for r in fake.requests] == [status, 201]
        assert problems(caplog) == []
    else:
        # A 500 may come after the recording started: another attempt would make a second one.
        with pytest.raises(TwilioApiError) as caught:
            await start_recording(make_client(fake))
        assert caught.value.status == status and caught.value.may_have_acted
        assert len(fake.requests) == 1 and fake.pending_steps("start-recording") == 1
        assert len(problems(caplog)) == 1


@pytest.mark.parametrize("fault", [HANG, DROP, RESET])
async def test_start_recording_that_may_have_reached_twilio_is_not_retried(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    fake.script("start-recording", fault, NORMAL)
    with pytest.raises(TwilioApiError) as caught:
        await start_recording(make_client(fake, timeout=0.2))
    assert caught.value.may_have_acted
    if fault == HANG:
        assert "may have started the recording" in str(caught.value)
    await fake.wait_for_requests(1)
    assert [r.outcome for r in fake.requests] == [fault] and fake.pending_steps("start-recording") == 1
    [line] = problems(caplog)
    assert f"start recording call {CALL_SID}" in line.getMessage()


@pytest.mark.parametrize("fault", [500, 503, DROP, HANG])
async def test_update_recording_is_retried(fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, fault: int | str) -> None:
    fake.add_call(CALL_SID)
    client = make_client(fake, timeout=0.2)
    started = await start_recording(client)
    assert started is not None
    fake.script("update-recording", fault, NORMAL)
    updated = await client.update_recording(CALL_SID, started["sid"], status="paused", pause_behavior="skip")
    assert updated is not None and updated["status"] == "paused"
    assert [r.outcome for r in fake.requests_for("update-recording")] == [fault, 200]
    assert problems(caplog) == []


@pytest.mark.parametrize("ended", ["unknown-404", "ended-21220", "scripted-404"])
@pytest.mark.parametrize("operation", ["start-recording", "update-recording"])
async def test_recording_a_call_that_is_over_returns_none(
    caplog: pytest.LogCaptureFixture, ended: str, operation: str
) -> None:
    async with FakeTwilioRest(unknown_calls_404=ended == "unknown-404") as fake:
        if ended == "ended-21220":
            fake.end_call(CALL_SID)
        if ended == "scripted-404":
            fake.script(operation, 404)
        client = make_client(fake)
        if operation == "start-recording":
            result = await start_recording(client)
        else:
            result = await client.update_recording(CALL_SID, status="in-progress")
        assert result is None
        [request] = fake.requests
        assert request.operation == operation
        assert request.outcome == (400 if ended == "ended-21220" else 404)
    assert problems(caplog) == []


async def test_updating_a_recording_that_has_stopped_returns_none(fake: FakeTwilioRest) -> None:
    client = make_client(fake)
    started = await start_recording(client)
    assert started is not None
    assert await client.update_recording(CALL_SID, started["sid"], status="stopped") is not None
    assert await client.update_recording(CALL_SID, started["sid"], status="in-progress") is None  # 404
    assert await client.update_recording(CALL_SID, status="paused") is None  # no current recording: 404


@pytest.mark.parametrize(
    "reply",
    [Reply(201, {"status": "in-progress"}), Reply(201, {"sid": "RE123"}), Reply(201, {"sid": "RE" + "0" * 32 + "/../x"})],
    ids=["no-sid", "short-sid", "sid-with-a-path"],
)
async def test_a_started_recording_without_a_recording_sid_raises(
    fake: FakeTwilioRest, caplog: pytest.LogCaptureFixture, reply: Reply
) -> None:
    """The SID goes into the paths of later updates: only RE + 32 hex digits is taken."""
    fake.script("start-recording", reply, NORMAL)
    with pytest.raises(TwilioApiError) as caught:
        await start_recording(make_client(fake))
    assert caught.value.may_have_acted and "Recording SID" in str(caught.value)
    assert len(fake.requests) == 1
    assert len(problems(caplog)) == 1


# -- 3. bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call_sid",
    [
        "",
        "CA123",
        "CA" + "g" * 32,
        "ca" + "0" * 32,
        "CA" + "0" * 32 + "/../../Calls",
        "../Calls/CA" + "0" * 32,
        "CA" + "0" * 33,
        "CA" + "0" * 32 + "\n",
    ],
)
async def test_invalid_call_sid_is_refused_before_any_request(fake: FakeTwilioRest, call_sid: str) -> None:
    client = make_client(fake)
    with pytest.raises(ValueError):
        await client.update_call(call_sid, status="completed")
    with pytest.raises(ValueError):
        await client.start_recording(call_sid, status_callback=RECORDING_CALLBACK)
    with pytest.raises(ValueError):
        await client.update_recording(call_sid, status="paused")
    assert fake.requests == []


@pytest.mark.parametrize(
    "recording_sid",
    ["", "RE123", "RE" + "g" * 32, "re" + "0" * 32, "RE" + "0" * 32 + "/../../Calls", "../Recordings/RE" + "0" * 32,
     "Twilio.CURRENT/..", "twilio.current", "CA" + "0" * 32],
)
async def test_invalid_recording_sid_is_refused_before_any_request(fake: FakeTwilioRest, recording_sid: str) -> None:
    with pytest.raises(ValueError):
        await make_client(fake).update_recording(CALL_SID, recording_sid, status="paused")
    assert fake.requests == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channels": "stereo"},
        {"status_callback_events": ["completed", "failed"]},
        {"status_callback": ""},
    ],
    ids=["channels", "event", "no-callback"],
)
async def test_start_recording_with_bad_arguments_is_refused(fake: FakeTwilioRest, kwargs: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"status_callback": RECORDING_CALLBACK, **kwargs}
    with pytest.raises(ValueError):
        await make_client(fake).start_recording(CALL_SID, **arguments)
    assert fake.requests == []


async def test_a_bare_string_of_recording_events_is_refused(fake: FakeTwilioRest) -> None:
    with pytest.raises(TypeError):
        await make_client(fake).start_recording(CALL_SID, status_callback=RECORDING_CALLBACK, status_callback_events="completed")
    assert fake.requests == []


@pytest.mark.parametrize(
    "kwargs", [{"status": "completed"}, {"status": "pause"}, {"status": "paused", "pause_behavior": "mute"}]
)
async def test_update_recording_with_bad_arguments_is_refused(fake: FakeTwilioRest, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await make_client(fake).update_recording(CALL_SID, **kwargs)
    assert fake.requests == []


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"twiml": TWIML, "url": "https://x.example/t"}, {"twiml": "<Response>" + " " * 4000 + "</Response>"}],
    ids=["no-twiml-or-url", "both", "twiml-too-long"],
)
async def test_create_without_one_source_of_twiml_is_refused(fake: FakeTwilioRest, kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        await make_client(fake).create_call("+15551230000", "+15559870000", **kwargs)
    assert fake.requests == []


async def test_a_bare_string_of_events_is_refused(fake: FakeTwilioRest) -> None:
    with pytest.raises(TypeError):
        await make_client(fake).create_call(
            "+15551230000", "+15559870000", twiml=TWIML, status_callback_event="completed"  # type: ignore[arg-type]
        )
    assert fake.requests == []


@pytest.mark.parametrize(
    "account_sid, api_url",
    [
        ("AC123", "https://api.twilio.com"),
        (ACCOUNT_SID + "/x", "https://api.twilio.com"),
        (ACCOUNT_SID, "ftp://api.twilio.com"),
        (ACCOUNT_SID, "https://user:pw@api.twilio.com"),
        (ACCOUNT_SID, "https://api.twilio.com/a b"),
        (ACCOUNT_SID, "https://api.twilio.com?x=1"),
    ],
)
def test_bad_settings_are_refused(account_sid: str, api_url: str) -> None:
    with pytest.raises(ValueError):
        TwilioRestClient(account_sid, AUTH_TOKEN, api_url)


def test_repr_hides_the_credentials() -> None:
    client = TwilioRestClient(ACCOUNT_SID, AUTH_TOKEN)
    assert_no_secrets(repr(client) + str(vars(client).get("api_url")))


# -- the fake itself ----------------------------------------------------------------------------


async def test_fake_keeps_call_state_and_waits_for_requests(fake: FakeTwilioRest) -> None:
    client = make_client(fake)
    waiter = asyncio.create_task(fake.wait_for_requests(2, operation="update"))
    created = await create(client)
    sid = created["sid"]
    assert fake.calls[sid]["to"] == "+15551230000"
    assert (await client.update_call(sid, status="completed")) is not None
    assert (await client.update_call(sid, twiml=TWIML)) is None  # ended: 21220
    first, second = await waiter
    assert (first.outcome, second.outcome) == (200, 400)
    assert fake.requests_for("create")[0].field("Twiml") == TWIML
    with pytest.raises(AssertionError):
        await fake.wait_for_requests(9, timeout=0.05)
