"""trio_sni.workers_status: how a supervisor sums its workers' status answers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from trio_sni.features import AccelerationStatus, MapStatus
from trio_sni.workers_status import (
    merge_connections,
    merge_ebpf_status,
    merge_metrics,
    metrics_with_supervisor_features,
    parse_expositions,
    with_supervisor_features,
)

WORKER_0 = """\
# HELP trio_sni_connections_accepted Client connections accepted.
# TYPE trio_sni_connections_accepted counter
trio_sni_connections_accepted_total 5.0
trio_sni_connections_accepted_created 1.7e9
# HELP trio_sni_connections_active Client connections open now.
# TYPE trio_sni_connections_active gauge
trio_sni_connections_active 2.0
# HELP trio_sni_ebpf_feature_state 1 for each kernel feature's current state.
# TYPE trio_sni_ebpf_feature_state gauge
trio_sni_ebpf_feature_state{feature="xdp",state="active"} 1.0
# HELP trio_sni_connection_duration_seconds How long connections lasted.
# TYPE trio_sni_connection_duration_seconds histogram
trio_sni_connection_duration_seconds_bucket{le="1.0"} 4.0
trio_sni_connection_duration_seconds_bucket{le="+Inf"} 5.0
trio_sni_connection_duration_seconds_count 5.0
trio_sni_connection_duration_seconds_sum 2.5
"""
WORKER_1 = (
    WORKER_0.replace("_total 5.0", "_total 7.0")
    .replace("active 2.0", "active 3.0")
    .replace('feature="xdp",state="active"', 'feature="xdp",state="disabled"')
)


def exposition(texts: list[tuple[int, str]]) -> str:
    class Fixed:
        def collect(self) -> object:
            return merge_metrics(parse_expositions(texts))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def test_counters_gauges_and_histograms_are_summed_feature_states_are_worker_0s() -> None:
    text = exposition([(0, WORKER_0), (1, WORKER_1)])
    assert "trio_sni_connections_accepted_total 12.0" in text
    assert "trio_sni_connections_active 5.0" in text
    assert 'trio_sni_connection_duration_seconds_bucket{le="+Inf"} 10.0' in text
    assert "trio_sni_connection_duration_seconds_sum 5.0" in text
    assert 'state="active"} 1.0' in text
    assert 'state="disabled"' not in text
    assert "_created" not in text  # a per-process time, not something to add up


def test_connections_are_listed_oldest_first_with_their_worker_up_to_the_limit() -> None:
    merged = merge_connections(
        [
            (0, {"total": 2, "connections": [{"sni": "a", "age": 5.0}, {"sni": "b", "age": 1.0}]}),
            (1, {"total": 1, "connections": [{"sni": "c", "age": 3.0}]}),
        ],
        "limit=2",
    )
    assert merged == {
        "total": 3,
        "limit": 2,
        "connections": [
            {"sni": "a", "age": 5.0, "worker": 0},
            {"sni": "c", "age": 3.0, "worker": 1},
        ],
    }


def test_ebpf_status_is_worker_0s_with_the_sockhash_counters_summed() -> None:
    merged = merge_ebpf_status(
        [
            (
                1,
                {
                    "features": {"xdp": "disabled"},
                    "counters": {"sockmap_bytes": 10, "xdp_drops": 0},
                },
            ),
            (0, {"features": {"xdp": "active"}, "counters": {"sockmap_bytes": 5, "xdp_drops": 7}}),
        ]
    )
    assert merged["features"] == {"xdp": "active"}
    assert merged["counters"] == {"sockmap_bytes": 15, "xdp_drops": 7}


#: What a supervisor running XDP (and TC, unavailable) reports for itself.
SUPERVISORS = AccelerationStatus(
    features={
        "sockmap": "unavailable",
        "dns_cache": "unavailable",
        "xdp": "active",
        "tc": "unavailable",
        "stats": "active",
    },
    reasons={
        "sockmap": "not chosen",
        "dns_cache": "not started",
        "tc": "no such interface",
    },
    maps={"xdp_deny": MapStatus(2, 1024)},
    counters={"xdp_dropped_denied": 9, "xdp_passed": 40},
    details={"xdp": {"interface": "eth0", "mode": "native"}},
)


def test_ebpf_status_takes_xdp_and_tc_from_the_supervisor_the_rest_from_the_workers() -> None:
    workers = {
        "ebpf_enabled": True,
        "features": {
            "sockmap": "active",
            "dns_cache": "active",
            "xdp": "disabled",
            "tc": "disabled",
            "stats": "unavailable",
        },
        "reasons": {
            "xdp": "ebpf.xdp.enabled is false",
            "tc": "ebpf.tc.enabled is false",
            "stats": "no kernel program with per-CPU counters is running",
        },
        "notes": {"dns_cache": "replaced an old map"},
        "maps": {"dns_cache": {"entries": 3, "max_entries": 10}},
        "details": {},
        "counters": {"sockmap_bytes": 5},
        "version": "x",
    }
    merged = with_supervisor_features(workers, SUPERVISORS)
    assert merged["features"] == {
        "sockmap": "active",
        "dns_cache": "active",
        "xdp": "active",
        "tc": "unavailable",
        "stats": "active",
    }
    assert merged["reasons"] == {"tc": "no such interface"}
    assert merged["notes"] == {"dns_cache": "replaced an old map"}
    assert merged["maps"] == {
        "dns_cache": {"entries": 3, "max_entries": 10},
        "xdp_deny": {"entries": 2, "max_entries": 1024},
    }
    assert merged["counters"] == {"sockmap_bytes": 5, "xdp_dropped_denied": 9, "xdp_passed": 40}
    assert merged["details"] == {"xdp": {"interface": "eth0", "mode": "native"}}
    assert merged["version"] == "x"


def test_metrics_take_xdp_and_tc_states_and_counters_from_the_supervisor() -> None:
    families = metrics_with_supervisor_features(
        merge_metrics(parse_expositions([(0, WORKER_1), (1, WORKER_1)])), SUPERVISORS
    )

    class Fixed:
        def collect(self) -> object:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert 'trio_sni_ebpf_feature_state{feature="xdp",state="active"} 1.0' in text
    assert 'trio_sni_ebpf_feature_state{feature="tc",state="unavailable"} 1.0' in text
    assert 'state="disabled"' not in text
    assert 'trio_sni_ebpf_xdp_dropped_total{reason="denied"} 9.0' in text
    assert "trio_sni_ebpf_xdp_passed_total 40.0" in text
    assert "trio_sni_connections_accepted_total 14.0" in text  # the workers' sums stay
