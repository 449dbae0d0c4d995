"""The kernel data plane: a loaded ``sockhash.bpf.o`` with its verdict program attached.

Theory of operation (see ``bpf/sockhash.bpf.c`` and docs/kernel-facts.md):
:meth:`SockhashPlane.register` puts a connection's two sockets into the sockhash, after which
the kernel redirects every byte either socket receives to the other one's egress. Python keeps
only the bookkeeping:

* Registration order (no byte stranded or reordered): both sockets into ``targets`` (no
  program, so their receive path is unchanged), the ``progress`` and ``peer`` entries, then the
  sockets into ``sock_hash`` (the verdict program), then a ``recv(MSG_DONTWAIT)`` "kick" on each
  so bytes that arrived before the insert are forwarded now rather than on the next segment.
* A socket whose ``sock_hash`` insert fails (its peer half-closed or reset in the meantime,
  or any other error once the first socket is in) is left out: its direction is marked
  ``stopped`` and is forwarded in userspace by the caller. Giving up the whole registration
  then would lose bytes: the first socket may have redirected some already, and they wait in
  the peer's psock, which is purged when the peer leaves ``targets``.
* The in-flight bound is enforced by the verdict program itself (it reads the peer's
  ``write_seq``), so nothing needs to be refreshed from Python. The program announces each
  stopped socket's cookie in the ``stops`` ring buffer (:attr:`SockhashPlane.stops`, whose fd
  is epoll-readable while records wait); :meth:`SockhashPlane.all_progress` reads every
  socket's progress in one batch.
* Removal on every exit path: :meth:`SockhashPair.release` (or the end of a ``with`` block on
  the pair) deletes every entry, with plain syscalls (no checkpoint), so cancellation cannot
  skip it.

Map and program fds are owned by one :class:`SockhashPlane`, loaded once at startup and
closed with :meth:`SockhashPlane.close`.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from types import TracebackType

import attrs
import trio_sni_loader as loader

from .layout import PEER_INFO, PROGRESS, SOCKHASH_MAPS, SOCKHASH_PROGRAM, Counter, Direction
from .objects import prebuilt_spec
from .verdict import VerdictPlane

#: ``SO_COOKIE`` (not in Python's socket module): the socket's 64-bit cookie.
SO_COOKIE = 57


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's cookie for ``sock`` (what ``bpf_get_socket_cookie`` returns)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


@attrs.define(eq=False)
class SockhashPair:
    """One registered connection: cookies, and access to its per-socket BPF state.

    ``stopped_at_insert`` lists the sides (``"client"``, ``"upstream"``) whose socket could not
    be put into ``sock_hash``: their received bytes stay in the socket (userspace reads them).
    ``reset_at_kick`` lists the sides whose hand-off kick read a reset: the kernel reports a
    reset once, so the caller must take it from here.
    """

    plane: SockhashPlane
    client_cookie: int
    upstream_cookie: int
    bound: int
    stopped_at_insert: tuple[str, ...] = ()
    reset_at_kick: tuple[str, ...] = ()

    def cookie(self, side: str) -> int:
        return self.client_cookie if side == "client" else self.upstream_cookie

    def progress(self, side: str) -> tuple[int, bool]:
        """``(bytes redirected from side's socket so far, stopped?)``."""
        if side in self.stopped_at_insert:
            return 0, True
        raw = self.plane.progress_map.lookup(self.cookie(side))
        if raw is None:
            return 0, True
        return _progress(raw)

    def release(self, *, closing: bool = False) -> None:
        """Take both sockets out of the data plane: delete every entry :meth:`SockhashPlane.
        register` made (plain syscalls, no checkpoint: cancellation cannot skip it).

        ``closing``: the caller closes both sockets right after. Closing takes a socket out of
        ``sock_hash`` and ``targets`` by itself (docs/kernel-facts.md, "removal on close"), so
        only the ``peer`` and ``progress`` entries are deleted: 4 bpf() calls instead of 8 on
        every connection's end. Without their ``peer`` entries, the verdict passes whatever
        the sockets still receive to their own queues, as after a full release.
        """
        plane = self.plane
        if plane.closed:
            return
        entries = []
        if not closing:
            entries = [
                (plane.sock_hash, self.cookie(side))
                for side in ("client", "upstream")
                if side not in self.stopped_at_insert
            ]
            entries += [(plane.targets, self.client_cookie), (plane.targets, self.upstream_cookie)]
        for m in (plane.peer_map, plane.progress_map):
            entries += [(m, self.client_cookie), (m, self.upstream_cookie)]
        plane._delete(entries)

    def __enter__(self) -> SockhashPair:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def _set_peer(self, side: str) -> None:
        peer = self.upstream_cookie if side == "client" else self.client_cookie
        direction = Direction.TO_UPSTREAM if side == "client" else Direction.TO_CLIENT
        self.plane.peer_map.update(
            self.cookie(side), PEER_INFO.pack(peer, self.bound, direction, 0)
        )


def _progress(raw: bytes) -> tuple[int, bool]:
    redirected, stopped, _started, _seq0, _pad = PROGRESS.unpack(raw)
    return redirected, bool(stopped)


class SockhashPlane(VerdictPlane):
    """The loaded data plane. ``SockhashPlane.load(max_entries=...)``, closed by :meth:`close`.

    Raises from :meth:`load`: ``FileNotFoundError`` (no prebuilt object), or any
    :class:`loader.LoaderError` (no privilege, verifier, kernel without the feature); nothing is
    left open when it raises.
    """

    counter_names = Counter

    def __init__(self, collection: loader.Collection, link: loader.Link) -> None:
        super().__init__(collection, link)
        maps = collection.maps
        self.sock_hash = maps["sock_hash"]
        self.targets = maps["targets"]
        self.peer_map = maps["peer"]
        self.progress_map = maps["progress"]
        for m in (self.sock_hash, self.targets, self.peer_map, self.progress_map):
            m.key_codec = loader.Int()
        #: Cookies of the sockets the program stopped (8 bytes each, little-endian).
        self.stops = loader.RingReader(maps["stops"])

    @classmethod
    def load(cls, *, max_entries: int = 65536) -> SockhashPlane:
        spec = prebuilt_spec("sockhash.bpf.o", SOCKHASH_MAPS, [SOCKHASH_PROGRAM])
        # Two sockets per connection in each sockhash, two entries per connection in each hash.
        maps = {
            name: (m.copy(max_entries=2 * max_entries) if name not in ("counters", "stops") else m)
            for name, m in spec.maps.items()
        }
        return cls._load(spec.copy(maps=maps), SOCKHASH_PROGRAM, "sock_hash")

    def _release(self) -> None:
        self.stops.close()

    def stopped_cookies(self) -> list[int]:
        """Cookies of the sockets stopped since the last call (from the ``stops`` ring)."""
        return [int.from_bytes(record[:8], "little") for record in self.stops.read()]

    def all_progress(self) -> dict[int, tuple[int, bool]]:
        """``{cookie: (bytes redirected, stopped?)}`` for every registered socket, read in one
        batch (about 0.1 µs per entry, docs/kernel-facts.md, "bpf() lookup cost")."""
        return {cookie: _progress(raw) for cookie, raw in self.progress_map.lookup_batch()}

    def entries(self) -> dict[str, int]:
        """Entries in each per-connection map (all zero when no connection is registered)."""
        return {
            name: sum(1 for _ in m.keys())  # noqa: SIM118 - a BPF map, not a dict
            for name, m in (
                ("sock_hash", self.sock_hash),
                ("targets", self.targets),
                ("peer", self.peer_map),
                ("progress", self.progress_map),
            )
        }

    def register(
        self, client: socket.socket, upstream: socket.socket, *, bound: int
    ) -> SockhashPair:
        """Put ``client`` and ``upstream`` in the sockhash until the returned pair's
        :meth:`SockhashPair.release` (or the end of a ``with`` block on it): the kernel
        redirects what either receives to the other until then.

        Send whatever the proxy already read from the client to ``upstream`` *before* this
        (docs/kernel-facts.md, fact 7). ``bound`` is the in-flight bound per direction: the
        most bytes one socket may have redirected that the other has not taken into its send
        queue.

        Raises:
            OSError: a socket could not be added to ``targets`` (e.g. ``EOPNOTSUPP``: it is not
                ESTABLISHED any more, the client already half-closed), a map is full, or the
                first ``sock_hash`` insert failed with another error. Nothing was redirected
                then and no entry is left: copy in userspace instead.
        """
        c, u = socket_cookie(client), socket_cookie(upstream)
        made: list[tuple[loader.Map, int]] = []
        try:
            for cookie in (c, u):
                self.progress_map.update(cookie, PROGRESS.pack(0, 0, 0, 0, 0))
                made.append((self.progress_map, cookie))
            for cookie, sock in ((c, client), (u, upstream)):
                self.targets.insert_socket(cookie, sock)
                made.append((self.targets, cookie))
            pair = SockhashPair(self, c, u, bound)
            for side, cookie in (("client", c), ("upstream", u)):
                pair._set_peer(side)
                made.append((self.peer_map, cookie))
            stopped: list[str] = []
            for side, cookie, sock in (("client", c, client), ("upstream", u, upstream)):
                try:
                    self.sock_hash.insert_socket(cookie, sock)
                except OSError as exc:
                    redirecting = any(m is self.sock_hash for m, _ in made)
                    if not redirecting and exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise  # nothing redirected yet: the caller copies the connection
                    stopped.append(side)  # its bytes stay in its own queue: userspace
                else:
                    made.append((self.sock_hash, cookie))
            pair.stopped_at_insert = tuple(stopped)
            pair.reset_at_kick = tuple(
                side
                for side, sock in (("client", client), ("upstream", upstream))
                if side not in stopped and _kick(sock)
            )
            return pair
        except BaseException:
            self._delete(made)
            raise

    def _delete(self, entries: list[tuple[loader.Map, int]]) -> None:
        """Delete map entries, ``sock_hash`` first (no more verdicts); plain syscalls."""
        for m, cookie in sorted(entries, key=lambda mc: mc[0] is not self.sock_hash):
            with contextlib.suppress(OSError, ValueError):
                m.delete(cookie)


def _kick(sock: socket.socket) -> bool:
    """``recv(MSG_DONTWAIT)``: makes the kernel run the verdict on bytes already queued.

    Returns whether it read a reset (which it consumed: the caller must pass it on). Nothing
    can be returned by design (no skb was SK_PASSed yet); if something is, the registration
    order is broken and forwarding would reorder bytes, so fail loudly.
    """
    try:
        data = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    if data:
        raise RuntimeError("sockhash registration: a byte was queued on the proxy's socket")
    return False
