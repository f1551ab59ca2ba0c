"""The agent files: config.json (and each agents/NAME.json) read, checked and made ready to send.

Everything here runs at startup (and on SIGHUP), before any call uses the result, and either
returns a validated value or raises ``ConfigError`` carrying one sentence a user can act on.
Nothing here does network I/O, so a typo in ``config.json`` fails at startup rather than on the
first real call. The process settings (``.env``) are bridge/settings.py's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent_schema import SchemaError, check_settings
from .settings import ConfigError

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """config.json after validation and ``${NAME}`` substitution."""

    settings: dict[str, Any]
    # Client-side function definitions by name: the ones without an ``endpoint``.
    client_functions: dict[str, dict[str, Any]]
    # Function name -> its parameters marked ``"sensitive": true`` (the marker is not sent to Deepgram).
    sensitive_parameters: dict[str, frozenset[str]] = field(default_factory=dict)


def _substitute(value: Any, environ: Mapping[str, str], path: Path) -> Any:
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
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"Cannot read the agent config {shown}: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{shown} is not UTF-8 text.") from None
    return parse_agent_config(text, shown, environ)
