"""The gRPC process's CPU per call with and without scoring workers, at one offered rate.

Alternating rounds, one run: the bare grpcio server, riskd scoring in its gRPC process
(``score_workers = 0``) and riskd with ``--score-workers`` worker processes (a
comma-separated list runs each count), each driven
open-loop at ``--rate`` calls/s (so every server does the same work per second), then
riskd with workers closed-loop (its ratio to the bare server's closed-loop rate, the
issue's unary target) and open-loop at half that rate (the p99 target). The gRPC process
runs on ``--server-cpus``; its worker processes are moved to ``--worker-cpus`` once
started; the load generator and Redis run on ``--client-cpus``. 200 rules, Redis
features, SQLite evidence log, as ``run.py``; ``--redis-shards N`` runs N redis-servers as
the feature store's shards (their CPU added up).

    .venv/bin/python benchmarks/load/workers.py --rate 500 --rounds 2

Per row: calls/s, CPU µs per call of the gRPC process and of the workers together,
Redis CPU µs per call, p50/p99 ms, and the share of calls the gRPC process answered
itself (``riskd_score_worker_fallbacks_total`` by reason, read from its /metrics) or
sent to another worker than theirs (``rerouted``).
On a machine with spare cores give the workers their own (``--server-cpus 0
--worker-cpus 2-9 --client-cpus 10-15 --processes 4``): then the closed-loop row
is the unary ``Score`` throughput of one gRPC process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R
from client import run_load

from rules import write_rules


def pin(pid: int, server: set[int], workers: set[int]) -> list[int]:
    """Every thread of ``pid`` onto ``server``, its children onto ``workers``."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), server)
    for child in children:
        os.sched_setaffinity(child, workers)
    return children


def row(name: str, r: Any, cpu: float, extra: dict[str, float]) -> dict[str, Any]:
    out = R.report(name, r, cpu)  # prints the row; then the other processes' CPU
    added = {key: round(1e6 * seconds / max(r.calls, 1), 1) for key, seconds in extra.items()}
    print(json.dumps(added), flush=True)
    out.update(added)
    return out


def fallbacks(metrics_port: int | None) -> dict[str, float]:
    """``riskd_score_worker_fallbacks_total`` by reason and the reroutes, from /metrics."""
    if metrics_port is None:
        return {}
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "riskd_score_worker_fallbacks_total":
                out[sample.labels["reason"]] = sample.value
            elif sample.name == "riskd_score_worker_reroutes_total":  # sent to another worker
                out["rerouted"] = sample.value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--score-workers", default="2", help="counts, e.g. 4,8")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--worker-cpus", default="1")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--redis-shards", type=int, default=1, help="redis-servers (shards)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--aio-front",
        action="store_true",
        help="also measure aio_front.py (an asyncio gRPC front, a prototype) with the workers",
    )
    args = parser.parse_args()
    server, workers, client = (
        R.cpu_set(args.server_cpus),
        R.cpu_set(args.worker_cpus),
        R.cpu_set(args.client_cpus),
    )
    os.sched_setaffinity(0, client)
    work = Path(tempfile.mkdtemp(prefix="riskd-workers-"))
    rules = write_rules(args.rules, work / "rules")
    load: dict[str, Any] = dict(
        seconds=args.seconds, processes=args.processes, channels=4, concurrency=8
    )
    bare_rate = 0.0
    rows: list[dict[str, Any]] = []
    redis_ports = [R.free_port() for _ in range(args.redis_shards)]
    try:
        with contextlib.ExitStack() as stack:
            redis_pids = [
                pid
                for port in redis_ports
                for pid in stack.enter_context(
                    R.process(
                        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                        client,
                        port=port,
                    )
                )
            ]

            def emit(
                name: str,
                port: int,
                pids: list[int],
                kids: list[int],
                rate: float,
                metrics_port: int | None = None,
            ) -> float:
                target = f"127.0.0.1:{port}"
                run_load(target, tag="warm", **{**load, "seconds": 2, "rate": rate})
                k0 = sum(R.cpu_seconds(k) for k in kids)
                r0 = sum(R.cpu_seconds(p) for p in redis_pids)
                f0 = fallbacks(metrics_port)
                r, cpu = R.measured(pids, lambda: run_load(target, tag="m", rate=rate, **load))
                extra = {
                    "workers_cpu_us_per_call": sum(R.cpu_seconds(k) for k in kids) - k0,
                    "redis_cpu_us_per_call": sum(R.cpu_seconds(p) for p in redis_pids) - r0,
                }
                out = row(name, r, cpu, extra)
                f1 = fallbacks(metrics_port)
                if f1:
                    share = {
                        k: round((v - f0.get(k, 0.0)) / max(r.calls, 1), 4) for k, v in f1.items()
                    }
                    print(json.dumps({"fallback_share": share}), flush=True)
                    out["fallback_share"] = share
                rows.append(out)
                return float(r.calls_per_s)

            for rnd in range(args.rounds):
                port = R.free_port()
                bare = [sys.executable, "benchmarks/load/bare_server.py"]
                with R.process([*bare, "--listen", f"127.0.0.1:{port}"], server, port=port) as p:
                    emit(f"round {rnd}: bare grpcio at {args.rate:.0f}/s", port, p, [], args.rate)
                    if rnd == args.rounds - 1:
                        bare_rate = emit("bare grpcio, closed loop", port, p, [], 0.0)
                for n in (0, *(int(c) for c in args.score_workers.split(","))):
                    port, mport = R.free_port(), R.free_port()
                    env = {
                        **R.riskd_env(work, rules, redis_ports, f"r{rnd}w{n}"),
                        "RISKD_SCORE_WORKERS": str(n),
                        "RISKD_WORKERS": str(max(4, 2 * n)),
                        "RISKD_METRICS_PORT": str(mport),
                    }
                    cmd = R.riskd_cmd(port)
                    with R.process(cmd, server | workers, env, port=port) as p:
                        time.sleep(1)
                        kids = pin(p[0], server, workers)
                        name = f"round {rnd}: riskd score_workers={n} at {args.rate:.0f}/s"
                        emit(name, port, p, kids, args.rate, mport)
                        if n and rnd == args.rounds - 1:
                            name = f"riskd score_workers={n}, closed loop"
                            rate = emit(name, port, p, kids, 0.0, mport)
                            rows[-1]["ratio_to_bare"] = round(rate / bare_rate, 3)
                            name = f"riskd score_workers={n}, open loop at {rate / 2:.0f}/s"
                            emit(name, port, p, kids, rate / 2, mport)
                    if n and args.aio_front and rnd == args.rounds - 1:
                        port = R.free_port()
                        cmd = [sys.executable, "benchmarks/load/aio_front.py", "--listen"]
                        cmd += [f"127.0.0.1:{port}", "--score-workers", str(n)]
                        with R.process(cmd, server | workers, env, port=port) as p:
                            time.sleep(1)
                            kids = pin(p[0], server, workers)
                            name = f"aio front, score_workers={n}, closed loop"
                            rate = emit(name, port, p, kids, 0.0)
                            rows[-1]["ratio_to_bare"] = round(rate / bare_rate, 3)
                            emit(
                                f"aio front, score_workers={n}, at {args.rate:.0f}/s",
                                port,
                                p,
                                kids,
                                args.rate,
                            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
