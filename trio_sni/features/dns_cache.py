"""The shared DNS cache as a kernel feature: the pinned BPF map behind the resolver's cache.

The map is a second tier after the resolver's in-process cache, shared by every proxy on the
host (:mod:`trio_sni.accel.dns_cache`). Without it the resolver works as before, so a map that
cannot be opened is logged once and reported, never fatal.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..accel.dns_cache import SharedDnsCache
from ..errors import SharedCacheUnavailable
from .interface import BoundListeners
from .report import FeatureReport, MapStatus

if TYPE_CHECKING:
    from ..resolver import Resolver
    from ..sansio.config import Config

log = logging.getLogger("trio_sni")


class DnsCacheFeature:
    """Opens the map for ``resolver`` when started, or says once why it stays in-process."""

    name = "dns_cache"

    def __init__(self, config: Config, resolver: Resolver) -> None:
        self._config = config
        self._resolver = resolver
        self._cache: SharedDnsCache | None = None
        #: Why the map is not in use, once :meth:`start` has decided.
        self._not_in_use: FeatureReport | None = None

    def start(self, listeners: BoundListeners) -> None:
        """Put the pinned map behind the resolver's cache, or record why not."""
        ebpf = self._config.ebpf
        settings = ebpf.dns_cache
        if not ebpf.enabled or not settings.enabled:
            why = "ebpf.enabled is false" if not ebpf.enabled else "ebpf.dns_cache.enabled is false"
            log.info("DNS cache: in-process tier only (%s)", why)
            self._not_in_use = FeatureReport("disabled", why)
            return
        try:
            cache = SharedDnsCache.open(settings.pin_path, settings.max_entries)
        except SharedCacheUnavailable as exc:
            log.warning(
                "DNS cache: in-process tier only; the shared BPF map is unavailable: %s", exc
            )
            self._not_in_use = FeatureReport("unavailable", str(exc))
            return
        if cache.replaced is not None:
            log.warning(
                "DNS cache: replaced incompatible pinned state at %s (%s)",
                cache.pin_path,
                cache.replaced,
            )
        log.info(
            "DNS cache: in-process tier, then the BPF map pinned at %s (max %d names)",
            cache.pin_path,
            cache.max_entries,
        )
        self._cache = cache
        self._resolver.use_shared_cache(cache)

    def report(self) -> FeatureReport | None:
        """The map's fill and counters (read now: scrape time only), or why it is not used."""
        if self._cache is None:
            return self._not_in_use
        cache = self._cache
        stats = cache.statistics()
        notes = []
        if cache.replaced is not None:
            notes.append(
                f"replaced incompatible pinned state at {cache.pin_path}: {cache.replaced}"
            )
        if cache.last_error is not None:
            notes.append(f"{stats.errors} map operation(s) failed, last: {cache.last_error}")
        return FeatureReport(
            "active",
            "; ".join(notes) or None,
            maps={"dns_cache": MapStatus(stats.entries, stats.max_entries, stats.hit_rate)},
            counters={
                "dns_cache_hits": stats.hits,
                "dns_cache_misses": stats.misses,
                "dns_cache_evictions": stats.evictions,
                "dns_cache_corrupt": stats.corrupt,
                "dns_cache_errors": stats.errors,
            },
        )

    def reload(self, config: Config) -> None:
        """Nothing to change live: the map's pin path and size are fixed while it is open."""

    def close(self) -> None:
        """Take the map from the resolver and close it; idempotent."""
        if self._cache is not None:
            self._resolver.use_shared_cache(None)
            self._cache.close()
            self._cache = None
