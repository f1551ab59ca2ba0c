"""The server process: HTTP routes, admission of calls, and a graceful drain on shutdown.

Routes (``routes()`` lists the ones that are on; the startup banner and ``GET /`` show that list):
``/twilio`` (Twilio's Media Streams WebSocket, and the browser phone's), ``/twiml`` (GET or POST:
a number's voice webhook, answered with the TwiML that connects the call to ``/twilio``),
``/twilio/amd``, ``/twilio/recording``, ``/twilio/transfer/key`` and ``/twilio/transfer/status``
(Twilio's callbacks, only with Twilio's REST API on), ``GET /health``, ``GET /phone`` (only with
``PHONE_PAGE=true``), ``GET /``, 404 for anything else. Admission happens in the HTTP handshake,
before any Deepgram session opens: draining and ``MAX_CALLS`` answer 503, a bad Twilio signature
or phone token 403. Each admitted connection becomes one ``CallSession``.
Connections still in their HTTP request are bounded (``max_handshakes``), so a crowd of stalled
clients can't use up the process's file descriptors. With ``RECORDS_RETENTION_DAYS`` set, the
server also deletes old call records, at startup and then hourly (``records.delete_old_records``
in a thread, so the event loop never waits on the disk), and it forgets old callback claims
and notes (bridge/storage/shared.py) the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import itertools
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from . import twilio
from .agents import AGENT_NAME, AGENT_PARAMETER, AgentCatalog
from .caller_lines import CallerLines
from .binding import BINDING_PARAMETER, binding_mac
from .call_control import AMD_PATH, TWIML_PATH, AnsweringMachineCallback, check_signature, form_parameters
from .config import AgentConfig
from .settings import ConfigError, Settings
from .functions import FunctionRunner
from .logsafe import clean, counted
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import METRICS_PATH, SHARE_SECONDS, Metrics, WorkerShare
from .recordings import RECORDING_PATH, RecordingCallback
from .records import RecordWriter, RetentionError, delete_old_records
from .storage.shared import SharedState, shared_state
from .storage.postgres import DatabaseUnavailable
from .session import AgentConnector, CallServices, CallSession, caller_limits, rest_client, websocket_agent_connector
from .transport import AcceptWebSocket, DeferredReply, HttpReply, HttpRequest, PeerLimits, ServerPeer, start_server
from .warm_transfer import TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH, WarmTransferCallbacks
from .webhook import webhook_sender

logger = logging.getLogger("bridge.server")

# Media frames are a few hundred bytes; a start event with custom parameters a few kilobytes.
# Anything far bigger is not Twilio, and the connection is closed with 1009.
TWILIO_MAX_MESSAGE_BYTES = 64 * 1024
PHONE_PAGE = Path(__file__).parent / "static" / "phone.html"
# A second stop signal sooner than this after the first is the same stop delivered twice.
DUPLICATE_SIGNAL_SECONDS = 1.0
# Evictions at the handshake limit are logged once per this many seconds, not once each.
REFUSAL_LOG_SECONDS = 10.0
# After the drain, ending calls close their sockets and write their records within this.
END_CALLS_SECONDS = 6.0
# What a voice webhook passes on to the stream as <Parameter>s, and how much of each value.
WEBHOOK_PARAMETERS = ("From", "To", "CallSid", "Direction")
MAX_WEBHOOK_VALUE_CHARS = 200
# An outbound call's own parameters, from the query of its signed TwiML request: a name like a
# <Parameter>'s, never one the bridge writes itself, and as many and as long as main.py call lets
# through (its URL is at most 4000 characters).
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
RESERVED_PARAMETERS = frozenset({BINDING_PARAMETER, twilio.MODE_PARAMETER})
MAX_QUERY_PARAMETERS = 200
MAX_QUERY_VALUE_CHARS = 4000
# After a second signal the process is gone within this, even if something hangs.
SECOND_SIGNAL_EXIT_SECONDS = END_CALLS_SECONDS + 4.0
# How often old call records (RECORDS_RETENTION_DAYS) and old claims are looked for; the first
# pass is at startup.
HOUSEKEEPING_INTERVAL_SECONDS = 3600.0
# A reload reads its files in a thread of its own; one that takes longer is refused (the thread
# may still be stuck, on a hung network file system, say: no other reload starts until it ends).
RELOAD_TIMEOUT_SECONDS = 5.0


def routes(settings: Settings) -> list[tuple[str, str]]:
    """The routes a server with these settings answers, as ``(path, what it is)``.

    One list for the startup banner, ``GET /`` and the router's own on/off decisions, so a new
    route is added in one place.
    """
    served = [("/twilio", "WebSocket: Twilio Media Streams" + (" and the browser phone" if settings.phone_page else ""))]
    if not settings.browser_only:
        served.append((TWIML_PATH, "GET or POST: TwiML for a number's voice webhook"))
    if settings.rest_enabled:
        served.append((AMD_PATH, "Twilio's answering-machine callback for outbound calls"))
        served.append((RECORDING_PATH, "Twilio's recording status callback for recorded calls"))
        served.append((TRANSFER_KEY_PATH, "POST: the key a pharmacist pressed, in a warm transfer"))
        served.append((TRANSFER_STATUS_PATH, "POST: the pharmacist's call status, in a warm transfer"))
    if settings.phone_page:
        served.append(("/phone", "GET: the browser phone, with the token main.py printed"))
    served.append(("/health", "GET: health check"))
    if settings.metrics_port is None:
        served.append((METRICS_PATH, "GET: Prometheus metrics"))
    else:
        served.append((METRICS_PATH, f"GET: Prometheus metrics, on port {settings.metrics_port} only"))
    served.append(("/", "GET: this list"))
    return served


def index_page(settings: Settings) -> str:
    """What ``GET /`` answers: the routes that are on, and nothing secret."""
    lines = ["Twilio <-> Deepgram Voice Agent bridge. Served here:", ""]
    served = routes(settings)
    width = max(len(path) for path, _ in served)
    lines += [f"  {path:<{width}} {what}" for path, what in served]
    if settings.phone_page:
        lines += ["", "Browser phone: open /phone?token=... with the token main.py printed at startup."]
    return "\n".join(lines) + "\n"


class BridgeServer:
    """One server process. ``connect_agent`` is the seam tests use to reach a fake agent.

    ``agents`` is one agent (an ``AgentConfig``) or several (an ``AgentCatalog``); ``load_agents``
    reads them again for ``reload_agents`` and raises ``ConfigError`` for an invalid file. It runs
    in a thread, so it must not touch the event loop; ``reload_timeout_seconds`` bounds it.
    ``housekeeping_interval`` is the time between two passes deleting old call records and old
    claims (tests shorten it); ``shared`` is the seam for what the processes share (bridge/storage/shared.py).
    """

    def __init__(
        self,
        settings: Settings,
        agents: AgentConfig | AgentCatalog,
        function_map: Mapping[str, Callable[..., Any]],
        *,
        connect_agent: AgentConnector | None = None,
        reuse_port: bool = False,
        load_agents: Callable[[], AgentCatalog] | None = None,
        metrics_share: WorkerShare | None = None,
        housekeeping_interval: float = HOUSEKEEPING_INTERVAL_SECONDS,
        shared: SharedState | None = None,
        reload_timeout_seconds: float = RELOAD_TIMEOUT_SECONDS,
    ) -> None:
        self.settings = settings
        self.agents = agents if isinstance(agents, AgentCatalog) else AgentCatalog.single(agents, default_lines=settings.caller_lines)
        self._load_agents = load_agents
        self._reload_timeout = reload_timeout_seconds
        self._reloading: asyncio.Task[None] | None = None  # the reloads SIGHUP asked for, one after another
        self._reload_again = False  # a SIGHUP came during the current reload
        self.functions = FunctionRunner(function_map, settings.function_timeout_seconds)
        self.metrics = Metrics(function_map)
        self.metrics_share = metrics_share
        self._metrics_server: asyncio.Server | None = None
        self._metrics_writer: asyncio.Task[None] | None = None
        self.housekeeping_interval = housekeeping_interval
        self._housekeeping_task: asyncio.Task[None] | None = None
        # What the processes share (a callback acts once; notes for a call): for Twilio's REST API only.
        if shared is None and settings.rest_enabled:
            shared = shared_state(settings.state_dir, settings.database_url)
        self.shared = shared
        self.services = CallServices(
            settings=settings,
            functions=self.functions,
            connect_agent=connect_agent or websocket_agent_connector(settings),
            records=RecordWriter(),
            rest=rest_client(settings),
            metrics=self.metrics,
            webhook=webhook_sender(settings),
            shared=shared,
        )
        self.caller_limits: PeerLimits = caller_limits(settings, TWILIO_MAX_MESSAGE_BYTES)
        self.answering_machine = AnsweringMachineCallback(settings, self.services.rest, shared)
        self.recordings = RecordingCallback(settings, shared, self.services.records, self.services.webhook)
        self.warm_transfer = WarmTransferCallbacks(settings, shared, self.services.rest, self._lines_for)
        self.reuse_port = reuse_port
        self.calls: set[CallSession] = set()
        self._call_tasks: set[asyncio.Task[None]] = set()
        self._connection_ids = itertools.count(1)
        self._handshaking: dict[ServerPeer, None] = {}  # in arrival order, oldest first
        self._evicted_since_log = 0
        self._eviction_logged_at = float("-inf")
        self.draining = False
        self._server: asyncio.Server | None = None
        self._stop_signal: asyncio.Future[int] | None = None
        self._phone_html = PHONE_PAGE.read_text(encoding="utf-8") if settings.phone_page else ""
        self._index = index_page(settings)
        self._end_now: asyncio.Event | None = None  # set by a second signal: end live calls now

    def _lines_for(self, agent_name: str) -> CallerLines:
        """The lines of the agent named in a callback, from the agents as they are now (after reloads)."""
        return (self.agents.agent(agent_name) or self.agents.default).lines

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await start_server(
            lambda: self,
            self.settings.host,
            self.settings.port,
            handshake_timeout=self.settings.limits.handshake_timeout_seconds,
            reuse_port=self.reuse_port,
        )
        if self.settings.metrics_port is not None:
            # Its own port, so /metrics needn't be public; workers share it as they share the main one.
            self._metrics_server = await start_server(
                lambda: MetricsRouter(self),
                self.settings.host,
                self.settings.metrics_port,
                handshake_timeout=self.settings.limits.handshake_timeout_seconds,
                reuse_port=self.reuse_port,
            )
        if self.metrics_share is not None:
            self._metrics_writer = asyncio.create_task(self._share_metrics())
        if self.services.webhook is not None:
            self.services.webhook.start()
        if self.settings.records_retention_days is not None or self.shared is not None:
            self._housekeeping_task = asyncio.create_task(self._housekeeping())

    async def __aenter__(self) -> BridgeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown(drain_seconds=0)

    # ------------------------------------------------------------------------ handshakes

    def handshake_started(self, peer: ServerPeer) -> bool:
        """Admit a new connection to its HTTP request; at the limit, the oldest waiting one goes.

        Evicting the oldest (not refusing the newest) means a crowd of stalled connections can
        neither use up file descriptors nor keep a real request (Twilio's, /health) out.
        """
        if len(self._handshaking) >= self.settings.limits.max_handshakes:
            oldest = next(iter(self._handshaking))
            del self._handshaking[oldest]
            oldest.abort()
            self._evicted_since_log += 1
            now = asyncio.get_running_loop().time()
            if now - self._eviction_logged_at >= REFUSAL_LOG_SECONDS:
                logger.warning(
                    "%d connections are still in their HTTP handshake, the limit: closing the oldest "
                    "(%d closed since the last report; next report in %.0f s at the earliest)",
                    self.settings.limits.max_handshakes,
                    self._evicted_since_log,
                    REFUSAL_LOG_SECONDS,
                )
                self._eviction_logged_at = now
                self._evicted_since_log = 0
        self._handshaking[peer] = None
        return True

    def handshake_finished(self, peer: ServerPeer) -> None:
        self._handshaking.pop(peer, None)

    @property
    def handshakes(self) -> int:
        """Connections still in their HTTP request."""
        return len(self._handshaking)

    # ------------------------------------------------------------------------------- routing

    def routes(self) -> list[tuple[str, str]]:
        """The routes this server answers (see ``routes``)."""
        return routes(self.settings)

    def route(self, request: HttpRequest) -> HttpReply | DeferredReply | AcceptWebSocket:
        path = request.path
        if path == "/twilio":
            return self._admit_call(request)
        if path == AMD_PATH and self.settings.rest_enabled:
            return self.answering_machine.handle(request)
        if path == RECORDING_PATH and self.settings.rest_enabled:
            return self.recordings.handle(request)
        if path in (TRANSFER_KEY_PATH, TRANSFER_STATUS_PATH) and self.settings.rest_enabled:
            return self.warm_transfer.handle(request)
        if path == TWIML_PATH:
            return self._twiml(request)
        if request.method not in ("GET", "HEAD"):
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "GET"),))
        if path == "/health":
            status = 503 if self.draining else 200
            body = {"status": "draining" if self.draining else "ok", "calls": len(self.calls)}
            return HttpReply(status, json.dumps(body), "application/json")
        if path == "/phone" and self.settings.phone_page:
            if not self._phone_token_ok(request.query):
                logger.warning("refused /phone without a valid token")
                return HttpReply(403, "Forbidden: the phone page needs the token main.py printed.\n")
            return HttpReply(200, self._phone_html, "text/html; charset=utf-8")
        if path == METRICS_PATH and self.settings.metrics_port is None:
            return self.metrics_reply()
        if path == "/":
            return HttpReply(200, self._index, "text/plain; charset=utf-8")
        return HttpReply(404, "Not found.\n")

    # ------------------------------------------------------------------------------- metrics

    def metrics_reply(self) -> HttpReply:
        """``GET /metrics``: this process's metrics, and with ``--workers`` the other workers' too."""
        share = self.metrics_share
        text = self.metrics.render(
            share.others() if share else (),
            worker=share.worker if share else None,
            live_bad_input=self._live_bad_input(),
        )
        return HttpReply(200, text, METRICS_CONTENT_TYPE)

    def _live_bad_input(self) -> list[dict[str, int]]:
        return [session.call.bad_input for session in self.calls]

    def _share_metrics_now(self) -> None:
        assert self.metrics_share is not None
        self.metrics_share.write(self.metrics.snapshot(self._live_bad_input()))

    async def _share_metrics(self) -> None:
        while True:
            self._share_metrics_now()
            await asyncio.sleep(SHARE_SECONDS)

    # ------------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        """A pass now and then one every ``housekeeping_interval``, until cancelled at shutdown.

        A pass deletes call records older than RECORDS_RETENTION_DAYS, if set, and forgets claims
        older than the replay window. Each says one INFO line if it deleted anything, nothing if
        not, and one WARNING if something could not be deleted (never a line per file).
        """
        days = self.settings.records_retention_days
        while True:
            if days is not None:
                await self._delete_old_records(days)
            if self.shared is not None:
                await self._prune_shared(self.shared)
            await asyncio.sleep(self.housekeeping_interval)

    async def _delete_old_records(self, days: float) -> None:
        try:
            deleted = await asyncio.to_thread(delete_old_records, self.settings.calls_dir, days)
        except RetentionError as exc:
            deleted = exc.deleted
            logger.warning("deleting call records older than %g days failed: %s", days, exc)
        except Exception:  # a bug must not end the hourly passes for the rest of the process's life
            deleted = 0
            logger.exception("the pass deleting old call records failed")
        if deleted:
            logger.info("deleted %s older than %s", counted(deleted, "call record"), counted(days, "day"))

    async def _prune_shared(self, shared: SharedState) -> None:
        try:
            await asyncio.to_thread(shared.prune, time.time())
        except (OSError, DatabaseUnavailable) as exc:
            logger.warning("forgetting old claims and notes failed: %s", clean(exc, 200))

    def _twiml(self, request: HttpRequest) -> HttpReply:
        """A number's voice webhook: TwiML connecting the call to ``/twilio`` with its details."""
        if request.method not in ("GET", "POST"):
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "GET, POST"),))
        settings = self.settings
        if not settings.public_url:
            logger.error("answered %s with 503: set PUBLIC_URL, the TwiML must name this bridge's public host", TWIML_PATH)
            return HttpReply(503, "PUBLIC_URL is not set, so the bridge cannot name its own host in TwiML.\n")
        params = form_parameters(request)
        signed = False
        if settings.twilio_auth_token:
            if (refused := check_signature(settings, request, params)) is not None:
                return refused
            signed = True
        stream_parameters = {
            name: values[0][:MAX_WEBHOOK_VALUE_CHARS]
            for name in WEBHOOK_PARAMETERS
            if (values := params.get(name)) and values[0]
        }
        query = parse_qs(request.query)
        if request.method == "POST":
            # An outbound call (``main.py call``) passes its parameters in the query of a POST, where
            # Twilio's own are in the body; a GET webhook's query holds Twilio's, so only ``agent``.
            for name, values in query.items():
                if PARAMETER_NAME.fullmatch(name) and name not in RESERVED_PARAMETERS and len(stream_parameters) < MAX_QUERY_PARAMETERS:
                    stream_parameters.setdefault(name, values[0][:MAX_QUERY_VALUE_CHARS])
        # ``/twiml?agent=NAME`` picks the agent for every call of the number the webhook belongs to.
        agent_name = (query.get(AGENT_PARAMETER) or [""])[0]
        stream_parameters.pop(AGENT_PARAMETER, None)
        if AGENT_NAME.fullmatch(agent_name):
            stream_parameters[AGENT_PARAMETER] = agent_name
        # Only Twilio's own signed request names the call: only then is the stream bound to it.
        call_sid, account_sid = (params.get("CallSid") or [""])[0], (params.get("AccountSid") or [""])[0]
        key = settings.binding_key
        if signed and key is not None and call_sid and account_sid:
            stream_parameters[BINDING_PARAMETER] = binding_mac(key, call_sid, account_sid)
        twiml = twilio.connect_twiml(settings.stream_url, stream_parameters, declaration=True)
        return HttpReply(200, twiml, "text/xml")

    async def reload_agents(self) -> bool:
        """Read the agents again: new calls get them; live calls keep theirs.

        The files are read in a thread of its own, so the calls and ``/health`` carry on meanwhile;
        the new agents are put in place here, on the event loop. An invalid file, or a read that
        takes longer than ``reload_timeout_seconds``, keeps every agent as it was and says why in
        one ERROR line. This returns only once the thread has ended, even after its deadline, so
        reloads run one at a time and never leave threads piling up.
        """
        if self._load_agents is None:
            logger.warning("this server cannot reload its agents")
            return False
        outcome: concurrent.futures.Future[AgentCatalog] = concurrent.futures.Future()
        # A daemon thread: one stuck in a read must not keep the process from exiting.
        threading.Thread(target=self._read_agents, args=(outcome,), name="agent-reload", daemon=True).start()
        read = asyncio.wrap_future(outcome)
        try:
            finished, _ = await asyncio.wait({read}, timeout=self._reload_timeout)
            if not finished:
                logger.error(
                    "reload refused, the agents stay as they were: reading them took longer than %g s "
                    "(a hung network file system?); no other reload starts until that read ends",
                    self._reload_timeout,
                )
                await asyncio.wait({read})
                logger.info("the late reload ended; what it read is not used")
                return False
            agents = read.result()
        except ConfigError as exc:
            logger.error("reload refused, the agents stay as they were: %s", exc)
            return False
        except Exception:
            logger.exception("reload failed unexpectedly, the agents stay as they were")
            return False
        finally:
            read.cancel()  # does nothing once it is done; if this reload was cancelled, nobody wants it
        self.agents = agents
        logger.info("reloaded the agents for new calls: %s", "; ".join(agents.describe()))
        return True

    def _read_agents(self, outcome: concurrent.futures.Future[AgentCatalog]) -> None:
        """The reload thread's work: ``load_agents``'s catalog or exception, into ``outcome``."""
        assert self._load_agents is not None
        if not outcome.set_running_or_notify_cancel():
            return
        try:
            outcome.set_result(self._load_agents())
        except Exception as exc:
            outcome.set_exception(exc)

    def request_reload(self) -> None:
        """Reload the agents in the background (SIGHUP); requests during a reload make one more after it.

        However many SIGHUPs arrive while a reload runs, they coalesce into one more reload, which
        sees every change made before it starts; at most one reload thread exists at a time.
        """
        if self._reloading is not None:
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload_while_requested())

    async def _reload_while_requested(self) -> None:
        try:
            while True:
                self._reload_again = False
                await self.reload_agents()
                if not self._reload_again:
                    break
        finally:
            self._reloading = None

    def _phone_token_ok(self, query: str) -> bool:
        tokens = parse_qs(query, keep_blank_values=True).get("token")
        return bool(tokens) and hmac.compare_digest(tokens[0].encode(), self.settings.phone_page_token.encode())

    def _admit_call(self, request: HttpRequest) -> HttpReply | AcceptWebSocket:
        if request.method != "GET":
            logger.warning(
                "refused a %s to /twilio: /twilio is the Media Streams WebSocket, not a voice webhook; "
                "point the number's voice webhook at /twiml, or use a TwiML Bin",
                clean(request.method, 10),
            )
            return HttpReply(405, "Method not allowed: /twilio is a WebSocket.\n", headers=(("Allow", "GET"),))
        if not request.wants_websocket:
            return HttpReply(426, "Upgrade required: /twilio is a WebSocket.\n", headers=(("Upgrade", "websocket"),))
        if self.draining:
            logger.info("refused a call: the server is draining")
            return HttpReply(503, "The server is shutting down; try again.\n")
        if len(self.calls) >= self.settings.max_calls:
            logger.warning(
                "refused a call: %s and MAX_CALLS is %d",
                counted(len(self.calls), "call is live", "calls are live"), self.settings.max_calls,
            )
            return HttpReply(503, "Too many calls; try again later.\n")
        # Any token at all (even an empty one) claims a browser session and must be the right one.
        browser = self.settings.phone_page and "token" in parse_qs(request.query, keep_blank_values=True)
        if browser:
            if not self._phone_token_ok(request.query):
                logger.warning("refused a browser phone session with a wrong token")
                return HttpReply(403, "Forbidden.\n")
        elif self.settings.twilio_auth_token:
            signature = request.header("x-twilio-signature")  # two of them are no valid signature
            if not twilio.signature_is_valid(self.settings.twilio_auth_token, self.settings.stream_url, signature):
                logger.warning(
                    "refused a call: %s X-Twilio-Signature for %s",
                    "invalid" if signature else "no",
                    self.settings.stream_url,
                )
                return HttpReply(403, "Forbidden: invalid Twilio signature.\n")
        agents = self.agents  # the call keeps the agents of the moment it was admitted
        return AcceptWebSocket(lambda peer: self._start_call(peer, browser, agents), self.caller_limits)

    def _start_call(self, peer: ServerPeer, browser: bool, agents: AgentCatalog) -> None:
        session = CallSession(peer, self.services, f"conn-{next(self._connection_ids)}", browser=browser, agents=agents)
        self.calls.add(session)
        self.metrics.call_started()
        task = asyncio.create_task(self._run_call(session))
        self._call_tasks.add(task)
        task.add_done_callback(self._call_tasks.discard)

    async def _run_call(self, session: CallSession) -> None:
        try:
            await session.run()
        except Exception:
            session.log.exception("the call failed unexpectedly")
        finally:
            self.calls.discard(session)
            call = session.call
            self.metrics.call_ended(call.end, session.loop.time() - session.started, call.bad_input)
            if self.metrics_share is not None:  # the other workers' scrapes see it now, not a second later
                self._share_metrics_now()

    # ------------------------------------------------------------------------------ shutdown

    async def shutdown(self, drain_seconds: float) -> None:
        """Stop taking calls, let live ones finish for up to ``drain_seconds``, then end them."""
        self.draining = True
        if self._call_tasks and drain_seconds > 0:
            logger.info("draining: waiting up to %.0f s for %s", drain_seconds, counted(len(self.calls), "live call"))
            calls_done = asyncio.ensure_future(asyncio.wait(list(self._call_tasks)))
            waits = [calls_done]
            if self._end_now is not None:  # a second signal cuts the drain short
                waits.append(asyncio.ensure_future(self._end_now.wait()))
            await asyncio.wait(waits, timeout=drain_seconds, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        if self.calls:
            logger.info("ending %s", counted(len(self.calls), "live call"))
            for session in list(self.calls):
                session.shut_down()
        if self._call_tasks:
            # Each call closes its sockets and writes its record, every step with a deadline.
            await asyncio.wait(list(self._call_tasks), timeout=END_CALLS_SECONDS)
        # Before the webhook sender closes: a recording callback being acted on may still send.
        await self.recordings.close()
        if self.services.webhook is not None:
            # After the calls ended, so the summaries of those the drain ended are sent too.
            await self.services.webhook.close(self.settings.limits.webhook_drain_timeout_seconds)
        await self.answering_machine.close()
        await self.warm_transfer.close()
        if self._server is not None:
            self._server.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        if self._metrics_writer is not None:
            self._metrics_writer.cancel()
        if self._housekeeping_task is not None:
            # A pass already in its thread finishes there (a bounded number of files).
            self._housekeeping_task.cancel()
            await asyncio.wait([self._housekeeping_task])
        if self._reloading is not None:  # a reload can't change anything now; its thread dies with the process
            self._reloading.cancel()
        if self.metrics_share is not None:
            self._share_metrics_now()  # what this worker counted, to the end
        self.functions.close()
        self.services.records.close()

    def handle_signals(self, already_received: int | None = None) -> None:
        """Route SIGTERM/SIGINT to a drain; a second signal ends live calls now. Call before serving.

        The second signal ends every live call at once, as the drain's end does (their records
        are written), and the process exits with status 1 within ``SECOND_SIGNAL_EXIT_SECONDS``
        even if something hangs; a third exits at once. ``already_received`` is a signal that
        arrived during startup, before the loop existed.
        """
        loop = asyncio.get_running_loop()
        self._stop_signal = loop.create_future()
        self._end_now = asyncio.Event()
        last_at = 0.0

        def on_signal(signum: int) -> None:
            nonlocal last_at
            assert self._stop_signal is not None and self._end_now is not None
            if self._stop_signal.done():
                if loop.time() - last_at < DUPLICATE_SIGNAL_SECONDS:
                    # One stop delivered twice, e.g. by systemd to every process of the service
                    # and again by the --workers parent: not a person asking twice.
                    return
                last_at = loop.time()
                if self._end_now.is_set():
                    logger.warning("third signal: exiting now; records of calls still ending may be incomplete")
                    os._exit(1)
                logger.warning(
                    "second signal: ending %s now and writing their records; exiting within %.0f s",
                    counted(len(self.calls), "live call"),
                    SECOND_SIGNAL_EXIT_SECONDS,
                )
                # A backstop on a thread of its own: it fires even if the event loop is stuck.
                backstop = threading.Timer(SECOND_SIGNAL_EXIT_SECONDS, os._exit, args=(1,))
                backstop.daemon = True
                backstop.start()
                self._end_now.set()
                return
            last_at = loop.time()
            logger.info(
                "received %s: no new calls; draining (press Ctrl-C again, or send another SIGTERM, "
                "to end live calls now)",
                signal.Signals(signum).name,
            )
            self.draining = True
            self._stop_signal.set_result(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        if self._load_agents is not None:
            loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        if already_received is not None:
            on_signal(already_received)

    def _on_reload_signal(self) -> None:
        if self._reloading is not None:
            logger.info("received SIGHUP during a reload: one more reload follows it")
        else:
            logger.info("received SIGHUP: reloading the agents")
        self.request_reload()

    async def serve_until_signalled(self) -> int:
        """Serve until a signal arrives (see ``handle_signals``), then drain and close.

        Returns the process's exit status: 0 after a full drain, 1 when a second signal cut it short.
        """
        assert self._stop_signal is not None and self._end_now is not None, "call handle_signals() first"
        await self._stop_signal
        await self.shutdown(self.settings.drain_timeout_seconds)
        if self._end_now.is_set():
            logger.info("live calls ended and recorded; exiting")
            return 1
        logger.info("drained; exiting")
        return 0


class MetricsRouter:
    """The router of ``METRICS_PORT``: ``GET /metrics`` and nothing else."""

    def __init__(self, server: BridgeServer) -> None:
        self.server = server

    def route(self, request: HttpRequest) -> HttpReply | AcceptWebSocket:
        if request.path != METRICS_PATH:
            return HttpReply(404, "Not found: this port serves only /metrics.\n")
        if request.method not in ("GET", "HEAD"):
            return HttpReply(405, "Method not allowed.\n", headers=(("Allow", "GET"),))
        return self.server.metrics_reply()

    def handshake_started(self, peer: ServerPeer) -> bool:
        return self.server.handshake_started(peer)  # the same bound on connections in their request

    def handshake_finished(self, peer: ServerPeer) -> None:
        self.server.handshake_finished(peer)
