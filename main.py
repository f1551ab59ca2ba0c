"""Run the Twilio <-> Deepgram Voice Agent bridge.

    python main.py [--host HOST] [--port PORT] [--config config.json] [--workers N]
    python main.py call +15551234567 [--param name=value ...]

Loads ``.env``, validates the settings, config.json, the agents in ``agents/`` and
pharmacy_functions.function_map, then serves the routes ``bridge.server.routes`` lists (WebSocket
``/twilio``, ``/twiml``, ``GET /health``, ...) until SIGTERM/SIGINT, draining live calls first (a
second signal ends them at once, records written). SIGHUP reads the agents again for new calls.
With ``--workers N`` it runs N server processes sharing the port (SO_REUSEPORT), and starts a new
one in place of one that dies.
"""

from __future__ import annotations

import sys

# Before any import that needs Python 3.11: on an older Python say so in one sentence, not with an
# ImportError's traceback. Python compiles this whole file before running a line of it, so all of
# main.py must stay parseable by old Pythons (no match statement or other 3.10+ syntax; a test
# parses it as Python 3.8).
if sys.version_info < (3, 11):
    print(
        "error: the bridge needs Python 3.11 or newer, and this is Python %d.%d.%d (%s): make the virtual "
        "environment with a newer one, for example python3.11 -m venv .venv." % (sys.version_info[:3] + (sys.executable,)),
        file=sys.stderr,
    )
    sys.exit(2)

import argparse  # noqa: E402 (the version check comes first)
import asyncio
import gc
import logging
import os
import re
import signal
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from dotenv import load_dotenv

from bridge.agents import AgentCatalog, check_functions, load_catalog, retention_warnings
from bridge.binding import BINDING_PARAMETER
from bridge.call_control import outbound_call, place_call
from bridge.settings import E164, ConfigError, Settings, default_of, environment_fields, load_settings
from bridge.logsafe import clean
from bridge.storage.postgres import check_database_url, describe
from bridge.records import make_private_dirs
from bridge.metrics import WorkerShare
from bridge.server import BridgeServer, routes
from bridge.session import rest_client
from bridge.twilio import MODE_PARAMETER
from bridge.twilio_rest import TwilioApiError
from bridge.webhook import public_target
from bridge.workers import METRICS_DIR_VARIABLE, STOP_SIGNALS, claim_port, run_workers, stop_when_parent_dies

HERE = Path(__file__).resolve().parent
DEFAULT_ENV_FILE = HERE / ".env"
logger = logging.getLogger("bridge")


def setting_default(name: str) -> Any:
    """The default the settings table gives the environment variable ``name``."""
    [default] = [default_of(item) for item, setting in environment_fields() if setting.name == name]
    return default


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bridge Twilio phone calls to the Deepgram Voice Agent API.",
        epilog=(
            "commands:\n"
            "  python main.py                  run the bridge (the options above)\n"
            "  python main.py call +1555...    place an outbound call the running bridge takes\n"
            "                                  (python main.py call --help for its options)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", help=f"address to listen on (env HOST, default {setting_default('HOST')})")
    parser.add_argument("--port", type=int, help=f"port to listen on (env PORT, default {setting_default('PORT')})")
    parser.add_argument("--config", type=Path, default=HERE / "config.json", help="the agent (default config.json)")
    parser.add_argument("--env-file", type=Path, default=DEFAULT_ENV_FILE, help="settings file (default .env)")
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port (default 1)")
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def load(args: argparse.Namespace) -> tuple[Settings, AgentCatalog, dict[str, Callable[..., Any]], list[str]]:
    """Everything startup validates; raises ConfigError with one sentence."""
    if args.env_file != DEFAULT_ENV_FILE and not args.env_file.is_file():
        raise ConfigError(f"--env-file {args.env_file} does not exist.")  # .env itself is optional
    load_dotenv(args.env_file, override=False)  # real environment variables win over .env
    settings = load_settings(os.environ, host=args.host, port=args.port)
    if settings.record_calls:
        check_writable_directory(settings.calls_dir)
    if settings.database_url:
        # The driver and the URL's syntax only, no connection now (see docs/scaling.md), since a database
        # that is down must not stop the bridge from starting; calls meanwhile hear it's unavailable.
        check_database_url(settings.database_url)
    try:
        from pharmacy_functions import function_map
    except Exception as exc:  # an error in the user's own functions file
        raise ConfigError(f"pharmacy_functions.py failed to import: {type(exc).__name__}: {exc}.") from None
    agents, warnings = load_agents(args.config, function_map, settings)
    return settings, agents, function_map, warnings


def load_agents(
    config: Path, function_map: dict[str, Callable[..., Any]], settings: Settings
) -> tuple[AgentCatalog, list[str]]:
    """config.json and agents/, checked against the function map: at startup and on SIGHUP.

    Returns the agents and the warnings about them: functions no agent can call, agents that let
    Deepgram keep their calls (``mip_opt_out``).
    """
    agents = load_catalog(config, os.environ, settings.caller_lines)
    return agents, check_functions(agents, function_map, settings) + retention_warnings(agents)


def reload_agents(config: Path, function_map: dict[str, Callable[..., Any]], settings: Settings) -> AgentCatalog:
    """SIGHUP's reload (in a thread of the server's): the warnings are said again for the new files."""
    agents, warnings = load_agents(config, function_map, settings)
    for warning in warnings:
        logger.warning(warning)
    return agents


def risk_warnings(settings: Settings) -> list[str]:
    """Settings that trade safety away, each said in one sentence at startup."""
    warnings = []
    if settings.allow_unbound_call_control and settings.rest_enabled:
        warnings.append(
            "ALLOW_UNBOUND_CALL_CONTROL is on: anyone who can open /twilio with a replayed signature can name "
            "another caller's live call and have the agent transfer, redirect or record it"
        )
    return warnings


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s %(message)s")
    # websockets logs each failed handshake with a traceback at ERROR; ours say it in one line.
    logging.getLogger("websockets").setLevel(max(logging.getLevelName(level), logging.WARNING))


def announce(settings: Settings, workers: int, port: int) -> None:
    """The startup banner: every route that is on, then what to do next.

    Browser-only use (``Settings.browser_only``) gets the phone page's address and nothing about
    Twilio; otherwise the TwiML to paste and what is missing for phone calls.
    """
    where = f"http://{settings.host}:{port}"
    served = ", ".join(f"{path} ({what})" for path, what in routes(settings))
    logger.info("serving on %s%s: %s", where, f" with {workers} workers" if workers > 1 else "", served)
    if settings.browser_only:
        if settings.host not in LOOPBACK_HOSTS:
            logger.warning(
                "/twilio takes unsigned connections: anyone who can reach port %d can talk to the agent "
                "on your Deepgram account without the phone token; set HOST=127.0.0.1 to keep it to this machine",
                port,
            )
    else:
        print("\nPaste this TwiML into a TwiML Bin and attach the Bin to your number's incoming calls:\n")
        print(f"    {settings.twiml}\n", flush=True)
        print(f"Or set the number's voice webhook (A call comes in: Webhook) to {settings.public_base_url}/twiml\n", flush=True)
        if not settings.public_url:
            logger.warning("PUBLIC_URL is not set: replace YOUR-NGROK-HOST above with your ngrok host")
        if not settings.twilio_auth_token:
            logger.warning(
                "TWILIO_AUTH_TOKEN is not set: /twilio takes any WebSocket without a Twilio signature, so anyone "
                "who finds this address can open agent sessions on your Deepgram account and spend its credit%s; "
                "set TWILIO_AUTH_TOKEN and PUBLIC_URL on any public address",
                " (the phone page's token does not prevent it)" if settings.phone_page else "",
            )
        for line in call_control_status(settings):
            logger.info(line)
    if settings.database_url:
        logger.info("DATABASE_URL is set: orders are kept in PostgreSQL at %s", describe(settings.database_url))
    if settings.call_webhook_url:
        logger.info("each call's summary is POSTed, signed, to %s when it ends (docs/webhooks.md)", public_target(settings.call_webhook_url))
    if settings.phone_page:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
        print(f"Browser phone: http://{host}:{port}/phone?token={settings.phone_page_token}\n", flush=True)


def call_control_status(settings: Settings) -> list[str]:
    """One line per call-control feature that is off, saying what turns it on."""
    lines = []
    if not settings.rest_enabled:
        missing = [
            name
            for name, value in (("TWILIO_ACCOUNT_SID", settings.twilio_account_sid), ("TWILIO_AUTH_TOKEN", settings.twilio_auth_token))
            if not value
        ]
        lines.append(
            f"call transfer, the fallback line and outbound calls are off: set {' and '.join(missing)} "
            "to use Twilio's REST API"
        )
        return lines
    if not settings.transfer_number:
        lines.append("call transfer is off: set TRANSFER_NUMBER to let the agent hand callers to a person")
    if not settings.fallback_number:
        lines.append("FALLBACK_NUMBER is not set: if the agent fails, callers hear an apology and the call ends")
    if not settings.outbound_enabled:
        lines.append("outbound calls are off: they need TWILIO_PHONE_NUMBER and PUBLIC_URL")
    return lines


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop  # optional: a faster event loop, used when installed
    except ImportError:
        return asyncio.run(main)
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)


async def serve(
    settings: Settings,
    agents: AgentCatalog,
    function_map: dict[str, Callable[..., Any]],
    *,
    reuse_port: bool,
    announce_startup: bool,
    config: Path | None = None,
    metrics_share: WorkerShare | None = None,
) -> int:
    """Serve until stopped; with ``config`` (config.json's path), SIGHUP reloads the agents."""
    raise_open_file_limit(settings)
    reload = (lambda: reload_agents(config, function_map, settings)) if config is not None else None
    server = BridgeServer(
        settings, agents, function_map, reuse_port=reuse_port, load_agents=reload, metrics_share=metrics_share
    )
    server.handle_signals(EARLY_SIGNALS[0] if EARLY_SIGNALS else None)
    if EARLY_RELOADS:  # the files may have changed after startup read them
        server.request_reload()
    await server.start()
    freeze_startup_objects()
    if announce_startup:
        announce(settings, 1, server.port)
    else:  # a worker: the parent announced before its workers listened; this says each one does
        logger.info("worker (pid %d) listening on port %d", os.getpid(), server.port)
    return await server.serve_until_signalled()


def check_writable_directory(directory: Path) -> None:
    """CALLS_DIR must take files now: finding out on the first call would lose its record.

    What is missing of it is made owner-only (0700), as the records it will hold are.
    """
    try:
        make_private_dirs(directory)
    except OSError as exc:
        raise ConfigError(f"CALLS_DIR {directory} cannot be created: {exc.strerror or exc}.") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"CALLS_DIR {directory} is not writable; fix its permissions or set RECORD_CALLS=false.")


def raise_open_file_limit(settings: Settings) -> None:
    """Use all the file descriptors the system allows, and warn if even that is too few.

    Each call holds two sockets and each connection still in its handshake one; the soft
    limit (often 1024) is usually far below the hard one, and running out refuses every call.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux or macOS
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
            soft = max(soft, wanted)
        except (ValueError, OSError):
            pass
    needed = 2 * settings.max_calls + settings.limits.max_handshakes + 64
    if soft < needed:
        logger.warning(
            "only %d file descriptors are allowed; MAX_CALLS=%d needs about %d: raise the limit (ulimit -n) or lower MAX_CALLS",
            soft,
            settings.max_calls,
            needed,
        )


def freeze_startup_objects() -> None:
    """Hide what startup built (modules, config, the server) from the cyclic garbage collector.

    Those objects (about 25,000) live as long as the process, yet every full collection walks
    them again, and a full collection stops every call at once. With 600 calls up, full
    collections measured 84-133 ms before and 76-100 ms after. Startup's own garbage is collected
    first, so nothing collectable is frozen with it.
    """
    gc.collect()
    gc.freeze()


# A signal that arrives while we are still starting (a worker stopped right after its launch)
# is remembered here and replayed once the server's own handlers are in place.
EARLY_SIGNALS: list[int] = []
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


# The same for SIGHUP, whose default action would end the process: the reload happens once serving.
EARLY_RELOADS: list[int] = []


def remember_signal(signum: int, _frame: object) -> None:
    EARLY_SIGNALS.append(signum)


def remember_reload(signum: int, _frame: object) -> None:
    EARLY_RELOADS.append(signum)


def parse_call_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="main.py call",
        description="Place an outbound call from TWILIO_PHONE_NUMBER; the running bridge takes it.",
    )
    parser.add_argument("to", help="the number to call, in E.164 form like +15551234567")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a <Parameter> for the call (repeatable), e.g. --param reason=refill_ready",
    )
    parser.add_argument("--env-file", type=Path, default=DEFAULT_ENV_FILE, help="settings file (default .env)")
    args = parser.parse_args(argv)
    parameters: dict[str, str] = {}
    for item in args.param:
        name, separator, value = item.partition("=")
        if not separator or not name.strip():
            parser.error(f"--param must look like name=value, got {item!r}")
        parameters[name.strip()] = value
    args.parameters = parameters
    return args


def place_outbound_call(argv: Sequence[str]) -> int:
    """``python main.py call +15551234567 [--param name=value ...]``: print the Call SID and exit."""
    args = parse_call_args(argv)
    try:
        if args.env_file != DEFAULT_ENV_FILE and not args.env_file.is_file():
            raise ConfigError(f"--env-file {args.env_file} does not exist.")
        load_dotenv(args.env_file, override=False)
        settings = load_settings(os.environ)
        to = normalise_number(args.to)
        if not settings.outbound_enabled:
            raise ConfigError(
                "outbound calls need TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_PHONE_NUMBER and PUBLIC_URL in .env."
            )
        for reserved in (MODE_PARAMETER, BINDING_PARAMETER):
            if reserved in args.parameters:
                raise ConfigError(f"--param {reserved} is the bridge's own; pick another name.")
        try:
            outbound_call(settings, args.parameters)  # what Twilio would refuse is said now, not after a request
        except ValueError as exc:
            raise ConfigError(f"{exc}.") from None
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    # The REST client logs a failure as a WARNING, for a server's log; here the "error:" line
    # below says it, and once is enough. Its DEBUG lines (each attempt) still show.
    logging.getLogger("bridge.twilio_rest").addFilter(lambda record: record.levelno != logging.WARNING)
    rest = rest_client(settings)
    assert rest is not None

    async def call() -> str:
        try:
            return await place_call(settings, rest, to, args.parameters)
        finally:
            await rest.close()

    try:
        sid = asyncio.run(call())
    except TwilioApiError as exc:
        print(f"error: {outbound_failure(exc, settings.twilio_api_url)}", file=sys.stderr)
        return 1
    print(sid)
    return 0


def outbound_failure(exc: TwilioApiError, api_url: str) -> str:
    """One sentence for a call that failed: never reached Twilio, refused, or perhaps placed after all."""
    detail = clean(exc.message, 300)
    if not exc.sent:
        return f"could not reach Twilio's API at {api_url} ({detail}); no call was placed."
    answer = "no answer" if exc.status is None else f"HTTP {exc.status}"
    if exc.code is not None:
        answer += f", Twilio error {exc.code}"
    if exc.may_have_acted:
        return (
            f"Twilio's answer could not be used ({answer}: {detail}), but the call may have been placed: "
            "check the call log in the Twilio console before trying again."
        )
    hint = "; check TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN" if exc.status == 401 else ""
    return f"Twilio refused the call ({answer}: {detail}){hint}."


def normalise_number(raw: str) -> str:
    number = re.sub(r"[\s().-]", "", raw)
    if not E164.fullmatch(number):
        raise ConfigError(f"the number to call must be in E.164 form like +15551234567, got {raw!r}.")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["call"]:
        return place_outbound_call(argv[1:])
    args = parse_args(argv)
    try:
        settings, agents, function_map, warnings = load(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.worker_index is not None or args.workers == 1:
        signal.signal(signal.SIGTERM, remember_signal)
        signal.signal(signal.SIGINT, remember_signal)
        signal.signal(signal.SIGHUP, remember_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS | {signal.SIGHUP})
    configure_logging(settings.log_level)
    for warning in (*settings.deprecations, *warnings, *risk_warnings(settings)):
        logger.warning(warning)
    if args.worker_index is None:  # the workers' parent said it already
        for line in agents.describe():
            logger.info(line)
    if args.workers > 1 and args.worker_index is None:
        for wanted in (settings.port, settings.metrics_port):
            if wanted is None:
                continue
            try:
                claimed = claim_port(settings.host, wanted)
            except OSError as exc:
                print(f"error: cannot listen on {settings.host}:{wanted}: {exc.strerror or exc}.", file=sys.stderr)
                return 2
            if wanted == settings.port:
                port = claimed
        announce(settings, args.workers, port)
        return run_workers(Path(__file__).resolve(), [*argv, "--port", str(port)], args.workers, settings.phone_page_token)
    worker = args.worker_index is not None
    if worker and args.parent_pid is not None:
        stop_when_parent_dies(args.parent_pid)
    metrics_dir = os.environ.get(METRICS_DIR_VARIABLE) if worker else None
    metrics_share = WorkerShare(Path(metrics_dir), str(args.worker_index)) if metrics_dir else None
    try:
        return run_loop(
            serve(
                settings,
                agents,
                function_map,
                reuse_port=worker,
                announce_startup=not worker,
                config=args.config,
                metrics_share=metrics_share,
            )
        )
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
