"""A warm transfer's pharmacist side: the call that rings them, their answer, and the notes it leaves.

In a warm transfer (``TRANSFER_MODE=warm``, docs/call-control.md) the caller stays with the agent
while the bridge rings ``TRANSFER_NUMBER``. The pharmacist hears a briefing (the model's summary
of the call) and presses 1 to take the call or 2 to decline; on 1 they wait in a conference named
for the caller's call, into which the process holding the caller's stream then moves the caller.
This module owns everything of that but the holder's side (bridge/session.py and bridge/call/):

- ``dial_pharmacist_request``: the ``TwilioRestClient.create_call`` arguments of the pharmacist's
  call: its inline TwiML (``twilio.briefing_twiml``), ring timeout, status callback and
  answering-machine detection. ``PharmacistLines`` are the sentences the pharmacist hears.
- ``WarmTransferCallbacks``: the two routes Twilio calls back, which may reach any process or pod
  (no sticky sessions): ``TRANSFER_KEY_PATH``, the Gather's action with the key pressed, and
  ``TRANSFER_STATUS_PATH``, the call's status callback and its answering-machine verdict.
- The notes they leave in the shared state (bridge/storage/shared.py) for the holder, under
  ``note_key(caller)``: ``accepted``, or ``declined:<reason>``; ``parse_note`` reads one. The
  holder leaves a note under ``caller_left_key(caller)`` when the caller hangs up first.

Nothing about a transfer is kept in memory: what the callbacks need (the caller's CallSid and the
agent's name) travels in their URL's query string, which Twilio signs with the request.
docs/protocols.md section 7 has the REST, Gather and conference facts this follows.
"""

from __future__ import annotations

import asyncio
import logging
import string
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlencode

from . import twilio
from .agents import AGENT_NAME, AGENT_PARAMETER
from .call_control import MACHINE_VERDICTS, MAX_PENDING_CALLBACKS, check_signature, form_parameters
from .settings import Settings
from .logsafe import clean
from .storage.postgres import DatabaseUnavailable
from .storage.shared import SharedState
from .transport import DeferredReply, HttpReply, HttpRequest
from .twilio_rest import TwilioApiError, TwilioRestClient

logger = logging.getLogger("bridge.warm_transfer")
T = TypeVar("T")

TRANSFER_KEY_PATH: Final = "/twilio/transfer/key"
TRANSFER_STATUS_PATH: Final = "/twilio/transfer/status"
# The query parameter naming the caller's call in both callback URLs (the agent's is AGENT_PARAMETER).
CALLER_PARAMETER: Final = "caller"

ACCEPTED: Final = "accepted"
DECLINED_PREFIX: Final = "declined:"
# Why a transfer was declined: a key other than 1, Twilio's call statuses, a machine, no key at all.
DECLINE_REASONS: Final = frozenset({"declined", "busy", "no-answer", "failed", "canceled", "machine", "not-answered"})
UNREADABLE: Final = "unreadable"  # what parse_note makes of a note that is none of the above
# What the holder posts under caller_left_key (any note there means the caller has gone).
CALLER_LEFT_NOTE: Final = "caller-left"
# The pharmacist's call statuses that end it unanswered (docs/protocols.md section 7).
UNANSWERED_STATUSES: Final = frozenset({"busy", "no-answer", "failed", "canceled"})
# One callback's reads and writes of the shared state, together: well inside the handshake
# deadline (10 s) that bounds the pharmacist's request, and Twilio's 15 s for a webhook's answer.
STORE_SECONDS: Final = 4.0
# How long an "accepted" whose write failed or timed out is waited for before it is taken back.
RETRACT_SECONDS: Final = 30.0
ANSWER_EVENTS: Final = ("answered", "completed")
MAX_LINE_CHARS: Final = 500


# ------------------------------------------------------------------------------ shared keys


def conference_name(caller_call_sid: str) -> str:
    """The conference a transfer of this caller meets in."""
    return f"transfer-{_call_sid(caller_call_sid)}"


def note_key(caller_call_sid: str) -> str:
    """Where the callbacks post the pharmacist's answer for the holder of this caller's stream."""
    return f"warm-transfer:{_call_sid(caller_call_sid)}"


def caller_left_key(caller_call_sid: str) -> str:
    """Where the holder posts ``CALLER_LEFT_NOTE`` when this caller hung up during the transfer."""
    return f"warm-transfer-caller-left:{_call_sid(caller_call_sid)}"


def _call_sid(value: str) -> str:
    if not isinstance(value, str) or not twilio.CALL_SID.fullmatch(value):
        raise ValueError(f"not a Twilio Call SID (CA + 32 hex digits): {clean(value, 40)!r}")
    return value


@dataclass(frozen=True, slots=True)
class TransferAnswer:
    """The pharmacist's answer, as a note says it: accepted, or declined and why."""

    accepted: bool
    reason: str | None = None  # one of DECLINE_REASONS or UNREADABLE when declined; None when accepted


def parse_note(text: str) -> TransferAnswer:
    """The answer a note under ``note_key`` holds; anything unexpected is ``declined:unreadable``."""
    note = text.strip() if isinstance(text, str) else ""
    if note == ACCEPTED:
        return TransferAnswer(True)
    reason = note.removeprefix(DECLINED_PREFIX)
    if note.startswith(DECLINED_PREFIX) and reason in DECLINE_REASONS:
        return TransferAnswer(False, reason)
    return TransferAnswer(False, UNREADABLE)


# ------------------------------------------------------------------------- what the pharmacist hears


@dataclass(frozen=True, slots=True)
class PharmacistLines:
    """What the pharmacist hears; ``briefing`` holds ``{summary}``, where the model's summary goes.

    Raises ``ValueError`` (one sentence) for an empty or overlong line, or a briefing with any
    other ``{field}`` (a literal brace is written ``{{`` or ``}}``).
    """

    briefing: str = (
        "Hello, this is the pharmacy's phone assistant with a caller for a pharmacist: {summary}. "
        "Press 1 to take the call, or 2 if you can't."
    )
    no_answer: str = "No key was pressed, so the caller stays with the assistant. Goodbye."
    connecting: str = "Thank you. Connecting you to the caller now."
    declined: str = "Thank you. The caller stays with the assistant. Goodbye."
    caller_left: str = "Sorry, the caller has hung up in the meantime. Goodbye."

    def __post_init__(self) -> None:
        for line in fields(self):
            text = getattr(self, line.name)
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_LINE_CHARS:
                raise ValueError(f"the pharmacist's {line.name} line must be text of 1 to {MAX_LINE_CHARS} characters")
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(self.briefing) if name is not None}
        except ValueError:
            names = set()
        if names != {"summary"}:
            raise ValueError("the pharmacist's briefing must hold {summary} and no other {field} (write a brace as {{ or }})")

    def briefing_for(self, summary: str) -> str:
        """The briefing with the model's ``summary`` in it, cleaned (``twilio.summary_for_briefing``)."""
        return self.briefing.format(summary=twilio.summary_for_briefing(summary))


DEFAULT_LINES: Final = PharmacistLines()


def default_lines(agent_name: str) -> PharmacistLines:
    """The English lines, for every agent: the ``lines_for`` of a bridge whose agents name none."""
    return DEFAULT_LINES


# ------------------------------------------------------------------------- the pharmacist's call


def key_url(settings: Settings, caller_call_sid: str, agent_name: str) -> str:
    """The public URL the pharmacist's key press is sent to: the caller and agent in its query."""
    if not isinstance(agent_name, str) or not AGENT_NAME.fullmatch(agent_name):
        raise ValueError(f"not an agent name: {clean(agent_name, 70)!r}")
    query = urlencode([(AGENT_PARAMETER, agent_name), (CALLER_PARAMETER, _call_sid(caller_call_sid))])
    return f"{settings.public_base_url}{TRANSFER_KEY_PATH}?{query}"


def status_url(settings: Settings, caller_call_sid: str) -> str:
    """The public URL of the pharmacist's call's status callback and answering-machine verdict."""
    query = urlencode([(CALLER_PARAMETER, _call_sid(caller_call_sid))])
    return f"{settings.public_base_url}{TRANSFER_STATUS_PATH}?{query}"


def dial_pharmacist_request(
    settings: Settings,
    caller_call_sid: str,
    agent_name: str,
    briefing: str,
    *,
    timeout: int,
    no_answer: str,
    gather_seconds: int = 10,
) -> dict[str, Any]:
    """The keyword arguments of ``TwilioRestClient.create_call`` that ring the pharmacist.

    Always ``TRANSFER_NUMBER``, from ``TWILIO_PHONE_NUMBER``, never a number the model gave.
    ``briefing`` is the whole sentence (``PharmacistLines.briefing_for``); ``no_answer`` follows
    it when no key comes; ``timeout`` is TRANSFER_TIMEOUT_SECONDS, the seconds it may ring.
    Raises ``ValueError`` (one sentence, before anything is sent) for missing settings, a bad
    Call SID or agent name, or a briefing too long for Twilio's inline TwiML.
    """
    if not settings.transfer_number or not settings.twilio_phone_number:
        raise ValueError("a warm transfer needs TRANSFER_NUMBER and TWILIO_PHONE_NUMBER")
    callback = status_url(settings, caller_call_sid)
    return {
        "to": settings.transfer_number,
        "from_": settings.twilio_phone_number,
        "twiml": twilio.briefing_twiml(
            briefing, key_url(settings, caller_call_sid, agent_name), gather_seconds=gather_seconds, no_answer=no_answer
        ),
        "timeout": timeout,
        "status_callback": callback,
        "status_callback_event": list(ANSWER_EVENTS),
        "status_callback_method": "POST",
        # As soon as known (not after the greeting): a machine is hung up on, not left a message.
        "machine_detection": "Enable",
        "async_amd": True,
        "async_amd_status_callback": callback,
        "async_amd_status_callback_method": "POST",
    }


# ------------------------------------------------------------------------------ the callbacks


@dataclass(frozen=True, slots=True)
class _Callback:
    """A callback that passed every check: whose transfer it is about, and Twilio's form."""

    caller: str  # the caller's CallSid, from our signed query
    pharmacist: str  # the pharmacist's CallSid, from Twilio's form
    query: dict[str, list[str]]
    form: dict[str, list[str]]

    def value(self, name: str) -> str:
        return (self.form.get(name) or [""])[0]


class WarmTransferCallbacks:
    """``TRANSFER_KEY_PATH`` and ``TRANSFER_STATUS_PATH``, for any transfer, in any process.

    ``lines_for(agent_name)`` gives the lines the pharmacist hears for that agent; it is handed
    only names matching ``AGENT_NAME``. Work on the shared state runs in threads, within
    ``store_seconds`` per callback, as tasks (at most ``MAX_PENDING_CALLBACKS``; more are
    answered 503 and Twilio may retry) that ``close`` waits for at shutdown.
    """

    def __init__(
        self,
        settings: Settings,
        shared: SharedState | None,
        rest: TwilioRestClient | None,
        lines_for: Callable[[str], PharmacistLines],
        *,
        store_seconds: float = STORE_SECONDS,
    ) -> None:
        self.settings = settings
        self.store_seconds = store_seconds
        self.shared = shared
        self.rest = rest
        self.lines_for = lines_for
        self.tasks: set[asyncio.Task[Any]] = set()

    def handle(self, request: HttpRequest) -> HttpReply | DeferredReply:
        """One callback: 403 unless Twilio signed it for our account; 400 for a query we never wrote."""
        if request.path not in (TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH):
            return HttpReply(404, "Not found.\n")
        checked = self._check(request)
        if isinstance(checked, HttpReply):
            return checked
        if len(self.tasks) >= MAX_PENDING_CALLBACKS:
            return HttpReply(503, "Busy; retry.\n")
        if request.path == TRANSFER_KEY_PATH:
            return self._key_pressed(checked)
        return self._status(checked)

    async def close(self) -> None:
        """At shutdown: let the callbacks being answered finish; a retraction still waiting is dropped."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.store_seconds + 1)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)

    # -- checks ---------------------------------------------------------------------------------

    def _check(self, request: HttpRequest) -> _Callback | HttpReply:
        if request.method != "POST":
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "POST"),))
        settings = self.settings
        if not settings.twilio_auth_token:
            return HttpReply(403, "Forbidden: no TWILIO_AUTH_TOKEN to check Twilio's signature with.\n")
        form = form_parameters(request)
        if (refused := check_signature(settings, request, form)) is not None:
            return refused
        account = (form.get("AccountSid") or [""])[0]
        if account != settings.twilio_account_sid:
            logger.warning("refused a POST to %s: signed, but for another Twilio account", request.path)
            return HttpReply(403, "Forbidden: another Twilio account.\n")
        query = parse_qs(request.query, keep_blank_values=True)
        caller = (query.get(CALLER_PARAMETER) or [""])[0]
        pharmacist = (form.get("CallSid") or [""])[0]
        if not twilio.CALL_SID.fullmatch(caller) or not twilio.CALL_SID.fullmatch(pharmacist):
            return HttpReply(400, "A caller and a CallSid are required.\n")
        return _Callback(caller, pharmacist, query, form)

    # -- the key pressed ------------------------------------------------------------------------

    def _key_pressed(self, callback: _Callback) -> HttpReply | DeferredReply:
        agent = (callback.query.get(AGENT_PARAMETER) or [""])[0]
        if not AGENT_NAME.fullmatch(agent):
            return HttpReply(400, "An agent is required.\n")
        lines = self.lines_for(agent)
        # The key itself is never logged or stored: only what it means.
        accepted = callback.value("Digits") == "1"
        return DeferredReply(self._start(self._answer_key(callback, accepted, lines)))

    async def _answer_key(self, callback: _Callback, accepted: bool, lines: PharmacistLines) -> HttpReply:
        caller = callback.caller
        if not accepted:
            await self._post_decline(caller, "declined")  # which logs it
            return _twiml_reply(twilio.say_and_hang_up_twiml(lines.declined))
        shared = self.shared
        if shared is None:
            logger.warning("[%s] warm transfer: the pharmacist took the call, but no shared state is set up to tell the caller's process", caller)
            return _twiml_reply(twilio.say_and_hang_up_twiml(lines.caller_left))
        posting: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self.store_seconds):
                left = await asyncio.to_thread(shared.read, caller_left_key(caller))
                if left is not None:
                    logger.info("[%s] warm transfer: the pharmacist took the call after the caller had hung up", caller)
                    return _twiml_reply(twilio.say_and_hang_up_twiml(lines.caller_left))
                posting = asyncio.ensure_future(asyncio.to_thread(shared.post, note_key(caller), ACCEPTED))
                # Shielded: on a timeout the write goes on in its thread, and is taken back below.
                await asyncio.shield(posting)
        except (OSError, DatabaseUnavailable, TimeoutError) as exc:
            # The caller's process can't learn of it: a conference would keep the pharmacist waiting alone.
            logger.warning(
                "[%s] warm transfer: the pharmacist took the call, but the shared state failed (%s): they were told the caller is gone",
                caller, clean(exc, 200) or "timed out",
            )
            if posting is not None:
                self._start(self._retract(caller, posting))
            return _twiml_reply(twilio.say_and_hang_up_twiml(lines.caller_left))
        logger.info("[%s] warm transfer: the pharmacist took the call; waiting for the caller in the conference", caller)
        return _twiml_reply(twilio.conference_twiml(conference_name(caller), say=lines.connecting))

    async def _retract(self, caller: str, posting: asyncio.Future[None]) -> None:
        """An "accepted" whose write failed or timed out may still land: once done, decline over it.

        The pharmacist has been told the caller is gone, so a holder reading "accepted" would move
        the caller into an empty conference.
        """
        try:
            async with asyncio.timeout(RETRACT_SECONDS):
                await posting
        except (OSError, DatabaseUnavailable):
            pass  # it failed: nothing to take back, but it may have been committed all the same
        except TimeoutError:
            logger.warning("[%s] warm transfer: the shared state has still not answered; not taking the acceptance back", caller)
            return
        await self._post_decline(caller, "failed", unless_accepted=False)

    # -- the call's status and answering-machine verdict ----------------------------------------

    def _status(self, callback: _Callback) -> HttpReply:
        caller = callback.caller
        answered_by = callback.value("AnsweredBy")
        status = callback.value("CallStatus")
        if answered_by:
            if answered_by not in MACHINE_VERDICTS and answered_by != "fax":
                logger.info("[%s] warm transfer: answered by %s", caller, clean(answered_by, 30))
                return HttpReply(204, "")
            self._start(self._machine_answered(callback))
            return HttpReply(204, "")
        if status in UNANSWERED_STATUSES:
            reason = status
        elif status == "completed":
            reason = "not-answered"  # unless the pharmacist took the call, which _post_decline checks
        else:
            return HttpReply(204, "")  # answered: the briefing is playing
        self._start(self._post_decline(caller, reason))
        return HttpReply(204, "")

    async def _machine_answered(self, callback: _Callback) -> None:
        caller = callback.caller
        logger.info("[%s] warm transfer: a machine answered the pharmacist's phone", caller)
        if await self._post_decline(caller, "machine") is False:
            return  # a person pressed 1 before the verdict came: it was wrong
        if self.rest is None:
            return
        try:
            await self.rest.update_call(callback.pharmacist, status="completed")
        except (TwilioApiError, ValueError) as exc:
            logger.warning("[%s] warm transfer: could not hang up on the pharmacist's machine: %s", caller, exc)

    # -- the shared state -----------------------------------------------------------------------

    async def _post_decline(self, caller: str, reason: str, *, unless_accepted: bool = True) -> bool | None:
        """Post ``declined:<reason>``, unless the pharmacist already took the call.

        True if posted, False if the pharmacist had taken the call, None if the shared state failed
        (logged once here).
        """
        shared = self.shared
        if shared is None:
            return None
        key = note_key(caller)
        try:
            async with asyncio.timeout(self.store_seconds):
                if unless_accepted and await asyncio.to_thread(shared.read, key) == ACCEPTED:
                    logger.info("[%s] warm transfer: the pharmacist took the call; %s changes nothing", caller, reason)
                    return False
                await asyncio.to_thread(shared.post, key, DECLINED_PREFIX + reason)
        except (OSError, DatabaseUnavailable, TimeoutError) as exc:
            logger.warning(
                "[%s] warm transfer: could not tell the caller's process that it was declined (%s): %s",
                caller, reason, clean(exc, 200) or "timed out",
            )
            return None
        logger.info("[%s] warm transfer declined: %s", caller, reason)
        return True

    def _start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task


def _twiml_reply(twiml: str) -> HttpReply:
    return HttpReply(200, twilio.XML_DECLARATION + twiml, "text/xml")
