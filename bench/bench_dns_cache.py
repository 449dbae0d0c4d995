"""What each DNS cache tier costs per lookup, side by side (a benchmark, not a test).

Run as root:  python bench/bench_dns_cache.py [N]

Prints nanoseconds per operation for the in-process tier (a dict lookup in
``LruAddressCache``), the same hit through ``TieredAddressCache`` (what the resolver calls),
the shared tier (``SharedDnsCache.get``: one ``bpf()`` lookup syscall plus decoding), the bare
map lookup inside it, writing a new name and refreshing one, and a scrape
(``statistics()``: counting a full 10,000-entry map with batch lookups). The maps are pinned
in a temporary directory under /sys/fs/bpf, removed at the end. The machine is shared: compare
rows of one run, not runs of different days.
"""

from __future__ import annotations

import ipaddress
import shutil
import sys
import tempfile
import time

from bench_maps import per_op  # this folder is on sys.path when a script here runs

from trio_sni.accel.dns_cache import SharedDnsCache
from trio_sni.resolver import LruAddressCache, TieredAddressCache
from trio_sni.sansio import dns_record
from trio_sni.sansio.dns_record import Families

BOTH = Families.IPV4 | Families.IPV6
ADDRESSES = (ipaddress.ip_address("2001:db8::1"), ipaddress.ip_address("192.0.2.1"))
NAMES = [f"host{i}.example.test" for i in range(1024)]
MAX_ENTRIES = 10_000


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else 20_000
    pin_dir = tempfile.mkdtemp(prefix="bench-dns-", dir="/sys/fs/bpf")
    rows: list[tuple[str, float]] = []
    try:
        with SharedDnsCache.open(pin_dir, MAX_ENTRIES) as shared:
            local = LruAddressCache(MAX_ENTRIES)
            for name in NAMES:
                local.put(name, ADDRESSES, 1e9)
                shared.put(name, ADDRESSES, 3600, BOTH)
            tiered = TieredAddressCache(
                local, shared, family="any", max_ttl=3600, clock=time.monotonic
            )
            rows.append(
                (
                    "in-process hit (LruAddressCache.get)",
                    per_op(n, lambda i: local.get(NAMES[i & 1023], 0.0)),
                )
            )
            rows.append(
                (
                    "in-process hit via TieredAddressCache.get",
                    per_op(n, lambda i: tiered.get(NAMES[i & 1023], 0.0)),
                )
            )
            rows.append(
                (
                    "shared hit (SharedDnsCache.get: syscall + decode)",
                    per_op(n, lambda i: shared.get(NAMES[i & 1023], BOTH)),
                )
            )
            keys = [dns_record.pack_key(name) for name in NAMES]
            cache_map = shared._cache
            rows.append(
                (
                    "  of which Map.lookup (the syscall)",
                    per_op(n, lambda i: cache_map.lookup(keys[i & 1023])),
                )
            )
            rows.append(
                (
                    "shared miss (absent name)",
                    per_op(n, lambda i: shared.get("absent.example.test", BOTH)),
                )
            )
            rows.append(
                (
                    "shared refresh (put of a name already there)",
                    per_op(n // 10, lambda i: shared.put(NAMES[i & 1023], ADDRESSES, 3600, BOTH)),
                )
            )
            fresh = iter(range(10**9))
            rows.append(
                (
                    "shared insert (put of a new name: + counting program)",
                    per_op(
                        1000, lambda i: shared.put(f"new{next(fresh)}.test", ADDRESSES, 3600, BOTH)
                    ),
                )
            )
            for i in range(MAX_ENTRIES):
                shared.put(f"fill{i}.test", ADDRESSES, 3600, BOTH)
            entries = shared.statistics().entries
            rows.append(
                (
                    f"scrape: statistics() of a full map ({entries} entries)",
                    per_op(5, lambda i: shared.statistics()),
                )
            )
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
    width = max(len(label) for label, _ in rows)
    print(f"{'operation':<{width}}  {'ns/op':>12}")
    for label, ns in rows:
        print(f"{label:<{width}}  {ns:>12,.0f}")


if __name__ == "__main__":
    main(sys.argv)
