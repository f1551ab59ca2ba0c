"""The Twilio Media Streams protocol, as plain functions with no I/O.

Parsing what Twilio sends (docs/protocols.md section 1), building what we send back (section 2),
the TwiML the bridge hands Twilio (section 3, and section 7 for a warm transfer's briefing and
conference), and request signatures (section 4). The call session and the server call these;
tests call them directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from . import jsontext
from .errors import ProtocolError


# Twilio's identifiers, where one goes into a URL path or is compared with a setting.
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
CALL_SID = re.compile(r"CA[0-9a-fA-F]{32}")
RECORDING_SID = re.compile(r"RE[0-9a-fA-F]{32}")
# The <Parameter> that tells a stream why it exists (the answering-machine callback sets it to
# VOICEMAIL_MODE); the agent's own parameters stay untouched.
MODE_PARAMETER = "bridge_mode"
VOICEMAIL_MODE = "voicemail"
# Twilio's limit on inline TwiML, a call's ``Twiml`` on create or update (docs/protocols.md section 7).
MAX_TWIML_CHARS = 4000


class TwilioProtocolError(ProtocolError):
    """A frame from Twilio we cannot use."""


@dataclass(frozen=True, slots=True)
class StreamStart:
    """What the ``start`` event tells us about the call."""

    stream_sid: str
    call_sid: str
    account_sid: str
    custom_parameters: dict[str, str] = field(default_factory=dict)


def parse_event(text: str) -> tuple[str, dict[str, Any]]:
    """Parse one text frame from Twilio into ``(event name, message)``; its strings are valid Unicode."""
    try:
        message = jsontext.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise TwilioProtocolError("not-json", "a text frame from Twilio is not JSON") from None
    if not isinstance(message, dict):
        raise TwilioProtocolError("not-object", "a frame from Twilio is JSON but not an object")
    event = message.get("event")
    if not isinstance(event, str):
        raise TwilioProtocolError("no-event", "a frame from Twilio has no \"event\" name")
    return event, message


def media_payload(message: dict[str, Any]) -> bytes:
    """The caller audio (raw mulaw) carried by a ``media`` event."""
    media = message.get("media")
    payload = media.get("payload") if isinstance(media, dict) else None
    if not isinstance(payload, str):
        raise TwilioProtocolError("bad-media", "a media event has no payload string")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise TwilioProtocolError("bad-base64", "a media event's payload is not valid base64") from None


# Twilio writes "event" first. Frames that start this way take the fast path below.
_MEDIA_PREFIXES = ('{"event":"media"', '{"event": "media"')


def fast_media_payload(text: str) -> bytes | None:
    """The caller audio of a ``media`` frame without a full JSON parse, or None to parse it fully.

    ``media`` is 50 frames a second per call, so this runs more than anything else. It is exact:
    base64 has no quote or backslash, so the payload string is the run of characters between its
    quotes, and anything unusual (an escape, a second payload key, bad base64) returns None,
    sending the frame down the ordinary ``parse_event`` path that reports what is wrong.
    """
    if not text.startswith(_MEDIA_PREFIXES) or not text.endswith("}"):
        return None
    key = text.find('"payload":')
    if key < 0:
        return None
    opening = key + 10
    if not text.startswith('"', opening):
        opening = text.find('"', opening)
        if opening < 0 or not text[key + 10 : opening].isspace():
            return None
    closing = text.find('"', opening + 1)
    # A second "payload" key would win in a JSON parser; only the full parse may judge that.
    if closing < 0 or text.find('"payload"', closing) >= 0:
        return None
    try:
        return binascii.a2b_base64(text[opening + 1 : closing], strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def parse_start(message: dict[str, Any]) -> StreamStart:
    """The stream and call identifiers of a ``start`` event."""
    start = message.get("start")
    if not isinstance(start, dict):
        start = {}
    stream_sid = start.get("streamSid") or message.get("streamSid")
    if not isinstance(stream_sid, str) or not stream_sid:
        raise TwilioProtocolError("bad-start", "a start event has no streamSid")
    call_sid = start.get("callSid")
    account_sid = start.get("accountSid")
    params = start.get("customParameters")
    return StreamStart(
        stream_sid=stream_sid,
        call_sid=call_sid if isinstance(call_sid, str) and call_sid else stream_sid,
        account_sid=account_sid if isinstance(account_sid, str) else "",
        custom_parameters=(
            {str(key): str(value) for key, value in params.items()} if isinstance(params, dict) else {}
        ),
    )


def mark_name(message: dict[str, Any]) -> str | None:
    """The name of an echoed ``mark``, or None if the event carries none."""
    mark = message.get("mark")
    name = mark.get("name") if isinstance(mark, dict) else None
    return name if isinstance(name, str) else None


DTMF_KEYS = frozenset("0123456789*#")


def dtmf_digit(message: dict[str, Any]) -> str:
    """The key of a ``dtmf`` event (``{"dtmf": {"track": "inbound_track", "digit": "5"}}``)."""
    dtmf = message.get("dtmf")
    digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
    if not isinstance(digit, str) or digit not in DTMF_KEYS:
        raise TwilioProtocolError("bad-dtmf", "a dtmf event from Twilio without a keypad digit")
    return digit


class TwilioOutbound:
    """Builds the frames we send on one stream. The streamSid is JSON-encoded once, not per frame."""

    __slots__ = ("_media_prefix", "_clear", "_mark_prefix", "stream_sid")

    def __init__(self, stream_sid: str) -> None:
        self.stream_sid = stream_sid
        sid = json.dumps(stream_sid)
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._clear = '{"event":"clear","streamSid":' + sid + "}"
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":'

    def media(self, audio: bytes) -> str:
        # Agent audio is the hottest outbound path: a template and base64, no json.dumps.
        return self._media_prefix + base64.b64encode(audio).decode("ascii") + '"}}'

    def clear(self) -> str:
        return self._clear

    def mark(self, name: str) -> str:
        return self._mark_prefix + json.dumps(name) + "}}"


def expected_signature(auth_token: str, url: str) -> str:
    """X-Twilio-Signature for a WebSocket request: base64(HMAC-SHA1(auth token, URL)), no params."""
    digest = hmac.new(auth_token.encode("utf-8"), url.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_is_valid(auth_token: str, url: str, signature: str | None) -> bool:
    if not signature:
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters, and a header may hold any.
    given = signature.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected_signature(auth_token, url).encode("ascii"), given)


def webhook_signature(auth_token: str, url: str, params: Mapping[str, Sequence[str]]) -> str:
    """X-Twilio-Signature of an HTTP webhook or callback (docs/protocols.md section 4).

    base64(HMAC-SHA1(auth token, URL + every parameter's name and value, sorted by name)). For a
    GET, ``url`` carries the query string and ``params`` is empty; for a POST, ``params`` is the
    form body. Repeated values of a name are sorted and counted once, as Twilio's own validator does.
    """
    message = url + "".join(name + value for name in sorted(params) for value in sorted(set(params[name])))
    digest = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def webhook_signature_is_valid(
    auth_token: str, url: str, params: Mapping[str, Sequence[str]], signature: str | None
) -> bool:
    if not signature:
        return False
    given = signature.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(webhook_signature(auth_token, url, params).encode("ascii"), given)


# ------------------------------------------------------------------------------------- TwiML


XML_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


def connect_twiml(stream_url: str, parameters: Mapping[str, str] | None = None, *, declaration: bool = False) -> str:
    """Connect the call to a bidirectional stream; each parameter becomes a ``<Parameter>``.

    ``<Connect>`` is the last verb, so closing the stream's socket hangs up (section 3).
    ``declaration`` starts it with the XML declaration, for a TwiML document served over HTTP.
    """
    inner = "".join(
        f"<Parameter name={quoteattr(name)} value={quoteattr(value)}/>" for name, value in (parameters or {}).items()
    )
    stream = f"<Stream url={quoteattr(stream_url)}>{inner}</Stream>" if inner else f"<Stream url={quoteattr(stream_url)}/>"
    return (XML_DECLARATION if declaration else "") + f"<Response><Connect>{stream}</Connect></Response>"


# <Say>'s language: a BCP-47-style tag as Twilio writes them ("es-ES", "pt-BR", "cmn-CN").
SAY_LANGUAGE = re.compile(r"[a-z]{2,3}(-[A-Za-z0-9]{2,8}){0,2}")
# <Say>'s voice: "man", "woman", "Polly.Lucia-Neural", "Google.es-ES-Standard-A".
SAY_VOICE = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class SayVoice:
    """How Twilio reads a line aloud: ``<Say>``'s ``language`` and ``voice``, each Twilio's default
    (en-US, its default voice) when empty. Twilio, not the agent, speaks the fallback lines and
    everything the pharmacist hears, so an agent in another language names a voice that speaks it."""

    language: str = ""
    voice: str = ""

    def say(self, text: str) -> str:
        """``text`` as one ``<Say>`` element."""
        attributes = "".join(
            f" {name}={quoteattr(value)}" for name, value in (("voice", self.voice), ("language", self.language)) if value
        )
        return f"<Say{attributes}>{xml_text(text)}</Say>"


DEFAULT_SAY = SayVoice()


def dial_twiml(number: str, *, say: str | None = None, voice: SayVoice = DEFAULT_SAY) -> str:
    """Say ``say`` (if any), then dial ``number``: a transfer, or the fallback line."""
    spoken = voice.say(say) if say else ""
    return f"<Response>{spoken}<Dial>{escape(number)}</Dial></Response>"


def say_and_hang_up_twiml(say: str, *, voice: SayVoice = DEFAULT_SAY) -> str:
    return f"<Response>{voice.say(say)}<Hangup/></Response>"


# Characters XML 1.0 can't hold even escaped: C0 controls but tab, newline and CR; lone surrogates;
# U+FFFE and U+FFFF. Twilio would refuse the whole document.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """``text`` as XML character data: escaped, without the characters XML can't hold."""
    return escape(_NOT_XML.sub("", text))


def _inline(twiml: str, what: str) -> str:
    """``twiml``, if Twilio takes it inline; else ``ValueError`` with one sentence."""
    if len(twiml) > MAX_TWIML_CHARS:
        raise ValueError(f"the {what} TwiML is {len(twiml):,} characters long, over the {MAX_TWIML_CHARS:,} Twilio takes inline")
    return twiml


def briefing_twiml(
    briefing: str, key_url: str, *, gather_seconds: int = 10, no_answer: str, voice: SayVoice = DEFAULT_SAY
) -> str:
    """A warm transfer's first words to the pharmacist: ``briefing``, while one key is gathered.

    The key goes to ``key_url`` (POST). With no key within ``gather_seconds`` of the briefing's
    end, Twilio goes on to the next verb: ``no_answer``, then a hang-up. Sent inline, so it is
    measured: ``ValueError`` over ``MAX_TWIML_CHARS``.
    """
    if not isinstance(gather_seconds, int) or gather_seconds < 1:
        raise ValueError("gather_seconds is a whole number of seconds, at least 1")
    gather = f'<Gather numDigits="1" action={quoteattr(key_url)} method="POST" timeout="{gather_seconds}">'
    twiml = f"<Response>{gather}{voice.say(briefing)}</Gather>{voice.say(no_answer)}<Hangup/></Response>"
    return _inline(twiml, "briefing")


def _xml_bool(value: bool) -> str:
    return "true" if value else "false"


def conference_twiml(
    name: str,
    *,
    say: str | None = None,
    end_on_exit: bool = True,
    start_on_enter: bool = True,
    beep: bool = False,
    wait_silence: bool = True,
    voice: SayVoice = DEFAULT_SAY,
) -> str:
    """Say ``say`` (if any), then join the conference ``name``.

    ``wait_silence`` waits in silence (``waitUrl=""``) instead of Twilio's hold music until the
    conference starts. Sent inline when a live call is moved into it, so it is measured:
    ``ValueError`` over ``MAX_TWIML_CHARS``.
    """
    if not name:
        raise ValueError("a conference needs a name")
    spoken = voice.say(say) if say else ""
    attributes = (
        f'startConferenceOnEnter="{_xml_bool(start_on_enter)}" endConferenceOnExit="{_xml_bool(end_on_exit)}" '
        f'beep="{_xml_bool(beep)}"' + (' waitUrl=""' if wait_silence else "")
    )
    twiml = f"<Response>{spoken}<Dial><Conference {attributes}>{xml_text(name)}</Conference></Dial></Response>"
    return _inline(twiml, "conference")


# Unicode categories never spoken: controls, format characters (U+202E turns text around on
# screen, U+200B hides in it), lone surrogates and unassigned code points (U+FFFE among them).
_UNSPOKEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Cn"})
# Of a summary, only this many times its limit is looked at: a model's megabyte costs no more.
_SUMMARY_READ_FACTOR = 8


def summary_for_briefing(summary: str, limit: int = 300) -> str:
    """The model's summary of a call, fit to be spoken to the pharmacist and put into TwiML.

    The model wrote it, so it is untrusted: whitespace of every kind becomes single spaces,
    control and format characters go, and it is cut at a word boundary to ``limit`` characters
    (within a word only if its first word is longer). It still needs escaping (``xml_text``).
    """
    if limit < 1:
        raise ValueError("limit is at least 1")
    head = summary[: limit * _SUMMARY_READ_FACTOR]
    kept = "".join(
        (" " if char.isspace() else "") if unicodedata.category(char) in _UNSPOKEN_CATEGORIES else char for char in head
    )
    text = " ".join(kept.split())
    if len(text) <= limit:
        return text
    words, space, _ = text[: limit + 1].rpartition(" ")
    return words if space and words else text[:limit]
