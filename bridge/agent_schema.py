"""The v1 Settings message as one table of data, and the walker that checks config.json against it.

``OBJECTS`` names every JSON object the Settings message can hold and, for each of its keys,
whether the key must be there and what its value must look like. It describes exactly the
pydantic models of ``deepgram-sdk==7.17.0`` (tests/test_agent_schema.py derives the same table
from those models and asserts the two are equal, so it cannot drift). The real server answers
an unknown key anywhere in the message with ``UNPARSABLE_CLIENT_MESSAGE``, which would
otherwise surface only once a call is under way; ``check_settings`` finds it at startup.

Two rules are ours rather than the SDK's, both because the bridge sends config.json as it is,
not through the SDK, which fills in what is left out:

- A provider union is told apart by its discriminant, as the SDK declares it: ``type`` for
  think and speak providers, which must be given, and ``version`` for listen providers, where
  no version means ``"v1"``, as on Deepgram's server. (The SDK guesses from the other keys.)
- The SDK's open enumerations (``Literal[...] | Any``, e.g. model names) are strings here: every
  value they list is a string, and the ``Any`` only keeps old SDKs working with new values.

Every SDK model also says ``extra="allow"``: that is Fern's code generator keeping old clients
working with new servers, not a statement that the server takes unknown keys, so keys not in
the table are refused. Values are checked as JSON types, no looser than pydantic (which also
coerces ``"8000"`` to 8000): whatever passes here, the SDK's models accept with no extra keys.
"""

from __future__ import annotations

import difflib
from typing import Any

# Whether a key must be present: REQUIRED keys must be (and not null); OPTIONAL ones may be left
# out but not be null (they have a default in the SDK); NULLABLE ones may be left out or null.
REQUIRED, OPTIONAL, NULLABLE = "required", "optional", "nullable"

# Shapes of a value:
#   "string", "boolean", "integer", "number" (an integer or a fraction), "any" (any JSON value)
#   ("literal", v, ...)        exactly one of these values
#   ("list", shape)            a list whose every item has the shape
#   ("map", shape)             an object with free keys whose every value has the shape
#   ("object", name)           the object OBJECTS[name]
#   ("one_of", shape, ...)     any one of the shapes
#   ("variants", key, default, {value: name})
#                              an object of one of several kinds, told apart by the value of
#                              ``key`` (``default`` when the key is absent; None: it must be given)
Shape = Any

OBJECTS: dict[str, dict[str, tuple[str, Shape]]] = {
    "Settings": {
        "type": (OPTIONAL, ("literal", "Settings")),
        "tags": (NULLABLE, ("list", "string")),
        "experimental": (NULLABLE, "boolean"),
        "flags": (NULLABLE, ("object", "flags")),
        "mip_opt_out": (NULLABLE, "boolean"),
        "audio": (REQUIRED, ("object", "audio")),
        # An object, or the id of an agent saved in Deepgram's console.
        "agent": (REQUIRED, ("one_of", ("object", "agent"), "string")),
    },
    "flags": {"history": (NULLABLE, "boolean")},
    "audio": {
        "input": (NULLABLE, ("object", "audio.input")),
        "output": (NULLABLE, ("object", "audio.output")),
    },
    "audio.input": {"encoding": (REQUIRED, "string"), "sample_rate": (REQUIRED, "integer")},
    "audio.output": {
        "encoding": (NULLABLE, "string"),
        "sample_rate": (NULLABLE, "integer"),
        "bitrate": (NULLABLE, "integer"),
        "container": (NULLABLE, "string"),
    },
    "agent": {
        "language": (NULLABLE, "string"),  # deprecated: listen.provider.language instead
        "context": (NULLABLE, ("object", "agent.context")),
        "listen": (NULLABLE, ("object", "agent.listen")),
        # One provider, or a list of them: fallbacks, tried in order.
        "think": (NULLABLE, ("one_of", ("object", "agent.think"), ("list", ("object", "agent.think")))),
        "think_live": (NULLABLE, ("object", "agent.think_live")),
        "speak": (NULLABLE, ("one_of", ("object", "agent.speak"), ("list", ("object", "agent.speak")))),
        "greeting": (NULLABLE, "string"),
    },
    "agent.context": {
        "messages": (
            NULLABLE,
            ("list", ("one_of", ("object", "history text"), ("object", "history function calls"))),
        ),
    },
    "history text": {
        "type": (OPTIONAL, ("literal", "History")),
        "role": (REQUIRED, "string"),
        "content": (REQUIRED, "string"),
    },
    "history function calls": {
        "type": (OPTIONAL, ("literal", "History")),
        "function_calls": (REQUIRED, ("list", ("object", "history function call"))),
    },
    "history function call": {
        "id": (REQUIRED, "string"),
        "name": (REQUIRED, "string"),
        "client_side": (REQUIRED, "boolean"),
        "arguments": (REQUIRED, "string"),
        "response": (REQUIRED, "string"),
        "thought_signature": (NULLABLE, "string"),
    },
    "agent.listen": {
        "provider": (
            NULLABLE,
            ("variants", "version", "v1", {"v1": "listen provider v1", "v2": "listen provider v2"}),
        ),
    },
    "listen provider v1": {
        "version": (OPTIONAL, ("literal", "v1")),
        "type": (OPTIONAL, ("literal", "deepgram")),
        "model": (NULLABLE, "string"),
        "language": (NULLABLE, "string"),
        "keyterms": (NULLABLE, ("list", "string")),
        "smart_format": (NULLABLE, "boolean"),
    },
    "listen provider v2": {  # Flux
        "version": (OPTIONAL, ("literal", "v2")),
        "type": (OPTIONAL, ("literal", "deepgram")),
        "model": (REQUIRED, "string"),
        "language_hints": (NULLABLE, ("list", "string")),
        "language_hint": (NULLABLE, ("one_of", "string", ("list", "string"))),  # the SDK moves it to language_hints
        "eot_threshold": (NULLABLE, "number"),
        "eager_eot_threshold": (NULLABLE, "number"),
        "eot_timeout_ms": (NULLABLE, "integer"),
        "keyterms": (NULLABLE, ("list", "string")),
    },
    "agent.think": {
        "provider": (
            REQUIRED,
            (
                "variants",
                "type",
                None,
                {
                    "open_ai": "think provider open_ai",
                    "aws_bedrock": "think provider aws_bedrock",
                    "anthropic": "think provider anthropic",
                    "google": "think provider google",
                    "groq": "think provider groq",
                    "deepgram": "think provider deepgram",
                },
            ),
        ),
        "endpoint": (NULLABLE, ("object", "endpoint")),  # a custom LLM
        "functions": (NULLABLE, ("list", ("object", "function"))),
        "prompt": (NULLABLE, "string"),
        "context_length": (NULLABLE, ("one_of", ("literal", "max"), "number")),
    },
    "think provider open_ai": {
        "type": (OPTIONAL, ("literal", "open_ai")),
        "version": (NULLABLE, ("literal", "v1")),
        "model": (REQUIRED, "string"),
        "temperature": (NULLABLE, "number"),
        "reasoning_mode": (NULLABLE, "string"),
    },
    "think provider aws_bedrock": {
        "type": (OPTIONAL, ("literal", "aws_bedrock")),
        "model": (REQUIRED, "string"),
        "temperature": (NULLABLE, "number"),
        "credentials": (NULLABLE, ("object", "aws_bedrock credentials")),
    },
    "aws_bedrock credentials": {
        "type": (NULLABLE, "string"),
        "region": (NULLABLE, "string"),
        "access_key_id": (NULLABLE, "string"),
        "secret_access_key": (NULLABLE, "string"),
        "session_token": (NULLABLE, "string"),
    },
    "think provider anthropic": {
        "type": (OPTIONAL, ("literal", "anthropic")),
        "version": (NULLABLE, ("literal", "v1")),
        "model": (REQUIRED, "string"),
        "temperature": (NULLABLE, "number"),
    },
    "think provider google": {
        "type": (OPTIONAL, ("literal", "google")),
        "version": (NULLABLE, "string"),
        "model": (REQUIRED, "string"),
        "temperature": (NULLABLE, "number"),
    },
    "think provider groq": {
        "type": (OPTIONAL, ("literal", "groq")),
        "version": (NULLABLE, ("literal", "v1")),
        "model": (OPTIONAL, ("literal", "openai/gpt-oss-20b")),
        "temperature": (NULLABLE, "number"),
        "reasoning_mode": (NULLABLE, "string"),
    },
    "think provider deepgram": {
        "type": (OPTIONAL, ("literal", "deepgram")),
        "model": (REQUIRED, "string"),
        "version": (NULLABLE, ("literal", "v1")),
        "temperature": (NULLABLE, "number"),
        "reasoning_mode": (NULLABLE, "string"),
        "voice_prompt_opt_out": (NULLABLE, "boolean"),
    },
    "endpoint": {
        "url": (NULLABLE, "string"),
        "headers": (NULLABLE, ("map", "string")),
    },
    "function": {
        "name": (NULLABLE, "string"),
        "description": (NULLABLE, "string"),
        "parameters": (NULLABLE, ("map", "any")),  # a JSON Schema, free-form
        "defer_until_eot": (NULLABLE, "boolean"),
        "initial_agent_filler": (NULLABLE, "boolean"),
        "agent_filler_max_count": (NULLABLE, "integer"),
        "agent_filler_interval_ms": (NULLABLE, "integer"),
        "endpoint": (NULLABLE, ("object", "function endpoint")),  # run by Deepgram, not here
    },
    "function endpoint": {
        "url": (NULLABLE, "string"),
        "method": (NULLABLE, "string"),
        "headers": (NULLABLE, ("map", "string")),
    },
    "agent.think_live": {"provider": (REQUIRED, ("object", "think_live provider"))},
    "think_live provider": {
        "type": (OPTIONAL, ("literal", "deepgram")),
        "version": (OPTIONAL, ("literal", "v1")),
        "agent_backchannel_sensitivity": (NULLABLE, "number"),
        "presence_check_max_count": (NULLABLE, "integer"),
        "presence_check_interval_ms": (NULLABLE, "integer"),
        "frustration_max_count": (NULLABLE, "integer"),
        "restricted_terms": (NULLABLE, ("list", "string")),
    },
    "agent.speak": {
        "provider": (
            REQUIRED,
            (
                "variants",
                "type",
                None,
                {
                    "deepgram": "speak provider deepgram",
                    "eleven_labs": "speak provider eleven_labs",
                    "cartesia": "speak provider cartesia",
                    "open_ai": "speak provider open_ai",
                    "aws_polly": "speak provider aws_polly",
                },
            ),
        ),
        "endpoint": (NULLABLE, ("object", "endpoint")),
    },
    "speak provider deepgram": {  # no language key: the voice's model name carries it
        "type": (OPTIONAL, ("literal", "deepgram")),
        "version": (NULLABLE, "string"),
        "model": (REQUIRED, "string"),
        "speed": (NULLABLE, "number"),
        "expressivity": (NULLABLE, "integer"),
    },
    "speak provider eleven_labs": {
        "type": (OPTIONAL, ("literal", "eleven_labs")),
        "version": (NULLABLE, ("literal", "v1")),
        "model_id": (REQUIRED, "string"),
        "language": (NULLABLE, "string"),
        "language_code": (NULLABLE, "string"),
    },
    "speak provider cartesia": {
        "type": (OPTIONAL, ("literal", "cartesia")),
        "version": (NULLABLE, ("literal", "2025-03-17")),
        "model_id": (REQUIRED, "string"),
        "voice": (REQUIRED, ("object", "cartesia voice")),
        "language": (NULLABLE, "string"),
        "volume": (NULLABLE, "number"),
    },
    "cartesia voice": {"mode": (REQUIRED, "string"), "id": (REQUIRED, "string")},
    "speak provider open_ai": {
        "type": (OPTIONAL, ("literal", "open_ai")),
        "version": (NULLABLE, ("literal", "v1")),
        "model": (REQUIRED, "string"),
        "voice": (REQUIRED, "string"),
    },
    "speak provider aws_polly": {
        "type": (OPTIONAL, ("literal", "aws_polly")),
        "voice": (REQUIRED, "string"),
        "language": (REQUIRED, "string"),
        "language_code": (NULLABLE, "string"),
        "engine": (REQUIRED, "string"),
        "credentials": (REQUIRED, ("object", "aws_polly credentials")),
    },
    "aws_polly credentials": {
        "type": (REQUIRED, "string"),
        "region": (REQUIRED, "string"),
        "access_key_id": (REQUIRED, "string"),
        "secret_access_key": (REQUIRED, "string"),
        "session_token": (NULLABLE, "string"),
    },
}
ROOT = "Settings"

# Keys of older shapes that the SDK rewrites before validating (the bridge sends the file as it
# is, so they are refused here), with where they belong now.
MOVED = {("agent", "messages"): "agent.context.messages"}


class SchemaError(ValueError):
    """A value that the v1 Settings message does not allow; the text is one sentence."""


def check_settings(settings: Any) -> None:
    """Check a parsed Settings message at every level; raise ``SchemaError`` naming the path."""
    _check(settings, ("object", ROOT), "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def describe(shape: Shape) -> str:
    """A shape in words, for error messages."""
    if shape == "string":
        return "a string"
    if shape == "boolean":
        return "true or false"
    if shape == "integer":
        return "a whole number"
    if shape == "number":
        return "a number"
    if shape == "any":
        return "any JSON value"
    kind = shape[0]
    if kind == "literal":
        return " or ".join(f'"{value}"' for value in shape[1:])
    if kind == "list":
        return "a list of strings" if shape[1] == "string" else "a list"
    if kind in ("map", "object", "variants"):
        return "an object"
    return " or ".join(dict.fromkeys(describe(alternative) for alternative in shape[1:]))


def matches(value: Any, shape: Shape) -> bool:
    """Whether ``value`` has ``shape`` (a shape of the table)."""
    try:
        _check(value, shape, "")
    except SchemaError:
        return False
    return True


def _could_be(value: Any, shape: Shape) -> bool:
    """Whether ``value`` is of the JSON kind ``shape`` wants (used to pick which error to report)."""
    if isinstance(shape, str):
        return matches(value, shape)
    kind = shape[0]
    if kind == "list":
        return isinstance(value, list)
    if kind in ("map", "object", "variants"):
        return isinstance(value, dict)
    if kind == "literal":
        return isinstance(value, str) and isinstance(shape[1], str)
    return any(_could_be(value, alternative) for alternative in shape[1:])


def _check(value: Any, shape: Shape, path: str) -> None:
    where = f'"{path}"' if path else "the top level"
    if isinstance(shape, str):
        ok = {
            "string": lambda: isinstance(value, str),
            "boolean": lambda: isinstance(value, bool),
            "integer": lambda: isinstance(value, int) and not isinstance(value, bool),
            "number": lambda: isinstance(value, int | float) and not isinstance(value, bool),
            "any": lambda: True,
        }[shape]()
        if not ok:
            raise SchemaError(f"{where} must be {describe(shape)}, got {_kind(value)}.")
        return
    kind = shape[0]
    if kind == "literal":
        if value not in shape[1:] or isinstance(value, bool):
            raise SchemaError(f"{where} must be {describe(shape)}{_suggest(value, shape[1:])}, got {_shown(value)}.")
    elif kind == "list":
        if not isinstance(value, list):
            raise SchemaError(f"{where} must be {describe(shape)}, got {_kind(value)}.")
        for index, item in enumerate(value):
            _check(item, shape[1], f"{path}[{index}]")
    elif kind == "map":
        if not isinstance(value, dict):
            raise SchemaError(f"{where} must be an object, got {_kind(value)}.")
        for key, item in value.items():
            _check(item, shape[1], _join(path, key))
    elif kind == "object":
        _check_object(value, shape[1], path)
    elif kind == "variants":
        _check_variant(value, shape, path)
    elif kind == "one_of":
        alternatives = shape[1:]
        if any(matches(value, alternative) for alternative in alternatives):
            return
        fitting = [alternative for alternative in alternatives if _could_be(value, alternative)]
        if not fitting or all(isinstance(alternative, str) or alternative[0] == "literal" for alternative in fitting):
            raise SchemaError(f"{where} must be {describe(shape)}, got {_kind(value)}.")
        # Of several objects it could be, report against the one sharing the most keys with it.
        best = max(fitting, key=lambda alternative: _shared_keys(value, alternative))
        _check(value, best, path)
    else:  # pragma: no cover - the table holds only the shapes above
        raise AssertionError(f"unknown shape {shape!r}")


def _shared_keys(value: Any, shape: Shape) -> int:
    if isinstance(value, dict) and shape[0] == "object":
        return len(set(value) & set(OBJECTS[shape[1]]))
    return 0


def _quoted(value: str) -> str:
    return f'"{value}"'


def _shown(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else _kind(value)


def _suggest(value: Any, choices: Any) -> str:
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, [str(choice) for choice in choices], n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _check_variant(value: Any, shape: Shape, path: str) -> None:
    _, key, default, variants = shape
    where = f'"{path}"'
    if not isinstance(value, dict):
        raise SchemaError(f"{where} must be an object, got {_kind(value)}.")
    chosen = value.get(key, default)
    choices = ", ".join(f'"{name}"' for name in variants)
    if chosen is None:
        raise SchemaError(f'{where} needs "{key}", one of {choices}.')
    if not isinstance(chosen, str) or chosen not in variants:  # a dict or list is unhashable
        raise SchemaError(
            f'"{_join(path, key)}" must be one of {choices}{_suggest(chosen, variants)}, got {_shown(chosen)}.'
        )
    note = f' where "{key}" is "{chosen}"' + (f' (no "{key}" means "{default}")' if key not in value else "")
    fields = OBJECTS[variants[chosen]]
    for name in value:
        others = [other for other, object_name in variants.items() if name in OBJECTS[object_name]]
        if name not in fields and others:
            raise SchemaError(
                f'"{_join(path, name)}" is not a v1 Settings key{note}; it is one only where "{key}" is '
                f'{" or ".join(_quoted(other) for other in others)} '
                f'(allowed: {", ".join(sorted(fields))}).'
            )
    _check_object(value, variants[chosen], path, note)


def _check_object(value: Any, name: str, path: str, kind_note: str = "") -> None:
    """``kind_note`` says which kind of provider the object was taken for, in error messages."""
    where = f'"{path}"' if path else "the top level"
    if not isinstance(value, dict):
        raise SchemaError(f"{where} must be an object, got {_kind(value)}.")
    fields = OBJECTS[name]
    for key in value:
        if key not in fields:
            raise SchemaError(_unknown_key(path, key, fields, kind_note))
    for key, (presence, field_shape) in fields.items():
        if key not in value:
            if presence == REQUIRED:
                raise SchemaError(f'"{_join(path, key)}" is missing; the v1 Settings message requires it{kind_note}.')
            continue
        if value[key] is None and presence == NULLABLE:
            continue
        _check(value[key], field_shape, _join(path, key))


def _unknown_key(path: str, key: str, fields: dict[str, Any], kind_note: str) -> str:
    full = _join(path, str(key))
    moved = MOVED.get((path, key))
    if moved:
        hint = f'; it belongs in "{moved}"'
    else:
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f'; did you mean "{close[0]}"?' if close else ""
    return f'"{full}" is not a v1 Settings key{kind_note}{hint} (allowed: {", ".join(sorted(fields))}).'
