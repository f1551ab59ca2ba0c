"""The end-of-call webhook (bridge/webhook.py): real calls through the real server, and the sender on
its own, against a fake receiver on 127.0.0.1 that checks every request's signature.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import re
import shutil
import ssl
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import pytest
from conftest import ROOT, BridgeFactory, read_record, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually, shows_digits

import main
from bridge.settings import ConfigError, load_settings
from bridge.webhook import (
    MAX_TRANSCRIPT_TURNS,
    CallDigest,
    WebhookSender,
    call_ended_payload,
    public_target,
    sign,
    webhook_sender,
)

SECRET = "test-webhook-secret-0123456789"


@dataclass
class Received:
    """One request the receiver read, and what it answered."""

    target: str
    headers: dict[str, str]
    body: bytes
    answer: str

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def signature_ok(self, secret: str = SECRET) -> bool:
        timestamp = self.headers["x-bridge-timestamp"]
        mac = hmac.new(secret.encode(), timestamp.encode() + b"." + self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers["x-bridge-signature"], f"sha256={mac}")


class FakeReceiver:
    """A webhook receiver: answers each request as ``script`` says (then as ``default``).

    Answers: a status code as text ("200", "500", "400", ...), "hang" (read the request, never
    answer, until the client gives up), "close" (close the connection without answering),
    or a status with "-huge" (a 2 MB body) or "-trickle" (a byte of body every 20 ms, for as long
    as the client listens): "200-huge", "400-trickle".
    """

    def __init__(self) -> None:
        self.script: deque[str] = deque()
        self.default = "200"
        self.requests: list[Received] = []
        self.hanging = 0  # requests being held unanswered right now
        self.trickling = 0  # answers whose body is still being trickled
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()  # connections being handled

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/hooks/calls?token=query-secret"

    @property
    def delivered(self) -> list[Received]:
        return [request for request in self.requests if request.answer.startswith("2")]

    async def __aenter__(self) -> FakeReceiver:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._open:  # a test that failed may leave one hanging or trickling
            writer.transport.abort()
        await eventually(lambda: not self._open, what="the receiver's connections to end")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            await self._answer(reader, writer)
        finally:
            self._open.discard(writer)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    if not data:
                        return
                    connection.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            answer = self.script.popleft() if self.script else self.default
            headers = {name.decode().lower(): value.decode() for name, value in request.headers}
            self.requests.append(Received(request.target.decode(), headers, bytes(body), answer))
            if answer == "hang":
                self.hanging += 1
                try:
                    await reader.read()  # until the client gives up and closes
                finally:
                    self.hanging -= 1
                return
            if answer == "close":
                return
            status, _, body_kind = answer.partition("-")
            if body_kind:
                await self._long_answer(connection, writer, int(status), 2 * 1024 * 1024 if body_kind == "huge" else None)
                return
            text = b'{"error": "nope"}' if answer.startswith("4") else b"ok"
            reply = connection.send(h11.Response(status_code=int(answer), headers=[("Content-Length", str(len(text)))]))
            writer.write((reply or b"") + (connection.send(h11.Data(data=text)) or b"") + (connection.send(h11.EndOfMessage()) or b""))
            await writer.drain()
        except (ConnectionError, h11.RemoteProtocolError):
            return
        finally:
            writer.close()


    async def _long_answer(self, connection: h11.Connection, writer: asyncio.StreamWriter, status: int, size: int | None) -> None:
        """``status`` with a body of ``size`` bytes at once, or (None) one that trickles until the client leaves."""
        if size is not None:
            body = b"refused " + b"x" * size
            writer.write(connection.send(h11.Response(status_code=status, headers=[("Content-Length", str(len(body)))])) or b"")
            writer.write(connection.send(h11.Data(data=body)) or b"")
            await writer.drain()
            return
        writer.write(connection.send(h11.Response(status_code=status, headers=[("Content-Length", str(10**9))])) or b"")
        self.trickling += 1
        try:
            while not writer.is_closing():
                writer.write(connection.send(h11.Data(data=b"x")) or b"")
                await writer.drain()
                await asyncio.sleep(0.02)
        finally:
            self.trickling -= 1


@pytest.fixture
async def receiver() -> Any:
    async with FakeReceiver() as fake:
        yield fake


def webhook_overrides(receiver: FakeReceiver, **more: Any) -> dict[str, Any]:
    """Settings for a bridge with the webhook on, with timings short enough for tests."""
    settings: dict[str, Any] = {
        "call_webhook_url": receiver.url,
        "call_webhook_secret": SECRET,
        "call_webhook_retry_seconds": 3.0,
        "webhook_attempt_timeout_seconds": 1.0,
        "webhook_backoff_seconds": 0.05,
        "webhook_drain_timeout_seconds": 3.0,
    }
    return {**settings, **more}


def sender_for(receiver: FakeReceiver, **options: Any) -> WebhookSender:
    options = {"retry_seconds": 3.0, "attempt_timeout": 1.0, "backoff": 0.05, **options}
    return WebhookSender(receiver.url, SECRET, **options)


def webhook_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.webhook" and r.levelno == level]


async def short_call(server: Any, fake_agent: FakeAgent, index: int = 0) -> FakeTwilioCaller:
    """A call with one turn that the caller ends."""
    async with FakeTwilioCaller(twilio_url(server)) as caller:
        await caller.start()
        session = await fake_agent.ready_session(index)
        await session.send_json({"type": "ConversationText", "role": "user", "content": f"Hello number {index}"})
        await eventually(lambda: server.calls and next(iter(server.calls)).call.stats.turns == 1, what="the turn")
        await caller.stop()
    await eventually(lambda: not server.calls, what="the call to end")
    return caller


async def ask_for_function(session: FakeAgentSession, call_id: str, name: str, arguments: str) -> None:
    """The agent asks for one client-side function; returns once the bridge has answered it."""
    await session.send_json({"type": "FunctionCallRequest", "functions": [
        {"id": call_id, "name": name, "arguments": arguments, "client_side": True}]})
    await eventually(lambda: session.of_type("FunctionCallResponse"), what=f"the answer to {name}")


# ----------------------------------------------------------------------------- real calls

async def test_a_call_delivers_one_signed_post_with_its_summary(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, **webhook_overrides(receiver), dtmf_timeout_seconds=0.3) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start({"From": "+15551234567"})
            session = await fake_agent.ready_session()
            await session.send_json({"type": "ConversationText", "role": "user", "content": "Is ibuprofen in stock?"})
            await ask_for_function(session, "f1", "get_drug_info", '{"drug_name": "ibuprofen"}')
            await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.4})
            await session.send_json({"type": "ConversationText", "role": "assistant", "content": "Yes, it is."})
            await session.send_json({"type": "LatencyReport", "stt_latency": 0.12, "total_latency": 0.8})
            for digit in "4321#":
                await caller.press(digit)
            await eventually(lambda: session.of_type("InjectUserMessage"), what="the keypad digits")
            await session.send_json({"type": "ConversationText", "role": "user", "content": "The caller pressed 4 3 2 1"})
            await eventually(lambda: next(iter(server.calls)).call.stats.turns == 3, what="the third turn")
            await caller.stop()
        await eventually(lambda: not server.calls, what="the call to end")
        await eventually(lambda: receiver.delivered, what="the webhook")
    [request] = receiver.requests  # exactly one POST
    assert request.target == "/hooks/calls?token=query-secret"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["user-agent"].startswith("twilio-deepgram-bridge")
    assert abs(int(request.headers["x-bridge-timestamp"]) - time.time()) < 30
    assert request.signature_ok()
    assert not request.signature_ok("another-secret-of-some-length")
    payload = request.json
    assert request.body == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()  # compact UTF-8
    summary = read_record(tmp_path / "calls")[-1]
    assert payload["event"] == "call.ended" and re.fullmatch(r"[0-9a-f]{32}", payload["id"])
    for name in ("call_sid", "stream_sid", "custom_parameters", "started_at", "ended_at", "duration_seconds",
                 "ended_by", "agent_latency_p50", "agent_latency_p95", "agent_request_ids"):
        assert payload[name] == summary[name], name
    assert payload["call_sid"] == caller.call_sid and payload["stream_sid"] == caller.stream_sid
    assert payload["custom_parameters"] == {"From": "+15551234567"}
    assert payload["agent"] == "default"
    assert payload["ended_by"] == "caller hung up"
    assert payload["transcript"] == [
        {"role": "user", "content": "Is ibuprofen in stock?"},
        {"role": "assistant", "content": "Yes, it is."},
        {"role": "user", "content": "(keypad digits)"},  # redacted as in the record
    ]
    assert not shows_digits(request.body, "4321")
    [function] = payload["function_calls"]
    assert function["name"] == "get_drug_info" and json.loads(function["arguments"]) == {"drug_name": "ibuprofen"}
    assert function["error"] is None and function["result"]["name"].lower() == "ibuprofen"
    assert function["duration_seconds"] >= 0 and function["withdrawn"] is False
    assert payload["latency_reports"] == [
        {"stt_latency": 0.12, "ttt_token_latency": None, "ttt_text_latency": None, "ttt_tool_latency": None,
         "ttt_thinking_latency": None, "tts_latency": None, "total_latency": 0.8}
    ]
    assert payload["agent_latency_p50"] == 0.4
    counts = payload["counts"]
    assert counts["turns"] == 3 and counts["function_calls"] == 1 and counts["latency_reports"] == 1
    assert counts["keypad_entries"] == 1 and counts["barge_ins"] == 0 and counts["bad_input"] == {}
    assert payload["truncated"] is False
    assert payload["functions_finished_late"] == []
    assert payload["omitted"] == {"transcript": 0, "function_calls": 0, "functions_finished_late": 0, "latency_reports": 0}


async def test_a_function_that_returned_after_its_timeout_is_in_the_payload(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver
) -> None:
    """The caller heard "took too long", but the order may have gone through: the business must see it."""
    from test_functions import TEST_FUNCTIONS

    overrides = webhook_overrides(receiver, function_map=TEST_FUNCTIONS, function_timeout_seconds=0.2)
    async with make_bridge(fake_agent, **overrides) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            await ask_for_function(session, "late", "slow", '{"seconds": 0.5}')  # answered at its timeout
            [live] = server.calls
            await eventually(lambda: live.digest.functions_finished_late, 3, "the late result while the call runs")
            await caller.stop()
        await eventually(lambda: receiver.delivered, what="the webhook")
    payload = receiver.requests[0].json
    [abandoned] = payload["function_calls"]
    assert abandoned["name"] == "slow" and abandoned["error"] == "slow took too long to answer."
    [late] = payload["functions_finished_late"]
    assert late["id"] == "late" and late["name"] == "slow" and late["result"] == {"slept": 0.5}
    assert late["error"] is None and late["duration_seconds"] >= 0.5
    assert payload["omitted"]["functions_finished_late"] == 0


async def test_the_docs_verify_snippet_accepts_a_real_request_and_refuses_tampering(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver
) -> None:
    async with make_bridge(fake_agent, **webhook_overrides(receiver)) as server:
        await short_call(server, fake_agent)
        await eventually(lambda: receiver.delivered, what="the webhook")
    [request] = receiver.requests
    docs = (ROOT / "docs" / "webhooks.md").read_text(encoding="utf-8")
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", docs, flags=re.S) if "def verify" in block]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)  # noqa: S102 - our own documentation
    verify = namespace["verify"]
    timestamp, signature = request.headers["x-bridge-timestamp"], request.headers["x-bridge-signature"]
    assert verify(SECRET.encode(), timestamp, signature, request.body)
    assert not verify(SECRET.encode(), timestamp, signature, request.body.replace(b"caller", b"callee"))
    assert not verify(SECRET.encode(), str(int(timestamp) - 1), signature, request.body)
    assert not verify(SECRET.encode(), str(int(timestamp) - 3600), sign(SECRET.encode(), str(int(timestamp) - 3600), request.body), request.body)


async def test_a_receiver_down_for_many_calls_logs_one_warning_and_never_holds_up_a_call(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    receiver.default = "hang"
    overrides = webhook_overrides(receiver, webhook_attempt_timeout_seconds=0.3, call_webhook_retry_seconds=0.3)
    async with make_bridge(fake_agent, **overrides) as server:
        sender = server.services.webhook
        assert sender is not None
        for index in range(4):
            started = time.monotonic()
            await short_call(server, fake_agent, index)
            assert time.monotonic() - started < 3.0
        # Every call has ended and has its record while the webhook has delivered nothing yet.
        assert len(list((tmp_path / "calls").glob("*.jsonl"))) == 4
        assert not receiver.delivered and sender.pending >= 1
        await eventually(lambda: receiver.hanging == 1, what="the receiver to hold a request")
        await eventually(lambda: sender.failed >= 2, what="two deliveries to be given up")
        receiver.default = "200"
        await short_call(server, fake_agent, 4)  # one more call, sure to be delivered
        await eventually(lambda: sender.pending == 0, timeout=10, what="the queue to drain")
    assert len(webhook_lines(caplog, logging.WARNING)) == 1, webhook_lines(caplog, logging.WARNING)
    [warning] = webhook_lines(caplog, logging.WARNING)
    assert "are failing (no answer within 0.3 s)" in warning
    assert "query-secret" not in caplog.text and SECRET not in caplog.text
    [recovered] = [line for line in webhook_lines(caplog, logging.INFO) if "reachable again" in line]
    assert f"{sender.failed} deliveries failed meanwhile" in recovered
    assert sender.failed >= 2 and sender.delivered == 5 - sender.failed
    delivered_sids = {request.json["call_sid"] for request in receiver.delivered}
    assert len(delivered_sids) == sender.delivered


async def test_without_records_the_webhook_still_gets_the_call(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, **webhook_overrides(receiver), record_calls=False) as server:
        caller = await short_call(server, fake_agent)
        await eventually(lambda: receiver.delivered, what="the webhook")
    [request] = receiver.requests
    assert request.json["call_sid"] == caller.call_sid
    assert request.json["transcript"] == [{"role": "user", "content": "Hello number 0"}]
    assert not (tmp_path / "calls").exists() or not list((tmp_path / "calls").iterdir())


async def test_a_call_ended_by_shutdown_is_delivered_before_the_server_stops(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver
) -> None:
    async with make_bridge(fake_agent, **webhook_overrides(receiver)) as server:
        caller = FakeTwilioCaller(twilio_url(server))
        await caller.__aenter__()
        await caller.start()
        await fake_agent.ready_session()
        # Leaving the block shuts the server down with the call still live.
    await caller.__aexit__(None, None, None)
    [request] = receiver.requests
    assert request.json["call_sid"] == caller.call_sid and request.json["ended_by"] == "server shutting down"


async def test_shutdown_waits_for_the_webhook_only_until_its_deadline(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.default = "hang"
    overrides = webhook_overrides(receiver, webhook_attempt_timeout_seconds=30.0, webhook_drain_timeout_seconds=0.3)
    async with make_bridge(fake_agent, **overrides) as server:
        await short_call(server, fake_agent)
        await eventually(lambda: receiver.hanging == 1, what="the receiver to hold the request")
        started = time.monotonic()
    assert time.monotonic() - started < 5.0  # not the 30 s attempt
    assert any(
        "1 webhook event was not delivered to http://127.0.0.1:" in line and "/hooks/calls before shutdown" in line
        for line in webhook_lines(caplog, logging.WARNING)
    )


async def test_a_connection_that_never_starts_sends_no_webhook(
    make_bridge: BridgeFactory, receiver: FakeReceiver, fake_agent: FakeAgent
) -> None:
    async with make_bridge(fake_agent, **webhook_overrides(receiver), start_timeout_seconds=0.2) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await asyncio.wait_for(caller.closed.wait(), 3)
        await eventually(lambda: not server.calls)
        sender = server.services.webhook
        assert sender is not None and sender.pending == 0
    assert receiver.requests == []


# ------------------------------------------------------------------------------- the sender

async def test_500_twice_then_200_is_delivered_on_the_third_attempt(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.script.extend(["500", "500"])
    sender = sender_for(receiver)
    sender.start()
    assert sender.submit(b'{"n":1}')
    await eventually(lambda: sender.delivered == 1, what="the delivery")
    await sender.close(1.0)
    assert [request.answer for request in receiver.requests] == ["500", "500", "200"]
    assert all(request.body == b'{"n":1}' and request.signature_ok() for request in receiver.requests)
    assert webhook_lines(caplog, logging.WARNING) == [
        f"webhook deliveries to {public_target(receiver.url)} are failing (HTTP 500): each is retried for up to 3 s; "
        "nothing more is logged until one gets through (call records on disk are unaffected)"
    ]
    [recovered] = webhook_lines(caplog, logging.INFO)
    assert "reachable again" in recovered and "0 deliveries failed meanwhile" in recovered


@pytest.mark.parametrize("first", ["close", "503", "408", "429"])
async def test_what_may_succeed_later_is_retried(receiver: FakeReceiver, first: str) -> None:
    receiver.script.append(first)
    sender = sender_for(receiver)
    sender.start()
    sender.submit(b"{}")
    await eventually(lambda: sender.delivered == 1, what="the delivery")
    await sender.close(1.0)
    assert [request.answer for request in receiver.requests] == [first, "200"]


async def test_a_4xx_is_not_retried_and_each_status_is_logged_once(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.script.extend(["400", "400", "422", "400"])
    sender = sender_for(receiver)
    sender.start()
    for n in range(5):
        sender.submit(json.dumps({"n": n}).encode())
    await eventually(lambda: sender.delivered == 1, what="the fifth delivery")
    await sender.close(1.0)
    assert [request.answer for request in receiver.requests] == ["400", "400", "422", "400", "200"]
    assert sender.failed == 4
    warnings = webhook_lines(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert "refused a webhook event with HTTP 400 ({\"error\": \"nope\"}); not retried" in warnings[0]
    assert "HTTP 422" in warnings[1]
    [recovered] = webhook_lines(caplog, logging.INFO)
    assert "4 deliveries failed meanwhile" in recovered


@pytest.mark.parametrize("answer", ["200-huge", "200-trickle"])
async def test_a_2xx_with_a_huge_or_endless_body_is_delivered_at_once(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture, answer: str
) -> None:
    """Any 2xx is delivered, whatever its body: only the status is waited for."""
    caplog.set_level(logging.DEBUG)
    receiver.default = answer
    sender = sender_for(receiver, attempt_timeout=5.0)
    sender.start()
    started = time.monotonic()
    sender.submit(b'{"n":1}')
    await eventually(lambda: sender.delivered == 1, what="the delivery")
    assert time.monotonic() - started < 1.0  # not the 5 s attempt timeout
    await sender.close(1.0)
    assert sender.failed == 0 and len(receiver.requests) == 1
    assert webhook_lines(caplog, logging.WARNING) == [] and webhook_lines(caplog, logging.INFO) == []
    await eventually(lambda: receiver.trickling == 0, what="the receiver to see the connection closed")


async def test_a_refusal_with_a_huge_body_is_a_refusal_logged_with_the_start_of_its_body(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.script.append("400-huge")
    sender = sender_for(receiver)
    sender.start()
    sender.submit(b"{}")
    await eventually(lambda: sender.failed == 1, what="the refusal")
    await sender.close(1.0)
    assert len(receiver.requests) == 1  # a refusal: not retried
    [warning] = webhook_lines(caplog, logging.WARNING)
    assert "refused a webhook event with HTTP 400 (refused xxxxxxxx" in warning and len(warning) < 600


async def seconds_to_give_up(sender: WebhookSender) -> float:
    """Send one body and wait until the sender gives up on it; returns how long that took."""
    sender.start()
    started = time.monotonic()
    sender.submit(b"{}")
    await eventually(lambda: sender.failed == 1, what="the delivery to be given up")
    elapsed = time.monotonic() - started
    await sender.close(1.0)
    return elapsed


async def test_a_hanging_receiver_times_out_each_attempt(receiver: FakeReceiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.default = "hang"
    assert 0.2 <= await seconds_to_give_up(sender_for(receiver, attempt_timeout=0.2, retry_seconds=0.0)) < 3.0
    assert len(receiver.requests) == 1  # RETRY_SECONDS 0: one attempt
    [warning] = webhook_lines(caplog, logging.WARNING)
    assert "(no answer within 0.2 s)" in warning


async def test_retries_stop_when_the_retry_time_is_up(receiver: FakeReceiver) -> None:
    receiver.default = "500"
    assert await seconds_to_give_up(sender_for(receiver, retry_seconds=0.5, backoff=0.1)) < 3.0
    # Waits of about 0.1, 0.2, 0.4 s: the third would start after the 0.5 s.
    assert 2 <= len(receiver.requests) <= 4


async def test_an_https_receiver_with_an_untrusted_certificate_is_refused_without_retries(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """https is TLS with the system's CAs: a self-signed receiver gets no request, and no retry."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30,
    )
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    connections = 0

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(count, "127.0.0.1", 0, ssl=tls)
    try:
        port = server.sockets[0].getsockname()[1]
        sender = WebhookSender(f"https://127.0.0.1:{port}/hooks", SECRET, retry_seconds=3.0, backoff=0.05)
        assert await seconds_to_give_up(sender) < 3.0
    finally:
        server.close()
    assert connections == 0  # the handshake failed: nothing reached the receiver
    [warning] = webhook_lines(caplog, logging.WARNING)
    assert "the webhook receiver's TLS certificate was refused" in warning


async def test_a_full_queue_drops_and_counts_with_one_warning_then_one_line_when_there_is_room(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    receiver.script.append("hang")
    sender = sender_for(receiver, attempt_timeout=0.3, retry_seconds=0.0, queue_max=2)
    sender.start()
    accepted = [sender.submit(json.dumps({"n": n}).encode()) for n in range(6)]
    assert accepted == [True, True, False, False, False, False]
    assert sender.dropped == 4
    await eventually(lambda: sender.pending == 0, what="the queue to drain")
    await sender.close(1.0)
    assert [request.json["n"] for request in receiver.requests] == [0, 1]
    full = [line for line in webhook_lines(caplog, logging.WARNING) if "queue is full" in line]
    assert len(full) == 1 and "(2 deliveries" in full[0]
    assert any("room again; 4 webhook events were dropped" in line for line in webhook_lines(caplog, logging.INFO))


async def test_close_sends_what_is_queued_and_counts_what_it_could_not(
    receiver: FakeReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    sender = sender_for(receiver)
    sender.start()
    for n in range(3):
        sender.submit(json.dumps({"n": n}).encode())
    await sender.close(2.0)
    assert [request.json["n"] for request in receiver.requests] == [0, 1, 2]
    assert not webhook_lines(caplog, logging.WARNING)

    receiver.default = "hang"
    sender = sender_for(receiver, attempt_timeout=30.0)
    sender.start()
    for n in range(3):
        sender.submit(b"{}")
    started = time.monotonic()
    await sender.close(0.3)
    assert time.monotonic() - started < 3.0  # not the 30 s attempt
    [left] = webhook_lines(caplog, logging.WARNING)
    assert left.startswith("3 webhook events were not delivered")
    assert not sender.submit(b"{}")  # closed: dropped, never queued


# ------------------------------------------------------------------------- payload, signature

def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = '{"event":"call.ended","text":"ñ"}'.encode()
    expected = hmac.new(b"k" * 16, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"k" * 16, "1700000000", body) == f"sha256={expected}"


def summary_of(**fields: Any) -> dict[str, Any]:
    base = {
        "event": "summary", "call_sid": "CA1", "stream_sid": "MZ1", "custom_parameters": {"From": "+1555"},
        "started_at": "2026-01-01T00:00:00.000+00:00", "ended_at": "2026-01-01T00:01:00.000+00:00",
        "duration_seconds": 60.0, "ended_by": "caller hung up", "turns": 0, "agent_latency_p50": None,
        "agent_latency_p95": None, "agent_request_ids": ["r1"], "record_events_dropped": 0,
    }
    return {**base, **fields}


def test_the_payload_keeps_the_last_turns_and_counts_what_it_left_out() -> None:
    digest = CallDigest()
    digest.add("start", {"stream_sid": "MZ1", "custom_parameters": {}, "agent": "sales"})
    for n in range(MAX_TRANSCRIPT_TURNS + 50):
        digest.add("transcript", {"role": "user", "content": f"turn {n}"})
    digest.add("mark_played", {"name": "agent-turn-1"})  # of no use to the payload
    payload = json.loads(call_ended_payload(summary_of(turns=250), digest, delivery_id="x"))
    assert payload["id"] == "x" and payload["agent"] == "sales"
    assert len(payload["transcript"]) == MAX_TRANSCRIPT_TURNS
    assert payload["transcript"][0]["content"] == "turn 50" and payload["transcript"][-1]["content"] == "turn 249"
    assert payload["omitted"]["transcript"] == 50 and payload["truncated"] is True
    assert payload["counts"] == {"turns": 250, "record_events_dropped": 0}


def test_the_payload_stays_under_its_cap_and_strict_json() -> None:
    digest = CallDigest()
    for n in range(150):
        digest.add("transcript", {"role": "assistant", "content": f"{n:04d}" + "x" * 10_000})
    huge_result = {"orders": [{"id": n, "drug": "ibuprofen"} for n in range(5000)]}
    digest.add("function_call", {"name": "lookup", "arguments": "{}", "result": huge_result, "error": None,
                                 "duration_seconds": 0.1, "withdrawn": False})
    digest.add("latency_report", {"total_latency": math.nan, "stt_latency": math.inf})
    body = call_ended_payload(summary_of(), digest, max_bytes=64 * 1024)
    assert len(body) <= 64 * 1024
    payload = json.loads(body, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert payload["truncated"] is True
    kept = payload["transcript"]
    assert 0 < len(kept) < 150 and kept[-1]["content"].startswith("0149")  # the newest are kept
    assert payload["omitted"]["transcript"] == 150 - len(kept)
    assert all(len(turn["content"]) < 4100 and "…(+" in turn["content"] for turn in kept)  # each cut to ~4000
    [function] = payload["function_calls"]
    assert isinstance(function["result"], str) and function["result"].startswith('{"orders":[{"id":0,')
    assert payload["latency_reports"] == [{"total_latency": None, "stt_latency": None}]


# ----------------------------------------------------------------------------------- settings

@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CALL_WEBHOOK_URL": "ftp://example.com/x"}, "CALL_WEBHOOK_URL must be an http:// or https:// URL with a host, like https://example.com/hooks/calls."),
        ({"CALL_WEBHOOK_URL": "https:///x"}, "CALL_WEBHOOK_URL must be an http:// or https:// URL with a host, like https://example.com/hooks/calls."),
        ({"CALL_WEBHOOK_URL": "example.com/hooks"}, "CALL_WEBHOOK_URL must be an http:// or https:// URL with a host, like https://example.com/hooks/calls."),
        ({"CALL_WEBHOOK_URL": "https://example.com:99999/x"}, "CALL_WEBHOOK_URL has a port that is not a number from 1 to 65535."),
        ({"CALL_WEBHOOK_URL": "https://user:pw@example.com/x"}, "CALL_WEBHOOK_URL must not carry a user name or password: its requests are signed with CALL_WEBHOOK_SECRET."),
        ({"CALL_WEBHOOK_URL": "https://example.com/a b"}, "CALL_WEBHOOK_URL must be plain ASCII without spaces or a #fragment: percent-encode other characters."),
        ({"CALL_WEBHOOK_URL": "https://example.com/x"}, "CALL_WEBHOOK_URL is set but CALL_WEBHOOK_SECRET is not: the webhook's requests are signed with it (at least 16 characters; python -c 'import secrets; print(secrets.token_hex(32))' makes one)."),
        ({"CALL_WEBHOOK_URL": "https://example.com/x", "CALL_WEBHOOK_SECRET": "short"}, "CALL_WEBHOOK_SECRET must be at least 16 characters, got 5."),
        ({"CALL_WEBHOOK_RETRY_SECONDS": "-1"}, "CALL_WEBHOOK_RETRY_SECONDS must be a number of seconds of at least 0, got '-1'."),
    ],
)
def test_bad_webhook_settings_are_one_sentence(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"DEEPGRAM_API_KEY": "k", **env})
    assert str(caught.value) == expected
    assert "pw@" not in str(caught.value)


def test_webhook_settings_and_the_sender_they_make() -> None:
    assert load_settings({"DEEPGRAM_API_KEY": "k"}).call_webhook_url is None
    assert webhook_sender(load_settings({"DEEPGRAM_API_KEY": "k"})) is None
    settings = load_settings({
        "DEEPGRAM_API_KEY": "k", "CALL_WEBHOOK_URL": "https://hooks.example.com/calls?token=abc",
        "CALL_WEBHOOK_SECRET": SECRET, "CALL_WEBHOOK_RETRY_SECONDS": "5",
    })
    assert settings.call_webhook_retry_seconds == 5.0
    assert SECRET not in repr(settings)
    sender = webhook_sender(settings)
    assert sender is not None and sender.retry_seconds == 5.0
    assert sender.target == "https://hooks.example.com/calls" and "abc" not in repr(sender)


def test_startup_says_where_webhooks_go_without_the_query_or_the_secret(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    settings = load_settings({
        "DEEPGRAM_API_KEY": "k", "PHONE_PAGE": "true", "HOST": "127.0.0.1",
        "CALL_WEBHOOK_URL": "https://hooks.example.com:8443/calls?token=abc", "CALL_WEBHOOK_SECRET": SECRET,
    })
    main.announce(settings, 1, 5000)
    [line] = [r.getMessage() for r in caplog.records if "POSTed" in r.getMessage()]
    assert line == "each call's summary is POSTed, signed, to https://hooks.example.com:8443/calls when it ends (docs/webhooks.md)"
    assert "abc" not in caplog.text and SECRET not in caplog.text


# ---------------------------------------------------------------------------- hostile text

LONE = "\ud800"  # sent as the JSON escape "\ud800": valid JSON, yet no UTF-8 encoder takes it


def strict_json(data: bytes) -> Any:
    """``data`` as strict UTF-8 JSON whose every string (keys too) is valid Unicode, parsed."""
    value = json.loads(data.decode("utf-8"))
    # A "\ud800" escape parses into a lone surrogate, which no UTF-8 encoder takes: this raises.
    json.dumps(value, ensure_ascii=False).encode("utf-8")
    return value


def strict_record(directory: Path) -> list[dict[str, Any]]:
    [path] = directory.glob("*.jsonl")
    return [strict_json(line) for line in path.read_bytes().splitlines()]


def call_ended_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.call" and "] call ended: " in r.getMessage()]


async def test_lone_surrogates_from_twilio_and_deepgram_leave_the_bridge_as_valid_utf8(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A custom parameter (one a placeholder puts in the prompt) and a turn holding "\\ud800".

    The parameter reaches the Settings, the record and the webhook; the turn the record, the
    webhook and the history in a resumed session's Settings. All of it is mended to U+FFFD.
    """
    caplog.set_level(logging.INFO)
    settings = json.loads((ROOT / "config.json").read_text(encoding="utf-8"))
    settings["agent"]["think"]["prompt"] = "The caller's note: {{note}}."
    config = tmp_path / "config.json"
    config.write_text(json.dumps(settings), encoding="utf-8")
    async with make_bridge(fake_agent, config_path=config, **webhook_overrides(receiver)) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start({"note": f"refill {LONE}", f"key{LONE}": "value"})
            session = await fake_agent.ready_session()
            await session.send_json({"type": "ConversationText", "role": "user", "content": f"Hello {LONE} there"})
            await eventually(lambda: server.calls and next(iter(server.calls)).call.stats.turns == 1, what="the turn")
            session.drop()  # the resumed session's Settings carry the turn as history
            resumed = await fake_agent.ready_session(1)
            await caller.stop()
        await eventually(lambda: not server.calls, what="the call to end")
        await eventually(lambda: receiver.delivered, what="the webhook")
    assert session.settings_raw is not None and resumed.settings_raw is not None
    sent = strict_json(session.settings_raw.encode("utf-8"))
    assert sent["agent"]["think"]["prompt"] == "The caller's note: refill \ufffd."
    sent = strict_json(resumed.settings_raw.encode("utf-8"))
    assert sent["agent"]["think"]["prompt"] == "The caller's note: refill \ufffd."
    assert {"type": "History", "role": "user", "content": "Hello \ufffd there"} in sent["agent"]["context"]["messages"]
    repaired = {"note": "refill \ufffd", "key\ufffd": "value"}
    record = strict_record(tmp_path / "calls")
    assert record[0]["custom_parameters"] == repaired and record[-1]["custom_parameters"] == repaired
    assert {"role": "user", "content": "Hello \ufffd there"} in [
        {"role": line["role"], "content": line["content"]} for line in record if line["event"] == "transcript"
    ]
    payload = strict_json(receiver.delivered[0].body)
    assert payload["custom_parameters"] == repaired
    assert payload["transcript"] == [{"role": "user", "content": "Hello \ufffd there"}]
    assert len(call_ended_lines(caplog)) == 1


def lone_text() -> dict[str, Any]:
    """A function of the bridge's user that hands back a lone surrogate (os.listdir of a bad name, say)."""
    return {"file": f"report{LONE}.pdf", f"key{LONE}": [LONE]}


async def test_a_lone_surrogate_from_a_function_still_gives_a_valid_record_and_webhook(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, receiver: FakeReceiver, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not from a peer, so no codec mends it: the record's and the webhook's encoders must."""
    caplog.set_level(logging.INFO)
    overrides = webhook_overrides(receiver, function_map={"lone_text": lone_text})
    async with make_bridge(fake_agent, **overrides) as server:
        async with FakeTwilioCaller(twilio_url(server)) as caller:
            await caller.start()
            session = await fake_agent.ready_session()
            await ask_for_function(session, "f1", "lone_text", "{}")
            await caller.stop()
        await eventually(lambda: not server.calls, what="the call to end")
        await eventually(lambda: receiver.delivered, what="the webhook")
    repaired = {"file": "report\ufffd.pdf", "key\ufffd": ["\ufffd"]}
    [function] = [line for line in strict_record(tmp_path / "calls") if line["event"] == "function_call"]
    assert function["result"] == repaired
    assert strict_json(receiver.delivered[0].body)["function_calls"][0]["result"] == repaired
    assert len(call_ended_lines(caplog)) == 1
