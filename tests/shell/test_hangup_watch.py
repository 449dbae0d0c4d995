"""trio_sni.forward._hangup_watch (private to the kernel forwarder): one epoll instance and
one Trio task for many sockets' hang-ups."""

from __future__ import annotations

import select
import socket

import trio
import trio.testing
from proxytest import wait_for

from trio_sni.forward._hangup_watch import HangupWatch


async def test_hang_ups_reach_the_right_callback_and_the_task_ends_with_the_last_fd() -> None:
    watch = HangupWatch()
    pairs = [socket.socketpair() for _ in range(3)]
    seen: list[tuple[int, int]] = []
    try:
        with (
            watch.watch(pairs[0][0].fileno(), lambda mask: seen.append((0, mask))),
            watch.watch(pairs[1][0].fileno(), lambda mask: seen.append((1, mask))),
            watch.watch(pairs[2][0].fileno(), lambda mask: seen.append((2, mask))),
        ):
            assert watch.running
            pairs[2][0].send(b"data: not a hang-up")
            pairs[1][1].shutdown(socket.SHUT_WR)
            await wait_for(lambda: bool(seen))
            await trio.sleep(0.05)
            assert [who for who, _ in seen] == [1]  # edge-triggered: once
            assert seen[0][1] & select.EPOLLRDHUP
        await wait_for(lambda: not watch.running)  # nothing watched: the task ends
    finally:
        for a, b in pairs:
            a.close()
            b.close()


async def test_the_periodic_job_runs_when_it_asks_while_something_is_watched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    runs: list[float] = []

    def job() -> float:
        runs.append(trio.current_time())
        return 2.0

    watch = HangupWatch(job)
    a, b = socket.socketpair()
    try:
        start = trio.current_time()
        with watch.watch(a.fileno(), lambda mask: None):
            await trio.sleep(5)
        assert [round(t - start, 6) for t in runs] == [0, 2, 4]
    finally:
        a.close()
        b.close()


async def test_a_failing_callback_is_logged_and_the_watch_goes_on(caplog: object) -> None:
    watch = HangupWatch()
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    later: list[int] = []

    def broken(mask: int) -> None:
        raise RuntimeError("callback bug")

    try:
        with watch.watch(a.fileno(), broken), watch.watch(c.fileno(), later.append):
            b.shutdown(socket.SHUT_WR)
            await trio.sleep(0.05)
            d.shutdown(socket.SHUT_WR)
            await wait_for(lambda: bool(later))
        assert "callback failed" in caplog.text  # type: ignore[attr-defined]
    finally:
        for s in (a, b, c, d):
            s.close()
