"""The namespace helper itself: reachable both ways over v4 and v6, and no route out."""

import socket
import subprocess

import pytest
from netns import veth_namespace

pytestmark = pytest.mark.root


def connect_from(ns, family, host):
    with socket.socket(family) as server:
        server.bind((host, 0))
        server.listen()
        with ns.socket(family) as client:
            client.settimeout(5)
            client.connect((host, server.getsockname()[1]))
            conn, addr = server.accept()
            conn.close()
            return addr[0]


def test_two_namespaces_reach_their_host_ends_and_nothing_else():
    with veth_namespace(0) as a, veth_namespace(1) as b:
        assert connect_from(a, socket.AF_INET, a.host_v4) == a.peer_v4
        assert connect_from(b, socket.AF_INET6, b.host_v6) == b.peer_v6
        assert a.run("ip", "route", "get", "192.0.2.1", check=False).returncode != 0
    assert a.host_if not in {name for _, name in socket.if_nameindex()}
    assert (
        a.name
        not in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
    )
