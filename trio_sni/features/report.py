"""The kernel features' status model, read by ``/ebpf/status`` and ``/metrics`` alike.

Below both :mod:`trio_sni.status` and :mod:`trio_sni.metrics` (neither imports the other): a
running feature describes itself in a :class:`FeatureReport`, and
:func:`acceleration_from_config` combines the reports with the config's switches into one
:class:`AccelerationStatus`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import attrs

if TYPE_CHECKING:
    from ..sansio.config import Config
    from .interface import KernelFeature

FeatureState = Literal["active", "disabled", "unavailable"]
#: The kernel features ``/ebpf/status`` reports, in the design's order plus ``tc``.
FEATURES = ("sockmap", "dns_cache", "xdp", "tc", "stats")
#: Why ``sockmap`` is not active before the proxy has chosen its forwarding plan.
NOT_CHOSEN = "no forwarding mode was chosen"
#: Why a switched-on feature is not active before the proxy has started it.
NOT_STARTED = "not started: the proxy starts it when it serves"
#: The features whose programs count in per-CPU maps: ``ebpf.stats.enabled: false`` leaves
#: their counters out of ``/ebpf/status`` and ``/metrics``, and ``stats`` is active while one
#: of them reports counters.
PER_CPU_FEATURES = ("sockmap", "xdp", "tc")


@attrs.frozen
class MapStatus:
    """One BPF map: ``entries`` now (None if unknown), its ``max_entries``, and for the DNS
    cache its ``hit_rate``."""

    entries: int | None
    max_entries: int | None
    hit_rate: float | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"entries": self.entries, "max_entries": self.max_entries}
        if self.hit_rate is not None:
            out["hit_rate"] = self.hit_rate
        return out


@attrs.frozen
class FeatureReport:
    """What a started kernel feature says about itself (:meth:`KernelFeature.report`).

    It replaces the config's guess for that feature. ``maps`` are named as in ``/ebpf/status``
    (``dns_cache``), ``counters`` as in :attr:`AccelerationStatus.counters` (``xdp_dropped``).
    """

    state: FeatureState
    reason: str | None = None
    maps: Mapping[str, MapStatus] = attrs.field(factory=dict)
    counters: Mapping[str, int] = attrs.field(factory=dict)
    #: JSON-able facts about how the feature runs (XDP: interface, attach mode, ports), shown
    #: under ``details`` in ``/ebpf/status``.
    details: Mapping[str, object] = attrs.field(factory=dict)


@attrs.frozen
class AccelerationStatus:
    """The kernel features' states, why each inactive one is not active, the maps, and the
    kernel counters (summed across CPUs, named like ``sockmap_redirects``; exported as
    ``trio_sni_ebpf_<name>_total``).

    Every feature in :data:`FEATURES` must have a state, and every state other than
    ``active`` a reason.
    """

    features: Mapping[str, FeatureState]
    reasons: Mapping[str, str]
    maps: Mapping[str, MapStatus] = attrs.field(factory=dict)
    counters: Mapping[str, int] = attrs.field(factory=dict)
    #: feature -> :attr:`FeatureReport.details`, for the features that report any.
    details: Mapping[str, Mapping[str, object]] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        missing = [f for f in FEATURES if f not in self.features]
        if missing:
            raise ValueError(f"features: no state for {', '.join(missing)}")
        unexplained = [
            f for f, s in self.features.items() if s != "active" and f not in self.reasons
        ]
        if unexplained:
            raise ValueError(f"reasons: no reason given for {', '.join(unexplained)}")

    @property
    def enabled(self) -> bool:
        """True when at least one kernel feature is active."""
        return any(state == "active" for state in self.features.values())


def acceleration_from_config(
    config: Config, reports: Mapping[str, FeatureReport] | None = None
) -> AccelerationStatus:
    """Every feature's state: what its report says once it is started, else the config's guess.

    With ``ebpf.enabled`` false every feature is ``disabled`` and the reports are ignored. A
    feature without a report is ``disabled`` when switched off (the reason names the switch),
    else ``unavailable`` until started (:data:`NOT_CHOSEN` for ``sockmap``,
    :data:`NOT_STARTED` for the others). ``stats`` is derived: ``active`` while a feature in
    :data:`PER_CPU_FEATURES` reports counters.

    Args:
        config: the proxy's config.
        reports: what the started features say about themselves, by feature name, in the
            order their maps and counters are listed.
    """
    reports = reports or {}
    ebpf = config.ebpf
    features: dict[str, FeatureState] = {}
    reasons: dict[str, str] = {}
    switches = {
        "sockmap": ebpf.sockmap.enabled,
        "dns_cache": ebpf.dns_cache.enabled,
        "xdp": ebpf.xdp.enabled,
        "tc": ebpf.tc.enabled,
        "stats": ebpf.stats.enabled,
    }
    per_cpu = [f for f in PER_CPU_FEATURES if f in reports and reports[f].counters]
    for feature in FEATURES:
        if not ebpf.enabled:
            features[feature], reasons[feature] = "disabled", "ebpf.enabled is false"
        elif feature in reports:
            report = reports[feature]
            features[feature] = report.state
            if report.reason is not None:
                reasons[feature] = report.reason
        elif not switches[feature]:
            features[feature] = "disabled"
            reasons[feature] = f"ebpf.{feature}.enabled is false"
        elif feature == "stats" and per_cpu:
            features[feature] = "active"  # the programs' per-CPU counters, read at scrape
        elif feature == "stats":
            features[feature] = "unavailable"
            reasons[feature] = (
                "no kernel program with per-CPU counters (sockmap, xdp, tc) is running"
            )
        else:
            features[feature] = "unavailable"
            reasons[feature] = NOT_CHOSEN if feature == "sockmap" else NOT_STARTED
    maps: dict[str, MapStatus] = {}
    counters: dict[str, int] = {}
    details: dict[str, Mapping[str, object]] = {}
    if ebpf.enabled:
        for name, report in reports.items():
            maps.update(report.maps)
            if ebpf.stats.enabled or name not in PER_CPU_FEATURES:
                counters.update(report.counters)
            if report.details:
                details[name] = report.details
    return AccelerationStatus(
        features=features, reasons=reasons, maps=maps, counters=counters, details=details
    )


def acceleration_of(config: Config, features: Iterable[KernelFeature]) -> AccelerationStatus:
    """:func:`acceleration_from_config` with what each of ``features`` reports now (counters
    read now: one syscall each, at scrape time only)."""
    reports = {f.name: r for f in features if (r := f.report()) is not None}
    return acceleration_from_config(config, reports)
