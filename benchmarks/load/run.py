"""The issue's speed section in one run: bare grpcio vs riskd, p99, batches, two processes.

    .venv/bin/python benchmarks/load/run.py --seconds 8 --server-cpus 0 --client-cpus 1

Everything is measured in the same run, on loopback, with 200 rules, our own
redis-server (features) and the SQLite evidence log on:

1. bare grpcio server answering a constant: closed-loop calls/s, server CPU µs/call;
2. ``riskd serve``, one process, unary ``Score``: the same, and the ratio to (1);
3. ``riskd serve`` at half of (2)'s rate, open loop: p50/p99 latency;
4. ``ScoreBatch`` of 64: orders/s, against the in-process scoring path
   (``Scorer.score`` in a loop: rules + features + log, no gRPC);
5. two ``riskd serve`` processes sharing one port (SO_REUSEPORT), several channels, on
   the one redis-server and again on two shards (whether one Redis held the row back);
6. ``h2load`` (when installed) on the bare server and on riskd: the same request
   body every time, so on riskd it measures the idempotent replay path.

Servers are pinned to ``--server-cpus`` and the load generator (and Redis) to
``--client-cpus`` with sched_setaffinity, so the client stays off the server's core.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from client import LoadResult, make_orders, requests, run_load  # noqa: E402

from rules import write_rules  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_set(text: str) -> set[int]:
    """``"0,2-4"`` → ``{0, 2, 3, 4}``."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def process(
    cmd: Sequence[str], cpus: set[int], env: dict[str, str] | None = None, port: int = 0
) -> Iterator[list[int]]:
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=errors,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    try:
        if port:
            try:
                wait_port(port)
            except RuntimeError:
                errors.seek(0)
                sys.stderr.write(errors.read().decode(errors="replace")[-3000:])
                raise
        yield [proc.pid]
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors.close()


def measured(pids: Sequence[int], fn: Any) -> tuple[LoadResult, float]:
    """Run ``fn`` and return its result and the servers' CPU seconds meanwhile, counted
    until they are idle again (``settle``)."""
    before = sum(cpu_seconds(p) for p in pids)
    result = fn()
    settle(pids)
    return result, sum(cpu_seconds(p) for p in pids) - before


def settle(pids: Sequence[int], timeout: float = 15.0) -> None:
    """Wait until the servers use under 5 % of a core: the decision log's writer may
    still be committing a backlog from the load, which belongs to that load's cost and
    would otherwise run (and add latency) during the next measurement."""
    deadline = time.monotonic() + timeout
    last = sum(cpu_seconds(p) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(cpu_seconds(p) for p in pids)
        if now - last < 0.25 * 0.05:
            return
        last = now


def riskd_env(
    work: Path, rules: Path, redis_port: int | Sequence[int], name: str
) -> dict[str, str]:
    ports = [redis_port] if isinstance(redis_port, int) else list(redis_port)
    return {
        **os.environ,
        "RISKD_RULES_DIR": str(rules),
        "RISKD_DATA_DIR": str(work / name),
        "RISKD_REDIS_URL": ",".join(f"redis://127.0.0.1:{p}/0" for p in ports),
        "RISKD_REDIS_PREFIX": f"bench-{name}:",
        "RISKD_METRICS_PORT": "-1",
        "RISKD_LOG_LEVEL": "warning",
        "RISKD_DEADLINE_MS": "1000",
    }


def riskd_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "riskd", "serve", "--listen", f"127.0.0.1:{port}"]


def report(name: str, r: LoadResult, server_cpu: float) -> dict[str, Any]:
    row = {
        "name": name,
        "calls_per_s": round(r.calls_per_s, 1),
        "orders_per_s": round(r.orders_per_s, 1),
        "server_cpu_us_per_call": round(1e6 * server_cpu / max(r.calls, 1), 1),
        "server_cpu_us_per_order": round(1e6 * server_cpu / max(r.orders, 1), 1),
        "client_cpu_us_per_call": round(1e6 * r.client_cpu_s / max(r.calls, 1), 1),
        "p50_ms": round(r.p50_ms, 2),
        "p99_ms": round(r.p99_ms, 2),
        "errors": r.errors,
    }
    print(json.dumps(row), flush=True)
    return row


def in_process_args(doc: str) -> argparse.Namespace:
    """The options of the in-process benchmarks: ``--orders``, ``--rules``, ``--cpus``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--cpus", default="0", help="this process and its redis-server")
    return parser.parse_args()


@contextmanager
def own_components(rules: int, cpus: set[int], prefix: str) -> Iterator[Any]:
    """``build_components`` as ``riskd serve`` wires them (evidence log with its Vault), on
    the load set of ``rules`` rules and our own redis-server (pinned to ``cpus``), in a
    temporary data folder; closed (the log flushed) and removed after."""
    from riskd.config import load_config
    from riskd.domain.clock import SystemClock
    from riskd.service.wiring import build_components

    work = Path(tempfile.mkdtemp(prefix=prefix))
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"]
    try:
        with process(cmd, cpus, port=port):
            config = load_config(
                env={},
                rules_dir=str(write_rules(rules, work / "rules")),
                data_dir=str(work / "data"),
                redis_url=f"redis://127.0.0.1:{port}/0",
                metrics_port=-1,
                log_level="warning",
            )
            components = build_components(config, SystemClock())
            try:
                yield components
            finally:
                components.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def in_process(work: Path, rules: Path, redis_port: int, n: int, cpus: set[int]) -> dict[str, Any]:
    """``Scorer.score`` in a loop, no gRPC: the scoring path's own ceiling."""
    from riskd.config import load_config
    from riskd.domain.clock import SystemClock
    from riskd.service.wiring import build_components

    config = load_config(env=riskd_env(work, rules, redis_port, "inproc"))
    components = build_components(config, SystemClock())
    orders = make_orders(f"inproc-{time.time_ns()}", n, 7)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        for o in orders[:200]:
            components.scorer.score(o, timeout_s=1.0)
        start, cpu0 = time.perf_counter(), time.process_time()
        for o in orders[200:]:
            components.scorer.score(o, timeout_s=1.0)
        components.scorer.close()  # the log's writer may lag: its backlog is part of the path
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    finally:
        os.sched_setaffinity(0, old)
        components.close()
    row = {
        "name": "in-process Scorer.score",
        "orders_per_s": round((n - 200) / elapsed, 1),
        "server_cpu_us_per_order": round(1e6 * cpu / (n - 200), 1),
    }
    print(json.dumps(row), flush=True)
    return row


def h2load(port: int, body: bytes, work: Path, seconds: int, name: str) -> dict[str, Any]:
    data = work / f"{name}.bin"
    data.write_bytes(b"\x00" + len(body).to_bytes(4, "big") + body)
    out = subprocess.run(
        [
            "h2load",
            f"http://127.0.0.1:{port}/riskd.v1.ScoringService/Score",
            "-d",
            str(data),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-c",
            "8",
            "-m",
            "16",
            "-D",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    ).stdout
    rate = re.search(r"finished in .*?, ([\d.]+) req/s", out)
    row = {
        "name": name,
        "calls_per_s": float(rate.group(1)) if rate else None,
        "raw": out.splitlines()[-12:],
    }
    print(json.dumps({k: v for k, v in row.items() if k != "raw"}), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rules", type=int, default=200)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument(
        "--second-server-cpus", default="", help="CPUs of the second process (default: same)"
    )
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    server_cpus, client_cpus = cpu_set(args.server_cpus), cpu_set(args.client_cpus)
    os.sched_setaffinity(0, client_cpus)
    work = Path(tempfile.mkdtemp(prefix="riskd-bench-"))
    rules = write_rules(args.rules, work / "rules")
    rows: list[dict[str, Any]] = []
    load = dict(seconds=args.seconds, processes=args.processes, channels=4, concurrency=16)
    redis_port = free_port()
    redis_cmd = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    try:
        with process(redis_cmd, client_cpus, port=redis_port) as redis_pids:
            rows += run_all(
                args, work, rules, redis_port, redis_pids, server_cpus, client_cpus, load
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def run_all(
    args: argparse.Namespace,
    work: Path,
    rules: Path,
    redis_port: int,
    redis_pids: list[int],
    server_cpus: set[int],
    client_cpus: set[int],
    load: dict[str, Any],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    port = free_port()
    bare = [sys.executable, "benchmarks/load/bare_server.py", "--listen", f"127.0.0.1:{port}"]
    body = requests("h2load", 1, 0, 1)[0]
    with process(bare, server_cpus, port=port) as pids:
        r, cpu = measured(pids, lambda: run_load(f"127.0.0.1:{port}", tag="bare", **load))
        rows.append(report("bare grpcio, Score", r, cpu))
        if shutil.which("h2load"):
            rows.append(h2load(port, body, work, int(args.seconds), "h2load bare grpcio"))
    bare_rate = rows[0]["calls_per_s"]

    port = free_port()
    env = riskd_env(work, rules, redis_port, "one")
    with process(riskd_cmd(port), server_cpus, env, port=port) as pids:
        target = f"127.0.0.1:{port}"
        run_load(target, tag="warm", **{**load, "seconds": 2})
        redis0 = cpu_seconds(redis_pids[0])
        r, cpu = measured(pids, lambda: run_load(target, tag="one", **load))
        row = report("riskd, one process, Score", r, cpu)
        row["redis_cpu_us_per_call"] = round(
            1e6 * (cpu_seconds(redis_pids[0]) - redis0) / max(r.calls, 1), 1
        )
        row["ratio_to_bare"] = round(row["calls_per_s"] / bare_rate, 3)
        print(
            json.dumps(
                {
                    "ratio_to_bare": row["ratio_to_bare"],
                    "redis_cpu_us_per_call": row["redis_cpu_us_per_call"],
                }
            ),
            flush=True,
        )
        rows.append(row)
        half = row["calls_per_s"] / 2
        r, cpu = measured(pids, lambda: run_load(target, tag="open", rate=half, **load))
        rows.append(report(f"riskd, open loop at {half:.0f}/s", r, cpu))
        r, cpu = measured(
            pids,
            lambda: run_load(
                target, tag="batch", batch=64, max_calls=2000, **{**load, "concurrency": 2}
            ),
        )
        batch_row = report("riskd, ScoreBatch of 64", r, cpu)
        rows.append(batch_row)
        if shutil.which("h2load"):
            rows.append(h2load(port, body, work, int(args.seconds), "h2load riskd (replays)"))
    inproc = in_process(work, rules, redis_port, 3000, server_cpus)
    inproc["batch_ratio"] = round(batch_row["orders_per_s"] / inproc["orders_per_s"], 3)
    print(json.dumps({"batch_to_inprocess": inproc["batch_ratio"]}), flush=True)
    rows.append(inproc)

    second_cpus = cpu_set(args.second_server_cpus) if args.second_server_cpus else server_cpus
    rows.append(
        two_processes(
            work,
            rules,
            [redis_port],
            redis_pids,
            (server_cpus, second_cpus),
            load,
            "sharing the port",
        )
    )
    # the same with two redis-server shards: whether one Redis was what held the row back
    port2 = free_port()
    redis_cmd = ["redis-server", "--port", str(port2), "--save", "", "--appendonly", "no"]
    with process(redis_cmd, client_cpus, port=port2) as pids2:
        rows.append(
            two_processes(
                work,
                rules,
                [redis_port, port2],
                redis_pids + pids2,
                (server_cpus, second_cpus),
                load,
                "on 2 Redis shards",
            )
        )
    return rows


def two_processes(
    work: Path,
    rules: Path,
    redis_ports: list[int],
    redis_pids: list[int],
    cpus: tuple[set[int], set[int]],
    load: dict[str, Any],
    name: str,
) -> dict[str, Any]:
    """Two ``riskd serve`` processes on one port (SO_REUSEPORT), ``redis_ports`` their
    feature store's shards (``redis_pids`` their servers); the row reports the CPU share of
    each process and the CPU per call of every redis-server together."""
    port = free_port()
    cmd = riskd_cmd(port)
    tag = f"s{len(redis_ports)}"
    with (
        process(cmd, cpus[0], riskd_env(work, rules, redis_ports, f"a{tag}"), port=port) as a,
        process(cmd, cpus[1], riskd_env(work, rules, redis_ports, f"b{tag}")) as b,
    ):
        time.sleep(3)
        target = f"127.0.0.1:{port}"
        run_load(target, tag=f"warm2{tag}", **{**load, "seconds": 2, "channels": 8})
        before = [cpu_seconds(p) for p in a + b]
        redis0 = sum(cpu_seconds(p) for p in redis_pids)
        r, cpu = measured(
            a + b, lambda: run_load(target, tag=f"two{tag}", **{**load, "channels": 8})
        )
        row = report(f"riskd, two processes {name}", r, cpu)
        shares = [cpu_seconds(p) - c0 for p, c0 in zip(a + b, before, strict=True)]
        row["cpu_share_per_process"] = [round(x / max(sum(shares), 1e-9), 3) for x in shares]
        redis_cpu = sum(cpu_seconds(p) for p in redis_pids) - redis0
        row["redis_cpu_us_per_call"] = round(1e6 * redis_cpu / max(r.calls, 1), 1)
        print(
            json.dumps(
                {
                    "cpu_share_per_process": row["cpu_share_per_process"],
                    "redis_cpu_us_per_call": row["redis_cpu_us_per_call"],
                }
            ),
            flush=True,
        )
        return row


if __name__ == "__main__":
    sys.exit(main())
