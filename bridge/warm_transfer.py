"""A warm transfer's pharmacist side: the call that rings them, their answer, and the notes it leaves.

In a warm transfer (``TRANSFER_MODE=warm``, docs/call-control.md) the caller stays with the agent
while the bridge rings ``TRANSFER_NUMBER``. The pharmacist hears a briefing (the model's summary
of the call) and presses 1 to take the call or 2 to decline; on 1 they wait in a conference named
for the caller's call, into which the process holding the caller's stream then moves the caller.
This module owns everything of that but the holder's side (bridge/session.py and bridge/call/):

- ``dial_pharmacist_request``: the ``TwilioRestClient.create_call`` arguments of the pharmacist's
  call: its inline TwiML (``twilio.briefing_twiml``), ring timeout, status callback and
  answering-machine detection. What the pharmacist hears is the agent's (its ``pharmacist_*``
  lines, bridge/caller_lines.py).
- ``WarmTransferCallbacks``: the two routes Twilio calls back, which may reach any process or pod
  (no sticky sessions): ``TRANSFER_KEY_PATH``, the Gather's action with the key pressed, and
  ``TRANSFER_STATUS_PATH``, the call's status callback and its answering-machine verdict.
- The notes they leave in the shared state (bridge/storage/shared.py) for the holder, under
  ``note_key(caller, attempt)``: ``accepted``, or ``declined:<reason>``. The first answer
  stands: a later status never overwrites it. The holder leaves a note under
  ``caller_left_key(caller)`` when the caller hangs up first. The notes' vocabulary is the call
  core's (bridge/call/consult.py), which reads them.

Nothing about a transfer is kept in memory: what the callbacks need (the caller's CallSid, the
attempt and the agent's name) travels in their URL's query string, which Twilio signs with the
request.
docs/protocols.md section 7 has the REST, Gather and conference facts this follows.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qs, urlencode

from . import twilio
from .agents import AGENT_NAME, AGENT_PARAMETER
from .call.consult import ACCEPTED, DECLINED_PREFIX, MAX_ATTEMPTS, caller_left_key, conference_name, note_key
from .call_control import MACHINE_VERDICTS, CallbackWork, check_signature, form_parameters
from .caller_lines import CallerLines
from .logsafe import clean
from .settings import Settings
from .storage.postgres import DatabaseUnavailable
from .storage.shared import SharedState
from .transport import DeferredReply, HttpReply, HttpRequest
from .twilio_rest import TwilioApiError, TwilioRestClient

logger = logging.getLogger("bridge.warm_transfer")

TRANSFER_KEY_PATH: Final = "/twilio/transfer/key"
TRANSFER_STATUS_PATH: Final = "/twilio/transfer/status"
# The query parameters naming the caller's call and the attempt in both callback URLs (the
# agent's is AGENT_PARAMETER).
CALLER_PARAMETER: Final = "caller"
ATTEMPT_PARAMETER: Final = "attempt"
# The pharmacist's call statuses that end it unanswered (docs/protocols.md section 7).
UNANSWERED_STATUSES: Final = frozenset({"busy", "no-answer", "failed", "canceled"})
# One callback's reads and writes of the shared state, together: well inside the handshake
# deadline (10 s) that bounds the pharmacist's request, and Twilio's 15 s for a webhook's answer.
STORE_SECONDS: Final = 4.0
# How long an "accepted" whose write failed or timed out is waited for before it is taken back.
RETRACT_SECONDS: Final = 30.0
ANSWER_EVENTS: Final = ("answered", "completed")


# ------------------------------------------------------------------------- the pharmacist's call


def key_url(settings: Settings, caller_call_sid: str, attempt: int, agent_name: str) -> str:
    """The public URL the pharmacist's key press is sent to: the caller, attempt and agent in its query."""
    if not isinstance(agent_name, str) or not AGENT_NAME.fullmatch(agent_name):
        raise ValueError(f"not an agent name: {clean(agent_name, 70)!r}")
    return f"{settings.public_base_url}{TRANSFER_KEY_PATH}?{_transfer_query(caller_call_sid, attempt, agent_name)}"


def status_url(settings: Settings, caller_call_sid: str, attempt: int) -> str:
    """The public URL of the pharmacist's call's status callback and answering-machine verdict."""
    return f"{settings.public_base_url}{TRANSFER_STATUS_PATH}?{_transfer_query(caller_call_sid, attempt)}"


def _transfer_query(caller_call_sid: str, attempt: int, agent_name: str | None = None) -> str:
    note_key(caller_call_sid, attempt)  # raises ValueError for a bad Call SID or attempt
    pairs = [(CALLER_PARAMETER, caller_call_sid), (ATTEMPT_PARAMETER, str(attempt))]
    if agent_name is not None:
        pairs.insert(0, (AGENT_PARAMETER, agent_name))
    return urlencode(pairs)


def dial_pharmacist_request(
    settings: Settings,
    caller_call_sid: str,
    agent_name: str,
    briefing: str,
    *,
    attempt: int,
    timeout: int,
    no_answer: str,
    gather_seconds: int = 10,
    voice: twilio.SayVoice = twilio.DEFAULT_SAY,
) -> dict[str, Any]:
    """The keyword arguments of ``TwilioRestClient.create_call`` that ring the pharmacist.

    Always ``TRANSFER_NUMBER``, from ``TWILIO_PHONE_NUMBER``, never a number the model gave.
    ``briefing`` is the whole sentence (``consult.briefing_for``); ``no_answer`` follows it when
    no key comes; ``timeout`` is how many seconds it may ring.
    Raises ``ValueError`` (one sentence, before anything is sent) for missing settings, a bad
    Call SID or agent name, or a briefing too long for Twilio's inline TwiML.
    """
    if not settings.transfer_number or not settings.twilio_phone_number:
        raise ValueError("a warm transfer needs TRANSFER_NUMBER and TWILIO_PHONE_NUMBER")
    callback = status_url(settings, caller_call_sid, attempt)
    return {
        "to": settings.transfer_number,
        "from_": settings.twilio_phone_number,
        "twiml": twilio.briefing_twiml(
            briefing, key_url(settings, caller_call_sid, attempt, agent_name), gather_seconds=gather_seconds, no_answer=no_answer,
            voice=voice,
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
    attempt: int  # which of the caller's warm transfers, from our signed query
    pharmacist: str  # the pharmacist's CallSid, from Twilio's form
    query: dict[str, list[str]]
    form: dict[str, list[str]]

    def value(self, name: str) -> str:
        return (self.form.get(name) or [""])[0]

    @property
    def note_key(self) -> str:
        return note_key(self.caller, self.attempt)


class WarmTransferCallbacks:
    """``TRANSFER_KEY_PATH`` and ``TRANSFER_STATUS_PATH``, for any transfer, in any process.

    ``lines_for(agent_name)`` gives that agent's lines (the pharmacist hears its ``pharmacist_*``
    ones); it is handed only names matching ``AGENT_NAME``. Work on the shared state runs in
    threads, within ``store_seconds`` per callback, as tasks (``CallbackWork``: a bounded number,
    more are answered 503 and Twilio may retry) that ``close`` waits for at shutdown.
    """

    def __init__(
        self,
        settings: Settings,
        shared: SharedState | None,
        rest: TwilioRestClient | None,
        lines_for: Callable[[str], CallerLines],
        *,
        store_seconds: float = STORE_SECONDS,
    ) -> None:
        self.settings = settings
        self.store_seconds = store_seconds
        self.shared = shared
        self.rest = rest
        self.lines_for = lines_for
        self.work = CallbackWork()

    def handle(self, request: HttpRequest) -> HttpReply | DeferredReply:
        """One callback: 403 unless Twilio signed it for our account; 400 for a query we never wrote."""
        if request.path not in (TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH):
            return HttpReply(404, "Not found.\n")
        checked = self._check(request)
        if isinstance(checked, HttpReply):
            return checked
        if self.work.busy:
            return HttpReply(503, "Busy; retry.\n")
        if request.path == TRANSFER_KEY_PATH:
            return self._key_pressed(checked)
        return self._status(checked)

    async def close(self) -> None:
        """At shutdown: let the callbacks being answered finish; a retraction still waiting is dropped."""
        await self.work.close(self.store_seconds + 1)

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
        attempt = (query.get(ATTEMPT_PARAMETER) or [""])[0]
        pharmacist = (form.get("CallSid") or [""])[0]
        if not twilio.CALL_SID.fullmatch(caller) or not twilio.CALL_SID.fullmatch(pharmacist):
            return HttpReply(400, "A caller and a CallSid are required.\n")
        if not (attempt.isdigit() and 1 <= int(attempt) <= MAX_ATTEMPTS):
            return HttpReply(400, "An attempt is required.\n")
        return _Callback(caller, int(attempt), pharmacist, query, form)

    # -- the key pressed ------------------------------------------------------------------------

    def _key_pressed(self, callback: _Callback) -> HttpReply | DeferredReply:
        agent = (callback.query.get(AGENT_PARAMETER) or [""])[0]
        if not AGENT_NAME.fullmatch(agent):
            return HttpReply(400, "An agent is required.\n")
        lines = self.lines_for(agent)
        # The key itself is never logged or stored: only what it means.
        accepted = callback.value("Digits") == "1"
        return DeferredReply(self.work.start(self._answer_key(callback, accepted, lines)))

    async def _answer_key(self, callback: _Callback, accepted: bool, lines: CallerLines) -> HttpReply:
        caller = callback.caller
        declined = twilio.say_and_hang_up_twiml(lines.pharmacist_declined, voice=lines.twilio_say)
        if not accepted:
            await self._answer(callback, "declined")  # which logs it
            return _twiml_reply(declined)
        caller_left = _twiml_reply(twilio.say_and_hang_up_twiml(lines.pharmacist_caller_left, voice=lines.twilio_say))
        shared = self.shared
        if shared is None:
            logger.warning("[%s] warm transfer: the pharmacist took the call, but no shared state is set up to tell the caller's process", caller)
            return caller_left
        posting: asyncio.Future[None] | None = None
        try:
            async with asyncio.timeout(self.store_seconds):
                left = await asyncio.to_thread(shared.read, caller_left_key(caller))
                if left is not None:
                    logger.info("[%s] warm transfer: the pharmacist took the call after the caller had hung up", caller)
                    return caller_left
                if not await asyncio.to_thread(shared.claim, _answered_key(callback)):
                    # A machine verdict (wrong, then) or a replayed key came first: its answer stands.
                    logger.info("[%s] warm transfer: the pharmacist pressed 1 after the transfer was answered", caller)
                    return _twiml_reply(declined)
                posting = asyncio.ensure_future(asyncio.to_thread(shared.post, callback.note_key, ACCEPTED))
                # Shielded: on a timeout the write goes on in its thread, and is taken back below.
                await asyncio.shield(posting)
        except (OSError, DatabaseUnavailable, TimeoutError) as exc:
            # The caller's process can't learn of it: a conference would keep the pharmacist waiting alone.
            logger.warning(
                "[%s] warm transfer: the pharmacist took the call, but the shared state failed (%s): they were told the caller is gone",
                caller, clean(exc, 200) or "timed out",
            )
            if posting is not None:
                self.work.start(self._retract(callback, posting))
            return caller_left
        logger.info("[%s] warm transfer: the pharmacist took the call; waiting for the caller in the conference", caller)
        return _twiml_reply(twilio.conference_twiml(conference_name(caller), say=lines.pharmacist_connecting, voice=lines.twilio_say))

    async def _retract(self, callback: _Callback, posting: asyncio.Future[None]) -> None:
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
            logger.warning("[%s] warm transfer: the shared state has still not answered; not taking the acceptance back", callback.caller)
            return
        await self._answer(callback, "failed", overwrite=True)

    # -- the call's status and answering-machine verdict ----------------------------------------

    def _status(self, callback: _Callback) -> HttpReply:
        caller = callback.caller
        answered_by = callback.value("AnsweredBy")
        status = callback.value("CallStatus")
        if answered_by:
            if answered_by not in MACHINE_VERDICTS and answered_by != "fax":
                logger.info("[%s] warm transfer: answered by %s", caller, clean(answered_by, 30))
                return HttpReply(204, "")
            self.work.start(self._machine_answered(callback))
            return HttpReply(204, "")
        if status in UNANSWERED_STATUSES:
            reason = status
        elif status == "completed":
            reason = "not-answered"  # unless the pharmacist answered with a key first, which then stands
        else:
            return HttpReply(204, "")  # answered: the briefing is playing
        self.work.start(self._answer(callback, reason))
        return HttpReply(204, "")

    async def _machine_answered(self, callback: _Callback) -> None:
        caller = callback.caller
        logger.info("[%s] warm transfer: a machine answered the pharmacist's phone", caller)
        if await self._answer(callback, "machine") is False:
            return  # a person pressed a key before the verdict came: it was wrong
        if self.rest is None:
            return
        try:
            await self.rest.update_call(callback.pharmacist, status="completed")
        except (TwilioApiError, ValueError) as exc:
            logger.warning("[%s] warm transfer: could not hang up on the pharmacist's machine: %s", caller, exc)

    # -- the shared state -----------------------------------------------------------------------

    async def _answer(self, callback: _Callback, reason: str, *, overwrite: bool = False) -> bool | None:
        """Post ``declined:<reason>`` as this attempt's answer, unless it has one: the first stands.

        Which answer is first is decided by a claim, atomic across processes, so a key and a status
        arriving together at two processes can't both be taken. ``overwrite`` posts all the same
        (an acceptance taken back). True if posted, False if the attempt was answered already,
        None if the shared state failed (logged once here).
        """
        caller = callback.caller
        shared = self.shared
        if shared is None:
            return None
        try:
            async with asyncio.timeout(self.store_seconds):
                if not overwrite and not await asyncio.to_thread(shared.claim, _answered_key(callback)):
                    logger.info("[%s] warm transfer: already answered; %s changes nothing", caller, reason)
                    return False
                await asyncio.to_thread(shared.post, callback.note_key, DECLINED_PREFIX + reason)
        except (OSError, DatabaseUnavailable, TimeoutError) as exc:
            logger.warning(
                "[%s] warm transfer: could not tell the caller's process that it was declined (%s): %s",
                caller, reason, clean(exc, 200) or "timed out",
            )
            return None
        logger.info("[%s] warm transfer declined: %s", caller, reason)
        return True


def _answered_key(callback: _Callback) -> str:
    """The claim that makes one answer (a key, a status, a verdict) the attempt's first."""
    return f"answered:{callback.note_key}"


def _twiml_reply(twiml: str) -> HttpReply:
    return HttpReply(200, twilio.XML_DECLARATION + twiml, "text/xml")
