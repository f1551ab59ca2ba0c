"""One HTTP exchange at a time: a POST on a fresh connection, within one deadline, read as far as asked.

The bridge makes two kinds of outgoing HTTP request: Twilio's REST API (bridge/twilio_rest.py)
and the end-of-call webhook (bridge/webhook.py). Both use what this module owns, on the standard
library and h11 (Sans-I/O):

- ``post_once``: connect (TLS for https), send, read the answer, all within one deadline; the body
  is read only as far as the caller asks (``body_limit`` by status), so a peer that answers with
  an endless or huge body holds nothing up. No usable answer is ``AttemptFailed``, which says
  whether the request may have reached the peer (``sent``) and whether trying again can help.
- ``backoff_delay``: the wait before the next attempt, doubling, capped, with jitter, so many
  bridges failing together don't retry together; ``retry_after_seconds`` reads a peer's own hint.

``open_stream`` is the seam tests use to reach a fake peer.
"""

from __future__ import annotations

import asyncio
import platform
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import h11

from .logsafe import clean

READ_CHUNK_BYTES = 64 * 1024
# A Retry-After longer than this is shortened: a caller may be waiting on the phone.
MAX_RETRY_AFTER_SECONDS = 10.0
USER_AGENT = f"twilio-deepgram-bridge (h11/{h11.__version__}; Python/{platform.python_version()})"


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    """One HTTP answer: its status, its headers and as much of its body as was asked for."""

    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    complete: bool = True  # False when the body went on past what was read


class AttemptFailed(Exception):
    """An attempt that got no usable answer.

    ``sent`` is True once the whole request may have reached the peer: from then on, creating a
    call again could create a second one. ``retryable`` is False when trying again cannot help.
    """

    def __init__(self, reason: str, *, sent: bool, retryable: bool = True, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.sent = sent
        self.retryable = retryable
        self.status = status


class _Progress:
    """How far an attempt got, readable after it was cancelled by its deadline."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


async def open_stream(host: str, port: int, tls: ssl.SSLContext | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The TCP (or TLS) connection for one request; a module-level seam so tests can redirect it."""
    return await asyncio.open_connection(host, port, ssl=tls)


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds, capped; ``None`` if absent or not a number of seconds.

    The HTTP-date form is not used by Twilio; it falls back to our own backoff.
    """
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if seconds != seconds or seconds < 0:  # NaN or negative: ignore it
        return None
    return min(seconds, MAX_RETRY_AFTER_SECONDS)


def backoff_delay(first: float, attempt: int, cap: float) -> float:
    """The wait after failed attempt ``attempt`` (1, 2, ...): ``first`` doubling up to ``cap``, plus up to half again."""
    delay = min(first * 2 ** (attempt - 1), cap)
    return delay + random.uniform(0, delay / 2)


async def post_once(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    timeout: float,
    peer: str,
    body_limit: Callable[[int], int],
) -> HttpAnswer:
    """One POST on a fresh connection, all of it (connect, TLS, send, answer) within ``timeout``.

    ``headers`` are the request's own (``Host`` among them); ``Content-Length`` and
    ``Connection: close`` are added here. Any HTTP answer is returned, with at most
    ``body_limit(status)`` bytes of its body: it is returned as soon as those are in, and the
    rest (however long, or slow to come) is never read (``HttpAnswer.complete`` is then False).
    No usable answer raises ``AttemptFailed`` saying why in words that name ``peer``.
    """
    progress = _Progress()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await open_stream(host, port, tls)
            done = False
            try:
                connection = h11.Connection(h11.CLIENT)
                # One request per connection: "Connection: close".
                headers = [*headers, ("Content-Length", str(len(body))), ("Connection", "close")]
                request = h11.Request(method="POST", target=target, headers=headers)
                # h11's send() returns None only for ConnectionClosed, which is never sent here.
                data = b"".join(connection.send(event) or b"" for event in (request, h11.Data(data=body), h11.EndOfMessage()))
                # From the first byte written, the peer may receive the whole request and act on it.
                progress.sent = True
                writer.write(data)
                await writer.drain()
                answer = await _read_answer(connection, reader, peer, body_limit)
                done = answer.complete  # the rest of a cut answer is not waited for
                return answer
            finally:
                if done:
                    writer.close()
                else:
                    # Abort: a half-read answer or a hung peer gets no graceful (TLS) goodbye to wait on.
                    writer.transport.abort()
    # TimeoutError is an OSError, so it has to come first.
    except TimeoutError:
        raise AttemptFailed(f"no answer within {timeout:g} s", sent=progress.sent) from None
    except ssl.SSLCertVerificationError as exc:
        # A certificate we don't trust will not become trusted by trying again.
        raise AttemptFailed(
            f"{peer}'s TLS certificate was refused: {clean(exc.verify_message, 120)}", sent=False, retryable=False
        ) from None
    except OSError as exc:
        what = "connection failed" if not progress.sent else "connection lost before the answer"
        raise AttemptFailed(f"{what}: {clean(exc, 160)}", sent=progress.sent) from None
    except h11.RemoteProtocolError as exc:
        raise AttemptFailed(f"broken HTTP answer: {clean(exc, 160)}", sent=True) from None


async def _read_answer(
    connection: h11.Connection, reader: asyncio.StreamReader, peer: str, body_limit: Callable[[int], int]
) -> HttpAnswer:
    status: int | None = None
    headers: dict[str, str] = {}
    body = bytearray()
    limit = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            if status is not None and len(body) >= limit:
                # Enough of the body: what h11 already holds was looked at, the rest is not awaited.
                return HttpAnswer(status, headers, bytes(body[:limit]), complete=False)
            chunk = await reader.read(READ_CHUNK_BYTES)
            if not chunk and status is None:
                # Said plainly here: h11's own words for it name its internal states.
                raise ConnectionResetError(f"{peer} closed the connection without answering")
            connection.receive_data(chunk)  # b"" tells h11 of EOF: a cut-off body is its error
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers}
            limit = body_limit(status)
        elif isinstance(event, h11.Data):
            body += event.data  # at most one read's worth past the limit, cut when returned
        elif isinstance(event, h11.EndOfMessage):
            assert status is not None  # h11 gives the Response before the end of its body
            if len(body) > limit:
                return HttpAnswer(status, headers, bytes(body[:limit]), complete=False)
            return HttpAnswer(status, headers, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            raise h11.RemoteProtocolError("connection closed before an answer")
        # h11.InformationalResponse (100 Continue and the like): the real answer follows.
