"""A real HTTP/1.1 client for the status endpoint tests (h11 over a Trio TCP stream), and a
raw-bytes exchange for requests no well-behaved client would send.

Importable from every test folder (tests/ is on pytest's path).
"""

from __future__ import annotations

import attrs
import h11
import trio
from prometheus_client.parser import text_string_to_metric_families

#: Bound on one exchange with the status server; a healthy one takes milliseconds.
EXCHANGE_TIMEOUT = 10.0


@attrs.frozen
class HTTPResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


async def http_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    headers: tuple[tuple[str, str], ...] = (),
    host: str = "127.0.0.1",
) -> HTTPResponse:
    """Send one request to ``host:port`` and read the whole response."""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            data = conn.send(
                h11.Request(method=method, target=target, headers=[("Host", host), *headers])
            )
            data += conn.send(h11.EndOfMessage())
            await stream.send_all(data)
            status = 0
            response_headers: dict[str, str] = {}
            body = b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {
                        k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers
                    }
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return HTTPResponse(status, response_headers, body)
                else:
                    raise AssertionError(f"unexpected event {event!r}")


async def raw_exchange(port: int, data: bytes, *, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` as is and return everything the server sends until it closes."""
    with trio.fail_after(EXCHANGE_TIMEOUT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            await stream.send_all(data)
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
            return received


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse a Prometheus text exposition into ``{(sample name, sorted labels): value}``."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))
