"""Call control through Twilio's REST API: outbound calls, answering machines, and the TwiML used.

What lives here is what any bridge process can do for any call, with no call state of its own:

- ``place_call`` dials out (``python main.py call``). A call's SID exists only once the create
  has returned, so the call fetches its TwiML from this bridge's ``/twiml`` when it is answered
  (``Url``, POST, the call's ``<Parameter>``s in the query): Twilio signs that request with the
  CallSid, so the TwiML can carry the MAC that binds the stream to the call (bridge/binding.py).
  Twilio's asynchronous answering-machine detection is on, so a person hears the agent at once
  instead of seconds of silence.
- ``AnsweringMachineCallback`` takes Twilio's verdict (``POST /twilio/amd``), which may reach a
  different process or pod than the one holding the call. So it keeps nothing in memory: for a
  machine, it moves the live call through the REST API into a fresh stream with
  ``bridge_mode=voicemail``, which whichever process takes it plays as the voicemail message.
  The call's own parameters travel in the callback's query string (Twilio signs it too).

What every Twilio callback needs lives here too, for this one and bridge/recordings.py's:
``check_signature`` (signed for the public URL, or refused), ``claim_once`` (act on a callback
once in the whole deployment, though Twilio's signatures can be replayed) and ``CallbackWork``
(the work done after the callback has been answered, bounded and awaited at shutdown).

docs/protocols.md section 7 has the REST API facts; section 4 the signatures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlencode

from . import twilio
from .twilio import MAX_TWIML_CHARS, MODE_PARAMETER, VOICEMAIL_MODE
from .binding import BINDING_PARAMETER, binding_mac
from .settings import Settings
from .logsafe import clean
from .storage.shared import SharedState
from .storage.postgres import DatabaseUnavailable
from .transport import HttpReply, HttpRequest
from .twilio_rest import TwilioApiError, TwilioRestClient

logger = logging.getLogger("bridge.call_control")
T = TypeVar("T")

AMD_PATH = "/twilio/amd"
TWIML_PATH = "/twiml"
# Verdicts of DetectMessageEnd that mean "a machine, and its greeting is over": leave the message.
MACHINE_VERDICTS = frozenset({"machine_end_beep", "machine_end_silence", "machine_end_other", "machine_start"})
# What Twilio adds to a GET callback's query string, next to the call's own parameters.
TWILIO_CALLBACK_PARAMETERS = frozenset(
    {"CallSid", "AccountSid", "AnsweredBy", "MachineDetectionDuration", "ApiVersion", "CallStatus", "Direction", "From", "To"}
)
# Callbacks being acted on at once; more are answered 503 and Twilio retries them.
MAX_PENDING_CALLBACKS = 64
# Claiming a verdict (a file, or a row in PostgreSQL) gets this long.
CLAIM_SECONDS = 5.0
# The TwiML URL and the answering-machine callback URL carry every parameter; Twilio documents
# this limit for its URLs, and a longer one would fail only once the call was placed.
MAX_URL_CHARS = 4000


def amd_callback_url(settings: Settings, parameters: Mapping[str, str]) -> str:
    query = urlencode(sorted(parameters.items()))
    return f"{settings.public_base_url}{AMD_PATH}" + (f"?{query}" if query else "")


def twiml_url(settings: Settings, parameters: Mapping[str, str]) -> str:
    """Where an outbound call fetches its TwiML: ``/twiml``, its parameters in the (signed) query."""
    query = urlencode(sorted(parameters.items()))
    return f"{settings.public_base_url}{TWIML_PATH}" + (f"?{query}" if query else "")


def outbound_call(settings: Settings, parameters: Mapping[str, str]) -> tuple[str, str]:
    """The TwiML URL and the answering-machine callback URL of a call placed with ``parameters``.

    Both carry every parameter, and so does the TwiML of its voicemail stream later. Raises
    ``ValueError`` with one sentence, before anything is sent, if any of them would be longer
    than Twilio takes.
    """
    url = twiml_url(settings, parameters)
    callback = amd_callback_url(settings, parameters)
    # The voicemail stream's TwiML: the same parameters, the mode and a binding MAC (43 characters).
    voicemail = twilio.connect_twiml(
        settings.stream_url, {**parameters, MODE_PARAMETER: VOICEMAIL_MODE, BINDING_PARAMETER: "m" * 43}
    )
    if len(voicemail) > MAX_TWIML_CHARS:
        raise ValueError(
            f"the parameters make the call's TwiML {len(voicemail):,} characters long, over the "
            f"{MAX_TWIML_CHARS:,} Twilio takes: shorten them or pass fewer"
        )
    for what, text in (("TwiML URL", url), ("answering-machine callback URL", callback)):
        if len(text) > MAX_URL_CHARS:
            raise ValueError(
                f"the parameters make the call's {what} {len(text):,} characters long, "
                f"over the {MAX_URL_CHARS:,} Twilio takes: shorten them or pass fewer"
            )
    return url, callback


async def place_call(settings: Settings, rest: TwilioRestClient, to: str, parameters: Mapping[str, str]) -> str:
    """Dial ``to`` from TWILIO_PHONE_NUMBER into this bridge; returns the Call SID.

    ``ValueError`` (from ``outbound_call``) before any request if the parameters are too long.
    """
    assert settings.twilio_phone_number is not None
    url, callback = outbound_call(settings, parameters)
    created = await rest.create_call(
        to,
        settings.twilio_phone_number,
        url=url,
        method="POST",
        machine_detection="DetectMessageEnd",
        async_amd=True,
        async_amd_status_callback=callback,
        async_amd_status_callback_method="POST",
    )
    return str(created["sid"])  # create_call checked it is there


def form_parameters(request: HttpRequest) -> dict[str, list[str]]:
    """A callback's parameters: the form body of a POST, or the query string of a GET."""
    if request.method == "POST":
        try:
            body = request.body.decode("utf-8")
        except UnicodeDecodeError:
            return {}
        return parse_qs(body, keep_blank_values=True)
    return parse_qs(request.query, keep_blank_values=True)


def signed_url(settings: Settings, request: HttpRequest) -> str:
    """The URL Twilio signed: the public one, with the query string as received."""
    return f"{settings.public_base_url}{request.path}" + (f"?{request.query}" if request.query else "")


def check_signature(settings: Settings, request: HttpRequest, params: Mapping[str, list[str]]) -> HttpReply | None:
    """None if ``request`` carries Twilio's signature for its public URL and ``params``; else the 403 to answer.

    Needs the auth token (the callers check it is set). A POST's signature covers the form body,
    a GET's only the URL with its query (docs/protocols.md section 4). A refusal logs one WARNING.
    """
    assert settings.twilio_auth_token
    signature = request.header("x-twilio-signature")
    body_params = params if request.method == "POST" else {}
    if twilio.webhook_signature_is_valid(settings.twilio_auth_token, signed_url(settings, request), body_params, signature):
        return None
    logger.warning(
        "refused a %s to %s: %s X-Twilio-Signature", clean(request.method, 10), request.path, "invalid" if signature else "no"
    )
    return HttpReply(403, "Forbidden: invalid Twilio signature.\n")


async def claim_once(shared: SharedState | None, key: str, *, call_sid: str, what: str) -> bool:
    """True if this is the first claim of ``key`` in the whole deployment: a replayed callback's is not.

    ``shared.claim`` blocks, so it runs in a thread, within ``CLAIM_SECONDS``. A store that can't
    answer (down, or too slow) is logged as one WARNING naming ``what`` was to be checked, and
    counts as a first claim: acting twice on a replay is the lesser harm than not acting at all.
    """
    if shared is None:
        return True
    try:
        async with asyncio.timeout(CLAIM_SECONDS):
            return await asyncio.to_thread(shared.claim, key)
    except (OSError, DatabaseUnavailable, TimeoutError) as exc:
        logger.warning(
            "[%s] could not check %s for a replay (%s); acting on it", clean(call_sid, 40), what, clean(exc, 200) or "timed out"
        )
        return True


class CallbackWork:
    """What callbacks do after they have been answered: at most ``limit`` tasks at once, awaited at shutdown."""

    def __init__(self, limit: int = MAX_PENDING_CALLBACKS) -> None:
        self.limit = limit
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def busy(self) -> bool:
        """As much is going on as is allowed: answer 503, and Twilio retries the callback."""
        return len(self.tasks) >= self.limit

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` seconds for the work going on; what is still waiting then is cancelled."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        left = list(self.tasks)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)


class AnsweringMachineCallback:
    """``/twilio/amd``: Twilio's answering-machine verdict for an outbound call."""

    def __init__(self, settings: Settings, rest: TwilioRestClient | None, shared: SharedState | None = None) -> None:
        self.settings = settings
        self.rest = rest
        self.shared = shared
        self.work = CallbackWork()

    def handle(self, request: HttpRequest) -> HttpReply:
        if request.method not in ("GET", "POST"):
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "GET, POST"),))
        settings = self.settings
        params = form_parameters(request)
        if settings.twilio_auth_token and (refused := check_signature(settings, request, params)) is not None:
            return refused
        call_sid = (params.get("CallSid") or [""])[0]
        account_sid = (params.get("AccountSid") or [""])[0]
        answered_by = (params.get("AnsweredBy") or [""])[0]
        if not call_sid.startswith("CA") or not answered_by:
            return HttpReply(400, "A CallSid and AnsweredBy are required.\n")
        logger.info("[%s] answered by %s", clean(call_sid, 40), clean(answered_by, 30))
        if answered_by not in MACHINE_VERDICTS and answered_by != "fax":
            return HttpReply(204, "")  # a person (or unknown): the agent is already talking
        if self.rest is None:
            logger.warning("[%s] a machine answered, but the REST API is off: the agent goes on", clean(call_sid, 40))
            return HttpReply(204, "")
        if self.work.busy:
            return HttpReply(503, "Busy; retry.\n")
        # The call's own parameters came back in our query string; Twilio's own are not among them.
        call_parameters = {
            name: values[0]
            for name, values in parse_qs(request.query, keep_blank_values=True).items()
            if request.method == "POST" or name not in TWILIO_CALLBACK_PARAMETERS  # a GET's query has both
        }
        # The voicemail stream is bound to the call like any other the bridge writes TwiML for.
        call_parameters.pop(BINDING_PARAMETER, None)
        call_parameters.pop(MODE_PARAMETER, None)
        call_parameters[MODE_PARAMETER] = VOICEMAIL_MODE
        key = settings.binding_key
        if key is not None and account_sid:
            call_parameters[BINDING_PARAMETER] = binding_mac(key, call_sid, account_sid)
        self.work.start(self._redirect(call_sid, answered_by, call_parameters))
        return HttpReply(204, "")

    async def _redirect(self, call_sid: str, answered_by: str, parameters: dict[str, str]) -> None:
        assert self.rest is not None
        # The first verdict for its call anywhere in the deployment; leaving a voicemail matters
        # more than refusing a replay during an outage of the store.
        if not await claim_once(self.shared, f"amd-verdict:{call_sid}", call_sid=call_sid, what="the verdict"):
            logger.warning(
                "[%s] a second answering-machine verdict for this call (a replay?): not acted on", clean(call_sid, 40)
            )
            return
        if answered_by == "fax":
            twiml = "<Response><Hangup/></Response>"
        else:
            twiml = twilio.connect_twiml(self.settings.stream_url, parameters)
        try:
            updated = await self.rest.update_call(call_sid, twiml=twiml)
        except (TwilioApiError, ValueError) as exc:
            logger.warning("[%s] could not leave the voicemail message: %s", clean(call_sid, 40), exc)
            return
        if updated is None:
            logger.info("[%s] the call ended before the voicemail message", clean(call_sid, 40))
        else:
            logger.info("[%s] %s", clean(call_sid, 40), "a fax answered: hung up" if answered_by == "fax" else "a machine answered: leaving the voicemail message")

    async def close(self) -> None:
        await self.work.close()
