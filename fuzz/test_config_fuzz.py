"""The config loader never fails with anything but ConfigError, whatever JSON it is given.

Two targets: arbitrary JSON values (mostly rejected at the top), and the design's example with
one value replaced somewhere in the tree by arbitrary JSON (mostly deep, field-level errors).
Every problem line must carry a path, so the operator can find it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_sni.sansio.config import Config
from trio_sni.sansio.config_load import dump_config, load_config
from trio_sni.sansio.errors import ConfigError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

VALID = {
    "listeners": [{"host": "127.0.0.1", "port": 8443, "target_port": 443}],
    "rules": [{"suffix": "example.com"}, {"match": "*.a.test", "action": "deny"}],
    "clients": {"allow": ["127.0.0.0/8"], "deny": []},
    "limits": {"per_client_connections": 10},
    "timeouts": {"client_hello": 5},
    "resolver": {"hosts": {"a.test": ["192.0.2.1"]}},
    "ebpf": {"sockmap": {"enabled": True, "max_entries": 1024}},
    "fallback_mode": "auto",
}

#: A path (top level, a name, or a bracketed index or quoted key), then ": ", then the message.
PROBLEM_LINE = re.compile(r"^(\(top level\)|[A-Za-z_]\w*|\[)[^\n]*?: .+", re.S)


def check(data: Any) -> None:
    try:
        config = load_config(data)
    except ConfigError as exc:
        problems = exc.problems
    else:
        assert isinstance(config, Config)
        assert load_config(json.loads(json.dumps(dump_config(config)))) == config
        return
    assert problems, "a ConfigError must list at least one problem"
    for line in problems:
        assert PROBLEM_LINE.match(line), line


@given(json_values)
def test_arbitrary_json(data: Any) -> None:
    check(data)


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths(value, (*prefix, index))
    return found


@given(st.sampled_from(paths(VALID)[1:]), json_values)
def test_one_value_replaced(path: tuple[Any, ...], value: Any) -> None:
    data = json.loads(json.dumps(VALID))
    node = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    check(data)


@given(st.sampled_from(paths(VALID)[1:]), st.text(min_size=1, max_size=10))
def test_unknown_key_is_reported(path: tuple[Any, ...], key: str) -> None:
    data = json.loads(json.dumps(VALID))
    node = data
    for step in path:
        node = node[step]
    if not isinstance(node, dict) or key in node or path == ("resolver", "hosts"):
        return  # resolver.hosts is a mapping of names: any key is a name, not a typo
    node[key] = 1
    check(data)
    with pytest.raises(ConfigError) as excinfo:
        load_config(data)
    assert any("unknown key" in line for line in excinfo.value.problems)
