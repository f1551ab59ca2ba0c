"""The v1 Settings table (bridge/agent_schema.py) against deepgram-sdk 7.17.0's pydantic models.

The proof: the same table is derived here from the SDK's models (fields, requiredness, aliases,
Optional / Union / List / Dict / Literal / Annotated, provider unions by their discriminant) and
must equal ours at every object path. Then the walker and the SDK are held to each other:
every document built from the table passes both (with no extra key anywhere in the SDK's
models), a key slipped into any object fails both with the path named, and whatever the walker
accepts, the SDK accepts too.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deepgram.agent.v1 import AgentV1Settings
from deepgram.core.serialization import get_field_to_alias_mapping
from deepgram.core.unchecked_base_model import UnionMetadata
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from bridge import agent_schema
from bridge.agent_schema import NULLABLE, OBJECTS, OPTIONAL, REQUIRED, ROOT, SchemaError, check_settings, matches
from bridge.config import parse_agent_config
from bridge.settings import ConfigError
from conftest import ROOT as REPO
from sdk_oracle import assert_valid_client_message, settings_problem

CONFIG = json.loads((REPO / "config.json").read_text())

# ----------------------------------------------------------------- the table, derived from the SDK

Canon = Any  # a shape with every object spelled out: hashable, comparable, no names


def _discriminant(metadata: Any) -> str | None:
    for item in metadata:
        if isinstance(item, UnionMetadata):
            return item.discriminant
    return None


def sdk_shape(annotation: Any, metadata: tuple[Any, ...] = ()) -> Canon:
    """The table's shape of an SDK field annotation (``Optional`` already taken off)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        return sdk_shape(inner, (*metadata, *extra))
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        discriminant = _discriminant(metadata)
        if discriminant is not None:
            # A provider union: each member's discriminant is a Literal with its one value.
            variants = {}
            for member in members:
                [value] = typing.get_args(member.model_fields[discriminant].annotation)
                variants[value] = sdk_object(member)
            return ("variants", discriminant, tuple(sorted(variants.items())))
        if typing.Any in members:
            # Fern's open enumerations, Literal[...] | Any: strings in the table (module docstring).
            rest = [m for m in members if m is not typing.Any]
            assert all(typing.get_origin(m) is typing.Literal for m in rest), annotation
            assert all(isinstance(v, str) for m in rest for v in typing.get_args(m)), annotation
            return "string"
        shapes = sorted({sdk_shape(member) for member in members}, key=repr)
        return shapes[0] if len(shapes) == 1 else ("one_of", *shapes)
    if origin is typing.Literal:
        return ("literal", *typing.get_args(annotation))
    if origin is list:
        return ("list", sdk_shape(typing.get_args(annotation)[0]))
    if origin is dict:
        key, value = typing.get_args(annotation)
        assert key is str
        return ("map", sdk_shape(value))
    if annotation is typing.Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return ("object", sdk_object(annotation))
    return {str: "string", bool: "boolean", int: "integer", float: "number"}[annotation]


def sdk_object(model: type[BaseModel]) -> Canon:
    fields = []
    fern_aliases = get_field_to_alias_mapping(model)  # Fern's own aliases (e.g. uuid_ -> uuid)
    for name, field in model.model_fields.items():
        key = fern_aliases.get(name) or field.alias or name  # the key on the wire
        annotation = field.annotation
        nullable = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)
        assert not (field.is_required() and nullable), f"{model.__name__}.{name} is required but may be null"
        presence = REQUIRED if field.is_required() else NULLABLE if nullable else OPTIONAL
        fields.append((key, presence, sdk_shape(annotation, tuple(field.metadata))))
    return tuple(sorted(fields))


def table_shape(shape: Any) -> Canon:
    """The same canonical form, from our table."""
    if isinstance(shape, str):
        return shape
    kind = shape[0]
    if kind == "object":
        return ("object", table_object(shape[1]))
    if kind == "variants":
        _, key, _default, variants = shape
        return ("variants", key, tuple(sorted((value, table_object(name)) for value, name in variants.items())))
    if kind == "one_of":
        shapes = sorted({table_shape(alternative) for alternative in shape[1:]}, key=repr)
        return shapes[0] if len(shapes) == 1 else ("one_of", *shapes)
    if kind in ("list", "map"):
        return (kind, table_shape(shape[1]))
    return tuple(shape)  # literal


def table_object(name: str) -> Canon:
    return tuple(sorted((key, presence, table_shape(shape)) for key, (presence, shape) in OBJECTS[name].items()))


def flatten(shape: Canon, path: str = "") -> Iterator[tuple[str, str, str, str]]:
    """Every (object path, key, presence, shape at one level) of a canonical shape."""
    if isinstance(shape, str):
        return
    kind = shape[0]
    if kind == "object":
        for key, presence, inner in shape[1]:
            yield (path or "(top)", key, presence, shallow(inner))
            yield from flatten(inner, f"{path}.{key}".lstrip("."))
    elif kind == "variants":
        for value, fields in shape[2]:
            yield from flatten(("object", fields), f"{path}<{shape[1]}={value}>")
    elif kind == "one_of":
        for index, alternative in enumerate(shape[1:]):
            yield from flatten(alternative, f"{path}<{index}>")
    elif kind in ("list", "map"):
        yield from flatten(shape[1], f"{path}[]")


def shallow(shape: Canon) -> str:
    if isinstance(shape, str):
        return shape
    if shape[0] == "object":
        return "object"
    if shape[0] == "variants":
        return f"variants by {shape[1]}: {[value for value, _ in shape[2]]}"
    if shape[0] == "literal":
        return repr(shape)
    return f"{shape[0]}({', '.join(shallow(s) for s in shape[1:])})"


def test_the_derivation_reads_aliases() -> None:
    from deepgram.types.get_model_v1response_metadata import GetModelV1ResponseMetadata

    assert "uuid" in {key for key, _, _ in sdk_object(GetModelV1ResponseMetadata)}


def test_the_table_equals_the_sdk_models_at_every_object_path() -> None:
    assert importlib.metadata.version("deepgram-sdk") == "7.17.0", "the table describes deepgram-sdk 7.17.0"
    sdk = ("object", sdk_object(AgentV1Settings))
    ours = ("object", table_object(ROOT))
    sdk_rows, our_rows = set(flatten(sdk)), set(flatten(ours))
    missing = sorted(sdk_rows - our_rows)
    extra = sorted(our_rows - sdk_rows)
    assert not missing and not extra, f"in the SDK, not the table: {missing}\nin the table, not the SDK: {extra}"
    assert sdk == ours
    # Sanity: the comparison reaches deep down, into every provider kind.
    paths = {row[0] for row in sdk_rows}
    assert any(path.endswith(".speak<1>.provider<type=aws_polly>.credentials") for path in paths)
    assert any(path.endswith(".listen.provider<version=v2>") for path in paths)
    assert len(sdk_rows) > 200


def test_every_sdk_model_below_settings_allows_extra_keys_so_only_the_table_refuses_them() -> None:
    """Why the table, not the SDK's ``extra`` setting, decides (bridge/agent_schema.py docstring)."""
    seen: set[type[BaseModel]] = set()

    def visit(annotation: Any) -> None:
        for argument in typing.get_args(annotation):
            visit(argument)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                visit(field.annotation)

    visit(AgentV1Settings)
    assert len(seen) > 30
    assert {model.model_config.get("extra") for model in seen} == {"allow"}


def test_every_object_of_the_table_is_reachable_from_the_top() -> None:
    reached: set[str] = set()

    def visit(shape: Any) -> None:
        if isinstance(shape, str):
            return
        if shape[0] == "object":
            if shape[1] not in reached:
                reached.add(shape[1])
                for _, inner in OBJECTS[shape[1]].values():
                    visit(inner)
        elif shape[0] == "variants":
            for name in shape[3].values():
                visit(("object", name))
        elif shape[0] in ("list", "map", "one_of"):
            for inner in shape[1:]:
                visit(inner)

    visit(("object", ROOT))
    assert reached == set(OBJECTS)


# --------------------------------------------------------- documents built from the table

SCALARS = {"string": "{{caller_name|friend}} ${NOT_SUBSTITUTED_HERE}", "boolean": True, "integer": 8000, "number": 0.5}


def examples(shape: Any) -> list[Any]:
    """Valid values of a shape: together they contain every object kind and every key of each."""
    if isinstance(shape, str):
        return [SCALARS.get(shape, {"free": ["json", 1, None]})]
    kind = shape[0]
    if kind == "literal":
        return list(shape[1:])
    if kind == "list":
        return [[item] for item in examples(shape[1])]
    if kind == "map":
        return [{"key": examples(shape[1])[0]}]
    if kind == "one_of":
        return [value for alternative in shape[1:] for value in examples(alternative)]
    if kind == "variants":
        _, key, default, variants = shape
        found = []
        for value, name in variants.items():
            for example in object_examples(name):
                found.append({**example, key: value})
                if value == default:
                    found.append({k: v for k, v in example.items() if k != key})
        return found
    return object_examples(shape[1])


def object_examples(name: str) -> list[dict[str, Any]]:
    fields = OBJECTS[name]
    values = {key: examples(shape) for key, (_, shape) in fields.items()}
    full = {key: options[0] for key, options in values.items()}
    found = [full]
    for key, options in values.items():
        found += [{**full, key: option} for option in options[1:]]
    # The least: only what is required.
    found.append({key: full[key] for key, (presence, _) in fields.items() if presence == REQUIRED})
    return found


DOCUMENTS = examples(("object", ROOT))


def objects_in(value: Any, shape: Any, path: str = "") -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every (path, table object name, the dict) of a valid document."""
    if isinstance(shape, str) or shape[0] == "literal":
        return
    kind = shape[0]
    if kind == "object":
        yield path, shape[1], value
        for key, item in value.items():
            presence, inner = OBJECTS[shape[1]][key]
            if item is not None:
                yield from objects_in(item, inner, f"{path}.{key}".lstrip("."))
    elif kind == "variants":
        yield from objects_in(value, ("object", shape[3][value.get(shape[1], shape[2])]), path)
    elif kind == "list":
        for index, item in enumerate(value):
            yield from objects_in(item, shape[1], f"{path}[{index}]")
    elif kind == "one_of":
        alternative = next(a for a in shape[1:] if matches(value, a))
        yield from objects_in(value, alternative, path)


def test_every_document_built_from_the_table_passes_the_walker_and_the_sdk() -> None:
    assert len(DOCUMENTS) > 80
    for document in DOCUMENTS:
        check_settings(document)
        assert settings_problem(document) is None, settings_problem(document)


def test_an_unknown_key_in_any_object_is_refused_by_both_naming_its_path() -> None:
    covered: set[str] = set()
    checked = 0
    for document in DOCUMENTS:
        for path, name, _ in list(objects_in(document, ("object", ROOT))):
            if name in covered and checked > 400:
                continue
            covered.add(name)
            checked += 1
            broken = copy.deepcopy(document)
            target = broken
            for where, _, node in objects_in(broken, ("object", ROOT)):
                if where == path:
                    target = node
                    break
            target["bogus_key"] = 1
            full = f"{path}.bogus_key".lstrip(".")
            with pytest.raises(SchemaError, match="^" + re.escape(f'"{full}" is not a v1 Settings key')):
                check_settings(broken)
            assert "bogus_key" in (settings_problem(broken) or ""), f"the SDK let {full} through"
    assert covered == set(OBJECTS)


# hypothesis: random documents from the table, and random damage to them


def strategy(shape: Any) -> st.SearchStrategy[Any]:
    if isinstance(shape, str):
        return {
            "string": st.text(max_size=8) | st.sampled_from(["{{name}}", "{{name|default}}", "${ENV}"]),
            "boolean": st.booleans(),
            "integer": st.integers(-(2**31), 2**31),
            "number": st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False),
            "any": st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                max_leaves=6),
        }[shape]
    kind = shape[0]
    if kind == "literal":
        return st.sampled_from(shape[1:])
    if kind == "list":
        return st.lists(strategy(shape[1]), max_size=2)
    if kind == "map":
        return st.dictionaries(st.text(max_size=6), strategy(shape[1]), max_size=2)
    if kind == "one_of":
        return st.one_of(*(strategy(alternative) for alternative in shape[1:]))
    if kind == "variants":
        _, key, default, variants = shape
        choices = []
        for value, name in variants.items():
            with_key = object_strategy(name).map(lambda found, value=value: {**found, key: value})
            choices.append(with_key)
            if value == default:
                choices.append(object_strategy(name).map(lambda found: {k: v for k, v in found.items() if k != key}))
        return st.one_of(*choices)
    return object_strategy(shape[1])


_OBJECT_STRATEGIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {}


def object_strategy(name: str) -> st.SearchStrategy[dict[str, Any]]:
    if name not in _OBJECT_STRATEGIES:
        fields = OBJECTS[name]
        required = {key: strategy(shape) for key, (presence, shape) in fields.items() if presence == REQUIRED}
        optional = {
            key: (strategy(shape) | st.none()) if presence == NULLABLE else strategy(shape)
            for key, (presence, shape) in fields.items()
            if presence != REQUIRED
        }
        _OBJECT_STRATEGIES[name] = st.fixed_dictionaries(required, optional=optional)
    return _OBJECT_STRATEGIES[name]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy(("object", ROOT)))
def test_random_documents_from_the_table_pass_the_walker_and_the_sdk(document: dict[str, Any]) -> None:
    check_settings(document)
    assert settings_problem(document) is None, settings_problem(document)


def damaged(document: Any, data: st.DataObject) -> Any:
    """The document with one value somewhere replaced, or one key added or removed."""
    nodes: list[Any] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict | list):
            nodes.append(value)
            for item in value.values() if isinstance(value, dict) else value:
                collect(item)

    broken = copy.deepcopy(document)
    collect(broken)
    node = data.draw(st.sampled_from(nodes))
    junk = data.draw(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=4)
                     | st.just({}) | st.just([]) | st.just("max") | st.just("v2"))
    if isinstance(node, dict):
        action = data.draw(st.sampled_from(["add", "remove", "replace"]) if node else st.just("add"))
        if action == "add":
            node[data.draw(st.sampled_from(["bogus", "type", "version", "model", "language", "messages"]))] = junk
        else:
            key = data.draw(st.sampled_from(sorted(node)))
            if action == "remove":
                del node[key]
            else:
                node[key] = junk
    elif node:
        node[data.draw(st.integers(0, len(node) - 1))] = junk
    else:
        node.append(junk)
    return broken


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strategy(("object", ROOT)), st.data())
def test_whatever_the_walker_accepts_the_sdk_accepts_with_no_extra_key(document: dict[str, Any], data: st.DataObject) -> None:
    broken = damaged(document, data)
    try:
        check_settings(broken)
    except SchemaError:
        return
    assert settings_problem(broken) is None, settings_problem(broken)


# ------------------------------------------------------------- the walker's rules and sentences


def parse_error(edit: Any) -> str:
    config = copy.deepcopy(CONFIG)
    edit(config)
    with pytest.raises(ConfigError) as caught:
        parse_agent_config(json.dumps(config), Path("config.json"), {})
    return str(caught.value)


def test_typos_below_agent_are_named_with_their_full_path_and_a_suggestion() -> None:
    assert parse_error(lambda c: c["agent"]["think"].update(promt="x")) == (
        'config.json: "agent.think.promt" is not a v1 Settings key; did you mean "prompt"? '
        "(allowed: context_length, endpoint, functions, prompt, provider)."
    )
    assert parse_error(lambda c: c["agent"]["listen"]["provider"].update(modle="nova-3")).startswith(
        'config.json: "agent.listen.provider.modle" is not a v1 Settings key where "version" is "v1" '
        '(no "version" means "v1"); did you mean "model"? (allowed: keyterms, language, model, smart_format, type, version).'
    )
    assert 'did you mean "parameters"?' in parse_error(lambda c: c["agent"]["think"]["functions"][2].update(paramters={}))
    assert parse_error(lambda c: c["agent"]["think"]["functions"][2].update(paramters={})).startswith(
        'config.json: "agent.think.functions[2].paramters" is not a v1 Settings key'
    )


def test_provider_kinds_are_told_apart_by_their_discriminant() -> None:
    assert parse_error(lambda c: c["agent"]["think"]["provider"].update(type="openai")) == (
        'config.json: "agent.think.provider.type" must be one of "open_ai", "aws_bedrock", "anthropic", "google", '
        '"groq", "deepgram" (did you mean "open_ai"?), got "openai".'
    )
    assert parse_error(lambda c: c["agent"]["think"]["provider"].pop("type")).startswith(
        'config.json: "agent.think.provider" needs "type"'
    )
    # Flux keys need version v2; the Deepgram voice takes no language (its model name has it).
    assert 'it is one only where "version" is "v2"' in parse_error(
        lambda c: c["agent"]["listen"]["provider"].update(eot_threshold=0.7)
    )
    assert '"agent.speak.provider.language" is not a v1 Settings key where "type" is "deepgram"' in parse_error(
        lambda c: c["agent"]["speak"]["provider"].update(language="en")
    )
    assert parse_error(lambda c: c["agent"]["think"]["provider"].pop("model")) == (
        'config.json: "agent.think.provider.model" is missing; the v1 Settings message requires it where "type" is "open_ai".'
    )


def test_types_are_checked_and_placeholders_are_strings() -> None:
    assert parse_error(lambda c: c["audio"]["output"].update(sample_rate="8000")) == (
        'config.json: "audio.output.sample_rate" must be a whole number, got a string.'
    )
    assert parse_error(lambda c: c.update(agent=5)) == 'config.json: "agent" must be an object or a string, got a number.'
    assert parse_error(lambda c: c["agent"]["think"].update(context_length="lots")) == (
        'config.json: "agent.think.context_length" must be "max" or a number, got a string.'
    )
    assert parse_error(lambda c: c["agent"].update(messages=[])).startswith(
        'config.json: "agent.messages" is not a v1 Settings key; it belongs in "agent.context.messages"'
    )
    # JSON's true is no whole number here (pydantic agrees where it is strict, e.g. expressivity).
    strict = copy.deepcopy(CONFIG)
    strict["agent"]["speak"]["provider"]["expressivity"] = True
    assert settings_problem(strict) is not None
    with pytest.raises(SchemaError, match=r'^"agent.speak.provider.expressivity" must be a whole number, got true.$'):
        check_settings(strict)
    config = copy.deepcopy(CONFIG)
    config["agent"]["think"]["prompt"] = "You are talking to {{caller_name|a caller}} about order {{order_id}}."
    config["agent"]["greeting"] = "Hello {{caller_name}}!"
    parse_agent_config(json.dumps(config), Path("config.json"), {})


def test_everything_v1_allows_is_accepted() -> None:
    config = copy.deepcopy(CONFIG)
    config.update(tags=["pharmacy", "{{campaign|none}}"], mip_opt_out=True, flags={"history": False}, experimental=False)
    think = config["agent"]["think"]
    config["agent"]["think"] = [think, {"provider": {"type": "anthropic", "model": "claude-3-5-haiku-latest"}, "prompt": think["prompt"]}]
    config["agent"]["speak"] = [config["agent"]["speak"], {"provider": {"type": "open_ai", "model": "tts-1", "voice": "alloy"}}]
    config["agent"]["context"] = {"messages": [{"type": "History", "role": "assistant", "content": "Hi."}]}
    config["agent"]["listen"]["provider"] = {"type": "deepgram", "version": "v2", "model": "flux-general-en", "eot_threshold": 0.7}
    parsed = parse_agent_config(json.dumps(config), Path("config.json"), {})
    assert set(parsed.client_functions) == {"get_drug_info", "place_order", "lookup_order", "end_call"}
    assert_valid_client_message(config)
    saved = parse_agent_config(json.dumps({**CONFIG, "agent": "8a1c5d3e-saved-agent"}), Path("config.json"), {})
    assert saved.client_functions == {} and saved.settings["agent"] == "8a1c5d3e-saved-agent"


def test_config_json_uses_no_deprecated_key_and_validates_against_the_sdk() -> None:
    assert "language" not in CONFIG["agent"], "agent.language is deprecated"
    assert CONFIG["agent"]["listen"]["provider"]["language"] == "en"
    check_settings(CONFIG)
    assert_valid_client_message(CONFIG)


def test_the_table_module_has_no_runtime_dependency_on_the_sdk() -> None:
    source = Path(agent_schema.__file__).read_text()
    assert "import deepgram" not in source and "from deepgram" not in source and "pydantic" not in source.split("import")[-1]


def test_a_provider_type_that_is_an_object_is_a_sentence_not_a_crash() -> None:
    """Found by the property test above: {"type": {}} used to raise TypeError (unhashable)."""
    document = {"type": "Settings", "audio": {}, "agent": {"think": {"provider": {"type": {}}}}}
    with pytest.raises(SchemaError, match=r'"agent.think.provider.type" must be one of'):
        check_settings(document)
