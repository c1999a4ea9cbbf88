"""What only the Redis store promises: one round trip, bounded keys, fast failure, recovery."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis
from features_support import REDIS_URL, SHARD_URLS, delete_prefix

from riskd.domain.clock import FakeClock, SystemClock
from riskd.domain.features import KEYS, WINDOWS, Agg, FeatureQuery
from riskd.errors import ConfigError, UnavailableError
from riskd.features import InProcessFeatureStore, Observation, RedisFeatureStore
from riskd.features.store import SEEN_TTL_S, OtherContentError, WritesRefusedError
from tests.own_redis import OwnRedis

QUERIES = [
    FeatureQuery(Agg.COUNT, "device", "1m"),
    FeatureQuery(Agg.SUM, "device", "1h"),
    FeatureQuery(Agg.COUNT, "buyer", "24h"),
    FeatureQuery(Agg.DISTINCT, "device", "1h", of="buyer"),
    FeatureQuery(Agg.DISTINCT, "shop", "24h", of="buyer"),
]
COUNT_DEVICE_1M, SUM_DEVICE_1H = QUERIES[0], QUERIES[1]


def order(clock: FakeClock, order_id: str, amount: int = 100, **keys: str) -> Observation:
    return Observation(order_id, clock.now(), amount, keys)


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"riskd-test:features:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(redis_client, prefix)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def test_one_call_is_one_round_trip_and_survives_a_script_flush(clock: FakeClock) -> None:
    """Redis's own count: one EVALSHA per call; after a restart (scripts gone) one
    SCRIPT LOAD more, and the call still answers."""
    own = OwnRedis()
    own.start()
    try:
        store = RedisFeatureStore(own.url, clock, timeout_s=2.0)
        admin = redis.Redis.from_url(own.url)
        store.record_and_read(order(clock, "warm", device="d", buyer="b", shop="s"), QUERIES)
        admin.config_resetstat()
        store.record_and_read(order(clock, "o1", device="d", buyer="b", shop="s"), QUERIES)
        store.read(order(clock, "o2", device="d"), QUERIES)
        assert _data_commands(admin) == {"evalsha": 2}
        admin.script_flush()
        admin.config_resetstat()
        got = store.record_and_read(order(clock, "o3", device="d"), QUERIES)
        assert got[COUNT_DEVICE_1M] == 3
        assert _data_commands(admin) == {"evalsha": 2, "script|load": 1}  # NOSCRIPT, load, again
        admin.close()
        store.close()
    finally:
        own.stop()


def test_connections_the_server_closed_are_reopened_and_reused_not_leaked(
    clock: FakeClock, own_redis: OwnRedis
) -> None:
    """Idle connections killed by Redis (a restart, ``timeout``, an operator's CLIENT KILL)
    cost no failed call; threads share connections, one per call in flight at most."""
    store = RedisFeatureStore(own_redis.url, clock, prefix="t:", timeout_s=2.0)
    admin = redis.Redis.from_url(own_redis.url)
    store.record_and_read(order(clock, "o1", device="d"), QUERIES)
    assert admin.client_kill_filter(_type="normal", skipme=True) == 1  # the store's idle one
    got = store.record_and_read(order(clock, "o2", device="d"), QUERIES)
    assert got[COUNT_DEVICE_1M] == 2

    def calls(t: int) -> None:
        for i in range(40):
            store.record_and_read(order(clock, f"t{t}-{i}", device="d"), QUERIES)

    threads = [threading.Thread(target=calls, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.read(order(clock, "q", device="d"), QUERIES)[COUNT_DEVICE_1M] == 2 + 6 * 40
    assert int(admin.info("clients")["connected_clients"]) <= 6 + 1  # the store's, admin
    store.close()
    # the server sees the closes when it next polls its sockets: wait for it (bounded)
    deadline = time.monotonic() + 5.0
    while int(admin.info("clients")["connected_clients"]) > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(admin.info("clients")["connected_clients"]) == 1
    admin.close()


def _data_commands(admin: redis.Redis) -> dict[str, int]:
    """Calls the client sent (Redis also counts the commands its scripts run)."""
    stats = admin.info("commandstats")
    sent = {"evalsha", "eval", "script|load"}
    return {
        name.removeprefix("cmdstat_"): int(s["calls"])
        for name, s in stats.items()
        if name.removeprefix("cmdstat_") in sent
    }


def test_every_key_is_under_the_prefix_with_a_bounded_ttl(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    store.record_and_read(order(clock, "o1", device="dev-hash", buyer="buyer-hash"), QUERIES)
    keys = sorted(k.decode() for k in redis_client.scan_iter(match=f"{prefix}*", count=10_000))
    assert [k.removeprefix(prefix) for k in keys] == [
        "d:device:buyer:dev-hash",
        "ev:buyer:buyer-hash",
        "ev:device:dev-hash",
        "o:o1",
        "tot:buyer:buyer-hash",
        "tot:device:dev-hash",
    ]
    ttls = [redis_client.ttl(k) for k in keys]
    assert all(0 < ttl <= SEEN_TTL_S for ttl in ttls), ttls
    store.close()


def test_no_key_is_ever_left_without_a_ttl(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """Sets created late (a distinct value first seen on an old key, an emptied event set)
    get their TTL at once, not at the key's next 30-minute tidy-up."""
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    store.record_and_read(order(clock, "o1", device="d"), QUERIES)  # no buyer: no distinct set
    clock.advance(1)
    store.record_and_read(order(clock, "o2", device="d", buyer="b"), QUERIES)
    clock.advance(86_400 + 1_800 + 60)
    store.record_and_read(order(clock, "o3", device="d", buyer="b"), QUERIES)  # all else left
    clock.advance(1)
    store.record_and_read(order(clock, "o4", device="d", shop="s", buyer="b2"), QUERIES)
    keys = list(redis_client.scan_iter(match=f"{prefix}*", count=10_000))
    assert len(keys) == 14  # 4 order markers, 4 keys x (events, totals), 2 distinct sets
    ttls = {k.decode().removeprefix(prefix): redis_client.ttl(k) for k in keys}
    assert all(0 < ttl <= SEEN_TTL_S for ttl in ttls.values()), ttls
    assert redis_client.zcard(f"{prefix}ev:device:d") == 2
    store.close()


def test_every_order_refreshes_the_ttl_of_each_part_of_its_keys(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """TTLs run on Redis's clock: a key that keeps getting orders must keep every part alive
    for ``SEEN_TTL_S``, or one expires under a live key and its counts drop."""
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    store.record_and_read(order(clock, "o1", device="d", buyer="b1"), QUERIES)
    parts = [f"{prefix}{part}" for part in ("ev:device:d", "tot:device:d", "d:device:buyer:d")]
    for key in parts:
        assert redis_client.expire(key, 5)
    clock.advance(1)
    store.record_and_read(order(clock, "o2", device="d", buyer="b2"), QUERIES)
    ttls = [redis_client.ttl(key) for key in parts]
    assert all(SEEN_TTL_S - 60 < ttl <= SEEN_TTL_S for ttl in ttls), ttls
    store.close()


def test_old_members_are_trimmed_as_time_moves_on(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    for i in range(50):
        store.record_and_read(order(clock, f"o{i}", device="d", buyer=f"b{i}"), QUERIES)
        clock.advance(600)
    assert redis_client.zcard(f"{prefix}ev:device:d") == 50
    assert redis_client.zcard(f"{prefix}d:device:buyer:d") == 50
    clock.advance(86_400 + 1_800)  # trimmed once out of the longest window for 30 min
    got = store.record_and_read(order(clock, "last", device="d", buyer="b"), QUERIES)
    assert (got[COUNT_DEVICE_1M], got[SUM_DEVICE_1H]) == (1, 100)
    assert redis_client.zcard(f"{prefix}ev:device:d") == 1
    assert redis_client.zcard(f"{prefix}d:device:buyer:d") == 1
    store.close()


def test_a_busy_key_is_trimmed_every_30_minutes_not_only_when_it_empties(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """A key that never goes quiet (an order every 10 minutes for 30 hours) keeps its sets
    to the longest window and a tidy-up interval: they do not grow without bound."""
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    for i in range(180):
        got = store.record_and_read(order(clock, f"o{i}", device="d", buyer=f"b{i}"), QUERIES)
        clock.advance(600)
    assert got[QUERIES[3]] == 6  # the buyers of the last hour
    bound = 24 * 6 + 3 + 1  # a day of orders, 30 min awaiting a tidy-up, the newest
    assert redis_client.zcard(f"{prefix}ev:device:d") <= bound
    assert redis_client.zcard(f"{prefix}d:device:buyer:d") <= bound
    store.close()


def test_concurrent_retries_from_several_clients_record_once(prefix: str, clock: FakeClock) -> None:
    stores = [RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0) for _ in range(6)]
    barrier = threading.Barrier(12)
    answers: list[dict[FeatureQuery, int]] = []

    def retry(store: RedisFeatureStore) -> None:
        barrier.wait()
        answers.append(store.record_and_read(order(clock, "same", 500, device="d"), QUERIES))

    threads = [threading.Thread(target=retry, args=(s,)) for s in stores * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 12
    assert all(a[COUNT_DEVICE_1M] == 1 and a[SUM_DEVICE_1H] == 500 for a in answers)
    for store in stores:
        store.close()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    server.start()
    yield server
    server.stop()


def _fails_fast(store: RedisFeatureStore, obs: Observation) -> float:
    started = time.monotonic()
    with pytest.raises(UnavailableError) as info:
        store.record_and_read(obs, QUERIES)
    assert "dev-secret" not in str(info.value)  # key values never reach messages
    return time.monotonic() - started


def test_dead_redis_fails_fast_and_the_store_recovers(
    own_redis: OwnRedis, clock: FakeClock
) -> None:
    store = RedisFeatureStore(own_redis.url, clock, prefix="t:")
    assert (
        store.record_and_read(order(clock, "o1", device="dev-secret"), QUERIES)[COUNT_DEVICE_1M]
        == 1
    )
    own_redis.stop()
    assert _fails_fast(store, order(clock, "o2", device="dev-secret")) < 0.5
    own_redis.start()  # empty, and without the script: EVALSHA must load it again
    got = store.record_and_read(order(clock, "o3", device="dev-secret"), QUERIES)
    assert got[COUNT_DEVICE_1M] == 1
    store.close()


def test_stalled_redis_times_out_at_the_socket_timeout_and_recovers(
    own_redis: OwnRedis, clock: FakeClock
) -> None:
    store = RedisFeatureStore(own_redis.url, clock, prefix="t:")  # default timeout: 50 ms
    store.record_and_read(order(clock, "o1", device="dev-secret"), QUERIES)
    own_redis.stall(True)
    try:
        elapsed = [_fails_fast(store, order(clock, f"s{i}", device="dev-secret")) for i in range(3)]
    finally:
        own_redis.stall(False)
    assert max(elapsed) < 0.5, elapsed
    got = store.record_and_read(order(clock, "o2", device="dev-secret"), QUERIES)
    assert got[COUNT_DEVICE_1M] >= 2  # o1 and o2 (a stalled call may have landed too)
    store.close()


def test_an_order_marked_by_the_previous_script_is_not_recorded_again(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """Markers written before keys were tagged (a bare time: the whole order was recorded)
    keep a retry from counting the order again after an upgrade."""
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    store.record_and_read(order(clock, "o1", device="d"), QUERIES)
    marker = f"{prefix}o:o1"
    assert redis_client.get(marker).decode().startswith("@")
    redis_client.set(marker, str(int(clock.now() * 1000)), ex=SEEN_TTL_S)  # the old form
    clock.advance(1)
    got = store.record_and_read(order(clock, "o1", device="d", buyer="b"), QUERIES)
    assert got[COUNT_DEVICE_1M] == 1
    assert got[QUERIES[2]] == 0  # the buyer key is not recorded for o1 either
    store.close()


def _on_shard(name: str, shard: int, shards: int = 2) -> str:
    """A value of key ``name`` that lives on ``shard`` (the store's CRC-32 rule)."""
    return next(
        v for i in range(100) if zlib.crc32(f"{name}:{(v := f'v{i}')}".encode()) % shards == shard
    )


def test_shards_split_the_keys_and_a_retry_repairs_a_partial_failure(
    prefix: str, clock: FakeClock, own_redis: OwnRedis, redis_client: redis.Redis
) -> None:
    store = RedisFeatureStore([REDIS_URL, own_redis.url], clock, prefix=prefix, timeout_s=0.5)
    device, buyer = _on_shard("device", 0), _on_shard("buyer", 1)
    queries = [FeatureQuery(Agg.COUNT, "device", "1h"), FeatureQuery(Agg.COUNT, "buyer", "24h")]
    got = store.record_and_read(order(clock, "o1", device=device, buyer=buyer), queries)
    assert list(got.values()) == [1, 1]
    second = redis.Redis.from_url(own_redis.url)
    assert redis_client.exists(f"{prefix}tot:device:{device}")
    assert not redis_client.exists(f"{prefix}tot:buyer:{buyer}")
    assert second.exists(f"{prefix}tot:buyer:{buyer}")
    second.close()
    own_redis.stop()
    o2 = order(clock, "o2", device=device, buyer=buyer)
    with pytest.raises(UnavailableError):
        store.record_and_read(o2, queries)  # the first shard recorded o2 all the same
    own_redis.start()  # empty: a Redis without persistence lost its keys
    retry = store.record_and_read(o2, queries)
    assert list(retry.values()) == [2, 1]  # o2 counted once on each shard
    assert store.record_and_read(o2, queries) == retry
    store.close()


def test_on_shards_the_claim_lives_on_the_home_shard_and_a_refused_call_claims_nothing(
    prefix: str, clock: FakeClock, own_redis: OwnRedis
) -> None:
    """Review: with a claim per shard, a first content whose call to one shard failed, and
    a changed retry refused by the other, left the retry's claim on the first shard, so
    the first content's catch-up (and retries) were refused there. The claim lives on the
    order id's home shard alone; the other shards record without checking."""
    store = RedisFeatureStore([REDIS_URL, own_redis.url], clock, prefix=prefix, timeout_s=0.5)
    order_id = next(f"o{i}" for i in range(100) if zlib.crc32(f"o{i}".encode()) % 2 == 0)
    device, buyer_a = _on_shard("device", 0), _on_shard("buyer", 1)
    buyer_b = next(f"b{i}" for i in range(100) if zlib.crc32(f"buyer:b{i}".encode()) % 2 == 1)
    count_buyer = FeatureQuery(Agg.COUNT, "buyer", "24h")
    first = Observation(order_id, clock.now(), 100, {"device": device, "buyer": buyer_a}, "AAAAAAA")
    changed = Observation(
        order_id, clock.now(), 100, {"device": device, "buyer": buyer_b}, "BBBBBBB"
    )
    own_redis.stop()
    with pytest.raises(UnavailableError):
        store.record_and_read(first, QUERIES)  # the home shard (0) recorded and claimed
    own_redis.start()
    with pytest.raises(OtherContentError):
        store.record_and_read(changed, QUERIES)
    caught_up = store.record_and_read(first, QUERIES)  # the first content's catch-up
    assert caught_up[COUNT_DEVICE_1M] == 1
    assert store.read(order(clock, "probe", buyer=buyer_a), [count_buyer])[count_buyer] == 1
    # the refused call's new key on the other shard was recorded (documented)
    assert store.read(order(clock, "probe", buyer=buyer_b), [count_buyer])[count_buyer] == 1
    # a keyless order still claims on its home shard
    keyless = Observation("o-keyless", clock.now(), 5, {}, "AAAAAAA")
    store.record_and_read(keyless, QUERIES)
    with pytest.raises(OtherContentError):
        store.record_and_read(Observation("o-keyless", clock.now(), 5, {}, "CCCCCCC"), QUERIES)
    store.close()


def test_on_shards_a_changed_retry_is_refused_when_no_key_lives_on_the_home_shard(
    prefix: str, clock: FakeClock
) -> None:
    """Every key of the order on the other shard: the first content still claims the order
    id on its home shard (a marker-only call), so a changed retry is refused there."""
    store = RedisFeatureStore(SHARD_URLS, clock, prefix=prefix, timeout_s=2.0)
    order_id = next(f"o{i}" for i in range(100) if zlib.crc32(f"o{i}".encode()) % 2 == 0)
    device = _on_shard("device", 1)
    other = next(v for i in range(100) if zlib.crc32(f"device:{(v := f'w{i}')}".encode()) % 2)
    try:
        store.record_and_read(
            Observation(order_id, clock.now(), 1, {"device": device}, "AAAAAAA"), QUERIES
        )
        changed = Observation(order_id, clock.now(), 9, {"device": other}, "BBBBBBB")
        with pytest.raises(OtherContentError):
            store.record_and_read(changed, QUERIES)
    finally:
        store.close()
        second = redis.Redis.from_url(SHARD_URLS[1])
        delete_prefix(second, prefix)
        second.close()


def test_a_resolver_that_does_not_answer_cannot_hold_a_call_past_its_bound(
    own_redis: OwnRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: Redis named by host name, restarted (a failover) while the resolver did not
    answer (a partition): each call waited for getaddrinfo, which no socket timeout bounds
    (2,002 ms against a 50 ms bound, 100 ms deadlines). A DNS outage cannot be made here,
    so getaddrinfo is held for the names of this test alone: the call fails within its
    bound, the next ones at once (no thread waits on the resolver behind the first), and
    the connection made once the name resolves serves the next call."""
    store = RedisFeatureStore(
        f"redis://localhost:{own_redis.port}/0", clock, prefix="t:", timeout_s=0.05
    )
    store.record_and_read(order(clock, "o1", device="dev-secret"), QUERIES)
    resolving, answer = threading.Event(), threading.Event()
    real = socket.getaddrinfo

    def held(host: object, *args: object, **kwargs: object) -> object:
        if host == "localhost":
            resolving.set()
            answer.wait(10)
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    own_redis.kill()
    own_redis.start()  # every connection must be made again
    monkeypatch.setattr(socket, "getaddrinfo", held)
    try:
        took = [_fails_fast(store, order(clock, f"s{i}", device="dev-secret")) for i in range(3)]
        assert resolving.is_set() and max(took) < 0.2, took
        threads = [t for t in threading.enumerate() if t.name == "riskd-redis-connect"]
        assert len(threads) == 1  # the later calls did not start another
        assert store.unreachable() == [(0, "TimeoutError")]  # a start does not hang either
    finally:
        answer.set()
    threads[0].join(5)
    got = store.record_and_read(order(clock, "o2", device="dev-secret"), QUERIES)
    assert got[COUNT_DEVICE_1M] == 1
    store.close()


def test_a_resolver_slower_than_the_bound_still_connects_a_redis_with_a_password(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: with AUTH (or a db other than 0) and a resolver that answers each lookup
    after the call's bound (80 ms against 50 ms), no call reached Redis again (0 of 40):
    the connect left aside ran its handshake against the deadline of the call that had
    given up on it, failed, and was dropped, so each call resolved anew and gave up
    again. Now the connect made aside has bounds of its own and serves the next call."""
    server = OwnRedis(password="pw-secret")
    server.start()
    store = RedisFeatureStore(
        f"redis://:pw-secret@localhost:{server.port}/0", clock, prefix="t:", timeout_s=0.05
    )
    real = socket.getaddrinfo

    def slow(host: object, *args: object, **kwargs: object) -> object:
        if host == "localhost":
            time.sleep(0.5)  # answers, but long past the bound
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    try:
        assert _fails_fast(store, order(clock, "o1", device="dev-secret")) < 0.4
        for thread in threading.enumerate():
            if thread.name == "riskd-redis-connect":
                thread.join(5)
        got = store.record_and_read(order(clock, "o2", device="dev-secret"), QUERIES)
        assert got[COUNT_DEVICE_1M] == 1
    finally:
        store.close()
        server.stop()


def test_a_redis_out_of_memory_refuses_writes_and_still_answers_reads(
    own_redis: OwnRedis, clock: FakeClock
) -> None:
    """Redis refusing every write (here maxmemory reached) is told apart from one that is
    away or slow: the catch-up gives no order up for it (``WritesRefusedError``)."""
    store = RedisFeatureStore(own_redis.url, clock, prefix="t:", timeout_s=0.5)
    admin = redis.Redis(port=own_redis.port)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        with pytest.raises(WritesRefusedError):
            store.record_and_read(order(clock, "o1", device="dev-secret"), QUERIES)
        assert store.read(order(clock, "o1", device="dev-secret"), QUERIES)[COUNT_DEVICE_1M] == 0
    finally:
        admin.config_set("maxmemory", "0")
        admin.close()
        store.close()


def test_unreachable_redis_fails_within_the_connect_timeout(clock: FakeClock) -> None:
    store = RedisFeatureStore("redis://10.255.255.1:6379/0", clock, prefix="t:")
    assert _fails_fast(store, order(clock, "o1", device="dev-secret")) < 0.5
    store.close()


def test_every_possible_query_matches_the_in_process_store(prefix: str, clock: FakeClock) -> None:
    every = [FeatureQuery(a, k, w) for a in (Agg.COUNT, Agg.SUM) for k in KEYS for w in WINDOWS]
    pairs = [(k, of) for k in KEYS for of in KEYS if of != k]
    every += [FeatureQuery(Agg.DISTINCT, k, w, of=of) for k, of in pairs for w in WINDOWS]
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    for i in range(40):
        keys = {k: f"{k}{(i * (j + 2)) % 3}" for j, k in enumerate(KEYS) if (i + j) % 4}
        obs = order(clock, f"o{i % 30}", 100 + i, **keys)
        assert shared.record_and_read(obs, every) == memory.record_and_read(obs, every)
        clock.advance(17)
    assert len(every) == 216
    shared.close()


def test_cached_plans_follow_the_query_set_and_the_keys_present(
    prefix: str, clock: FakeClock
) -> None:
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    first, second = tuple(QUERIES), frozenset(QUERIES[1:4])
    for i in range(12):
        keys = {"device": "d", "buyer": f"b{i % 3}", "shop": "s"}
        keys = {k: v for j, (k, v) in enumerate(keys.items()) if (i + j) % 3}
        queries = first if i % 2 else second
        obs = order(clock, f"o{i}", 10 * i, **keys)
        assert shared.record_and_read(obs, queries) == memory.record_and_read(obs, queries)
        clock.advance(5)
    shared.close()


def test_an_evicted_state_is_rebuilt_from_the_events_still_there(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """A volatile-* maxmemory policy may evict a key's totals (``tot:``) and keep its sets:
    the counts stay exact (as the in-process store's), never negative."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    distinct_1m = FeatureQuery(Agg.DISTINCT, "device", "1m", of="buyer")
    queries = [*QUERIES, distinct_1m, FeatureQuery(Agg.SUM, "device", "1m")]

    def both(order_id: str, **keys: str) -> dict[FeatureQuery, int]:
        obs = order(clock, order_id, **keys)
        got = shared.record_and_read(obs, queries)
        assert got == memory.record_and_read(obs, queries)
        assert min(got.values()) >= 0
        return got

    for i in range(5):
        both(f"o{i}", device="d1", buyer=f"b{i}")
        clock.advance(10)
    assert redis_client.delete(f"{prefix}tot:device:d1") == 1
    got = both("o5", device="d1", buyer="b5")
    assert (got[COUNT_DEVICE_1M], got[distinct_1m]) == (6, 6)
    clock.advance(30)
    got = both("o6", device="d1", buyer="b6")
    assert (got[COUNT_DEVICE_1M], got[distinct_1m]) == (4, 4)  # o3..o6: 60 s back
    assert redis_client.delete(f"{prefix}tot:device:d1") == 1
    clock.advance(3600)  # a read alone, the events out of the shorter windows
    obs = order(clock, "probe", device="d1")
    assert shared.read(obs, queries) == memory.read(obs, queries)
    shared.close()


def test_a_late_observation_rebuilding_an_evicted_state_counts_only_what_still_counts(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """Review: a rebuild started by an observation 90 s behind the newest event counted an
    event more than a day older than that newest one (the in-process store does not)."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    queries = [FeatureQuery(a, "device", w) for a in (Agg.COUNT, Agg.SUM) for w in WINDOWS]
    start = clock.now()
    for order_id, at in (("e0", 0), ("e1", 23 * 3600 + 50 * 60), ("e2", 86400 + 60)):
        obs = Observation(order_id, start + at, 100 * (1 + at % 7), {"device": "d1"})
        assert shared.record_and_read(obs, queries) == memory.record_and_read(obs, queries)
    clock.advance(86400 + 60)
    assert redis_client.delete(f"{prefix}tot:device:d1") == 1
    late = Observation("late", start + 86400 - 30, 400, {"device": "d1"})
    got = shared.record_and_read(late, queries)
    assert got == memory.record_and_read(late, queries)
    assert got[FeatureQuery(Agg.COUNT, "device", "24h")] == 2  # e1 and itself; e0 no more
    shared.close()


def test_a_late_observation_after_an_eviction_counts_only_the_sightings_that_still_count(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """Review (differential fuzz): the rebuilt state lost each distinct set's latest
    sighting, so a late read counted a buyer more than a day behind the device's latest
    one (2 against the in-process store's 1), and a saved state forgot it for good."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    buyers = FeatureQuery(Agg.DISTINCT, "device", "24h", of="buyer")
    queries = [buyers, FeatureQuery(Agg.COUNT, "device", "24h")]
    start = clock.now()
    for order_id, at, buyer in (("o1", 0, "b1"), ("o2", 85_800, "b2"), ("o3", 87_000, "b3")):
        obs = Observation(order_id, start + at, 100, {"device": "d", "buyer": buyer})
        assert shared.record_and_read(obs, queries) == memory.record_and_read(obs, queries)
    clock.advance(87_000)
    late = Observation("late", start + 86_100, 0, {"device": "d"})  # 23 h 55 min
    assert shared.read(late, queries)[buyers] == 1  # b2: b1 is 24 h behind b3
    assert redis_client.delete(f"{prefix}tot:device:d") == 1
    for _ in range(2):  # the rebuild, then the state it saved
        got = shared.read(late, queries)
        assert got == memory.read(late, queries)
        assert got[buyers] == 1
    shared.close()


def test_evicted_sets_under_a_kept_state_drop_their_totals_and_get_a_ttl_again(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """``volatile-ttl`` evicts the sets before their state (their TTLs are older): the
    totals of events no longer there must go with them, and the sets the next order
    creates must expire (review: counts stayed inflated for good, the sets had no TTL)."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    distinct_1h = QUERIES[3]
    for i in range(5):
        shared.record_and_read(order(clock, f"o{i}", device="d1", buyer=f"b{i}"), QUERIES)
        clock.advance(5)
    assert redis_client.delete(f"{prefix}ev:device:d1", f"{prefix}d:device:buyer:d1") == 2
    got = shared.record_and_read(order(clock, "o5", device="d1", buyer="b5"), QUERIES)
    # what is still there: the one order just recorded
    assert (got[COUNT_DEVICE_1M], got[SUM_DEVICE_1H], got[distinct_1h]) == (1, 100, 1)
    for key in ("ev:device:d1", "d:device:buyer:d1"):
        assert 0 < redis_client.ttl(f"{prefix}{key}") <= SEEN_TTL_S
    clock.advance(30)
    got = shared.record_and_read(order(clock, "o6", device="d1", buyer="b6"), QUERIES)
    assert (got[COUNT_DEVICE_1M], got[SUM_DEVICE_1H], got[distinct_1h]) == (2, 200, 2)
    clock.advance(61)
    got = shared.read(order(clock, "probe", device="d1"), QUERIES)
    assert (got[COUNT_DEVICE_1M], got[SUM_DEVICE_1H]) == (0, 200)
    shared.close()


def test_a_distinct_set_that_outlived_its_evicted_key_still_counts(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """Redis may evict a key's totals and events and keep its distinct set: the buyers seen
    there still count."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    buyers_1h = QUERIES[3]
    for i in range(3):
        shared.record_and_read(order(clock, f"o{i}", device="d1", buyer=f"b{i}"), QUERIES)
        clock.advance(10)
    assert redis_client.delete(f"{prefix}tot:device:d1", f"{prefix}ev:device:d1") == 2
    got = shared.record_and_read(order(clock, "o3", device="d1", buyer="b3"), QUERIES)
    assert (got[buyers_1h], got[COUNT_DEVICE_1M]) == (4, 1)  # the events alone are gone
    shared.close()


def test_an_order_whose_marker_was_evicted_is_counted_once(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """A retry after Redis evicted the order's marker (``o:``) finds its event still in the
    set: counted once, as the in-process store counts it (review: the retry moved the
    event and counted it again, for good)."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    memory = InProcessFeatureStore(clock)
    obs = order(clock, "o1", 500, device="d", buyer="b")
    assert shared.record_and_read(obs, QUERIES) == memory.record_and_read(obs, QUERIES)
    markers = [k for k in redis_client.scan_iter(f"{prefix}o:*")]
    assert len(markers) == 1 and redis_client.delete(*markers) == 1
    clock.advance(5)
    retry = order(clock, "o1", 500, device="d", buyer="b")
    got = shared.record_and_read(retry, QUERIES)
    assert got == memory.record_and_read(retry, QUERIES)
    assert (got[COUNT_DEVICE_1M], got[SUM_DEVICE_1H]) == (1, 500)
    for i in range(3):
        clock.advance(30)
        obs = order(clock, f"n{i}", 1, device="d", buyer="b")
        assert shared.record_and_read(obs, QUERIES) == memory.record_and_read(obs, QUERIES)
    shared.close()


def test_an_order_whose_marker_was_evicted_counts_anew_once_its_event_left_every_window(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """The other side of the rule above: a day later its event counts nowhere, so the
    order recorded again must count in its new window, not be taken for a retry and lost."""
    shared = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    count_24h = FeatureQuery(Agg.COUNT, "device", "24h")
    shared.record_and_read(order(clock, "o1", 500, device="d"), [count_24h])
    markers = [k for k in redis_client.scan_iter(f"{prefix}o:*")]
    assert len(markers) == 1 and redis_client.delete(*markers) == 1
    clock.advance(86400)  # the first event is exactly 24 h old: out of every window
    got = shared.record_and_read(order(clock, "o1", 500, device="d"), [count_24h])
    assert got[count_24h] == 1
    shared.close()


def test_an_unreadable_reply_is_unavailable_not_an_internal_error(
    own_redis: OwnRedis, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scorer degrades on ``UnavailableError`` and fails the request on anything else:
    a reply the store cannot parse must not be anything else."""
    store = RedisFeatureStore(own_redis.url, clock, timeout_s=2.0)
    admin = redis.Redis.from_url(own_redis.url)
    odd = admin.script_load("return '1e+14 3'")  # the form Lua's tostring gives 10^14
    admin.close()
    monkeypatch.setattr(store, "_sha", odd)
    with pytest.raises(UnavailableError, match="unreadable") as info:
        store.record_and_read(order(clock, "o1", device="dev-secret"), QUERIES)
    assert "dev-secret" not in str(info.value)
    store.close()


class _Proxy:
    """A loopback TCP proxy in front of a Redis: each client it accepts (counted) gets its
    own connection to Redis, piped by the threads that ``_pipes`` names; ``close`` stops
    them all."""

    def __init__(self, port: int | None) -> None:
        self._target = ("127.0.0.1", port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.accepted = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _pipes(
        self, client: socket.socket, server: socket.socket
    ) -> list[tuple[Callable[..., None], tuple[object, ...]]]:
        raise NotImplementedError

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._target, timeout=5)
            server.settimeout(None)
            pipes = [
                threading.Thread(target=run, args=args, daemon=True)
                for run, args in self._pipes(client, server)
            ]
            with self._lock:
                self.accepted += 1
                self._sockets += [client, server]
                self._threads += pipes
            for pipe in pipes:
                pipe.start()

    def _drop(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._drop(self._listener)  # a shutdown wakes the accept (a close alone does not)
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        self._drop(*sockets)
        for thread in threads:
            thread.join(5)
            assert not thread.is_alive()


class _SlowProxy(_Proxy):
    """Holds every reply for ``delay`` seconds (a Redis answering just within the socket
    timeout)."""

    def __init__(self, port: int, delay: float) -> None:
        self.delay = delay
        super().__init__(port)

    def _pipes(
        self, client: socket.socket, server: socket.socket
    ) -> list[tuple[Callable[..., None], tuple[object, ...]]]:
        return [(self._pipe, (client, server, 0.0)), (self._pipe, (server, client, None))]

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float | None) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(self.delay if delay is None else delay)
                dst.sendall(data)
        except OSError:
            pass
        self._drop(src, dst)


@pytest.mark.parametrize("db", [0, 1])
def test_a_slow_redis_cannot_stretch_one_call_past_its_bound(
    own_redis: OwnRedis, clock: FakeClock, db: int
) -> None:
    """A call that must connect (db 1: and SELECT) and load the script again (a restarted
    Redis: NOSCRIPT, SCRIPT LOAD, EVALSHA) against a Redis answering each round trip
    just within the socket timeout: one bound in all, then ``UnavailableError``."""
    bound = 0.25
    proxy = _SlowProxy(own_redis.port, delay=0.2)
    store = RedisFeatureStore(f"redis://127.0.0.1:{proxy.port}/{db}", clock, timeout_s=bound)
    try:
        elapsed = _fails_fast(store, order(clock, "o1", device="dev-secret"))
        assert elapsed < 1.2 * bound, elapsed
        proxy.delay = 0.0
        got = store.record_and_read(order(clock, "o2", device="dev-secret"), QUERIES)
        assert got[COUNT_DEVICE_1M] >= 1  # reconnected and answered (o1 may have landed)
    finally:
        store.close()
        proxy.close()


def test_a_state_the_previous_script_rounded_is_rebuilt_exactly(
    prefix: str, clock: FakeClock, redis_client: redis.Redis
) -> None:
    """States written before sums were formatted as integers hold ``1.0000000000495e+14``:
    read again, they are rebuilt from the events, not carried on with their lost digits."""
    store = RedisFeatureStore(REDIS_URL, clock, prefix=prefix, timeout_s=2.0)
    for i in range(101):
        store.record_and_read(order(clock, f"o{i}", 10**12 + 1234 + i, device="d"), QUERIES)
    state = f"{prefix}tot:device:d"
    words = redis_client.get(state).decode().split()
    total = 101 * (10**12 + 1234) + 5050
    assert words[6] == str(total)  # the 24h window's sum, an exact integer
    rounded = " ".join(f"{int(w):.14g}" if w.isdigit() else w for w in words)  # Lua's tostring
    assert "1.0100000012968e+14" in rounded  # 101000000129684: the 4 is lost
    redis_client.set(state, rounded, ex=SEEN_TTL_S)
    got = store.record_and_read(order(clock, "last", 5, device="d"), QUERIES)
    assert got[SUM_DEVICE_1H] == total + 5
    store.close()


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0?socket_timeout=abc", "s3cret"),
        # no password to urlsplit (an unencoded '#'): redis-py quoted what came before it
        ("redis://:hunter2#x@127.0.0.1:6379/0", "hunter2"),
        ("redis://:pa[ss@127.0.0.1:6379/0", "pa[ss"),  # urlsplit raised (a traceback)
        ("rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus&password=zz9", "zz9"),
    ],
)
def test_a_url_redis_py_refuses_is_refused_at_construction_naming_the_shard(
    url: str, secret: str
) -> None:
    """Review: redis-py refused these only at the first order, after the keyring and the
    database were made, in a traceback quoting the password."""
    with pytest.raises(ConfigError, match=r"^redis_url: shard 2: ") as e:
        RedisFeatureStore([REDIS_URL, url], SystemClock(), prefix="riskd-test:url:")
    assert secret not in str(e.value)


_REDIS_PORT = urlsplit(REDIS_URL).port


class _ReplyProxy(_Proxy):
    """A proxy to the shared Redis that, once ``arm``-ed, does one thing to the next reply
    Redis sends: ``cut`` (forward its first half, then close the connection) or ``hold``
    (keep it back until the client sends on that connection again, forwarded then: a
    reply later than the call waited for)."""

    def __init__(self) -> None:
        self._armed = ""
        self._after: threading.Event | None = None
        self.holding = threading.Event()  # a reply is held back
        super().__init__(_REDIS_PORT)

    def arm(self, what: str, after: threading.Event | None = None) -> None:
        """``after``: the reply is cut only once it is set (another proxy holding one)."""
        self._armed, self._after = what, after

    def _pipes(
        self, client: socket.socket, server: socket.socket
    ) -> list[tuple[Callable[..., None], tuple[object, ...]]]:
        held: list[bytes] = []
        return [(self._up, (client, server, held)), (self._down, (server, client, held))]

    def _up(self, client: socket.socket, server: socket.socket, held: list[bytes]) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                while held:  # the late reply reaches the client before its next request goes on
                    client.sendall(held.pop(0))
                server.sendall(data)
        self._drop(client, server)

    def _down(self, server: socket.socket, client: socket.socket, held: list[bytes]) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(65536):
                armed, self._armed = self._armed, ""
                if armed == "cut":
                    if self._after is not None:
                        self._after.wait(5)
                    client.sendall(data[: len(data) // 2])
                    break
                if armed == "hold":
                    held.append(data)
                    self.holding.set()
                else:
                    client.sendall(data)
        self._drop(client, server)


def _value_on_shard(name: str, shard: int) -> str:
    """A key value that two shards put on ``shard`` (the store's CRC-32 of "name:value")."""
    values = (f"v{i}" for i in range(100))
    return next(v for v in values if zlib.crc32(f"{name}:{v}".encode()) % 2 == shard)


@pytest.mark.parametrize(("failure", "timeout_s"), [("cut", 2.0), ("hold", 0.5)])
def test_a_failed_call_never_leaves_a_connection_with_a_reply_pending_for_the_next(
    clock: FakeClock, failure: str, timeout_s: float
) -> None:
    # a connection given back with the failed call's reply still to come would hand that
    # stale reply to the next call on it: wrong counts, taken as right by the rules
    prefix = f"riskd-test:features:{uuid.uuid4().hex}:"
    proxies = [_ReplyProxy(), _ReplyProxy()]
    urls = [f"redis://127.0.0.1:{p.port}/{db}" for db, p in enumerate(proxies)]
    store = RedisFeatureStore(urls, clock, prefix=prefix, timeout_s=timeout_s)
    device, buyer = _value_on_shard("device", 0), _value_on_shard("buyer", 1)
    count_buyer = FeatureQuery(Agg.COUNT, "buyer", "24h")
    try:
        assert (
            store.record_and_read(order(clock, "o1", device=device, buyer=buyer), QUERIES)[
                count_buyer
            ]
            == 1
        )
        # shard 0's reply (read first) fails; shard 1's, sent and never read, comes late:
        # shard 0's is cut only once shard 1's is held (else the failed call could close
        # shard 1's connection before its reply came, and the hold wait for the next one)
        proxies[1].arm("hold")
        proxies[0].arm(failure, after=proxies[1].holding)
        with pytest.raises(UnavailableError, match="feature store: redis"):
            store.record_and_read(order(clock, "o2", device=device, buyer=buyer), QUERIES)
        got = store.record_and_read(order(clock, "o3", device=device, buyer=buyer), QUERIES)
        # o2 ran on both shards before its replies were lost: o3 is the third
        assert (got[COUNT_DEVICE_1M], got[count_buyer]) == (3, 3)
        assert [p.accepted for p in proxies] == [2, 2]  # a fresh connection on each shard
    finally:
        store.close()
        for url in SHARD_URLS:
            client = redis.Redis.from_url(url)
            delete_prefix(client, prefix)
            client.close()
        for proxy in proxies:
            proxy.close()
