"""``workers: N``: one supervisor process and N worker processes serving the same listeners.

Theory of operation. The supervisor (``python -m trio_sni`` when ``workers`` is not 1) binds
every listener once, or takes the sockets systemd passed (:mod:`trio_sni.handover`), and
starts each worker with the same command line, the listening sockets as inherited fds
(``LISTEN_FDS``) and ``TRIO_SNI_WORKER=<index>``. A worker is an ordinary proxy with its own
Trio loop serving on those sockets; the supervisor runs no proxy.

* **One shared socket per listener**, not one ``SO_REUSEPORT`` socket per worker: the kernel
  gives each new connection to whichever worker accepts first, so a busy worker takes fewer,
  a worker that is being replaced leaves nothing queued behind it, and the same sockets work
  when systemd passes them (one per ``ListenStream=``) and across a SIGUSR2 handover. The cost:
  every idle worker wakes for each new connection and all but one find nothing to accept.
* **QUIC listeners** are the exception: each worker binds its own UDP socket to the
  listener's port with ``SO_REUSEPORT``, and the kernel picks the socket by a hash of the
  datagram's addresses and ports, so every datagram of a flow reaches the worker that routed
  it. (A shared UDP socket would hand a flow's datagrams to whichever worker reads first.)
  When a worker is replaced the group changes size and flows relayed in userspace may move
  to another worker, which drops them: their clients start new connections. (A flow the
  kernel relays has its own socket connected to its client, which the kernel prefers.)
* **What only one process may do**: the supervisor runs the XDP guard and the TC shaper for
  every worker (an interface takes one XDP link; N shapers would each count the same
  traffic), and the workers run them off. They stay attached while a worker is replaced, and
  a reload updates their lists and rates in place. The supervisor serves ``status.listen``,
  summing what every worker's private status socket says, with its own features' reports
  (:mod:`trio_sni.workers_status`). Each worker has its own sockhash plane, whose map entries
  die with it; the DNS cache is one pinned map for all.
* **A worker that dies** is started again after a delay that doubles from
  :data:`RESTART_DELAY` to :data:`MAX_RESTART_DELAY` while it keeps dying and resets once it
  has lived :data:`STABLE_AFTER` seconds; :data:`MAX_DEATHS` deaths within
  :data:`DEATH_WINDOW` seconds stop the whole proxy with exit status 1.
* **Signals**: SIGTERM/SIGINT go to every worker (each drains within ``timeouts.drain``; a
  second one stops them at once); SIGHUP is checked here first, so a bad config is reported
  once and reaches no worker, then every worker reloads; SIGUSR2 hands the listening sockets
  to a new supervisor as a single proxy does. Readiness (``READY=1``) is reported once every
  worker has reported its own over a private notify socket.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Sequence

import attrs
import trio

from .config_file import reload_config
from .features import (
    AccelerationStatus,
    KernelFeature,
    TcFeature,
    XdpFeature,
    acceleration_of,
)
from .handover import (
    HANDLED_SIGNALS,
    LISTEN_FDS_START,
    HandoverFailed,
    Notifier,
    hand_over,
    own_command_line,
    spawn_with_sockets,
)
from .metrics import ConfigReloads
from .sansio.config import Config, parse_host_port
from .server import open_listeners, start_status
from .shared_limits import LIMITS_FD_ENV, SharedLimiter
from .workers_status import WorkersStatus, WorkerView, status_socket_name

log = logging.getLogger("trio_sni")

#: The environment variable that makes ``python -m trio_sni`` a worker, and its index.
WORKER_ENV = "TRIO_SNI_WORKER"
#: The abstract unix socket a worker serves its status endpoint on, for the supervisor.
STATUS_SOCKET_ENV = "TRIO_SNI_STATUS_SOCKET"
RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 10.0
#: A worker that has lived this long (seconds) is well again: its next restart is immediate.
STABLE_AFTER = 10.0
MAX_DEATHS = 5
DEATH_WINDOW = 60.0


def worker_config(config: Config) -> Config:
    """The config a worker serves: without what the supervisor runs for all of them (the XDP
    guard, the TC shaper, ``status.listen``)."""
    config = attrs.evolve(config, status=attrs.evolve(config.status, listen=None))
    ebpf = attrs.evolve(
        config.ebpf,
        xdp=attrs.evolve(config.ebpf.xdp, enabled=False),
        tc=attrs.evolve(config.ebpf.tc, enabled=False),
    )
    return attrs.evolve(config, ebpf=ebpf)


def worker_count(config: Config) -> int:
    """``workers``, with 0 meaning one per CPU this process may run on."""
    return config.workers or len(os.sched_getaffinity(0))


@attrs.define(eq=False)
class Worker:
    index: int
    pid: int = 0
    pidfd: int = -1
    started: float = 0.0
    ready: bool = False
    delay: float = RESTART_DELAY
    restarts: int = 0


class Supervisor:
    """Starts, watches and signals the workers (see the module docstring)."""

    def __init__(
        self,
        config: Config,
        config_path: str | None,
        inherited: Sequence[socket.socket],
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.inherited = list(inherited)
        #: The workers reload only what the supervisor accepted: their reload metrics are its.
        self.reloads = ConfigReloads()
        self.workers = [Worker(i) for i in range(worker_count(config))]
        #: The per-client limits every worker counts against (:mod:`trio_sni.shared_limits`).
        self.limiter = SharedLimiter.create(config, len(self.workers))
        self.listeners: list[trio.SocketListener] = []
        self.status_listeners: list[trio.SocketListener] = []
        #: The kernel features the supervisor runs for every worker (see the module docstring).
        self.features: tuple[KernelFeature, ...] = (XdpFeature(config), TcFeature(config))
        self.notifier = Notifier()
        self.stopping = False
        self.handing_over = False
        self.exit_status = 0
        self._deaths: list[float] = []
        self._ready_socket: trio.socket.SocketType | None = None
        self._notify_name = f"@trio-sni-workers-{os.getpid()}-{time.monotonic_ns()}"
        self._all_ready = trio.Event()
        #: The workers' private status sockets, when the proxy has a status endpoint.
        self.status_sockets = (
            [status_socket_name(os.getpid(), w.index) for w in self.workers]
            if config.status.listen is not None
            else []
        )

    async def run(self) -> int:
        """Serve until every worker has stopped; the process exit status."""
        try:
            with (
                trio.open_signal_receiver(*HANDLED_SIGNALS) as received,
                socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as ready,
            ):
                ready.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                ready.bind("\0" + self._notify_name[1:])
                self._ready_socket = trio.socket.from_stdlib_socket(ready)
                async with trio.open_nursery() as nursery:
                    if self.config.status.listen is not None:
                        host, port = parse_host_port(self.config.status.listen)
                        answers = WorkersStatus(
                            self.status_sockets,
                            self._views,
                            self._not_ready_reason,
                            self.reloads,
                            self.acceleration_status,
                        )
                        self.status_listeners = await start_status(
                            nursery, answers, host, port, self.inherited
                        )
                    specs = self.config.effective_listeners
                    pairs = await open_listeners(
                        tuple(s for s in specs if s.protocol != "quic"), self.inherited
                    )
                    self.listeners = [listener for listener, _ in pairs]
                    # Each worker binds its own QUIC sockets, on the port the config names.
                    bound = [(lst.socket.getsockname()[1], spec) for lst, spec in pairs]
                    bound += [(spec.port, spec) for spec in specs if spec.protocol == "quic"]
                    for feature in self.features:
                        feature.start(bound)
                    nursery.start_soon(self._collect_readiness)
                    nursery.start_soon(self._handle_signals, received, nursery)
                    async with trio.open_nursery() as watching:
                        for worker in self.workers:
                            self._start(worker)
                            watching.start_soon(self._watch, worker)
                        nursery.start_soon(self._report_ready)
                    nursery.cancel_scope.cancel()  # every worker has stopped
        finally:
            with trio.CancelScope(shield=True):
                for listener in self.listeners:
                    await trio.aclose_forcefully(listener)
            for feature in self.features:
                feature.close()
            self.limiter.close()
        log.info("supervisor stopped")
        return self.exit_status

    def _start(self, worker: Worker) -> None:
        env = {
            **os.environ,
            WORKER_ENV: str(worker.index),
            "NOTIFY_SOCKET": self._notify_name,
        }
        if self.status_sockets:
            env[STATUS_SOCKET_ENV] = self.status_sockets[worker.index]
        fds = [lst.socket.fileno() for lst in self.listeners]
        env[LIMITS_FD_ENV] = str(LISTEN_FDS_START + len(fds))
        # A signal the supervisor passes on while the worker starts waits for its handlers.
        worker.pid = spawn_with_sockets(
            own_command_line(), fds, env, [self.limiter.fd], blocked=HANDLED_SIGNALS
        )
        worker.pidfd = os.pidfd_open(worker.pid)
        worker.started = trio.current_time()
        worker.ready = False
        log.info("worker %d started (pid %d)", worker.index, worker.pid)

    async def _watch(self, worker: Worker) -> None:
        """Restart ``worker`` whenever it dies, until the proxy stops."""
        while True:
            await trio.lowlevel.wait_readable(worker.pidfd)
            status = _reap(worker)
            connections, clients = self.limiter.forget_worker(worker.index)
            if connections:
                log.info(
                    "worker %d's %d connection(s) of %d client(s) no longer count against "
                    "the limits",
                    worker.index,
                    connections,
                    clients,
                )
            if self.stopping:
                log.info("worker %d (pid %d) stopped (%s)", worker.index, worker.pid, status)
                return
            now = trio.current_time()
            self._deaths = [t for t in self._deaths if now - t < DEATH_WINDOW] + [now]
            if len(self._deaths) >= MAX_DEATHS:
                log.error(
                    "worker %d (pid %d) %s; %d worker deaths within %g s: stopping the proxy",
                    worker.index,
                    worker.pid,
                    status,
                    len(self._deaths),
                    DEATH_WINDOW,
                )
                self.exit_status = 1
                self._stop(signal.SIGTERM)
                return
            if now - worker.started >= STABLE_AFTER:
                worker.delay = RESTART_DELAY
            log.error(
                "worker %d (pid %d) %s; starting it again in %g s",
                worker.index,
                worker.pid,
                status,
                worker.delay,
            )
            await trio.sleep(worker.delay)
            worker.delay = min(MAX_RESTART_DELAY, worker.delay * 2)
            if self.stopping:
                return
            worker.restarts += 1
            self._start(worker)

    def acceleration_status(self) -> AccelerationStatus:
        """What the features the supervisor runs report (read now, at scrape time)."""
        return acceleration_of(self.config, self.features)

    def _views(self) -> list[WorkerView]:
        return [WorkerView(w.index, w.pid, w.ready, w.restarts) for w in self.workers]

    def _not_ready_reason(self) -> str | None:
        if self.stopping:
            return "shutting down: not accepting new connections"
        waiting = [str(w.index) for w in self.workers if not w.ready]
        return f"worker(s) {', '.join(waiting)} not ready" if waiting else None

    async def _collect_readiness(self) -> None:
        """Mark each worker ready when its ``READY=1`` arrives (the sender's pid, from its
        credentials, says which worker it is)."""
        assert self._ready_socket is not None
        creds = struct.calcsize("3i")
        while True:
            data, ancillary, _, _ = await self._ready_socket.recvmsg(4096, socket.CMSG_SPACE(creds))
            pid = next(
                (
                    struct.unpack("3i", cdata[:creds])[0]
                    for level, kind, cdata in ancillary
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
                ),
                None,
            )
            if b"READY=1" not in data.split(b"\n"):
                continue
            for worker in self.workers:
                if worker.pid == pid:
                    worker.ready = True
            if all(worker.ready for worker in self.workers):
                self._all_ready.set()

    async def _report_ready(self) -> None:
        await self._all_ready.wait()
        log.info("%d workers serving", len(self.workers))
        self.notifier.ready(f"{len(self.workers)} workers serving")

    async def _handle_signals(self, received: AsyncIterator[int], nursery: trio.Nursery) -> None:
        async for signum in received:
            if signum == signal.SIGHUP:
                self._reload()
            elif signum == signal.SIGUSR1:
                self._signal_all(signum)  # each worker reopens its access log
            elif signum == signal.SIGUSR2:
                if not (self.stopping or self.handing_over):
                    self.handing_over = True
                    nursery.start_soon(self._hand_over)
            elif not self.stopping:
                log.info(
                    "%s: stopping every worker; send SIGINT again to stop at once",
                    signal.Signals(signum).name,
                )
                self._stop(signum)
            else:
                log.info("second stop signal: every worker closes all connections now")
                self._signal_all(signum)

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self.notifier.stopping()
        self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(worker.pidfd, signum)

    def _reload(self) -> None:
        config = reload_config(self.config_path, self.reloads)
        if config is None:
            return  # a bad config is said once, here, and reaches no worker
        if worker_count(config) != len(self.workers):
            log.warning("reload: a change of workers takes effect only after a restart")
        self.notifier.reloading()
        for feature in self.features:
            feature.reload(config)  # XDP lists and TC rates live; the rest after a restart
        self.config = config
        self._signal_all(signal.SIGHUP)
        self.notifier.ready(f"{len(self.workers)} workers serving")

    async def _hand_over(self) -> None:
        log.info("SIGUSR2: starting a new proxy on the listening sockets")
        try:
            listening = [*self.listeners, *self.status_listeners]
            pid = await hand_over(listening, own_command_line())
        except (HandoverFailed, OSError) as exc:
            log.error("SIGUSR2: %s; this proxy keeps serving", exc)
            self.handing_over = False
            return
        log.info("SIGUSR2: the new proxy (pid %d) serves; stopping every worker", pid)
        self.notifier.new_main_process(pid)
        self._stop(signal.SIGTERM)


def _reap(worker: Worker) -> str:
    """Collect a worker that has exited (its pidfd said so); how it ended, for the log."""
    _, status = os.waitpid(worker.pid, os.WNOHANG)
    os.close(worker.pidfd)
    worker.pidfd = -1
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"
