"""Where the in-process scoring path's CPU goes, step by step (thread CPU per order).

``Scorer.score`` in a loop as ``run.py``'s in-process row (200-rule load set, our own
redis-server for the features, the SQLite evidence log with its Vault, wired by
``build_components`` as ``riskd serve`` does), with each step of the scoring thread and
of the decision-log writer thread timed by ``time.thread_time_ns`` around it. Steps
nest (``Scorer.score`` holds the scoring steps, ``DecisionLog._write`` the writer's):

    .venv/bin/python benchmarks/load/cpu_split.py --orders 3000

Prints one JSON row: process CPU µs per order (until the log is flushed), orders/s,
and each step's thread CPU µs per order. The timers cost ~1 µs per wrapped call.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as R
from client import make_orders

_spent: collections.Counter[str] = collections.Counter()


def _timed(owner: Any, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that its thread CPU adds up under ``label``."""
    fn: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[label] += time.thread_time_ns() - started

    setattr(owner, name, wrapper)


def _instrument() -> None:
    from riskd.dsl import program
    from riskd.engine import scorer
    from riskd.evidence import log
    from riskd.pii.vault import Vault
    from riskd.sql import Database, Tx

    steps = [
        (scorer.Scorer, "score", "scorer: score (all of the scoring thread)"),
        (scorer.Scorer, "_recorded", "scorer: idempotency look-up"),
        (scorer, "observe", "scorer: blind indexes of the identities"),
        (scorer.Scorer, "_read_features", "scorer: features (Redis script)"),
        (scorer.Scorer, "_decide", "scorer: decide"),
        (program.Program, "evaluate", "scorer: decide: evaluate the rules"),
        (program.Program, "explain", "scorer: decide: explain hits"),
        (scorer.Scorer, "_decision", "scorer: decide: combine"),
        (log.DecisionLog, "protect", "scorer: protect the request (content tag, record)"),
        (scorer.Scorer, "_append", "scorer: append to the log"),
        (log.DecisionLog, "_write", "writer: write (all of a batch)"),
        (log, "_row", "writer: canonical JSON rows"),
        (log.DecisionLog, "_prepare_in", "writer: data keys"),
        (Vault, "encrypt_fields", "writer: encrypt PII"),
        (log, "blind_indexes", "writer: blind indexes"),
        (log, "append_texts", "writer: chained insert"),
        (Tx, "executemany", "writer: other inserts (executemany)"),
        (Database, "run", "writer: transaction (incl. commit)"),
    ]
    for owner, name, label in steps:
        _timed(owner, name, label)


def main() -> int:
    args = R.in_process_args(__doc__ or "")
    _instrument()
    with R.own_components(args.rules, R.cpu_set(args.cpus), "riskd-split-") as components:
        orders = make_orders("split", args.orders + 200, 2)
        for order in orders[:200]:  # connections, caches
            components.scorer.score(order, timeout_s=1.0)
        components.scorer.close()
        _spent.clear()
        started, cpu = time.perf_counter(), time.process_time()
        for order in orders[200:]:
            components.scorer.score(order, timeout_s=1.0)
        components.scorer.close()  # flushes: the writer's backlog belongs to the path
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    n = args.orders
    row: dict[str, Any] = {
        "orders_per_s": round(n / elapsed),
        "process_cpu_us_per_order": round(1e6 * cpu / n),
    }
    row.update({label: round(ns / n / 1000, 1) for label, ns in sorted(_spent.items())})
    print(json.dumps(row, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
