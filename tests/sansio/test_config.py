"""The config loader: the design's example loads; bad configs list every problem exactly."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trio_sni.defaults import default_config_text
from trio_sni.sansio.config import QOS_PRIORITY, Listener, Rule, TcConfig, parse_host_port
from trio_sni.sansio.config_load import dump_config, load_config, load_config_text
from trio_sni.sansio.errors import ConfigError

DESIGN_EXAMPLE = {
    "listen_addr": "0.0.0.0:8443",
    "max_connections": 50000,
    "ebpf": {
        "enabled": True,
        "sockmap": {"enabled": True, "max_entries": 65536},
        "dns_cache": {"enabled": True, "max_entries": 10000},
        "xdp": {"enabled": False, "interface": "eth0"},
        "stats": {"enabled": True, "per_cpu": True},
    },
    "fallback_mode": "auto",
}


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(data)
    return info.value.problems


def test_design_example_loads_with_defaults() -> None:
    config = load_config(DESIGN_EXAMPLE)
    assert config.effective_listeners == (Listener(host="0.0.0.0", port=8443, target_port=443),)
    assert config.ebpf.sockmap.max_entries == 65536
    assert config.ebpf.xdp.interface == "eth0"
    assert (config.ebpf.xdp.mode, config.ebpf.xdp.reject_quic) == ("auto", False)
    assert config.ebpf.xdp.flood_guard.per_source_rate == 100.0
    assert config.ebpf.xdp.flood_guard.global_rate == 0.0  # off unless asked for
    assert config.fallback_mode == "auto"
    assert config.rules == ()  # default deny
    assert config.timeouts.client_hello == 10.0


def test_embedded_default_config_loads() -> None:
    config = load_config_text(default_config_text())
    assert [(lst.host, lst.port) for lst in config.effective_listeners] == [
        ("127.0.0.1", 8443),
        ("::1", 8443),
    ]


def test_dump_round_trips() -> None:
    config = load_config(DESIGN_EXAMPLE)
    dumped = dump_config(config)
    json.dumps(dumped)  # JSON-ready
    assert load_config(dumped) == config


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    assert problems(
        {
            "listeners": [{"host": "127.0.0.1", "port": "8443", "bogus": 1}],
            "timeouts": {"idle": True},
            "lsten_addr": "x",
        }
    ) == [
        "listeners[0].port: expected int, got string",
        "listeners[0].bogus: unknown key "
        "(allowed: host, port, protocol, target_port, name, accept_proxy_protocol, "
        "proxy_protocol_from, optional)",
        "timeouts.idle: expected number, got bool",
        "lsten_addr: unknown key (allowed: listeners, listen_addr, max_connections, workers, "
        "rules, clients, limits, timeouts, resolver, forwarding, log, status, ebpf, "
        "fallback_mode, socks5)",
    ]


def test_validator_messages_carry_paths() -> None:
    assert problems(
        {
            "listeners": [{"host": "localhost", "port": 70000}],
            "rules": [
                {"match": "a.test", "suffix": "b.test"},
                {"regex": "("},
                {"match": "x.test", "action": "maybe"},
                {"match": "bad..name"},
                {"suffix": "ok.test", "target": "-x-:443"},
            ],
            "clients": {"allow": ["10.0.0.0/8", "zz"]},
            "limits": {"max_client_hello_size": 100000},
            "resolver": {"hosts": {"a.test": ["1.2.3.4", "x"]}, "nameservers": ["dns"]},
        }
    ) == [
        "listeners[0].host: 'localhost' is not an IP address",
        "listeners[0].port: must be from 0 to 65535, got 70000",
        "rules[0]: a rule needs exactly one of 'match', 'suffix' or 'regex' (got match, suffix)",
        "rules[1].regex: '(' does not compile: missing ), unterminated subpattern at position 0",
        'rules[2].action: expected one of "allow", "deny", got "maybe"',
        "rules[3].match: 'bad..name' is not a host name or '*.' followed by a host name",
        "rules[4].target: '-x-' is neither an IP address nor a host name",
        "clients.allow[1]: 'zz' is not an IP network (CIDR)",
        "limits.max_client_hello_size: must be from 512 to 65536, got 100000",
        "resolver.nameservers[0]: 'dns' is not an IP address[:port]",
        "resolver.hosts[\"a.test\"]: 'x' is not an IP address",
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, ["(top level): no listener: set 'listen_addr' or 'listeners'"]),
        ([], ["(top level): expected object, got list"]),
        ({"listen_addr": "1.2.3.4"}, ["listen_addr: '1.2.3.4': expected 'host:port'"]),
        (
            {"listen_addr": "eth0:80"},
            ["listen_addr: 'eth0' does not appear to be an IPv4 or IPv6 address"],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "listeners": [{"host": "::", "port": 1}]},
            ["(top level): give either 'listen_addr' or 'listeners', not both"],
        ),
        ({"listen_addr": "0.0.0.0:1", "rules": {}}, ["rules: expected list, got object"]),
        (
            {"listen_addr": "0.0.0.0:1", "listeners": [{}]},
            [
                "listeners[0].host: required key missing",
                "listeners[0].port: required key missing",
            ],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "fallback_mode": "sometimes"},
            ['fallback_mode: expected one of "auto", "copy", "none", got "sometimes"'],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "resolver": {"min_ttl": 10, "max_ttl": 1}},
            ["resolver.min_ttl: 10.0 is greater than max_ttl (1.0)"],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "ebpf": {"sockmap": {"max_entries": 0}}},
            ["ebpf.sockmap.max_entries: must be greater than 0, got 0"],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "status": {"listen": "x"}},
            ["status.listen: 'x': expected 'host:port'"],
        ),
        (
            {
                "listen_addr": "0.0.0.0:1",
                "rules": [
                    {"match": "a.test", "target": "a:b"},
                    {"match": "b.test", "target": "[::1"},
                ],
            },
            [
                "rules[0].target: 'a:b': port must be a number from 1 to 65535",
                "rules[1].target: '[::1': missing ']' after an IPv6 address",
            ],
        ),
        (
            {"listeners": [{"host": "::", "port": 1, "proxy_protocol_from": ["lb"]}]},
            ["listeners[0].proxy_protocol_from[0]: 'lb' is not an IP network (CIDR)"],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "forwarding": {"pipe_size": 8388608}},
            [
                "(top level): forwarding.pipe_size (8388608) exceeds ebpf.sockmap.max_in_flight "
                "(4194304), the per-connection bound on bytes in flight in every mode: lower "
                "pipe_size or raise max_in_flight"
            ],
        ),
        (
            {"listen_addr": "0.0.0.0:1", "ebpf": {"xdp": {"mode": "turbo", "reject_quic": "no"}}},
            [
                'ebpf.xdp.mode: expected one of "auto", "native", "generic", got "turbo"',
                "ebpf.xdp.reject_quic: expected true or false, got string",
            ],
        ),
        (
            {
                "listen_addr": "0.0.0.0:1",
                "ebpf": {
                    "xdp": {
                        "flood_guard": {
                            "per_source_rate": 10,
                            "per_source_burst": 0,
                            "global_rate": -1,
                        }
                    }
                },
            },
            [
                "ebpf.xdp.flood_guard.per_source_burst: must be at least 1 when per_source_rate "
                "is set",
                "ebpf.xdp.flood_guard.global_rate: must not be negative, got -1.0",
            ],
        ),
    ],
)
def test_bad_configs(data: Any, expected: list[str]) -> None:
    assert problems(data) == expected


def test_type_errors_and_value_errors_in_one_object_are_all_reported() -> None:
    assert problems({"listen_addr": "0.0.0.0:1", "timeouts": {"drain": -1, "idle": True}}) == [
        "timeouts.idle: expected number, got bool",
        "timeouts.drain: must not be negative, got -1.0",
    ]


def test_json_syntax_error_says_where() -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text('{"listen_addr": }', source="my.json")
    assert info.value.problems == ["my.json: not valid JSON: Expecting value at line 1 column 17"]


def test_rule_forms() -> None:
    assert Rule(match="*.example.com").label == "*.example.com"
    assert Rule(suffix="example.com", name="ex").label == "ex"
    with pytest.raises(ValueError, match="exactly one"):
        Rule()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:443", ("127.0.0.1", 443)),
        ("[::1]:8443", ("::1", 8443)),
        ("example.com:443", ("example.com", 443)),
    ],
)
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("::1", "write IPv6 addresses with a port"),
        ("[::1", "missing ']'"),
        ("x:0", "port must be a number from 1 to 65535"),
        (":80", "missing host"),
    ],
)
def test_parse_host_port_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_host_port(text)


def test_tc_defaults_and_qos_classes() -> None:
    config = load_config(
        {**DESIGN_EXAMPLE, "rules": [{"suffix": "video.example", "qos": "high"}, {"match": "a.b"}]}
    )
    tc = config.ebpf.tc
    assert (tc.enabled, tc.interface, tc.burst_bytes, tc.exempt) == (False, "eth0", 262144, ())
    assert tc.class_bps() == {"high": 0, "normal": 10_000_000, "bulk": 2_000_000}
    assert [rule.qos for rule in config.rules] == ["high", "normal"]
    assert QOS_PRIORITY == {"high": 6, "normal": 0, "bulk": 2}  # bpf/tc_shaper.bpf.c PRIO_*
    assert load_config(dump_config(config)) == config


def test_tc_buckets_hold_at_least_a_quarter_second_of_their_rate() -> None:
    tc = TcConfig(per_client_bps=100_000_000)
    assert tc.class_burst(10_000_000) == 312_500  # 0.25 s at 10 Mbit/s, above 256 KiB
    assert tc.class_burst(1_000_000) == tc.burst_bytes == 262144
    assert tc.class_burst(0) == 262144


def test_tc_problems_are_all_reported_with_paths() -> None:
    assert problems(
        {
            "listen_addr": "0.0.0.0:1",
            "rules": [{"match": "a.test", "qos": "urgent"}],
            "ebpf": {
                "tc": {
                    "interface": "eth 0",
                    "per_client_bps": 1000,
                    "high_bps": 10**12,
                    "burst_bytes": 65536,
                    "exempt": ["10.0.0.0/8", "nope"],
                    "rate": 1,
                }
            },
        }
    ) == [
        'rules[0].qos: expected one of "high", "normal", "bulk", got "urgent"',
        "ebpf.tc.rate: unknown key (allowed: enabled, interface, per_client_bps, high_bps, "
        "bulk_bps, burst_bytes, exempt)",
        "ebpf.tc.interface: 'eth 0' is not a network interface name "
        "(1 to 15 bytes, no '/' or spaces)",
        "ebpf.tc.per_client_bps: must be 0 (no cap) or from 8000 to 100000000000 bit/s, got 1000",
        "ebpf.tc.high_bps: must be 0 (no cap) or from 8000 to 100000000000 bit/s, "
        "got 1000000000000",
        "ebpf.tc.burst_bytes: must be from 262144 (GSO packets are up to 64 KiB; a smaller "
        "bucket starves them) to 1073741824, got 65536",
        "ebpf.tc.exempt[1]: 'nope' is not an IP network (CIDR)",
    ]
    assert problems({"listen_addr": "0.0.0.0:1", "ebpf": {"tc": {"exempt": ["::/0"] * 1025}}}) == [
        "ebpf.tc.exempt: at most 1024 networks, got 1025"
    ]
