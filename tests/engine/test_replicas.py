"""Two replicas (two scorers) sharing PostgreSQL and Redis; end-to-end PII protection on disk."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis

from riskd.domain.clock import FakeClock
from riskd.domain.decision import Decision, Outcome
from riskd.domain.features import Agg, FeatureQuery
from riskd.dsl.holder import ProgramHolder
from riskd.engine.breaker import BreakerPolicy
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.keys import observe
from riskd.engine.scorer import Scorer
from riskd.evidence.log import DecisionLog
from riskd.features.memory import InProcessFeatureStore
from riskd.features.redis_store import RedisFeatureStore
from riskd.pii import BlindIndexer, Keyring, SqlKeyStore, Vault
from riskd.sql import Database
from tests.features.features_support import delete_prefix

from .conftest import DEVICE, IP, PHONE, STREET, make_order

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
BUYER_1H = FeatureQuery(Agg.COUNT, "buyer", "1h")


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = f"{PG_URL}?schema=engine_{uuid.uuid4().hex[:12]}"
    yield url
    db = Database(url)
    db.drop_schema()
    db.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = f"riskd:test-replicas-{uuid.uuid4().hex[:8]}:"
    yield p
    client = redis.Redis(port=6379)
    delete_prefix(client, p)
    client.close()


@pytest.mark.postgres
@pytest.mark.redis
def test_two_replicas_racing_on_one_order_record_it_once(
    pg_url: str, prefix: str, holder: ProgramHolder, clock: FakeClock, indexer: BlindIndexer
) -> None:
    replicas = []
    for _ in range(2):
        db = Database(pg_url)
        store = RedisFeatureStore("redis://127.0.0.1:6379/0", clock, prefix=prefix)
        log = DecisionLog(db, indexer=indexer)
        scorer = Scorer(holder, store, log, indexer, clock=clock, fallback=FallbackPolicy.default())
        replicas.append((scorer, log, store, db))
    order = make_order("o-shared", total=60_000)
    barrier = threading.Barrier(16)
    answers: list[Decision] = []

    def call(scorer: Scorer) -> None:
        barrier.wait()
        answers.append(scorer.score(order, timeout_s=5.0))

    threads = [threading.Thread(target=call, args=(replicas[i % 2][0],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for scorer, log, _, _ in replicas:
        scorer.close()
        log.close()
    assert len(answers) == 16 and {a.outcome for a in answers} == {answers[0].outcome}
    _, log, store, db = replicas[0]
    assert db.query("SELECT COUNT(*) FROM decision_log")[0][0] == 1
    assert log.verify().ok
    obs = observe(make_order("probe"), indexer, clock.now())
    assert store.read(obs, [BUYER_1H])[BUYER_1H] == 1  # counted once across replicas
    # a later retry on either replica gets the one recorded decision
    recorded = log.get("o-shared")
    assert recorded is not None and recorded.decision in answers
    for _, _, store, db in replicas:
        store.close()
        db.close()


def test_scored_orders_leave_no_plaintext_pii_on_disk(
    tmp_path: Path, holder: ProgramHolder, clock: FakeClock
) -> None:
    keyring = Keyring.generate()
    indexer = BlindIndexer(keyring)
    db = Database(tmp_path / "riskd.db")
    log = DecisionLog(db, indexer=indexer, vault=Vault(keyring, SqlKeyStore(db)))
    scorer = Scorer(
        holder,
        InProcessFeatureStore(clock),
        log,
        indexer,
        clock=clock,
        fallback=FallbackPolicy.default(),
    )
    for i in range(10):
        scorer.score(make_order(f"o-{i}", total=60_000 + i))
    scorer.close()
    log.close()
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"139****4321" in raw and b"BIG_ORDER" in raw
    for value in (PHONE, DEVICE, IP, STREET, "赵六", "330106199001011234"):
        assert value.encode() not in raw


class SlowDatabase(Database):
    """The real PostgreSQL, with reads that can be made to hang (a slow or stuck database)."""

    delay_s = 0.0
    queries = 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.queries += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().query(sql, params)


@pytest.mark.postgres
def test_slow_postgres_log_cannot_hold_the_answer_past_the_deadline(
    pg_url: str, holder: ProgramHolder, clock: FakeClock, indexer: BlindIndexer
) -> None:
    db = SlowDatabase(pg_url)
    log = DecisionLog(db, indexer=indexer)
    scorer = Scorer(
        holder,
        InProcessFeatureStore(clock),
        log,
        indexer,
        clock=clock,
        fallback=FallbackPolicy.default(),
        breaker=BreakerPolicy(failures=1),
    )
    db.delay_s = 1.0
    started = time.perf_counter()
    decision = scorer.score(make_order("o-1", total=60_000), timeout_s=0.2)
    assert time.perf_counter() - started < 0.2
    assert decision.degraded == ("evidence",) and decision.outcome is Outcome.REVIEW
    assert scorer.log_breaker.is_open
    asked = db.queries  # open breaker: the log is not asked at all
    assert scorer.score(make_order("o-2"), timeout_s=0.2).degraded == ("evidence",)
    assert db.queries == asked
    db.delay_s = 0.0
    clock.advance(1.0)  # the cooldown passes: the next lookup probes and succeeds
    assert scorer.score(make_order("o-3"), timeout_s=0.2).degraded == ()
    replay = scorer.score(make_order("o-1", total=60_000), timeout_s=0.2)
    assert replay == replace(decision, replayed=True)
    scorer.close()
    log.close()
    db.close()
