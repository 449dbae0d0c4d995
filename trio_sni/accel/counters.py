"""Reading the data planes' per-CPU counters (one lookup per counter, summed over CPUs)."""

from __future__ import annotations

import enum

import trio_sni_loader as loader

from .layout import Counter


def read_counters(counters: loader.Map, names: type[enum.IntEnum] = Counter) -> dict[str, int]:
    """``{"bytes_to_upstream": n, ...}``: every counter in ``names`` (by default the sockhash
    program's ``enum counter``), summed over CPUs. ``counters`` has ``loader.Int`` codecs.

    Poll this at a low rate (it costs one ``bpf()`` syscall per counter), never per packet.
    """
    out: dict[str, int] = {}
    for counter in names:
        per_cpu = counters.lookup(int(counter)) or []
        out[counter.name.lower()] = sum(int(v) for v in per_cpu)
    return out
