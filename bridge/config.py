"""Startup configuration: the process settings from the environment and the agent from config.json.

Everything here runs once, before the server listens (the agent files again on each SIGHUP
reload, in a thread), and either returns a validated value or raises ``ConfigError`` carrying
one sentence a user can act on. Nothing here does network I/O, so a typo in ``.env`` or
``config.json`` fails at startup rather than on the first real call. Every config file is read
by ``read_config_file`` and ``parse_json``: a regular file, at most 1 MB, at most 64 levels deep.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .agent_schema import SchemaError, check_settings

DEFAULT_AGENT_URL = "wss://agent.deepgram.com/v1/agent/converse"
DEFAULT_TWILIO_API_URL = "https://api.twilio.com"
DEFAULT_IDLE_REPROMPT_MESSAGE = "Are you still there? I'm here if you need anything."
DEFAULT_IDLE_GOODBYE_MESSAGE = "I haven't heard anything for a while, so I'll end the call now. Please call again any time. Goodbye."
DEFAULT_VOICEMAIL_MESSAGE = (
    "Hello, this is your pharmacy calling with a message about your prescription. "
    "Please call us back when it suits you. Thank you, and goodbye."
)
E164 = re.compile(r"\+[1-9][0-9]{6,14}")
ACCOUNT_SID = re.compile(r"AC[0-9a-fA-F]{32}")
# .env.example's value and its obvious variants: copied unchanged, they would fail only on the
# first call (Deepgram's 401), so startup refuses them.
PLACEHOLDER_API_KEYS = frozenset({
    "your-deepgram-api-key", "your_deepgram_api_key", "your-api-key", "your_api_key", "your-key",
    "<your-deepgram-api-key>", "changeme", "change-me", "xxx", "...", "…",
})

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Caps on a config file (config.json, an agent file, numbers.json). A real one is a few kilobytes
# and about 8 levels deep; a far bigger file is a mistake or an attack, and would otherwise sit
# in memory and go out in every call's Settings. The depth cap also bounds every later recursive
# walk of the parsed value (``${NAME}`` substitution, the schema check, the placeholder compiler).
MAX_CONFIG_FILE_BYTES = 1_000_000
MAX_JSON_DEPTH = 64


class ConfigError(Exception):
    """A startup problem, phrased as one sentence for the user."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Process settings, from the environment (``.env``) and command-line flags."""

    deepgram_api_key: str
    agent_url: str = DEFAULT_AGENT_URL
    host: str = "0.0.0.0"
    port: int = 5000
    public_url: str | None = None
    inbound_buffer_bytes: int = 3200
    log_level: str = "INFO"
    function_timeout_seconds: float = 10.0
    agent_connect_timeout_seconds: float = 10.0
    twilio_auth_token: str | None = None
    # Call control through Twilio's REST API (transfer, fallback, outbound calls).
    twilio_account_sid: str | None = None
    twilio_phone_number: str | None = None
    twilio_api_url: str = DEFAULT_TWILIO_API_URL
    transfer_number: str | None = None
    fallback_number: str | None = None
    voicemail_message: str = DEFAULT_VOICEMAIL_MESSAGE
    twilio_api_timeout_seconds: float = 10.0  # per REST attempt; tests shorten it
    twilio_api_backoff_seconds: float = 0.5
    # Keypad and silence (docs/call-control.md).
    dtmf_timeout_seconds: float = 2.0  # digits without a new one this long go to the agent
    idle_reprompt_seconds: float = 10.0  # caller silence before a re-prompt; 0 turns it off
    idle_hangup_seconds: float = 30.0  # further silence after the re-prompt before the goodbye
    idle_reprompt_message: str = DEFAULT_IDLE_REPROMPT_MESSAGE
    idle_goodbye_message: str = DEFAULT_IDLE_GOODBYE_MESSAGE
    metrics_port: int | None = None  # /metrics on a port of its own instead of the main one
    max_calls: int = 200
    drain_seconds: float = 30.0
    record_calls: bool = True
    calls_dir: Path = Path("calls")
    phone_page: bool = False
    phone_page_token: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    # PostgreSQL for the pharmacy store (pharmacy_functions.py); None keeps the SQLite file.
    database_url: str | None = None
    # The end-of-call webhook (docs/webhooks.md): the summary of each call, POSTed and signed.
    call_webhook_url: str | None = None
    call_webhook_secret: str | None = field(default=None, repr=False)
    call_webhook_retry_seconds: float = 60.0  # how long one delivery is retried
    webhook_attempt_timeout_seconds: float = 10.0  # not from the environment, nor the three below
    webhook_backoff_seconds: float = 0.5  # the first retry's wait; it doubles, up to 30 s
    webhook_queue_max: int = 1000  # deliveries waiting; more are dropped (the records keep them)
    webhook_drain_seconds: float = 5.0  # at shutdown, after the calls ended
    # Not from the environment: protocol timings that tests shorten.
    keepalive_seconds: float = 5.0
    start_timeout_seconds: float = 10.0
    agent_reconnect_delays: tuple[float, ...] = (0.25, 0.75, 1.5)
    hangup_timeout_seconds: float = 10.0
    # Deadlines and caps against peers that are broken or hostile (docs/architecture.md).
    stall_seconds: float = 5.0  # a peer that reads nothing of ours this long is cut off
    close_timeout_seconds: float = 1.0
    ping_interval_seconds: float = 20.0  # a silent peer is pinged, and failed if no pong comes as long
    handshake_timeout_seconds: float = 10.0
    max_handshakes: int = 256  # connections still in their HTTP request, so descriptors can't run out
    record_max_bytes: int = 1_000_000
    caller_frames_per_second: float = 200.0  # Twilio sends 50; the rest is room for bursts
    caller_frame_burst: int = 1000
    agent_queue_max_bytes: int = 160_000  # caller audio held while the agent isn't ready (20 s)

    @property
    def rest_enabled(self) -> bool:
        """The bridge can change live calls through Twilio's REST API."""
        return bool(self.twilio_account_sid and self.twilio_auth_token)

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


def _int(environ: Mapping[str, str], name: str, default: int, minimum: int, maximum: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}.") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}.")
    return value


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}.")
    return port


def _float(environ: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}.") from None
    if not math.isfinite(value) or value < minimum:  # nan and inf would pass a plain comparison
        raise ConfigError(f"{name} must be a number of seconds of at least {minimum}, got {raw!r}.")
    return value


def _phone_number(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    number = re.sub(r"[\s().-]", "", raw)  # people write +1 (555) 123-4567
    if not E164.fullmatch(number):
        raise ConfigError(f"{name} must be a phone number in E.164 form like +15551234567, got {raw!r}.")
    return number


def _metrics_port(environ: Mapping[str, str], port: int) -> int | None:
    if not environ.get("METRICS_PORT", "").strip():
        return None
    metrics_port = _int(environ, "METRICS_PORT", 0, 1, 65535)
    if metrics_port == port:
        raise ConfigError(f"METRICS_PORT must differ from the port the bridge listens on ({port}); leave it empty to serve /metrics there.")
    return metrics_port


def _webhook_url(environ: Mapping[str, str]) -> str | None:
    """CALL_WEBHOOK_URL, checked; never quoted back in an error, since its query may hold a token."""
    raw = environ.get("CALL_WEBHOOK_URL", "").strip()
    if not raw:
        return None
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
    return raw


def _webhook_secret(environ: Mapping[str, str], url: str | None) -> str | None:
    secret = environ.get("CALL_WEBHOOK_SECRET", "").strip() or None
    if url and secret is None:
        raise ConfigError(
            "CALL_WEBHOOK_URL is set but CALL_WEBHOOK_SECRET is not: the webhook's requests are signed with it "
            "(at least 16 characters; python -c 'import secrets; print(secrets.token_hex(32))' makes one)."
        )
    if url and secret is not None and len(secret) < 16:
        raise ConfigError(f"CALL_WEBHOOK_SECRET must be at least 16 characters, got {len(secret)}.")
    return secret


def _message(environ: Mapping[str, str], name: str, default: str) -> str:
    """A sentence the agent says; whitespace (newlines from a .env) collapses to single spaces."""
    text = " ".join(environ.get(name, "").split()) or default
    if len(text) > 1000:
        raise ConfigError(f"{name} must be at most 1000 characters, got {len(text)}.")
    return text


def _bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}.")


def load_settings(
    environ: Mapping[str, str],
    *,
    host: str | None = None,
    port: int | None = None,
) -> Settings:
    """Build ``Settings`` from environment variables; flags given here override them."""
    api_key = environ.get("DEEPGRAM_API_KEY", "").strip()
    if not api_key:
        raise ConfigError(
            "DEEPGRAM_API_KEY is not set: copy .env.example to .env and put your Deepgram API key in it."
        )
    if api_key.lower() in PLACEHOLDER_API_KEYS:
        raise ConfigError(
            "DEEPGRAM_API_KEY is still the placeholder from .env.example: put your Deepgram API key in .env."
        )
    agent_url = environ.get("DEEPGRAM_AGENT_URL", "").strip() or DEFAULT_AGENT_URL
    if urlsplit(agent_url).scheme not in {"ws", "wss"}:
        raise ConfigError(f"DEEPGRAM_AGENT_URL must start with wss:// or ws://, got {agent_url!r}.")
    log_level = environ.get("LOG_LEVEL", "").strip().upper() or "INFO"
    if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}.")
    public_url = environ.get("PUBLIC_URL", "").strip().rstrip("/") or None
    if public_url and "://" not in public_url:
        public_url = "https://" + public_url
    twilio_auth_token = environ.get("TWILIO_AUTH_TOKEN", "").strip() or None
    account_sid = environ.get("TWILIO_ACCOUNT_SID", "").strip() or None
    if account_sid and not ACCOUNT_SID.fullmatch(account_sid):
        raise ConfigError(
            f"TWILIO_ACCOUNT_SID must be AC followed by 32 hexadecimal characters (see the Twilio console), got {account_sid[:40]!r}."
        )
    if account_sid and not twilio_auth_token:
        raise ConfigError("TWILIO_ACCOUNT_SID is set but TWILIO_AUTH_TOKEN is not: the REST API needs both.")
    api_url = environ.get("TWILIO_API_URL", "").strip().rstrip("/") or DEFAULT_TWILIO_API_URL
    if urlsplit(api_url).scheme not in {"http", "https"} or not urlsplit(api_url).netloc:
        raise ConfigError(f"TWILIO_API_URL must be an http(s):// URL, got {api_url!r}.")
    voicemail = _message(environ, "VOICEMAIL_MESSAGE", DEFAULT_VOICEMAIL_MESSAGE)
    if twilio_auth_token and not public_url:
        raise ConfigError(
            "TWILIO_AUTH_TOKEN is set but PUBLIC_URL is not: Twilio signs the public URL "
            "(e.g. https://abc.ngrok.app), so the bridge needs it to check signatures."
        )
    database_url = environ.get("DATABASE_URL", "").strip() or None
    if database_url and database_url.partition("://")[0].lower() not in {"postgresql", "postgres"}:
        # Nothing of the value is quoted back: it may hold a password.
        raise ConfigError(
            "DATABASE_URL must be a postgresql:// URL, like postgresql://user:password@host:5432/pharmacy."
        )
    port_setting = _port(port) if port is not None else _int(environ, "PORT", 5000, 0, 65535)
    webhook_url = _webhook_url(environ)
    token = environ.get("PHONE_PAGE_TOKEN", "").strip()
    extra: dict[str, Any] = {"phone_page_token": token} if token else {}
    return Settings(
        deepgram_api_key=api_key,
        agent_url=agent_url,
        host=host or environ.get("HOST", "").strip() or "0.0.0.0",
        port=port_setting,
        public_url=public_url,
        inbound_buffer_bytes=_int(environ, "INBOUND_BUFFER_BYTES", 3200, 160, 64000),
        log_level=log_level,
        function_timeout_seconds=_float(environ, "FUNCTION_TIMEOUT_SECONDS", 10.0, 0.1),
        agent_connect_timeout_seconds=_float(environ, "AGENT_CONNECT_TIMEOUT_SECONDS", 10.0, 0.5),
        twilio_auth_token=twilio_auth_token,
        max_calls=_int(environ, "MAX_CALLS", 200, 1, 100_000),
        drain_seconds=_float(environ, "DRAIN_SECONDS", 30.0, 0.0),
        record_calls=_bool(environ, "RECORD_CALLS", True),
        calls_dir=Path(environ.get("CALLS_DIR", "").strip() or "calls"),
        phone_page=_bool(environ, "PHONE_PAGE", False),
        twilio_account_sid=account_sid,
        twilio_phone_number=_phone_number(environ, "TWILIO_PHONE_NUMBER"),
        twilio_api_url=api_url,
        transfer_number=_phone_number(environ, "TRANSFER_NUMBER"),
        fallback_number=_phone_number(environ, "FALLBACK_NUMBER"),
        voicemail_message=voicemail,
        metrics_port=_metrics_port(environ, port_setting),
        dtmf_timeout_seconds=_float(environ, "DTMF_TIMEOUT_SECONDS", 2.0, 0.1),
        idle_reprompt_seconds=_float(environ, "IDLE_REPROMPT_SECONDS", 10.0, 0.0),
        idle_hangup_seconds=_float(environ, "IDLE_HANGUP_SECONDS", 30.0, 1.0),
        idle_reprompt_message=_message(environ, "IDLE_REPROMPT_MESSAGE", DEFAULT_IDLE_REPROMPT_MESSAGE),
        idle_goodbye_message=_message(environ, "IDLE_GOODBYE_MESSAGE", DEFAULT_IDLE_GOODBYE_MESSAGE),
        database_url=database_url,
        call_webhook_url=webhook_url,
        call_webhook_secret=_webhook_secret(environ, webhook_url),
        call_webhook_retry_seconds=_float(environ, "CALL_WEBHOOK_RETRY_SECONDS", 60.0, 0.0),
        **extra,
    )


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """config.json after validation and ``${NAME}`` substitution."""

    settings: dict[str, Any]
    # Client-side function definitions by name: the ones without an ``endpoint``.
    client_functions: dict[str, dict[str, Any]]


def _substitute(value: Any, environ: Mapping[str, str], path: Path) -> Any:
    # Recursive, which is safe: parse_json refused anything deeper than MAX_JSON_DEPTH.
    if isinstance(value, str):
        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if not environ.get(name):
                raise ConfigError(f"{path} uses ${{{name}}} but {name} is not set in the environment (.env).")
            return environ[name]

        return _ENV_REFERENCE.sub(replace, value)
    if isinstance(value, list):
        return [_substitute(item, environ, path) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, environ, path) for key, item in value.items()}
    return value


def _object(value: Any, where: str, path: Path) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {where} must be a JSON object.")
    return value


def _check_audio_format(audio: dict[str, Any], direction: str, path: Path) -> None:
    fmt = _object(audio.get(direction), f'"audio.{direction}"', path)
    if fmt.get("encoding") != "mulaw" or fmt.get("sample_rate") != 8000:
        raise ConfigError(
            f'{path}: "audio.{direction}" must be encoding "mulaw" with sample_rate 8000 '
            f"(Twilio's format; the bridge does not transcode), got "
            f"{fmt.get('encoding')!r} at {fmt.get('sample_rate')!r}."
        )
    if direction == "output" and fmt.get("container", "none") != "none":
        raise ConfigError(
            f'{path}: "audio.output.container" must be "none": a {fmt["container"]!r} container puts '
            "headers into the audio stream, heard as clicks on the phone."
        )


def _think_providers(agent: dict[str, Any]) -> list[dict[str, Any]]:
    # ``think`` is one object, or a list of them as fallbacks.
    think = agent.get("think")
    if isinstance(think, list):
        return [item for item in think if isinstance(item, dict)]
    return [think] if isinstance(think, dict) else []


def parse_agent_config(text: str, path: Path, environ: Mapping[str, str]) -> AgentConfig:
    """Validate the text of config.json; ``path`` only names the file in errors."""
    raw = parse_json(text, path)
    settings = _object(raw, "the top level", path)
    for key in ("type", "audio", "agent"):
        if key not in settings:
            raise ConfigError(f'{path} is missing the "{key}" key of the Settings message.')
    if settings["type"] != "Settings":
        raise ConfigError(f'{path}: "type" must be "Settings", got {settings["type"]!r}.')
    # A string is the id of an agent saved in Deepgram's console: its functions are defined there.
    agent = settings["agent"] if isinstance(settings["agent"], dict) else {}

    client_functions: dict[str, dict[str, Any]] = {}
    for think in _think_providers(agent):
        functions = think.get("functions") or []
        if not isinstance(functions, list):
            raise ConfigError(f'{path}: "agent.think.functions" must be a list.')
        for definition in functions:
            if not isinstance(definition, dict) or not isinstance(definition.get("name"), str):
                raise ConfigError(f'{path}: every entry of "agent.think.functions" needs a "name".')
            if "client_side" in definition:
                raise ConfigError(
                    f'{path}: function {definition["name"]!r} must not set "client_side"; '
                    "Deepgram sets it (a function without an endpoint runs here)."
                )
            if definition.get("endpoint") is None:
                client_functions[definition["name"]] = definition
    try:
        # Every level against the v1 key table (bridge/agent_schema.py): the real server refuses
        # an unknown key anywhere with UNPARSABLE_CLIENT_MESSAGE, which would fail every call.
        check_settings(settings)
    except SchemaError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    audio = _object(settings["audio"], '"audio"', path)
    _check_audio_format(audio, "input", path)
    _check_audio_format(audio, "output", path)
    return AgentConfig(settings=_substitute(settings, environ, path), client_functions=client_functions)


def load_agent_config(path: Path, environ: Mapping[str, str], shown_as: Path | None = None) -> AgentConfig:
    """Read and validate config.json (or an agent file); errors name it as ``shown_as``, if given."""
    shown = shown_as or path
    return parse_agent_config(read_config_file(path, shown), shown, environ)


def read_config_file(path: Path, shown: Path | str, max_bytes: int = MAX_CONFIG_FILE_BYTES) -> str:
    """The text of a config file, if it is a regular file of at most ``max_bytes`` bytes of UTF-8.

    The file is opened without blocking and checked with ``fstat`` before anything is read: a
    FIFO would otherwise wait for a writer forever, and a device or a huge file would never end
    or fill the memory. At most ``max_bytes + 1`` bytes are read, in case the size lied (files
    in /proc say 0) or the file grew after the check. ``shown`` names the file in errors.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise ConfigError(f"Cannot read {shown}: {exc.strerror or exc}.") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"{shown} is {_file_kind(info.st_mode)}, not a regular file; the bridge reads only regular "
                "files, so put the JSON file itself there."
            )
        if info.st_size > max_bytes:
            raise ConfigError(_too_big(shown, f"{info.st_size:,} bytes", max_bytes))
        with open(descriptor, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    except OSError as exc:
        raise ConfigError(f"Cannot read {shown}: {exc.strerror or exc}.") from None
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise ConfigError(_too_big(shown, f"more than {max_bytes:,} bytes", max_bytes))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{shown} is not UTF-8 text.") from None


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _too_big(shown: Path | str, size: str, max_bytes: int) -> str:
    return (
        f"{shown} is {size}, over the limit of {max_bytes:,} bytes for a config file; "
        "an agent's Settings are a few kilobytes, so check that this is the right file."
    )


def parse_json(text: str, shown: Path | str) -> Any:
    """The JSON value of a config file's text, at most ``MAX_JSON_DEPTH`` levels deep."""

    def refuse_constant(name: str) -> Any:  # Python's json takes them; Deepgram's server would not
        raise ConfigError(f"{shown} is not valid JSON: {name} is not a JSON number.")

    try:
        value = json.loads(text, parse_constant=refuse_constant)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{shown} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.") from None
    except RecursionError:  # nested deeper than the interpreter's recursion limit (about 1000)
        raise ConfigError(_too_deep(shown)) from None
    except ValueError:  # int()'s own limit on the digits of a number
        raise ConfigError(f"{shown} has a number of more than {sys.get_int_max_str_digits()} digits.") from None
    _check_depth(value, shown)
    return value


def _check_depth(value: Any, shown: Path | str) -> None:
    # A loop, not recursion: this is the check that makes the recursive walks after it safe.
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_JSON_DEPTH:
            raise ConfigError(_too_deep(shown))
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _too_deep(shown: Path | str) -> str:
    return (
        f"{shown} nests objects and lists more than {MAX_JSON_DEPTH} levels deep; "
        "a Settings message needs about 8, so check the file for runaway brackets."
    )
