"""Scoring latency of orders that hit rules against orders that hit none, in process.

An order that hits a rule is evaluated again, traced, for the hits' explanations, and
the explanations are scrubbed of the order's PII: with the 200-rule load set about one
order in twenty hits (about 18 rules each), so these orders are the p99 of the scoring
path. ``Scorer.score`` in a loop, our own redis-server for the features, SQLite
evidence log, as ``run.py``'s in-process row.

    .venv/bin/python benchmarks/load/hit_latency.py --orders 3000

Prints wall µs per order, the p50/p90/p99 ms of all orders, and the median ms of the
orders that hit a rule and of those that did not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R
from client import make_orders

from rules import write_rules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--cpus", default="0", help="this process and its redis-server")
    args = parser.parse_args()
    from riskd.config import load_config
    from riskd.domain.clock import SystemClock
    from riskd.service.wiring import build_components

    cpus = R.cpu_set(args.cpus)
    work = Path(tempfile.mkdtemp(prefix="riskd-hits-"))
    port = R.free_port()
    cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    try:
        with R.process(cmd, cpus, port=port):
            config = load_config(
                env={},
                rules_dir=str(write_rules(args.rules, work / "rules")),
                data_dir=str(work / "data"),
                redis_url=f"redis://127.0.0.1:{port}/0",
                metrics_port=-1,
                log_level="warning",
            )
            components = build_components(config, SystemClock())
            try:
                orders = make_orders("hits", args.orders, 2)
                took: list[float] = []
                hit: list[bool] = []
                started = time.perf_counter()
                for order in orders:
                    t = time.perf_counter()
                    decision = components.scorer.score(order, timeout_s=1.0)
                    took.append(time.perf_counter() - t)
                    hit.append(bool(decision.reasons))
                elapsed = time.perf_counter() - started
            finally:
                components.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    q = statistics.quantiles(took, n=100)
    hits = [t for t, h in zip(took, hit, strict=True) if h]
    misses = [t for t, h in zip(took, hit, strict=True) if not h]
    row = {
        "wall_us_per_order": round(1e6 * elapsed / len(took)),
        "p50_ms": round(1e3 * q[49], 2),
        "p90_ms": round(1e3 * q[89], 2),
        "p99_ms": round(1e3 * q[98], 2),
        "orders_hitting": len(hits),
        "hit_median_ms": round(1e3 * statistics.median(hits), 2) if hits else None,
        "no_hit_median_ms": round(1e3 * statistics.median(misses), 2),
    }
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
