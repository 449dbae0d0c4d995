"""The status endpoint of a supervisor (``workers: N``): every worker's answer, summed.

Each worker serves the status endpoints on a private abstract unix socket
(:func:`status_socket_name`); the supervisor serves ``status.listen`` with the same HTTP
server (:func:`trio_sni.status.serve_status`) and answers each request by asking every worker
the same thing, at once, and combining what they say:

* ``/metrics``: counters and histograms are summed per series; gauges too (connections open,
  resolver cache entries), except the kernel feature states, which are worker 0's. Plus, from
  the supervisor: ``trio_sni_workers`` and, per worker, ``trio_sni_worker_restarts_total``
  and ``trio_sni_worker_connections_active``.
* ``/connections``: every worker's, oldest first, each with its ``worker``; ``total`` summed.
* ``/ebpf/status``: worker 0's document, its kernel forwarder counters (``sockmap_*``) summed
  over every worker, and a ``workers`` list.
* The features the supervisor runs itself (:data:`SUPERVISOR_FEATURES`: the XDP guard and
  the TC shaper; the workers run them off) are the supervisor's in both: state, reason,
  maps, counters and details.
* ``/readyz``: ready once every worker has reported ready and answers ready.
* Anything else (``/``, ``/healthz``, errors such as 404 or 405): worker 0's answer, or the
  supervisor's own where no worker is needed.

A worker that does not answer within :data:`WORKER_TIMEOUT` (it is being restarted, say) is
left out of the sums and makes ``/readyz`` answer 503.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attrs
import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .features import AccelerationStatus
from .metrics import ConfigReloads, ebpf_counter_families, feature_state_family
from .status import Answer, connections_limit, json_answer, text_answer

#: A JSON document as the workers send it.
JSON = dict[str, Any]

#: Seconds a worker may take to answer one status request.
WORKER_TIMEOUT = 2.0
#: The most bytes read from one worker's answer.
MAX_WORKER_ANSWER = 64 * 1024 * 1024
#: Gauges that are the same in every worker: worker 0's value stands for the proxy's.
FROM_WORKER_0 = frozenset({"trio_sni_ebpf_feature_state", "trio_sni_build_info"})
#: Families the supervisor answers itself (it alone decides whether a reload is applied).
FROM_SUPERVISOR = frozenset(
    {
        "trio_sni_config_last_reload_successful",
        "trio_sni_config_last_reload_success_timestamp_seconds",
    }
)
#: The kernel features the supervisor runs for every worker: an interface takes one XDP
#: link, and N shapers would each count the same traffic. Keys of their maps and counters
#: start with the feature's name.
SUPERVISOR_FEATURES = ("xdp", "tc")
#: Per-process families (``process_*``): kept per worker, with a ``worker`` label, not summed
#: (a start time or an fd limit does not add up).
PER_PROCESS_PREFIX = "process_"


def status_socket_name(supervisor_pid: int, index: int) -> str:
    return f"trio-sni-status-{supervisor_pid}-{index}"


@attrs.frozen
class WorkerAnswer:
    status: int
    body: bytes
    content_type: str


async def ask_worker(name: str, target: bytes) -> WorkerAnswer | None:
    """``GET target`` from the worker's status socket; None if it does not answer in time."""
    with trio.move_on_after(WORKER_TIMEOUT):
        try:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await sock.connect("\0" + name)
            except BaseException:
                sock.close()
                raise
            async with trio.SocketStream(sock) as stream:
                await stream.send_all(
                    b"GET %s HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n" % target
                )
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                    if len(data) > MAX_WORKER_ANSWER:
                        return None
        except (OSError, trio.BrokenResourceError):
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            return None
        content_type = next(
            (
                line.split(b":", 1)[1].strip().decode("latin-1")
                for line in lines[1:]
                if line.lower().startswith(b"content-type:")
            ),
            "text/plain; charset=utf-8",
        )
        return WorkerAnswer(status, body, content_type)
    return None


@attrs.define(eq=False)
class WorkerView:
    """What the supervisor knows of one worker, for the sums."""

    index: int
    pid: int
    ready: bool
    restarts: int


class WorkersStatus:
    """Answers status requests for a supervisor (an :data:`trio_sni.status.Answerer`)."""

    def __init__(
        self,
        socket_names: Sequence[str],
        workers: Callable[[], Sequence[WorkerView]],
        not_ready_reason: Callable[[], str | None],
        reloads: ConfigReloads,
        own_features: Callable[[], AccelerationStatus],
    ) -> None:
        self._names = list(socket_names)
        self._workers = workers
        self._not_ready_reason = not_ready_reason
        self._reloads = reloads
        self._own_features = own_features

    async def __call__(self, request: h11.Request) -> Answer:
        split = urlsplit(request.target.decode("ascii", "replace"))
        path = split.path.rstrip("/") or "/"
        if path == "/healthz" and request.method in (b"GET", b"HEAD"):
            return Answer(200, b"ok\n")
        answers = await self._ask_all(request.target)
        first = answers[0]
        if path == "/readyz":
            why = self._not_ready_reason() or next(
                (
                    f"worker {i}: "
                    + ("not answering" if a is None else a.body.decode("utf-8", "replace").strip())
                    for i, a in enumerate(answers)
                    if a is None or a.status != 200
                ),
                None,
            )
            return Answer(200, b"ready\n") if why is None else text_answer(503, f"not ready: {why}")
        if first is None:
            return text_answer(503, "worker 0 is not answering; try again")
        if first.status != 200 or request.method not in (b"GET", b"HEAD"):
            return Answer(first.status, first.body, first.content_type)
        given = [(i, a) for i, a in enumerate(answers) if a is not None and a.status == 200]
        if path == "/metrics":
            accept = next((v.decode("latin-1") for k, v in request.headers if k == b"accept"), "")
            return self._metrics(given, accept)
        if path == "/connections":
            documents = [(i, json.loads(a.body)) for i, a in given]
            return json_answer(200, merge_connections(documents, split.query))
        if path == "/ebpf/status":
            document = merge_ebpf_status([(i, json.loads(a.body)) for i, a in given])
            document = with_supervisor_features(document, self._own_features())
            document["workers"] = [attrs.asdict(w) for w in self._workers()]
            return json_answer(200, document)
        return Answer(first.status, first.body, first.content_type)

    async def _ask_all(self, target: bytes) -> list[WorkerAnswer | None]:
        answers: list[WorkerAnswer | None] = [None] * len(self._names)

        async def ask(i: int, name: str) -> None:
            answers[i] = await ask_worker(name, target)

        async with trio.open_nursery() as nursery:
            for i, name in enumerate(self._names):
                nursery.start_soon(ask, i, name)
        return answers

    def _metrics(self, given: list[tuple[int, WorkerAnswer]], accept: str) -> Answer:
        parsed = parse_expositions([(i, a.body.decode("utf-8")) for i, a in given])
        families = metrics_with_supervisor_features(merge_metrics(parsed), self._own_features())
        active = {
            i: sample.value
            for i, worker_families in parsed
            for family in worker_families
            if family.name == "trio_sni_connections_active"
            for sample in family.samples
        }
        workers = Metric("trio_sni_workers", "Worker processes the supervisor runs.", "gauge")
        views = list(self._workers())
        workers.add_sample("trio_sni_workers", {}, len(views))
        restarts = Metric(
            "trio_sni_worker_restarts", "Times the supervisor started a worker again.", "counter"
        )
        per_worker = Metric(
            "trio_sni_worker_connections_active",
            "Client connections open now, per worker.",
            "gauge",
        )
        for view in views:
            labels = {"worker": str(view.index)}
            restarts.add_sample("trio_sni_worker_restarts_total", labels, view.restarts)
            per_worker.add_sample(
                "trio_sni_worker_connections_active", labels, active.get(view.index, 0)
            )
        registry = CollectorRegistry(auto_describe=False)
        own = [*self._reloads.families()]
        registry.register(_Fixed([*families, workers, restarts, per_worker, *own]))
        encoder, content_type = choose_encoder(accept)
        return Answer(200, encoder(registry), content_type)


class _Fixed:
    """A collector that yields families computed already."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def parse_expositions(texts: Sequence[tuple[int, str]]) -> list[tuple[int, list[Metric]]]:
    """Each worker's ``/metrics`` text, parsed once (the sums and the per-worker gauges both
    read it)."""
    return [(index, list(text_string_to_metric_families(text))) for index, text in texts]


def merge_metrics(parsed: Sequence[tuple[int, Sequence[Metric]]]) -> list[Metric]:
    """Every series of every worker's exposition, summed (see the module docstring)."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for index, worker_families in parsed:
        for family in worker_families:
            if (family.name in FROM_WORKER_0 and index != 0) or family.name in FROM_SUPERVISOR:
                continue
            if family.name.endswith("_created"):
                continue  # the text parser makes a counter's creation time a family of its own
            per_process = family.name.startswith(PER_PROCESS_PREFIX)
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a per-process time, not a count
                own = {**sample.labels, "worker": str(index)} if per_process else sample.labels
                key = (sample.name, tuple(sorted(own.items())))
                series[key] = series.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def merge_connections(documents: Sequence[tuple[int, JSON]], query: str) -> JSON:
    """Every worker's live connections, oldest first, each with its worker."""
    limit = connections_limit(query)  # a bad one: worker 0 answered 400 already
    rows = [
        {**row, "worker": index}
        for index, document in documents
        for row in document.get("connections", [])
    ]
    rows.sort(key=lambda row: -float(row.get("age", 0)))
    total = sum(int(document.get("total", 0)) for _, document in documents)
    return {"total": total, "limit": limit, "connections": rows[:limit]}


def merge_ebpf_status(documents: Sequence[tuple[int, JSON]]) -> JSON:
    """Worker 0's document, with the kernel forwarder's counters summed over every worker."""
    base = dict(next((d for i, d in documents if i == 0), documents[0][1] if documents else {}))
    counters = dict(base.get("counters", {}))
    for key in [k for k in counters if k.startswith("sockmap_")]:
        counters[key] = sum(int(d.get("counters", {}).get(key, 0)) for _, d in documents)
    base["counters"] = counters
    return base


def _supervisors(key: str) -> bool:
    """Whether a map or counter key belongs to a feature the supervisor runs."""
    return key.split("_", 1)[0] in SUPERVISOR_FEATURES


def merged_states(workers: Mapping[str, str], own: AccelerationStatus) -> dict[str, str]:
    """The workers' feature states with the supervisor's features in place; ``stats`` is
    active when either side's per-CPU counters are."""
    states = {**workers, **{f: own.features[f] for f in SUPERVISOR_FEATURES}}
    if own.features["stats"] == "active":
        states["stats"] = "active"
    return states


def with_supervisor_features(document: JSON, own: AccelerationStatus) -> JSON:
    """A worker's ``/ebpf/status`` with the features the supervisor runs as it reports them."""
    states = merged_states(document.get("features", {}), own)
    said = {**document.get("reasons", {}), **document.get("notes", {})}
    said = {f: r for f, r in said.items() if f not in SUPERVISOR_FEATURES}
    said.update({f: own.reasons[f] for f in SUPERVISOR_FEATURES if f in own.reasons})
    if states.get("stats") == "active" and document.get("features", {}).get("stats") != "active":
        said.pop("stats", None)
    return {
        **document,
        "ebpf_enabled": bool(document.get("ebpf_enabled"))
        or any(own.features[f] == "active" for f in SUPERVISOR_FEATURES),
        "features": states,
        "reasons": {f: r for f, r in said.items() if states.get(f) != "active"},
        "notes": {f: r for f, r in said.items() if states.get(f) == "active"},
        "maps": {
            **{k: v for k, v in document.get("maps", {}).items() if not _supervisors(k)},
            **{k: m.to_json() for k, m in own.maps.items() if _supervisors(k)},
        },
        "details": {
            **{
                k: v for k, v in document.get("details", {}).items() if k not in SUPERVISOR_FEATURES
            },
            **{k: dict(d) for k, d in own.details.items() if k in SUPERVISOR_FEATURES},
        },
        "counters": {
            **{k: v for k, v in document.get("counters", {}).items() if not _supervisors(k)},
            **{k: v for k, v in own.counters.items() if _supervisors(k)},
        },
    }


def metrics_with_supervisor_features(
    families: list[Metric], own: AccelerationStatus
) -> list[Metric]:
    """The summed families with the supervisor's features' states and counters in place of
    the workers' (which run them off)."""
    out: list[Metric] = []
    workers_states: dict[str, str] = {}
    for family in families:
        if family.name == "trio_sni_ebpf_feature_state":
            workers_states = {
                s.labels["feature"]: s.labels["state"] for s in family.samples if s.value
            }
        elif not family.name.startswith(tuple(f"trio_sni_ebpf_{f}_" for f in SUPERVISOR_FEATURES)):
            out.append(family)
    if workers_states:
        out.append(feature_state_family(merged_states(workers_states, own)))
    out.extend(ebpf_counter_families({k: v for k, v in own.counters.items() if _supervisors(k)}))
    return out
