"""A stop on a locked decision-log database, with Redis away: what it costs and keeps.

The operator's case the spill files are for (README, "What a crash can lose"): ``riskd
serve`` on our own redis-server and its SQLite decision log scores orders, Redis is shut
down (orders answered degraded ``features`` wait to be counted), another process holds
the SQLite file under ``BEGIN EXCLUSIVE`` (decisions wait to be committed), then
SIGTERM. Printed: the seconds from SIGTERM to exit, whether a worker was killed, the
spill files (names and modes); then, the lock released and Redis back, a second start:
decisions logged (each order once?), orders counted in Redis (each once?), files left,
``riskd evidence verify``'s exit status. A stop with nothing spilled in time (a worker
killed first) shows as orders missing from the log or from Redis.

With ``--stall-workers`` the scoring workers are stopped (``SIGSTOP``) while 4 more
orders come, the file still locked, and resumed before the SIGTERM: the gRPC process
decides those itself (the fallback for a late worker, or scored there), so its own
decision log and catch-up have a queue to flush and spill at the stop as well as the
workers'.

    .venv/bin/python benchmarks/load/stop_locked.py --score-workers 0
    .venv/bin/python benchmarks/load/stop_locked.py --score-workers 2
    .venv/bin/python benchmarks/load/stop_locked.py --score-workers 2 --stall-workers
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import redis
import run as R
from google.protobuf import json_format

from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2, scoring_pb2_grpc

EXAMPLE = R.ROOT / "examples" / "order.json"
PREFIX = "bench-stop:"


def send(port: int, tag: str, n: int, timeout_s: float = 2.0) -> list[bool]:
    """Score ``n`` orders ``tag-i`` (the example order's buyer and device): degraded each."""
    base = json.loads(EXAMPLE.read_text("utf-8"))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        out = []
        for i in range(n):
            order = json_format.ParseDict({**base, "order_id": f"{tag}-{i}"}, order_pb2.Order())
            reply = stub.Score(scoring_pb2.ScoreRequest(order=order), timeout=timeout_s)
            out.append(reply.decision.degraded)
        return out


def children(pid: int) -> list[int]:
    """The processes ``pid`` started (``riskd serve``'s scoring workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def stalled(port: int, pids: list[int], n: int) -> list[bool]:
    """Score ``n`` orders while the processes ``pids`` are stopped (``SIGSTOP``): short
    deadlines, so they are resumed before the pool's monitor finds them hung (2 s)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        return send(port, "stalled", n, timeout_s=0.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def serve(work: Path, port: int, redis_port: int, workers: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "RISKD_DATA_DIR": str(work / "var"),
        "RISKD_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "RISKD_REDIS_PREFIX": PREFIX,
        "RISKD_METRICS_PORT": "-1",
        "RISKD_SCORE_WORKERS": str(workers),
    }
    log = (work / "riskd.log").open("ab")
    proc = subprocess.Popen(R.riskd_cmd(port), cwd=R.ROOT, env=env, stdout=log, stderr=log)
    R.wait_port(port, timeout=120)
    return proc


def redis_up(work: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = ["redis-server", "--port", str(port), "--dir", str(work), "--dbfilename", "dump.rdb"]
    proc = subprocess.Popen([*cmd, "--appendonly", "no"], stdout=subprocess.DEVNULL)
    R.wait_port(port)
    return proc


def one_run(workers: int, stall: bool = False) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="riskd-stop-locked-"))
    port, redis_port = R.free_port(), R.free_port()
    db_path = work / "var" / "riskd.db"
    cache = redis_up(work, redis_port)
    riskd = serve(work, port, redis_port, workers)
    holder: sqlite3.Connection | None = None
    try:
        sent = send(port, "up", 5)
        redis.Redis(port=redis_port).shutdown(save=True)  # kept on disk for the restart
        cache.wait(10)
        sent += send(port, "away", 8)
        holder = sqlite3.connect(db_path, isolation_level=None, timeout=5)
        holder.execute("BEGIN EXCLUSIVE")
        sent += send(port, "locked", 4)
        if stall:
            sent += stalled(port, children(riskd.pid), 4)
            time.sleep(1.0)  # the workers read their late calls and answer them unscored
        started = time.monotonic()
        riskd.send_signal(signal.SIGTERM)
        status = riskd.wait(300)
        stop_s = time.monotonic() - started
    finally:
        if riskd.poll() is None:
            riskd.kill()
            riskd.wait()
    if holder is not None:
        holder.execute("ROLLBACK")
        holder.close()
    log_text = (work / "riskd.log").read_text("utf-8", errors="replace")
    spilled = sorted((work / "var").glob("*.jsonl"))
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in spilled}
    cache = redis_up(work, redis_port)
    riskd = serve(work, port, redis_port, workers)
    try:
        time.sleep(3.0)  # the catch-up counts what the spill and the table handed back
        riskd.send_signal(signal.SIGTERM)
        riskd.wait(120)
        client = redis.Redis(port=redis_port)
        counted = sum(1 for _ in client.scan_iter(match=f"{PREFIX}o:*", count=10_000))
    finally:
        if riskd.poll() is None:
            riskd.kill()
        cache.terminate()
        cache.wait(10)
    with sqlite3.connect(db_path) as db:
        rows, distinct = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM decision_log"
        ).fetchone()
    verify = subprocess.run(
        [sys.executable, "-m", "riskd", "evidence", "verify", "--database", f"sqlite:///{db_path}"],
        cwd=R.ROOT,
        capture_output=True,
    )
    shutil.rmtree(work, ignore_errors=True)
    return {
        "score_workers": workers,
        "stall_workers": stall,
        "orders": len(sent),
        "degraded": sum(sent),
        "stop_s": round(stop_s, 1),
        "exit_status": status,
        "worker_killed": "killing it" in log_text,
        "spill_files": modes,
        "logged": rows,
        "logged_distinct": distinct,
        "counted_in_redis": counted,
        "files_left": sorted(p.name for p in (work / "var").glob("*.jsonl")),
        "verify_exit": verify.returncode,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--score-workers", type=int, default=0)
    parser.add_argument(
        "--stall-workers",
        action="store_true",
        help="stop the workers while 4 more orders come: the gRPC process decides them",
    )
    args = parser.parse_args()
    print(json.dumps(one_run(args.score_workers, args.stall_workers), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
