"""The protocol keys of the config: socks5, rules' via/proxy_protocol, listeners'
protocol/accept_proxy_protocol. Old configs load unchanged; every problem has its path."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from trio_sni.sansio.config import Listener, Socks5
from trio_sni.sansio.config_load import dump_config, load_config
from trio_sni.sansio.errors import ConfigError

BASE: dict[str, Any] = {"listen_addr": "127.0.0.1:8443", "rules": [{"suffix": "example.test"}]}


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    return info.value.problems


def test_defaults_keep_old_configs_as_they_were() -> None:
    config = load_config(BASE)
    assert config.socks5 is None
    [rule] = config.rules
    assert (rule.via, rule.proxy_protocol) == (None, None)
    [listener] = config.effective_listeners
    assert (listener.protocol, listener.target_port, listener.accept_proxy_protocol) == (
        "tls",
        443,
        False,
    )
    dumped = dump_config(config)
    assert dumped["socks5"] is None
    assert load_config(dumped) == config  # the dump loads back to the same config


def test_http_listener_defaults_to_port_80_unless_told() -> None:
    config = load_config(
        {
            "listeners": [
                {"host": "127.0.0.1", "port": 8080, "protocol": "http"},
                {"host": "127.0.0.1", "port": 8081, "protocol": "http", "target_port": 8000},
                {"host": "::1", "port": 8443, "accept_proxy_protocol": True},
            ],
        }
    )
    assert [(li.protocol, li.target_port, li.accept_proxy_protocol) for li in config.listeners] == [
        ("http", 80, False),
        ("http", 8000, False),
        ("tls", 443, True),
    ]
    assert Listener("127.0.0.1", 1, 8443) == Listener(host="127.0.0.1", port=1, target_port=8443)


def test_socks5_section_and_per_rule_choices() -> None:
    config = load_config(
        {
            **BASE,
            "socks5": {"address": "[::1]:1080", "username": "u", "password": "pässword"},
            "rules": [
                {"suffix": "a.test", "via": "direct", "proxy_protocol": "v2"},
                {"suffix": "b.test", "via": "socks5", "proxy_protocol": "v1"},
            ],
        }
    )
    assert config.socks5 == Socks5(address="[::1]:1080", username="u", password="pässword")
    assert config.socks5.endpoint == (ipaddress.ip_address("::1"), 1080)
    assert config.socks5.remote_dns is True
    assert [(r.via, r.proxy_protocol) for r in config.rules] == [("direct", "v2"), ("socks5", "v1")]


def test_every_problem_with_its_path() -> None:
    assert problems(
        {
            "listeners": [
                {
                    "host": "127.0.0.1",
                    "port": 80,
                    "protocol": "gopher",
                    "accept_proxy_protocol": "yes",
                }
            ],
            "rules": [{"suffix": "a.test", "via": "tor", "proxy_protocol": 2}],
            "socks5": {
                "address": "proxy.example:1080",
                "password": "p",
                "remote_dns": 1,
                "user": "u",
            },
        }
    ) == [
        'listeners[0].protocol: expected one of "tls", "http", "quic", got "gopher"',
        "listeners[0].accept_proxy_protocol: expected true or false, got string",
        'rules[0].via: expected one of "direct", "socks5", got "tor"',
        'rules[0].proxy_protocol: expected one of "v1", "v2", got 2',
        "socks5.remote_dns: expected true or false, got number",
        "socks5.user: unknown key (allowed: address, username, password, remote_dns)",
        "socks5.address: 'proxy.example' is not an IP address; give the SOCKS5 server as "
        "'ip:port' or '[ipv6]:port'",
    ]
    assert problems({**BASE, "socks5": {"address": "proxy.example:1080", "password": "p"}}) == [
        "socks5.username: give both 'username' and 'password', or neither",
        "socks5.address: 'proxy.example' is not an IP address; give the SOCKS5 server as "
        "'ip:port' or '[ipv6]:port'",
    ]
    assert problems(
        {**BASE, "socks5": {"address": "127.0.0.1", "username": "", "password": "x" * 256}}
    ) == [
        "socks5.address: '127.0.0.1': expected 'host:port'",
        "socks5.username: must be 1 to 255 bytes of UTF-8",
        "socks5.password: must be 1 to 255 bytes of UTF-8",
    ]
    assert problems({**BASE, "socks5": {}}) == ["socks5.address: required key missing"]


def test_via_socks5_needs_the_section() -> None:
    assert problems(
        {**BASE, "rules": [{"suffix": "a.test"}, {"match": "b.test", "via": "socks5"}]}
    ) == [
        'rules[1]: "via": "socks5" needs a top-level "socks5" section with the SOCKS5 '
        "server's address"
    ]
