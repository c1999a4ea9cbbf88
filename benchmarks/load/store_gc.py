"""The in-process feature store: CPU per order and what its state costs the garbage collector.

Each round records ``--orders`` orders with fresh buyers, devices, IPs and addresses (shops,
live rooms and creators from small pools) and reads the 200-rule load set's queries (as
``riskd serve`` does with its default store), then times one full ``gc.collect()``: the
pause every full collection would put on every request thread while it holds the GIL,
and the memory the store grew by per order.
Alternating rounds, this tree against ``--against REV`` (``riskd/features/memory.py`` as it
was there), one process each, so both start from the same heap.

    .venv/bin/python benchmarks/load/store_gc.py --against 779641b --orders 20000 --rounds 2
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from revision import module_at  # noqa: E402

from riskd.domain.clock import FakeClock  # noqa: E402
from riskd.dsl.program import load_rules  # noqa: E402
from riskd.features import Observation, memory  # noqa: E402
from rules import write_rules  # noqa: E402


def measure(module: ModuleType, n: int) -> dict[str, float]:
    queries = load_rules(write_rules(200, Path(tempfile.mkdtemp()) / "rules")).feature_queries
    rng = random.Random(1)
    pools = {"shop": 500, "live_room": 300, "creator": 300}
    orders = [
        (
            f"o{i}",
            rng.randrange(100_000),
            {
                **{k: f"{k}{rng.randrange(10**9)}" for k in ("buyer", "device", "ip", "address")},
                **{k: f"{k}{rng.randrange(size)}" for k, size in pools.items()},
            },
        )
        for i in range(n)
    ]
    gc.collect()
    gc.freeze()  # the orders and the program: not the store's
    clock = FakeClock(1_700_000_000.0)
    store = module.InProcessFeatureStore(clock)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    cpu = time.process_time()
    for order_id, amount, keys in orders:
        clock.advance(0.05)  # 20 orders a second of clock time
        store.record_and_read(Observation(order_id, clock.now(), amount, keys), queries)
    cpu = time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
    gc.collect()
    start = time.perf_counter()
    gc.collect()
    pause = time.perf_counter() - start
    return {
        "cpu_us_per_order": round(1e6 * cpu / n, 1),
        "full_gc_ms": round(1000 * pause, 1),
        "tracked_objects": len(gc.get_objects()),
        "rss_kib_per_order": round(rss / n, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="", help="an older revision to compare with")
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # a child's revision
    args = parser.parse_args()
    if args.one:
        module = memory if args.one == "tree" else module_at(args.one, "riskd/features/memory.py")
        print(json.dumps(measure(module, args.orders)))
        return 0
    for rnd in range(args.rounds):
        for rev in [r for r in (args.against, "tree") if r]:
            out = subprocess.run(
                [sys.executable, __file__, "--one", rev, "--orders", str(args.orders)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(f"round {rnd} {rev:>9}: {out.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
