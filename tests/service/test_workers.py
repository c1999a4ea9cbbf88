"""Scoring worker processes behind the gRPC process (``score_workers``), end to end.

A real server with two worker processes, the shared Redis (own key prefix) and a
SQLite file; calls go through a real gRPC channel.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from riskd.config import load_config
from riskd.domain.order import Amounts, Order
from riskd.errors import ConfigError
from riskd.evidence.chain import verify
from riskd.service import convert
from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
from riskd.service.server import RunningServer, create_server
from riskd.service.workers import WorkerPool
from riskd.sql import Database
from tests.service.conftest import SHARED_REDIS, copy_rules, make_config
from tests.service.test_lifecycle import eventually
from tests.service.test_scoring import fresh

Stub = scoring_pb2_grpc.ScoringServiceStub


def _config(data: Path, prefix: str, **overrides: Any) -> Any:
    return make_config(
        data,
        redis_url=SHARED_REDIS,
        redis_prefix=prefix,
        score_workers=2,
        deadline_ms=5000,
        **overrides,
    )


def _forget(prefix: str) -> None:
    client = redis.Redis.from_url(SHARED_REDIS)
    for key in client.scan_iter(f"{prefix}*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"riskd-test-workers-{uuid.uuid4().hex}:"


@pytest.fixture(scope="module")
def pooled(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[RunningServer]:
    running = create_server(_config(tmp_path_factory.mktemp("riskd"), prefix))
    yield running
    running.stop(5)
    _forget(prefix)


@pytest.fixture(scope="module")
def stub(pooled: RunningServer) -> Iterator[Stub]:
    with grpc.insecure_channel(f"127.0.0.1:{pooled.port}") as ch:
        yield scoring_pb2_grpc.ScoringServiceStub(ch)


@pytest.fixture
def not_here(pooled: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any order the gRPC process would score itself: the workers must answer."""

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("scored in the gRPC process, not by a worker")

    monkeypatch.setattr(pooled.components.scorer, "score", refuse)
    monkeypatch.setattr(pooled.components.scorer, "score_batch", refuse)


def _score(stub: Stub, order: Order) -> scoring_pb2.Decision:
    request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(order))
    return stub.Score(request, timeout=10).decision


def _worker_for(pool: WorkerPool, index: int) -> Order:
    while True:
        order = fresh()
        if pool.worker_for(order.order_id) == index:
            return order


def test_workers_score_and_a_retry_gets_the_recorded_decision(
    pooled: RunningServer, stub: Stub, not_here: None
) -> None:
    assert pooled.workers is not None
    assert all(pid is not None and pid != os.getpid() for pid in pooled.workers.pids())
    order = fresh()
    allowed = pooled.metrics.value("riskd_decisions_total", {"outcome": "allow"})
    first = _score(stub, order)
    again = _score(stub, order)
    assert first.outcome == scoring_pb2.OUTCOME_ALLOW
    assert (again.decided_at, again.outcome, again.score) == (
        first.decided_at,
        first.outcome,
        first.score,
    )
    assert (first.replayed, again.replayed) == (False, True)
    # the metrics count the decision once, as the velocity windows do
    assert pooled.metrics.value("riskd_decisions_total", {"outcome": "allow"}) == allowed + 1


def test_velocity_counters_are_shared_by_the_workers(
    pooled: RunningServer, stub: Stub, not_here: None
) -> None:
    """Orders of one device land on both workers; the rule on the device count sees all."""
    assert pooled.workers is not None
    device = f"dev-{uuid.uuid4().hex}"
    orders = [dataclasses.replace(fresh(), device_id=device) for _ in range(12)]
    assert {pooled.workers.worker_for(o.order_id) for o in orders} == {0, 1}
    request = scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders])
    decisions = stub.ScoreBatch(request, timeout=10).decisions
    assert [d.order_id for d in decisions] == [o.order_id for o in orders]
    # checkout.rules blocks a device's third order within the hour, whichever worker saw
    # the first ones: the counters live in the shared Redis
    later = _score(stub, dataclasses.replace(fresh(), device_id=device))
    assert later.outcome == scoring_pb2.OUTCOME_BLOCK, later


def test_bad_order_in_a_batch_is_named_by_its_index_and_nothing_is_counted(
    prefix: str, stub: Stub
) -> None:
    orders = [fresh() for _ in range(8)]
    orders[5] = dataclasses.replace(orders[5], amounts=Amounts(items=100, total=-1))
    request = scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders])
    with pytest.raises(grpc.RpcError) as e:
        stub.ScoreBatch(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "orders[5].amounts" in (e.value.details() or "")
    client = redis.Redis.from_url(SHARED_REDIS)
    try:
        assert not any(client.exists(f"{prefix}o:{o.order_id}") for o in orders)
    finally:
        client.close()


def test_a_workers_invalid_argument_reaches_the_caller_naming_the_field(stub: Stub) -> None:
    order = fresh()
    order = dataclasses.replace(order, buyer=dataclasses.replace(order.buyer, account_age_days=-3))
    with pytest.raises(grpc.RpcError) as e:
        _score(stub, order)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "order.buyer.account_age_days" in (e.value.details() or "")


def test_a_killed_worker_is_replaced_and_its_orders_are_answered_meanwhile(
    pooled: RunningServer, stub: Stub
) -> None:
    pool = pooled.workers
    assert pool is not None
    victim = pool.pids()[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.2)
    # scored by the gRPC process itself while the worker is gone
    assert _score(stub, _worker_for(pool, 0)).outcome == scoring_pb2.OUTCOME_ALLOW
    assert eventually(lambda: pool.pids()[0] not in (None, victim) and _alive(pool, 0), 30)
    assert _score(stub, _worker_for(pool, 0)).outcome == scoring_pb2.OUTCOME_ALLOW


def test_a_stalled_worker_gets_the_fallback_inside_the_deadline_then_recovers(
    pooled: RunningServer, stub: Stub
) -> None:
    pool = pooled.workers
    assert pool is not None
    pid = pool.pids()[1]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        order = _worker_for(pool, 1)
        request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(order))
        started = time.monotonic()
        late = stub.Score(request, timeout=0.5).decision
        assert time.monotonic() - started < 0.5
        assert late.degraded and "features" in late.unavailable
    finally:
        os.kill(pid, signal.SIGCONT)
    # the stalled call's late answer is discarded; the next call gets its own answer
    fresh_order = _worker_for(pool, 1)
    decision = _score(stub, fresh_order)
    assert decision.order_id == fresh_order.order_id and not decision.degraded
    assert pool.pids()[1] == pid


def _alive(pool: WorkerPool, index: int) -> bool:
    try:
        pool.get(index)
    except Exception:
        return False
    return True


def test_rule_reloads_reach_the_workers(tmp_path: Path) -> None:
    prefix = f"riskd-test-workers-{uuid.uuid4().hex}:"
    rules = copy_rules(tmp_path / "rules")
    running = create_server(_config(tmp_path / "data", prefix, rules_dir=str(rules)))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            v1 = _score(stub, fresh()).rules_version
            path = rules / "checkout.rules"
            path.write_text(path.read_text().replace("> 10000000", "> 1000"))
            running.reload_rules()  # SIGHUP: the server process and every worker
            orders = [fresh() for _ in range(6)]
            assert eventually(
                lambda: all(_score(stub, fresh()).rules_version != v1 for _ in range(6)), 15
            )
            for order in orders:
                assert _score(stub, order).outcome == scoring_pb2.OUTCOME_BLOCK
    finally:
        running.stop(5)
        _forget(prefix)


def test_stop_flushes_every_workers_decisions_into_one_valid_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"riskd-test-workers-{uuid.uuid4().hex}:"
    running = create_server(_config(tmp_path / "data", prefix))
    monkeypatch.setattr(running.components.scorer, "score", None)  # the workers score
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            ids = [_score(stub, fresh()).order_id for _ in range(30)]
    finally:
        running.stop(5)
        _forget(prefix)
    db = Database(f"sqlite:///{tmp_path / 'data' / 'riskd.db'}")
    try:
        marks = ", ".join("?" * len(ids))
        rows = db.query(f"SELECT COUNT(*) FROM decision_log WHERE order_id IN ({marks})", ids)
        assert rows[0][0] == 30
        assert verify(db).ok  # two writer processes appended to one hash chain
    finally:
        db.close()


def test_workers_need_the_shared_redis() -> None:
    with pytest.raises(ConfigError, match="score_workers"):
        load_config(env={}, score_workers=2)
    with pytest.raises(ConfigError, match="score_workers"):
        load_config(env={}, redis_url=SHARED_REDIS, score_workers=-1)


def test_score_workers_come_from_the_environment() -> None:
    env = {"RISKD_SCORE_WORKERS": "3", "RISKD_REDIS_URL": SHARED_REDIS}
    assert load_config(env=env).score_workers == 3
