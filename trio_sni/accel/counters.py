"""Reading the data plane's per-CPU counters (one lookup per counter, summed over CPUs)."""

from __future__ import annotations

import loader

from .layout import Counter


def read_counters(counters: loader.Map) -> dict[str, int]:
    """``{"bytes_to_upstream": n, ...}``: every counter in ``enum counter``, summed over CPUs.

    Poll this at a low rate (it costs one ``bpf()`` syscall per counter), never per packet.
    """
    out: dict[str, int] = {}
    for counter in Counter:
        per_cpu = counters.lookup(int(counter)) or []
        out[counter.name.lower()] = sum(int(v) for v in per_cpu)
    return out
