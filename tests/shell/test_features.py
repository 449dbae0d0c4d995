"""The kernel features without a kernel: the acceleration states their reports and the
config's switches make, the sockmap report of a forwarding plan, and the lifecycle the proxy
drives (nothing loaded before serve(), everything closed after it, reload reaching each).

With the kernel: tests/e2e/test_xdp_e2e.py, test_tc_e2e.py, test_dns_cache_e2e.py and
test_kernel_forwarding.py.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio_sni_loader as loader
from proxytest import loader_fds_opened_since

from trio_sni.errors import AccelerationUnavailable
from trio_sni.features import (
    FEATURES,
    NOT_CHOSEN,
    NOT_STARTED,
    AccelerationStatus,
    DnsCacheFeature,
    FeatureReport,
    FeatureState,
    MapStatus,
    SockhashFeature,
    TcFeature,
    XdpFeature,
    acceleration_from_config,
    sockmap_report,
)
from trio_sni.forward import ForwarderStatistics, Mode
from trio_sni.resolver import Resolver
from trio_sni.sansio.config_load import load_config
from trio_sni.server import Proxy

CONFIG: dict[str, Any] = {
    "listeners": [{"host": "127.0.0.1", "port": 0}],
    "rules": [{"suffix": "a.test", "name": "a"}],
    "log": {"access_log": None},
}


# ------------------------------------------------------------------------------------------
# Acceleration states from the config


def test_default_config_features_are_unavailable_or_disabled_with_reasons() -> None:
    status = acceleration_from_config(load_config(CONFIG))
    assert dict(status.features) == {
        "sockmap": "unavailable",
        "dns_cache": "unavailable",
        "xdp": "disabled",
        "tc": "disabled",
        "stats": "unavailable",
    }
    assert dict(status.reasons) == {
        "sockmap": NOT_CHOSEN,
        "dns_cache": NOT_STARTED,
        "xdp": "ebpf.xdp.enabled is false",
        "tc": "ebpf.tc.enabled is false",
        "stats": "no kernel program with per-CPU counters (sockmap, xdp, tc) is running",
    }
    assert not status.enabled


def test_switches_off_make_features_disabled() -> None:
    ebpf = {"sockmap": {"enabled": False}, "xdp": {"enabled": True}}
    config = load_config({**CONFIG, "ebpf": ebpf})
    status = acceleration_from_config(config)
    assert status.features["sockmap"] == "disabled"
    assert status.reasons["sockmap"] == "ebpf.sockmap.enabled is false"
    assert status.features["xdp"] == "unavailable"

    off = acceleration_from_config(load_config({**CONFIG, "ebpf": {"enabled": False}}))
    assert set(off.features.values()) == {"disabled"}
    assert set(off.reasons.values()) == {"ebpf.enabled is false"}


def test_tc_is_unavailable_when_enabled_until_the_shaper_reports() -> None:
    config = load_config({**CONFIG, "ebpf": {"tc": {"enabled": True, "interface": "veth9"}}})
    status = acceleration_from_config(config)
    assert status.features["tc"] == "unavailable"
    assert status.reasons["tc"] == NOT_STARTED
    running = acceleration_from_config(
        config,
        reports={
            "tc": FeatureReport(
                "active",
                maps={"tc_buckets": MapStatus(entries=2, max_entries=65536)},
                counters={"tc_bytes_dropped_normal": 7},
            )
        },
    )
    assert running.features["tc"] == "active"
    assert "tc" not in running.reasons
    assert running.counters == {"tc_bytes_dropped_normal": 7}


def test_sockmap_follows_the_chosen_forwarder() -> None:
    config = load_config(CONFIG)
    kernel_stats = ForwarderStatistics(
        Mode.KERNEL, fallbacks=2, sockhash_sockets=6, data_plane={"redirect_failures": 1}
    )
    report = sockmap_report(config, Mode.KERNEL, "probed", kernel_stats)
    kernel = acceleration_from_config(config, {"sockmap": report})
    assert kernel.features["sockmap"] == kernel.features["stats"] == "active"
    assert "sockmap" not in kernel.reasons
    assert "stats" not in kernel.reasons
    assert kernel.enabled
    # Two sockets per connection in the sockhash; max_entries counts connections (config).
    assert kernel.maps["sockmap"] == MapStatus(entries=3, max_entries=65536)
    assert kernel.counters == {
        "sockmap_redirect_failures": 1,
        "sockmap_fallbacks": 2,
        "sockmap_userspace_directions": 0,
    }
    copy = acceleration_from_config(
        config, {"sockmap": sockmap_report(config, Mode.COPY, "missing CAP_BPF (uid 1000)", None)}
    )
    assert copy.features["sockmap"] == "unavailable"
    assert copy.reasons["sockmap"] == "missing CAP_BPF (uid 1000)"


def test_sockmap_switched_off_is_disabled_whatever_the_plan_says() -> None:
    config = load_config({**CONFIG, "ebpf": {"sockmap": {"enabled": False}}})
    report = sockmap_report(config, Mode.SPLICE, "ebpf.sockmap is disabled in the config", None)
    assert report == FeatureReport("disabled", "ebpf.sockmap.enabled is false")


def test_a_kernel_forwarder_for_rules_only_counts_but_sockmap_is_not_the_default() -> None:
    """``forwarding.mode: copy`` with a rule asking for ``kernel``: the default does not forward
    in the kernel (sockmap says why), but the plane runs, fills and counts (stats active)."""
    config = load_config(CONFIG)
    kernel_stats = ForwarderStatistics(Mode.KERNEL, sockhash_sockets=2)
    report = sockmap_report(config, Mode.COPY, "forwarding.mode copy", kernel_stats)
    status = acceleration_from_config(config, {"sockmap": report})
    assert (status.features["sockmap"], status.reasons["sockmap"]) == (
        "unavailable",
        "forwarding.mode copy",
    )
    assert status.maps["sockmap"] == MapStatus(entries=1, max_entries=65536)
    assert status.features["stats"] == "active"


def test_feature_reports_replace_the_config_guess_and_add_maps_and_counters() -> None:
    reports = {
        "dns_cache": FeatureReport(
            "active",
            maps={"dns_cache": MapStatus(entries=5, max_entries=10, hit_rate=0.5)},
            counters={"dns_cache_hits": 3},
        ),
        "xdp": FeatureReport("unavailable", reason="native XDP refused by eth9"),
    }
    ebpf = {"xdp": {"enabled": True}}
    status = acceleration_from_config(load_config({**CONFIG, "ebpf": ebpf}), reports=reports)
    assert status.features["dns_cache"] == "active"
    assert "dns_cache" not in status.reasons
    assert status.maps["dns_cache"].hit_rate == 0.5
    assert status.counters == {"dns_cache_hits": 3}
    assert status.reasons["xdp"] == "native XDP refused by eth9"
    # The master switch wins over what a feature says.
    off = acceleration_from_config(
        load_config({**CONFIG, "ebpf": {"enabled": False}}), reports=reports
    )
    assert set(off.features.values()) == {"disabled"}
    assert not off.maps
    assert not off.counters


def test_acceleration_status_demands_every_feature_and_a_reason_for_each_inactive_one() -> None:
    active: dict[str, FeatureState] = dict.fromkeys(FEATURES, "active")
    assert AccelerationStatus(features=active, reasons={}).enabled
    with pytest.raises(ValueError, match="features: no state for tc"):
        AccelerationStatus(features={k: v for k, v in active.items() if k != "tc"}, reasons={})
    with pytest.raises(ValueError, match="reasons: no reason given for xdp"):
        AccelerationStatus(features={**active, "xdp": "unavailable"}, reasons={})


def test_the_stats_switch_leaves_the_per_cpu_counters_out() -> None:
    reports = {
        "xdp": FeatureReport("active", counters={"xdp_passed": 5}),
        "dns_cache": FeatureReport("active", counters={"dns_cache_hits": 3}),
    }
    sockmap = FeatureReport(
        "active",
        maps={"sockmap": MapStatus(entries=1, max_entries=65536)},
        counters={"sockmap_redirect_failures": 1},
    )
    on = acceleration_from_config(
        load_config({**CONFIG, "ebpf": {"xdp": {"enabled": True}}}),
        reports={"sockmap": sockmap, **reports},
    )
    assert on.features["stats"] == "active"
    assert on.counters == {"sockmap_redirect_failures": 1, "xdp_passed": 5, "dns_cache_hits": 3}
    off = acceleration_from_config(
        load_config({**CONFIG, "ebpf": {"xdp": {"enabled": True}, "stats": {"enabled": False}}}),
        reports={"sockmap": sockmap, **reports},
    )
    assert off.features["stats"] == "disabled"
    assert off.counters == {"dns_cache_hits": 3}  # a process counter, not a per-CPU map
    # XDP alone is enough for per-CPU counters to exist
    assert acceleration_from_config(load_config(CONFIG), reports=reports).features["stats"] == (
        "active"
    )


# ------------------------------------------------------------------------------------------
# The lifecycle the proxy drives


def test_a_proxy_that_is_never_served_loads_nothing() -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)  # kernel mode if it can
    assert proxy.context.forwarder.mode == "copy"
    with pytest.raises(RuntimeError, match="chosen when the feature starts"):
        proxy.forwarding.plan  # noqa: B018
    assert all(feature.report() is None for feature in proxy.features)
    status = proxy.acceleration_status()
    assert status.reasons["sockmap"] == NOT_CHOSEN
    assert status.reasons["dns_cache"] == NOT_STARTED


async def test_serve_chooses_the_plan_once_and_closes_every_feature(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = loader.live_fds()
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    with caplog.at_level(logging.INFO, logger="trio_sni"):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
            assert proxy.context.forwarder is proxy.forwarding.plan.forwarder
            assert proxy.context.forwarders == proxy.forwarding.plan.by_mode
            assert proxy.acceleration_status().reasons.get("sockmap") != NOT_CHOSEN
            proxy.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("forwarding")]
    assert len(lines) == 1
    assert lines[0].startswith(f"forwarding mode: {proxy.context.forwarder.mode} (")
    assert proxy.forwarding.report() is None
    assert not loader_fds_opened_since(before)  # the sockhash plane, the DNS cache's maps


async def test_a_refused_forwarding_mode_stops_the_start_and_closes_what_it_opened(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("trio_sni.forward.choose.splice_unavailable", lambda: "no splice here")
    config = {
        **CONFIG,
        "ebpf": {"sockmap": {"enabled": False}},
        "forwarding": {"mode": "splice"},
        "fallback_mode": "none",
    }
    proxy = Proxy(load_config(config), access_log=lambda record: None)
    with pytest.RaisesGroup(
        pytest.RaisesExc(AccelerationUnavailable, match="splice forwarding unavailable"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve)
    assert [listener.socket.fileno() for listener in proxy.listeners] == [-1]
    assert proxy.context.forwarder.mode == "copy"  # nothing was handed the refused plan
    assert proxy.acceleration_status().reasons["sockmap"] == "ebpf.sockmap.enabled is false"


def test_features_never_started_report_nothing_and_say_a_switch_needs_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    off = load_config(CONFIG)
    on = load_config({**CONFIG, "ebpf": {"xdp": {"enabled": True}, "tc": {"enabled": True}}})
    features = (XdpFeature(off), TcFeature(off))
    for feature in features:
        feature.start([])  # switched off: nothing to attach
        assert feature.report() is None
    with caplog.at_level(logging.WARNING, logger="trio_sni"):
        for feature in features:
            feature.reload(on)
    assert caplog.messages == [
        "reload: ebpf.xdp.enabled takes effect only after a restart",
        "reload: ebpf.tc.enabled and .interface take effect after a restart",
    ]
    for feature in features:
        feature.close()
        feature.close()  # idempotent


def test_a_switched_off_dns_cache_says_so_and_leaves_the_resolver_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = load_config({**CONFIG, "ebpf": {"dns_cache": {"enabled": False}}})
    resolver = Resolver(config.resolver, timeout=config.timeouts.resolve)
    feature = DnsCacheFeature(config, resolver)
    assert feature.report() is None
    with caplog.at_level(logging.INFO, logger="trio_sni"):
        feature.start([])
    assert caplog.messages == ["DNS cache: in-process tier only (ebpf.dns_cache.enabled is false)"]
    assert feature.report() == FeatureReport("disabled", "ebpf.dns_cache.enabled is false")
    feature.close()


def test_every_feature_is_one_of_the_reported_ones() -> None:
    proxy = Proxy(load_config(CONFIG), access_log=lambda record: None)
    assert [feature.name for feature in proxy.features] == [f for f in FEATURES if f != "stats"]
    assert isinstance(proxy.forwarding, SockhashFeature)
