"""What a new connection costs the proxy, in CPU, per forwarding mode and per stage.

Run from a checkout (``python bench/bench_setup_cost.py --help``; as root for ``kernel``). It
prints tables; it is a measurement script, not a test. Method:

* The proxy runs in this process (``trio_sni.server.Proxy``, access log off unless
  ``--access-log``); the clients and the backend run in a second process (this file,
  ``--peers``), so this process's CPU time (``getrusage``) is the proxy's alone.
* Each connection: the client sends a real ClientHello (``tests/data/hellos/curl.bin``), the
  backend reads it and answers 5 bytes, the client reads them and closes, the backend closes.
  With ``--round-trips K``, the client sends 5 bytes and waits for the 5-byte answer K-1 more
  times before it closes (the relay's share of a real TLS connection).
  ``--connections`` of them, ``--concurrency`` at a time, after ``--warmup`` unmeasured ones.
* Rounds alternate the modes (A B C A B C ...); the table shows the median and min-max of
  the proxy's CPU milliseconds per connection, the share of it spent in the kernel (system
  time: syscalls, and the TCP work they do), and the connections per second.
* ``--profile``: one more run per mode under cProfile, and the share of the proxy's time in
  each stage of a connection (accept, first bytes, policy, resolve, connect, forward, close
  and log), from the cumulative time of the functions that do it. The profiler slows
  everything down; the shares, not the absolute times, are the point.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
HELLO = (HERE.parent / "tests" / "data" / "hellos" / "curl.bin").read_bytes()
HELLO_NAME = "x.test"
ANSWER = b"hello"

# ------------------------------------------------------------------------------------------
# The peers (a separate process): the backend and the clients


def _backend(listener: socket.socket) -> None:
    def serve(conn: socket.socket) -> None:
        with conn:
            got = 0
            while got < len(HELLO):
                chunk = conn.recv(65536)
                if not chunk:
                    return
                got += len(chunk)
            conn.sendall(ANSWER)
            while chunk := conn.recv(65536):
                if chunk == ANSWER:  # a further round trip: echo it
                    conn.sendall(ANSWER)

    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _clients(port: int, n: int, concurrency: int, round_trips: int) -> float:
    """Open ``n`` connections through the proxy, ``concurrency`` at a time; the seconds taken."""
    done = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal done
        while True:
            with lock:
                if done >= n:
                    return
                done += 1
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(HELLO)
                for trip in range(round_trips):
                    if trip:
                        conn.sendall(ANSWER)
                    got = b""
                    while len(got) < len(ANSWER):
                        chunk = conn.recv(64)
                        if not chunk:
                            raise SystemExit(f"the proxy closed after {got!r}")
                        got += chunk

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def peers_main() -> None:
    """Serve a backend; run each job (one JSON line on stdin) and answer with its duration."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    threading.Thread(target=_backend, args=(listener,), daemon=True).start()
    print(listener.getsockname()[1], flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        seconds = _clients(job["port"], job["n"], job["concurrency"], job["round_trips"])
        print(json.dumps({"seconds": seconds}), flush=True)


# ------------------------------------------------------------------------------------------
# The proxy (this process)


def config(mode: str, backend_port: int, access_log: str | None) -> dict[str, Any]:
    return {
        "listeners": [{"host": "127.0.0.1", "port": 0, "target_port": backend_port}],
        "rules": [{"suffix": HELLO_NAME, "allow_private": True}],
        "resolver": {"hosts": {HELLO_NAME: ["127.0.0.1"]}},
        "limits": {"per_client_rate": 0, "per_client_connections": 0},
        "log": {"access_log": access_log, "level": "warning"},
        "ebpf": {"sockmap": {"enabled": mode == "kernel"}},
        "forwarding": {"mode": mode},
        "fallback_mode": "none",
    }


#: Stages of a connection and the functions whose cumulative time is that stage (the first
#: name found in the profile counts).
STAGES = {
    "accept": ["_accept_loop"],
    "first bytes": ["read_first_bytes"],
    "policy": ["decide", "check_client", "acquire"],
    "resolve": ["resolve"],
    "connect": ["connect_to_addresses"],
    "forward": ["forward"],
    "close and log": ["aclose_forcefully", "write_access_log", "access_record", "wrap"],
}


class Run:
    def __init__(self, peers: subprocess.Popen[str], backend_port: int, args: Any) -> None:
        self.peers, self.backend_port, self.args = peers, backend_port, args

    def once(self, mode: str, n: int, profile: cProfile.Profile | None = None) -> dict[str, float]:
        from trio_sni.sansio.config_load import load_config
        from trio_sni.server import Proxy

        result: dict[str, float] = {}

        async def main() -> None:
            records: list[dict[str, object]] = []
            log = self.args.access_log
            proxy = Proxy(
                load_config(config(mode, self.backend_port, log)),
                access_log=None if log else records.append,
            )
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(proxy.serve)
                port = listeners[0].socket.getsockname()[1]
                await trio.to_thread.run_sync(self._job, port, self.args.warmup)
                before = resource.getrusage(resource.RUSAGE_SELF)
                if profile is not None:
                    profile.enable()
                seconds = await trio.to_thread.run_sync(self._job, port, n)
                if profile is not None:
                    profile.disable()
                after = resource.getrusage(resource.RUSAGE_SELF)
                # The last connections' cleanup: wait until every one has ended (no event
                # says so; the proxy's table of live connections does).
                while proxy.context.live:  # noqa: ASYNC110
                    await trio.sleep(0.01)
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                result["cpu_ms"] = 1000 * cpu / n
                result["system_share"] = (after.ru_stime - before.ru_stime) / cpu
                result["per_s"] = n / seconds
                proxy.shutdown()

        trio.run(main)
        return result

    def _job(self, port: int, n: int) -> float:
        assert self.peers.stdin is not None
        assert self.peers.stdout is not None
        self.peers.stdin.write(
            json.dumps(
                {
                    "port": port,
                    "n": n,
                    "concurrency": self.args.concurrency,
                    "round_trips": self.args.round_trips,
                }
            )
            + "\n"
        )
        self.peers.stdin.flush()
        seconds: float = json.loads(self.peers.stdout.readline())["seconds"]
        return seconds


def stage_shares(profile: cProfile.Profile) -> dict[str, float]:
    """The share of the proxy's profiled time in each stage."""
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    cumulative: dict[str, float] = {}
    for (_file, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        cumulative[name] = max(cumulative.get(name, 0.0), ct)
    shares: dict[str, float] = {}
    for stage, names in STAGES.items():
        for name in names:
            if name in cumulative:
                shares[stage] = cumulative[name] / total
                break
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="copy,splice,kernel")
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--round-trips",
        type=int,
        default=1,
        help="exchanges per connection (a TLS 1.3 handshake and one request is about 3)",
    )
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--access-log", default=None, help="a file (e.g. /dev/null): log on")
    parser.add_argument("--profile", action="store_true", help="add a cProfile run per mode")
    parser.add_argument(
        "--profile-out", default=None, help="with --profile: also save DIR/<mode>.pstats"
    )
    args = parser.parse_args()
    if args.peers:
        peers_main()
        return
    sys.path.insert(0, str(HERE.parent))
    peers = subprocess.Popen(
        [sys.executable, __file__, "--peers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peers.stdout is not None
        run = Run(peers, int(peers.stdout.readline()), args)
        modes = args.modes.split(",")
        results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode in modes:
                results[mode].append(run.once(mode, args.connections))
        print(
            f"{args.connections} connections per run, {args.concurrency} at a time, "
            f"{args.rounds} rounds, {args.round_trips} round trip(s) each, "
            f"access log {'on' if args.access_log else 'off'}"
        )
        print(
            f"{'mode':8} {'proxy CPU ms/connection':>28} {'in the kernel':>14}"
            f" {'connections/s':>22}"
        )
        for mode in modes:
            cpu = [r["cpu_ms"] for r in results[mode]]
            system = statistics.median(r["system_share"] for r in results[mode])
            rate = [r["per_s"] for r in results[mode]]
            print(
                f"{mode:8} {statistics.median(cpu):10.3f} ({min(cpu):.3f}-{max(cpu):.3f})"
                f"{100 * system:13.0f}%"
                f"{statistics.median(rate):12.0f} ({min(rate):.0f}-{max(rate):.0f})"
            )
        if args.profile:
            print("\nshare of the proxy's profiled time by stage (cumulative, overlapping)")
            print(f"{'stage':16}" + "".join(f"{m:>10}" for m in modes))
            shares = {}
            for mode in modes:
                profile = cProfile.Profile()
                run.once(mode, args.connections, profile)
                shares[mode] = stage_shares(profile)
                if args.profile_out:
                    Path(args.profile_out).mkdir(parents=True, exist_ok=True)
                    profile.dump_stats(str(Path(args.profile_out) / f"{mode}.pstats"))
            for stage in STAGES:
                row = "".join(f"{100 * shares[m].get(stage, 0.0):9.1f}%" for m in modes)
                print(f"{stage:16}{row}")
    finally:
        peers.kill()


if __name__ == "__main__":
    main()
