"""A/B of ``riskd serve`` builds in one run: alternating rounds, medians, same Redis.

Each tree is a checkout of riskd (e.g. ``git archive <rev> | tar -x -C /tmp/before``
with ``.venv`` symlinked in); the server runs from the tree's own directory (``python
-m riskd`` imports from the working directory first). A tree ending in ``bare`` runs
``bare_server.py`` instead. ``TREE:K=V+K2=V2`` adds environment variables (``;`` in a
value stands for ``:``, for PYTHONPATH). Servers on ``--server-cpus``, the load
generator and Redis on ``--client-cpus``.

    .venv/bin/python benchmarks/load/ab.py /tmp/bare,/tmp/before,/tmp/after --rounds 3

Modes: ``unary`` (closed loop), ``open:RATE`` (open loop, calls/s), ``batch`` (64).
Per row: calls/s, orders/s, server CPU µs per call, p50/p99 ms, context switches
per call of the server process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R
from client import run_load


def switches(pid: int) -> int:
    """Voluntary + involuntary context switches of all the process's threads so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            lines = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        total += sum(int(x.split()[1]) for x in lines if "ctxt_switches" in x)
    return total


def measure(spec: str, n: int, work: Path, rules: Path, redis_port: int, args: Any) -> dict:
    tree, _, extra = spec.partition(":")
    port = R.free_port()
    env = R.riskd_env(work, rules, redis_port, f"{Path(tree).name}{n}")
    env["PYTHONPATH"] = tree
    for kv in filter(None, extra.split("+")):
        key, _, value = kv.partition("=")
        env[key] = value.replace(";", ":")
    script = Path(__file__).resolve().parent / "bare_server.py"
    cmd = [sys.executable, "-m", "riskd", "serve", "--listen", f"127.0.0.1:{port}"]
    if tree.endswith("bare"):
        cmd = [sys.executable, str(script), "--listen", f"127.0.0.1:{port}"]
    load: dict[str, Any] = dict(seconds=args.seconds, processes=2, channels=4, concurrency=16)
    if args.mode == "batch":
        load.update(batch=64, max_calls=2000, concurrency=2)
    elif args.mode.startswith("open:"):
        load.update(rate=float(args.mode[5:]))
    R.ROOT = Path(tree)  # the server's working directory: its own riskd
    with R.process(cmd, R.cpu_set(args.server_cpus), env, port=port) as pids:
        target = f"127.0.0.1:{port}"
        run_load(target, tag="warm", **{**load, "seconds": 1.5})
        before = switches(pids[0])
        result, cpu = R.measured(pids, lambda: run_load(target, tag="m", **load))
        row = {
            "tree": spec,
            "calls_per_s": round(result.calls_per_s),
            "orders_per_s": round(result.orders_per_s),
            "cpu_us_per_call": round(1e6 * cpu / max(result.calls, 1)),
            "p50_ms": round(result.p50_ms, 1),
            "p99_ms": round(result.p99_ms, 1),
            "switches_per_call": round((switches(pids[0]) - before) / max(result.calls, 1), 1),
            "errors": result.errors,
        }
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", help="comma-separated trees (TREE[:K=V+K=V])")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--mode", default="unary")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    args = parser.parse_args()
    client_cpus = R.cpu_set(args.client_cpus)
    os.sched_setaffinity(0, client_cpus)
    work = Path(tempfile.mkdtemp(prefix="riskd-ab-"))
    rules = R.write_rules(200, work / "rules")
    specs = args.trees.split(",")
    rows: dict[str, list[dict]] = {s: [] for s in specs}
    redis_port = R.free_port()
    redis_cmd = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    with R.process(redis_cmd, client_cpus, port=redis_port):
        for n in range(args.rounds):
            for spec in specs:
                rows[spec].append(measure(spec, n, work, rules, redis_port, args))
    for spec, got in rows.items():
        medians = {
            k: statistics.median(r[k] for r in got)
            for k in ("calls_per_s", "orders_per_s", "cpu_us_per_call", "p99_ms")
        }
        medians["switches_per_call"] = statistics.median(r["switches_per_call"] for r in got)
        print(json.dumps({"median": spec, **medians}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
