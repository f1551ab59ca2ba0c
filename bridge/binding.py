"""Binding a Media Stream to the call it claims to carry, so the bridge never acts on a stranger's call.

A stream's ``start`` names its call (``callSid``), but anyone who can open ``/twilio`` can send
any ``start``, and Twilio's signature on the WebSocket handshake covers only the ``wss://`` URL,
the same for every call and valid forever (docs/protocols.md section 9). So every TwiML the
bridge writes for a call carries a ``<Parameter>`` with a MAC over that call's CallSid and
AccountSid, keyed by a secret only the bridge holds; at ``start`` the bridge recomputes it for the
``callSid`` the stream names. A stream whose MAC matches is *bound*: Twilio itself was handed that
parameter for that call. Only a bound call may be the subject of a REST request that changes it.

The key is ``STREAM_BINDING_SECRET`` when set, or else derived from ``TWILIO_AUTH_TOKEN``, so
every process and pod of one deployment computes the same MACs without sharing any state. A
TwiML Bin holds no secret and can't bind its streams (docs/call-control.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

BINDING_PARAMETER = "bridge_binding"
_DERIVATION_LABEL = b"twilio-deepgram-bridge stream binding v1"


def binding_key(secret: str | None, auth_token: str | None) -> bytes | None:
    """The MAC key: the binding secret's bytes, or one derived from the auth token; None without either."""
    if secret:
        return secret.encode("utf-8")
    if auth_token:
        # Derived rather than the token itself, so a MAC never serves as an oracle for the token.
        return hmac.new(auth_token.encode("utf-8"), _DERIVATION_LABEL, hashlib.sha256).digest()
    return None


def binding_mac(key: bytes, call_sid: str, account_sid: str) -> str:
    """The ``bridge_binding`` value for one call: URL-safe base64 of HMAC-SHA256, 43 characters."""
    message = f"{account_sid}/{call_sid}".encode("utf-8", "surrogatepass")
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def binding_matches(key: bytes, call_sid: str, account_sid: str, mac: str | None) -> bool:
    if not mac:
        return False
    given = mac.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(binding_mac(key, call_sid, account_sid).encode("ascii"), given)
