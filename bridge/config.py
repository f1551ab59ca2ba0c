"""The agent files: config.json (and each agents/NAME.json) read, checked and made ready to send.

Everything here runs at startup (the agent files again on each SIGHUP reload, in a thread), and
either returns a validated value or raises ``ConfigError`` carrying one sentence a user can act
on. Nothing here does network I/O, so a typo in ``config.json`` fails at startup rather than on
the first real call. Every config file is read by ``read_config_file`` and ``parse_json``: a
regular file, at most 1 MB, at most 64 levels deep. The process settings (``.env``) are
bridge/settings.py's.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent_schema import SchemaError, check_settings
from .caller_lines import LINE_NAMES, line_problem
from .settings import ConfigError
from .twilio import SAY_LANGUAGE, SAY_VOICE, SayVoice

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

# Caps on a config file (config.json, an agent file, numbers.json). A real one is a few kilobytes
# and about 8 levels deep; a far bigger file is a mistake or an attack, and would otherwise sit
# in memory and go out in every call's Settings. The depth cap also bounds every later recursive
# walk of the parsed value (``${NAME}`` substitution, the schema check, the placeholder compiler).
MAX_CONFIG_FILE_BYTES = 1_000_000
MAX_JSON_DEPTH = 64


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """config.json after validation and ``${NAME}`` substitution."""

    settings: dict[str, Any]
    # Client-side function definitions by name: the ones without an ``endpoint``.
    client_functions: dict[str, dict[str, Any]]
    # Function name -> its parameters marked ``"sensitive": true`` (the marker is not sent to Deepgram).
    sensitive_parameters: dict[str, frozenset[str]] = field(default_factory=dict)
    lines: dict[str, str] = field(default_factory=dict)  # the "bridge.lines" the file sets
    transfer_mode: str | None = None  # "bridge.transfer_mode", if the file sets one
    twilio_say: SayVoice | None = None  # "bridge.twilio_say", if the file sets one


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
    # The bridge's own part of the file is not Deepgram's: read here, never sent.
    bridge_section = _bridge_section(settings.pop(BRIDGE_KEY, None), path)
    # A string is the id of an agent saved in Deepgram's console: its functions are defined there.
    agent = settings["agent"] if isinstance(settings["agent"], dict) else {}

    client_functions: dict[str, dict[str, Any]] = {}
    sensitive_parameters: dict[str, frozenset[str]] = {}
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
            sensitive = _take_sensitive_markers(definition, path)
            if sensitive:
                sensitive_parameters[definition["name"]] = sensitive
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
    return AgentConfig(
        settings=_substitute(settings, environ, path),
        client_functions=client_functions,
        sensitive_parameters=sensitive_parameters,
        lines=bridge_section.lines,
        transfer_mode=bridge_section.transfer_mode,
        twilio_say=bridge_section.twilio_say,
    )


BRIDGE_KEY = "bridge"
SENSITIVE_KEY = "sensitive"
TRANSFER_MODES = ("cold", "warm")


@dataclass(frozen=True, slots=True)
class BridgeSection:
    """An agent file's ``"bridge"`` object: what the bridge, not Deepgram, does for this agent."""

    lines: dict[str, str] = field(default_factory=dict)  # the lines it sets; the rest are the defaults
    transfer_mode: str | None = None
    twilio_say: SayVoice | None = None


def _bridge_section(value: Any, path: Path) -> BridgeSection:
    if value is None:
        return BridgeSection()
    section = _object(value, '"bridge"', path)
    _known_keys(section, ("lines", "transfer_mode", "twilio_say"), '"bridge"', path)
    lines = _object(section.get("lines", {}), '"bridge.lines"', path)
    _known_keys(lines, LINE_NAMES, '"bridge.lines"', path)
    said: dict[str, str] = {}
    for name, text in lines.items():
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{path}: "bridge.lines.{name}" must be a sentence (text), got {text!r}.')
        said[name] = " ".join(text.split())
        if (problem := line_problem(name, said[name])) is not None:
            raise ConfigError(f'{path}: "bridge.lines.{name}" {problem}.')
    mode = section.get("transfer_mode")
    if mode is not None and mode not in TRANSFER_MODES:
        raise ConfigError(f'{path}: "bridge.transfer_mode" must be "cold" or "warm", got {mode!r}.')
    return BridgeSection(said, mode, _twilio_say(section.get("twilio_say"), path))


def _twilio_say(value: Any, path: Path) -> SayVoice | None:
    """``bridge.twilio_say``: the language and voice Twilio reads this agent's lines in."""
    if value is None:
        return None
    say = _object(value, '"bridge.twilio_say"', path)
    _known_keys(say, ("language", "voice"), '"bridge.twilio_say"', path)
    for key, pattern, example in (("language", SAY_LANGUAGE, "es-ES"), ("voice", SAY_VOICE, "Polly.Lucia-Neural")):
        if key in say and not (isinstance(say[key], str) and pattern.fullmatch(say[key])):
            raise ConfigError(
                f'{path}: "bridge.twilio_say.{key}" must be one of Twilio\'s <Say> {key} names, '
                f"like {example!r}, got {str(say[key])[:60]!r}."
            )
    return SayVoice(language=say.get("language", ""), voice=say.get("voice", ""))


def _known_keys(value: dict[str, Any], known: tuple[str, ...], where: str, path: Path) -> None:
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else f" (known: {', '.join(known)})"
            raise ConfigError(f"{path}: {where} has an unknown key {str(key)[:60]!r}{hint}.")


def _take_sensitive_markers(definition: dict[str, Any], path: Path) -> frozenset[str]:
    """The parameters a function's declaration marks ``"sensitive": true``, the markers removed.

    Deepgram refuses keys it doesn't know, so the marker never reaches it; its values are then
    redacted wherever STORE_TRANSCRIPTS=redacted keeps function arguments and results.
    """
    parameters = definition.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict):
        return frozenset()
    marked = set()
    for name, schema in properties.items():
        if isinstance(schema, dict) and SENSITIVE_KEY in schema:
            flag = schema.pop(SENSITIVE_KEY)
            if not isinstance(flag, bool):
                raise ConfigError(
                    f'{path}: "sensitive" of parameter {name!r} of function {definition["name"]!r} must be true or false, got {flag!r}.'
                )
            if flag:
                marked.add(name)
    return frozenset(marked)


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
