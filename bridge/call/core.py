"""``Call``: one call's rules as a state machine with no I/O, composed of small machines.

Built the way h11 and websockets' Sans-I/O core are: ``Call`` never touches a socket, a task, a
clock or a file. Each public method is an event (something Twilio or the agent sent, a socket
that closed, a function that finished, a timer that fired) given the current clock value, and
returns the actions the asyncio shell must carry out, in order. Every rule of a call lives in
this package and is tested with a fake clock and no sockets (tests/test_call.py).

``Call`` routes each event to the machine that owns it and connects their answers; it keeps only
what belongs to the call as a whole (its phase, its stream and agent, how it ended):

=================  ==============================  =========================================
machine            module                          owns
=================  ==============================  =========================================
``PhaseMachine``   phase.py                        the call's phase, through one table
``AgentLink``      agent_link.py                   opening, handshake, resume attempts, KeepAlive
``InboundAudio``   inbound.py                      caller audio in chunks; pausing the caller
``Playback``       playback.py                     agent audio out, turns, marks, barge-in
``Departure...``   departure.py                    end_call, transfer, voicemail, idle goodbye
``Keypad``         keypad.py                       keypad digits and their echoes
``SilenceClock``   silence.py                      re-prompt and goodbye to a silent caller
``Injections``     injections.py                   messages the bridge injects, refusals retried
``FunctionCalls``  function_calls.py               running functions, withdrawn ones
``ResumeHistory``  history.py                      the conversation for a resumed session
``CallStats``      stats.py                        what the summary counts; bad input
``BrowserFeed``    browser.py                      what the browser phone's page is told
=================  ==============================  =========================================

A machine that must know about another asks the call, which answers from the others' read-only
views (``Playback.all_heard``, ``FunctionCalls.any_running``, ...); no machine reads another's
fields. After every event but audio, the silence clock is told whether the silence is now the
caller's (``_settle``).

The phases, in the words of docs/architecture.md: ``WAITING_FOR_START`` (nothing Twilio sends is
kept; the ``START`` timer ends a call that never starts), ``OPENING_AGENT`` (the first session's
handshake, within ``AGENT_OPEN``; caller audio is held), ``CONVERSING``, ``RESUMING`` (a lost
session is reopened with the conversation so far, after running functions have finished; caller
audio meanwhile is dropped and counted), ``ENDED`` (``HangUp`` was returned; later events only add
to the record).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from .. import agent_protocol as agent
from .. import twilio
from ..agents import AgentCatalog, AgentChoice
from ..binding import BINDING_PARAMETER
from ..caller_lines import CallerLines
from ..settings import Settings
from ..functions import FunctionOutcome
from ..logsafe import clean
from .actions import (
    NO_ACTIONS,
    Action,
    ArmTimer,
    CancelFunction,
    CancelTimer,
    CloseAgent,
    EndCallLeg,
    HangUp,
    Identify,
    Log,
    Record,
    RedirectCall,
    SendToAgent,
    StartFunction,
    Timer,
    TransferCall,
)
from .agent_link import MAX_ERROR_RESUMES, RESUMABLE_CLOSE_CODES, AgentLink
from .browser import NO_FEED, BrowserFeed, NoFeed
from .control import CallControl
from .departure import DepartureKind, DepartureMachine
from .function_calls import FunctionCalls
from .history import ResumeHistory
from .inbound import InboundAudio
from .injections import Injection, Injections
from .keypad import KEYPAD_REDACTED, Keypad, keys_in
from .phase import Phase, PhaseEvent, PhaseMachine
from .privacy import TranscriptPolicy, TranscriptStorage
from .consult import Consult, ConsultStage, briefing_for, conference_name, parse_note
from .recording import Recording
from .playback import EchoedMark, Playback
from ..call_events import CallEnd, EndReason, RecordEvent
from .silence import SilenceClock, SilenceStage
from .stats import CallStats

# How long a hung-up caller's last audio may wait for an agent still opening.
TAIL_FLUSH_SECONDS = 1.0
# Transcript text kept for the resume history and sent to the browser page.
MAX_TEXT_CHARS = 8000
# The Twilio tracks a keypad press may come from: the caller's.
INBOUND_TRACKS = frozenset({"inbound_track", "inbound"})


class Call:
    """One call's rules. See the module docstring for the machines it is made of."""

    # Like each of its machines, slots instead of a dict: one a call, for its whole length.
    __slots__ = (
        "settings", "_agents", "_agent", "_settings_json", "lines", "_page", "control", "_phase", "stream", "_end",
        "_caller_left", "_fallback_target", "_warm_reason", "link", "inbound", "playback", "departure", "keypad",
        "silence", "injections", "functions", "history", "stats", "privacy", "recording", "consult",
    )

    def __init__(
        self,
        settings: Settings,
        agents: AgentCatalog,
        async_functions: frozenset[str] = frozenset(),
        *,
        browser: bool = False,
    ) -> None:
        self.settings = settings
        # The agents as they were when the call was admitted: a reload later changes only new
        # calls. The start event picks one and fills in its placeholders.
        self._agents = agents
        self._agent: AgentChoice | None = None
        self._settings_json = ""  # the Settings message of a fresh session, encoded once at start
        self.lines: CallerLines = settings.caller_lines  # the chosen agent's own, from start on
        self._page: NoFeed = BrowserFeed() if browser else NO_FEED
        # Whether Twilio's REST API may act on this call: decided at start, by the stream's binding.
        self.control = CallControl(
            rest_enabled=settings.rest_enabled, allow_unbound=settings.allow_unbound_call_control, browser=browser
        )
        self._phase = PhaseMachine()
        self.stream: twilio.StreamStart | None = None
        self._end: CallEnd | None = None
        self._caller_left: CallEnd | None = None  # why the caller's socket ended, once it has
        self._fallback_target: str | None = None
        self._warm_reason: str | None = None  # a warm transfer's reason, for the record

        self.link = AgentLink(
            settings.agent_connect_timeout_seconds, settings.limits.agent_reconnect_delays, settings.limits.keepalive_seconds
        )
        self.inbound = InboundAudio(settings.inbound_chunk_bytes, settings.limits.max_agent_queue_bytes)
        self.playback = Playback()
        self.departure = DepartureMachine(settings.limits.hangup_timeout_seconds)
        self.keypad = Keypad(settings.dtmf_timeout_seconds)
        self.silence = SilenceClock(settings.idle_reprompt_seconds, settings.idle_hangup_seconds)
        self.injections = Injections()
        self.functions = FunctionCalls(async_functions)
        self.history = ResumeHistory()
        self.stats = CallStats()
        # What of the caller's words records and logs get; the agent's sensitive parameters join at start.
        self.privacy = TranscriptPolicy(TranscriptStorage(settings.store_transcripts))
        self.recording = Recording()
        self.consult = Consult(settings.transfer_timeout_seconds)

    # ------------------------------------------------------------------------------ views

    @property
    def phase(self) -> Phase:
        return self._phase.phase

    @property
    def agent_ready(self) -> bool:
        """Audio flows both ways: the same as the phase being CONVERSING."""
        return self._phase.conversing

    @property
    def end(self) -> CallEnd | None:
        return self._end

    @property
    def end_reason(self) -> str | None:
        """The record's ``ended_by``: the reason's words and their detail."""
        return self._end.ended_by if self._end is not None else None

    @property
    def bad_input(self) -> dict[str, int]:
        return self.stats.bad_input

    def _caller_may_be_idle(self) -> bool:
        """Nobody is talking and nothing is under way: the silence is the caller's."""
        return (
            self._phase.conversing
            and self.departure.pending is None
            and not self.functions.any_running
            and self.playback.all_heard
        )

    def _settle(self, actions: Sequence[Action], now: float) -> Sequence[Action]:
        """After an event: the silence clock follows whether the silence is now the caller's."""
        silence = self.silence.follow(now, quiet=self._caller_may_be_idle())
        if not silence:
            return actions
        return [*actions, *silence]

    def _caller_acted(self, now: float) -> list[Action]:
        return self.silence.follow(now, quiet=self._caller_may_be_idle(), caller_acted=True)

    # ------------------------------------------------------------------------ the Twilio side

    def connected(self, now: float) -> list[Action]:
        """The caller's WebSocket is open."""
        return [
            Log(logging.INFO, "call connected%s", (" (browser phone)" if self._page is not NO_FEED else "",)),
            ArmTimer(Timer.START, now + self.settings.limits.start_timeout_seconds),
        ]

    def caller_text(self, text: str, now: float) -> Sequence[Action]:
        """One text frame from Twilio."""
        if self._caller_left is not None or self._phase.ended:
            return NO_ACTIONS  # after stop, nothing Twilio sends matters
        # The hot path, 50 times a second: caller audio once the stream has started.
        audio = twilio.fast_media_payload(text)
        if audio is not None and self.playback.started:
            return self.inbound.audio(audio, now)
        return self._settle(self._caller_event(text, now), now)

    def caller_binary(self, data: bytes, now: float) -> Sequence[Action]:
        if self._caller_left is not None or self._phase.ended:
            return NO_ACTIONS
        return self.stats.reject("twilio", "binary", "Twilio sent a binary frame; Media Streams frames are JSON text")

    def caller_closed(self, now: float, *, stalled: bool = False) -> Sequence[Action]:
        """The caller's socket is gone (a close, a dropped connection, or cut off as stalled)."""
        if self._caller_left is not None or self._phase.ended:
            return NO_ACTIONS
        return self._caller_finished(now, CallEnd(EndReason.CALLER_STALLED if stalled else EndReason.CALLER_HUNG_UP))

    def agent_backlog(self, full: bool, now: float) -> Sequence[Action]:
        """The agent's socket queue went over its cap (``full``) or back under it."""
        return self.inbound.agent_backlog(full)

    def _caller_event(self, text: str, now: float) -> Sequence[Action]:
        reject = self.stats.reject
        try:
            event, message = twilio.parse_event(text)
            started = self.playback.started
            if event == "media":
                if not started:
                    return reject("twilio", "media-before-start", "Twilio sent media before start")
                return self.inbound.audio(twilio.media_payload(message), now)
            if event == "mark":
                if not started:
                    return reject("twilio", "mark-before-start", "Twilio sent a mark before start")
                return self._mark_echoed(twilio.mark_name(message))
            if event == "start":
                return self._on_start(twilio.parse_start(message), now)
            if event == "stop":
                actions = [Log(logging.INFO, "%s stopped the stream", (self._page.peer,))]
                return actions + self._caller_finished(now, CallEnd(EndReason.CALLER_HUNG_UP))
            if event == "dtmf":
                if not started:
                    return reject("twilio", "dtmf-before-start", "Twilio sent a dtmf event before start")
                digit = twilio.dtmf_digit(message)
                if not self._dtmf_is_the_callers(message):
                    return reject("twilio", "foreign-dtmf", "a dtmf event for another stream or track than the caller's")
                return self._key_pressed(digit, now)
            if event == "connected":
                return [Log(logging.DEBUG, "Twilio connected")]
            return reject("twilio", "unknown-event", f"unknown Twilio event {clean(event, 40)}")
        except twilio.TwilioProtocolError as exc:
            return reject("twilio", exc.kind, str(exc))

    def _dtmf_is_the_callers(self, message: dict[str, Any]) -> bool:
        assert self.stream is not None
        dtmf = message.get("dtmf")
        track = dtmf.get("track") if isinstance(dtmf, dict) else None
        return message.get("streamSid") == self.stream.stream_sid and track in INBOUND_TRACKS

    def _on_start(self, stream: twilio.StreamStart, now: float) -> list[Action]:
        if self.stream is not None:
            return self.stats.reject("twilio", "second-start", "Twilio sent a second start event")
        expected_account = self.settings.twilio_account_sid
        if expected_account and stream.account_sid != expected_account:
            # Not our account's call: no agent session, no record named after its callSid.
            return [
                Log(
                    logging.WARNING,
                    "closing a stream whose start names another Twilio account (%s) than TWILIO_ACCOUNT_SID",
                    (clean(stream.account_sid, 40),),
                ),
                *self._end_call(CallEnd(EndReason.STREAM_REFUSED, ": another Twilio account")),
            ]
        # The binding MAC is a credential for this call: checked here, and kept out of the record,
        # the agent's placeholders and the logs.
        parameters = dict(stream.custom_parameters)
        mac = parameters.pop(BINDING_PARAMETER, None)
        stream = dataclasses.replace(stream, custom_parameters=parameters)
        self.control.stream_started(self.settings.binding_key, stream.call_sid, stream.account_sid, mac)
        self.stream = stream
        self.playback.stream_started(stream.stream_sid)
        choice = self._agent = self._agents.for_call(stream.custom_parameters)
        self._settings_json = choice.settings_json
        self.lines = choice.lines
        self.privacy = TranscriptPolicy(self.privacy.storage, choice.sensitive)
        params = sorted(stream.custom_parameters)
        actions: list[Action] = [
            CancelTimer(Timer.START),
            Identify(stream.call_sid),
            Log(
                logging.INFO,
                "stream %s started%s",
                (clean(stream.stream_sid, 64), f" with parameters {clean(params, 300)}" if params else ""),
            ),
            Record(
                RecordEvent.START,
                {
                    "stream_sid": stream.stream_sid,
                    "custom_parameters": self.privacy.parameters(stream.custom_parameters),
                    "agent": choice.name,
                    "bound": self.control.bound,
                },
            ),
        ]
        if choice.unknown is not None:
            actions.append(
                Log(logging.WARNING, "no agent is named %s: the call gets the default agent", (clean(choice.unknown, 64),))
            )
        actions.append(Log(logging.INFO, "agent %s", (choice.name,)))
        if stream.custom_parameters.get(twilio.MODE_PARAMETER) == twilio.VOICEMAIL_MODE:
            # An answering machine took an outbound call: the agent's greeting is the message,
            # and the call ends once it has been heard.
            self.departure.voicemail()
            self._settings_json = json.dumps(agent.with_greeting(choice.settings, self.lines.voicemail))
            actions.append(Log(logging.INFO, "leaving the voicemail message"))
        elif self.settings.call_recording != "off":
            actions += self._prepare_recording(stream.call_sid, choice)
        self._phase.move(PhaseEvent.STARTED)
        return actions + self.link.open(now, resuming=False)

    def _prepare_recording(self, call_sid: str, choice: AgentChoice) -> list[Action]:
        """A call to record: the notice opens the greeting (or is injected once the agent is ready)."""
        if not self.control.may_act:
            return self.control.refused("recording the call")
        self.recording.call_started(call_sid)
        greeting = agent.greeting_of(choice.settings)
        if greeting is not None:
            noticed = agent.with_greeting(choice.settings, f"{self.lines.recording_notice} {greeting}")
            self._settings_json = agent.settings_message(noticed, [])
        else:
            self.recording.notice_refused()  # nothing to carry it: inject it when the session is ready
        return []

    def _say_recording_notice(self) -> list[Action]:
        if not self.recording.needs_notice or not self._phase.conversing:
            return []
        self.recording.notice_injected()
        return self.injections.send(Injection.RECORDING_NOTICE, agent.inject_agent_message(self.lines.recording_notice))

    def _caller_finished(self, now: float, end: CallEnd) -> list[Action]:
        """The caller is gone: every byte they sent still reaches the agent if it can."""
        if self.departure.transferring:
            # Twilio ends the stream when the call moves to <Dial>, often before the REST answer;
            # transfer_finished still records what the answer was.
            end = CallEnd(EndReason.TRANSFERRED)
        self._caller_left = end
        actions = list(self.inbound.caller_left(now))
        if self._phase.phase is Phase.OPENING_AGENT:
            # The agent may still take what the caller said: wait a moment for it.
            actions.append(ArmTimer(Timer.TAIL_FLUSH, now + TAIL_FLUSH_SECONDS))
            return actions
        return actions + self._end_call(end)

    def _mark_echoed(self, name: str | None) -> list[Action]:
        echoed = self.playback.mark_echoed(name)
        if echoed is EchoedMark.UNKNOWN or name is None:
            return self.stats.reject("twilio", "unknown-mark", "Twilio echoed a mark the bridge never sent")
        if echoed is EchoedMark.CLEARED:
            # A clear makes Twilio echo every pending mark at once: that audio was never heard.
            return [Record(RecordEvent.MARK_CLEARED, {"name": name}), *self.recording.mark_cleared(name)]
        actions: list[Action] = [Record(RecordEvent.MARK_PLAYED, {"name": name}), *self.recording.mark_heard(name)]
        departure = self.departure
        if echoed is EchoedMark.HEARD_LAST_WORDS and departure.awaiting_last_words:
            actions += self._last_words_heard()
        elif departure.leaving_when_all_heard and self.playback.all_heard:
            actions += self._last_words_heard()
        return actions

    # ------------------------------------------------------------------------- the agent side

    def agent_connected(self, now: float) -> Sequence[Action]:
        """The agent WebSocket of the attempt in progress is open; its Welcome comes next."""
        if not self._phase.ended:
            self.link.connected()
        return NO_ACTIONS

    def agent_open_failed(self, reason: str, now: float) -> Sequence[Action]:
        """The attempt in progress could not connect; ``reason`` is one sentence."""
        if self._phase.ended or not self.link.opening:
            return NO_ACTIONS
        return self._settle(self._attempt_failed(reason, now), now)

    def agent_binary(self, audio: bytes, now: float) -> Sequence[Action]:
        """Agent speech: to the caller as it comes (Twilio queues it and plays it in order)."""
        if not self._phase.conversing:
            return NO_ACTIONS
        sent = self.playback.agent_audio(audio)
        return (sent,) if sent is not None else NO_ACTIONS

    def agent_text(self, text: str, now: float) -> Sequence[Action]:
        """One JSON message from the agent."""
        conversing = self._phase.conversing
        if self._phase.ended or not (conversing or self.link.opening):
            return NO_ACTIONS
        try:
            message = agent.parse_message(text)
            actions = self._agent_message(message, now) if conversing else self._agent_handshake(message, now)
        except agent.AgentProtocolError as exc:
            actions = self.stats.reject("deepgram", exc.kind, str(exc))
        return self._settle(actions, now)

    def agent_closed(self, code: int | None, reason: str | None, now: float, *, stalled: bool = False) -> Sequence[Action]:
        """The current agent socket is gone. ``code`` is the close code received, if any."""
        if self._phase.ended:
            return NO_ACTIONS
        code = code or 1006  # 1006: the connection was lost without a close frame
        if not self._phase.conversing:
            if not self.link.opening:
                return NO_ACTIONS
            failure = f"Deepgram closed the connection while {self.link.stage_text()} (code {code})"
            return self._settle(self._attempt_failed(failure, now), now)
        actions: list[Action] = [CancelTimer(Timer.KEEPALIVE)]
        if self._caller_left is not None:
            return actions + self._end_call(self._caller_left)
        if stalled:
            actions.append(Log(logging.WARNING, "the agent stopped reading what the bridge sent; ending the call"))
            return actions + self._end_call(CallEnd(EndReason.AGENT_STALLED))
        if code in RESUMABLE_CLOSE_CODES:
            self.stats.errors += 1
            actions += [
                Log(logging.WARNING, "the agent connection dropped (close code %d); resuming", (code,)),
                Record(RecordEvent.ERROR, {"source": "deepgram", "code": code, "description": "connection dropped"}),
            ]
            return actions + self._start_resume(now)
        detail = f": {clean(reason, 120)}" if reason else ""
        actions.append(Log(logging.INFO, "Deepgram closed the session (code %d%s)", (code, detail)))
        return actions + self._end_call(CallEnd(EndReason.AGENT_CLOSED, f" (code {code})"), fallback=True)

    def _agent_handshake(self, message: dict[str, Any], now: float) -> list[Action]:
        kind = message["type"]
        if kind == "Welcome" and self.link.welcomed():
            assert self._agent is not None
            request_id = clean(message.get("request_id"), 100)
            self.stats.agent_session(request_id)
            context_keys = agent.context_keys(self._agent.settings)
            if self._phase.phase is Phase.RESUMING and not self.departure.voicemail_mode:
                settings = agent.settings_message(self._agent.settings, self.history.items())
                context_keys += self.history.keys()
            else:
                settings = self._settings_json  # a voicemail stream says its message again after a drop
            self.history.given_as_context(context_keys)
            return [
                Log(logging.INFO, "Deepgram session request_id %s", (request_id,)),
                Record(RecordEvent.AGENT_SESSION, {"request_id": request_id}),
                SendToAgent(settings),
            ]
        if kind == "SettingsApplied" and self.link.applied():
            return self._agent_ready(now)
        if kind == "Error":
            code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
            return self._attempt_failed(f"Deepgram refused the session: {code}: {description}", now)
        if kind == "Warning":
            return self._on_warning(message)
        return []

    def _agent_ready(self, now: float) -> list[Action]:
        resumed = self._phase.phase is Phase.RESUMING
        attempt = self.link.attempt
        self._phase.move(PhaseEvent.AGENT_READY)
        actions = self.link.ready(now)
        actions.append(Log(logging.INFO, "agent session ready"))
        if resumed:
            items = len(self.history)
            actions += [
                Log(logging.INFO, "agent session resumed (attempt %d) with %d history items", (attempt, items)),
                Record(RecordEvent.AGENT_RESUMED, {"attempt": attempt, "history_items": items}),
            ]
        # What the caller said while the first session opened goes out now, in order.
        actions += self.inbound.forward(now)
        if self.departure.voicemail_mode:
            if not resumed:
                actions += self.departure.voicemail_playing(now)
            assert self._agent is not None
            if not isinstance(self._agent.settings.get("agent"), dict):
                # A saved agent's greeting can't be replaced: the agent says the message instead.
                actions += self.injections.send(Injection.VOICEMAIL, agent.inject_agent_message(self.lines.voicemail))
        actions += self.injections.agent_ready()  # keypad digits pressed while the session opened
        actions += self._say_recording_notice()
        if self._caller_left is not None:
            actions.append(CancelTimer(Timer.TAIL_FLUSH))
            actions += self._end_call(self._caller_left)
        return actions

    def _attempt_failed(self, reason: str, now: float) -> list[Action]:
        link = self.link
        actions = link.failed()
        if self._phase.phase is Phase.RESUMING:
            actions.append(
                Log(logging.WARNING, "reconnect attempt %d of %d failed: %s", (link.attempt, link.attempts_allowed, reason))
            )
            if link.may_retry() and self._caller_left is None:
                return actions + link.next_attempt(now)
            actions.append(
                Log(
                    logging.ERROR,
                    "could not resume the agent session after %d attempts; ending the call",
                    (link.attempts_allowed,),
                )
            )
            return actions + self._end_call(CallEnd(EndReason.AGENT_LOST), fallback=True)
        actions.append(Log(logging.ERROR, "could not start the agent session: %s", (reason,)))
        return actions + self._end_call(CallEnd(EndReason.AGENT_UNAVAILABLE, f": {reason}"), fallback=True)

    def _start_resume(self, now: float) -> list[Action]:
        self._phase.move(PhaseEvent.AGENT_LOST)
        self.link.start_resuming()
        self.inbound.drop_until_resumed()
        # A turn the lost session was speaking gets no AgentAudioDone: its end is marked now, so
        # that the silence clock (and a pending departure) go on once the caller has heard it.
        actions = self._end_turn(now) if self.playback.speaking else []
        if self.functions.any_running:
            # A function still running (an order being placed) must be in the history the new
            # session starts from, or the agent never learns its result and may ask again.
            return actions + [ArmTimer(Timer.FUNCTIONS_WAIT, now + self.settings.function_timeout_seconds + 1)]
        return actions + self.link.next_attempt(now)

    def _agent_message(self, message: dict[str, Any], now: float) -> Sequence[Action]:
        kind = message["type"]
        if kind == "UserStartedSpeaking":
            return self._barge_in(now)
        if kind == "ConversationText":
            return self._conversation_text(message, now)
        if kind == "AgentAudioDone":
            return self._agent_audio_done(now)
        if kind == "FunctionCallRequest":
            return self._function_call_request(message, now)
        if kind == "FunctionCallCancelled":
            return self._function_call_cancelled(message)
        if kind == "AgentStartedSpeaking":
            return self._agent_started_speaking(message)
        if kind == "History":
            return self._history(message)
        if kind == "LatencyReport":
            return self._latency_report(message)
        if kind == "InjectionRefused":
            if self.injections.last_kind is Injection.RECORDING_NOTICE:
                self.recording.notice_refused()
            return self.injections.refused(message.get("message"))
        if kind == "Warning":
            return self._on_warning(message)
        if kind == "Error":
            return self._error_mid_call(message, now)
        # Welcome, AgentThinking, PromptUpdated and types that don't exist yet.
        return [Log(logging.DEBUG, "agent message %s", (clean(kind, 40),))]

    def _error_mid_call(self, message: dict[str, Any], now: float) -> list[Action]:
        """Deepgram ends a session on every Error: resume it, as after a drop, a bounded number of times."""
        code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
        self.stats.errors += 1
        actions: list[Action] = [Record(RecordEvent.ERROR, {"source": "deepgram", "code": code, "description": description})]
        if not self.link.error_resume_allowed() or self._caller_left is not None:
            actions.append(Log(logging.ERROR, "Deepgram error %s: %s; ending the call", (code, description)))
            return actions + self._end_call(CallEnd(EndReason.AGENT_ERROR, f" {code}"), fallback=True)
        actions += [
            Log(
                logging.WARNING,
                "Deepgram error %s: %s; resuming the session (%d of %d)",
                (code, description, self.link.error_resumes, MAX_ERROR_RESUMES),
            ),
            CancelTimer(Timer.KEEPALIVE),
            CloseAgent(),
        ]
        return actions + self._start_resume(now)

    def _history(self, message: dict[str, Any]) -> list[Action]:
        parsed = agent.history_item(message, MAX_TEXT_CHARS)
        if parsed is None:
            return self.stats.reject("deepgram", "bad-history", "a History message that is neither a turn nor function calls")
        self.history.theirs(*parsed)
        return []

    def _latency_report(self, message: dict[str, Any]) -> list[Action]:
        figures = {key: _number(message.get(key)) for key in agent.LATENCY_REPORT_FIELDS}
        self.stats.latency_reports += 1
        return [Record(RecordEvent.LATENCY_REPORT, figures), *self._page.latency_report(figures)]

    def _on_warning(self, message: dict[str, Any]) -> list[Action]:
        code, description = clean(message.get("code"), 60), clean(message.get("description"), 200)
        self.stats.warnings += 1
        return [
            Log(logging.WARNING, "Deepgram warning %s: %s", (code, description)),
            Record(RecordEvent.WARNING, {"code": code, "description": description}),
        ]

    def _barge_in(self, now: float) -> list[Action]:
        if self.departure.voicemail_mode:
            return [Log(logging.DEBUG, "speech during the voicemail message: the machine is recording; not clearing")]
        clear = self.playback.barge_in()  # Twilio drops what it had not played
        self.stats.barge_ins += 1
        actions: list[Action] = [
            clear,
            Record(RecordEvent.BARGE_IN, {}),
            Log(logging.DEBUG, "barge-in: cleared the caller's playback"),
        ]
        actions += self._take_back_departure("the caller spoke during the goodbye")
        return actions + self._caller_acted(now)

    def _conversation_text(self, message: dict[str, Any], now: float) -> list[Action]:
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return self.stats.reject("deepgram", "bad-conversation-text", "a ConversationText without role and content")
        role, content = agent.turn(role, content, MAX_TEXT_CHARS)
        self.stats.turns += 1
        self.history.conversation_moved_on()
        item = agent.history_text(role, content)
        self.history.ours(item, item)
        shown = content
        if role == "user" and self.keypad.take_echo(content):
            # The agent's echo of injected keypad digits: they may be a PIN, kept out of logs and records.
            shown = KEYPAD_REDACTED
        privacy = self.privacy
        actions: list[Action] = [Log(logging.INFO, "%s: %s", ("User" if role == "user" else "Agent", clean(privacy.log_turn(shown), 300)))]
        if privacy.keeps_turns:
            actions.append(Record(RecordEvent.TRANSCRIPT, {"role": role, "content": privacy.turn(shown)}))
        actions += self._page.transcript(role, shown)  # the caller's own screen
        if role == "user":
            actions += self._caller_acted(now)
        return actions

    def _agent_started_speaking(self, message: dict[str, Any]) -> list[Action]:
        self.playback.turn_started()
        latencies = {key: _number(message.get(key)) for key in ("total_latency", "tts_latency", "ttt_latency")}
        total = latencies["total_latency"]
        if total is not None:
            self.stats.agent_latencies.append(total)
        return [Record(RecordEvent.AGENT_STARTED_SPEAKING, latencies), *self._page.agent_latency(latencies)]

    def _agent_audio_done(self, now: float) -> list[Action]:
        actions = self._end_turn(now)
        # Refused earlier (the agent was busy); now it has finished speaking. Only once.
        return actions + self.injections.agent_turn_done(self._still_wanted) + self._say_recording_notice()

    def _end_turn(self, now: float) -> list[Action]:
        """The agent's turn is over (AgentAudioDone, or its session lost mid-turn): mark its end."""
        last_words = self.departure.awaiting_last_words
        mark, queued_seconds = self.playback.end_turn(last_words=last_words)
        actions: list[Action] = self.departure.last_turn_marked(now, queued_seconds) if last_words else []
        actions.append(mark)
        self.recording.turn_ended(mark.name)
        return actions

    # ------------------------------------------------------------------------------ functions

    def _function_call_request(self, message: dict[str, Any], now: float) -> list[Action]:
        calls, malformed = agent.client_side_calls(message)
        self.history.conversation_moved_on()
        actions: list[Action] = []
        if malformed:
            actions += self.stats.reject(
                "deepgram", "bad-function-call", "a FunctionCallRequest entry without a usable id and name"
            )
        for call in calls:
            if call.name == "end_call":
                actions += self._end_call_requested(call, now)
            elif call.name == "transfer_call":
                actions += self._transfer_requested(call, now)
            elif call.id in self.functions:
                actions += self.stats.reject(
                    "deepgram", "duplicate-function-id", "a second FunctionCallRequest for a running id"
                )
            else:
                self.functions.start(call, self.link.generation)
                actions += [Log(logging.INFO, "agent calls %s", (clean(call.name, 60),)), StartFunction(call)]
        return actions

    def _function_call_cancelled(self, message: dict[str, Any]) -> list[Action]:
        actions: list[Action] = []
        for call_id in agent.cancelled_ids(message):
            pending = self.departure.pending
            if pending is not None and pending.call_id == call_id:
                name = "transfer_call" if pending.kind is DepartureKind.TRANSFER else "end_call"
                actions += self._take_back_departure(f"the agent cancelled {name}", call_id=call_id)
            running = self.functions.withdraw(call_id)
            if running is None:
                continue
            name = clean(running.call.name, 60)
            actions.append(Record(RecordEvent.FUNCTION_CANCELLED, {"id": call_id, "name": running.call.name}))
            if running.is_async:
                actions += [Log(logging.INFO, "agent cancelled %s; cancelling it", (name,)), CancelFunction(call_id)]
            else:
                # Stopping a thread halfway could leave an order half placed: it finishes, unanswered.
                actions.append(Log(logging.INFO, "agent cancelled %s; it finishes, unanswered", (name,)))
        return actions

    def function_finished(self, call_id: str, outcome: FunctionOutcome, now: float) -> Sequence[Action]:
        """A function started by ``StartFunction`` returned, failed, timed out or was cancelled."""
        running = self.functions.finish(call_id)
        if running is None:
            return NO_ACTIONS
        call = running.call
        self.stats.function_answered(outcome.error)
        actions: list[Action] = [
            Record(
                RecordEvent.FUNCTION_CALL,
                {
                    "name": call.name,
                    **self.privacy.function_fields(call.name, call.arguments, outcome.result, outcome.error),
                    "outcome": outcome.outcome,
                    "duration_seconds": round(outcome.duration_seconds, 4),
                    "withdrawn": running.withdrawn,
                },
            )
        ]
        if self._phase.ended:
            return actions
        self.history.ours(f"f:{call.id}", agent.history_function_call(call, outcome.content))
        if not running.withdrawn:
            if running.generation == self.link.generation and self._phase.conversing:
                actions.append(SendToAgent(agent.function_call_response(call, outcome.content)))
            else:
                actions.append(
                    Log(
                        logging.INFO,
                        "%s finished after the agent session was replaced; its result is in the history",
                        (clean(call.name, 60),),
                    )
                )
            actions.append(Log(logging.DEBUG, "%s answered in %.3f s", (clean(call.name, 60), outcome.duration_seconds)))
            actions += self._page.function_call(call, outcome)
        if self._phase.phase is Phase.RESUMING and not self.functions.any_running and self.link.waiting_to_resume:
            actions += [CancelTimer(Timer.FUNCTIONS_WAIT), *self.link.next_attempt(now)]
        return self._settle(actions, now)

    def function_finished_late(self, call: agent.FunctionCall, outcome: FunctionOutcome) -> Sequence[Action]:
        """A ``def`` abandoned at its timeout, or by the hang-up, has returned after all."""
        return (
            Record(
                RecordEvent.FUNCTION_FINISHED_LATE,
                {
                    "id": call.id,
                    "name": call.name,
                    **{
                        field: value
                        for field, value in self.privacy.function_fields(call.name, call.arguments, outcome.result, outcome.error).items()
                        if field != "arguments"
                    },
                    "duration_seconds": round(outcome.duration_seconds, 4),
                },
            ),
        )

    # ----------------------------------------------------------------------------- departures

    def _transfer_requested(self, call: agent.FunctionCall, now: float) -> list[Action]:
        if not self.settings.transfer_enabled or self.departure.voicemail_mode or self._page is not NO_FEED:
            return self._builtin_refused(call, "Transferring calls is not set up on this line.")
        if not self.control.may_act:
            return self.control.refused("transferring the call") + self._builtin_refused(
                call, "Transferring is not available on this call."
            )
        # Only a reason (and a summary for the pharmacist) is taken from the agent; never a number to dial.
        reason = _argument_text(call.arguments, "reason") or "the agent transferred the call"
        if self._transfer_mode() == "warm":
            return self._warm_transfer_requested(call, reason, now)
        return self._departure_requested(
            DepartureKind.TRANSFER,
            call,
            now,
            {"result": "The caller will be transferred to a pharmacist once your last words have played."},
            "agent asked to transfer the call; transferring after its last words have played",
            reason=reason,
        )

    def _transfer_mode(self) -> str:
        chosen = self._agent.transfer_mode if self._agent is not None else None
        return chosen or self.settings.transfer_mode

    def _warm_transfer_requested(self, call: agent.FunctionCall, reason: str, now: float) -> list[Action]:
        """The caller stays with the agent while the pharmacist is called and briefed (consult.py)."""
        if self.consult.under_way or self.departure.pending is not None:
            return self._builtin_refused(call, "A pharmacist is already being called for this caller; wait for the answer.")
        if not self.consult.attempts_left:
            return self._builtin_refused(call, "The pharmacist has been called too often on this call; offer to take a message.")
        assert self.stream is not None and self._agent is not None
        # Uncut: consult.briefing_for cleans it and cuts it between words.
        summary = _argument_text(call.arguments, "summary", None) or reason
        answer = {
            "result": "The pharmacist is being called and told why. Tell the caller you are fetching the pharmacist "
            "and ask them to stay on the line; you will be told whether the pharmacist takes the call."
        }
        self.stats.function_answered(None)
        self._warm_reason = reason
        return [
            Log(logging.INFO, "agent asked for a warm transfer; calling the pharmacist while the caller waits"),
            SendToAgent(agent.function_call_response(call, json.dumps(answer))),
            Record(
                RecordEvent.FUNCTION_CALL,
                {"name": call.name, **self.privacy.function_fields(call.name, call.arguments, answer, None),
                 "outcome": "ok", "duration_seconds": 0.0, "withdrawn": False},
            ),
            Record(RecordEvent.TRANSFER_DIALLING, {"mode": "warm", "reason": self.privacy.reason(reason)}),
            *self.consult.dial(
                self.stream.call_sid, self._agent.name, briefing_for(self.lines.pharmacist_briefing, summary, reason),
                self.lines.pharmacist_no_answer, now, self.lines.twilio_say,
            ),
        ]

    def consult_dialled(self, pharmacist_sid: str | None, error: str | None, now: float) -> Sequence[Action]:
        """The REST create of the pharmacist's call answered: its SID, or why it failed."""
        if self.consult.stage is ConsultStage.ABANDONED:
            return self.consult.placed_after_the_caller_left(pharmacist_sid)
        if self.consult.stage is not ConsultStage.DIALLING or self._phase.ended:
            return NO_ACTIONS
        if error is not None or pharmacist_sid is None:
            return self._settle(self._consult_declined("failed", error or "no Call SID"), now)
        assert self.stream is not None
        return [
            Log(logging.INFO, "the pharmacist's phone is ringing (%s)", (pharmacist_sid,)),
            *self.consult.dialled(pharmacist_sid, self.stream.call_sid),
        ]

    def consult_answered(self, note: str | None, now: float) -> Sequence[Action]:
        """The note the pharmacist's answer left: ``accepted`` or ``declined:<why>``."""
        answer = parse_note(note)
        if answer is None or self.consult.stage is not ConsultStage.RINGING or self._phase.ended:
            return NO_ACTIONS
        if not answer.accepted:
            return self._settle(self._consult_declined(answer.reason or "declined", None), now)
        assert self.stream is not None
        assert self.consult.dialled_at is not None  # set by the dial this answer is for
        waited = now - self.consult.dialled_at
        actions: list[Action] = [
            *self.consult.accepted(),
            Log(logging.INFO, "the pharmacist accepted after %.1f s; the caller is moved once the agent's line is heard", (waited,)),
            Record(RecordEvent.TRANSFER_ACCEPTED, {"seconds_waited": round(waited, 3)}),
        ]
        if self._phase.conversing:
            actions += self.injections.send(Injection.TRANSFER_CONNECTING, agent.inject_agent_message(self.lines.transfer_connecting))
        actions += self.departure.request(
            DepartureKind.TRANSFER, now, words_to_come=self._phase.conversing, reason=self._warm_reason,
            conference=conference_name(self.stream.call_sid),
        )
        return self._settle(actions, now)

    def _consult_declined(self, reason: str, error: str | None) -> list[Action]:
        actions: list[Action] = [
            Log(logging.INFO, "the pharmacist did not take the call (%s)%s; the agent tells the caller",
                (reason, f": {error}" if error else "")),
            Record(RecordEvent.TRANSFER_DECLINED, {"mode": "warm", "reason": reason}),
            *self.consult.declined(),
        ]
        if self._phase.conversing:
            actions += self.injections.send(Injection.TRANSFER_DECLINED, agent.inject_agent_message(self.lines.transfer_declined))
        return actions

    def _end_call_requested(self, call: agent.FunctionCall, now: float) -> list[Action]:
        return self._departure_requested(
            DepartureKind.END_CALL,
            call,
            now,
            {"result": "The call will end after your goodbye has played."},
            "agent asked to end the call; hanging up after its goodbye has played",
        )

    def _builtin_refused(self, call: agent.FunctionCall, error: str) -> list[Action]:
        self.stats.function_answered(error)
        return [
            SendToAgent(agent.function_call_response(call, json.dumps({"error": error}))),
            Record(
                RecordEvent.FUNCTION_CALL,
                {"name": call.name, **self.privacy.function_fields(call.name, call.arguments, None, error),
                 "outcome": "error", "duration_seconds": 0.0, "withdrawn": False},
            ),
        ]

    def _departure_requested(
        self,
        kind: DepartureKind,
        call: agent.FunctionCall,
        now: float,
        answer: dict[str, str],
        log_line: str,
        *,
        reason: str | None = None,
    ) -> list[Action]:
        """end_call or transfer_call: answered at once, carried out once the last words are heard."""
        self.stats.function_answered(None)
        actions: list[Action] = [
            Log(logging.INFO, log_line),
            SendToAgent(agent.function_call_response(call, json.dumps(answer))),
            Record(
                RecordEvent.FUNCTION_CALL,
                {"name": call.name, **self.privacy.function_fields(call.name, call.arguments, answer, None),
                 "outcome": "ok", "duration_seconds": 0.0, "withdrawn": False},
            ),
        ]
        if self.departure.voicemail_mode:
            return actions  # the voicemail message ends the call once heard, whatever the agent asks
        return actions + self.departure.request(
            kind, now, words_to_come=self.playback.speaking, call_id=call.id, reason=reason
        )

    def _last_words_heard(self, *, confirmed: bool = True) -> list[Action]:
        """The last words before leaving have played (or the wait for them is over)."""
        departure = self.departure.carry_out()
        if departure.kind is DepartureKind.TRANSFER:
            assert self.stream is not None and self.settings.transfer_number is not None
            if departure.conference is not None:
                twiml = twilio.conference_twiml(departure.conference)
            else:
                twiml = twilio.dial_twiml(self.settings.transfer_number)
            return [
                *self.departure.cancel_timers(),
                Log(logging.INFO, "the agent's last words have played; transferring the call"),
                TransferCall(RedirectCall(self.stream.call_sid, twiml)),
            ]
        if departure.kind is DepartureKind.VOICEMAIL:
            heard = Log(logging.INFO, "the voicemail message has played; hanging up")
        else:
            heard = Log(logging.INFO, "the agent's goodbye has played; hanging up")
        return [heard, *self._end_call(departure.end(confirmed=confirmed))]

    def _take_back_departure(self, why: str, *, call_id: str | None = None) -> list[Action]:
        """The conversation goes on after end_call or transfer_call: the caller spoke, or the agent took it back."""
        if self._phase.ended or self.departure.take_back(call_id) is None:
            return []
        return [
            *self.departure.cancel_timers(),
            Log(logging.INFO, "not hanging up: %s", (why,)),
            Record(RecordEvent.HANGUP_CANCELLED, {"reason": why}),
        ]

    def transfer_finished(self, error: str | None, now: float) -> Sequence[Action]:
        """The REST update for ``TransferCall`` is done; ``error`` says why it failed, if it did."""
        transfer = self.departure.transfer_finished()
        if transfer is None:
            return NO_ACTIONS
        reason = self.privacy.reason(transfer.reason)
        mode = "warm" if transfer.conference is not None else "cold"
        # A pharmacist waiting in the conference for a caller who can't be moved is hung up on.
        leg = self.consult.pharmacist_sid if error is not None else None
        self.consult.finished()
        ended_leg: list[Action] = [EndCallLeg(leg)] if leg is not None else []
        if self._phase.ended:  # the stream ended first, as Twilio ends it on a transfer
            if error is None:
                return [Record(RecordEvent.TRANSFERRED, {"reason": reason, "mode": mode})]
            self._end = CallEnd(EndReason.CALLER_HUNG_UP, " during a failed transfer")
            return [Record(RecordEvent.TRANSFER_FAILED, {"reason": reason, "mode": mode, "error": error}), *ended_leg]
        if error is None:
            return [Record(RecordEvent.TRANSFERRED, {"reason": reason, "mode": mode}), *self._end_call(CallEnd(EndReason.TRANSFERRED))]
        actions: list[Action] = [
            Log(logging.WARNING, "the transfer failed: %s; the agent tells the caller", (error,)),
            Record(RecordEvent.TRANSFER_FAILED, {"reason": reason, "mode": mode, "error": error}),
            *ended_leg,
        ]
        if self._phase.conversing:
            actions += self.injections.send(Injection.TRANSFER_FAILED, agent.inject_agent_message(self.lines.transfer_failed))
        return self._settle(actions, now)

    def recording_started(self, recording_sid: str | None, error: str | None) -> Sequence[Action]:
        """The REST request for ``StartRecording`` answered: the recording's SID, or why not."""
        return self.recording.started(recording_sid, error)

    def recording_updated(self, pause: bool, error: str | None) -> Sequence[Action]:
        """The REST request for ``UpdateRecording`` answered."""
        return self.recording.updated(pause, error)

    def fallback_finished(self, error: str | None) -> Sequence[Action]:
        """The shell moved (or failed to move) the caller to the fallback after ``HangUp.fallback``."""
        target = self._fallback_target or "fallback"
        if error is not None:
            return [
                Log(logging.ERROR, "could not send the caller to the %s: %s", (target, error)),
                Record(RecordEvent.FALLBACK, {"to": target, "ok": False, "error": error}),
            ]
        return [
            Log(logging.INFO, "sent the caller to the %s", (target,)),
            Record(RecordEvent.FALLBACK, {"to": target, "ok": True, "error": None}),
        ]

    # ------------------------------------------------------------ keypad, silence, injections

    def _key_pressed(self, digit: str, now: float) -> list[Action]:
        """A keypad digit. Digits go to the agent together, on # or after a pause."""
        if self.departure.voicemail_mode:
            return [Log(logging.DEBUG, "keypad digit during the voicemail message: ignored")]
        actions, entries = self.keypad.pressed(digit, now)
        for entry in entries:
            actions += self._keypad_entry(entry)
        # A recording skips what the caller types: the tones of a PIN are not kept.
        actions += self.recording.keypad_entry(self.keypad.entering)
        return actions + self._caller_acted(now)

    def _keypad_entry(self, entry: str) -> list[Action]:
        self.stats.keypad_entries += 1
        count = keys_in(entry)
        # The digits may be a PIN: the log and the record say how many, never which.
        actions: list[Action] = [
            Log(logging.INFO, "caller entered %d keypad keys; passing them to the agent", (count,)),
            Record(RecordEvent.DTMF, {"keys": count}),
        ]
        message = agent.inject_user_message(entry)
        if not self._phase.conversing:
            self.injections.wait_for_agent(Injection.KEYPAD, message)
            return actions
        return actions + self.injections.send(Injection.KEYPAD, message)

    def _still_wanted(self, kind: Injection) -> bool:
        """A refused injection still makes sense: the caller hasn't spoken since the re-prompt."""
        if kind is Injection.IDLE_REPROMPT:
            return self.silence.stage is SilenceStage.REPROMPTED and self.departure.pending is None
        if kind is Injection.IDLE_GOODBYE:
            return self.departure.is_pending(DepartureKind.IDLE_GOODBYE)
        return True

    def _caller_idle(self, now: float) -> list[Action]:
        if not self._caller_may_be_idle():
            self.silence.timer_stopped()  # something happened meanwhile; the next settle restarts it
            return []
        ran_out, actions = self.silence.ran_out(now)
        if ran_out is SilenceStage.WAITING_TO_REPROMPT:
            self.stats.idle_reprompts += 1
            seconds = self.silence.reprompt_seconds
            return [
                Log(logging.INFO, "the caller has said nothing for %.0f s; the agent re-prompts", (seconds,)),
                Record(RecordEvent.IDLE_REPROMPT, {"seconds": seconds}),
                *self.injections.send(Injection.IDLE_REPROMPT, agent.inject_agent_message(self.lines.idle_reprompt)),
                # Re-armed once the re-prompt has played; this one holds if it never plays.
                *actions,
            ]
        # Silent through the re-prompt too: the agent says goodbye and the call ends as with end_call.
        return [
            Log(logging.INFO, "the caller is still silent; the agent says goodbye and the call ends"),
            Record(RecordEvent.IDLE_HANGUP, {"seconds": self.silence.hangup_seconds}),
            *self.injections.send(Injection.IDLE_GOODBYE, agent.inject_agent_message(self.lines.idle_goodbye)),
            *self.departure.request(DepartureKind.IDLE_GOODBYE, now, words_to_come=True),
        ]

    # --------------------------------------------------------------------------------- timers

    def timer_fired(self, timer: Timer, now: float) -> Sequence[Action]:
        if self._phase.ended:
            return NO_ACTIONS
        return self._settle(self._timer(timer, now), now)

    def _timer(self, timer: Timer, now: float) -> Sequence[Action]:
        if timer is Timer.KEEPALIVE:
            if not self._phase.conversing:
                return NO_ACTIONS
            return self.link.keepalive_due(now, self.inbound.last_sent_at)
        if timer is Timer.START:
            seconds = self.settings.limits.start_timeout_seconds
            return [
                Log(logging.WARNING, "Twilio sent no start event within %.0f s", (seconds,)),
                *self._end_call(CallEnd(EndReason.NO_START)),
            ]
        if timer is Timer.AGENT_OPEN:
            if not self.link.opening:
                return NO_ACTIONS
            return self._attempt_failed(self.link.timeout_text(), now)
        if timer is Timer.RECONNECT:
            if self._caller_left is not None:
                return self._end_call(self._caller_left)
            return self.link.open(now, resuming=True)
        if timer is Timer.FUNCTIONS_WAIT:
            if self._phase.phase is Phase.RESUMING and self.link.waiting_to_resume:
                return self.link.next_attempt(now)
            return NO_ACTIONS
        if timer is Timer.HANGUP_FALLBACK:
            if not self.departure.awaiting_last_words:
                return NO_ACTIONS
            return self._last_words_heard(confirmed=False)
        if timer is Timer.HANGUP_GRACE:
            if not self.departure.awaiting_last_words or self.playback.speaking:
                # The agent is speaking again: the mark after its AgentAudioDone decides.
                return NO_ACTIONS
            self.departure.grace_over()
            return self._last_words_heard() if self.playback.all_heard else NO_ACTIONS
        if timer is Timer.TAIL_FLUSH:
            return self._end_call(self._caller_left or CallEnd(EndReason.CALLER_HUNG_UP))
        if timer is Timer.DTMF:
            actions: list[Action] = []
            for entry in self.keypad.complete():
                actions += self._keypad_entry(entry)
            return actions + self.recording.keypad_entry(self.keypad.entering)
        if timer is Timer.IDLE:
            return self._caller_idle(now)
        if timer is Timer.CONSULT:
            if self.consult.stage not in (ConsultStage.DIALLING, ConsultStage.RINGING):
                return NO_ACTIONS
            return self._consult_declined("no-answer", f"no answer within {self.settings.transfer_timeout_seconds:g} s")
        raise AssertionError(f"unknown timer {timer}")

    # --------------------------------------------------------------------------------- ending

    def shutdown(self, now: float) -> Sequence[Action]:
        """The server is stopping and the drain time is over."""
        return self._end_call(CallEnd(EndReason.SHUTDOWN))

    def failed(self, now: float) -> Sequence[Action]:
        """The session itself hit a bug; end the call rather than leave it hanging."""
        return self._end_call(CallEnd(EndReason.INTERNAL_ERROR))

    def _end_call(self, end: CallEnd, *, fallback: bool = False) -> list[Action]:
        if self._phase.ended:
            return []
        self._phase.move(PhaseEvent.ENDED)
        # The first reason given is the one recorded: a caller who hung up while the agent was
        # still opening ended the call, whatever the agent's attempt did afterwards.
        self._end = self._caller_left or end
        actions: list[Action] = []
        if self._caller_left is None:
            actions += self._page.call_ended(self._end.ended_by)
        # The caller is still there but the agent can't be: hand them to the fallback line. Not
        # while a transfer is under way (the last REST update would win).
        redirect = None
        if fallback and self.stream is not None and self._caller_left is None and not self.departure.transferring:
            if self.control.may_act:
                redirect = self._fallback_redirect(self.stream.call_sid)
            else:
                actions += self.control.refused("sending the caller to the fallback line")
        if self.stream is not None:
            # However the call ended (the caller hung up, a shutdown, the agent gone), nobody will
            # be put through to a pharmacist being dialled or briefed: their call ends too.
            actions += self.consult.caller_left(self.stream.call_sid)
        actions.append(HangUp(self._end, redirect))
        return actions

    def _fallback_redirect(self, call_sid: str) -> RedirectCall:
        """An apology, then the fallback number or a hang-up, so no caller is left in silence."""
        number = self.settings.fallback_number
        if number:
            self._fallback_target = "fallback number"
            return RedirectCall(call_sid, twilio.dial_twiml(number, say=self.lines.fallback_transfer, voice=self.lines.twilio_say))
        self._fallback_target = "apology and hang-up"
        return RedirectCall(call_sid, twilio.say_and_hang_up_twiml(self.lines.fallback_goodbye, voice=self.lines.twilio_say))

    def summary(self) -> dict[str, Any]:
        """The summary line's fields that this call knows."""
        stream = self.stream
        inbound = self.inbound
        return {
            "call_sid": stream.call_sid if stream else None,
            "stream_sid": stream.stream_sid if stream else None,
            "custom_parameters": self.privacy.parameters(stream.custom_parameters) if stream else {},
            "ended_by": self.end_reason,
            "end_reason": self._end.reason.value if self._end is not None else None,
            "audio_bytes_from_caller": inbound.bytes_from_caller,
            "audio_bytes_to_agent": inbound.bytes_to_agent,
            "audio_bytes_to_caller": self.playback.bytes_to_caller,
            "audio_bytes_dropped_in_reconnect": inbound.bytes_dropped,
            "recording_sid": self.recording.recording_sid,
            **self.stats.summary(),
        }


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _argument_text(arguments: str, name: str, limit: int | None = 200) -> str | None:
    """A text argument of a function call, if the agent gave one: cut to ``limit`` (None: whole)."""
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    text = value.get(name) if isinstance(value, dict) else None
    return " ".join(text.split())[:limit] if isinstance(text, str) and text.strip() else None
