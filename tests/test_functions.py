"""Function calls through the real server: dispatch, the error contract, cancellation, end_call."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from deepgram.agent.v1 import AgentV1SendFunctionCallResponse

import bridge.session
import main
import pharmacy_functions
from bridge.config import parse_agent_config
from bridge.settings import ConfigError
from bridge.functions import MAX_NESTING, MAX_RESULT_CHARS, check_function_map
from conftest import ROOT, BridgeFactory, empty_env, read_record, twilio_url
from fakes import FakeAgent, FakeAgentSession, FakeTwilioCaller, eventually


def request(*calls: tuple[str, str, Any], client_side: bool = True) -> dict[str, Any]:
    return {
        "type": "FunctionCallRequest",
        "functions": [
            {
                "id": call_id,
                "name": name,
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                "client_side": client_side,
            }
            for call_id, name, arguments in calls
        ],
    }


def responses(session: FakeAgentSession) -> dict[str, dict[str, Any]]:
    """FunctionCallResponses by id, each checked against the official SDK model."""
    found = {}
    for message in session.of_type("FunctionCallResponse"):
        model = AgentV1SendFunctionCallResponse.model_validate(message)
        assert not model.model_extra, f"unknown keys in {message}"
        assert isinstance(message["content"], str)
        assert message["id"] not in found, f"two responses for {message['id']}"
        found[message["id"]] = {"name": message["name"], **json.loads(message["content"])}
    return found


def boom(**_: Any) -> dict[str, Any]:
    raise RuntimeError("database on fire")


def unserialisable() -> Any:
    return {"when": object()}


def slow(seconds: float = 2.0) -> dict[str, Any]:
    time.sleep(seconds)
    return {"slept": seconds}


async def async_slow(seconds: float = 2.0) -> dict[str, Any]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}


def greet(name: str) -> dict[str, Any]:
    return {"greeting": f"Hello {name}"}


def nested(levels: int) -> dict[str, Any]:
    """An object ``levels`` deep."""
    value: dict[str, Any] = {"bottom": True}
    for _ in range(levels - 1):
        value = {"in": value}
    return value


def sized(chars: int) -> dict[str, Any]:
    return {"text": "x" * chars}


TEST_FUNCTIONS = {
    "boom": boom,
    "unserialisable": unserialisable,
    "slow": slow,
    "async_slow": async_slow,
    "greet": greet,
    "nested": nested,
    "sized": sized,
}


async def open_call(agent: FakeAgent, server: Any, **caller_options: Any) -> tuple[FakeTwilioCaller, FakeAgentSession]:
    index = len(agent.sessions)
    caller = FakeTwilioCaller(twilio_url(server), **caller_options)
    await caller.__aenter__()
    await caller.start()
    session = await agent.session(index)
    await eventually(lambda: session.settings is not None)
    return caller, session


async def test_every_failure_is_an_answer_with_the_right_id(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS, function_timeout_seconds=0.3) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(
            request(
                ("ok", "greet", {"name": "Ann"}),
                ("unknown", "no_such_function", {}),
                ("notjson", "greet", "{name: Ann"),
                ("notobject", "greet", "[1, 2]"),
                ("missing", "greet", {}),
                ("unexpected", "greet", {"name": "Ann", "age": 3}),
                ("raises", "boom", {}),
                ("unserialisable", "unserialisable", {}),
                ("timeout", "slow", {"seconds": 1.0}),
                ("async-timeout", "async_slow", {"seconds": 1.0}),
            )
        )
        await session.send_json(request(("server-side", "greet", {"name": "Bo"}), client_side=False))
        await eventually(lambda: len(session.of_type("FunctionCallResponse")) >= 10, 3, "ten responses")
        await asyncio.sleep(0.2)
        await caller.__aexit__(None, None, None)
    found = responses(session)
    assert set(found) == {
        "ok", "unknown", "notjson", "notobject", "missing", "unexpected",
        "raises", "unserialisable", "timeout", "async-timeout",
    }  # and nothing for the server-side call
    assert found["ok"] == {"name": "greet", "greeting": "Hello Ann"}
    for call_id, fragment in {
        "unknown": "no function called no_such_function",
        "notjson": "not valid JSON",
        "notobject": "must be a JSON object",
        "missing": "missing a required argument: 'name'",
        "unexpected": "unexpected keyword argument 'age'",
        "raises": "internal error",
        "unserialisable": "could not be read",
        "timeout": "took too long",
        "async-timeout": "took too long",
    }.items():
        assert set(found[call_id]) == {"name", "error"}, found[call_id]
        assert fragment in found[call_id]["error"], (call_id, found[call_id])
    assert "database on fire" not in json.dumps(found)  # the traceback stays in the log


def nested_json(levels: int) -> str:
    return "[" * levels + "]" * levels


async def test_arguments_nested_thousands_deep_get_an_answer_a_record_and_one_warning(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deeper than Python's JSON parser can go, or just deeper than any real call: both refused.

    Unanswered, the function stayed "running" for the rest of the call, which also stopped the
    silence clock: the re-prompt after the answer shows it is over.
    """
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS, idle_reprompt_seconds=0.5) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(
            ("deep", "greet", f'{{"name": {nested_json(3000)}}}'),
            ("deeper-than-allowed", "greet", f'{{"name": {nested_json(MAX_NESTING)}}}'),
            ("allowed", "greet", f'{{"name": {nested_json(MAX_NESTING - 1)}}}'),
        ))
        await eventually(lambda: len(session.of_type("FunctionCallResponse")) == 3, 2, "three answers")
        await eventually(lambda: session.of_type("InjectAgentMessage"), 2, "the silence clock's re-prompt")
        await caller.__aexit__(None, None, None)
    found = responses(session)
    for call_id in ("deep", "deeper-than-allowed"):
        assert found[call_id] == {"name": "greet", "error": "The arguments for greet are nested too deeply."}
    assert found["allowed"]["greeting"].startswith("Hello [[[")
    lines = read_record(tmp_path / "calls")
    refused = [line for line in lines if line["event"] == "function_call" and line["outcome"] == "bad_call"]
    assert [(line["error"], line["result"]) for line in refused] == [
        ("The arguments for greet are nested too deeply.", None)
    ] * 2
    # The arguments are kept as the text the agent sent (the long one cut, like any long field).
    assert sorted(line["arguments"][:40] for line in refused) == [f'{{"name": {nested_json(3000)}'[:40]] * 2
    assert f'{{"name": {nested_json(MAX_NESTING)}}}' in [line["arguments"] for line in refused]
    assert [e["event"] for e in lines].index("idle_reprompt") > [e["event"] for e in lines].index("function_call")
    warnings = [r.getMessage().partition("] ")[2] for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"function greet: arguments are nested more than {MAX_NESTING} levels deep"] * 2


async def test_a_result_too_deep_or_too_large_to_pass_on_is_an_error_answer(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(
            ("deep", "nested", {"levels": 3000}),
            ("deeper-than-allowed", "nested", {"levels": MAX_NESTING + 1}),
            ("allowed", "nested", {"levels": MAX_NESTING}),
            ("huge", "sized", {"chars": MAX_RESULT_CHARS}),
            ("large", "sized", {"chars": MAX_RESULT_CHARS - 20}),
        ))
        await eventually(lambda: len(session.of_type("FunctionCallResponse")) == 5, 2, "five answers")
        await caller.__aexit__(None, None, None)
    found = responses(session)
    for call_id in ("deep", "deeper-than-allowed"):
        assert found[call_id] == {"name": "nested", "error": "nested returned a result that could not be read."}
    assert found["huge"] == {"name": "sized", "error": "sized returned a result too large to pass on."}
    assert len(found["large"]["text"]) == MAX_RESULT_CHARS - 20
    assert {"name": "nested", **nested(MAX_NESTING)} == found["allowed"]
    recorded = [line for line in read_record(tmp_path / "calls") if line["event"] == "function_call"]
    assert sorted(line["outcome"] for line in recorded) == ["failed", "failed", "failed", "ok", "ok"]
    errors = sorted(r.getMessage().partition("] ")[2] for r in caplog.records if r.levelno >= logging.ERROR)
    assert errors == [
        f"function nested returned a result nested more than {MAX_NESTING} levels deep",
        f"function nested returned a result nested more than {MAX_NESTING} levels deep",
        f"function sized returned {MAX_RESULT_CHARS + 12} characters of JSON, more than {MAX_RESULT_CHARS}",
    ]


async def test_a_slow_function_does_not_stall_audio(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS, inbound_chunk_bytes=160) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(("sync", "slow", {"seconds": 2.0}), ("async", "async_slow", {"seconds": 2.0})))
        started = time.monotonic()
        # Agent speech and caller speech both keep flowing, 20 ms at a time, while both functions sleep.
        answered = None
        while time.monotonic() - started < 3.0:
            await session.send_audio(b"\x55" * 160)
            await caller.send_audio(b"\x66" * 160)
            await asyncio.sleep(0.02)
            if answered is None and len(session.of_type("FunctionCallResponse")) == 2:
                answered = time.monotonic()
        await caller.__aexit__(None, None, None)
    assert answered is not None and answered - started >= 1.9, "the functions did not run for their 2 s"
    arrivals = [t for t, _ in caller.media_arrivals if t <= answered]
    assert len(arrivals) > 60
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert max(gaps) < 0.25, f"agent audio stalled for {max(gaps):.3f} s while a function ran"
    assert len(session.audio) >= 60 * 160
    assert responses(session)["sync"] == {"name": "slow", "slept": 2.0}
    assert responses(session)["async"] == {"name": "async_slow", "slept": 2.0}


async def test_a_cancelled_async_function_is_cancelled_and_a_thread_finishes_unanswered(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(
            ("cancel-me", "async_slow", {"seconds": 0.5}), ("keep", "async_slow", {"seconds": 0.5}),
            ("cancel-thread", "slow", {"seconds": 0.5})))
        await asyncio.sleep(0.1)
        await session.send_json({"type": "FunctionCallCancelled", "functions": [
            {"id": "cancel-me", "name": "async_slow"}, {"id": "cancel-thread", "name": "slow"}]})
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "the other answer")
        await asyncio.sleep(0.7)
        await caller.__aexit__(None, None, None)
    assert set(responses(session)) == {"keep"}
    finished = [line for line in read_record(tmp_path / "calls") if line["event"] == "function_call"]
    # The stated rule: a running async def is cancelled; a def in its thread finishes, unanswered.
    assert sorted((c["name"], c["withdrawn"], c["result"] == {"slept": 0.5}, c["error"]) for c in finished) == [
        ("async_slow", False, True, None),
        ("async_slow", True, False, "cancelled: the agent withdrew the call"),
        ("slow", True, True, None),
    ]


async def test_a_thread_that_outlives_its_timeout_is_recorded_when_it_returns(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent hears "took too long"; the thread may still have placed the order."""
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS, function_timeout_seconds=0.2) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(("late", "slow", {"seconds": 0.6})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "the timeout answer")
        assert responses(session)["late"] == {"name": "slow", "error": "slow took too long to answer."}
        await eventually(
            lambda: any("after it was abandoned" in r.getMessage() for r in caplog.records), 3, "the thread to return"
        )
        await caller.__aexit__(None, None, None)
    lines = read_record(tmp_path / "calls")
    late = [line for line in lines if line["event"] == "function_finished_late"]
    assert len(late) == 1 and late[0]["id"] == "late" and late[0]["result"] == {"slept": 0.6}
    assert late[0]["duration_seconds"] >= 0.6
    assert any("returned" in r.getMessage() and "after it was abandoned" in r.getMessage() for r in caplog.records)


async def test_end_call_hangs_up_only_after_the_goodbye_mark_is_echoed(
    fake_agent: FakeAgent, make_bridge: BridgeFactory
) -> None:
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json(request(("bye", "end_call", {})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "end_call's answer")
        await session.send_audio(b"\x10" * 4000)  # "Goodbye!"
        await session.send_json({"type": "AgentAudioDone"})
        mark = await eventually(lambda: caller.of_event("mark"), 2, "the hang-up mark")
        await asyncio.sleep(0.5)
        assert not caller.closed.is_set(), "hung up before the caller heard the goodbye"
        assert len(caller.audio) == 4000
        await caller.echo_mark(mark[0]["mark"]["name"])
        await asyncio.wait_for(caller.closed.wait(), 1.0)
        await asyncio.wait_for(session.closed.wait(), 1.0)
        await caller.__aexit__(None, None, None)
    assert responses(session)["bye"]["name"] == "end_call"


async def test_end_call_without_echo_hangs_up_after_a_bounded_wait(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, hangup_timeout_seconds=0.5) as server:
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json(request(("bye", "end_call", {})))
        await session.send_json({"type": "AgentAudioDone"})
        await asyncio.wait_for(caller.closed.wait(), 2.0)
        await caller.__aexit__(None, None, None)


async def test_a_function_cut_off_by_the_hang_up_is_in_the_record(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bridge.session, "FUNCTION_GRACE_SECONDS", 0.2)
    async with make_bridge(fake_agent, function_map=TEST_FUNCTIONS) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(("cut", "async_slow", {"seconds": 1.5})))
        await asyncio.sleep(0.1)
        await caller.stop()
        await eventually(lambda: not server.calls, 3, "the call to end")
        await caller.__aexit__(None, None, None)
    [line] = [line for line in read_record(tmp_path / "calls") if line["event"] == "function_call"]
    assert (line["name"], line["error"], line["result"]) == ("async_slow", "the call ended before it finished", None)
    assert read_record(tmp_path / "calls")[-1]["function_errors"] == 1


async def test_end_call_after_the_goodbye_hangs_up_once_it_is_heard(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    """The prompt's order: the goodbye is spoken (and marked), then end_call comes, and nothing more."""
    async with make_bridge(fake_agent) as server:  # the 10 s fallback timer stays out of the way
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.5})
        await session.send_audio(b"\x10" * 4000)  # "Goodbye!"
        await session.send_json({"type": "AgentAudioDone"})
        mark = (await eventually(lambda: caller.of_event("mark"), 2, "the goodbye's mark"))[0]["mark"]["name"]
        await session.send_json(request(("bye", "end_call", {})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "end_call's answer")
        await asyncio.sleep(2.0)  # past the grace for last words
        assert not caller.closed.is_set(), "hung up before the caller heard the goodbye"
        await caller.echo_mark(mark)
        await asyncio.wait_for(caller.closed.wait(), 1.0)
        await caller.__aexit__(None, None, None)


async def test_end_call_when_all_was_heard_hangs_up_after_a_short_grace(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server)  # echoes every mark at once
        await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.5})
        await session.send_audio(b"\x10" * 800)
        await session.send_json({"type": "AgentAudioDone"})
        await eventually(lambda: caller.of_event("mark"), 2, "the goodbye's mark")
        await asyncio.sleep(0.1)
        asked = time.monotonic()
        await session.send_json(request(("bye", "end_call", {})))
        await asyncio.wait_for(caller.closed.wait(), 5.0)  # the fallback would take 10 s
        assert time.monotonic() - asked > 1.4, "hung up without the grace for last words"
        await caller.__aexit__(None, None, None)


async def test_last_words_after_end_call_are_heard_before_the_hang_up(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json(request(("bye", "end_call", {})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "end_call's answer")
        await asyncio.sleep(0.5)
        await session.send_json({"type": "AgentStartedSpeaking", "total_latency": 0.5})
        await session.send_audio(b"\x10" * 800)
        await asyncio.sleep(1.5)  # the grace ends mid-turn
        await session.send_audio(b"\x11" * 800)
        await session.send_json({"type": "AgentAudioDone"})
        mark = (await eventually(lambda: caller.of_event("mark"), 2, "the hang-up mark"))[0]["mark"]["name"]
        await asyncio.sleep(0.3)
        assert not caller.closed.is_set() and len(caller.audio) == 1600
        await caller.echo_mark(mark)
        await asyncio.wait_for(caller.closed.wait(), 1.0)
        await caller.__aexit__(None, None, None)


async def test_caller_speaking_during_the_goodbye_keeps_the_call_up(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path
) -> None:
    """Barge-in after end_call: the clear makes Twilio echo the goodbye's mark, unplayed."""
    async with make_bridge(fake_agent, hangup_timeout_seconds=0.5) as server:
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json(request(("bye", "end_call", {})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "end_call's answer")
        await session.send_audio(b"\x10" * 4000)  # "Goodbye!"
        await session.send_json({"type": "AgentAudioDone"})
        mark = (await eventually(lambda: caller.of_event("mark"), 2, "the hang-up mark"))[0]["mark"]["name"]
        await session.send_json({"type": "UserStartedSpeaking"})  # "wait, one more thing"
        await eventually(lambda: caller.of_event("clear"), 2, "the clear")
        await caller.echo_mark(mark)  # what Twilio does with every pending mark on a clear
        await asyncio.sleep(1.0)  # past the hang-up timer as well
        assert not caller.closed.is_set(), "hung up on a caller who was still talking"
        await session.send_audio(b"\x20" * 800)  # the agent answers the new question
        await session.send_json({"type": "AgentAudioDone"})
        await eventually(lambda: len(caller.of_event("mark")) == 2, 2, "the next turn's mark")
        await caller.echo_mark(caller.of_event("mark")[1]["mark"]["name"])
        await asyncio.sleep(0.2)
        assert not caller.closed.is_set(), "an ordinary turn's mark hung up"
        await caller.__aexit__(None, None, None)
    events = [line for line in read_record(tmp_path / "calls") if line["event"] in ("mark_played", "mark_cleared", "hangup_cancelled")]
    assert [(e["event"], e.get("name")) for e in events] == [
        ("hangup_cancelled", None), ("mark_cleared", mark), ("mark_played", caller.of_event("mark")[1]["mark"]["name"])
    ]
    assert events[0]["reason"] == "the caller spoke during the goodbye"


async def test_a_cancelled_end_call_does_not_hang_up(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent, hangup_timeout_seconds=0.3) as server:
        caller, session = await open_call(fake_agent, server, echo_marks=False)
        await session.send_json(request(("bye", "end_call", {})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 2, "end_call's answer")
        await session.send_json({"type": "FunctionCallCancelled", "functions": [{"id": "bye", "name": "end_call"}]})
        await asyncio.sleep(0.8)
        assert not caller.closed.is_set(), "hung up although the agent took end_call back"
        await caller.__aexit__(None, None, None)


async def test_fifty_concurrent_orders_through_the_bridge(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        calls = [await open_call(fake_agent, server) for _ in range(5)]
        for index, (_, session) in enumerate(calls):
            await session.send_json(
                request(*[(f"o{index}-{n}", "place_order", {"customer_name": f"C{index}{n}", "drug_name": "Ibuprofen"}) for n in range(10)])
            )
        for _, session in calls:
            await eventually(lambda s=session: len(s.of_type("FunctionCallResponse")) == 10, 5, "ten orders")
        for caller, _ in calls:
            await caller.__aexit__(None, None, None)
    ids = [answer["order_id"] for _, session in calls for answer in responses(session).values()]
    assert len(ids) == 50 and len(set(ids)) == 50


async def test_orders_survive_a_restart(fake_agent: FakeAgent, make_bridge: BridgeFactory) -> None:
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(("p", "place_order", {"customer_name": "Ann Lee", "drug_name": " ibuprofen ", "quantity": 2})))
        await eventually(lambda: session.of_type("FunctionCallResponse"), 3)
        await caller.__aexit__(None, None, None)
    placed = responses(session)["p"]
    assert placed["drug_name"].lower() == "ibuprofen" and placed["quantity"] == 2
    # A new server process opens the same file (PHARMACY_DB): the order is still there.
    import pharmacy_functions

    reopened = pharmacy_functions.PharmacyStore(Path(pharmacy_functions.os.environ["PHARMACY_DB"]))
    assert reopened.lookup_order(str(placed["order_id"]))["customer_name"] == "Ann Lee"


async def ask(session: FakeAgentSession, call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One function call, and the agent's answer to it."""
    await session.send_json(request((call_id, name, arguments)))
    await eventually(lambda: call_id in responses(session), 3, f"the answer to {call_id}")
    return responses(session)[call_id]


async def test_orders_are_refused_while_the_sqlite_file_is_not_at_its_path(
    fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Orders acknowledged into a deleted file would vanish at the restart, their numbers used again."""
    caplog.set_level(logging.INFO, logger="pharmacy_functions")
    data = tmp_path / "data"
    path = data / "pharmacy.db"
    monkeypatch.setenv("PHARMACY_DB", str(path))
    order = {"customer_name": "Ann Lee", "drug_name": "Ibuprofen"}
    unavailable = {"name": "place_order", "error": pharmacy_functions.UNAVAILABLE_MESSAGE}
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server)
        assert (await ask(session, "1", "place_order", order))["order_id"] == 1

        data.rename(tmp_path / "moved")  # the same file, elsewhere: refused until it is back
        assert await ask(session, "moved", "place_order", order) == unavailable
        assert await ask(session, "moved-lookup", "lookup_order", {"order_id": 1}) == {**unavailable, "name": "lookup_order"}
        (tmp_path / "moved").rename(data)
        assert (await ask(session, "2", "place_order", order))["order_id"] == 2

        shutil.rmtree(data)
        for call_id in ("gone-1", "gone-2", "gone-3"):
            assert await ask(session, call_id, "place_order", order) == unavailable
        # A new database at the path (a worker restarted meanwhile made it) is not taken up either:
        # its order numbers would start again at 1.
        pharmacy_functions.SQLiteStore(path)
        assert await ask(session, "new-file", "place_order", order) == unavailable
        await caller.__aexit__(None, None, None)
    with closing(sqlite3.connect(path)) as fresh:
        assert fresh.execute("SELECT COUNT(*) FROM orders").fetchall() == [(0,)]
    recorded = [line for line in read_record(tmp_path / "calls") if line["event"] == "function_call"]
    assert [line["error"] for line in recorded].count(pharmacy_functions.UNAVAILABLE_MESSAGE) == 6
    store_lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "pharmacy_functions"]
    assert [(level, message.split(" while ")[0]) for level, message in store_lines] == [
        ("WARNING", f"SQLite database {path} was deleted (or moved, or its folder was)"),
        ("INFO", f"SQLite database {path} is back at its path; orders are taken again"),
        ("WARNING", f"SQLite database {path} was deleted (or moved, or its folder was)"),
    ]
    assert "restore a backup, then restart the bridge" in store_lines[0][1]


@pytest.fixture(params=["sqlite", "postgresql"])
def pharmacy_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The pharmacy functions on a fresh SQLite file (conftest's PHARMACY_DB) or PostgreSQL database."""
    if request.param == "postgresql":
        monkeypatch.setenv("DATABASE_URL", request.getfixturevalue("postgres_url"))
    stores: dict[Any, pharmacy_functions.PharmacyStore] = {}
    monkeypatch.setattr(pharmacy_functions, "_stores", stores)  # this test's own, closed after it
    yield request.param
    for store in stores.values():
        store.close()


async def test_a_nul_or_half_a_character_in_a_name_is_refused_alike_on_both_stores(
    pharmacy_backend: str, fake_agent: FakeAgent, make_bridge: BridgeFactory, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL can't store a NUL, and neither database can encode a lone surrogate (JSON "\\ud800")."""
    drug_name = "That drug name has a character in it that I can't use. Please say it again."
    customer_name = "That customer name has a character in it that I can't use. Please say it again."
    async with make_bridge(fake_agent) as server:
        caller, session = await open_call(fake_agent, server)
        await session.send_json(request(
            ("nul-info", "get_drug_info", {"drug_name": "Ibu\u0000profen"}),
            ("nul-customer", "place_order", {"customer_name": "Ann\u0000Lee", "drug_name": "Ibuprofen"}),
            ("nul-drug", "place_order", {"customer_name": "Ann Lee", "drug_name": "Ibuprofen\u0000"}),
            ("surrogate-info", "get_drug_info", {"drug_name": "\udc00"}),
            ("surrogate-customer", "place_order", {"customer_name": "Ann \ud83d", "drug_name": "Ibuprofen"}),
            ("surrogate-drug", "place_order", {"customer_name": "Ann Lee", "drug_name": "Ibuprofen\ud800"}),
            ("whole-emoji", "place_order", {"customer_name": "Ann \U0001f600", "drug_name": "Ibuprofen"}),
        ))
        await eventually(lambda: len(session.of_type("FunctionCallResponse")) == 7, 3, "seven answers")
        await caller.__aexit__(None, None, None)
    found = responses(session)
    assert {call_id: answer.get("error") for call_id, answer in found.items()} == {
        "nul-info": drug_name, "nul-customer": customer_name, "nul-drug": drug_name,
        "surrogate-info": drug_name, "surrogate-customer": customer_name, "surrogate-drug": drug_name,
        "whole-emoji": None,
    }
    assert found["whole-emoji"]["order_id"] == 1  # nothing was written for the refused ones
    assert found["whole-emoji"]["customer_name"] == "Ann \U0001f600"
    recorded = {line["error"] for line in read_record(tmp_path / "calls") if line["event"] == "function_call"}
    assert recorded == {drug_name, customer_name, None}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []  # no traceback
    assert sorted(r.getMessage() for r in caplog.records if r.name == "pharmacy_functions") == sorted(
        ["get_drug_info refused its arguments: the drug name holds a NUL or a lone surrogate"] * 2
        + ["place_order refused its arguments: the customer name holds a NUL or a lone surrogate"] * 2
        + ["place_order refused its arguments: the drug name holds a NUL or a lone surrogate"] * 2
    )


def test_startup_check_of_declared_functions() -> None:
    config = json.loads((ROOT / "config.json").read_text())
    declared = parse_agent_config(json.dumps(config), Path("config.json"), {}).client_functions
    assert set(declared) == {"get_drug_info", "place_order", "lookup_order", "end_call"}
    import pharmacy_functions

    assert check_function_map(pharmacy_functions.function_map, declared) == []
    with pytest.raises(ConfigError, match="declares function 'get_drug_info' but pharmacy_functions.function_map has no"):
        check_function_map({k: v for k, v in pharmacy_functions.function_map.items() if k != "get_drug_info"}, declared)
    with pytest.raises(ConfigError, match="parameter 'drug_name' of function 'get_drug_info'.*does not accept it"):
        check_function_map({**pharmacy_functions.function_map, "get_drug_info": lambda name: {}}, declared)
    warnings = check_function_map({**pharmacy_functions.function_map, "refill": lambda: {}}, declared)
    assert warnings == ["function_map entry 'refill' is not declared in config.json, so the agent cannot call it."]
    with pytest.raises(ConfigError, match="^pharmacy_functions.function_map entry 'refill' is a str, not a function.$"):
        check_function_map({**pharmacy_functions.function_map, "refill": "refill_prescription"}, declared)


def test_startup_refuses_a_declared_optional_parameter_the_function_does_not_take() -> None:
    """An optional parameter is one the LLM may send: a function without it answers "Bad arguments"
    to every call that does, so startup refuses it as it does a required one, unless **kwargs."""
    declared = {"get_opening_hours": {"name": "get_opening_hours", "parameters": {
        "type": "object", "properties": {"day": {"type": "string"}, "store": {"type": "string"}}, "required": ["day"],
    }}}

    def without_store(day: str) -> dict[str, str]:
        return {"day": day}

    def with_store(day: str, store: str = "") -> dict[str, str]:
        return {"day": day, "store": store}

    def with_anything(day: str, **more: Any) -> dict[str, str]:
        return {"day": day}

    with pytest.raises(ConfigError) as caught:
        check_function_map({"get_opening_hours": without_store}, declared)
    assert str(caught.value) == (
        "config.json declares the optional parameter 'store' of function 'get_opening_hours', but the Python "
        "function get_opening_hours() does not accept it, so every call that passes it would fail."
    )
    assert check_function_map({"get_opening_hours": with_store}, declared) == []
    assert check_function_map({"get_opening_hours": with_anything}, declared) == []
    # A required parameter that is not declared as a property too is still checked, as required.
    declared["get_opening_hours"]["parameters"]["required"] = ["day", "week"]
    with pytest.raises(ConfigError, match="^config.json marks parameter 'week' of function 'get_opening_hours' as required"):
        check_function_map({"get_opening_hours": with_store}, declared)


def test_startup_refuses_a_declared_function_that_does_not_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((ROOT / "config.json").read_text())
    config["agent"]["think"]["functions"].append(
        {"name": "refill_prescription", "description": "x", "parameters": {"type": "object", "properties": {}}}
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("DEEPGRAM_API_KEY", "k")
    assert main.main(["--config", str(path), "--env-file", str(empty_env(tmp_path))]) == 2
    assert "refill_prescription" in capsys.readouterr().err
