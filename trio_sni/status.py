"""The status endpoint: a small HTTP/1.1 server (h11 over Trio) next to the proxy.

Endpoints (``GET`` and ``HEAD``; any other method is 405 with an ``Allow`` header):

==================  =========================================================================
``/healthz``        200 ``ok`` while the process runs (liveness)
``/readyz``         200 when the listeners are bound and a config is loaded, else 503 and why
``/connections``    JSON: the live connections, oldest first, ``?limit=N`` (default 100, at
                    most 1000) and the total count
``/metrics``        Prometheus text exposition of the proxy's own registry (OpenMetrics if the
                    scraper asks for it in ``Accept``)
``/ebpf/status``    JSON in the design's shape: ``ebpf_enabled``, ``features``, ``reasons``,
                    ``kernel_version``, ``maps``; plus ``details`` (per feature, e.g. the XDP
                    interface and attach mode), ``counters`` (the kernel counters, summed over
                    CPUs), ``forwarding_mode`` and ``resolver_cache``
==================  =========================================================================

Theory of operation
-------------------

The server runs in the proxy's nursery and must never get in the proxy's way, so everything
about it is bounded:

- **One request per connection.** Every response carries ``Connection: close``. Scrapers and
  ``curl`` handle that fine, and it makes the per-connection bounds below the whole story.
- **At most** :data:`MAX_CONNECTIONS` **connections at once.** The accept loop takes a slot
  before it accepts; when all slots are busy, new connections wait in the kernel's listen
  backlog instead of costing the proxy memory or tasks.
- **One deadline per connection** (:data:`REQUEST_TIMEOUT`) covers reading the request *and*
  writing the response, so a client that trickles its request or never reads the answer is
  cut off (with a 408 if nothing was answered yet).
- **Bounded input.** h11's ``max_incomplete_event_size`` caps the request head
  (:data:`MAX_HEAD_SIZE`, 431 beyond it); request bodies are never read (413 above
  :data:`MAX_BODY_SIZE`, ignored below).
- **Cheap handlers.** Every answer is computed synchronously from in-memory state: no I/O,
  no locks, no waiting on the proxy. ``/connections`` looks at no more than ``limit``
  entries; ``/metrics`` and ``/connections`` scan the live table once.

Errors are blamed on the right side (h11's convention): malformed HTTP is the client's fault
and gets 400 (or h11's ``error_status_hint``), an unknown path 404 with the list of valid
ones, and a bug in a handler is logged with its traceback and answered with 500; none of
them affects the proxy.

The acceleration part of ``/ebpf/status`` is the proxy's
:class:`~trio_sni.features.AccelerationStatus`: what each started kernel feature reports about
itself (``active``, or ``unavailable`` with the reason it could not start), and the config's
switches for the others (off: ``disabled``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from prometheus_client.exposition import choose_encoder

from ._version import __version__
from .sansio.addresses import format_endpoint

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from .connection import ConnectionContext
    from .features import AccelerationStatus
    from .sansio.config import Config

log = logging.getLogger("trio_sni.status")

#: Whole-connection deadline in seconds: read the request and write the answer. A local
#: scraper needs milliseconds; 5 s leaves room for a loaded host, not for a slowloris.
REQUEST_TIMEOUT = 5.0
#: How long a best-effort error answer (408) may take once the deadline has passed.
ERROR_SEND_TIMEOUT = 1.0
#: Concurrent status connections. A Prometheus server, an operator or two and a health
#: checker need a handful; more than this waits in the listen backlog.
MAX_CONNECTIONS = 16
#: Request line plus headers, bytes (h11's default too): curl and Prometheus send < 1 KiB.
MAX_HEAD_SIZE = 16 * 1024
#: Largest request body we tolerate (and ignore): none of the endpoints takes a body.
MAX_BODY_SIZE = 4096
#: Bytes per receive from a status client.
RECEIVE_SIZE = 4096
#: ``/connections`` paging: the default and the ceiling of ``?limit=``.
DEFAULT_CONNECTIONS_LIMIT = 100
MAX_CONNECTIONS_LIMIT = 1000
#: accept() errors that mean "out of resources for now" (as in the proxy's own accept loop).
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_BACKOFF = 0.1

ENDPOINTS = ("/healthz", "/readyz", "/connections", "/metrics", "/ebpf/status")
ALLOWED_METHODS = "GET, HEAD"


# ------------------------------------------------------------------------------------------
# What the proxy tells the status server


class MetricsExport(Protocol):
    """What ``/metrics`` exports (:class:`~trio_sni.metrics.ProxyMetrics`): its registry."""

    registry: CollectorRegistry


class StatusSource(Protocol):
    """What the status server reads from the proxy (:class:`~trio_sni.server.Proxy`)."""

    config: Config
    context: ConnectionContext

    @property
    def metrics(self) -> MetricsExport: ...

    def not_ready_reason(self) -> str | None: ...

    def acceleration_status(self) -> AccelerationStatus: ...


# ------------------------------------------------------------------------------------------
# Documents (pure functions of the proxy's state)


def ebpf_status_document(source: StatusSource) -> dict[str, object]:
    """The ``/ebpf/status`` JSON (the design's shape, plus ``reasons`` and extras)."""
    accel = source.acceleration_status()
    stats = source.context.resolver.statistics()
    answered = stats.hits + stats.negative_hits + stats.misses
    return {
        "ebpf_enabled": source.config.ebpf.enabled and accel.enabled,
        "features": dict(accel.features),
        "reasons": {f: r for f, r in accel.reasons.items() if accel.features.get(f) != "active"},
        # What an active feature wants known (e.g. the DNS cache replaced incompatible state).
        "notes": {f: r for f, r in accel.reasons.items() if accel.features.get(f) == "active"},
        "kernel_version": os.uname().release,
        "maps": {name: m.to_json() for name, m in accel.maps.items()},
        "details": {name: dict(d) for name, d in accel.details.items()},
        "counters": dict(accel.counters),
        "forwarding_mode": source.context.forwarder.mode,
        "resolver_cache": {
            "entries": stats.entries,
            "max_entries": source.config.resolver.cache_size,
            "hit_rate": (
                round((stats.hits + stats.negative_hits) / answered, 4) if answered else None
            ),
        },
        "version": __version__,
    }


def connections_document(context: ConnectionContext, limit: int) -> dict[str, object]:
    """The ``/connections`` JSON: at most ``limit`` live connections, oldest first."""
    now = trio.current_time()
    shown = []
    # The live table is a dict in accept order: the first entries are the oldest.
    for info in islice(context.live.values(), limit):
        shown.append(
            {
                "client": format_endpoint(info.client),
                "listener": info.listener,
                "sni": info.sni,
                "rule": info.rule,
                "decision": info.decision,
                "target": format_endpoint(info.target) if info.target else None,
                # The forwarder's per-connection answer (kernel can fall back to copy).
                "mode": info.forwarded_mode,
                "bytes_to_upstream": info.counters.to_upstream,
                "bytes_to_client": info.counters.to_client,
                "transport": info.transport,
                "age": round(now - info.started, 3),
            }
        )
    return {"total": len(context.live), "limit": limit, "connections": shown}


# ------------------------------------------------------------------------------------------
# Routing a request to an answer


@attrs.frozen
class Answer:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text_answer(status: int, text: str, *headers: tuple[str, str]) -> Answer:
    return Answer(status, text.encode("utf-8") + b"\n", headers=headers)


def json_answer(status: int, document: object) -> Answer:
    body = json.dumps(document, indent=2).encode("utf-8") + b"\n"
    return Answer(status, body, "application/json")


def answer_request(source: StatusSource, request: h11.Request) -> Answer:
    """The answer to one parsed request; synchronous and cheap (see the module docstring)."""
    declared = _header(request, b"content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY_SIZE):
        return text_answer(413, "request body too large: the status endpoints take no body")
    split = urlsplit(request.target.decode("ascii", "replace"))
    path = split.path.rstrip("/") or "/"
    if path not in ENDPOINTS and path != "/":
        return text_answer(404, f"no such endpoint: {path}; try {', '.join(ENDPOINTS)}")
    if request.method not in (b"GET", b"HEAD"):
        return text_answer(
            405,
            f"method {request.method.decode('ascii', 'replace')} not allowed; use GET",
            ("Allow", ALLOWED_METHODS),
        )
    if path == "/":
        return text_answer(200, "trio-sni status endpoints: " + " ".join(ENDPOINTS))
    if path == "/healthz":
        return text_answer(200, "ok")
    if path == "/readyz":
        why = source.not_ready_reason()
        return text_answer(200, "ready") if why is None else text_answer(503, f"not ready: {why}")
    if path == "/connections":
        try:
            limit = connections_limit(split.query)
        except ValueError as exc:
            return text_answer(400, str(exc))
        return json_answer(200, connections_document(source.context, limit))
    if path == "/metrics":
        accept = _header(request, b"accept") or ""
        encoder, content_type = choose_encoder(accept)
        return Answer(200, encoder(source.metrics.registry), content_type)
    assert path == "/ebpf/status"
    return json_answer(200, ebpf_status_document(source))


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def connections_limit(query: str) -> int:
    """``?limit=N`` (default 100; clamped to 1000).

    Raises:
        ValueError: naming the parameter and what is expected.
    """
    values = parse_qs(query).get("limit")
    if not values:
        return DEFAULT_CONNECTIONS_LIMIT
    text = values[-1]
    if not text.isdigit():
        raise ValueError(
            f"limit: expected a whole number from 0 to {MAX_CONNECTIONS_LIMIT}, got {text!r}"
        )
    return min(int(text), MAX_CONNECTIONS_LIMIT)


# ------------------------------------------------------------------------------------------
# The HTTP server

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def _response_headers(answer: Answer) -> list[tuple[str, str]]:
    return [
        ("Content-Type", answer.content_type),
        ("Content-Length", str(len(answer.body))),
        ("Cache-Control", "no-store"),
        ("Connection", "close"),
        ("Server", f"trio-sni/{__version__}"),
        *answer.headers,
    ]


def _raw_response(answer: Answer) -> bytes:
    """An answer formatted by hand, for when h11 has no request to answer (400/408/431)."""
    head = b"HTTP/1.1 %d %s\r\n" % (answer.status, _REASONS.get(answer.status, b""))
    for name, value in _response_headers(answer):
        head += f"{name}: {value}\r\n".encode("latin-1")
    return head + b"\r\n" + answer.body


#: Answers a parsed request: a proxy's own state (:func:`answer_request`), or a supervisor's
#: sum of its workers' answers (:mod:`trio_sni.supervisor`).
Answerer = Callable[[h11.Request], Awaitable[Answer]]


def _answerer(source: StatusSource | Answerer) -> Answerer:
    if callable(source):  # a proxy is not
        return source

    async def answer(request: h11.Request) -> Answer:
        return answer_request(source, request)

    return answer


async def handle_status_connection(
    stream: trio.abc.Stream,
    source: StatusSource | Answerer,
    *,
    request_timeout: float = REQUEST_TIMEOUT,
    max_head_size: int = MAX_HEAD_SIZE,
) -> None:
    """Read one request from ``stream``, answer it, close the stream. Never raises for a bad
    client; ``stream`` is always closed on return.

    Args:
        stream: the accepted connection.
        source: the proxy whose state is reported, or what answers in its place.
        request_timeout: deadline for the whole exchange, seconds.
        max_head_size: request line plus headers, bytes; 431 beyond it.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_size)
    answer_for = _answerer(source)
    answered = False
    try:
        with trio.move_on_after(request_timeout):
            try:
                request = await _receive_request(stream, conn, max_head_size)
            except h11.RemoteProtocolError as exc:
                # The client sent something that is not HTTP/1.1 (or too much of it).
                status = exc.error_status_hint
                # h11 words an oversized head differently depending on where it noticed;
                # say it one way, so the answer does not depend on how the bytes arrived.
                why = (
                    f"request head larger than {max_head_size} bytes"
                    if status == 431
                    else f"bad request: {exc}"
                )
                answered = True
                await stream.send_all(_raw_response(text_answer(status, why)))
                return
            if request is None:
                return  # the client closed without asking anything
            try:
                answer = await answer_for(request)
            except Exception:  # a bug: say so, keep the proxy and the status server running
                log.exception("status: error answering %r", request.target)
                answer = text_answer(500, "internal error; see the proxy's log")
            answered = True
            data = conn.send(
                h11.Response(
                    status_code=answer.status,
                    reason=_REASONS.get(answer.status, b""),
                    headers=_response_headers(answer),
                )
            )
            if request.method != b"HEAD":
                data += conn.send(h11.Data(data=answer.body))
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
        if not answered:
            with trio.move_on_after(ERROR_SEND_TIMEOUT):
                late = f"request not complete within {request_timeout:g} s"
                await stream.send_all(_raw_response(text_answer(408, late)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away; nothing to answer
    finally:
        await trio.aclose_forcefully(stream)


async def _receive_request(
    stream: trio.abc.Stream, conn: h11.Connection, max_head_size: int
) -> h11.Request | None:
    """The next request's head, or None if the client closed first.

    Raises:
        h11.RemoteProtocolError: malformed request, or a head over the size limit.
    """
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            received += len(data)
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            # h11 enforces its limit only while the head is incomplete; a head that arrives
            # whole in the last read is checked here, so the limit is the same either way.
            if received > max_head_size and _head_size(event) > max_head_size:
                raise h11.RemoteProtocolError(
                    f"request head larger than {max_head_size} bytes", error_status_hint=431
                )
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} before a request")


def _head_size(request: h11.Request) -> int:
    """Approximately the bytes of the request line and headers as sent."""
    size = len(request.method) + len(request.target) + 12
    return size + sum(len(k) + len(v) + 4 for k, v in request.headers)


async def serve_status(
    source: StatusSource | Answerer,
    host: str,
    port: int,
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the status endpoints on ``host:port`` until cancelled.

    Start it with ``listeners = await nursery.start(serve_status, proxy, host, port)``.

    Raises:
        OSError: when the address cannot be bound; the message names it.
    """
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        shown = f"[{host}]" if ":" in host else host
        raise OSError(exc.errno, f"status.listen {shown}:{port}: {exc.strerror}") from exc
    await serve_status_on(
        source,
        listeners,
        max_connections=max_connections,
        request_timeout=request_timeout,
        task_status=task_status,
    )


async def unix_listener(name: str) -> trio.SocketListener:
    """A listener on the abstract unix socket ``name`` (no file: it goes with the process),
    for a worker's status endpoint, which only its supervisor asks."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind("\0" + name)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def serve_status_on(
    source: StatusSource | Answerer,
    listeners: list[trio.SocketListener],
    *,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout: float = REQUEST_TIMEOUT,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the status endpoints on ``listeners`` (now owned here) until cancelled."""
    try:
        slots = trio.Semaphore(max_connections)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, source, slots, request_timeout, nursery)
            task_status.started(listeners)
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await trio.aclose_forcefully(listener)


async def _accept_loop(
    listener: trio.abc.Listener[trio.abc.Stream],
    source: StatusSource | Answerer,
    slots: trio.Semaphore,
    request_timeout: float,
    nursery: trio.Nursery,
) -> None:
    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                log.error("status: accept: %s; retrying in %g s", exc, ACCEPT_BACKOFF)
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            raise
        except BaseException:
            slots.release()
            raise
        nursery.start_soon(_handle_and_release, stream, source, slots, request_timeout)


async def _handle_and_release(
    stream: trio.abc.Stream,
    source: StatusSource | Answerer,
    slots: trio.Semaphore,
    request_timeout: float,
) -> None:
    try:
        await handle_status_connection(stream, source, request_timeout=request_timeout)
    finally:
        slots.release()
