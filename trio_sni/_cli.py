"""``python -m trio_sni``: load a config, serve until SIGTERM/SIGINT, reload on SIGHUP."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import trio

from ._version import __version__
from .defaults import default_config_text
from .errors import AccelerationUnavailable, ConfigError
from .sansio.config import Config
from .sansio.config_load import dump_config, load_config_text
from .server import Proxy

log = logging.getLogger("trio_sni")

DESCRIPTION = """\
An SNI proxy: peeks at the TLS ClientHello, routes on the server name (never terminating
TLS), and forwards bytes. With no --config it runs on the embedded default config: listen on
127.0.0.1:8443 and [::1]:8443, accept local clients only, forward any public name to port 443.
"""

EPILOG = """\
signals: SIGTERM/SIGINT stop accepting and drain live connections (timeouts.drain); a second
SIGINT stops at once. SIGHUP re-reads --config and applies policy, limits, resolver settings
and timeouts to new connections; a bad new config is reported and the old one stays.

examples:
  python -m trio_sni --print-default-config > trio-sni.json
  python -m trio_sni --check-config trio-sni.json
  python -m trio_sni --config trio-sni.json
"""


def read_config(path: str | None) -> Config:
    """Load ``path``, or the embedded default when ``path`` is None.

    Raises:
        ConfigError: with every problem listed; also for an unreadable file.
    """
    if path is None:
        return load_config_text(default_config_text(), source="<default config>")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_config_text(text, source=path)


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
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m trio_sni`` and the ``trio-sni`` script."""
    args = _parser().parse_args(argv)
    if args.print_default_config:
        sys.stdout.write(default_config_text())
        return
    if args.check_config is not None:
        try:
            config = read_config(args.check_config)
        except ConfigError as exc:
            print(f"{args.check_config}: {exc}", file=sys.stderr)
            sys.exit(1)
        print(json.dumps(dump_config(config), indent=2))
        return
    try:
        config = read_config(args.config)
    except ConfigError as exc:
        print(f"{args.config or '<default config>'}: {exc}", file=sys.stderr)
        sys.exit(1)
    logging.basicConfig(
        level=(args.log_level or config.log.level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # except*: trio's nurseries wrap a bind error (EADDRINUSE) in exception groups, which a
    # plain ``except OSError`` would miss (a traceback instead of one clear line).
    try:
        trio.run(run, config, args.config)
    except* AccelerationUnavailable as group:
        for error in _leaves(group):
            log.error("%s", error)
        sys.exit(1)
    except* OSError as group:
        for error in _leaves(group):
            log.error("cannot start: %s", error)
        sys.exit(1)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside a (nested) exception group."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


async def run(config: Config, config_path: str | None) -> None:
    """Serve ``config`` and handle signals until the proxy has drained."""
    proxy = Proxy(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(_serve_then_stop, proxy, nursery.cancel_scope)
            for listener in listeners:
                log.info("listening on %s", _sockname(listener))
            nursery.start_soon(_handle_signals, signals, proxy, config_path, nursery)


async def _serve_then_stop(
    proxy: Proxy,
    everything: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve; once the proxy has drained, stop the signal handler too."""
    await proxy.serve(task_status=task_status)
    everything.cancel()


async def _handle_signals(
    signals: object,
    proxy: Proxy,
    config_path: str | None,
    nursery: trio.Nursery,
) -> None:
    stopping = False
    async for signum in signals:  # type: ignore[attr-defined]
        if signum == signal.SIGHUP:
            _reload(proxy, config_path)
        elif not stopping:
            stopping = True
            log.info("%s: stopping; send SIGINT again to stop at once", signal.Signals(signum).name)
            proxy.shutdown()
        else:
            log.info("second stop signal: closing all connections now")
            nursery.cancel_scope.cancel()


def _reload(proxy: Proxy, config_path: str | None) -> None:
    if config_path is None:
        log.warning("SIGHUP: running on the embedded default config; nothing to reload")
        return
    try:
        config = read_config(config_path)
    except ConfigError as exc:
        log.error("SIGHUP: %s: %s\nkeeping the current config", config_path, exc)
        return
    proxy.reload(config)


def _sockname(listener: trio.SocketListener) -> str:
    host, port = listener.socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
