"""The agents a bridge serves, and the per-call Settings each call gets (docs/agents.md).

``config.json`` is the default agent; each ``agents/NAME.json`` beside it is an agent named
NAME, validated exactly like config.json; ``agents/numbers.json`` maps called numbers to agents.
All of it is loaded into an immutable ``AgentCatalog``. A call picks its agent at its ``start``
event from the stream's custom parameters (the TwiML ``<Parameter>``s): the ``agent`` parameter
first, then the called number (``To``) in numbers.json, then the default agent.

String values of an agent's Settings may hold placeholders, filled from the same parameters:

- ``{{name}}``: the parameter ``name``, or empty text if the call has none;
- ``{{name|default text}}``: the parameter, or ``default text`` if the call has none.

A name is letters, digits and underscores; a default is any text without ``{``, ``}`` or ``|``.
Any other ``{{`` in a string is a startup error. Values are inserted as text: they are never
parsed as JSON, nor scanned for placeholders of their own.

Rendering is the per-call cost, so the work is done at load time: the Settings message is
encoded once, with a marker in place of every string that holds placeholders. A call then joins
the encoded pieces with its own strings, each JSON-encoded on its own, and copies only the
containers on the path to a placeholder for its Settings dict. An agent without placeholders
hands every call the same (read-only) dict and text. Nothing here does I/O except
``load_catalog``, which reads every file through ``bridge.config.read_config_file`` (regular files
of at most 1 MB, at most 64 levels deep, so the walks here need no depth guard of their own).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .agent_protocol import settings_message
from .caller_lines import CallerLines
from .config import AgentConfig, load_agent_config, parse_json, read_config_file
from .settings import E164, ConfigError, Settings
from .functions import check_function_map

DEFAULT_AGENT = "default"
AGENT_PARAMETER = "agent"
CALLED_NUMBER_PARAMETER = "To"
NUMBERS_FILE = "numbers.json"
AGENTS_DIR = "agents"
# Twilio keeps custom parameters short; a longer value is cut here, so no caller-side value can
# blow up the prompt sent to Deepgram.
MAX_VALUE_CHARS = 500
MAX_AGENTS = 100
MAX_PLACEHOLDERS = 200  # placeholder occurrences per agent
AGENT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
PLACEHOLDER = re.compile(r"\{\{([A-Za-z0-9_]+)(?:\|([^{}|]*))?\}\}")

Path_ = tuple[str | int, ...]  # keys and indexes from the Settings root to a value


@dataclass(frozen=True, slots=True)
class TemplateString:
    """One string value with placeholders: literal text and (name, default) pairs, in order."""

    path: Path_
    parts: tuple[str | tuple[str, str], ...]

    def render(self, parameters: Mapping[str, str]) -> str:
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                name, default = part
                value = parameters.get(name)
                out.append(default if value is None else value[:MAX_VALUE_CHARS])
        return "".join(out)


@dataclass(frozen=True, slots=True)
class SettingsTemplate:
    """An agent's Settings, ready to be filled in for one call."""

    settings: dict[str, Any]  # as validated, placeholders still in; shared, never changed
    encoded: tuple[str, ...]  # the Settings message split at each template string (one more piece)
    strings: tuple[TemplateString, ...]

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The parameter names this agent uses, sorted, each once."""
        names = {part[0] for string in self.strings for part in string.parts if not isinstance(part, str)}
        return tuple(sorted(names))

    def render(self, parameters: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        """This call's Settings dict and Settings message text."""
        if not self.strings:
            return self.settings, self.encoded[0]
        values = [string.render(parameters) for string in self.strings]
        pieces = [self.encoded[0]]
        for value, piece in zip(values, self.encoded[1:]):
            pieces.append(json.dumps(value))
            pieces.append(piece)
        root: dict[str, Any] = dict(self.settings)
        copied: dict[int, Any] = {id(self.settings): root}  # originals already copied for this call
        for string, value in zip(self.strings, values):
            container: Any = root
            original: Any = self.settings
            for key in string.path[:-1]:
                original = original[key]
                copy = copied.get(id(original))
                if copy is None:
                    copy = dict(original) if isinstance(original, dict) else list(original)
                    copied[id(original)] = copy
                    container[key] = copy
                container = copy
            container[string.path[-1]] = value
        return root, "".join(pieces)


def compile_template(settings: dict[str, Any], source: str) -> SettingsTemplate:
    """Find every placeholder in ``settings``; ``source`` names the file in errors."""
    strings: list[TemplateString] = []
    nonce = secrets.token_hex(8)

    def walk(value: Any, path: Path_) -> Any:
        if isinstance(value, dict):
            return {key: walk(item, (*path, key)) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item, (*path, index)) for index, item in enumerate(value)]
        if isinstance(value, str) and "{{" in value:
            parts = _parse(value, path, source)
            if any(not isinstance(part, str) for part in parts):
                strings.append(TemplateString(path, parts))
                return f"placeholder-{nonce}-{len(strings) - 1}"
        return value

    marked = walk(settings, ())
    occurrences = sum(1 for string in strings for part in string.parts if not isinstance(part, str))
    if occurrences > MAX_PLACEHOLDERS:
        raise ConfigError(f"{source} uses {occurrences} placeholders; at most {MAX_PLACEHOLDERS} are allowed.")
    text = settings_message(marked, [])
    encoded = []
    for index in range(len(strings)):
        marker = json.dumps(f"placeholder-{nonce}-{index}")
        before, found, text = text.partition(marker)
        assert found, "every marker is in the encoded Settings exactly once"
        encoded.append(before)
    encoded.append(text)
    return SettingsTemplate(settings=settings, encoded=tuple(encoded), strings=tuple(strings))


def _parse(value: str, path: Path_, source: str) -> tuple[str | tuple[str, str], ...]:
    parts: list[str | tuple[str, str]] = []
    position = 0
    for match in PLACEHOLDER.finditer(value):
        literal = value[position : match.start()]
        _check_literal(literal, path, source)
        if literal:
            parts.append(literal)
        parts.append((match.group(1), match.group(2) or ""))
        position = match.end()
    _check_literal(value[position:], path, source)
    if value[position:]:
        parts.append(value[position:])
    return tuple(parts)


def _check_literal(text: str, path: Path_, source: str) -> None:
    if "{{" in text:
        start = text.index("{{")
        raise ConfigError(
            f"{source}: {_where(path)} has a malformed placeholder near {text[start:start + 30]!r}; "
            "write {{name}} or {{name|default text}} (name: letters, digits, underscores)."
        )


def _where(path: Path_) -> str:
    return '"' + ".".join(str(key) for key in path) + '"'


@dataclass(frozen=True, slots=True)
class Agent:
    """One agent: its file, its validated config, its compiled Settings and the lines it says."""

    name: str
    source: str  # the file it came from, for logs and errors
    config: AgentConfig
    template: SettingsTemplate
    lines: CallerLines = field(default_factory=CallerLines)

    def describe(self) -> str:
        names = self.template.placeholders
        return f"agent {self.name} ({self.source}) uses " + (
            "placeholders " + ", ".join(names) if names else "no placeholders"
        )


@dataclass(frozen=True, slots=True)
class AgentChoice:
    """The agent a call got, with its rendered Settings."""

    name: str
    settings: dict[str, Any]  # for a resumed session and voicemail; read-only
    settings_json: str
    lines: CallerLines  # what the bridge itself says on this call: the agent's own lines
    unknown: str | None = None  # an ``agent`` parameter naming no agent (the default was used)
    # Function name -> the parameters its declaration marks sensitive (always redacted when stored).
    sensitive: Mapping[str, frozenset[str]] = field(default_factory=dict)
    transfer_mode: str | None = None  # the agent's own TRANSFER_MODE, if its file sets one


def make_agent(name: str, source: str, config: AgentConfig, default_lines: CallerLines = CallerLines()) -> Agent:
    """The agent of ``config``: its own lines over ``default_lines`` (the bridge's, from the settings)."""
    lines = replace(default_lines, **config.lines)
    if config.twilio_say is not None:
        lines = replace(lines, twilio_say=config.twilio_say)
    return Agent(name, source, config, compile_template(config.settings, source), lines)


@dataclass(frozen=True, slots=True)
class AgentCatalog:
    """Every agent of the bridge and the number map; immutable, so a live call keeps its own."""

    default: Agent
    named: Mapping[str, Agent] = field(default_factory=dict)
    numbers: Mapping[str, str] = field(default_factory=dict)  # E.164 number -> agent name

    @classmethod
    def single(cls, config: AgentConfig, source: str = "config.json", default_lines: CallerLines = CallerLines()) -> AgentCatalog:
        return cls(make_agent(DEFAULT_AGENT, source, config, default_lines))

    @property
    def agents(self) -> list[Agent]:
        return [self.default, *self.named.values()]

    def agent(self, name: str) -> Agent | None:
        return self.default if name == DEFAULT_AGENT else self.named.get(name)

    def for_call(self, parameters: Mapping[str, str]) -> AgentChoice:
        """Pick the call's agent (``agent`` parameter, then called number, then default) and render it."""
        requested = parameters.get(AGENT_PARAMETER)
        unknown = None
        chosen = self.default
        if requested:
            found = self.agent(requested)
            if found is None:
                unknown = requested[:MAX_VALUE_CHARS]
            else:
                chosen = found
        else:
            mapped = self.numbers.get(parameters.get(CALLED_NUMBER_PARAMETER, ""))
            if mapped is not None:
                chosen = self.agent(mapped) or self.default
        settings, text = chosen.template.render(parameters)
        return AgentChoice(
            chosen.name, settings, text, chosen.lines, unknown, chosen.config.sensitive_parameters, chosen.config.transfer_mode
        )

    def describe(self) -> list[str]:
        """One line per agent, and one for the number map if there is one."""
        lines = [agent.describe() for agent in self.agents]
        if self.numbers:
            lines.append(
                "called numbers pick agents: " + ", ".join(f"{number} -> {name}" for number, name in sorted(self.numbers.items()))
            )
        return lines

    def client_functions(self) -> dict[str, dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for agent in self.agents:
            merged.update(agent.config.client_functions)
        return merged


def agents_dir(config_path: Path) -> Path:
    """``agents/`` beside the default agent's file."""
    return config_path.parent / AGENTS_DIR


def load_catalog(
    config_path: Path, environ: Mapping[str, str], default_lines: CallerLines = CallerLines()
) -> AgentCatalog:
    """Read and validate config.json, ``agents/*.json`` and ``agents/numbers.json``.

    ``default_lines`` are what an agent says where its file sets no ``bridge.lines`` of its own.
    """
    default = make_agent(DEFAULT_AGENT, config_path.name, load_agent_config(config_path, environ), default_lines)
    directory = agents_dir(config_path)
    named: dict[str, Agent] = {}
    numbers: dict[str, str] = {}
    if directory.is_dir():
        files = sorted(path for path in directory.glob("*.json") if path.name != NUMBERS_FILE)
        if len(files) > MAX_AGENTS:
            raise ConfigError(f"{directory} holds {len(files)} agents; at most {MAX_AGENTS} are allowed.")
        for path in files:
            name = path.stem
            source = f"{AGENTS_DIR}/{path.name}"
            if not AGENT_NAME.fullmatch(name):
                raise ConfigError(f"{source}: an agent's file name must be letters, digits, - and _ (at most 64), then .json.")
            if name == DEFAULT_AGENT:
                raise ConfigError(f"{source}: the name {DEFAULT_AGENT!r} is config.json's; rename the file.")
            named[name] = make_agent(name, source, load_agent_config(path, environ, Path(source)), default_lines)
        numbers_path = directory / NUMBERS_FILE
        if numbers_path.exists():
            numbers = _load_numbers(numbers_path, named)
    return AgentCatalog(default, named, numbers)


def _load_numbers(path: Path, named: Mapping[str, Agent]) -> dict[str, str]:
    source = f"{AGENTS_DIR}/{NUMBERS_FILE}"
    raw = parse_json(read_config_file(path, source), source)
    if not isinstance(raw, dict):
        raise ConfigError(f'{source} must be a JSON object like {{"+15551234567": "spanish"}}.')
    for number, name in raw.items():
        if not E164.fullmatch(number):
            raise ConfigError(f"{source}: {number!r} is not a phone number in E.164 form like +15551234567.")
        if not isinstance(name, str) or (name != DEFAULT_AGENT and name not in named):
            known = ", ".join([DEFAULT_AGENT, *sorted(named)])
            raise ConfigError(f"{source}: {number} maps to {name!r}, which is no agent (the agents are {known}).")
    return dict(raw)


def retention_warnings(catalog: AgentCatalog) -> list[str]:
    """One warning per agent whose Settings leave Deepgram's ``mip_opt_out`` unset or false.

    Deepgram's default is false: it may then keep the session's audio and transcripts for its
    Model Improvement Program. A warning, never an error: an agent may use a Deepgram model that
    refuses the opt-out, and that is the operator's choice to make knowingly.
    """
    return [
        f"{agent.source} leaves \"mip_opt_out\" {'false' if agent.config.settings.get('mip_opt_out') is False else 'unset'}: "
        "Deepgram may keep this agent's calls (audio and transcripts) for its Model Improvement Program; "
        "set \"mip_opt_out\": true at the top of the file to opt out (docs/privacy.md)"
        for agent in catalog.agents
        if agent.config.settings.get("mip_opt_out") is not True
    ]


def check_functions(
    catalog: AgentCatalog, function_map: Mapping[str, Callable[..., Any]], settings: Settings
) -> list[str]:
    """Every agent's client-side functions must exist in ``function_map``; returns warnings."""
    for agent in catalog.agents:
        check_function_map(function_map, agent.config.client_functions, agent.source)
        if "transfer_call" in agent.config.client_functions and not settings.transfer_enabled:
            raise ConfigError(
                f"{agent.source} declares transfer_call, but transfer needs TWILIO_ACCOUNT_SID, "
                "TWILIO_AUTH_TOKEN and TRANSFER_NUMBER in .env (or remove transfer_call from the functions)."
            )
        warm = (agent.config.transfer_mode or settings.transfer_mode) == "warm"
        if warm and "transfer_call" in agent.config.client_functions and not settings.twilio_phone_number:
            raise ConfigError(
                f"{agent.source} transfers warm, which needs TWILIO_PHONE_NUMBER in .env: the bridge calls the "
                "pharmacist from it."
            )
    # A function that only some agent declares is no cause for a warning.
    sources = catalog.default.source if len(catalog.agents) == 1 else f"{catalog.default.source} or {AGENTS_DIR}/"
    return check_function_map(function_map, catalog.client_functions(), sources)
