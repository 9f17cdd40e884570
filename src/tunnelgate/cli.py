"""The command line: ``tunnelgate gateway|agent|doctor|status|check-config|token|demo``.

The flags of ``gateway`` and ``agent`` are a contract other tools rely on: keep them stable.
Exit codes: 0 after a clean stop (SIGTERM or Ctrl-C), 1 when the agent is refused (wrong token
or gateway certificate) or the gateway cannot listen, or ``status`` cannot read the admin API,
or a ``doctor`` check failed, 2 for bad flags or configuration. The only module that
configures logging, and the only place errors become exit codes.

Each command imports what it runs inside its own function: ``--version`` is answered
before the parser is built, a gateway never loads the agent, nor an agent the gateway,
and neither loads the admin listener, the doctor or the status client unless asked to.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from tunnelgate import __version__

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
    from typing import Any

    from tunnelgate.config import AgentConfig, GatewayConfig, LogConfig
    from tunnelgate.gateway.gateway import Gateway, GatewayView, Worker
    from tunnelgate.gateway.leases import WorkerLeases
    from tunnelgate.gateway.supervisor import Supervisor, WorkerSetup

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_FORCED = 130  # a second signal: stopped without draining
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's own initial value, kept
DEFAULT_ADMIN_URL = "http://127.0.0.1:9090/"


def _parser() -> argparse.ArgumentParser:
    from tunnelgate.config import ADMIN_TOKEN_ENV, AGENT, DOCTOR_SECONDS, GATEWAY, TOKEN_ENV
    from tunnelgate.protocol.wire import MAX_MEASURE_SECONDS

    parser = argparse.ArgumentParser(
        prog="tunnelgate",
        description="A reverse TCP tunnel: expose services in a private network "
        "through a public gateway, encrypted and authenticated by default.",
    )
    parser.add_argument("--version", action="version", version=f"tunnelgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_flags(commands.add_parser("gateway", help="run the public side"), GATEWAY, _run_gateway)
    _add_flags(commands.add_parser("agent", help="run the private side"), AGENT, _run_agent)
    doctor_command = commands.add_parser(
        "doctor",
        help="check an agent's configuration end to end (the agent's flags or --config): "
        "gateway, TLS, token, local services, then the tunnel's round trip and throughput",
    )
    _add_flags(doctor_command, AGENT, _run_doctor)
    doctor_command.add_argument(
        "--seconds", type=float, metavar="N", default=DOCTOR_SECONDS,
        help=f"measure the throughput for N seconds each way (default {DOCTOR_SECONDS:g},"
        f" at most {MAX_MEASURE_SECONDS:g})",
    )  # fmt: skip
    status = commands.add_parser(
        "status",
        help="show a running gateway's agents, services and connections, or an agent's "
        "sessions and services, from its admin listener",
    )
    status.add_argument(
        "--admin", metavar="URL", default=DEFAULT_ADMIN_URL,
        help=f"the admin listener (default {DEFAULT_ADMIN_URL})",
    )  # fmt: skip
    status.add_argument(
        "--admin-token-file", metavar="FILE",
        help=f"the admin listener's token (or ${ADMIN_TOKEN_ENV})",
    )  # fmt: skip
    status.set_defaults(run=_run_status)
    check = commands.add_parser("check-config", help="validate a gateway or agent TOML file")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_run_check)
    token = commands.add_parser(
        "token",
        help="print a new random token (with --name, also its hash for the gateway's config)",
    )
    token.add_argument(
        "--name", type=_name_arg,
        help="the agent's name: print the [[agents]] lines with the token's hash for it",
    )  # fmt: skip
    token.add_argument(
        "--token-file", metavar="FILE",
        help=f"hash this token instead of making a new one (or ${TOKEN_ENV})",
    )  # fmt: skip
    token.set_defaults(run=_run_token)
    demo_command = commands.add_parser("demo", help="gateway, agent and a web service on loopback")
    demo_command.set_defaults(run=_run_demo)
    return parser


def _add_flags(parser: argparse.ArgumentParser, side: str, run: Callable[..., int]) -> None:
    """``--config`` and a flag for each of the side's options that has one."""
    from tunnelgate.config import options

    parser.set_defaults(run=run)
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file; flags override it")
    for o in options(side).values():
        if o.flag and o.kind is bool:  # --no-tls sets False, --require-all-gateways True
            parser.add_argument(
                o.flag, dest=o.key, action="store_const", const=not o.default, default=None,
                help=o.help,
            )  # fmt: skip
        elif o.flag:
            parser.add_argument(
                o.flag, dest=o.key, action="append" if o.kind is list or o.repeats else "store",
                type=o.kind if o.kind in (int, float) else str, choices=o.choices,
                metavar=o.metavar, help=o.help,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tunnelgate`` command; returns the exit code."""
    if (sys.argv[1:] if argv is None else argv) == ["--version"]:
        print(f"tunnelgate {__version__}")  # without the parser, which loads every command
        return EXIT_OK
    from tunnelgate.config import AGENT, GATEWAY
    from tunnelgate.errors import (
        AuthenticationError,
        ConfigError,
        RemoteProtocolError,
        TransportError,
    )

    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.argv = argv  # a gateway's supervisor starts its workers with the same arguments
    try:
        return int(args.run(args))
    except ConfigError as exc:
        # Logging is not set up yet (its settings are part of the bad config).
        print(f"tunnelgate {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (AuthenticationError, TransportError, RemoteProtocolError) as exc:
        if args.command in (GATEWAY, AGENT):
            logger.error("%s", exc)  # in the configured format, text or JSON
        else:
            print(f"tunnelgate {args.command}: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def _raise_fd_limit() -> None:
    """Lift the soft limit on open files (often 1024) to the hard one: relays hold many."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logger.debug("open files limit: %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def _unmap_large_blocks() -> None:
    """Keep glibc's threshold for serving an allocation with its own mapping at its
    initial 128 KiB. By default it rises to the largest block freed so far: after the
    first token derivation (scrypt, 16 MiB), every later one would be carved from a
    heap and stay resident once freed, 16 MiB per thread that derived one."""
    import ctypes  # here: the short commands never need it

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):  # not glibc (musl's mallopt accepts and ignores it)
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def _run(
    main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
    *,
    fast_loop: bool = True,
    on_force: Callable[[], None] | None = None,
) -> int:
    """Run ``main(stop)`` until it returns, on uvloop if installed and ``fast_loop``. The first
    SIGTERM/SIGINT sets ``stop`` (``main`` then drains and returns: exit 0); a second one calls
    ``on_force`` and exits at once."""
    import asyncio
    import signal

    _raise_fd_limit()
    _unmap_large_blocks()

    async def guarded() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(name: str) -> None:
            if stop.is_set():
                if on_force is not None:
                    on_force()
                logger.warning("%s received again; exiting now", name)
                logging.shutdown()
                os._exit(EXIT_FORCED)
            logger.info("%s received; stopping (again to force)", name)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        loop.set_exception_handler(_on_loop_error)
        await main(stop)
        return EXIT_OK

    if fast_loop and os.environ.get("TUNNELGATE_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass  # outside the handler, so that no later error chains to this one
        else:
            return uvloop.run(guarded())
    return asyncio.run(guarded())


def _on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Report a connection that failed while the loop set it up (an asyncio-served port, such
    as the admin API over HTTPS, meeting plain HTTP or a failed handshake) as one line, not a
    traceback; anything else goes to the loop's default handler."""
    error = context.get("exception")
    if isinstance(error, OSError) and "incoming connection" in context.get("message", ""):
        logger.warning("an incoming connection failed before it was set up: %s", error)
        return
    loop.default_exception_handler(context)


def _start_logging(args: argparse.Namespace, log: LogConfig, worker: int | None = None) -> None:
    from tunnelgate import logs
    from tunnelgate.config import TOKEN_ENV

    logs.configure(log.level, log.format, context=None if worker is None else {"worker": worker})
    if args.token:
        logger.warning(
            "the token was given on the command line, where other local users can see it; "
            "prefer --token-file or %s",
            TOKEN_ENV,
        )


async def _until_stopped(stop: asyncio.Event, work: Awaitable[None]) -> None:
    """Wait until ``work`` ends (its error propagates) or ``stop`` is set."""
    import asyncio

    working = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not working.done():
            working.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await working
    if not working.cancelled():
        working.result()


def _run_gateway(args: argparse.Namespace) -> int:
    from tunnelgate import systemd
    from tunnelgate.config import (
        GATEWAY,
        WORKER_ENV,
        load_gateway_config,
        options,
    )
    from tunnelgate.gateway.gateway import Gateway, self_signed_identity, with_stored_token

    flags = {key: getattr(args, key, None) for key in options(GATEWAY)}
    config, log = load_gateway_config(args.config, flags)
    setup: WorkerSetup | None = None  # unless a supervisor started this process
    if os.environ.get(WORKER_ENV):
        from tunnelgate.gateway.supervisor import WorkerSetup

        setup = WorkerSetup.from_environment()
    if setup is None and (own := self_signed_identity(config)) is not None:
        _make_identity_apart(*own)  # a worker's supervisor made it already

    def load() -> GatewayConfig:  # again, on SIGHUP and from the admin API
        fresh, log = load_gateway_config(args.config, flags)
        logging.getLogger("tunnelgate").setLevel(log.level.upper())  # at once
        return with_stored_token(fresh)[0]

    if setup is None and config.workers > 1:
        _start_logging(args, log)
        return _run_supervisor(config, args.argv, load)
    _start_logging(args, log, None if setup is None else setup.index)

    async def main(stop: asyncio.Event) -> None:
        async with (
            _worker(setup) as (worker, leases),
            systemd.Notifier.from_environment() as notifier,  # a worker's is off
            Gateway(config, worker=worker) as gateway,
        ):

            async def apply(fresh: GatewayConfig) -> str:
                await gateway.reload(fresh)
                return "reloaded"

            # A worker's supervisor runs the alerts and the admin listener, for the whole gateway.
            reload = gateway.reloader = _reloader(load, apply, None if setup else config)
            async with (
                _reporting(setup, gateway, reload),
                contextlib.AsyncExitStack() as alerts,
                contextlib.AsyncExitStack() as admin,
            ):
                url = None if setup else await _open_monitoring(alerts, admin, gateway, reload)
                if leases is None:
                    _print_banner(gateway, url)
                else:
                    leases.ready()
                notifier.ready(f"listening on {gateway.address}")
                with _reloading_on_hangup(reload):
                    await _until_stopped(stop, _serve_gateway(gateway, leases))
                notifier.stopping("stopping: draining open connections")
                await alerts.aclose()  # agents leaving a stopping gateway are not news
                await gateway.shutdown()

    return _run(main)


def _reloader(
    load: Callable[[], GatewayConfig],
    apply: Callable[[GatewayConfig], Awaitable[str]],
    alerting: GatewayConfig | None,
) -> Callable[[], Awaitable[str]]:
    """What reads the configuration again and ``apply``-s it (on SIGHUP and from the admin
    API), answering what came of it; a bad file changes nothing. ``alerting``: the
    configuration whose alerts this process sends, if it sends any."""

    async def reload() -> str:
        from tunnelgate.errors import ConfigError

        logger.info("reloading the configuration")
        try:
            fresh = load()
            said = await apply(fresh)
        except ConfigError as exc:
            logger.error("configuration not reloaded; the running one stays: %s", exc)
            return f"not reloaded, the running configuration stays: {exc}"
        if alerting is not None and fresh.alerts and not alerting.alerts:
            logger.warning("reload: [[alerts]] added; restart the gateway to send them")
        return said

    return reload


@contextlib.contextmanager
def _reloading_on_hangup(reload: Callable[[], Awaitable[str]]) -> Iterator[None]:
    """SIGHUP reloads meanwhile (each reload in a task of its own, kept until it ends)."""
    import asyncio
    import signal

    reloads: set[asyncio.Future[str]] = set()

    def on_hangup() -> None:
        task = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


@contextlib.asynccontextmanager
async def _worker(
    setup: WorkerSetup | None,
) -> AsyncIterator[tuple[Worker, WorkerLeases] | tuple[None, None]]:
    """A worker's listeners and leases, handed down by its supervisor; (None, None) else."""
    if setup is None:
        yield None, None
        return
    from tunnelgate.gateway.supervisor import open_worker

    async with open_worker(setup) as opened:
        yield opened


@contextlib.asynccontextmanager
async def _reporting(
    setup: WorkerSetup | None, gateway: Gateway, reload: Callable[[], Awaitable[str]]
) -> AsyncIterator[None]:
    """A worker answers its supervisor about ``gateway`` meanwhile; nothing else does."""
    if setup is None:
        yield
        return
    from tunnelgate.gateway.supervisor import reporting

    async with reporting(setup, gateway, reload):
        yield


async def _open_monitoring(
    alerts: contextlib.AsyncExitStack,
    admin: contextlib.AsyncExitStack,
    gateway: GatewayView,
    reload: Callable[[], Awaitable[str]],
) -> str | None:
    """The gateway's ``[[alerts]]`` and admin listener, as configured (each closed with its
    stack: the alerts before the drain, the admin listener after it): the admin URL, if any."""
    config = gateway.config
    sender = await _open_alerts(alerts, gateway) if config.alerts else None
    if config.admin is None:
        return None
    from tunnelgate.admin.history import FILE_NAME
    from tunnelgate.admin.sites import GatewaySite
    from tunnelgate.config import default_state_dir

    history = (config.state_dir or default_state_dir()) / FILE_NAME
    site = GatewaySite(gateway, reload, history, sender)
    return await _open_admin(admin, site, config, gateway.identity)


async def _serve_gateway(gateway: Gateway, leases: WorkerLeases | None) -> None:
    """Until the gateway stops, or a worker's supervisor says stop or is gone."""
    import asyncio

    if leases is None:
        await gateway.serve_forever()
        return
    serving = asyncio.ensure_future(gateway.serve_forever())
    told = asyncio.ensure_future(leases.wait_stop())
    try:
        await asyncio.wait({serving, told}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()  # the gateway goes on: serve_forever only waits
        told.cancel()
    if told.done() and not told.cancelled():
        logger.info("%s; stopping", told.result())
    elif not serving.cancelled():
        serving.result()


def _run_supervisor(
    config: GatewayConfig, argv: list[str], load: Callable[[], GatewayConfig]
) -> int:
    """A gateway of several workers: the supervisor runs the same command once per worker,
    and the admin listener and alerts for them all. ``load`` reads the configuration again."""
    from tunnelgate import systemd
    from tunnelgate.gateway.supervisor import Supervisor

    supervisor = Supervisor(config, [sys.executable, "-m", "tunnelgate", *argv])
    reload = _reloader(load, supervisor.reload, config)

    async def main(stop: asyncio.Event) -> None:
        async with (
            systemd.Notifier.from_environment() as notifier,
            contextlib.AsyncExitStack() as admin,
            contextlib.AsyncExitStack() as alerts,
        ):
            try:
                await supervisor.start()
                url = await _open_monitoring(alerts, admin, supervisor, reload)
                own = ", ".join(supervisor.addresses)
                workers = (
                    f"workers: {supervisor.count}  (their own control ports, for agents: {own})"
                )
                _print_banner(supervisor, url, workers)
                notifier.ready(f"listening on {supervisor.address}, {supervisor.count} workers")
                with _reloading_on_hangup(reload):
                    await _until_stopped(stop, supervisor.serve_forever())
                notifier.stopping("stopping: the workers drain their connections")
                await alerts.aclose()
                await supervisor.shutdown()
            finally:
                await supervisor.aclose()

    # The stock loop: the supervisor carries no traffic, and waits on its child processes.
    return _run(main, fast_loop=False, on_force=supervisor.kill)


def _make_identity_apart(state_dir: Path, hostnames: list[str]) -> None:
    """On a first start, make the gateway's self-signed identity in a child process: the
    cryptography package it takes (about 9 MiB) then never loads into the gateway, which
    may run for months. Without fork, or if the child fails, the gateway makes it itself
    (and reports what went wrong). The process has one thread here: no event loop yet."""
    from tunnelgate import tls

    if (state_dir / tls.CERT_FILE).exists() and (state_dir / tls.KEY_FILE).exists():
        return
    if not hasattr(os, "fork"):
        return
    pid = os.fork()
    if pid == 0:  # the child: make it and leave, running nothing of the parent's
        made = False
        try:
            tls.ensure_self_signed(state_dir, hostnames)
            made = True
        finally:
            os._exit(0 if made else 1)
    os.waitpid(pid, 0)


async def _open_admin(
    stack: contextlib.AsyncExitStack,
    site: Any,
    config: GatewayConfig | AgentConfig,
    identity: tuple[Path, Path] | None = None,
) -> str:
    """Start the admin listener (closed with ``stack``); its URL. Imported only here:
    a process without ``--admin`` never loads aiohttp or prometheus-client. HTTPS with
    ``admin_cert``, else with ``identity`` (the gateway's own) if ``admin_tls``."""
    from tunnelgate import tls
    from tunnelgate.admin.server import AdminServer

    assert config.admin is not None
    if config.admin_cert is not None and config.admin_key is not None:
        identity = (config.admin_cert, config.admin_key)
    context = tls.admin_context(*identity) if config.admin_tls and identity else None
    token = config.admin_token.decode() if config.admin_token is not None else None
    server = AdminServer(site, config.admin, token, context)
    await server.start()
    stack.push_async_callback(server.close)
    return server.url


async def _open_alerts(stack: contextlib.AsyncExitStack, gateway: GatewayView) -> Any:
    """Start sending the gateway's ``[[alerts]]`` (stopped with ``stack``). Imported only
    here: a gateway without them never loads the module, with or without ``--admin``."""
    from tunnelgate.admin.alerts import Alerts

    return await stack.enter_async_context(Alerts(gateway))


def _print_banner(
    gateway: Gateway | Supervisor, admin: str | None, workers: str | None = None
) -> None:
    """What an operator needs to start an agent; the token only if it is the stored one."""
    import socket

    from tunnelgate.address import format_address
    from tunnelgate.config import TOKEN_ENV

    assert gateway.address is not None
    host = gateway.config.listen.host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    lines = [f"tunnelgate gateway {__version__} listening on {gateway.address}"]
    command = f"tunnelgate agent --gateway {format_address(host, gateway.address.port)}"
    if (stored := gateway.stored_token) is not None:
        token = gateway.config.agents[0].token.decode()
        lines.append(f"token: {token}  (stored in {stored})")
        command = f"{TOKEN_ENV}={token} {command}"
    else:
        command += " --token-file FILE"
    if gateway.fingerprint:
        lines.append(f"certificate fingerprint: {gateway.fingerprint}")
        command += f" --fingerprint {gateway.fingerprint}"
    else:
        lines.append("TLS is OFF: traffic between agent and gateway is not encrypted")
        command += " --no-tls"
    command += " --expose 3920:localhost:80"
    lines += ["run an agent with:", f"  {command}"]
    if admin is not None:
        lines.append(f"admin: {admin}  (dashboard; metrics at {admin}metrics)")
    if workers is not None:
        lines.insert(1, workers)
    print("\n".join(lines), flush=True)


def _run_agent(args: argparse.Namespace) -> int:
    from tunnelgate import systemd
    from tunnelgate.agent import Agent
    from tunnelgate.config import AGENT, load_agent_config, options

    flags = {key: getattr(args, key, None) for key in options(AGENT)}
    config, log = load_agent_config(args.config, flags)
    _start_logging(args, log)

    async def main(stop: asyncio.Event) -> None:
        async with (
            systemd.Notifier.from_environment() as notifier,
            Agent(config) as agent,
            contextlib.AsyncExitStack() as admin,
        ):
            if config.admin is not None:
                from tunnelgate.admin.sites import AgentSite

                await _open_admin(admin, AgentSite(agent), config)

            async def registered() -> str:  # the first time only: READY=1 is sent once
                services = await agent.wait_ready()
                through = ", ".join(str(g.address) for g in config.gateways)
                return f"{len(services)} service(s) exposed through {through}"

            notifier.ready_after(registered)
            await _until_stopped(stop, agent.run_until_stopped())
            notifier.stopping("stopping: draining open connections")
            await agent.shutdown()

    return _run(main)


def _run_doctor(args: argparse.Namespace) -> int:
    """The agent's checks, one line each; exit 0 if none failed, 1 otherwise."""
    from tunnelgate import doctor
    from tunnelgate.config import AGENT, load_agent_config, options
    from tunnelgate.errors import ConfigError, ConfigProblem
    from tunnelgate.protocol.wire import MAX_MEASURE_SECONDS

    flags = {key: getattr(args, key, None) for key in options(AGENT)}
    config, log = load_agent_config(args.config, flags)
    if not 0 < args.seconds <= MAX_MEASURE_SECONDS:
        problem = f"must be more than 0 and at most {MAX_MEASURE_SECONDS:g}"
        raise ConfigError([ConfigProblem("command line", "--seconds", problem)])
    _start_logging(args, log)
    passed: list[bool] = []

    def report(check: doctor.Check) -> None:
        print(check, flush=True)

    async def main(stop: asyncio.Event) -> None:
        async def checks() -> None:
            passed.append(await doctor.run(config, args.seconds, report))

        await _until_stopped(stop, checks())

    _run(main)
    if not passed:
        print("interrupted", file=sys.stderr)
    return EXIT_OK if passed and passed[0] else EXIT_REFUSED


def _name_arg(text: str) -> str:
    from tunnelgate.address import parse_name

    try:
        return parse_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_token(args: argparse.Namespace) -> int:
    """A new token (or the given one) and, with --name, the gateway's config lines with its hash."""
    from tunnelgate import credentials
    from tunnelgate.config import read_token
    from tunnelgate.errors import ConfigError, ConfigProblem

    if args.token_file and not args.name:
        raise ConfigError([ConfigProblem("command line", "--name", "needed to hash a token")])
    if args.name and (given := read_token(args.token_file)) is not None:
        token = given.decode()
    else:
        token = credentials.generate_token()
        print(token)
    if not args.name:
        print(
            "(add --name AGENT to also print the lines for the gateway's config, which "
            "hold only the token's hash)",
            file=sys.stderr,
        )
        return EXIT_OK
    stored_key = credentials.derive(token.encode(), args.name).stored_key
    print(f"# for the gateway's config; the hash is valid for agent {args.name!r} only")
    print("[[agents]]")
    print(f'name = "{args.name}"')
    print(f'token_hash = "{credentials.hash_line(stored_key)}"')
    return EXIT_OK


def _run_status(args: argparse.Namespace) -> int:
    """The tables of a running side, read from its admin API. Imported only here: the
    gateway and the agent never load the HTTP client."""
    import time

    from tunnelgate import status
    from tunnelgate.config import read_admin_token
    from tunnelgate.errors import ConfigError, ConfigProblem

    try:
        base = status.admin_url(args.admin)
    except ValueError as exc:
        raise ConfigError([ConfigProblem("command line", "--admin", str(exc))]) from None
    token = read_admin_token(args.admin_token_file)
    info, views = status.read_views(base, token.decode() if token is not None else None)
    print(status.render(info, views, time.time()))
    return EXIT_OK


def _run_check(args: argparse.Namespace) -> int:
    import tomllib

    from tunnelgate.config import load_agent_config, load_gateway_config

    path: Path = args.file
    try:
        is_agent = "gateway" in tomllib.loads(path.read_bytes().decode())
    except (OSError, ValueError):  # not TOML, not UTF-8: the loader says so precisely
        is_agent = False
    if is_agent:
        agent_config, _ = load_agent_config(path)
        print(f"{path}: ok (agent config, {len(agent_config.services)} service(s))")
    else:
        gateway_config, _ = load_gateway_config(path)
        print(f"{path}: ok (gateway config, {len(gateway_config.agents)} agent policy(ies))")
    return EXIT_OK


def _run_demo(args: argparse.Namespace) -> int:
    from tunnelgate import demo, logs

    logs.configure("info", "text")
    with contextlib.suppress(KeyboardInterrupt):
        return _run(lambda stop: _until_stopped(stop, demo.run()))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
