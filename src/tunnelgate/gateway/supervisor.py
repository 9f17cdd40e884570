"""A gateway of several worker processes (``--workers N``). Must not import agent.

The :class:`Supervisor` opens the control port and one control port of each worker's own, then
starts the workers: the same ``tunnelgate gateway`` command again, told by :data:`WORKER_ENV`
which of the descriptors it inherits are its own (:class:`WorkerSetup`). Every worker accepts
agents on the shared control port and on its own; an agent's data channels come to the worker
of their session at its own port, announced in ``Welcome``. Public ports are shared between
workers with ``SO_REUSEPORT``, leased per agent by the supervisor (``gateway.leases``), so any
worker serves any client of an agent alone: the supervisor never carries a byte.

It forwards a reload (SIGHUP) to the workers and tells them to stop (a message on their channel,
so that a SIGTERM they get from elsewhere too, as systemd sends one to every process of a
service, is not a second signal that stops them undrained), restarts a worker that died (after
a backoff, logged; its leases are forgotten), and returns once every worker has drained.
The supervisor keeps every listening socket open, so a restarted worker serves the same own
port, and an agent reconnecting meanwhile waits in its backlog rather than being refused.

Why a new process running the command again (``subprocess`` with ``pass_fds``) rather than
``multiprocessing``: a worker is then an ordinary gateway process reading the same flags and
file, with no configuration to pickle, no multiprocessing machinery (resource tracker, spawn's
re-import of ``__main__``) in a long-lived server, and ``ps`` shows what it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from tunnelgate import errors, tls
from tunnelgate.address import Address
from tunnelgate.backoff import backoff
from tunnelgate.config import WORKER_ENV, GatewayConfig
from tunnelgate.gateway.combined import MAX_REPORT_SIZE, MAX_REQUEST_SIZE, Reporter, Workers
from tunnelgate.gateway.fleet import Fleet
from tunnelgate.gateway.forwarding import Forwarder
from tunnelgate.gateway.gateway import (
    RESTART_ONLY,
    Gateway,
    GatewayStatistics,
    Worker,
    identity_files,
    with_stored_token,
)
from tunnelgate.gateway.leases import (
    MAX_LINE_SIZE,
    LeaseChannel,
    LeaseTable,
    WorkerLeases,
    serve_leases,
)
from tunnelgate.stats import EventLog
from tunnelgate.transport import Listener, ProcessChannel, inherited_listener, open_listener

logger = logging.getLogger(__package__)

# The supervisor's own business, not its workers' (systemd hears from the supervisor alone).
NOT_INHERITED: Final = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
RESTART_MIN: Final = 0.5  # seconds before restarting a worker that died: full jitter, doubling
RESTART_MAX: Final = 30.0
STOP_MARGIN: Final = 5.0  # a stopping worker still running this long past drain_timeout is killed


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """What :data:`WORKER_ENV` tells a worker: its index, the descriptors it inherited (the
    shared control port, its own control port, its channels to the supervisor: leases, and
    reports), and every worker's own control address."""

    index: int
    control: int
    own: int
    channel: int
    reports: int
    addresses: tuple[str, ...]

    def encode(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> WorkerSetup | None:
        """This process's setup if a supervisor started it, else None."""
        if (text := environ.get(WORKER_ENV)) is None:
            return None
        try:
            fields = json.loads(text)
            setup = cls(
                int(fields["index"]),
                int(fields["control"]),
                int(fields["own"]),
                int(fields["channel"]),
                int(fields["reports"]),
                tuple(str(a) for a in fields["addresses"]),
            )
            if not 0 <= setup.index < len(setup.addresses):
                raise ValueError(f"index {setup.index} of {len(setup.addresses)} workers")
        except (ValueError, TypeError, KeyError) as exc:  # only a supervisor sets it
            problem = f"not set by a tunnelgate supervisor ({exc!r})"
            problems = [errors.ConfigProblem("environment", WORKER_ENV, problem)]
            raise errors.ConfigError(problems) from None
        return setup


@contextlib.asynccontextmanager
async def open_worker(setup: WorkerSetup) -> AsyncIterator[tuple[Worker, WorkerLeases]]:
    """This worker's listeners and its leases, from the descriptors its supervisor handed down;
    :meth:`WorkerLeases.wait_stop` returns when the supervisor says stop, or goes away."""
    control = inherited_listener(setup.control)
    own = inherited_listener(setup.own)
    try:
        channel = ProcessChannel.inherited(setup.channel)
        reader, writer = await channel.open_streams(MAX_LINE_SIZE)
        async with WorkerLeases(reader, writer) as leases:
            yield Worker(setup.index, control, own, setup.addresses, leases), leases
    finally:
        control.close()
        own.close()


@contextlib.asynccontextmanager
async def reporting(
    setup: WorkerSetup, gateway: Gateway, reload: Callable[[], Awaitable[str]]
) -> AsyncIterator[None]:
    """Answer the supervisor's requests about ``gateway`` meanwhile (:class:`Reporter`)."""
    reader, writer = await ProcessChannel.inherited(setup.reports).open_streams(MAX_REQUEST_SIZE)
    task = asyncio.create_task(Reporter(gateway, reload, reader, writer).run(), name="reports")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _first(failure: BaseException) -> BaseException:
    """The first exception of nested task groups'."""
    while isinstance(failure, BaseExceptionGroup):
        failure = failure.exceptions[0]
    return failure


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Starts ``config.workers`` workers running ``command`` and keeps them running: use
    :meth:`start`, then :meth:`serve_forever`, :meth:`reload`, :meth:`shutdown`. It is the
    gateway the admin API and the alerts see (a :class:`GatewayView`): its workers combined."""

    def __init__(self, config: GatewayConfig, command: Sequence[str]) -> None:
        self.config = config
        self.command = list(command)
        self.count = config.workers
        self.address: Address | None = None  # the control port, shared by the workers
        self.addresses: tuple[str, ...] = ()  # each worker's own control port
        self.fingerprint: str | None = None
        self.fleet: Fleet | None = None  # a gateway of workers joins no fleet (yet)
        self.forwarder: Forwarder | None = None
        self.stored_token: Path | None = None  # the state directory's token, if it is the one
        self.table = LeaseTable()
        self.workers = Workers(self.count, config.tls)
        self._control: Listener | None = None
        self._own: list[Listener] = []
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._channels: dict[int, LeaseChannel] = {}  # to each worker running
        self._ready = [asyncio.Event() for _ in range(self.count)]
        self._serving = False  # every worker was ready once: a death is restarted from now on
        self._stop = asyncio.Event()
        self._main: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """The identity and the listeners, then the workers; returns once each serves. Raises
        TransportError if a listener cannot be opened or a worker exits before it serves."""
        # First, so that the workers read the token and identity rather than race to make them.
        self.config, self.stored_token = with_stored_token(self.config)
        config = self.config
        if config.tls:
            cert, _, _ = identity_files(config)
            self.fingerprint = tls.certificate_fingerprint(cert)
        listen, base = config.listen, config.worker_ports
        try:
            self._control = open_listener(listen.host, listen.port)
            for index in range(self.count):
                self._own.append(open_listener(listen.host, base + index if base else 0))
        except BaseException:
            self._close_listeners()
            raise
        self.address = self.workers.address = self._control.address
        self.addresses = tuple(str(listener.address) for listener in self._own)
        self._main = asyncio.create_task(self._run(), name="supervisor")
        all_ready: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(event.wait() for event in self._ready))
        )
        try:
            waits: set[asyncio.Future[Any]] = {all_ready, self._main}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            all_ready.cancel()
        if not all(event.is_set() for event in self._ready):
            await self.aclose()  # raises the worker's failure, if that was it
            raise errors.TransportError("the workers stopped before they served")
        self._serving = True
        logger.info(
            "gateway listening on %s (%s) with %d workers",
            self.address,
            "TLS" if config.tls else "no TLS",
            self.count,
        )

    async def serve_forever(self) -> None:
        """Wait while the workers run; a cancelled wait leaves them running (for shutdown).
        Raises what stopped the supervisor, if something did."""
        assert self._main is not None, "start() first"
        try:
            await asyncio.shield(self._main)
        except BaseExceptionGroup as caught:  # the task groups'
            raise _first(caught) from None

    @property
    def identity(self) -> tuple[Path, Path] | None:
        """The certificate and key files of the control port's TLS."""
        if not self.config.tls:
            return None
        cert, key, _ = identity_files(self.config)
        return cert, key

    @property
    def events(self) -> EventLog:
        return self.workers.events

    async def snapshot(self) -> GatewayStatistics:
        return await self.workers.snapshot()

    async def disconnect(self, agent: str, reason: str) -> bool:
        return await self.workers.disconnect(agent, reason)

    async def close_connection(self, conn: int) -> bool:
        return await self.workers.close_connection(conn)

    async def reload(self, config: GatewayConfig | None = None) -> str:
        """Each worker reads its configuration again; what they said. ``config``: the
        supervisor's own, read again (its alerts follow it; its workers count does not)."""
        if config is not None:  # each worker warns of what only a restart applies
            kept = {key: getattr(self.config, key) for key in RESTART_ONLY}
            self.config = dataclasses.replace(config, **kept)
        logger.info("reloading the configuration of %d workers", len(self._processes))
        return await self.workers.reload()

    def kill(self) -> None:
        """Kill every worker now (a second stop signal)."""
        self._signal(signal.SIGKILL)

    async def shutdown(self) -> None:
        """Stop every worker gracefully (each drains for its ``drain_timeout``), kill those
        still running well past it, and close the listeners."""
        self._stop.set()
        for channel in self._channels.values():
            channel.stop()
        if self._main is not None:
            _, running = await asyncio.wait({self._main}, timeout=self._stop_timeout())
            if running:
                logger.warning("workers still running past the drain deadline: killing them")
                self.kill()
        await self.aclose()

    async def aclose(self) -> None:
        """Stop at once: kill every worker, close the listeners; raise a worker's failure."""
        self._stop.set()
        main, self._main = self._main, None
        try:
            if main is not None:
                main.cancel()
                await asyncio.wait({main})
                if not main.cancelled() and (failure := main.exception()) is not None:
                    raise _first(failure)
        finally:
            if self._control is not None:
                logger.info("gateway stopped")
            self._close_listeners()

    def _stop_timeout(self) -> float:
        return self.config.drain_timeout + STOP_MARGIN

    def _signal(self, signum: int) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    def _close_listeners(self) -> None:
        for listener in [self._control, *self._own]:
            if listener is not None:
                listener.close()
        self._control, self._own = None, []

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for index in range(self.count):
                group.create_task(self._keep(index), name=f"worker {index}")

    async def _keep(self, index: int) -> None:
        """Run worker ``index`` until the supervisor stops, restarting it when it dies."""
        delays = backoff(RESTART_MIN, RESTART_MAX)
        next(delays)
        while True:
            started = time.monotonic()
            pid, code = await self._run_worker(index)
            if self._stop.is_set():
                return
            if not self._serving:
                raise errors.TransportError(
                    f"worker {index} (pid {pid}) {describe_exit(code)} before it served"
                )
            delay, attempt = delays.send(time.monotonic() - started)
            logger.warning(
                "worker %d (pid %d) %s; restarting it in %.1f s (attempt %d)",
                index,
                pid,
                describe_exit(code),
                delay,
                attempt,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return

    async def _run_worker(self, index: int) -> tuple[int, int]:
        """Start worker ``index`` and serve its leases until it exits: (pid, exit code)."""
        assert self._control is not None
        ours, theirs = ProcessChannel.pair()
        reports, their_reports = ProcessChannel.pair()
        own, channel = self._own[index].fileno(), theirs.fileno()
        setup = WorkerSetup(
            index, self._control.fileno(), own, channel, their_reports.fileno(), self.addresses
        )
        env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
        env[WORKER_ENV] = setup.encode()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=subprocess.DEVNULL,
                env=env,
                pass_fds=(setup.control, setup.own, setup.channel, setup.reports),
                # Its own process group: a terminal's Ctrl-C reaches the supervisor alone,
                # which stops the workers once (a second signal would stop them undrained).
                process_group=0,
            )
        except BaseException:
            ours.close()
            reports.close()
            raise
        finally:
            theirs.close()
            their_reports.close()
        self._processes[index] = process
        logger.info("worker %d started (pid %d)", index, process.pid)

        def on_ready() -> None:
            logger.info("worker %d (pid %d) serves", index, process.pid)
            self._ready[index].set()

        try:
            reader, writer = await ours.open_streams(MAX_LINE_SIZE)
            leases = self._channels[index] = LeaseChannel(reader, writer, index, on_ready)
            if self._stop.is_set():  # started as the supervisor stops
                leases.stop()
            report_reader, report_writer = await reports.open_streams(MAX_REPORT_SIZE)
            async with asyncio.TaskGroup() as group:
                group.create_task(serve_leases(leases, self.table))
                group.create_task(self.workers.serve(index, report_reader, report_writer))
                code = await process.wait()
                writer.close()  # its ends closed with it: this ends serve_leases
                report_writer.close()  # and the reports
        except BaseException:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            raise
        finally:
            del self._processes[index]
            self._channels.pop(index, None)
            ours.close()
            reports.close()
            if freed := self.table.forget(index):
                logger.info("worker %d held %d port lease(s) alone: released", index, freed)
        return process.pid, code
