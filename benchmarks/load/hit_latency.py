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

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R
from client import make_orders


def main() -> int:
    args = R.in_process_args(__doc__ or "")
    with R.own_components(args.rules, R.cpu_set(args.cpus), "riskd-hits-") as components:
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
