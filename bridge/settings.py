"""The process settings: one table of every environment variable, and the limits code sets.

Each setting is written once, as a field of ``Settings`` whose metadata (``env``) says its
variable, kind, unit, bounds and a one-line doc; its default is the field's default. From that
one table ``load_settings`` reads and checks the environment, ``env_example()`` writes
``.env.example``, and tests hold docs/configuration.md's table against it. ``Limits`` holds what
no environment variable sets: protocol timings and the caps against broken or hostile peers,
which tests shorten (docs/architecture.md).

Names follow one style: the variable in capitals, the field in lower case, the unit last
(``_SECONDS``, ``_BYTES``, ``_DAYS``), a bound first (``MAX_``). A renamed variable still works for
one release under its old name, with one deprecation warning (``Settings.deprecations``); so do
the three lines a caller hears that moved into the agent files (``bridge.lines``, docs/agents.md).

Everything here runs once, before the server listens, and either returns checked settings or
raises ``ConfigError`` carrying one sentence a user can act on. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .binding import binding_key
from .caller_lines import MAX_LINE_CHARS, RECORDING_NOTICE, CallerLines
from .twilio import ACCOUNT_SID

PROJECT_DIR = Path(__file__).resolve().parent.parent
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
# .env.example's value and its obvious variants: copied unchanged, they would fail only on the
# first call (Deepgram's 401), so startup refuses them.
PLACEHOLDER_API_KEYS = frozenset({
    "your-deepgram-api-key", "your_deepgram_api_key", "your-api-key", "your_api_key", "your-key",
    "<your-deepgram-api-key>", "changeme", "change-me", "xxx", "...", "…",
})
MIN_WEBHOOK_SECRET_CHARS = 16
MIN_BINDING_SECRET_CHARS = 32


class ConfigError(Exception):
    """A startup problem, phrased as one sentence for the user."""


class Kind(enum.Enum):
    TEXT = "text"
    SECRET = "secret"  # never quoted back in an error, never logged
    URL = "url"
    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    CHOICE = "choice"
    PHONE = "phone"
    PATH = "path"
    LINE = "line"  # a sentence a caller hears: whitespace collapsed, at most MAX_LINE_CHARS


@dataclass(frozen=True, slots=True)
class EnvSetting:
    """What the environment variable behind one ``Settings`` field is, and how it is read."""

    name: str
    kind: Kind
    doc: str
    section: str
    unit: str = ""
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    old_names: tuple[str, ...] = ()  # still read, for one release, with a deprecation warning
    required: bool = False
    example: str | None = None  # what .env.example shows instead of the default (a placeholder)
    above: bool = False  # the minimum itself is not allowed (a retention of 0 days would delete every record)
    unset_means: str = ""  # what leaving it empty does, said in the error when that is not obvious
    shown_default: str | None = None  # the default in words, where the value isn't fixed


def env(default: Any, name: str, kind: Kind, doc: str, *, section: str, factory: Any = None, **details: Any) -> Any:
    """A ``Settings`` field read from the environment variable ``name``."""
    metadata = {"env": EnvSetting(name, kind, doc, section, **details)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=kind is not Kind.SECRET)
    return field(default=default, metadata=metadata, repr=kind is not Kind.SECRET)


@dataclass(frozen=True, slots=True)
class Limits:
    """Deadlines and caps no environment variable sets (docs/architecture.md); tests shorten them."""

    # The agent session.
    keepalive_seconds: float = 5.0  # KeepAlive after this long without audio to Deepgram
    start_timeout_seconds: float = 10.0  # Twilio's start event must come within this
    agent_reconnect_delays: tuple[float, ...] = (0.25, 0.75, 1.5)  # before each resume attempt after the first
    hangup_timeout_seconds: float = 10.0  # the longest wait for last words to be heard
    # Peers that are broken or hostile.
    stall_timeout_seconds: float = 5.0  # a peer that reads nothing of ours this long is cut off
    close_timeout_seconds: float = 1.0
    ping_interval_seconds: float = 20.0  # a silent peer is pinged, and failed if no pong comes as long
    handshake_timeout_seconds: float = 10.0
    max_handshakes: int = 256  # connections still in their HTTP request, so descriptors can't run out
    max_record_bytes: int = 1_000_000  # one call record's events; the summary comes on top
    caller_frames_per_second: float = 200.0  # Twilio sends 50; the rest is room for bursts
    max_caller_frame_burst: int = 1000
    max_agent_queue_bytes: int = 160_000  # caller audio waiting for the agent (20 s)
    # Outgoing HTTP.
    twilio_api_timeout_seconds: float = 10.0  # per REST attempt
    twilio_api_backoff_seconds: float = 0.5  # the first retry's wait; it doubles
    webhook_attempt_timeout_seconds: float = 10.0
    webhook_backoff_seconds: float = 0.5  # the first retry's wait; it doubles, up to 30 s
    max_webhook_deliveries_queued: int = 1000  # more are dropped (the records keep them)
    webhook_drain_timeout_seconds: float = 5.0  # at shutdown, after the calls ended


DEEPGRAM, SERVER, TWILIO, CALLS, RECORDS, WEBHOOK, PHONE_PAGE = (
    "Deepgram", "The server", "Twilio", "Call control", "Records and privacy", "The end-of-call webhook", "The browser phone",
)


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings, from the environment (``.env``) and command-line flags."""

    deepgram_api_key: str = env(
        "", "DEEPGRAM_API_KEY", Kind.SECRET, "Your Deepgram API key (https://console.deepgram.com); never logged.",
        section=DEEPGRAM, required=True, example="your-deepgram-api-key",
    )
    deepgram_agent_url: str = env(
        "wss://agent.deepgram.com/v1/agent/converse", "DEEPGRAM_AGENT_URL", Kind.URL,
        "The Voice Agent endpoint; change it only for a proxy, a test server or the fake agent.", section=DEEPGRAM,
    )
    host: str = env("127.0.0.1", "HOST", Kind.TEXT, "Address to listen on (--host overrides it); 0.0.0.0 listens on every interface.", section=SERVER)
    port: int = env(5000, "PORT", Kind.INTEGER, "Port to listen on (--port overrides it).", section=SERVER, unit="port", minimum=0, maximum=65535)
    public_url: str | None = env(
        None, "PUBLIC_URL", Kind.URL, "Your public base URL as Twilio reaches it (https://abc123.ngrok-free.app): the TwiML's host, and what signatures are checked against.",
        section=SERVER,
    )
    log_level: str = env("INFO", "LOG_LEVEL", Kind.CHOICE, "DEBUG, INFO, WARNING, ERROR or CRITICAL.", section=SERVER, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    max_calls: int = env(200, "MAX_CALLS", Kind.INTEGER, "Concurrent calls per server process; the next handshake gets HTTP 503.", section=SERVER, unit="calls", minimum=1, maximum=100_000)
    metrics_port: int | None = env(
        None, "METRICS_PORT", Kind.INTEGER, "Serve Prometheus' /metrics on this port only, not on PORT (unset: /metrics is on PORT).",
        section=SERVER, unit="port", minimum=1, maximum=65535,
    )
    drain_timeout_seconds: float = env(30.0, "DRAIN_TIMEOUT_SECONDS", Kind.NUMBER, "After SIGTERM, how long live calls may carry on before they are ended.", section=SERVER, unit="seconds", minimum=0.0, old_names=("DRAIN_SECONDS",))
    function_timeout_seconds: float = env(10.0, "FUNCTION_TIMEOUT_SECONDS", Kind.NUMBER, "How long a business function may take before the agent is told it failed.", section=SERVER, unit="seconds", minimum=0.1)
    agent_connect_timeout_seconds: float = env(10.0, "AGENT_CONNECT_TIMEOUT_SECONDS", Kind.NUMBER, "How long connecting to Deepgram, Welcome and SettingsApplied may take before the call is ended.", section=SERVER, unit="seconds", minimum=0.5)
    inbound_chunk_bytes: int = env(
        3200, "INBOUND_CHUNK_BYTES", Kind.INTEGER, "Caller audio per message to Deepgram, in bytes of 8 kHz mulaw (160 = 20 ms, 3200 = 400 ms).",
        section=SERVER, unit="bytes", minimum=160, maximum=64000, old_names=("INBOUND_BUFFER_BYTES",),
    )
    state_dir: Path = env(
        PROJECT_DIR / "data" / "state", "STATE_DIR", Kind.PATH, "Where the processes of one machine share the claims and notes that let a Twilio callback reach any of them.",
        section=SERVER, shown_default="data/state",
    )

    twilio_auth_token: str | None = env(None, "TWILIO_AUTH_TOKEN", Kind.SECRET, "Your Twilio auth token: /twilio and Twilio's callbacks then need a valid X-Twilio-Signature.", section=TWILIO)
    twilio_account_sid: str | None = env(None, "TWILIO_ACCOUNT_SID", Kind.TEXT, "Your Account SID (AC and 32 characters): with TWILIO_AUTH_TOKEN, it turns on Twilio's REST API.", section=TWILIO)
    twilio_phone_number: str | None = env(None, "TWILIO_PHONE_NUMBER", Kind.PHONE, "Your Twilio number in E.164 form (+15551234567): the caller ID of outbound calls and of warm transfers.", section=TWILIO)
    twilio_api_url: str = env("https://api.twilio.com", "TWILIO_API_URL", Kind.URL, "Twilio's REST API; change it only to reach a test server.", section=TWILIO)
    stream_binding_secret: str | None = env(
        None, "STREAM_BINDING_SECRET", Kind.SECRET, "The key of the MACs that bind each stream to its call (unset: one derived from TWILIO_AUTH_TOKEN).",
        section=TWILIO, minimum=MIN_BINDING_SECRET_CHARS,
    )
    allow_unbound_call_control: bool = env(False, "ALLOW_UNBOUND_CALL_CONTROL", Kind.BOOLEAN, "Let REST actions (transfer, fallback, recording) act on streams not bound to their call, such as a TwiML Bin's.", section=TWILIO)

    transfer_number: str | None = env(None, "TRANSFER_NUMBER", Kind.PHONE, "Where transfer_call sends callers (a pharmacist's phone), in E.164 form; never taken from the agent.", section=CALLS)
    transfer_mode: str = env("cold", "TRANSFER_MODE", Kind.CHOICE, "cold: the caller is put through at once; warm: the pharmacist hears who is calling and accepts first.", section=CALLS, choices=("cold", "warm"))
    transfer_timeout_seconds: float = env(30.0, "TRANSFER_TIMEOUT_SECONDS", Kind.NUMBER, "How long a warm transfer waits for the pharmacist to answer and accept.", section=CALLS, unit="seconds", minimum=5.0, maximum=600.0)
    fallback_number: str | None = env(None, "FALLBACK_NUMBER", Kind.PHONE, "Where callers go when the AI agent is unavailable (unset: an apology, then the call ends).", section=CALLS)
    dtmf_timeout_seconds: float = env(2.0, "DTMF_TIMEOUT_SECONDS", Kind.NUMBER, "Keypad digits go to the agent on # or after this long without a new one.", section=CALLS, unit="seconds", minimum=0.1)
    idle_reprompt_seconds: float = env(10.0, "IDLE_REPROMPT_SECONDS", Kind.NUMBER, "Caller silence before the agent re-prompts; 0 turns silence handling off.", section=CALLS, unit="seconds", minimum=0.0)
    idle_hangup_seconds: float = env(30.0, "IDLE_HANGUP_SECONDS", Kind.NUMBER, "Further silence after the re-prompt before the agent says goodbye and the call ends.", section=CALLS, unit="seconds", minimum=1.0)
    call_recording: str = env("off", "CALL_RECORDING", Kind.CHOICE, "off, or dual: record each bound call in two channels once the caller has heard the recording notice.", section=CALLS, choices=("off", "dual"))
    recording_notice: str = env(RECORDING_NOTICE, "RECORDING_NOTICE", Kind.LINE, "What the caller hears before recording starts; an agent's file may set its own.", section=CALLS, shown_default="a built-in sentence")

    record_calls: bool = env(True, "RECORD_CALLS", Kind.BOOLEAN, "Write one JSON Lines record per call into CALLS_DIR.", section=RECORDS)
    calls_dir: Path = env(PROJECT_DIR / "calls", "CALLS_DIR", Kind.PATH, "Folder for the call records, owner-only; a relative path is taken from the project folder.", section=RECORDS, shown_default="calls")
    records_retention_days: float | None = env(None, "RECORDS_RETENTION_DAYS", Kind.NUMBER, "Delete call records older than this, at startup and hourly (unset: keep them).", section=RECORDS, unit="days", minimum=0.0, above=True, unset_means="keeps records forever")
    store_transcripts: str = env("full", "STORE_TRANSCRIPTS", Kind.CHOICE, "What of callers' words records, the webhook and logs keep: full, redacted or none.", section=RECORDS, choices=("full", "redacted", "none"))
    database_url: str | None = env(None, "DATABASE_URL", Kind.SECRET, "PostgreSQL (postgresql://user:password@host:5432/pharmacy) for the orders and what the processes share, instead of the SQLite file and STATE_DIR.", section=RECORDS)

    call_webhook_url: str | None = env(None, "CALL_WEBHOOK_URL", Kind.SECRET, "POST each finished call's summary, signed, to this http(s) URL (unset: no webhook).", section=WEBHOOK)
    call_webhook_secret: str | None = env(None, "CALL_WEBHOOK_SECRET", Kind.SECRET, "The HMAC-SHA256 key the webhook's requests are signed with; required with CALL_WEBHOOK_URL.", section=WEBHOOK, minimum=MIN_WEBHOOK_SECRET_CHARS)
    call_webhook_retry_seconds: float = env(60.0, "CALL_WEBHOOK_RETRY_SECONDS", Kind.NUMBER, "How long one delivery is retried, with backoff, while the receiver fails; 0 tries once.", section=WEBHOOK, unit="seconds", minimum=0.0)

    phone_page: bool = env(False, "PHONE_PAGE", Kind.BOOLEAN, "Serve the browser softphone at /phone; main.py prints its address with the token.", section=PHONE_PAGE)
    phone_page_token: str = env(
        None, "PHONE_PAGE_TOKEN", Kind.SECRET, "The token the phone page needs (unset: random at each start).", section=PHONE_PAGE,
        factory=lambda: secrets.token_urlsafe(18), shown_default="random at each start",
    )

    # Not from the environment.
    limits: Limits = field(default_factory=Limits)
    # The lines every agent says unless its file says otherwise (docs/agents.md).
    caller_lines: CallerLines = field(default_factory=CallerLines)
    deprecations: tuple[str, ...] = ()  # one sentence per old name in use, logged at startup

    @property
    def rest_enabled(self) -> bool:
        """The bridge can change live calls through Twilio's REST API."""
        return bool(self.twilio_account_sid and self.twilio_auth_token)

    @property
    def binding_key(self) -> bytes | None:
        """The key of the MACs that bind streams to their calls; None when the bridge has none."""
        return binding_key(self.stream_binding_secret, self.twilio_auth_token)

    @property
    def browser_only(self) -> bool:
        """Only the browser phone is in use: PHONE_PAGE on and nothing of Twilio's set.

        Then startup says nothing about TwiML or Twilio; setting any of PUBLIC_URL or a TWILIO_*,
        TRANSFER_NUMBER or FALLBACK_NUMBER variable means phone calls are meant too.
        """
        return self.phone_page and not (
            self.public_url
            or self.twilio_auth_token
            or self.twilio_account_sid
            or self.twilio_phone_number
            or self.transfer_number
            or self.fallback_number
        )

    @property
    def transfer_enabled(self) -> bool:
        return self.rest_enabled and bool(self.transfer_number)

    @property
    def outbound_enabled(self) -> bool:
        return self.rest_enabled and bool(self.twilio_phone_number and self.public_url)

    @property
    def public_base_url(self) -> str:
        """``https://host`` of PUBLIC_URL: what Twilio's callbacks are addressed to, and signed with."""
        return f"https://{self.public_host}"

    @property
    def public_host(self) -> str:
        """The host Twilio reaches us at, for the TwiML users paste."""
        if not self.public_url:
            return "YOUR-NGROK-HOST"
        return urlsplit(self.public_url).netloc or self.public_url

    @property
    def stream_url(self) -> str:
        """The exact URL Twilio is given, which is also what it signs (docs/protocols.md section 4)."""
        return f"wss://{self.public_host}/twilio"

    @property
    def twiml(self) -> str:
        return f'<Response><Connect><Stream url="{self.stream_url}"/></Connect></Response>'


# The lines a caller hears, once process-wide variables, now the agents' own (bridge.lines).
DEPRECATED_LINE_VARIABLES = {
    "VOICEMAIL_MESSAGE": "voicemail",
    "IDLE_REPROMPT_MESSAGE": "idle_reprompt",
    "IDLE_GOODBYE_MESSAGE": "idle_goodbye",
}


def environment_fields() -> list[tuple[Field[Any], EnvSetting]]:
    """Every ``Settings`` field read from the environment, in the table's order."""
    return [(item, item.metadata["env"]) for item in fields(Settings) if "env" in item.metadata]


def setting_names() -> list[str]:
    """Every variable the settings read, current names only."""
    return [setting.name for _, setting in environment_fields()]


def default_of(item: Field[Any]) -> Any:
    if item.default is not MISSING:
        return item.default
    return None  # a factory's value is made at each start (PHONE_PAGE_TOKEN): no fixed default


# ------------------------------------------------------------------------------ reading one


def _raw(environ: Mapping[str, str], setting: EnvSetting, deprecations: list[str]) -> str:
    raw = environ.get(setting.name, "").strip()
    if raw:
        return raw
    for old in setting.old_names:
        value = environ.get(old, "").strip()
        if value:
            deprecations.append(
                f"{old} is now called {setting.name}: rename it in .env; the old name stops working in the next release."
            )
            return value
    return ""


def _parse(setting: EnvSetting, raw: str) -> Any:
    """One variable's value from its text; ConfigError with one sentence if it isn't one."""
    name, kind = setting.name, setting.kind
    if kind is Kind.INTEGER:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}.") from None
        if not setting.minimum <= value <= setting.maximum:  # type: ignore[operator]
            raise ConfigError(f"{name} must be between {setting.minimum:g} and {setting.maximum:g}, got {value}.")
        return value
    if kind is Kind.NUMBER:
        low, high = setting.minimum or 0.0, setting.maximum
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        # nan and inf would pass a plain comparison and then break every timer that uses them.
        too_low = number <= low if setting.above else number < low
        if not math.isfinite(number) or too_low or (high is not None and number > high):
            bound = f"greater than {low:g}" if setting.above else f"of at least {low:g}"
            if high is not None:
                bound += f" and at most {high:g}"
            unset = f" (empty {setting.unset_means})" if setting.unset_means else ""
            raise ConfigError(f"{name} must be a number of {setting.unit} {bound}{unset}, got {raw!r}.")
        return number
    if kind is Kind.BOOLEAN:
        lowered = raw.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}.")
    if kind is Kind.CHOICE:
        value = raw.upper() if setting.choices[0].isupper() else raw.lower()
        if value not in setting.choices:
            raise ConfigError(f"{name} must be {', '.join(setting.choices[:-1])} or {setting.choices[-1]}, got {raw!r}.")
        return value
    if kind is Kind.PHONE:
        number = re.sub(r"[\s().-]", "", raw)  # people write +1 (555) 123-4567
        if not E164.fullmatch(number):
            raise ConfigError(f"{name} must be a phone number in E.164 form like +15551234567, got {raw!r}.")
        return number
    if kind is Kind.PATH:
        path = Path(raw).expanduser()
        # Relative to the project, as PHARMACY_DB is, so the same files are found however it starts.
        return path if path.is_absolute() else PROJECT_DIR / path
    if kind is Kind.LINE:
        text = " ".join(raw.split())  # newlines from a .env collapse to single spaces
        if len(text) > MAX_LINE_CHARS:
            raise ConfigError(f"{name} must be at most {MAX_LINE_CHARS} characters, got {len(text)}.")
        return text
    if kind is Kind.SECRET and setting.minimum is not None and len(raw) < setting.minimum:
        raise ConfigError(f"{name} must be at least {setting.minimum:g} characters, got {len(raw)}.")
    return raw  # TEXT, URL (checked with the others below), SECRET


# ---------------------------------------------------------------------------- the settings


def load_settings(environ: Mapping[str, str], *, host: str | None = None, port: int | None = None) -> Settings:
    """Build ``Settings`` from environment variables; flags given here override them."""
    deprecations: list[str] = []
    values: dict[str, Any] = {}
    for item, setting in environment_fields():
        raw = _raw(environ, setting, deprecations)
        if raw:
            values[item.name] = _parse(setting, raw)
    if host:
        values["host"] = host
    if port is not None:
        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be between 0 and 65535, got {port}.")
        values["port"] = port
    _check_together(values)
    lines = CallerLines(recording_notice=values.get("recording_notice", RECORDING_NOTICE))
    for variable, line in DEPRECATED_LINE_VARIABLES.items():
        raw = environ.get(variable, "").strip()
        if raw:
            text = _parse(EnvSetting(variable, Kind.LINE, "", ""), raw)
            lines = replace(lines, **{line: text})
            deprecations.append(
                f"{variable} is deprecated: put the line in each agent's file as \"bridge\": {{\"lines\": "
                f"{{\"{line}\": ...}}}} (docs/agents.md); until the next release it is the default for every agent."
            )
    return Settings(**values, caller_lines=lines, deprecations=tuple(deprecations))


def _check_together(values: dict[str, Any]) -> None:
    """The checks that look at more than one variable, or at a URL's parts."""
    api_key = values.get("deepgram_api_key", "")
    if not api_key:
        raise ConfigError("DEEPGRAM_API_KEY is not set: copy .env.example to .env and put your Deepgram API key in it.")
    if api_key.lower() in PLACEHOLDER_API_KEYS:
        raise ConfigError("DEEPGRAM_API_KEY is still the placeholder from .env.example: put your Deepgram API key in .env.")
    agent_url = values.get("deepgram_agent_url")
    if agent_url is not None and urlsplit(agent_url).scheme not in {"ws", "wss"}:
        raise ConfigError(f"DEEPGRAM_AGENT_URL must start with wss:// or ws://, got {agent_url!r}.")
    public_url = values.get("public_url")
    if public_url is not None:
        public_url = public_url.rstrip("/")
        values["public_url"] = public_url if "://" in public_url else "https://" + public_url
    account_sid, token = values.get("twilio_account_sid"), values.get("twilio_auth_token")
    if account_sid and not ACCOUNT_SID.fullmatch(account_sid):
        raise ConfigError(
            f"TWILIO_ACCOUNT_SID must be AC followed by 32 hexadecimal characters (see the Twilio console), got {account_sid[:40]!r}."
        )
    if account_sid and not token:
        raise ConfigError("TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not: the REST API needs both.")
    api_url = values.get("twilio_api_url")
    if api_url is not None:
        api_url = values["twilio_api_url"] = api_url.rstrip("/")
        if urlsplit(api_url).scheme not in {"http", "https"} or not urlsplit(api_url).netloc:
            raise ConfigError(f"TWILIO_API_URL must be an http(s):// URL, got {api_url!r}.")
    if token and not values.get("public_url"):
        raise ConfigError(
            "TWILIO_AUTH_TOKEN is set but PUBLIC_URL is not: Twilio signs the public URL "
            "(e.g. https://abc.ngrok.app), so the bridge needs it to check signatures."
        )
    database_url = values.get("database_url")
    if database_url and database_url.partition("://")[0].lower() not in {"postgresql", "postgres"}:
        # Nothing of the value is quoted back: it may hold a password.
        raise ConfigError("DATABASE_URL must be a postgresql:// URL, like postgresql://user:password@host:5432/pharmacy.")
    metrics_port, port = values.get("metrics_port"), values.get("port", 5000)
    if metrics_port is not None and metrics_port == port:
        raise ConfigError(f"METRICS_PORT must differ from the port the bridge listens on ({port}); leave it empty to serve /metrics there.")
    _check_webhook(values)
    if values.get("call_recording", "off") != "off" and not (values.get("twilio_account_sid") and values.get("twilio_auth_token")):
        raise ConfigError("CALL_RECORDING needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN: calls are recorded through Twilio's REST API.")
    if values.get("transfer_mode") == "warm" and values.get("transfer_number") and not values.get("twilio_phone_number"):
        raise ConfigError("TRANSFER_MODE=warm needs TWILIO_PHONE_NUMBER: the bridge calls the pharmacist from it.")


def _check_webhook(values: dict[str, Any]) -> None:
    """CALL_WEBHOOK_URL, checked; never quoted back in an error, since its query may hold a token."""
    raw = values.get("call_webhook_url")
    secret = values.get("call_webhook_secret")
    if not raw:
        return
    parts = urlsplit(raw)
    try:
        port = parts.port  # raises ValueError for a port that is no number or out of range
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError("CALL_WEBHOOK_URL has a port that is not a number from 1 to 65535.")
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ConfigError("CALL_WEBHOOK_URL must be an http:// or https:// URL with a host, like https://example.com/hooks/calls.")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("CALL_WEBHOOK_URL must not carry a user name or password: its requests are signed with CALL_WEBHOOK_SECRET.")
    if parts.fragment or not raw.isascii() or not raw.isprintable() or " " in raw:
        raise ConfigError("CALL_WEBHOOK_URL must be plain ASCII without spaces or a #fragment: percent-encode other characters.")
    if secret is None:
        raise ConfigError(
            "CALL_WEBHOOK_URL is set but CALL_WEBHOOK_SECRET is not: the webhook's requests are signed with it "
            "(at least 16 characters; python -c 'import secrets; print(secrets.token_hex(32))' makes one)."
        )


# --------------------------------------------------------------------------- .env.example

# Variables the application's own code reads (pharmacy_functions.py), not the bridge: listed in
# .env.example and the docs all the same. (name, default, doc line)
APPLICATION_VARIABLES = (
    ("PHARMACY_DB", "data/pharmacy.db", "The pharmacy's SQLite file (pharmacy_functions.py); a relative path is taken from the project folder."),
)


def env_example() -> str:
    """``.env.example``, written from the table: every variable under its doc line, set to its default."""
    out = ["# Copy this file to .env and fill in the values. Real environment variables override .env.",
           "# Every setting, its default and its meaning: docs/configuration.md."]
    section = None
    for item, setting in environment_fields():
        if setting.section != section:
            section = setting.section
            out += ["", f"# ---- {section}"]
        out.append(f"# {setting.doc}")
        out.append(f"{setting.name}={example_value(item, setting)}")
    out += ["", "# ---- The pharmacy"]
    for name, default, doc in APPLICATION_VARIABLES:
        out += [f"# {doc}", f"{name}={default}"]
    return "\n".join(out) + "\n"


def documented_default(item: Field[Any], setting: EnvSetting) -> str:
    """The settings table's Default cell: the value in backticks, or what it is in words."""
    if setting.required:
        return "*(required)*"
    if setting.shown_default is not None:
        shown = setting.shown_default
        return f"`{shown}`" if re.fullmatch(r"[\w./-]+", shown) else f"*({shown})*"
    value = example_value(item, setting)
    return f"`{value}`" if value else "*(unset)*"


def example_value(item: Field[Any], setting: EnvSetting) -> str:
    """What .env.example sets a variable to: a placeholder, or the default (empty: none, or not fixed)."""
    if setting.example is not None:
        return setting.example
    if setting.shown_default is not None:
        return ""
    default = default_of(item)
    if default is None:
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


if __name__ == "__main__":  # python -m bridge.settings > .env.example
    print(env_example(), end="")
