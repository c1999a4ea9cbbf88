"""The decision log's writer over a real server: a bug that stops it for a while fills the
queue (answers degraded ``evidence_queue``); once it goes on, the outage ends by itself,
with no request, and answers are logged again."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest

from riskd.errors import UnavailableError
from riskd.evidence.chain import verify
from riskd.service import convert
from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
from riskd.service.logs import JsonFormatter
from riskd.service.server import create_server
from tests.evidence.conftest import PHONE, make_record
from tests.service.conftest import make_config
from tests.service.test_scoring import fresh

QUEUE = {"dependency": "evidence_queue"}


def test_score_is_logged_again_once_the_writer_gets_over_a_bug_with_no_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    running = create_server(make_config(tmp_path))
    log = running.components.decision_log
    assert log is not None
    broken = threading.Event()
    raised: list[int] = []
    real = log._done

    def buggy(items: list[object]) -> None:  # a bug after the commit, while ``broken``
        if broken.is_set():
            raised.append(1)
            raise RuntimeError(f"bug quoting {PHONE}")
        real(items)  # type: ignore[arg-type]

    monkeypatch.setattr(log, "_done", buggy)
    metrics = running.metrics
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)

            def score(order_id: str) -> scoring_pb2.Decision:
                order = convert.order_to_proto(fresh(order_id=order_id))
                return stub.Score(scoring_pb2.ScoreRequest(order=order), timeout=5).decision

            broken.set()
            assert not score("o-before").degraded  # appended; its commit's accounting raises
            filled = 0
            with contextlib.suppress(UnavailableError):  # the queue fills behind the writer
                while True:
                    log.append(make_record(f"fill-{filled}"))
                    filled += 1
            lost = score("o-lost")
            assert list(lost.unavailable) == ["evidence_queue"]
            assert metrics.value("riskd_dependency_unavailable", QUEUE) == 1

            broken.clear()  # the writer's next try goes through; no request from here on
            deadline = time.monotonic() + 30
            while metrics.value("riskd_dependency_unavailable", QUEUE) == 1:
                assert time.monotonic() < deadline, "the outage never ended"
                time.sleep(0.1)
            assert log.backlog == 0
            assert not score("o-after").degraded
            log.flush(10)
            restarts = metrics.value("riskd_evidence_writer_restarts_total")
            assert restarts == len(raised) >= 1
    finally:
        running.stop(5)
    ids = [str(r[0]) for r in log.db.query("SELECT order_id FROM decision_log ORDER BY seq")]
    assert ids == ["o-before", *(f"fill-{i}" for i in range(filled)), "o-after"]
    assert verify(log.db).ok
    lines = [JsonFormatter().format(r) for r in caplog.records]
    failed = [json.loads(line) for line in lines if "writer failed" in line]
    assert len(failed) == 1 and failed[0]["error"] == "RuntimeError"
    assert all(PHONE not in line for line in lines)
    told = [r.getMessage() for r in caplog.records if r.name == "riskd.engine.breaker"]
    assert told == [
        "dependency unavailable: answering degraded until it answers again",
        "dependency answers again",
    ]
