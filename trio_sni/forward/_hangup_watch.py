"""One epoll instance for many sockets' hang-ups (and a few other fds), watched by one Trio task.

The kernel forwarder watches its sockets' hang-ups with it; the userspace relay
(:mod:`._relay`) watches its sockets' readiness with it, and asks for no back-off after an
empty wake-up (edge-triggered readiness that was consumed before the poll looks like one).

Why not one per connection (or Trio's own ``wait_readable`` on each socket): a spliced socket
must be watched for ``EPOLLRDHUP`` only (``POLLIN`` spins while the kernel forwards, see
docs/kernel-facts.md, "poll(POLLIN) on spliced sockets"), which Trio cannot ask for; and an
epoll instance nested in Trio's is woken by the traffic on its sockets even when nothing it
watches happened. With one instance for every
connection, those spurious wake-ups cost one look per :data:`SPURIOUS_BACKOFF` in total rather
than per connection, and a thousand quiet connections cost nothing at all.

The task also runs one periodic job for its owner (``periodic()`` returns the seconds until it
wants to run again; :meth:`HangupWatch.poke` runs it at once), so the owner needs no timer or
task per connection either. The task is a Trio system task started by the first
:meth:`HangupWatch.watch` of a run; it ends, and closes the epoll instance, once nothing is
watched any more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
from collections.abc import Callable, Iterator

import trio

log = logging.getLogger("trio_sni")

#: After a wake-up that reported nothing, wait this long before watching the epoll instance
#: again: a hang-up is then seen at most this late while bytes flow.
SPURIOUS_BACKOFF = 0.02

#: The events every watched fd is registered for (errors and hang-ups are always reported).
HANGUP = select.EPOLLRDHUP | select.EPOLLET


class HangupWatch:
    """Calls ``callback(events)`` when a watched fd reports EPOLLRDHUP, EPOLLERR or EPOLLHUP.

    Callbacks run in the watch task: they must not block and should not raise (an exception is
    logged and the watch goes on).
    """

    def __init__(
        self,
        periodic: Callable[[], float] | None = None,
        *,
        spurious_backoff: float = SPURIOUS_BACKOFF,
        keep_epoll: bool = False,
    ) -> None:
        self._periodic = periodic
        self._spurious_backoff = spurious_backoff
        #: Keep the epoll instance, also while nothing is watched, until :meth:`close`: a watch
        #: every connection uses must not need a new fd to go on (see :meth:`open`).
        self._keep_epoll = keep_epoll
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._epoll: select.epoll | None = None
        self._token: trio.lowlevel.TrioToken | None = None  # the run the task lives in
        self._waiting: trio.CancelScope | None = None  # the task's current wait
        self._poked = False

    @property
    def running(self) -> bool:
        return self._token is not None

    @contextlib.contextmanager
    def watch(
        self, fd: int, callback: Callable[[int], None], events: int = HANGUP
    ) -> Iterator[None]:
        """Watch ``fd`` for the ``with`` block (see :meth:`add`)."""
        self.add(fd, callback, events)
        try:
            yield
        finally:
            self.forget(fd)

    def add(self, fd: int, callback: Callable[[int], None], events: int = HANGUP) -> None:
        """Watch ``fd`` until :meth:`forget`: edge-triggered hang-up and errors, or other
        ``events`` (e.g. level-triggered ``EPOLLIN`` on a BPF ring buffer)."""
        epoll = self._start()
        epoll.register(fd, events)
        self._callbacks[fd] = callback

    def forget(self, fd: int) -> None:
        """Stop watching ``fd`` (no-op if not watched), also before its ``with`` block ends
        (e.g. a socket that was reset: it would report EPOLLHUP again on every wake-up, and
        there is nothing more to learn)."""
        if self._callbacks.pop(fd, None) is None:
            return
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)
        if not self._callbacks and self._waiting is not None:
            self._waiting.cancel()  # let the task end now

    def poke(self) -> None:
        """Run the periodic job as soon as the task gets control (the owner has work due now,
        e.g. a callback or another task changed its state)."""
        self._poked = True
        if self._waiting is not None:
            self._waiting.cancel()

    def open(self) -> None:
        """Make the (kept) epoll instance now rather than at the first :meth:`add`, when the
        proxy may be at its fd limit already."""
        if self._epoll is None:
            self._epoll = select.epoll()

    def modify(self, fd: int, events: int) -> None:
        """Watch ``fd`` for ``events`` from now on (it stays watched, with its callback)."""
        if self._epoll is not None:
            self._epoll.modify(fd, events)

    def errors_only(self, fd: int) -> None:
        """Stop reporting ``fd``'s hang-up (it stays visible and would be reported again on
        every wake-up); errors and EPOLLHUP still are."""
        if self._epoll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.modify(fd, select.EPOLLET)

    def _start(self) -> select.epoll:
        token = trio.lowlevel.current_trio_token()
        if self._token is not token:
            # First use in this run (a task of an earlier run ended with that run).
            if self._epoll is not None and not self._keep_epoll:
                self._epoll.close()
                self._epoll = None
            if self._epoll is None:
                self._epoll = select.epoll()
            self._token = token
            trio.lowlevel.spawn_system_task(self._run, self._epoll, name="trio_sni hang-up watch")
        assert self._epoll is not None
        return self._epoll

    async def _run(self, epoll: select.epoll) -> None:
        try:
            next_job = trio.current_time()
            spurious = False
            while self._callbacks:
                now = trio.current_time()
                if self._periodic is not None and (self._poked or now >= next_job):
                    self._poked = False
                    next_job = now + self._run_periodic()
                timeout = max(0.0, next_job - now) if self._periodic is not None else math.inf
                with trio.move_on_after(
                    min(timeout, self._spurious_backoff) if spurious else timeout
                ) as self._waiting:
                    if spurious:
                        await trio.sleep_forever()
                    else:
                        await trio.lowlevel.wait_readable(epoll.fileno())
                woke = not spurious and not self._waiting.cancelled_caught
                self._waiting = None
                events = epoll.poll(0)
                for fd, mask in events:
                    callback = self._callbacks.get(fd)
                    if callback is not None:
                        self._call(callback, mask)
                spurious = woke and not events and self._spurious_backoff > 0
        finally:
            if self._epoll is epoll:
                self._token = None
                self._waiting = None
                if not self._keep_epoll:
                    self._epoll = None
            if self._epoll is not epoll:
                epoll.close()

    def close(self) -> None:
        """Close a kept epoll instance (now, or when the task ends if it still runs)."""
        self._keep_epoll = False
        if self._token is None and self._epoll is not None:
            self._epoll.close()
            self._epoll = None

    def _run_periodic(self) -> float:
        assert self._periodic is not None
        try:
            return self._periodic()
        except Exception:
            log.exception("hang-up watch: periodic job failed")
            return 1.0

    @staticmethod
    def _call(callback: Callable[[int], None], mask: int) -> None:
        try:
            callback(mask)
        except Exception:
            log.exception("hang-up watch: callback failed")
