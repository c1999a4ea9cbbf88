"""Redis's own CPU per order for the feature store, this tree against an older revision.

The load set's queries (``rules.py``: 200 rules, 63 feature queries, 7 keys) on key pools
like the load generator's, 1,000 orders per simulated second: ``--warm`` orders build up
the windows' state, then ``--orders`` are measured. Redis's ``commandstats`` gives the
server's microseconds per EVALSHA; the client's CPU per order is this process's. Each
round runs every store against a fresh own redis-server (nothing on disk), alternating.

    .venv/bin/python benchmarks/load/redis_cost.py --against 96efb13 --rounds 2

``--against REV`` loads ``riskd/features/redis_store.py`` as it was at REV (``git show``).
``--shards N`` also runs this tree's store over N own redis-servers and gives each
shard's Redis CPU per order (what one Redis no longer has to carry alone).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import redis

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from revision import module_at  # noqa: E402

from riskd.domain.clock import FakeClock  # noqa: E402
from riskd.dsl.program import load_rules  # noqa: E402
from riskd.features import Observation, redis_store  # noqa: E402
from rules import write_rules  # noqa: E402
from tests.own_redis import OwnRedis  # noqa: E402

POOLS = {
    "buyer": 20_000,
    "device": 20_000,
    "ip": 65_536,
    "address": 5_000,
    "shop": 500,
    "live_room": 300,
    "creator": 300,
}


def measure(module: ModuleType, urls: list[str], queries: frozenset, warm: int, n: int) -> dict:  # type: ignore[type-arg]
    """Run the load set through ``module``'s store on ``urls`` (older revisions: one)."""
    clients = [redis.Redis.from_url(u) for u in urls]
    for c in clients:
        c.flushall()
    rng = random.Random(1)
    clock = FakeClock(1_700_000_000.0)
    target = urls[0] if len(urls) == 1 else urls
    store = module.RedisFeatureStore(target, clock, prefix="bench:", timeout_s=5.0)
    cpu = 0.0
    for i in range(warm + n):
        if i == warm:
            for c in clients:
                c.config_resetstat()
            cpu = time.process_time()
        clock.advance(0.001)
        keys = {k: f"{k}{rng.randrange(pool)}" for k, pool in POOLS.items()}
        obs = Observation(f"o{i}", clock.now(), rng.randrange(1000, 90000), keys)
        store.record_and_read(obs, queries)
    cpu = time.process_time() - cpu
    inner: dict[str, float] = {}  # the commands the script ran (Redis 7 counts them), per order
    per_shard, memory = [], 0
    for c in clients:
        every = c.info("commandstats")
        per_shard.append(every["cmdstat_evalsha"]["usec"] / n)
        for k, v in every.items():
            if k not in ("cmdstat_evalsha", "cmdstat_info", "cmdstat_config|resetstat"):
                name = k.removeprefix("cmdstat_")
                inner[name] = inner.get(name, 0.0) + v["calls"] / n
        memory += c.info("memory")["used_memory"]
        c.close()
    store.close()
    return {
        "redis_us": sum(per_shard),
        "per_shard_us": per_shard,
        "client_us": cpu / n * 1e6,
        "memory_mb": memory / 2**20,
        "inner": inner,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", action="append", default=[], help="older revision(s)")
    parser.add_argument("--warm", type=int, default=30_000)
    parser.add_argument("--orders", type=int, default=4_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shards", type=int, default=0, help="also this tree on N shards")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        queries = load_rules(write_rules(200, Path(tmp))).feature_queries
    stores = {rev: module_at(rev, "riskd/features/redis_store.py") for rev in args.against}
    stores["this tree"] = redis_store
    own = OwnRedis()
    own.start()
    more = [OwnRedis() for _ in range(max(args.shards - 1, 0))]
    for server in more:
        server.start()
    try:
        for rnd in range(args.rounds):
            for name, module in stores.items():
                got = measure(module, [own.url], queries, args.warm, args.orders)
                print(
                    f"round {rnd} {name:>10}: Redis {got['redis_us']:6.0f} us/order, "
                    f"client {got['client_us']:4.0f} us/order, "
                    f"Redis memory {got['memory_mb']:.0f} MiB",
                    flush=True,
                )
                inner = sorted(got["inner"].items(), key=lambda kv: -kv[1])
                calls = " ".join(f"{k} {v:.1f}" for k, v in inner)
                print(f"  commands per order ({sum(got['inner'].values()):.1f}): {calls}")
            if args.shards > 1:
                urls = [own.url, *(server.url for server in more)]
                got = measure(redis_store, urls, queries, args.warm, args.orders)
                shares = " / ".join(f"{us:.0f}" for us in got["per_shard_us"])
                print(
                    f"round {rnd} this tree on {args.shards} shards: Redis {shares} us/order "
                    f"(together {sum(got['per_shard_us']):.0f}), "
                    f"client {got['client_us']:4.0f} us/order",
                    flush=True,
                )
    finally:
        own.stop()
        for server in more:
            server.stop()


if __name__ == "__main__":
    main()
