"""deepgram-sdk 7.17.0's pydantic models as an independent check of every message the bridge sends
(and of what bridge/fake_agent.py sends as the agent).

``model_validate`` alone is not enough: every SDK model says ``extra="allow"``, so an unknown
key (a typo, a field of another message) lands silently in ``model_extra``. The helpers here
walk the validated model through nested models and lists and fail on any extra key, at any
depth. Test-only: the bridge never imports the SDK.
"""

from __future__ import annotations

import json
from typing import Any

from deepgram.agent.v1 import (
    AgentV1AgentAudioDone,
    AgentV1AgentStartedSpeaking,
    AgentV1AgentThinking,
    AgentV1ConversationText,
    AgentV1CustomToThinkProvider,
    AgentV1Error,
    AgentV1ForceEndTurn,
    AgentV1FunctionCallCancelled,
    AgentV1FunctionCallRequest,
    AgentV1HistoryContent,
    AgentV1HistoryFunctionCalls,
    AgentV1InjectAgentMessage,
    AgentV1InjectDynamicAgentMessage,
    AgentV1InjectionRefused,
    AgentV1InjectUserMessage,
    AgentV1KeepAlive,
    AgentV1LatencyReport,
    AgentV1ListenUpdated,
    AgentV1PromptUpdated,
    AgentV1SendFunctionCallResponse,
    AgentV1Settings,
    AgentV1SettingsApplied,
    AgentV1SpeakUpdated,
    AgentV1ThinkUpdated,
    AgentV1UpdateListen,
    AgentV1UpdatePrompt,
    AgentV1UpdateSpeak,
    AgentV1UpdateThink,
    AgentV1UpdateThinkLive,
    AgentV1UserStartedSpeaking,
    AgentV1Warning,
    AgentV1Welcome,
)
from pydantic import BaseModel, ValidationError

# What a client may send, by ``type``: the models of the SDK's socket client's send_* methods.
# InjectAgentMessage has two shapes (a fixed message, or a dynamic one the LLM writes).
CLIENT_MESSAGE_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "Settings": (AgentV1Settings,),
    "FunctionCallResponse": (AgentV1SendFunctionCallResponse,),
    "KeepAlive": (AgentV1KeepAlive,),
    "InjectUserMessage": (AgentV1InjectUserMessage,),
    "InjectAgentMessage": (AgentV1InjectAgentMessage, AgentV1InjectDynamicAgentMessage),
    "UpdatePrompt": (AgentV1UpdatePrompt,),
    "UpdateSpeak": (AgentV1UpdateSpeak,),
    "UpdateThink": (AgentV1UpdateThink,),
    "UpdateThink_Live": (AgentV1UpdateThinkLive,),
    "UpdateListen": (AgentV1UpdateListen,),
    "ForceEndTurn": (AgentV1ForceEndTurn,),
    "__customToThinkProvider": (AgentV1CustomToThinkProvider,),
}


# What the agent (Deepgram, or the fake agent) may send, by ``type``: the SDK's models of them.
SERVER_MESSAGE_MODELS: dict[str, tuple[type[BaseModel], ...]] = {
    "Welcome": (AgentV1Welcome,),
    "SettingsApplied": (AgentV1SettingsApplied,),
    "ConversationText": (AgentV1ConversationText,),
    "History": (AgentV1HistoryContent, AgentV1HistoryFunctionCalls),
    "UserStartedSpeaking": (AgentV1UserStartedSpeaking,),
    "AgentThinking": (AgentV1AgentThinking,),
    "FunctionCallRequest": (AgentV1FunctionCallRequest,),
    "FunctionCallCancelled": (AgentV1FunctionCallCancelled,),
    "AgentStartedSpeaking": (AgentV1AgentStartedSpeaking,),
    "AgentAudioDone": (AgentV1AgentAudioDone,),
    "LatencyReport": (AgentV1LatencyReport,),
    "InjectionRefused": (AgentV1InjectionRefused,),
    "PromptUpdated": (AgentV1PromptUpdated,),
    "SpeakUpdated": (AgentV1SpeakUpdated,),
    "ThinkUpdated": (AgentV1ThinkUpdated,),
    "ListenUpdated": (AgentV1ListenUpdated,),
    "Warning": (AgentV1Warning,),
    "Error": (AgentV1Error,),
}


def extra_keys(value: Any, where: str = "") -> list[str]:
    """The paths of every key pydantic let through as extra, at any depth of a validated model."""
    found: list[str] = []
    if isinstance(value, BaseModel):
        found += [f"{where}.{key}".lstrip(".") for key in (value.model_extra or {})]
        for name in type(value).model_fields:
            found += extra_keys(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found += extra_keys(item, f"{where}[{index}]")
    return found


def sdk_problem(message: str | dict[str, Any]) -> str | None:
    """Why the SDK's models refuse a client message (or let an extra key through); None if they don't."""
    return typed_problem(message, CLIENT_MESSAGE_MODELS, "a client")


def server_problem(message: str | dict[str, Any]) -> str | None:
    """Why the SDK's models refuse a message from the agent (or let an extra key through); None if they don't."""
    return typed_problem(message, SERVER_MESSAGE_MODELS, "the agent")


def typed_problem(
    message: str | dict[str, Any], models_by_type: dict[str, tuple[type[BaseModel], ...]], sender: str
) -> str | None:
    """Why the models for the message's ``type`` refuse it; None if one accepts it."""
    data = json.loads(message) if isinstance(message, str) else message
    if not isinstance(data, dict):
        return "not a JSON object"
    models = models_by_type.get(data.get("type"))  # type: ignore[arg-type]
    if models is None:
        return f"{data.get('type')!r} is not a message {sender} sends"
    return models_problem(data, models)


def models_problem(data: Any, models: tuple[type[BaseModel], ...]) -> str | None:
    """Why none of ``models`` accepts ``data`` with no extra key anywhere; None if one does."""
    problems = []
    for model in models:
        try:
            validated = model.model_validate(data)
        except ValidationError as exc:
            problems.append(f"{model.__name__}: {exc.error_count()} errors: {exc.errors()[0]}")
            continue
        extras = extra_keys(validated)
        if not extras:
            return None
        problems.append(f"{model.__name__}: unknown keys {extras}")
    return "; ".join(problems)


def settings_problem(settings: dict[str, Any]) -> str | None:
    """``sdk_problem`` for a Settings message, also one that leaves out its (defaulted) ``type``."""
    return models_problem(settings, (AgentV1Settings,))


def assert_valid_client_message(message: str | dict[str, Any]) -> None:
    """Fail unless the SDK model for the message's ``type`` accepts it with no extra key anywhere."""
    problem = sdk_problem(message)
    assert problem is None, f"{problem} in {str(message)[:500]}"
