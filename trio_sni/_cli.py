"""``python -m trio_sni``: load a config, serve until SIGTERM/SIGINT, reload on SIGHUP."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import trio

from . import demo, oplog
from ._version import __version__
from .config_file import read_config, reload_config
from .defaults import default_config_text
from .errors import AccelerationUnavailable, ConfigError, StatusUnavailable
from .handover import (
    HANDLED_SIGNALS,
    HandoverFailed,
    InheritedSocketError,
    Notifier,
    hand_over,
    own_command_line,
    take_inherited_sockets,
)
from .sansio.addresses import format_endpoint
from .sansio.config import Config
from .sansio.config_load import dump_config
from .server import Proxy
from .shared_limits import LIMITS_FD_ENV, SharedLimiter
from .supervisor import STATUS_SOCKET_ENV, WORKER_ENV, Supervisor, worker_config

log = logging.getLogger("trio_sni")

DESCRIPTION = """\
An SNI proxy: peeks at the TLS ClientHello, routes on the server name (never terminating
TLS), and forwards bytes. With no --config it runs on the embedded default config: listen on
127.0.0.1:8443 and [::1]:8443, accept local clients only, forward any public name to port 443.
"""

EPILOG = """\
signals: SIGTERM/SIGINT stop accepting and drain live connections (timeouts.drain); a second
SIGINT stops at once. SIGHUP re-reads --config and applies policy, limits, resolver settings
and timeouts to new connections, log.level and log.access_log at once (--log-level, if given,
stays), and the XDP lists and TC rates in place (listeners,
forwarding mode and which kernel features run need a restart); a bad new config is reported
and the old one stays. SIGUSR2 restarts without refusing anyone: the proxy starts a new one
(same command line) on its listening sockets, and once that one is ready it stops accepting
and drains; a new one that fails is reported and the old one keeps serving. SIGUSR1 opens
the access-log file again (after logrotate has renamed it).

systemd: listening sockets passed with LISTEN_FDS (socket activation) are served on instead
of binding; with NOTIFY_SOCKET set the proxy reports READY, RELOADING and STOPPING.

workers: unless the config says "workers": 1, this process supervises worker processes on
the same listeners (one per CPU by default, "workers": N for N); they share the limits. Send
the signals above to it, not to them.

examples:
  python -m trio_sni --print-default-config > trio-sni.json
  python -m trio_sni --check-config trio-sni.json
  python -m trio_sni --config trio-sni.json
  python -m trio_sni status --url http://127.0.0.1:9090
"""

#: Where ``status`` looks by default: the address the docs suggest for ``status.listen``.
DEFAULT_STATUS_URL = "http://127.0.0.1:9090"
STATUS_DESCRIPTION = """\
Show a running proxy's status as tables: readiness, connections and bytes by mode and
termination reason, the kernel features (active, disabled or unavailable, and why), maps,
the resolver cache, per-rule traffic and the oldest live connections. It reads the proxy's
status endpoint, so the proxy must run with "status": {"listen": "127.0.0.1:9090"} (the
embedded default config's; or the address given with --url). Exit status: 0 when the
endpoint answered, 1 when it did not. --watch shows it again every few seconds until Ctrl-C.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trio_sni",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--config", metavar="FILE", help="JSON config file to serve")
    mode.add_argument(
        "--check-config",
        metavar="FILE",
        help="validate FILE, print the effective config (defaults filled in) and exit 0, "
        "or print every problem and exit 1",
    )
    mode.add_argument(
        "--print-default-config",
        action="store_true",
        help="print the embedded default config and exit",
    )
    parser.add_argument("--version", action="version", version=f"trio-sni {__version__}")
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override log.level from the config",
    )
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    status = commands.add_parser(
        "status",
        help="show a running proxy's status (from its status endpoint) as tables",
        description=STATUS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    status.add_argument(
        "--url",
        default=DEFAULT_STATUS_URL,
        help=f"the proxy's status endpoint (its status.listen); default {DEFAULT_STATUS_URL}",
    )
    status.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="live connections to list, oldest first (0 to 1000; default 20)",
    )
    status.add_argument(
        "--json", action="store_true", help="print the raw answers as one JSON object"
    )
    status.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="per request (default 5)"
    )
    status.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="show it again every SECONDS (default 2) until Ctrl-C, kernel counters that are "
        "still zero left out",
    )
    status.add_argument(
        "--all", action="store_true", help="with --watch: show the zero kernel counters too"
    )
    commands.add_parser(
        "demo",
        help="route real TLS connections through the proxy on this host, offline (a local "
        "backend, the proxy, a client), and show the access log",
        description="Route real TLS connections through the proxy on this host, with no "
        "network: a TLS backend on loopback, the proxy in front of it in the best forwarding "
        "mode this host allows, and a client that asks for an allowed name and a refused one. "
        "Prints what happened and the access-log lines; exit status 0 if it all worked.",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m trio_sni`` and the ``trio-sni`` script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.config or args.check_config or args.print_default_config:
            parser.error("demo runs its own config: --config and the like do not apply")
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
        sys.exit(trio.run(demo.run_demo))
    if args.command == "status":
        if args.config or args.check_config or args.print_default_config:
            parser.error(
                "status reads a running proxy: --config, --check-config and "
                "--print-default-config do not apply"
            )
        if args.watch is not None:
            sys.exit(
                watch_status(
                    args.url,
                    args.watch,
                    limit=args.limit,
                    timeout=args.timeout,
                    every_counter=args.all,
                )
            )
        sys.exit(status_command(args.url, limit=args.limit, raw=args.json, timeout=args.timeout))
    if args.print_default_config:
        sys.stdout.write(default_config_text())
        return
    if args.check_config is not None:
        try:
            config = read_config(args.check_config)
            problems = [
                problem
                for field, path in (
                    ("access_log", config.log.access_log),
                    ("file", config.log.file),
                )
                if (problem := _log_file_problem(f"log.{field}", path)) is not None
            ]
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            print(f"{args.check_config}: {exc}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(dump_config(config), indent=2))
        listeners, rules = len(config.effective_listeners), len(config.rules)
        print(
            f"{args.check_config}: ok ({listeners} listener(s), {rules} rule(s))", file=sys.stderr
        )
        return
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"{args.config or '<default config>'}: {exc}", file=sys.stderr)
        sys.exit(1)
    worker = os.environ.pop(WORKER_ENV, None)
    try:
        oplog.configure(config, worker)
    except OSError as exc:
        print(f"cannot start: log.file: {exc}", file=sys.stderr)
        sys.exit(1)
    logging.getLogger().setLevel(logging.NOTSET)
    oplog.apply_level(config, args.log_level)
    try:
        inherited = take_inherited_sockets()
    except InheritedSocketError as exc:
        log.error("cannot start: %s", exc)
        sys.exit(1)
    # except*: trio's nurseries wrap a bind error (EADDRINUSE) in exception groups, which a
    # plain ``except OSError`` would miss (a traceback instead of one clear line).
    # sys.exit() is called after the except* blocks, not in them: CPython before 3.11.4 (Debian
    # 12's 3.11.2) turns a SystemExit raised inside except* into a traceback.
    status = 0
    try:
        if worker is None and config.workers != 1:
            supervisor = Supervisor(config, args.config, inherited)
            status = trio.run(supervisor.run)
        else:
            trio.run(run, config, args.config, inherited, None if worker is None else int(worker))
    except* AccelerationUnavailable as group:
        for error in _leaves(group):
            log.error("%s", error)
        status = 1
    except* OSError as group:
        for error in _leaves(group):
            log.error("cannot start: %s", error)
        status = 1
    sys.exit(status)


def _log_file_problem(field: str, destination: str | None) -> str | None:
    """Why the proxy could not open a log file (``field``: ``log.access_log`` or
    ``log.file``) at start, if it could not (a file in a missing or unwritable directory):
    ``--check-config`` says so before a start fails."""
    if destination in (None, "stderr", "stdout"):
        return None
    path = Path(destination)
    if path.is_dir():
        return f"{field}: {destination} is a directory"
    if path.exists():
        ok = os.access(path, os.W_OK)
        return None if ok else f"{field}: {destination} is not writable"
    if not path.parent.is_dir():
        return f"{field}: directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{field}: cannot create files in {path.parent}"
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (nested) exception group."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def run(
    config: Config,
    config_path: str | None,
    inherited: Sequence[socket.socket] = (),
    worker: int | None = None,
) -> None:
    """Serve ``config`` and handle signals until the proxy has drained. ``worker``: this
    process is that worker of a supervisor (:mod:`trio_sni.supervisor`)."""
    status_socket = limiter = None
    if worker is not None:
        config = worker_config(config)
        status_socket = os.environ.pop(STATUS_SOCKET_ENV, None)
        limiter = SharedLimiter(
            int(os.environ.pop(LIMITS_FD_ENV)), worker, config.limits, config.max_connections
        )
    proxy = Proxy(
        config, inherited=inherited, worker=worker, status_socket=status_socket, limiter=limiter
    )
    notifier = Notifier()
    with trio.open_signal_receiver(*HANDLED_SIGNALS) as received:
        # A worker starts with them blocked (spawn_with_sockets): now they have handlers.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
            for listener in listeners:
                log.info("listening on %s", format_endpoint(listener.socket.getsockname()))
            for quic in proxy.quic_listeners:
                log.info("listening on %s/udp (quic)", format_endpoint(quic.sock.getsockname()))
            notifier.ready(f"serving on {len(listeners)} listening socket(s)")
            handler = _SignalHandler(proxy, config_path, notifier, nursery, worker)
            nursery.start_soon(handler.run, received)
            if worker is not None:
                nursery.start_soon(_stop_with_the_supervisor, handler)


async def _stop_with_the_supervisor(handler: _SignalHandler) -> None:
    """A worker whose supervisor is gone (killed: it could not stop its workers) drains and
    stops, rather than serving on unsupervised."""
    parent = os.pidfd_open(os.getppid())
    try:
        await trio.lowlevel.wait_readable(parent)
    finally:
        os.close(parent)
    if not handler.stopping:
        log.warning("the supervisor is gone: stopping")
        handler.stop()


async def _serve_then_stop(
    proxy: Proxy,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve; once the proxy has drained, stop the signal handler too."""
    await proxy.serve(task_status=task_status)
    everything.cancel()


class _SignalHandler:
    """What each signal does (see EPILOG)."""

    def __init__(
        self,
        proxy: Proxy,
        config_path: str | None,
        notifier: Notifier,
        nursery: trio.Nursery,
        worker: int | None,
    ) -> None:
        self.proxy = proxy
        self.config_path = config_path
        self.notifier = notifier
        self.nursery = nursery
        self.worker = worker
        self.stopping = False
        self.handing_over = False

    async def run(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.notifier.reloading()
                _reload(self.proxy, self.config_path, self.worker)
                self.notifier.ready("serving")
            elif signum == signal.SIGUSR1:
                self.proxy.reopen_access_log()
            elif signum == signal.SIGUSR2:
                if self.worker is not None:
                    log.warning("SIGUSR2: a worker does not hand over; signal the supervisor")
                elif self.stopping or self.handing_over:
                    log.warning("SIGUSR2: already stopping or handing over; ignored")
                else:
                    self.handing_over = True
                    self.nursery.start_soon(self._hand_over)
            elif not self.stopping:
                log.info(
                    "%s: stopping; send SIGINT again to stop at once", signal.Signals(signum).name
                )
                self.stop()
            else:
                log.info("second stop signal: closing all connections now")
                self.nursery.cancel_scope.cancel()

    def stop(self) -> None:
        self.stopping = True
        self.notifier.stopping()
        self.proxy.shutdown()

    async def _hand_over(self) -> None:
        log.info("SIGUSR2: starting a new proxy on the listening sockets")
        listening = [*self.proxy.listeners, *self.proxy.status_listeners]
        try:
            pid = await hand_over(listening, own_command_line())
        except (HandoverFailed, OSError) as exc:
            log.error("SIGUSR2: %s; this proxy keeps serving", exc)
            self.handing_over = False
            return
        if self.stopping:
            return
        log.info("SIGUSR2: the new proxy (pid %d) serves; stopping accepting and draining", pid)
        self.notifier.new_main_process(pid)
        self.stop()


def _reload(proxy: Proxy, config_path: str | None, worker: int | None) -> None:
    config = reload_config(config_path, proxy.metrics.reloads)
    if config is not None:
        proxy.reload(config if worker is None else worker_config(config))


# ------------------------------------------------------------------------------------------
# ``python -m trio_sni status``


def status_command(url: str, *, limit: int, raw: bool, timeout: float) -> int:
    """Fetch the status documents from ``url`` and print them; the process exit status."""
    base = url.rstrip("/")
    if not base.startswith("http://"):
        print(f"--url: expected http://host:port, got {url!r}", file=sys.stderr)
        return 1
    try:
        documents = fetch_status(base, limit=max(0, min(limit, 1000)), timeout=timeout)
    except StatusUnavailable as exc:
        print(exc, file=sys.stderr)
        return 1
    if raw:
        print(json.dumps(documents, indent=2))
    else:
        sys.stdout.write(render_status(base, documents))
    return 0


def watch_status(
    url: str, interval: float, *, limit: int, timeout: float, every_counter: bool
) -> int:
    """``status --watch``: the tables again every ``interval`` seconds, on a cleared screen,
    until Ctrl-C (exit status 0). An endpoint that stops answering is reported and asked
    again at the next turn."""
    base = url.rstrip("/")
    if not base.startswith("http://") or interval <= 0:
        print(
            f"status --watch: expected http://host:port and SECONDS > 0, got {url!r}, {interval}",
            file=sys.stderr,
        )
        return 1
    try:
        while True:
            try:
                documents = fetch_status(base, limit=max(0, min(limit, 1000)), timeout=timeout)
                text = render_status(base, documents, zero_counters=every_counter)
            except StatusUnavailable as exc:
                text = f"{exc}\n"
            stamp = time.strftime("%H:%M:%S")
            sys.stdout.write(f"\x1b[H\x1b[2J{stamp}, every {interval:g} s (Ctrl-C stops)\n{text}")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def fetch_status(base: str, *, limit: int, timeout: float) -> dict[str, object]:
    """``/readyz``, ``/ebpf/status``, ``/connections`` and ``/metrics`` (parsed), as one dict.

    Raises:
        StatusUnavailable: saying which URL failed and how.
    """
    from prometheus_client.parser import text_string_to_metric_families

    # No proxy from the environment: the status endpoint is local by design.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(path: str, *, expect: Sequence[int] = (200,)) -> tuple[int, str]:
        try:
            with opener.open(base + path, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            with exc:
                status, body = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise StatusUnavailable(
                f"cannot reach the status endpoint at {base}: {reason}; is the proxy running "
                'with "status": {"listen": ...} set to this address? (--url chooses another)'
            ) from None
        if status not in expect:
            raise StatusUnavailable(f"{base}{path}: unexpected answer {status}: {body[:200]!r}")
        return status, body.decode("utf-8", "replace")

    def get_json(path: str) -> object:
        _status, text = get(path)
        try:
            return json.loads(text)
        except ValueError:
            raise StatusUnavailable(f"{base}{path}: not JSON: {text[:200]!r}") from None

    ready_status, ready_text = get("/readyz", expect=(200, 503))
    ebpf = get_json("/ebpf/status")
    connections = get_json(f"/connections?limit={limit}")
    _status, metrics_text = get("/metrics")
    samples: list[dict[str, object]] = []
    try:
        for family in text_string_to_metric_families(metrics_text):
            for sample in family.samples:
                samples.append(
                    {"name": sample.name, "labels": dict(sample.labels), "value": sample.value}
                )
    except ValueError as exc:
        raise StatusUnavailable(f"{base}/metrics: not Prometheus text: {exc}") from None
    return {
        "ready": ready_status == 200,
        "readiness": ready_text.strip(),
        "ebpf": ebpf,
        "connections": connections,
        "metrics": samples,
    }


def render_status(base: str, documents: dict[str, object], *, zero_counters: bool = True) -> str:
    """The status documents as a few aligned tables for a person (``zero_counters``: list
    the kernel counters that are still zero too)."""
    ebpf = _as_dict(documents["ebpf"])
    connections = _as_dict(documents["connections"])
    samples = documents["metrics"]
    assert isinstance(samples, list)

    def total(name: str, **match: str) -> float:
        return sum(
            float(s["value"])
            for s in samples
            if s["name"] == name and all(s["labels"].get(k) == v for k, v in match.items())
        )

    def by_label(name: str, *labels: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for s in samples:
            if s["name"] == name:
                key = tuple(str(s["labels"].get(label, "")) for label in labels)
                out[key] = out.get(key, 0.0) + float(s["value"])
        return out

    lines = [f"trio-sni {ebpf.get('version', '?')} at {base}"]
    readiness = str(documents["readiness"])
    lines.append(_field("ready", "yes" if documents["ready"] else f"no ({readiness})"))
    lines.append(_field("forwarding", str(ebpf.get("forwarding_mode"))))
    lines.append(
        _field(
            "connections",
            f"{int(total('trio_sni_connections_active'))} active, "
            f"{int(total('trio_sni_connections_accepted_total'))} accepted",
        )
    )
    closed: dict[str, float] = {}
    for (reason,), value in by_label("trio_sni_connections_closed_total", "reason").items():
        closed[reason] = closed.get(reason, 0) + value
    ordered = sorted(closed.items(), key=lambda item: (-item[1], item[0]))
    lines.append(_field("closed", ", ".join(f"{r} {int(v)}" for r, v in ordered) or "none"))
    modes = by_label("trio_sni_bytes_total", "mode", "direction")
    lines.append(
        _field(
            "bytes",
            "; ".join(
                f"{mode}: {_size(modes.get((mode, 'to_upstream'), 0))} to upstream, "
                f"{_size(modes.get((mode, 'to_client'), 0))} to client"
                for mode in sorted({mode for mode, _ in modes})
            )
            or "none yet",
        )
    )
    cache = _as_dict(ebpf.get("resolver_cache") or {})
    hit_rate = cache.get("hit_rate")
    lines.append(
        _field(
            "resolver cache",
            f"{cache.get('entries')} of {cache.get('max_entries')} names, hit rate "
            + (f"{float(hit_rate) * 100:.1f} %" if isinstance(hit_rate, (int, float)) else "-"),
        )
    )

    features = _as_dict(ebpf.get("features") or {})
    reasons = _as_dict(ebpf.get("reasons") or {})
    notes = _as_dict(ebpf.get("notes") or {})  # what an active feature wants known
    details = _as_dict(ebpf.get("details") or {})
    lines += [
        "",
        f"eBPF: {'on' if ebpf.get('ebpf_enabled') else 'off'} "
        f"(kernel {ebpf.get('kernel_version')})",
    ]
    lines += _table(
        ("FEATURE", "STATE", "REASON OR NOTE", "DETAILS"),
        [
            (
                name,
                str(state),
                str(reasons.get(name) or notes.get(name) or ""),
                " ".join(
                    f"{key}={','.join(map(str, v)) if isinstance(v, list) else v}"
                    for key, v in _as_dict(details.get(name) or {}).items()
                ),
            )
            for name, state in features.items()
        ],
    )
    maps = _as_dict(ebpf.get("maps") or {})
    if maps:
        rows = []
        for name, info in maps.items():
            m = _as_dict(info)
            rate = m.get("hit_rate")
            rows.append(
                (
                    name,
                    "-" if m.get("entries") is None else str(m.get("entries")),
                    "-" if m.get("max_entries") is None else str(m.get("max_entries")),
                    f"{float(rate) * 100:.1f} %" if isinstance(rate, (int, float)) else "-",
                )
            )
        lines.append("")
        lines += _table(("MAP", "ENTRIES", "MAX ENTRIES", "HIT RATE"), rows)
    kernel_counters = [
        (
            str(s["name"]).removeprefix("trio_sni_ebpf_").removesuffix("_total")
            + "".join(f" ({value})" for value in s["labels"].values()),
            s["value"],
        )
        for s in samples
        if str(s["name"]).startswith("trio_sni_ebpf_")
        and str(s["name"]).endswith("_total")
        and (zero_counters or float(s["value"]) != 0)
    ]
    if kernel_counters:
        lines.append("")
        lines += _table(
            ("KERNEL COUNTER", "VALUE"), [(n, str(int(float(v)))) for n, v in kernel_counters]
        )

    rule_connections = by_label("trio_sni_rule_connections_total", "rule")
    rule_bytes = by_label("trio_sni_rule_bytes_total", "rule", "direction")
    if rule_connections:
        lines.append("")
        lines += _table(
            ("RULE", "CONNECTIONS", "TO UPSTREAM", "TO CLIENT"),
            [
                (
                    rule,
                    str(int(count)),
                    _size(rule_bytes.get((rule, "to_upstream"), 0)),
                    _size(rule_bytes.get((rule, "to_client"), 0)),
                )
                for (rule,), count in sorted(rule_connections.items())
            ],
        )

    live = connections.get("connections") or []
    assert isinstance(live, list)
    lines += [
        "",
        f"live connections: {connections.get('total')} (showing {len(live)}, oldest first)",
    ]
    if live:
        lines += _table(
            ("CLIENT", "LISTENER", "SNI", "TARGET", "MODE", "TO UPSTREAM", "TO CLIENT", "AGE"),
            [
                (
                    str(c.get("client")),
                    str(c.get("listener")),
                    str(c.get("sni") or "-"),
                    str(c.get("target") or "-"),
                    str(c.get("mode") or c.get("decision") or "-"),
                    _size(c.get("bytes_to_upstream") or 0),
                    _size(c.get("bytes_to_client") or 0),
                    f"{float(str(c.get('age') or 0)):.1f} s",
                )
                for c in map(_as_dict, live)
            ],
        )
    return "\n".join(lines) + "\n"


def _as_dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise StatusUnavailable(f"unexpected status document: {value!r:.200}")
    return value


def _field(name: str, value: str) -> str:
    return f"{name + ':':<16}{value}"


def _size(value: object) -> str:
    """Bytes for a person: exact below 1 KiB, one decimal above."""
    amount = float(value)  # type: ignore[arg-type]
    if amount < 1024:
        return f"{int(amount)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        amount /= 1024
        if amount < 1024 or unit == "TiB":
            break
    return f"{amount:.1f} {unit}"


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), *(line(r) for r in rows)]
