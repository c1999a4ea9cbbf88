"""Ledger throughput and latency through gRPC, on SQLite and PostgreSQL, durability on.

Run: ``.venv/bin/python -m pytest benchmarks/test_ledger_bench.py -s``.

* ``test_ledger_latency``: one CompensateBuyer-sized request (a deposit) per round,
  under pytest-benchmark.
* ``test_ledger_throughput_and_p99``: 16 client threads send deposits as fast as the
  server answers for ``SECONDS``, giving requests per second; then the same
  clients are paced to half that rate and the p50/p99 latency is reported.
  SQLite runs WAL with ``synchronous=FULL``; PostgreSQL commits synchronously
  (its default). Numbers land in the benchmark JSON's ``extra_info`` and on stdout.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from riskd.ledger import Book
from riskd.service.gen.riskd.v1 import ledger_pb2 as pb
from riskd.service.gen.riskd.v1 import ledger_pb2_grpc as pb_grpc
from riskd.service.interceptors import ErrorInterceptor
from riskd.service.ledger import add_ledger_service
from riskd.service.metrics import Metrics
from riskd.sql import Database

SECONDS = 5.0
CLIENTS = 16
PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stub(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pb_grpc.LedgerServiceStub]]:
    if request.param == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('bench')) / 'ledger.db'}"
    else:
        url = f"{PG_BASE}?schema=ledger_bench_{uuid.uuid4().hex[:12]}"
    book = Book(Database(url))
    book.register_shop("bench")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=CLIENTS),
        interceptors=[ErrorInterceptor(Metrics())],
    )
    add_ledger_service(server, book, actor_of=lambda ctx: "bench")
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield request.param, pb_grpc.LedgerServiceStub(channel)
    server.stop(None).wait()
    book.db.drop_schema()
    book.close()


_keys = itertools.count()


def deposit(stub: pb_grpc.LedgerServiceStub) -> None:
    key = f"b{next(_keys)}-{uuid.uuid4().hex[:6]}"
    stub.Deposit(pb.DepositRequest(idempotency_key=key, shop_id="bench", amount_fen=100))


def test_ledger_latency(benchmark: Any, stub: tuple[str, pb_grpc.LedgerServiceStub]) -> None:
    benchmark(deposit, stub[1])


def drive(stub: pb_grpc.LedgerServiceStub, seconds: float, rate: float | None) -> list[float]:
    """Send deposits from 16 threads for ``seconds``; open-loop at ``rate``/s when given."""
    latencies: list[float] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def client(n: int) -> None:
        sent = 0
        while (now := time.perf_counter()) - start < seconds:
            if rate is not None:
                due = start + (sent * CLIENTS + n) / rate
                if due > now:
                    time.sleep(due - now)
            t0 = time.perf_counter()
            deposit(stub)
            with lock:
                latencies.append(time.perf_counter() - t0)
            sent += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def test_ledger_throughput_and_p99(
    benchmark: Any, stub: tuple[str, pb_grpc.LedgerServiceStub]
) -> None:
    backend, client = stub
    rps = len(drive(client, SECONDS, None)) / SECONDS
    paced = sorted(drive(client, SECONDS, rps / 2))
    p50 = statistics.median(paced) * 1000
    p99 = paced[int(len(paced) * 0.99) - 1] * 1000
    benchmark.extra_info.update(
        {"backend": backend, "rps": round(rps), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
    )
    print(
        f"\n{backend}: {rps:.0f} ledger requests/s;"
        f" at {rps / 2:.0f}/s p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {paced[-1] * 1000:.0f} ms"
    )
    benchmark.pedantic(deposit, args=(client,), rounds=1, iterations=1)
