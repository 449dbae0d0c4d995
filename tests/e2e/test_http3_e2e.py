"""HTTP/3 through the QUIC passthrough, with real endpoints (aioquic's HTTP/3 client and server,
on loopback): requests and responses byte-exact whether the kernel (the QUIC sockhash) or the
proxy relays the flow's datagrams, and one access-log line per QUIC connection."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import trio
import trustme
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, ProtocolNegotiated, QuicEvent
from prometheus_client import generate_latest
from proxytest import wait_for
from quicproxy import (
    MODES,
    AioquicServer,
    Record,
    StartProxy,
    in_mode,
    quic_config,
    quic_proxy_starter,
)
from statusclient import metric_samples, sample

NAME = "h3.test"
MiB = 1 << 20


def payload(n: int) -> bytes:
    """The body of ``GET /bytes/<n>``: n pseudo-random bytes, the same on every call."""
    return random.Random(n).randbytes(n)


@attrs.frozen
class Served:
    """One request as the server saw it: on which of its connections (numbered from 0)."""

    connection: int
    stream_id: int
    method: str
    path: str
    authority: str
    body_size: int


@attrs.define(eq=False)
class _Request:
    headers: dict[str, str]
    body: bytearray = attrs.Factory(bytearray)


class H3Server(QuicConnectionProtocol):
    """``GET /bytes/<n>``: n bytes of :func:`payload`; ``POST /echo``: the request's body.
    Each request is recorded in ``served`` once answered."""

    def __init__(
        self, *args: Any, served: list[Served], number: Callable[[], int], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._served = served
        self._number = number()
        self._http: H3Connection | None = None
        self._requests: dict[int, _Request] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated) and event.alpn_protocol in H3_ALPN:
            self._http = H3Connection(self._quic)
        if self._http is not None:
            for h3_event in self._http.handle_event(event):
                self._h3_event_received(h3_event)

    def _h3_event_received(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            headers = {k.decode(): v.decode() for k, v in event.headers}
            self._requests[event.stream_id] = _Request(headers)
        elif isinstance(event, DataReceived) and event.stream_id in self._requests:
            self._requests[event.stream_id].body += event.data
        else:
            return
        if event.stream_ended:
            self._answer(event.stream_id, self._requests.pop(event.stream_id))

    def _answer(self, stream_id: int, request: _Request) -> None:
        assert self._http is not None
        method, path = request.headers.get(":method", ""), request.headers.get(":path", "")
        if method == "GET" and path.startswith("/bytes/") and path[7:].isdigit():
            status, body = 200, payload(int(path[7:]))
        elif method == "POST" and path == "/echo":
            status, body = 200, bytes(request.body)
        else:
            status, body = 404, b"not found\n"
        self._http.send_headers(
            stream_id,
            [
                (b":status", str(status).encode()),
                (b"server", b"aioquic-test"),
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        self._http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        self._served.append(
            Served(
                self._number,
                stream_id,
                method,
                path,
                request.headers.get(":authority", ""),
                len(request.body),
            )
        )


class Http3Server(AioquicServer):
    """An aioquic HTTP/3 server (:class:`H3Server`) for :data:`NAME`; ``served`` lists the
    requests it answered."""

    def __init__(self, ca: trustme.CA, tmp: Path) -> None:
        self.served: list[Served] = []
        self._connections = 0
        protocol = functools.partial(H3Server, served=self.served, number=self._next_connection)
        super().__init__(ca, tmp, NAME, H3_ALPN, protocol)

    def _next_connection(self) -> int:
        number = self._connections
        self._connections += 1
        return number


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


class _Pending:
    def __init__(self, waiter: asyncio.Future[Response]) -> None:
        self.waiter = waiter
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = bytearray()


class H3Client(QuicConnectionProtocol):
    """An HTTP/3 client connection (as aioquic's examples/http3_client.py)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http = H3Connection(self._quic)
        self._pending: dict[int, _Pending] = {}

    async def request(
        self, method: str, path: str, body: bytes = b"", *, authority: str = NAME
    ) -> Response:
        """One request on a new stream; its whole response."""
        stream_id = self._quic.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"aioquic-test"),
        ]
        if body:
            headers.append((b"content-length", str(len(body)).encode()))
        pending = _Pending(self._loop.create_future())
        self._pending[stream_id] = pending
        self._http.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self._http.send_data(stream_id, body, end_stream=True)
        self.transmit()
        return await asyncio.shield(pending.waiter)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ConnectionTerminated):
            for pending in self._pending.values():
                if not pending.waiter.done():
                    pending.waiter.set_exception(ConnectionError(event.reason_phrase))
            self._pending.clear()
            return
        for h3_event in self._http.handle_event(event):
            self._h3_event_received(h3_event)

    def _h3_event_received(self, event: H3Event) -> None:
        if not isinstance(event, HeadersReceived | DataReceived):
            return
        pending = self._pending.get(event.stream_id)
        if pending is None:
            return
        if isinstance(event, HeadersReceived):
            for key, value in event.headers:
                if key == b":status":
                    pending.status = int(value)
                else:
                    pending.headers[key.decode()] = value.decode()
        else:
            pending.body += event.data
        if event.stream_ended:
            del self._pending[event.stream_id]
            pending.waiter.set_result(
                Response(pending.status, pending.headers, bytes(pending.body))
            )


def h3_requests(
    port: int,
    ca: trustme.CA,
    requests: Sequence[tuple[str, str, bytes]],
    *,
    name: str = NAME,
    timeout: float = 15,
) -> list[Response]:
    """One HTTP/3 connection to ``port`` naming ``name``: every ``(method, path, body)`` of
    ``requests`` at once, each on its stream; the responses in the same order (a thread of
    its own: aioquic's client runs on asyncio)."""

    async def main() -> list[Response]:
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=name)
        configuration.load_verify_locations(cadata=ca.cert_pem.bytes())
        async with connect(
            "127.0.0.1", port, configuration=configuration, create_protocol=H3Client
        ) as client:
            assert isinstance(client, H3Client)
            return list(
                await asyncio.gather(
                    *(
                        client.request(method, path, body, authority=name)
                        for method, path, body in requests
                    )
                )
            )

    return asyncio.run(asyncio.wait_for(main(), timeout))


def h3_request(port: int, ca: trustme.CA, method: str, path: str, body: bytes = b"") -> Response:
    [response] = h3_requests(port, ca, [(method, path, body)])
    return response


@pytest.fixture(scope="module")
def quic_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def h3_server(quic_ca: trustme.CA, tmp_path: Path) -> Any:
    with Http3Server(quic_ca, tmp_path) as server:
        yield server


@pytest.fixture
async def start_quic_proxy(nursery: trio.Nursery) -> StartProxy:
    return quic_proxy_starter(nursery)


def check_record(record: Record, mode: str, server: Http3Server) -> None:
    """A routed HTTP/3 flow's access-log line, ended by the idle timeout."""
    assert record["transport"] == "quic"
    assert (record["sni"], record["alpn"], record["decision"]) == (NAME, ["h3"], "allow")
    assert record["mode"] == ("kernel" if mode == "kernel" else "udp")
    assert record["reason"] == "idle_timeout"
    assert record["target"] == f"127.0.0.1:{server.port}"
    assert str(record["client"]).startswith("127.0.0.1:")


@pytest.mark.parametrize("mode", MODES)
async def test_a_large_http3_download_is_byte_exact(
    start_quic_proxy: StartProxy,
    h3_server: Http3Server,
    quic_ca: trustme.CA,
    mode: str,
) -> None:
    """4 MiB in one response: the body, its length and the server's headers arrive as sent;
    the flow's line counts more bytes to the client than the body (QUIC's and HTTP/3's
    framing, the AEAD tags)."""
    proxy, port, records = await start_quic_proxy(in_mode(quic_config(NAME, h3_server.port), mode))
    size = 4 * MiB
    response = await trio.to_thread.run_sync(
        lambda: h3_request(port, quic_ca, "GET", f"/bytes/{size}")
    )
    assert response.status == 200
    assert response.headers["content-length"] == str(size)
    assert response.headers["server"] == "aioquic-test"
    assert response.body == payload(size)
    assert [(s.method, s.path, s.authority) for s in h3_server.served] == [
        ("GET", f"/bytes/{size}", NAME)
    ]
    await wait_for(lambda: len(records) == 1, timeout=10)  # the flow ends when idle (1 s)
    [record] = records
    check_record(record, mode, h3_server)
    assert record["bytes_to_client"] > size
    # The request, the handshake and the client's ACKs: far less than the body, but more
    # than the client's first datagram (padded to 1200 bytes).
    assert 1200 < record["bytes_to_upstream"] < size
    assert record["datagrams_to_client"] > size // 1500
    if mode == "kernel":
        samples = metric_samples(generate_latest(proxy.metrics.registry).decode())
        redirected = sample(samples, "trio_sni_ebpf_sockmap_quic_redirected_total")
        total = record["datagrams_to_upstream"] + record["datagrams_to_client"]
        assert redirected >= total - 20, (redirected, total)
    assert not proxy.quic_listeners[0].flows


@pytest.mark.parametrize("mode", MODES)
async def test_an_http3_upload_is_echoed_byte_exact(
    start_quic_proxy: StartProxy,
    h3_server: Http3Server,
    quic_ca: trustme.CA,
    mode: str,
) -> None:
    """1 MiB up in a POST and the same 1 MiB back: more than the body passes each way."""
    _proxy, port, records = await start_quic_proxy(in_mode(quic_config(NAME, h3_server.port), mode))
    body = random.Random("upload").randbytes(MiB)
    response = await trio.to_thread.run_sync(
        lambda: h3_request(port, quic_ca, "POST", "/echo", body)
    )
    assert response.status == 200
    assert response.headers["content-length"] == str(len(body))
    assert response.body == body
    assert [(s.method, s.path, s.body_size) for s in h3_server.served] == [
        ("POST", "/echo", len(body))
    ]
    await wait_for(lambda: len(records) == 1, timeout=10)
    [record] = records
    check_record(record, mode, h3_server)
    assert record["bytes_to_upstream"] > len(body)
    assert record["bytes_to_client"] > len(body)


@pytest.mark.parametrize("mode", MODES)
async def test_requests_on_one_connection_make_one_flow_and_a_second_connection_another(
    start_quic_proxy: StartProxy,
    h3_server: Http3Server,
    quic_ca: trustme.CA,
    mode: str,
) -> None:
    """Three requests at once on one connection (three streams), then a second connection
    from another client port: the server sees two connections, the proxy two flows, each
    logged once."""
    proxy, port, records = await start_quic_proxy(in_mode(quic_config(NAME, h3_server.port), mode))
    upload = random.Random("several").randbytes(200_000)
    first = await trio.to_thread.run_sync(
        lambda: h3_requests(
            port,
            quic_ca,
            [("GET", "/bytes/300000", b""), ("POST", "/echo", upload), ("GET", "/bytes/1", b"")],
        )
    )
    assert [r.status for r in first] == [200, 200, 200]
    assert [r.body for r in first] == [payload(300_000), upload, payload(1)]
    second = await trio.to_thread.run_sync(
        lambda: h3_request(port, quic_ca, "GET", "/bytes/100000")
    )
    assert (second.status, second.body) == (200, payload(100_000))
    served = h3_server.served
    assert sorted(s.connection for s in served) == [0, 0, 0, 1]
    assert len({s.stream_id for s in served if s.connection == 0}) == 3
    assert {s.authority for s in served} == {NAME}
    await wait_for(lambda: len(records) == 2, timeout=10)  # each flow ends when idle (1 s)
    first_flow, second_flow = sorted(records, key=lambda r: r["id"])
    for record in (first_flow, second_flow):
        check_record(record, mode, h3_server)
    assert first_flow["client"] != second_flow["client"]  # another client port, another flow
    assert first_flow["bytes_to_client"] > 300_000 + len(upload)
    assert first_flow["bytes_to_upstream"] > len(upload)
    assert 100_000 < second_flow["bytes_to_client"] < 300_000
    assert not proxy.quic_listeners[0].flows
