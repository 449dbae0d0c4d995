"""The kernel building block for QUIC flows: a loaded ``quic_redirect.bpf.o`` with its verdict
program attached to the ``quic_socks`` sockhash.

Theory of operation (see ``bpf/quic_redirect.bpf.c`` and docs/kernel-facts.md, facts 50 and 52):
a flow is two *connected* UDP sockets: the client-facing one, bound to the listener's address
and port with ``SO_REUSEPORT`` and connected to the client (the kernel's UDP lookup prefers it
to the listener's unconnected socket for that client's datagrams), and the upstream one,
connected to the target. :meth:`QuicPlane.register` puts both into the maps; from then on the
kernel redirects every datagram either socket receives to the other one's egress, which sends
it to its connected peer, one datagram for one. Python keeps only the bookkeeping:

* Registration order (no datagram lost): the ``quic_counts`` entries, both sockets into
  ``quic_targets`` (no program: their receive path is unchanged), both ``quic_peer`` entries,
  then both sockets into ``quic_socks`` (the verdict program). Every datagram the program sees
  has a redirect target. Datagrams that were queued before the insert stay in the socket's own
  queue, whole: the caller reads them (until ``EAGAIN``) and relays them in userspace.
* The program never passes a datagram to its own socket (a passed datagram loses its
  boundaries, fact 52); what it cannot redirect (an empty datagram, a peer that is gone) it
  drops and counts (:meth:`QuicPlane.counters`).
* :meth:`QuicPair.counts` (one flow) and :meth:`QuicPlane.all_counts` (every socket, one batch)
  read what each socket received and redirected, counted by the program with atomic adds.
* Removal on every exit path: :meth:`QuicPair.release` (or the end of a ``with`` block on the
  pair) deletes every entry with plain syscalls (no checkpoint), ``quic_socks`` first, so
  cancellation cannot skip it; afterwards the sockets are plain UDP sockets again. Datagrams
  redirected but not sent yet when a socket leaves ``quic_targets`` are discarded with its
  psock (reading, ``net/core/skmsg.c`` ``sk_psock_destroy``); UDP allows it, QUIC retransmits.
  :meth:`QuicPlane.close` takes out every flow still registered before it closes the fds.

Map and program fds are owned by one :class:`QuicPlane`, loaded once and closed with
:meth:`QuicPlane.close`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from types import TracebackType

import attrs
import trio_sni_loader as loader

from .layout import QUIC_COUNT, QUIC_MAPS, QUIC_OBJECT, QUIC_PROGRAM, QuicCounter
from .objects import prebuilt_spec
from .sockhash import socket_cookie
from .verdict import VerdictPlane

#: The two sides of a flow, in the order :meth:`QuicPlane.register` takes their sockets.
SIDES = ("client", "upstream")


@attrs.define(eq=False)
class QuicPair:
    """One registered flow: the two sockets' cookies, and access to their BPF state.

    ``client_cookie`` is the client-facing socket's (what it receives goes upstream),
    ``upstream_cookie`` the upstream socket's (what it receives goes to the client).
    """

    plane: QuicPlane
    client_cookie: int
    upstream_cookie: int
    released: bool = False

    def cookie(self, side: str) -> int:
        """The cookie of ``side``'s socket (``"client"`` or ``"upstream"``)."""
        if side not in SIDES:
            raise ValueError(f"side must be 'client' or 'upstream', not {side!r}")
        return self.client_cookie if side == "client" else self.upstream_cookie

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{"client": (datagrams, bytes), "upstream": (datagrams, bytes)}``: what each side's
        socket received and the kernel redirected to the other side (UDP payload bytes).
        ``(0, 0)`` for a side whose entry is gone (after :meth:`release`).

        Raises:
            ValueError: the plane is closed.
        """
        out = {}
        for side in SIDES:
            raw = self.plane.counts_map.lookup(self.cookie(side))
            out[side] = (0, 0) if raw is None else _count(raw)
        return out

    def release(self) -> None:
        """Take both sockets out of the data plane: delete every entry :meth:`QuicPlane.register`
        made (plain syscalls, no checkpoint: cancellation cannot skip it). Idempotent, and a
        no-op once the plane is closed. The sockets stay open (the caller closes them); what
        they receive from now on goes to their own queues.
        """
        plane = self.plane
        if plane.closed or self.released:
            return
        self.released = True
        plane.registered -= 1
        cookies = (self.client_cookie, self.upstream_cookie)
        maps = (plane.socks, plane.peer_map, plane.counts_map, plane.targets)
        plane._delete([(m, c) for m in maps for c in cookies])

    def __enter__(self) -> QuicPair:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _count(raw: bytes) -> tuple[int, int]:
    datagrams, nbytes = QUIC_COUNT.unpack(raw)
    return datagrams, nbytes


class QuicPlane(VerdictPlane):
    """The loaded QUIC data plane. ``QuicPlane.load(max_flows=...)``, closed by :meth:`close`.

    Raises from :meth:`load`: ``FileNotFoundError`` (no prebuilt object), or any
    :class:`loader.LoaderError` (no privilege, verifier, kernel without the feature); nothing is
    left open when it raises.

    :meth:`counters`: ``redirected`` and ``redirected_bytes``, then the datagrams the program
    dropped: ``redirect_failures`` (peer gone), ``no_peer``, ``empty``, ``pull_failures`` (no
    memory to make a paged datagram linear).
    """

    counter_names = QuicCounter

    def __init__(self, collection: loader.Collection, link: loader.Link) -> None:
        super().__init__(collection, link)
        maps = collection.maps
        self.socks = maps["quic_socks"]
        self.targets = maps["quic_targets"]
        self.peer_map = maps["quic_peer"]
        self.counts_map = maps["quic_counts"]
        for m in (self.socks, self.targets, self.peer_map, self.counts_map):
            m.key_codec = loader.Int()
        self.peer_map.value_codec = loader.Int()
        #: Flows registered now (no map walk: for status pages).
        self.registered = 0

    @classmethod
    def load(cls, *, max_flows: int = 32768) -> QuicPlane:
        """Load ``quic_redirect.bpf.o`` with room for ``max_flows`` flows (two sockets each)
        and attach its verdict program to ``quic_socks``.

        Raises:
            ValueError: ``max_flows`` is not positive.
            FileNotFoundError: the prebuilt object is missing.
            loader.LoaderError: the object is stale, or the kernel refused a map, the program
                or the attach (``MissingPrivilegeError`` without ``CAP_BPF`` and
                ``CAP_NET_ADMIN``).
        """
        if max_flows < 1:
            raise ValueError(f"max_flows must be at least 1, not {max_flows}")
        spec = prebuilt_spec(QUIC_OBJECT, QUIC_MAPS, [QUIC_PROGRAM])
        # Two sockets per flow in each sockhash, two entries per flow in each hash.
        maps = {
            name: (m.copy(max_entries=2 * max_flows) if name != "counters" else m)
            for name, m in spec.maps.items()
        }
        return cls._load(spec.copy(maps=maps), QUIC_PROGRAM, "quic_socks")

    def _release(self) -> None:
        """Take out every socket still registered before the fds close: closing them alone
        frees nothing while a flow is registered (the program holds ``quic_targets``, and each
        socket in it holds the program, so the kernel would go on relaying for those sockets
        until they close; docs/kernel-facts.md, fact 52). Afterwards they are plain UDP
        sockets."""
        entries: list[tuple[loader.Map, int]] = []
        for m in (self.socks, self.peer_map, self.counts_map, self.targets):
            with contextlib.suppress(OSError, ValueError):
                entries += [(m, cookie) for cookie in list(m.keys())]
        self._delete(entries)

    def all_counts(self) -> dict[int, tuple[int, int]]:
        """``{cookie: (datagrams, bytes) redirected}`` for every registered socket, read in one
        batch (docs/kernel-facts.md, fact 23)."""
        return {cookie: _count(raw) for cookie, raw in self.counts_map.lookup_batch()}

    def entries(self) -> dict[str, int]:
        """Entries in each per-flow map (all zero when no flow is registered)."""
        return {
            name: sum(1 for _ in m.keys())  # noqa: SIM118 - a BPF map, not a dict
            for name, m in (
                ("quic_socks", self.socks),
                ("quic_targets", self.targets),
                ("quic_peer", self.peer_map),
                ("quic_counts", self.counts_map),
            )
        }

    def register(self, client: socket.socket, upstream: socket.socket) -> QuicPair:
        """Put ``client`` (the client-facing socket) and ``upstream`` in the data plane until
        the returned pair's :meth:`QuicPair.release` (or the end of a ``with`` block on it): the
        kernel sends what either receives out of the other until then.

        Both must be UDP sockets connected to their peer (docs/kernel-facts.md, fact 50: an
        egress redirect sends as if by ``send()``). Datagrams already queued on either socket
        stay there: after this, read each socket until ``EAGAIN`` and relay what it gave in
        userspace (each datagram arriving later makes the kernel redirect the oldest queued
        one, so an unread queue never shrinks by itself; fact 52).

        Raises:
            ValueError: a socket is not a connected UDP socket, or both are the same socket.
            OSError: a map is full, a socket is registered already (``EEXIST``), or the kernel
                refused a socket. No entry is left then, and nothing was redirected.
        """
        for side, sock in zip(SIDES, (client, upstream), strict=True):
            _check_connected_udp(side, sock)
        c, u = socket_cookie(client), socket_cookie(upstream)
        if c == u:
            raise ValueError("QUIC registration: the client and upstream sockets are the same")
        made: list[tuple[loader.Map, int]] = []
        try:
            # NOEXIST: a socket of another flow is refused before anything of ours is written.
            for cookie in (c, u):
                self.counts_map.update(cookie, QUIC_COUNT.pack(0, 0), loader.UpdateFlag.NOEXIST)
                made.append((self.counts_map, cookie))
            for cookie, sock in ((c, client), (u, upstream)):
                self.targets.insert_socket(cookie, sock)
                made.append((self.targets, cookie))
            for cookie, peer in ((c, u), (u, c)):
                self.peer_map.update(cookie, peer, loader.UpdateFlag.NOEXIST)
                made.append((self.peer_map, cookie))
            for cookie, sock in ((c, client), (u, upstream)):
                self.socks.insert_socket(cookie, sock)
                made.append((self.socks, cookie))
            self.registered += 1
            return QuicPair(self, c, u)
        except BaseException:
            self._delete(made)
            raise

    def _delete(self, entries: list[tuple[loader.Map, int]]) -> None:
        """Delete map entries, ``quic_socks`` first (no more verdicts) and ``quic_targets``
        last (a verdict still running finds its target); plain syscalls."""

        def order(entry: tuple[loader.Map, int]) -> int:
            return 0 if entry[0] is self.socks else 2 if entry[0] is self.targets else 1

        for m, cookie in sorted(entries, key=order):
            with contextlib.suppress(OSError, ValueError):
                m.delete(cookie)


def _check_connected_udp(side: str, sock: socket.socket) -> None:
    if sock.type != socket.SOCK_DGRAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"QUIC registration: the {side} socket is not a UDP socket: {sock!r}")
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        raise ValueError(
            f"QUIC registration: the {side} socket is not connected (an egress redirect needs "
            "a destination, docs/kernel-facts.md, fact 50)"
        ) from None
