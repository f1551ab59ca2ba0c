"""Whether Twilio's REST API may act on this call: decided once, at ``start``, and never again.

=========  ======================================================  ==============================
trust      the stream ...                                          REST actions
=========  ======================================================  ==============================
BOUND      carried the MAC the bridge wrote for its callSid        allowed
UNBOUND    carried none, a wrong one, or the bridge has no key     refused, unless the operator
           (a TwiML Bin; docs/call-control.md)                     sets ALLOW_UNBOUND_CALL_CONTROL
BROWSER    is the browser phone (its callSid is whatever the page  never
           says)
=========  ======================================================  ==============================

A refused action (transfer, the fallback line, recording) is logged once per call, not once per
attempt; the conversation with the agent goes on regardless (bridge/binding.py says why).
"""

from __future__ import annotations

import enum
import logging

from ..binding import binding_matches
from .actions import Action, Log


class Trust(enum.Enum):
    PENDING = "not started"
    BOUND = "bound to its call"
    UNBOUND = "not bound to its call"
    BROWSER = "the browser phone"


class CallControl:
    __slots__ = ("trust", "_rest_enabled", "_allow_unbound", "_refusal_logged", "_why_unbound")

    def __init__(self, *, rest_enabled: bool, allow_unbound: bool, browser: bool) -> None:
        self.trust = Trust.BROWSER if browser else Trust.PENDING
        self._rest_enabled = rest_enabled
        self._allow_unbound = allow_unbound
        self._refusal_logged = False
        self._why_unbound = ""

    def stream_started(self, key: bytes | None, call_sid: str, account_sid: str, mac: str | None) -> None:
        if self.trust is Trust.BROWSER:
            return
        if key is not None and binding_matches(key, call_sid, account_sid, mac):
            self.trust = Trust.BOUND
            return
        self.trust = Trust.UNBOUND
        if key is None:
            self._why_unbound = "the bridge has no binding key: set TWILIO_AUTH_TOKEN or STREAM_BINDING_SECRET"
        elif not mac:
            self._why_unbound = "its TwiML carried no binding parameter (a TwiML Bin can't: use the /twiml webhook)"
        else:
            self._why_unbound = "its binding parameter is not the one the bridge wrote for this callSid"

    @property
    def bound(self) -> bool:
        return self.trust is Trust.BOUND

    @property
    def may_act(self) -> bool:
        """A REST request may change this call."""
        if not self._rest_enabled:
            return False
        return self.trust is Trust.BOUND or (self.trust is Trust.UNBOUND and self._allow_unbound)

    def refused(self, what: str) -> list[Action]:
        """``what`` (a REST action) is not done for this call; said once per call."""
        if self._refusal_logged or not self._rest_enabled or self.trust is Trust.BROWSER:
            return []
        self._refusal_logged = True
        return [
            Log(
                logging.WARNING,
                "not %s, nor any other REST action on this call: the stream is not bound to its call (%s)",
                (what, self._why_unbound),
            )
        ]
