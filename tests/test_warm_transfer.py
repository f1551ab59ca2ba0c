"""Warm transfer, the pharmacist's side: their call, the TwiML they hear, and their answer's callbacks.

Oracles are Twilio's own: the ``twilio`` package places the same call over a real socket (the two
requests must be the same bytes), its ``RequestValidator`` signs the callbacks, and xml.etree
parses every TwiML. The callbacks go to the real ``BridgeServer`` on loopback, with its shared state
in the test's folder (a second server sharing that folder stands for another process or pod), and
the notes they leave are read back through ``DirectoryState``, as the caller's process reads them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

from bridge import twilio
from bridge.config import load_agent_config
from bridge.server import BridgeServer, routes
from bridge.storage.shared import DirectoryState
from bridge.twilio_rest import TwilioRestClient
from bridge.call.consult import TransferAnswer, briefing_for, caller_left_key, conference_name, note_key, parse_note
from bridge.caller_lines import CallerLines, line_problem
from bridge.warm_transfer import (
    TRANSFER_KEY_PATH,
    TRANSFER_STATUS_PATH,
    WarmTransferCallbacks,
    dial_pharmacist_request,
    key_url,
    status_url,
)
from conftest import ROOT, BridgeFactory, bridge_settings
from fake_twilio_rest import DEFAULT_ACCOUNT_SID, FakeTwilioRest
from fakes import eventually
from test_call_control import OUR_NUMBER, PUBLIC, TRANSFER, local_url, rest_settings, signed

CALLER = "CA" + "c0ffee00" * 4
PHARMACIST = "CA" + "0a" * 16
AGENT = "default"
HOSTILE = '"><Hangup/>&amp; <Dial>+19005550000</Dial>\nline two\r\n\u202eesrever\u200b ' + "amoxicillin " * 420
LOGGER = "bridge.warm_transfer"
LINES = CallerLines()


def warm_settings(fake: FakeTwilioRest, **extra: Any) -> dict[str, Any]:
    return rest_settings(fake, transfer_number=TRANSFER, twilio_phone_number=OUR_NUMBER, **extra)


def key_form(digits: str, account_sid: str = DEFAULT_ACCOUNT_SID) -> dict[str, str]:
    """What Twilio posts to a Gather's action (docs/protocols.md section 7)."""
    return {"AccountSid": account_sid, "CallSid": PHARMACIST, "Digits": digits, "From": OUR_NUMBER, "To": TRANSFER,
            "Direction": "outbound-api", "CallStatus": "in-progress", "FinishedOnKey": "", "msg": "Gather End"}


def status_form(status: str) -> dict[str, str]:
    return {"AccountSid": DEFAULT_ACCOUNT_SID, "CallSid": PHARMACIST, "CallStatus": status, "From": OUR_NUMBER,
            "To": TRANSFER, "Direction": "outbound-api", "SequenceNumber": "1", "CallbackSource": "call-progress-events"}


def verdict_form(answered_by: str) -> dict[str, str]:
    return {"AccountSid": DEFAULT_ACCOUNT_SID, "CallSid": PHARMACIST, "AnsweredBy": answered_by, "MachineDetectionDuration": "2210"}


def public_key_url(caller: str = CALLER, attempt: int = 1) -> str:
    return f"{PUBLIC}{TRANSFER_KEY_PATH}?agent={AGENT}&caller={caller}&attempt={attempt}"


def public_status_url(caller: str = CALLER, attempt: int = 1) -> str:
    return f"{PUBLIC}{TRANSFER_STATUS_PATH}?caller={caller}&attempt={attempt}"


def post(port: int, url: str, form: dict[str, str], signature: str | None, method: str = "POST") -> tuple[int, str, str]:
    """Send a callback as Twilio sends it to the public ``url``, on loopback: (status, content type, body)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["X-Twilio-Signature"] = signature
    data = urllib.parse.urlencode(form).encode() if method == "POST" else None
    request = urllib.request.Request(local_url(port, url), data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.headers.get("content-type", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("content-type", ""), exc.read().decode()


async def callback(port: int, url: str, form: dict[str, str], token: str) -> tuple[int, str, str]:
    """A callback signed by Twilio's own validator for exactly this URL and form."""
    return await asyncio.to_thread(post, port, url, form, signed(token, url, form))


def note(tmp_path: Path, caller: str = CALLER, attempt: int = 1) -> str | None:
    """What the caller's process reads."""
    return DirectoryState(tmp_path / "state").read(note_key(caller, attempt))


def twiml_of(body: str) -> ET.Element:
    assert body.startswith(twilio.XML_DECLARATION), body
    return ET.fromstring(body.removeprefix(twilio.XML_DECLARATION))


def shape(element: ET.Element) -> list[str]:
    return [child.tag for child in element]


def said_and_hung_up(body: str) -> str:
    """The one sentence of ``<Response><Say>…</Say><Hangup/></Response>``."""
    response = twiml_of(body)
    assert shape(response) == ["Say", "Hangup"], body
    return response[0].text or ""


# ----------------------------------------------------------------------------- TwiML builders


def test_a_hostile_summary_is_spoken_as_text_and_never_becomes_twiml() -> None:
    """Quotes, tags, entities, newlines, U+202E and 5,000 characters: one Say, one Hangup, plain words."""
    assert len(HOSTILE) > 5000
    briefing = briefing_for(LINES.pharmacist_briefing, HOSTILE, "a refill")
    url = public_key_url()
    twiml = twilio.briefing_twiml(briefing, url, no_answer=LINES.pharmacist_no_answer)
    response = ET.fromstring(twiml)
    assert shape(response) == ["Gather", "Say", "Hangup"]
    gather = response[0]
    assert gather.attrib == {"numDigits": "1", "action": url, "method": "POST", "timeout": "10"}
    assert shape(gather) == ["Say"]
    assert len(list(response.iter("Hangup"))) == 1 and not list(response.iter("Dial"))
    spoken = gather[0].text or ""
    before, after = LINES.pharmacist_briefing.split("{summary}")
    summary = spoken.removeprefix(before).removesuffix(after)
    assert spoken == before + summary + after
    assert summary.startswith('"><Hangup/>&amp; <Dial>+19005550000</Dial> line two esrever amoxicillin')
    assert len(summary) <= 300 and summary.endswith(" amoxicillin")  # cut between words
    assert not any(unicodedata.category(char) in ("Cc", "Cf") for char in spoken)
    assert response[1].text == LINES.pharmacist_no_answer


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.text(max_size=700), st.integers(min_value=1, max_value=400))
def test_any_summary_is_cleaned_cut_and_round_trips_through_twiml(text: str, limit: int) -> None:
    summary = twilio.summary_for_briefing(text, limit)
    assert len(summary) <= limit
    assert summary == summary.strip() and "  " not in summary
    assert not any(unicodedata.category(char) in ("Cc", "Cf", "Cs", "Cn") for char in summary)
    unspoken = ("Cc", "Cf", "Cs", "Cn")
    words = "".join(" " if c.isspace() else "" if unicodedata.category(c) in unspoken else c for c in text).split()
    if " " in summary:  # cut at a word boundary: every whole word kept is one of the text's, in order
        kept = summary.split(" ")[:-1]
        assert kept == words[: len(kept)]
    spoken = ET.fromstring(twilio.briefing_twiml(summary, "https://h/k?a=1&b=2", no_answer="n"))[0][0].text or ""
    assert spoken == summary


def test_summary_cuts_between_words_and_within_a_word_only_if_it_must() -> None:
    assert twilio.summary_for_briefing("  Ann\tLee \n asks   about\u2028order 12 ") == "Ann Lee asks about order 12"
    assert twilio.summary_for_briefing("Ann Lee asks about order 12", 14) == "Ann Lee asks"
    assert twilio.summary_for_briefing("Ann Lee asks about order 12", 12) == "Ann Lee asks"
    assert twilio.summary_for_briefing("Supercalifragilistic", 5) == "Super"
    assert twilio.summary_for_briefing("a\u200bb\u202ec\x00d\ufeff") == "abcd"
    assert twilio.summary_for_briefing("") == ""


def test_inline_twiml_over_twilios_4000_characters_is_refused_before_it_is_sent() -> None:
    url = public_key_url()
    fixed = len(twilio.briefing_twiml("", url, no_answer="n"))
    assert len(twilio.briefing_twiml("x" * (4000 - fixed), url, no_answer="n")) == 4000
    with pytest.raises(ValueError, match=r"briefing TwiML is 4,001 characters long, over the 4,000"):
        twilio.briefing_twiml("x" * (4001 - fixed), url, no_answer="n")
    # Escaping counts: 800 ampersands are 4,000 characters of TwiML.
    with pytest.raises(ValueError, match="over the 4,000"):
        twilio.briefing_twiml("&" * 800, url, no_answer="n")
    with pytest.raises(ValueError, match="conference TwiML"):
        twilio.conference_twiml("transfer-x", say="<" * 1000)


def test_every_say_speaks_in_the_agents_voice_as_the_twilio_package_writes_it() -> None:
    """``<Say voice language>`` as the twilio package's own ``VoiceResponse.say`` writes it."""
    from twilio.twiml.voice_response import VoiceResponse

    voice = twilio.SayVoice(language="es-ES", voice="Polly.Lucia-Neural")
    oracle = VoiceResponse()
    oracle.say("Adiós & <gracias>", voice="Polly.Lucia-Neural", language="es-ES")
    [expected] = list(ET.fromstring(str(oracle)))
    built = [
        *ET.fromstring(twilio.say_and_hang_up_twiml("Adiós & <gracias>", voice=voice)).iter("Say"),
        *ET.fromstring(twilio.dial_twiml("+15550001111", say="Adiós & <gracias>", voice=voice)).iter("Say"),
        *ET.fromstring(twilio.conference_twiml("c", say="Adiós & <gracias>", voice=voice)).iter("Say"),
        *ET.fromstring(twilio.briefing_twiml("Adiós & <gracias>", "https://h/k", no_answer="Adiós & <gracias>", voice=voice)).iter("Say"),
    ]
    assert len(built) == 5
    assert all((say.attrib, say.text) == (expected.attrib, expected.text) for say in built)
    assert ET.fromstring(twilio.say_and_hang_up_twiml("Bye"))[0].attrib == {}, "Twilio's default voice unless an agent names one"


def test_conference_twiml() -> None:
    response = ET.fromstring(twilio.conference_twiml(conference_name(CALLER), say='Connecting "you" & <them>'))
    assert shape(response) == ["Say", "Dial"] and response[0].text == 'Connecting "you" & <them>'
    [conference] = list(response[1])
    assert conference.tag == "Conference" and conference.text == f"transfer-{CALLER}"
    assert conference.attrib == {"startConferenceOnEnter": "true", "endConferenceOnExit": "true", "beep": "false", "waitUrl": ""}
    moved = ET.fromstring(twilio.conference_twiml("a&b", end_on_exit=False, start_on_enter=False, beep=True, wait_silence=False))
    assert shape(moved) == ["Dial"]
    assert moved[0][0].attrib == {"startConferenceOnEnter": "false", "endConferenceOnExit": "false", "beep": "true"}
    assert moved[0][0].text == "a&b"


def test_pharmacist_lines_are_checked_when_an_agent_file_sets_them() -> None:
    assert briefing_for("Caller {{VIP}}: {summary}. Press 1.", "needs {help} {summary}", "r") == (
        "Caller {VIP}: needs {help} {summary}. Press 1.")
    assert line_problem("pharmacist_briefing", "Caller {{VIP}}: {summary}. Press 1.") is None
    for bad in ("no summary here", "{summary} and {name}", "{summary} {", "{summary.__class__}", "{0} {summary}"):
        assert "must hold {summary}" in (line_problem("pharmacist_briefing", bad) or "")
    assert line_problem("pharmacist_connecting", "x" * 501) == "must be at most 500 characters, got 501"
    assert line_problem("transfer_declined", "x" * 501) is None  # a caller's line may be longer
    assert line_problem("idle_goodbye", "{summary}") is None  # only the briefing is a template


def test_notes_are_read_without_ever_raising() -> None:
    assert parse_note("accepted") == TransferAnswer(True, None)
    for reason in ("declined", "busy", "no-answer", "failed", "canceled", "machine", "not-answered"):
        assert parse_note(f"declined:{reason}") == TransferAnswer(False, reason)
    for junk in ("", "ACCEPTED", "accepted!", "declined:", "declined:maybe", "declined:busy:x", "\x00", "é" * 5000):
        assert parse_note(junk) == TransferAnswer(False, "unreadable")
    assert parse_note(None) is None  # no note yet


def test_callback_urls_carry_only_what_was_checked(tmp_path: Path) -> None:
    settings = bridge_settings(tmp_path, public_url="https://bridge.example.ngrok.app/ignored")
    assert key_url(settings, CALLER, 2, "night-shift_2") == (
        f"https://bridge.example.ngrok.app{TRANSFER_KEY_PATH}?agent=night-shift_2&caller={CALLER}&attempt=2")
    assert status_url(settings, CALLER, 1) == f"https://bridge.example.ngrok.app{TRANSFER_STATUS_PATH}?caller={CALLER}&attempt=1"
    for caller, attempt, agent in (("CA123", 1, "default"), (CALLER + "&x=1", 1, "default"), ("ca" + CALLER[2:], 1, "default"),
                                   (CALLER, 1, "a b"), (CALLER, 1, "x" * 65), (CALLER, 1, ""), (CALLER, 1, "a&caller=CA1"),
                                   (CALLER, 0, "default"), (CALLER, 6, "default"), (CALLER, True, "default")):
        with pytest.raises(ValueError):
            key_url(settings, caller, attempt, agent)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        note_key("CA" + "g" * 32, 1)
    assert (note_key(CALLER, 1), note_key(CALLER, 2), caller_left_key(CALLER)) == (
        f"warm-transfer:{CALLER}:1", f"warm-transfer:{CALLER}:2", f"warm-transfer-caller-left:{CALLER}")


# ---------------------------------------------------------------------- the pharmacist's call


class LoopbackTwilioHttpClient(TwilioHttpClient):
    """Twilio's own HTTP client, sending to the fake REST API instead of api.twilio.com."""

    def __init__(self, base_url: str) -> None:
        super().__init__(pool_connections=False, timeout=5)
        self.base_url = base_url

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Response:
        parts = urllib.parse.urlsplit(url)
        return super().request(method, self.base_url + parts.path, *args, **kwargs)


def twilio_package(fake: FakeTwilioRest) -> Client:
    return Client(fake.account_sid, fake.auth_token, http_client=LoopbackTwilioHttpClient(fake.url), environment={})


async def test_the_pharmacists_call_is_byte_for_byte_what_twilios_package_sends(tmp_path: Path) -> None:
    """TRANSFER_NUMBER from TWILIO_PHONE_NUMBER, the briefing inline, ring timeout, callbacks, AMD."""
    async with FakeTwilioRest() as fake:
        settings = bridge_settings(tmp_path, **warm_settings(fake))
        request = dial_pharmacist_request(
            settings, CALLER, AGENT, briefing_for(LINES.pharmacist_briefing, HOSTILE, "r"),
            attempt=1, timeout=25, no_answer=LINES.pharmacist_no_answer,
        )
        client = TwilioRestClient(fake.account_sid, fake.auth_token, fake.url, timeout=2)
        created = await client.create_call(**request)
        ours = (await fake.wait_for_requests(1))[0]
        callback = status_url(settings, CALLER, 1)
        theirs_created = await asyncio.to_thread(
            lambda: twilio_package(fake).calls.create(
                to=TRANSFER, from_=OUR_NUMBER, twiml=request["twiml"], timeout=25, status_callback=callback,
                status_callback_event=["answered", "completed"], status_callback_method="POST",
                machine_detection="Enable", async_amd="true", async_amd_status_callback=callback,
                async_amd_status_callback_method="POST",
            )
        )
        theirs = fake.requests[1]
    assert (ours.outcome, theirs.outcome) == (201, 201)  # the fake, checking as Twilio does, took both
    assert ours.body == theirs.body
    assert (ours.method, ours.path, ours.auth) == (theirs.method, theirs.path, theirs.auth)
    assert ours.headers["content-type"] == theirs.headers["content-type"]
    assert ours.field("To") == TRANSFER and ours.field("Timeout") == "25"
    assert ours.form["StatusCallbackEvent"] == ["answered", "completed"]
    gather = ET.fromstring(ours.field("Twiml") or "")[0]
    assert gather.get("action") == key_url(settings, CALLER, 1, AGENT)
    assert created["sid"] == fake.created_sids[0] and theirs_created.sid == fake.created_sids[1]


async def test_the_fake_refuses_a_create_twilio_would_refuse() -> None:
    """So the fake's yes above means something: Twilio's 400s for what the bridge could get wrong."""
    async with FakeTwilioRest() as fake:
        package = twilio_package(fake)
        bad = [
            {"twiml": "<Response>" + " " * 4000 + "</Response>"},
            {"twiml": "<Response/>", "machine_detection": "enable"},
            {"twiml": "<Response/>", "async_amd_status_callback_method": "GET"},
            {"twiml": "<Response/>", "status_callback_event": ["answered", "done"]},
            {"twiml": "<Response/>", "timeout": 601},
            {},
        ]
        codes = []
        for fields in bad:
            with pytest.raises(TwilioRestException) as refused:
                await asyncio.to_thread(lambda: package.calls.create(to=TRANSFER, from_=OUR_NUMBER, **fields))
            codes.append((refused.value.status, refused.value.code))
    assert codes == [(400, 32018), (400, 20001), (400, 20001), (400, 20001), (400, 20001), (400, 21205)]
    assert fake.created_sids == []


async def test_create_call_takes_a_ring_timeout_only_in_twilios_range() -> None:
    async with FakeTwilioRest() as fake:
        client = TwilioRestClient(fake.account_sid, fake.auth_token, fake.url, timeout=2)
        for timeout in (4, 601, True, 30.0, "30"):
            with pytest.raises(ValueError, match="from 5 to 600"):
                await client.create_call(TRANSFER, OUR_NUMBER, twiml="<Response/>", timeout=timeout)  # type: ignore[arg-type]
        assert fake.requests == []
        await client.create_call(TRANSFER, OUR_NUMBER, twiml="<Response/>")
        [request] = await fake.wait_for_requests(1)
    assert "Timeout" not in request.form  # not sent unless given: Twilio's default applies


def test_the_pharmacists_call_needs_its_numbers(tmp_path: Path) -> None:
    settings = bridge_settings(tmp_path, public_url=PUBLIC, transfer_number=TRANSFER)
    with pytest.raises(ValueError, match="TRANSFER_NUMBER and TWILIO_PHONE_NUMBER"):
        dial_pharmacist_request(settings, CALLER, AGENT, "b", attempt=1, timeout=20, no_answer="n")


# ---------------------------------------------------------------------------- the key pressed


def test_the_routes_are_on_with_twilios_rest_api_only(tmp_path: Path) -> None:
    rest = bridge_settings(tmp_path, twilio_account_sid=DEFAULT_ACCOUNT_SID, twilio_auth_token="t", public_url=PUBLIC)
    assert {TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH} <= {path for path, _ in routes(rest)}
    assert not {TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH} & {path for path, _ in routes(bridge_settings(tmp_path))}


async def test_without_the_rest_api_the_callbacks_are_not_served(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with make_bridge() as server:
        status, _, body = await callback(server.port, public_key_url(), key_form("1"), "any-token")
    assert (status, body) == (405, "Method not allowed.\n")  # what any POST to a path of no route gets
    assert note(tmp_path) is None


async def test_pressing_1_posts_accepted_and_puts_the_pharmacist_into_the_conference(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        status, content_type, body = await callback(server.port, public_key_url(), key_form("1"), fake.auth_token)
    assert (status, content_type) == (200, "text/xml")
    response = twiml_of(body)
    assert shape(response) == ["Say", "Dial"] and response[0].text == LINES.pharmacist_connecting
    [conference] = list(response[1])
    assert conference.text == conference_name(CALLER)
    # The pharmacist waits in silence; the conference ends when they leave.
    assert conference.attrib == {"startConferenceOnEnter": "true", "endConferenceOnExit": "true", "beep": "false", "waitUrl": ""}
    assert note(tmp_path) == "accepted"
    assert fake.requests == []


@pytest.mark.parametrize("digits", ["2", "9", "#", ""])
async def test_any_other_key_declines(make_bridge: BridgeFactory, tmp_path: Path, digits: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        status, _, body = await callback(server.port, public_key_url(), key_form(digits), fake.auth_token)
    assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_declined
    assert note(tmp_path) == "declined:declined"
    assert "Digits" not in caplog.text and "Gather" not in caplog.text  # the key itself is never logged


async def test_pressing_1_after_the_caller_hung_up_is_one_sentence_and_no_conference(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        assert server.shared is not None
        server.shared.post(caller_left_key(CALLER), "caller-left")  # the holder's note
        status, _, body = await callback(server.port, public_key_url(), key_form("1"), fake.auth_token)
    assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_caller_left
    assert note(tmp_path) is None


async def test_a_shared_state_that_fails_sends_the_pharmacist_away_not_into_a_conference(
    make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """STATE_DIR is a file: nothing can be read or posted. The caller's process could never learn of
    an acceptance, so the pharmacist hears the caller is gone, and one WARNING says why."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    async with FakeTwilioRest() as fake, make_bridge(state_dir=blocked, **warm_settings(fake)) as server:
        status, _, body = await callback(server.port, public_key_url(), key_form("1"), fake.auth_token)
    assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_caller_left
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "shared state failed" in warnings[0].getMessage()


class GatedState:
    """A folder's shared state whose reads (or posts) wait for ``release``: a slow store.

    ``reads`` counts the reads begun; ``reading`` is set when one has.
    """

    def __init__(self, directory: Path, *, gate_reads: bool = False, gate_posts: bool = False) -> None:
        self.state = DirectoryState(directory)
        self.gate_reads, self.gate_posts = gate_reads, gate_posts
        self.release = threading.Event()
        self.reading = threading.Event()
        self.reads = 0

    def claim(self, key: str) -> bool:
        return self.state.claim(key)

    def post(self, key: str, note: str) -> None:
        if self.gate_posts:
            self.release.wait(10)
        self.state.post(key, note)

    def read(self, key: str) -> str | None:
        self.reads += 1
        self.reading.set()
        if self.gate_reads:
            self.release.wait(10)
        return self.state.read(key)

    def prune(self, now: float) -> int:
        return self.state.prune(now)


def gated_bridge(tmp_path: Path, fake: FakeTwilioRest, state: GatedState, store_seconds: float) -> BridgeServer:
    """The real server on ``state``, with a callback deadline short enough for a test."""
    settings = bridge_settings(tmp_path, **warm_settings(fake))
    server = BridgeServer(settings, load_agent_config(ROOT / "config.json", os.environ), {}, shared=state)
    server.warm_transfer = WarmTransferCallbacks(
        settings, state, server.services.rest, lambda agent: LINES, store_seconds=store_seconds
    )
    return server


async def test_an_acceptance_written_too_late_is_taken_back(tmp_path: Path) -> None:
    """The post of "accepted" outlives the deadline: the pharmacist is sent away at the deadline, and
    once the post lands it is overwritten with a decline, so the caller is never moved into an empty
    conference."""
    async with FakeTwilioRest() as fake:
        slow = GatedState(tmp_path / "state", gate_posts=True)
        async with gated_bridge(tmp_path, fake, slow, 0.3) as server:
            status, _, body = await callback(server.port, public_key_url(), key_form("1"), fake.auth_token)
            assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_caller_left
            assert note(tmp_path) is None
            slow.release.set()
            await eventually(lambda: note(tmp_path) == "declined:failed", what="the acceptance taken back")


async def test_bytes_after_a_request_whose_answer_is_pending_are_not_a_second_request(tmp_path: Path) -> None:
    """A pipelined request behind a key press (or any bytes) is not read while its answer is being
    worked out: the key is acted on once, and answered once."""
    async with FakeTwilioRest() as fake:
        slow = GatedState(tmp_path / "state", gate_reads=True)
        async with gated_bridge(tmp_path, fake, slow, 5.0) as server:
            form = key_form("1")
            body = urllib.parse.urlencode(form).encode()
            head = (f"POST {TRANSFER_KEY_PATH}?agent={AGENT}&caller={CALLER}&attempt=1 HTTP/1.1\r\nHost: x\r\n"
                    f"X-Twilio-Signature: {signed(fake.auth_token, public_key_url(), form)}\r\n"
                    f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(head.encode() + body)
            await asyncio.to_thread(slow.reading.wait, 5)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # time for the bridge to read them, were it to
            slow.release.set()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1") == 1
    assert b"<Conference" in answer and slow.reads == 1
    assert note(tmp_path) == "accepted"


# ------------------------------------------------------------------- the call's status and verdict


@pytest.mark.parametrize(
    "status, reason",
    [("busy", "busy"), ("no-answer", "no-answer"), ("failed", "failed"), ("canceled", "canceled"), ("completed", "not-answered")],
)
async def test_a_call_that_ends_unaccepted_posts_why(make_bridge: BridgeFactory, tmp_path: Path, status: str, reason: str) -> None:
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        answered = await callback(server.port, public_status_url(), status_form("in-progress"), fake.auth_token)
        assert answered[0] == 204
        ended = await callback(server.port, public_status_url(), status_form(status), fake.auth_token)
        assert ended[0] == 204
        await eventually(lambda: note(tmp_path) is not None, what="the decline")
    assert note(tmp_path) == f"declined:{reason}"
    assert fake.requests == []


async def test_no_status_or_verdict_overwrites_an_acceptance(
    make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        token, port = fake.auth_token, server.port
        assert (await callback(port, public_key_url(), key_form("1"), token))[0] == 200
        forms = [status_form(s) for s in ("busy", "no-answer", "failed", "canceled", "completed")] + [verdict_form("machine_start")]
        for form in forms:
            assert (await callback(port, public_status_url(), form, token))[0] == 204

        def unchanged() -> int:
            return sum("changes nothing" in r.getMessage() for r in caplog.records if r.name == LOGGER)

        await eventually(lambda: unchanged() == len(forms), what="every callback to find the acceptance")
    assert note(tmp_path) == "accepted"
    assert fake.requests == []  # a person pressed 1: the machine verdict was wrong, nobody is hung up on


@pytest.mark.parametrize("answered_by", ["machine_start", "fax"])
async def test_a_machine_is_declined_and_its_leg_ended(make_bridge: BridgeFactory, tmp_path: Path, answered_by: str) -> None:
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        assert (await callback(server.port, public_status_url(), verdict_form(answered_by), fake.auth_token))[0] == 204
        [update] = await fake.wait_for_requests(1, operation="update")
        await eventually(lambda: note(tmp_path) is not None, what="the decline")
    # The server has shut down, its callbacks finished: nothing more was sent.
    assert note(tmp_path) == "declined:machine"
    assert (update.call_sid, update.form_pairs(), update.auth) == (PHARMACIST, [("Status", "completed")], (fake.account_sid, fake.auth_token))
    assert fake.requests == [update]


@pytest.mark.parametrize("answered_by", ["human", "unknown"])
async def test_a_person_answering_changes_nothing(
    make_bridge: BridgeFactory, tmp_path: Path, answered_by: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        # Answered at once, with no work left behind: nothing to wait for.
        assert (await callback(server.port, public_status_url(), verdict_form(answered_by), fake.auth_token))[0] == 204
        assert not server.warm_transfer.work.tasks
    assert note(tmp_path) is None and fake.requests == []
    assert f"answered by {answered_by}" in caplog.text


# ------------------------------------------------------------------------------------ refusals


async def test_forged_tampered_or_foreign_callbacks_are_refused_and_post_nothing(
    make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """403, nothing posted and no REST request: a wrong signature, none, another token, one for other
    form values (Digits 2 signed, 1 sent), for another query (the caller changed), for the loopback
    URL, or a well-signed request of another Twilio account; a GET is 405. A well-signed one then
    acts, so the refusals were not for want of anything else."""
    other_caller = "CA" + "d" * 32
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        token, port = fake.auth_token, server.port
        key, machine = key_form("1"), verdict_form("machine_start")
        foreign = key_form("1", account_sid="AC" + "9" * 32)
        attempts = [
            (public_key_url(), key, signed(token, public_key_url(), key_form("2"))),
            (public_key_url(), key, None),
            (public_key_url(), key, "bm90IGEgc2lnbmF0dXJl"),
            (public_key_url(), key, signed("another-token", public_key_url(), key)),
            (public_key_url(other_caller), key, signed(token, public_key_url(), key)),
            (public_key_url(), key, signed(token, local_url(port, public_key_url()), key)),
            (public_key_url(), foreign, signed(token, public_key_url(), foreign)),
            (public_status_url(), machine, None),
            (public_status_url(other_caller), machine, signed(token, public_status_url(), machine)),
        ]
        statuses = [(await asyncio.to_thread(post, port, url, form, signature))[0] for url, form, signature in attempts]
        get = await asyncio.to_thread(post, port, public_key_url(), {}, signed(token, public_key_url(), {}), "GET")
        assert not server.warm_transfer.work.tasks  # refused before any work began
        assert statuses == [403] * len(attempts) and get[0] == 405
        assert note(tmp_path) is None and note(tmp_path, other_caller) is None and fake.requests == []
        assert (await callback(port, public_key_url(other_caller), key, token))[0] == 200
    assert note(tmp_path, other_caller) == "accepted"


async def test_a_signed_query_the_bridge_never_wrote_is_a_bad_request(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        for url in (f"{PUBLIC}{TRANSFER_KEY_PATH}?caller={CALLER}&attempt=1",
                    f"{PUBLIC}{TRANSFER_KEY_PATH}?agent=a%20b&caller={CALLER}&attempt=1",
                    f"{PUBLIC}{TRANSFER_STATUS_PATH}?caller=CA123&attempt=1",
                    f"{PUBLIC}{TRANSFER_KEY_PATH}?agent={AGENT}&caller={CALLER}",
                    f"{PUBLIC}{TRANSFER_STATUS_PATH}?caller={CALLER}&attempt=0",
                    f"{PUBLIC}{TRANSFER_STATUS_PATH}?caller={CALLER}&attempt=6",
                    f"{PUBLIC}{TRANSFER_STATUS_PATH}?caller={CALLER}&attempt=%201"):
            assert (await callback(server.port, url, key_form("1"), fake.auth_token))[0] == 400
        assert (await callback(server.port, public_key_url(), {**key_form("1"), "CallSid": "CA1"}, fake.auth_token))[0] == 400
    assert note(tmp_path) is None


# ------------------------------------------------------------------------- no sticky sessions


async def test_callbacks_reaching_another_process_sharing_the_state_work(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """Bridge A holds the caller; every callback reaches bridge B, which shares A's STATE_DIR."""
    second_caller = "CA" + "e" * 32
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as holder, make_bridge(**warm_settings(fake)) as other:
        assert holder.shared is not None and holder.shared is not other.shared
        token, port = fake.auth_token, other.port
        # The caller hangs up during the dialling: A posts it, B tells the pharmacist who presses 1.
        holder.shared.post(caller_left_key(CALLER), "caller-left")
        status, _, body = await callback(port, public_key_url(), key_form("1"), token)
        assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_caller_left
        # Another transfer: the pharmacist takes it at B; A reads the acceptance; a late status at B keeps it.
        assert (await callback(port, public_key_url(second_caller), key_form("1"), token))[0] == 200
        assert parse_note(holder.shared.read(note_key(second_caller, 1)) or "") == TransferAnswer(True)
        assert (await callback(holder.port, public_status_url(second_caller), status_form("no-answer"), token))[0] == 204
        assert (await callback(port, public_status_url(CALLER), status_form("busy"), token))[0] == 204
        await eventually(lambda: holder.shared.read(note_key(CALLER, 1)) is not None, what="the busy at B reaching A")  # type: ignore[union-attr]
    assert parse_note(note(tmp_path, CALLER) or "") == TransferAnswer(False, "busy")
    assert note(tmp_path, second_caller) == "accepted"



# ---------------------------------------------------------------------- answers and attempts


async def test_the_first_answer_stands_and_keeps_its_reason(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """The pharmacist pressed 2, then hung up: ``completed`` (no key, it would say) doesn't replace the
    decline; a machine verdict after a key ends no leg; a 1 after a machine verdict moves nobody."""
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        token, port = fake.auth_token, server.port
        assert (await callback(port, public_key_url(), key_form("2"), token))[0] == 200
        for form in (status_form("completed"), verdict_form("machine_start")):
            assert (await callback(port, public_status_url(), form, token))[0] == 204
        # Attempt 2: a machine, then a key (the verdict was wrong, but it came first).
        assert (await callback(port, public_status_url(attempt=2), verdict_form("machine_start"), token))[0] == 204
        await eventually(lambda: note(tmp_path, attempt=2) is not None, what="the machine's decline")
        status, _, body = await callback(port, public_key_url(attempt=2), key_form("1"), token)
    assert note(tmp_path) == "declined:declined"
    assert note(tmp_path, attempt=2) == "declined:machine"
    assert status == 200 and said_and_hung_up(body) == LINES.pharmacist_declined
    # Only attempt 2's machine is hung up on: attempt 1 had a person's answer already.
    assert [request.operation for request in fake.requests] == ["update"]


async def test_each_attempt_has_its_own_answer(make_bridge: BridgeFactory, tmp_path: Path) -> None:
    """Attempt 1 declined; a late status of attempt 1 while attempt 2 rings, and attempt 2 is accepted:
    each answer lands under its own attempt, so the second is never read as the first's."""
    async with FakeTwilioRest() as fake, make_bridge(**warm_settings(fake)) as server:
        token, port = fake.auth_token, server.port
        assert (await callback(port, public_status_url(attempt=1), status_form("busy"), token))[0] == 204
        await eventually(lambda: note(tmp_path, attempt=1) is not None, what="attempt 1's answer")
        assert note(tmp_path, attempt=2) is None
        assert (await callback(port, public_status_url(attempt=1), status_form("completed"), token))[0] == 204
        assert (await callback(port, public_key_url(attempt=2), key_form("1"), token))[0] == 200
    assert (note(tmp_path, attempt=1), note(tmp_path, attempt=2)) == ("declined:busy", "accepted")


async def test_the_pharmacist_hears_the_agents_own_lines(tmp_path: Path) -> None:
    """The key URL names the agent; its file's ``bridge.lines`` are what the pharmacist hears."""
    config = load_agent_config(ROOT / "config.json", os.environ)
    spanish = dataclasses.replace(
        config, lines={"pharmacist_connecting": "Gracias. Le paso con la persona que llama."},
        twilio_say=twilio.SayVoice(language="es-ES"),
    )
    async with FakeTwilioRest() as fake:
        settings = bridge_settings(tmp_path, **warm_settings(fake))
        async with BridgeServer(settings, spanish, {}) as server:
            status, _, body = await callback(server.port, public_key_url(), key_form("1"), fake.auth_token)
    said = twiml_of(body)[0]
    assert status == 200 and said.text == "Gracias. Le paso con la persona que llama."
    assert said.attrib == {"language": "es-ES"}
