"""The server process: HTTP routes, admission of calls, and a graceful drain on shutdown.

Routes: ``/twilio`` (Twilio's Media Streams WebSocket, and the browser phone's), ``GET /health``,
``GET /phone`` (only with ``PHONE_PAGE=true``), 404 for anything else. Admission happens in the
HTTP handshake, before any Deepgram session opens: draining and ``MAX_CALLS`` answer 503, a bad
Twilio signature or phone token 403. Each admitted connection becomes one ``CallSession``.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import twilio
from .agent_protocol import settings_message
from .config import AgentConfig, Settings
from .connection import TwilioConnection
from .functions import FunctionRunner
from .records import RecordWriter
from .session import AgentConnector, CallServices, CallSession, websocket_agent_connector

logger = logging.getLogger("bridge.server")

# Media frames are a few hundred bytes; a start event with custom parameters a few kilobytes.
# Anything far bigger is not Twilio, and websockets closes that connection with 1009.
TWILIO_MAX_MESSAGE_BYTES = 64 * 1024
PHONE_PAGE = Path(__file__).parent / "static" / "phone.html"
# A second stop signal sooner than this after the first is the same stop delivered twice.
DUPLICATE_SIGNAL_SECONDS = 1.0


class BridgeServer:
    """One server process. ``connect_agent`` is the seam tests use to reach a fake agent."""

    def __init__(
        self,
        settings: Settings,
        agent_config: AgentConfig,
        function_map: Mapping[str, Callable[..., Any]],
        *,
        connect_agent: AgentConnector | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.settings = settings
        self.functions = FunctionRunner(function_map, settings.function_timeout_seconds)
        self.services = CallServices(
            settings=settings,
            agent_config=agent_config,
            functions=self.functions,
            connect_agent=connect_agent or websocket_agent_connector(settings.agent_url, settings.deepgram_api_key),
            settings_json=settings_message(agent_config.settings, []),
            records=RecordWriter(),
        )
        self.reuse_port = reuse_port
        self.calls: set[CallSession] = set()
        # Connections admitted by the handshake whose handler hasn't started yet, so that a burst
        # of handshakes can't overshoot MAX_CALLS. The value says whether it's the browser phone.
        self._admitted: dict[ServerConnection, bool] = {}
        self._connection_ids = itertools.count(1)
        self.draining = False
        self._server: Server | None = None
        self._stop_signal: asyncio.Future[int] | None = None
        self._phone_html = PHONE_PAGE.read_text(encoding="utf-8") if settings.phone_page else ""

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await serve(
            self._handle_call,
            self.settings.host,
            self.settings.port,
            process_request=self._route,
            create_connection=TwilioConnection,
            compression=None,  # audio doesn't compress; permessage-deflate costs CPU and ~64 KB a call
            max_size=TWILIO_MAX_MESSAGE_BYTES,
            close_timeout=1.0,
            reuse_port=self.reuse_port,
        )

    async def __aenter__(self) -> BridgeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(drain_seconds=0)

    # ------------------------------------------------------------------------------- routing

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == "/twilio":
            return self._admit_call(connection, request, query)
        if path == "/health":
            status = 503 if self.draining else 200
            body = {"status": "draining" if self.draining else "ok", "calls": len(self.calls)}
            return _response(connection, status, json.dumps(body), "application/json")
        if path == "/phone" and self.settings.phone_page:
            if not self._phone_token_ok(query):
                logger.warning("refused /phone without a valid token")
                return connection.respond(403, "Forbidden: the phone page needs the token main.py printed.\n")
            return _response(connection, 200, self._phone_html, "text/html; charset=utf-8")
        return connection.respond(404, "Not found.\n")

    def _phone_token_ok(self, query: str) -> bool:
        tokens = parse_qs(query, keep_blank_values=True).get("token")
        return bool(tokens) and hmac.compare_digest(tokens[0].encode(), self.settings.phone_page_token.encode())

    def _admit_call(self, connection: ServerConnection, request: Request, query: str) -> Response | None:
        if self.draining:
            logger.info("refused a call: the server is draining")
            return connection.respond(503, "The server is shutting down; try again.\n")
        # Handshakes that failed after admission never reach the handler; forget them.
        for admitted in [c for c in self._admitted if c.state is State.CLOSED]:
            del self._admitted[admitted]
        live = len(self.calls) + len(self._admitted)
        if live >= self.settings.max_calls:
            logger.warning("refused a call: %d calls are live and MAX_CALLS is %d", live, self.settings.max_calls)
            return connection.respond(503, "Too many calls; try again later.\n")
        # Any token at all (even an empty one) claims a browser session and must be the right one.
        browser = self.settings.phone_page and "token" in parse_qs(query, keep_blank_values=True)
        if browser:
            if not self._phone_token_ok(query):
                logger.warning("refused a browser phone session with a wrong token")
                return connection.respond(403, "Forbidden.\n")
        elif self.settings.twilio_auth_token:
            signatures = request.headers.get_all("X-Twilio-Signature")
            signature = signatures[0] if len(signatures) == 1 else None  # two are no valid signature
            if not twilio.signature_is_valid(self.settings.twilio_auth_token, self.settings.stream_url, signature):
                logger.warning(
                    "refused a call: %s X-Twilio-Signature for %s",
                    "invalid" if signature else "no",
                    self.settings.stream_url,
                )
                return connection.respond(403, "Forbidden: invalid Twilio signature.\n")
        self._admitted[connection] = browser
        return None

    async def _handle_call(self, connection: ServerConnection) -> None:
        browser = self._admitted.pop(connection, False)
        session = CallSession(connection, self.services, f"conn-{next(self._connection_ids)}", browser=browser)
        self.calls.add(session)
        try:
            await session.run()
        except Exception:
            session.log.exception("the call failed unexpectedly")
        finally:
            self.calls.discard(session)

    # ------------------------------------------------------------------------------ shutdown

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop taking calls, let live ones finish for up to ``drain_seconds``, then end them."""
        self.draining = True
        if self.calls and drain_seconds > 0:
            logger.info("draining: waiting up to %.0f s for %d live calls", drain_seconds, len(self.calls))
            deadline = asyncio.get_running_loop().time() + drain_seconds
            while self.calls and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.1)
        if self.calls:
            logger.info("ending %d live calls", len(self.calls))
            for session in list(self.calls):
                session.end("server shutting down")
            # Each session closes its sockets (1 s bound each, in parallel) and writes its record.
            for _ in range(50):
                if not self.calls:
                    break
                await asyncio.sleep(0.1)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.functions.close()
        self.services.records.close()

    def handle_signals(self, already_received: int | None = None) -> None:
        """Route SIGTERM/SIGINT to a drain; a second signal exits at once. Call before serving.

        ``already_received`` is a signal that arrived during startup, before the loop existed.
        """
        loop = asyncio.get_running_loop()
        self._stop_signal = loop.create_future()
        first_at = 0.0

        def on_signal(signum: int) -> None:
            nonlocal first_at
            if self._stop_signal.done():
                if loop.time() - first_at < DUPLICATE_SIGNAL_SECONDS:
                    # One stop delivered twice, e.g. by systemd to every process of the service
                    # and again by the --workers parent: not a person asking twice.
                    return
                logger.warning("second signal: exiting now without draining")
                os._exit(1)
            first_at = loop.time()
            logger.info("received %s: no new calls; draining", signal.Signals(signum).name)
            self.draining = True
            self._stop_signal.set_result(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        if already_received is not None:
            on_signal(already_received)

    async def serve_until_signalled(self) -> None:
        """Serve until a signal arrives (see ``handle_signals``), then drain and close."""
        assert self._stop_signal is not None, "call handle_signals() first"
        await self._stop_signal
        await self.shutdown(self.settings.drain_seconds)
        logger.info("drained; exiting")


def _response(connection: ServerConnection, status: int, body: str, content_type: str) -> Response:
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    response.headers["Cache-Control"] = "no-store"
    return response
