"""What one call asks of Twilio's REST API and of the shared state, beyond its own stream.

The call core (bridge/call/) decides what is asked and bridge/session.py starts it; this module
makes each request, within a deadline, and turns its outcome into what the core takes back: a
SID, or why it failed, in one sentence. Nothing here raises for a peer's failure.

- Moving the call (a transfer, the fallback line): ``redirect``.
- Recording it once the caller heard the notice (bridge/call/recording.py): ``start_recording``,
  and ``update_recording`` to pause it over keypad digits and resume it, one request at a time
  in the order asked, so a resume never overtakes its pause.
- A warm transfer (bridge/call/consult.py, bridge/warm_transfer.py): ``dial_pharmacist`` rings
  TRANSFER_NUMBER with the briefing, ``wait_for_note`` reads the shared state until the
  pharmacist's answer is there, ``note_caller_left`` tells any process the caller has gone, and
  ``end_leg`` hangs up the pharmacist's call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .call.actions import DialPharmacist, RedirectCall, WatchForNote
from .call.consult import CALLER_LEFT_NOTE, caller_left_key, note_key
from .logsafe import clean
from .recordings import recording_callback_url
from .settings import Settings
from .storage.postgres import DatabaseUnavailable
from .storage.shared import SharedState
from .twilio_rest import MAX_RING_SECONDS, MIN_RING_SECONDS, TwilioApiError, TwilioRestClient
from .warm_transfer import dial_pharmacist_request

# One REST request (the client retries within it) or one step on the shared state.
REST_SECONDS = 8.0
STATE_SECONDS = 4.0
# How often the process holding the caller looks for the pharmacist's answer.
NOTE_POLL_SECONDS = 0.5
# Twilio reports a recording when it is done (or there is none); the start is the core's own line.
RECORDING_EVENTS = ("completed", "absent")
NOT_SET_UP = "Twilio's REST API is not set up"
CALL_OVER = "the call had already ended"
T = TypeVar("T")


class CallRequests:
    """One call's requests; ``log`` is the call's own logger (its lines carry the call's name)."""

    def __init__(
        self, settings: Settings, rest: TwilioRestClient | None, shared: SharedState | None, log: logging.LoggerAdapter[Any]
    ) -> None:
        self.settings = settings
        self.rest = rest
        self.shared = shared
        self.log = log
        # Pauses and resumes of the recording go out one at a time, in order (asyncio.Lock is fair).
        self._recording_lock = asyncio.Lock()

    async def redirect(self, redirect: RedirectCall) -> str | None:
        """Move the live call to the machine's TwiML (docs/protocols.md section 8); why it failed, if it did."""
        _, error = await self._rest(lambda rest: rest.update_call(redirect.call_sid, twiml=redirect.twiml))
        return error

    async def start_recording(self, call_sid: str, record_name: str | None) -> tuple[str | None, str | None]:
        """Start the two-channel recording: its SID, or why not (the call over counts as a why)."""
        callback = recording_callback_url(self.settings, record_name)
        async with self._recording_lock:
            started, error = await self._rest(
                lambda rest: rest.start_recording(call_sid, status_callback=callback, status_callback_events=RECORDING_EVENTS)
            )
        return (str(started["sid"]), None) if started is not None else (None, error)

    async def update_recording(self, call_sid: str, pause: bool) -> str | None:
        """Pause the recording (the span skipped, not silent) or resume it; why it failed, if it did."""
        status, behavior = ("paused", "skip") if pause else ("in-progress", None)
        async with self._recording_lock:
            _, error = await self._rest(lambda rest: rest.update_recording(call_sid, status=status, pause_behavior=behavior))
        return error

    async def dial_pharmacist(self, dial: DialPharmacist) -> tuple[str | None, str | None]:
        """Ring the pharmacist with the briefing: their call's SID, or why not."""
        # Twilio rings for at most TRANSFER_TIMEOUT_SECONDS (in its range); the core's timer bounds the rest.
        ring = max(MIN_RING_SECONDS, min(MAX_RING_SECONDS, int(self.settings.transfer_timeout_seconds)))
        try:
            request = dial_pharmacist_request(
                self.settings, dial.caller_call_sid, dial.agent_name, dial.briefing,
                attempt=dial.attempt, timeout=ring, no_answer=dial.no_answer, voice=dial.voice,
            )
        except ValueError as exc:
            return None, str(exc)
        created, error = await self._rest(lambda rest: rest.create_call(**request))
        return (str(created["sid"]), None) if created is not None else (None, error)

    async def wait_for_note(self, watch: WatchForNote) -> str:
        """The pharmacist's answer to this attempt, once a callback (in any process) has left it.

        Waits until there is one; the core's timer ends the transfer (and this, by cancelling it)
        if none comes. A store that fails is logged once per outage and read again.
        """
        key = note_key(watch.caller_call_sid, watch.attempt)
        failing = False
        while True:
            try:
                note = await self._state(lambda shared: shared.read(key))
            except (OSError, DatabaseUnavailable, TimeoutError) as exc:
                if not failing:
                    self.log.warning("cannot read the pharmacist's answer from the shared state (%s); trying again", clean(exc, 200) or "timed out")
                failing = True
            else:
                if failing:
                    self.log.info("the shared state answers again")
                failing = False
                if note is not None:
                    return note
            await asyncio.sleep(NOTE_POLL_SECONDS)

    async def note_caller_left(self, caller_call_sid: str) -> None:
        """Tell every process the caller hung up, for a pharmacist who presses 1 after that."""
        key = caller_left_key(caller_call_sid)
        try:
            await self._state(lambda shared: shared.post(key, CALLER_LEFT_NOTE))
        except (OSError, DatabaseUnavailable, TimeoutError) as exc:
            self.log.warning(
                "could not note that the caller left during the warm transfer (%s): a pharmacist pressing 1 now "
                "waits in an empty conference", clean(exc, 200) or "timed out",
            )

    async def end_leg(self, call_sid: str) -> None:
        """Hang up the pharmacist's call; a call already over is no failure."""
        _, error = await self._rest(lambda rest: rest.update_call(call_sid, status="completed"))
        if error is not None and error != CALL_OVER:
            self.log.warning("could not hang up the pharmacist's call %s: %s", call_sid, error)

    async def _rest(self, request: Callable[[TwilioRestClient], Awaitable[dict[str, Any] | None]]) -> tuple[dict[str, Any] | None, str | None]:
        """Twilio's answer to ``request(rest)`` within REST_SECONDS, or (None, why not).

        Twilio answering that the call is over counts as a why: ``CALL_OVER``.
        """
        rest = self.rest
        if rest is None:
            return None, NOT_SET_UP
        try:
            async with asyncio.timeout(REST_SECONDS):
                answer = await request(rest)
        except (TwilioApiError, ValueError, TimeoutError) as exc:
            return None, clean(exc, 200) or type(exc).__name__
        return (answer, None) if answer is not None else (None, CALL_OVER)

    async def _state(self, step: Callable[[SharedState], T]) -> T:
        """Run the blocking ``step(shared)`` in a thread within STATE_SECONDS."""
        shared = self.shared
        if shared is None:
            raise OSError("no shared state is set up (it comes with Twilio's REST API)")
        async with asyncio.timeout(STATE_SECONDS):
            return await asyncio.to_thread(step, shared)
