"""A real DNS server on loopback for tests: UDP and TCP on one port, run as trio tasks.

The resolver is tested against real DNS messages on real sockets (no mocks of the network):
dnspython parses the queries and builds the answers, and the server counts every query per
name and type, so a test can prove that an answer came from the cache (no new query) or that
concurrent lookups were coalesced.

Use it from any test directory::

    from dnsserver import DNSServer

    async def test_x(dns_server: DNSServer) -> None:     # fixture in tests/shell/conftest.py
        dns_server.add("a.test", "A", "192.0.2.1", ttl=60)
        resolver = Resolver(dns_server.resolver_settings(), timeout=5.0)
        ...
        assert dns_server.query_count("a.test", "A") == 1

or start one yourself: ``server = DNSServer(zone); await nursery.start(server.serve)``.

Behaviour, like a small authoritative server:

- a name in ``zone`` with records of the asked type: NOERROR with those records (CNAMEs in
  the zone are followed and included, as a recursive resolver would return them);
- a name in ``zone`` without records of that type: NOERROR with no answer (NODATA);
- a name not in ``zone``: NXDOMAIN;
- a name (or ``(name, type)``) in ``servfail``: SERVFAIL; in ``hang``: no answer at all, over
  UDP or TCP, so the client times out;
- an answer too large for the client's UDP payload size: an empty reply with TC set, so the
  client retries over TCP (which this server also serves).

The autojump clock and real sockets: loopback delivers a UDP datagram or a TCP segment
before ``sendto``/``send`` returns, and trio only jumps the clock when its I/O poll finds
nothing ready, so an exchange with this server takes zero virtual time, and a query to a
``hang`` name advances the clock straight to the client's next deadline.
"""

from __future__ import annotations

import collections
import errno
import socket
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

from trio_sni.sansio import config

#: One record as the zone holds it: (type, value in presentation format, TTL).
Record = tuple[str, str, int]

# DNS over UDP without EDNS is limited to 512 bytes (RFC 1035 section 4.2.1).
_CLASSIC_UDP_LIMIT = 512
# Enough for any query a test sends; a DNS message over UDP is at most 65535 bytes.
_RECEIVE_SIZE = 65535


def _key(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class DNSServer:
    """A loopback DNS server answering from ``zone`` (see the module docstring).

    Args:
        zone: name -> records; names are case-insensitive, with or without a trailing dot.
        servfail: names, or (name, type) pairs, answered with SERVFAIL.
        hang: names, or (name, type) pairs, never answered.

    All three may be changed while the server runs. ``host`` and ``port`` are set once
    ``serve`` has started.
    """

    def __init__(
        self,
        zone: Mapping[str, Iterable[Record]] | None = None,
        *,
        servfail: Iterable[str | tuple[str, str]] = (),
        hang: Iterable[str | tuple[str, str]] = (),
    ) -> None:
        self.zone: dict[str, list[Record]] = {}
        for name, records in (zone or {}).items():
            self.zone[_key(name)] = list(records)
        self.servfail: set[str | tuple[str, str]] = set(servfail)
        self.hang: set[str | tuple[str, str]] = set(hang)
        self.queries: collections.Counter[tuple[str, str]] = collections.Counter()
        self.tcp_queries = 0
        self.host = "127.0.0.1"
        self.port = 0

    # -- test-facing helpers -------------------------------------------------------------

    def add(self, name: str, rdtype: str, value: str, *, ttl: int = 300) -> None:
        """Add one record (``add("a.test", "A", "192.0.2.1", ttl=60)``)."""
        self.zone.setdefault(_key(name), []).append((rdtype.upper(), value, ttl))

    def query_count(self, name: str, rdtype: str | None = None) -> int:
        """Queries received for ``name`` (of type ``rdtype``, or of any type)."""
        key = _key(name)
        if rdtype is not None:
            return self.queries[(key, rdtype.upper())]
        return sum(n for (qname, _t), n in self.queries.items() if qname == key)

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, the form ``resolver.nameservers`` takes."""
        return f"{self.host}:{self.port}"

    def resolver_settings(self, **overrides: object) -> config.Resolver:
        """A ``config.Resolver`` pointing at this server; keyword arguments override fields."""
        fields: dict[str, object] = {"nameservers": (self.nameserver,)}
        fields.update(overrides)
        return config.Resolver(**fields)  # type: ignore[arg-type]

    # -- serving -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[DNSServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve UDP and TCP on one loopback port until cancelled.

        Reports the server itself through ``task_status`` once both sockets are ready, so
        ``server = await nursery.start(DNSServer(zone).serve)`` works.
        """
        udp, tcp = await self._bind_pair()
        with udp, tcp:
            tcp.listen()
            self.port = udp.getsockname()[1]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_udp, udp)
                nursery.start_soon(self._serve_tcp, trio.SocketListener(tcp))
                task_status.started(self)

    async def _bind_pair(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        # The UDP port is chosen by the kernel; the TCP socket must get the same number, which
        # another process may hold, so try a few times.
        for _attempt in range(20):
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            await udp.bind((self.host, 0))
            tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await tcp.bind((self.host, udp.getsockname()[1]))
            except OSError as exc:
                udp.close()
                tcp.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            return udp, tcp
        raise RuntimeError("no loopback port free for both UDP and TCP after 20 tries")

    async def _serve_udp(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, peer = await sock.recvfrom(_RECEIVE_SIZE)
            reply = self._answer(data, udp=True)
            if reply is not None:
                await sock.sendto(reply, peer)

    async def _serve_tcp(self, listener: trio.SocketListener) -> None:
        async with listener:
            await trio.serve_listeners(self._handle_tcp, [listener])

    async def _handle_tcp(self, stream: trio.SocketStream) -> None:
        # DNS over TCP: each message is preceded by its 2-byte length (RFC 1035 4.2.2).
        async with stream:
            buffer = bytearray()
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + int.from_bytes(buffer[:2], "big"):
                    size = int.from_bytes(buffer[:2], "big")
                    message = bytes(buffer[2 : 2 + size])
                    del buffer[: 2 + size]
                    self.tcp_queries += 1
                    reply = self._answer(message, udp=False)
                    if reply is not None:
                        await stream.send_all(len(reply).to_bytes(2, "big") + reply)

    def _answer(self, wire: bytes, *, udp: bool) -> bytes | None:
        """The reply to one query, or None for no reply (garbage or a ``hang`` name)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[(name, rdtype)] += 1
        if name in self.hang or (name, rdtype) in self.hang:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail or (name, rdtype) in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            self._fill_answer(response, name, rdtype)
        limit = _RECEIVE_SIZE
        if udp:
            limit = _CLASSIC_UDP_LIMIT
            if query.edns >= 0:
                limit = max(query.payload, _CLASSIC_UDP_LIMIT)
        try:
            # Records go out in zone order (dnspython shuffles by default), so tests can
            # expect an exact address order.
            return response.to_wire(max_size=limit, want_shuffle=False)
        except dns.exception.TooBig:
            truncated = dns.message.make_response(query)
            truncated.flags |= dns.flags.AA | dns.flags.TC
            return truncated.to_wire()

    def _fill_answer(self, response: dns.message.Message, name: str, rdtype: str) -> None:
        seen: set[str] = set()
        while name in self.zone and name not in seen:
            seen.add(name)
            records = self.zone[name]
            wanted = [(v, ttl) for t, v, ttl in records if t.upper() == rdtype]
            if wanted:
                self._append(response, name, rdtype, wanted)
                return
            cnames = [(v, ttl) for t, v, ttl in records if t.upper() == "CNAME"]
            if not cnames or rdtype == "CNAME":
                return
            self._append(response, name, "CNAME", cnames[:1])
            name = _key(cnames[0][0])
        if name not in self.zone:
            # A CNAME pointing outside the zone: the target does not exist.
            response.set_rcode(dns.rcode.NXDOMAIN)

    @staticmethod
    def _append(
        response: dns.message.Message, name: str, rdtype: str, values: list[tuple[str, int]]
    ) -> None:
        ttl = min(ttl for _v, ttl in values)
        rrset = dns.rrset.from_text_list(
            dns.name.from_text(name),
            ttl,
            dns.rdataclass.IN,
            rdtype,
            [v for v, _ttl in values],
            origin=dns.name.root,  # so "CNAME a.test" means a.test., not a relative name
            relativize=False,
        )
        response.answer.append(rrset)
