"""What the kernel data planes share: a loaded prebuilt object whose sk_skb verdict program is
attached to one of its sockhash maps, with per-CPU counters (:class:`~.sockhash.SockhashPlane`
for TCP connections, :class:`~.quic_plane.QuicPlane` for QUIC flows)."""

from __future__ import annotations

import enum
from types import TracebackType
from typing import ClassVar, Self

import trio_sni_loader as loader

from .counters import read_counters


class VerdictPlane:
    """Owns the collection and the verdict's link; :meth:`close` releases both, once."""

    #: The program's ``enum`` of per-CPU counters (:meth:`counters` reads them by name).
    counter_names: ClassVar[type[enum.IntEnum]]

    def __init__(self, collection: loader.Collection, link: loader.Link) -> None:
        self._collection = collection
        self._link = link
        self._closed = False
        self.counters_map = collection.maps["counters"]
        self.counters_map.key_codec = loader.Int()
        self.counters_map.value_codec = loader.Int()

    @classmethod
    def _load(cls, spec: loader.CollectionSpec, program: str, sockhash: str) -> Self:
        """Load ``spec`` and attach its verdict ``program`` to its ``sockhash`` map; nothing is
        left open when a step raises (``loader.LoaderError``: the kernel refused a map, the
        program or the attach)."""
        collection = loader.Collection.load(spec, programs=[program])
        try:
            link = loader.attach_sk_skb(collection.programs[program], collection.maps[sockhash])
        except BaseException:
            collection.close()
            raise
        try:
            return cls(collection, link)
        except BaseException:
            link.close()
            collection.close()
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """:meth:`_release` what the plane holds, then detach and close every fd; idempotent."""
        if not self._closed:
            self._closed = True
            self._release()
        self._link.close()
        self._collection.close()

    def _release(self) -> None:
        """What a plane must let go of before its fds close (once)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """Every counter in :attr:`counter_names`, lower-cased, summed over CPUs (one ``bpf()``
        call per counter: read at a low rate, never per packet)."""
        return read_counters(self.counters_map, self.counter_names)
