"""docs/kernel-facts.md, fact 51, which the copy relay relies on to save a read per wake-up: a
TCP read shorter than asked for empties the receive queue, and every later arrival makes a new
edge-triggered event; a FIN already queued is reported with the event that was taken."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import pytest

_WATCH = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET


@pytest.fixture
def connection() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    receiver.setblocking(False)
    with sender, receiver:
        yield sender, receiver


def _events(ep: select.epoll, timeout: float) -> int:
    return sum(mask for _fd, mask in ep.poll(timeout))


def test_after_a_short_read_each_new_segment_makes_a_new_edge(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = connection
    with select.epoll() as ep:
        ep.register(receiver.fileno(), _WATCH)
        for round_ in range(200):
            message = bytes([round_ % 256]) * (1 + round_ * 7 % 3000)
            sender.sendall(message)
            assert _events(ep, 2.0) & select.EPOLLIN
            got = receiver.recv(65536)
            assert got == message  # short: everything queued, in one read
            with pytest.raises(BlockingIOError):
                receiver.recv(65536)  # what the relay no longer asks


def test_a_fin_queued_behind_the_bytes_comes_with_the_event_not_a_new_one(
    connection: tuple[socket.socket, socket.socket],
) -> None:
    sender, receiver = connection
    with select.epoll() as ep:
        ep.register(receiver.fileno(), _WATCH)
        sender.sendall(b"last words")
        sender.shutdown(socket.SHUT_WR)
        time.sleep(0.05)  # both arrived before the event is taken
        mask = _events(ep, 2.0)
        assert mask & select.EPOLLIN
        assert mask & select.EPOLLRDHUP
        assert receiver.recv(65536) == b"last words"  # short, and the FIN is still queued
        assert _events(ep, 0.1) == 0  # no new edge: the reader must act on RDHUP it was given
        assert receiver.recv(65536) == b""
