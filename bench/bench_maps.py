"""What a map access costs from Python, next to a dict (a benchmark, not a test).

Run as root:  python bench/bench_maps.py [N]

Prints nanoseconds per operation for: dict get/set, Map.lookup/update through the default
codec and through Int(), a raw syscall with a prebuilt attr and buffers (the floor for this
FFI, docs/kernel-facts.md, fact 35), and Map.lookup_batch per entry. Use the numbers to decide
where a map access can go: never per packet from Python, and poll statistics in batches
(docs/kernel-facts.md, fact 24 and "bpf() lookup cost").
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import trio_sni_loader as loader
from trio_sni_loader import Int, Map, MapSpec, MapType
from trio_sni_loader._sys import bpf


def per_op(n: int, fn: Callable[[int], object]) -> float:
    """Best of five rounds of ``n`` calls ``fn(0..n-1)``: nanoseconds per call."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter_ns()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main(argv: list[str]) -> None:
    n = int(argv[1]) if len(argv) > 1 else 20_000
    keys = 1024
    d = {i: i for i in range(keys)}
    rows: list[tuple[str, float]] = []
    rows.append(("dict.get", per_op(n, lambda i: d.get(i & 1023))))
    rows.append(("dict[k] = v", per_op(n, lambda i: d.__setitem__(i & 1023, i))))
    # The cheapest real syscall: the floor any bpf() call from Python sits on.
    rows.append(("os.getppid (syscall floor)", per_op(n, lambda i: os.getppid())))
    spec = MapSpec("bench", MapType.HASH, 4, 8, keys)
    with Map.create(spec) as raw, Map.create(spec, key=Int(), value=Int()) as typed:
        for i in range(keys):
            typed[i] = i
        rows.append(("Map.lookup (Int codecs)", per_op(n, lambda i: typed.lookup(i & 1023))))
        rows.append(("Map.update (Int codecs)", per_op(n, lambda i: typed.update(i & 1023, i))))
        k = (5).to_bytes(4, "little")
        rows.append(("Map.lookup (raw bytes)", per_op(n, lambda i: raw.lookup(k))))
        elems = bpf.ElemCalls(typed.fd, 4, 8)
        rows.append(
            (
                "raw syscall with prebuilt buffers (bpf.ElemCalls.lookup)",
                per_op(n, lambda i: elems.lookup(k)),
            )
        )
        start = time.perf_counter_ns()
        rounds = 50
        for _ in range(rounds):
            entries = typed.lookup_batch(batch_size=256)
        rows.append(
            (
                f"Map.lookup_batch per entry ({len(entries)} entries)",
                (time.perf_counter_ns() - start) / (rounds * len(entries)),
            )
        )
    width = max(len(name) for name, _ in rows)
    print(
        f"{'operation':<{width}}  ns/op   (best of 5 x {n}; Linux {os.uname().release}, "
        f"{loader.possible_cpus()} possible CPUs)"
    )
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:8.0f}")


if __name__ == "__main__":
    main(sys.argv)
