"""The TC shaper as a kernel feature: per-client rate caps on the clients' interface.

Shaping only slows the proxy's own traffic toward clients; a shaper that cannot attach (an
old kernel without TCX, no such interface) leaves the proxy serving unshaped, with the reason
logged once and shown in ``/ebpf/status``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .interface import BoundListeners
from .report import FeatureReport, MapStatus

if TYPE_CHECKING:
    from ..accel import TcShaper
    from ..sansio.config import Config

log = logging.getLogger("trio_sni")


class TcFeature:
    """One proxy's TC shaper: running (``shaper``), refused (``reason``), or not tried."""

    name = "tc"

    def __init__(self, config: Config) -> None:
        self._config = config
        self.shaper: TcShaper | None = None
        self.reason: str | None = None

    def start(self, listeners: BoundListeners) -> None:
        """Attach the shaper (``ebpf.tc``) for the bound listening ports, or record why not."""
        tc = self._config.ebpf.tc
        if not (self._config.ebpf.enabled and tc.enabled):
            return
        ports = {port for port, spec in listeners if spec.protocol != "quic"}
        try:
            from ..accel import LoaderError, TcShaper
        except ImportError as exc:  # e.g. cffi missing on this platform
            self._unavailable(f"cannot import the BPF loader: {exc}")
            return
        try:
            self.shaper = TcShaper.start(tc, ports)
        except (OSError, LoaderError) as exc:
            self._unavailable(f"attaching tc_shaper.bpf.o to {tc.interface} failed: {exc}")
            return
        log.info(
            "TC shaper on %s egress: %s bit/s per client (high %s, bulk %s), buckets of %d "
            "bytes or 250 ms of their rate",
            tc.interface,
            tc.per_client_bps or "no cap",
            tc.high_bps or "no cap",
            tc.bulk_bps or "no cap",
            tc.burst_bytes,
        )

    def _unavailable(self, reason: str) -> None:
        log.warning("TC shaping unavailable: %s", reason)
        self.reason = reason

    def report(self) -> FeatureReport | None:
        """Buckets in use and the counters per class (read now: scrape time only)."""
        if self.shaper is None:
            return None if self.reason is None else FeatureReport("unavailable", self.reason)
        shaper = self.shaper
        buckets = MapStatus(shaper.bucket_count(), shaper.buckets.spec.max_entries)
        return FeatureReport("active", maps={"tc_buckets": buckets}, counters=shaper.counters())

    def reload(self, config: Config) -> None:
        """New rates, burst and exempt list in place (the program stays attached)."""
        new, old = config.ebpf.tc, self._config.ebpf.tc
        if (new.enabled, new.interface) != (old.enabled, old.interface):
            log.warning("reload: ebpf.tc.enabled and .interface take effect after a restart")
        self._config = config
        if self.shaper is None:
            return
        try:
            self.shaper.configure(new)
        except OSError as exc:  # a BPF map update refused: the old caps may stay in part
            log.error("reload: updating the TC shaper's maps failed: %s", exc)

    def close(self) -> None:
        """Detach; idempotent."""
        if self.shaper is not None:
            self.shaper.close()
            self.shaper = None
