"""A soak run: ``riskd serve`` on its defaults under steady open-loop load, round by round.

Per round: calls, errors, p99 and the server's resident memory. With Redis features
(``--features redis``, our own redis-server) the process should stay flat; with the
in-process store (the embedded default) it grows by what 24 hours of velocity state
holds per order, which the last line gives in KiB per call (after the first round).
Each round's orders meet the same buyers, devices and addresses as the last one's;
``--fresh`` gives each round identities of its own, as a day of new buyers does (review:
the same identities every round read 1.2 KiB per call, new ones 6-8 KiB).

    .venv/bin/python benchmarks/load/soak.py --features memory --rounds 12 [--fresh]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import run as R
from client import run_load


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", choices=("memory", "redis"), default="memory")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--fresh", action="store_true", help="new identities every round")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="riskd-soak-"))
    everything = set(range(os.cpu_count() or 1))
    port = R.free_port()
    env = {
        **os.environ,
        "RISKD_DATA_DIR": str(work / "data"),
        "RISKD_METRICS_PORT": "-1",
        "RISKD_LOG_LEVEL": "warning",
    }
    try:
        with contextlib.ExitStack() as stack:
            if args.features == "redis":
                redis_port = R.free_port()
                redis = ["redis-server", "--port", str(redis_port), "--save", ""]
                stack.enter_context(R.process(redis, everything, port=redis_port))
                env["RISKD_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            (pid,) = stack.enter_context(R.process(R.riskd_cmd(port), everything, env, port=port))
            first, calls = 0.0, 0  # from the end of the first round: warm-up left out
            for i in range(args.rounds):
                r = run_load(
                    f"127.0.0.1:{port}",
                    tag=f"soak{i}",
                    seconds=args.seconds,
                    processes=1,
                    channels=2,
                    concurrency=8,
                    rate=args.rate,
                    fresh=args.fresh,
                )
                if i == 0:
                    first = rss_mib(pid)
                else:
                    calls += r.calls
                print(
                    f"round {i}: {r.calls} calls, {r.errors} errors, p99 {r.p99_ms:.1f} ms,"
                    f" RSS {rss_mib(pid):.0f} MiB",
                    flush=True,
                )
            grown = rss_mib(pid) - first
            per_call = 1024 * grown / max(calls, 1)
            print(f"RSS grew {grown:.0f} MiB over the last {calls} calls: {per_call:.2f} KiB/call")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
