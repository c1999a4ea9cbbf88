"""``riskd serve`` killed (SIGKILL) under load: what the decision log keeps of what it answered.

README "What a crash can lose": a killed process loses only the decisions appended since
its writer's last commit (the last ``evidence_flush_ms`` and one commit), the log keeps an
unbroken hash chain, and a next start appends to it. With scoring workers the workers
decide and log; a gRPC process killed leaves them to flush their logs and exit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest
import redis

from riskd.evidence.log import DecisionLog
from riskd.service.convert import order_to_proto
from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
from riskd.sql import Database
from tests.cli.test_serve_cli import Daemon
from tests.features.features_support import delete_prefix
from tests.service.conftest import SHARED_REDIS
from tests.service.sample import full_order


def _order(order_id: str) -> scoring_pb2.ScoreRequest:
    buyer = dataclasses.replace(full_order().buyer, buyer_id=f"b-{order_id}")
    order = dataclasses.replace(full_order(order_id), buyer=buyer)
    return scoring_pb2.ScoreRequest(order=order_to_proto(order))


def _logged(data: Path) -> tuple[set[str], bool]:
    db = Database(f"sqlite:///{data / 'riskd.db'}")
    log = DecisionLog(db)
    try:
        ids = {row[0] for row in db.query("SELECT order_id FROM decision_log")}
        return ids, log.verify().ok
    finally:
        log.close()
        db.close()


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        out |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
    return out


def _alive(pid: int) -> bool:
    try:  # a zombie (exited, not yet reaped by its new parent) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_daemon_killed_mid_load_keeps_every_decision_committed_before_it(
    tmp_path: Path,
) -> None:
    # an operator counts a SIGKILL's loss in milliseconds of answers, never in more
    data = tmp_path / "var"
    d = Daemon(data)
    answered: dict[str, float] = {}
    try:
        assert d.ready.wait(30), "".join(d.lines)

        def load(k: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{d.port}") as ch:
                stub = scoring_pb2_grpc.ScoringServiceStub(ch)
                for i in range(100_000):
                    try:
                        stub.Score(_order(f"k{k}-{i}"), timeout=5)
                    except grpc.RpcError:  # the daemon is gone
                        return
                    answered[f"k{k}-{i}"] = time.monotonic()
                    time.sleep(0.01)  # paced: fewer than a batch (512) answered in all

        threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        started = time.monotonic()
        while (len(answered) < 40 or time.monotonic() - started < 1.2) and (
            time.monotonic() - started < 10
        ):
            time.sleep(0.01)
        killed = time.monotonic()
        d.proc.kill()
        for t in threads:
            t.join(10)
        assert d.proc.wait(10) == -signal.SIGKILL
    finally:
        d.stop()
    ids, chain_ok = _logged(data)
    assert chain_ok  # what survives is an unbroken chain
    lost = {oid: killed - at for oid, at in answered.items() if oid not in ids}
    # the README's bound is ~5-10 ms (measured 14-23 ms on a loaded 2-core host); 0.5 s is
    # far above that and far below a writer that commits only at a stop
    assert len(answered) >= 40 and max(lost.values(), default=0.0) < 0.5, sorted(lost.values())

    again = Daemon(data)  # the next start appends to the chain the crash left
    try:
        assert again.ready.wait(30), "".join(again.lines)
        with grpc.insecure_channel(f"127.0.0.1:{again.port}") as ch:
            scoring_pb2_grpc.ScoringServiceStub(ch).Score(_order("after-crash"), timeout=5)
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(30) == 0
    finally:
        again.stop()
    ids_after, chain_ok = _logged(data)
    assert chain_ok and ids_after == ids | {"after-crash"}


@pytest.mark.parametrize("stop", ["kill the grpc process", "sigterm every process"])
def test_the_workers_flush_their_logs_whether_the_front_is_killed_or_all_are_stopped(
    tmp_path: Path, stop: str
) -> None:
    """The workers hold the answered decisions. A killed front must neither lose them nor
    leave orphan processes writing the log. A service manager stopping the unit signals
    each of its processes (systemd's control-group kill), workers too: they ignore it,
    and stop when the gRPC process, drained, asks them, flushing what is still queued."""
    data, prefix = tmp_path / "var", f"riskd-test-crash-{uuid.uuid4().hex}:"
    d = Daemon(
        data,
        RISKD_SCORE_WORKERS="2",
        RISKD_REDIS_URL=SHARED_REDIS,
        RISKD_REDIS_PREFIX=prefix,
        RISKD_EVIDENCE_FLUSH_MS="1000",  # the workers' decisions still queued at the stop
    )
    workers: set[int] = set()
    try:
        assert d.ready.wait(30), "".join(d.lines)
        workers = _children(d.proc.pid)
        assert len(workers) == 2
        ids = [f"w-{i}" for i in range(12)]
        with grpc.insecure_channel(f"127.0.0.1:{d.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            for oid in ids:  # one at a time: each goes to its worker, none to a fallback
                stub.Score(_order(oid), timeout=5)
        if stop == "kill the grpc process":
            d.proc.kill()
            assert d.proc.wait(10) == -signal.SIGKILL
        else:
            for pid in (*workers, d.proc.pid):
                os.kill(pid, signal.SIGTERM)
            assert d.proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(w) for w in workers)
    finally:
        d.stop()
        for w in workers:  # only if the test failed before they went
            if _alive(w):
                os.kill(w, signal.SIGKILL)
        client = redis.Redis.from_url(SHARED_REDIS)
        delete_prefix(client, prefix)
        client.close()
    if stop == "kill the grpc process":
        d.reader.join(10)
        text = "".join(d.lines)
        assert text.count("server process gone; flushing the decision log and exiting") == 2
    logged, chain_ok = _logged(data)
    assert chain_ok and set(ids) <= logged
