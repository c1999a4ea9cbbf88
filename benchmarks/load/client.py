"""A multi-process gRPC load generator for ``ScoringService`` (grpc.aio, pre-serialized requests).

Each process builds its own unique orders up front (serialized, so the timed
loop only sends bytes), opens several channels (SO_REUSEPORT balances
connections, not calls) and runs either

- closed loop: ``concurrency`` callers per process send back to back (max calls/s), or
- open loop: calls start on a fixed schedule at ``rate`` calls/s in total, and
  latency is measured from the scheduled start (no coordinated omission).

``run_load`` returns calls, errors, seconds, client CPU and latency percentiles.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import random
import resource
import time
from dataclasses import dataclass

import grpc

from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order, PaymentMethod
from riskd.service import convert
from riskd.service.gen.riskd.v1 import scoring_pb2

SCORE = "/riskd.v1.ScoringService/Score"
SCORE_BATCH = "/riskd.v1.ScoringService/ScoreBatch"


@dataclass(frozen=True, slots=True)
class LoadResult:
    calls: int
    orders: int
    errors: int
    seconds: float
    client_cpu_s: float
    p50_ms: float
    p99_ms: float

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds

    @property
    def orders_per_s(self) -> float:
        return self.orders / self.seconds


def make_order(rng: random.Random, order_id: str, space: str = "") -> Order:
    """A plausible order: keys drawn from pools so velocity counters see repeats (buyers,
    devices and addresses prefixed with ``space``: another space, other identities)."""
    qty = rng.randint(1, 3)
    price = rng.choice((990, 4990, 12900, 39900, 89900))
    items = qty * price
    total = items + 800
    return Order(
        order_id=order_id,
        buyer=Buyer(
            f"{space}b{rng.randrange(20000)}",
            rng.randrange(2000),
            "13800000000",
            "n",
            "110101199001010000",
            Address("Zhejiang", "Hangzhou", "Xihu", f"{space}road {rng.randrange(5000)}"),
        ),
        shop_id=f"s{rng.randrange(500)}",
        merchant_id="m",
        items=(Item(f"sku{rng.randrange(1000)}", "beauty", price, qty),),
        amounts=Amounts(items=items, shipping=800, total=total),
        channel=rng.choice((Channel.LIVE_ROOM, Channel.SHORT_VIDEO, Channel.SHOP_PAGE)),
        live_room_id=f"lr{rng.randrange(300)}",
        creator_id=f"c{rng.randrange(300)}",
        device_id=f"{space}d{rng.randrange(20000)}",
        ip=f"10.{rng.randrange(256)}.{rng.randrange(256)}.1",
        payment_method=PaymentMethod.WALLET,
        client_time=time.time(),
    )


def make_orders(prefix: str, n: int, seed: int, space: str = "") -> list[Order]:
    rng = random.Random(seed)
    return [make_order(rng, f"{prefix}-{i}", space) for i in range(n)]


def requests(prefix: str, n: int, batch: int, seed: int, space: str = "") -> list[bytes]:
    """``n`` serialized Score requests, or ScoreBatch requests of ``batch`` orders."""
    orders = make_orders(prefix, n * max(batch, 1), seed, space)
    if not batch:
        return [
            scoring_pb2.ScoreRequest(order=convert.order_to_proto(o)).SerializeToString()
            for o in orders
        ]
    return [
        scoring_pb2.ScoreBatchRequest(
            orders=[convert.order_to_proto(o) for o in orders[i : i + batch]]
        ).SerializeToString()
        for i in range(0, len(orders), batch)
    ]


async def _worker(stubs, payloads, deadline, per_call, start_at, interval, lat, counts):  # type: ignore[no-untyped-def]
    i = 0
    next_at = start_at
    while True:
        if interval:
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            begin = next_at
        else:
            begin = time.perf_counter()
        if begin >= deadline or counts[2] >= len(payloads):
            return
        payload = payloads[counts[2]]
        counts[2] += 1
        stub = stubs[i % len(stubs)]
        i += 1
        try:
            await stub(payload, timeout=5)
            counts[0] += 1
        except grpc.RpcError:
            counts[1] += 1
        lat.append(time.perf_counter() - begin)


async def _run(target, method, payloads, seconds, channels, concurrency, rate):  # type: ignore[no-untyped-def]
    # A local subchannel pool per channel: each channel is its own TCP connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(target, options=options) for _ in range(channels)]
    stubs = [c.unary_unary(method) for c in chans]
    for s in stubs:  # connect and warm up
        await s(payloads[0], timeout=10)
    lat: list[float] = []
    counts = [0, 0, 1]
    start = time.perf_counter()
    deadline = start + seconds
    interval = concurrency / rate if rate else 0.0
    workers = [
        _worker(
            stubs, payloads, deadline, 0, start + k * interval / concurrency, interval, lat, counts
        )
        for k in range(concurrency)
    ]
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - start
    for c in chans:
        await c.close()
    return counts[0], counts[1], elapsed, lat


def _process(args: tuple, queue: mp.Queue) -> None:  # type: ignore[type-arg]
    target, method, prefix, n, batch, seconds, channels, concurrency, rate, seed, space, go = args
    payloads = requests(prefix, n, batch, seed, space)
    go.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    ok, err, elapsed, lat = asyncio.run(
        _run(target, method, payloads, seconds, channels, concurrency, rate)
    )
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    queue.put((ok, err, elapsed, cpu, lat))


def run_load(
    target: str,
    *,
    seconds: float = 5.0,
    processes: int = 2,
    channels: int = 2,
    concurrency: int = 16,
    rate: float = 0.0,
    batch: int = 0,
    max_calls: int = 40_000,
    tag: str = "",
    fresh: bool = False,
) -> LoadResult:
    """Drive ``target`` and return what happened (``rate`` 0: closed loop). Each call's
    orders draw their identities from the same pools, so a later call meets the same
    buyers, devices and addresses again; ``fresh``: identities of this call's own."""
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    go = ctx.Event()
    prefix = f"{tag or 'load'}-{os.getpid()}-{time.time_ns()}"
    per_rate = rate / processes if rate else 0.0
    per_calls = max_calls // processes
    procs = [
        ctx.Process(
            target=_process,
            args=(
                (
                    target,
                    SCORE_BATCH if batch else SCORE,
                    f"{prefix}-{p}",
                    per_calls,
                    batch,
                    seconds,
                    channels,
                    concurrency,
                    per_rate,
                    p,
                    f"{prefix}-{p}-" if fresh else "",
                    go,
                ),
                queue,
            ),
        )
        for p in range(processes)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5 + per_calls * max(batch, 1) / 20_000)  # let them build their requests
    go.set()
    results = [queue.get(timeout=seconds + 600) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r[4])
    calls = sum(r[0] for r in results)
    return LoadResult(
        calls=calls,
        orders=calls * max(batch, 1),
        errors=sum(r[1] for r in results),
        seconds=max(r[2] for r in results),
        client_cpu_s=sum(r[3] for r in results),
        p50_ms=1000 * lat[len(lat) // 2] if lat else 0.0,
        p99_ms=1000 * lat[int(len(lat) * 0.99)] if lat else 0.0,
    )
