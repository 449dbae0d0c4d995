"""``python -m trio_sni demo``: the proxy routing real TLS connections on this host, offline.

A TLS backend for ``demo.trio-sni.test`` on a free loopback port (its certificate and CA are
in ``demo_tls/``, made for this demo and public on purpose), the proxy in this process in
front of it (the same :class:`~trio_sni.server.Proxy` ``--config`` runs, in the best
forwarding mode this host allows), and a client that asks for the demo name (verified
certificate, an answer) and for a name no rule allows (refused with ``unrecognized_name``).
It prints what happened and the access-log lines; exit status 0 if everything did.
"""

from __future__ import annotations

import json
import ssl
from importlib import resources

import trio

from .sansio.config_load import load_config
from .server import Proxy

NAME = "demo.trio-sni.test"
REFUSED = "refused.trio-sni.test"
ANSWER = b"hello from the demo backend, through trio-sni\n"


def _files() -> tuple[str, str]:
    here = resources.files("trio_sni").joinpath("demo_tls")
    return str(here.joinpath("ca.pem")), str(here.joinpath("backend.pem"))


async def serve_https_answer(
    stream: trio.SocketStream,
    context: ssl.SSLContext,
    answer: bytes,
    requests: list[bytes] | None = None,
) -> None:
    """Answer one HTTP/1.1-over-TLS request with ``answer`` and close: the demo's backend
    (and the test suite's); each request head is appended to ``requests`` if given."""
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await tls.receive_some(65536)
            if not chunk:
                return
            request += chunk
        if requests is not None:
            requests.append(request)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        await tls.send_all(head % len(answer) + answer)
        await tls.aclose()
    except (trio.BrokenResourceError, ssl.SSLError):
        pass
    finally:
        await trio.aclose_forcefully(tls)


async def _get(port: int, name: str, context: ssl.SSLContext) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    tls = trio.SSLStream(stream, context, server_hostname=name)
    try:
        await tls.send_all(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name.encode())
        response = b""
        while chunk := await tls.receive_some(65536):
            response += chunk
        return response
    finally:
        await trio.aclose_forcefully(tls)


async def run_demo() -> int:
    """Run the demo and print it; the exit status."""
    ca, backend_pem = _files()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(backend_pem)
    client_context = ssl.create_default_context(cafile=ca)
    records: list[dict[str, object]] = []
    async with trio.open_nursery() as nursery:
        [backend] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        nursery.start_soon(
            trio.serve_listeners, lambda s: serve_https_answer(s, server_context, ANSWER), [backend]
        )
        backend_port = backend.socket.getsockname()[1]
        config = load_config(
            {
                "workers": 1,
                "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
                "rules": [{"match": NAME, "allow_private": True}],
                "resolver": {"hosts": {NAME: ["127.0.0.1"]}},
                "log": {"access_log": None},
                # A demo leaves the host's shared DNS cache alone.
                "ebpf": {"dns_cache": {"enabled": False}},
            }
        )
        logged = trio.Event()

        def log_record(record: dict[str, object]) -> None:
            records.append(record)
            if len(records) == 2:
                logged.set()

        proxy = Proxy(config, access_log=log_record)
        listeners = await nursery.start(proxy.serve)
        port = listeners[0].socket.getsockname()[1]
        print(f"backend: TLS for {NAME} on 127.0.0.1:{backend_port}")
        print(f"proxy:   127.0.0.1:{port}, one rule: {NAME} -> 127.0.0.1:{backend_port}")
        ok = True
        response = await _get(port, NAME, client_context)
        print(f"\nclient asks for {NAME} through the proxy (certificate verified):")
        print("  " + response.decode("utf-8", "replace").replace("\r\n", "\n  ").rstrip())
        ok = ok and response.endswith(ANSWER)
        print(f"\nclient asks for {REFUSED}, which no rule allows:")
        try:
            await _get(port, REFUSED, client_context)
        except trio.BrokenResourceError as broken:  # Trio's; the TLS alert is the cause
            cause = broken.__cause__
            alert = cause.reason if isinstance(cause, ssl.SSLError) else None
            refused = alert == "TLSV1_UNRECOGNIZED_NAME"
            print(f"  refused with the TLS alert {alert}" if refused else f"  failed: {cause}")
        else:
            refused = False
            print("  not refused: this is a bug")
        ok = ok and refused
        with trio.move_on_after(5):
            await logged.wait()
        print("\naccess log:")
        for record in records:
            print("  " + json.dumps(record, separators=(",", ":")))
        modes = {record.get("mode") for record in records} - {None}
        print(f"\nforwarding mode: {', '.join(map(str, modes)) or '-'}")
        proxy.shutdown()
        nursery.cancel_scope.cancel()
    print(
        "\nall worked, offline. Next: python -m trio_sni (the embedded default config), or "
        "python -m trio_sni --print-default-config > trio-sni.json to write your own."
        if ok
        else "\nthe demo did not work as it should: see above"
    )
    return 0 if ok else 1
