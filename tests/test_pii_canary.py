"""PII canaries: marker values in every PII field, driven through the daemon, found nowhere.

One run puts unique markers in the buyer's phone, name, ID number, street
address, the device id and the IP, then drives every path that takes an order:
``Score``, ``ScoreBatch`` and ``ReportOutcome`` (accepted, refused by access
control, rejected by validation, duplicated), an analyst's ``RevealOrderPii``
(whose reply alone carries plaintext, by design; refusals are searched) and
``ListPiiAccess``, ``riskd score`` and
``riskd pii hold/forget``. Then it searches everything riskd wrote for the
markers (and their normalized forms): the JSON logs at debug level, every
other log record, RPC error details, command output, the metrics endpoint,
and every file under the data directory (SQLite database, WAL, keyring).
Zero hits expected. District-level address parts are displayed by design, so
the markers go in the street detail.
"""

from __future__ import annotations

import io
import json
import logging
import random
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from riskd.cli import pii as pii_cli
from riskd.cli import serve as serve_cli
from riskd.config import load_config
from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order, PaymentMethod
from riskd.pii.blind import NORMALIZERS
from riskd.pii.mask import mask_phone
from riskd.service.convert import order_to_proto
from riskd.service.gen.riskd.v1 import (
    evidence_pb2,
    evidence_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from riskd.service.logs import configure_logging
from riskd.service.server import RunningServer, create_server
from tests.features.features_support import delete_prefix
from tests.service.conftest import SHARED_REDIS, make_config

RULES = Path(__file__).parent / "service" / "testdata" / "rules"
CHECKOUT_TOKEN = "canary-checkout-token"
AUDITOR_TOKEN = "canary-auditor-token"
ANALYST_TOKEN = "canary-analyst-token"


@dataclass(frozen=True)
class Markers:
    tag: str
    phone: str
    name: str
    id_number: str
    detail: str
    device: str
    ip: str

    @classmethod
    def fresh(cls) -> Markers:
        rnd = random.Random(uuid.uuid4().int)
        tag = uuid.uuid4().hex[:10]
        digits = "".join(rnd.choice("0123456789") for _ in range(8))
        return cls(
            tag=tag,
            phone=f"139{digits}",
            name=f"Canaryname{tag}",
            id_number="".join(rnd.choice("0123456789") for _ in range(17)) + "X",
            detail=f"Canary Road {tag} No. 7",
            device=f"CANARY-DEVICE-{tag}",
            ip=f"100.64.{rnd.randint(1, 254)}.{rnd.randint(1, 254)}",
        )

    def needles(self) -> set[str]:
        """The markers and their normalized forms (what a careless store might keep)."""
        pairs = [
            ("phone", self.phone),
            ("name", self.name),
            ("id_number", self.id_number),
            ("address", self.detail),
            ("device", self.device),
            ("ip", self.ip),
        ]
        found = {v for _, v in pairs} | {NORMALIZERS[t](v) for t, v in pairs}
        return found | {self.tag}  # the tag alone catches partial copies too


def canary_order(m: Markers, order_id: str, buyer_id: str = "b-canary") -> Order:
    return Order(
        order_id=order_id,
        buyer=Buyer(
            buyer_id,
            3,
            m.phone,
            m.name,
            m.id_number,
            Address("浙江省", "杭州市", "西湖区", m.detail),
        ),
        shop_id="s-canary",
        merchant_id="m-canary",
        items=(Item("sku-1", "beauty", 1999, 1),),
        amounts=Amounts(items=1999, total=1999),
        channel=Channel.LIVE_ROOM,
        live_room_id="lr-1",
        device_id=m.device,
        ip=m.ip,
        payment_method=PaymentMethod.WALLET,
        client_time=1_700_000_000.0,
    )


class Evidence:
    """Everything the run produced that a person or a scanner could read."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []

    def add(self, where: str, text: str | bytes) -> None:
        self.texts.append(
            (where, text.decode("utf-8", "replace") if isinstance(text, bytes) else text)
        )

    def hits(self, needles: set[str]) -> list[str]:
        return [
            f"{needle!r} in {where}"
            for where, text in self.texts
            for needle in needles
            if needle and needle.lower() in text.lower()
        ]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logger = logging.getLogger("riskd")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    configure_logging("debug", stream)
    yield stream
    for h in list(logger.handlers):
        logger.removeHandler(h)
    for h in saved[0]:
        logger.addHandler(h)
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def start(data_dir: Path, **extra: Any) -> RunningServer:
    config = load_config(
        env={},
        listen="127.0.0.1:0",
        metrics_port=0,
        rules_dir=str(RULES),
        data_dir=str(data_dir),
        deadline_ms=2000,
        **extra,
    )
    return create_server(config)


def rpc_code(fn: Any, request: Any, token: str | None, evidence: Evidence, where: str) -> str:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        reply = fn(request, metadata=metadata, timeout=5)
    except grpc.RpcError as e:
        evidence.add(f"{where} error details", e.details() or "")
        evidence.add(f"{where} trailing metadata", repr(e.trailing_metadata()))
        return str(e.code().name)
    evidence.add(f"{where} reply", str(reply))
    return "OK"


def drive_authenticated_server(m: Markers, data_dir: Path, evidence: Evidence) -> None:
    running = start(
        data_dir,
        auth={
            "tokens": {
                CHECKOUT_TOKEN: "canary-gw:checkout",
                AUDITOR_TOKEN: "canary-audit:auditor",
                ANALYST_TOKEN: "canary-analyst:analyst",
            }
        },
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            order = order_to_proto(canary_order(m, "o-canary-1"))
            score = scoring_pb2.ScoreRequest(order=order)
            codes = [
                rpc_code(stub.Score, score, CHECKOUT_TOKEN, evidence, "Score"),
                rpc_code(stub.Score, score, CHECKOUT_TOKEN, evidence, "Score retry"),
                rpc_code(stub.Score, score, AUDITOR_TOKEN, evidence, "Score as auditor"),
                rpc_code(stub.Score, score, None, evidence, "Score anonymous"),
                rpc_code(stub.Score, score, "wrong-token", evidence, "Score bad token"),
            ]
            assert codes == ["OK", "OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "UNAUTHENTICATED"]
            batch = scoring_pb2.ScoreBatchRequest(
                orders=[
                    order_to_proto(canary_order(m, f"o-canary-b{i}", f"b-canary-{i}"))
                    for i in range(3)
                ]
            )
            assert rpc_code(stub.ScoreBatch, batch, CHECKOUT_TOKEN, evidence, "ScoreBatch") == "OK"
            _drive_invalid(stub, m, evidence)
            for kind in (scoring_pb2.ORDER_EVENT_KIND_PAID, scoring_pb2.ORDER_EVENT_KIND_DISPUTED):
                report = scoring_pb2.ReportOutcomeRequest(order_id="o-canary-1", kind=kind)
                assert (
                    rpc_code(stub.ReportOutcome, report, CHECKOUT_TOKEN, evidence, "ReportOutcome")
                    == "OK"
                )
            _drive_reveal(ch, m, evidence)
        _scrape_metrics(running, evidence)
    finally:
        running.stop(5)


def _drive_reveal(ch: grpc.Channel, m: Markers, evidence: Evidence) -> None:
    """An analyst's audited reveal (its reply is the one place plaintext may go), refusals."""
    stub = evidence_pb2_grpc.EvidenceServiceStub(ch)
    reveal = evidence_pb2.RevealOrderPiiRequest(order_id="o-canary-1", reason="canary case")
    reply = stub.RevealOrderPii(
        reveal, metadata=(("authorization", f"Bearer {ANALYST_TOKEN}"),), timeout=5
    )
    assert reply.pii.phone == m.phone  # by design; kept out of the evidence searched
    for token, where in ((AUDITOR_TOKEN, "as auditor"), (CHECKOUT_TOKEN, "as checkout")):
        code = rpc_code(stub.RevealOrderPii, reveal, token, evidence, f"RevealOrderPii {where}")
        assert code == "PERMISSION_DENIED"
    for request, code in (
        (evidence_pb2.RevealOrderPiiRequest(order_id="o-canary-1"), "INVALID_ARGUMENT"),
        (evidence_pb2.RevealOrderPiiRequest(order_id="o-none", reason="r"), "NOT_FOUND"),
    ):
        got = rpc_code(stub.RevealOrderPii, request, ANALYST_TOKEN, evidence, "RevealOrderPii")
        assert got == code
    listing = evidence_pb2.ListPiiAccessRequest(order_id="o-canary-1")
    assert rpc_code(stub.ListPiiAccess, listing, AUDITOR_TOKEN, evidence, "ListPiiAccess") == "OK"


def _drive_invalid(stub: Any, m: Markers, evidence: Evidence) -> None:
    good = canary_order(m, "o-canary-bad")
    bad_orders = [
        replace(good, amounts=Amounts(items=1999, total=5)),  # total does not add up
        replace(good, buyer=replace(good.buyer, phone=m.phone * 40)),  # too long
        replace(good, buyer=replace(good.buyer, name=m.name * 40)),
        replace(good, device_id=m.device * 40),
        replace(good, order_id=""),
    ]
    for i, bad in enumerate(bad_orders):
        request = scoring_pb2.ScoreRequest(order=order_to_proto(bad))
        code = rpc_code(stub.Score, request, CHECKOUT_TOKEN, evidence, f"invalid Score {i}")
        assert code == "INVALID_ARGUMENT", (i, code)
    batch = scoring_pb2.ScoreBatchRequest(orders=[order_to_proto(o) for o in bad_orders[:2]])
    rpc_code(stub.ScoreBatch, batch, CHECKOUT_TOKEN, evidence, "invalid ScoreBatch")


def _scrape_metrics(running: RunningServer, evidence: Evidence) -> None:
    evidence.add("metrics registry", running.metrics.text())
    assert running.metrics_port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics", timeout=5) as r:
        evidence.add("metrics endpoint", r.read())


def drive_commands(
    m: Markers,
    data_dir: Path,
    tmp_path: Path,
    evidence: Evidence,
    capsys: pytest.CaptureFixture[str],
) -> None:
    running = start(data_dir)  # the embedded default: plaintext loopback, for `riskd score`
    try:
        order_file = tmp_path / "order.json"
        order_file.write_text(json.dumps(_order_json(canary_order(m, "o-canary-cli"))))
        parser = _parser(serve_cli)
        args = parser.parse_args(
            ["score", str(order_file), "--target", f"127.0.0.1:{running.port}"]
        )
        assert args.func(args) == 0
        bad = tmp_path / "bad.json"
        bad.write_text(
            json.dumps(
                _order_json(
                    replace(canary_order(m, "o-cli-bad"), amounts=Amounts(items=1, total=2))
                )
            )
        )
        args = parser.parse_args(["score", str(bad), "--target", f"127.0.0.1:{running.port}"])
        assert args.func(args) == 1
        _scrape_metrics(running, evidence)
    finally:
        running.stop(5)
    parser = _parser(pii_cli)
    opts = [
        "--keyring",
        str(data_dir / "keyring.json"),
        "--database",
        f"sqlite:///{data_dir / 'riskd.db'}",
    ]
    for argv in (
        ["hold", "b-canary"],
        ["forget", "b-canary"],
        ["hold", "b-canary", "--release"],
        ["forget", "b-canary"],
    ):
        args = parser.parse_args(["pii", *argv, *opts])
        args.func(args)
    out = capsys.readouterr()
    evidence.add("command stdout", out.out)
    evidence.add("command stderr", out.err)


def _parser(module: Any) -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="riskd")
    module.register(parser.add_subparsers(dest="command", required=True))
    return parser


def _order_json(order: Order) -> Any:
    from google.protobuf import json_format

    return json_format.MessageToDict(order_to_proto(order), preserving_proto_field_name=True)


def test_pii_canaries_appear_nowhere(
    tmp_path: Path,
    captured_logs: io.StringIO,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    m = Markers.fresh()
    data_dir = tmp_path / "data"
    evidence = Evidence()
    with caplog.at_level(logging.DEBUG):
        drive_authenticated_server(m, data_dir, evidence)
        drive_commands(m, data_dir, tmp_path, evidence, capsys)

    logs = captured_logs.getvalue()
    assert '"logger": "riskd.service.rpc"' in logs and "riskd.service.auth" in logs
    evidence.add("riskd JSON logs", logs)
    for record in caplog.records:
        evidence.add(f"log record {record.name}", f"{record.getMessage()} {record.__dict__!r}")
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("riskd.db") for p in files)
    for path in files:
        evidence.add(f"file {path.relative_to(tmp_path)}", path.read_bytes())

    # Controls: the scan reads what was stored (the masked phone is in the decision log),
    # and the search finds a marker wherever one is.
    stored = [text for where, text in evidence.texts if where.startswith("file ")]
    assert any(mask_phone(m.phone) in text for text in stored)
    control = Evidence()
    control.add("control", f"xx{m.device.lower()}yy")
    assert control.hits(m.needles()) != []

    assert evidence.hits(m.needles()) == []


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"riskd-test-canary-{uuid.uuid4().hex}:"
    yield name
    client = redis.Redis.from_url(SHARED_REDIS)
    delete_prefix(client, name)
    client.close()


def _redis_contents(prefix: str) -> str:
    """Every key under ``prefix`` and what it holds, as text."""
    client = redis.Redis.from_url(SHARED_REDIS)
    readers: dict[str, Callable[[bytes], object]] = {
        "string": client.get,
        "hash": client.hgetall,
        "zset": lambda key: client.zrange(key, 0, -1, withscores=True),
        "set": client.smembers,
        "list": lambda key: client.lrange(key, 0, -1),
        "stream": client.xrange,
    }
    out: list[str] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = client.type(key).decode()
            read = readers.get(kind)
            out.append(f"{key!r} {kind} {None if read is None else read(key)!r}")
    finally:
        client.close()
    return "\n".join(out)


def test_pii_canaries_reach_no_redis_key_and_no_worker_log(
    tmp_path: Path,
    prefix: str,
    captured_logs: io.StringIO,
    capfd: pytest.CaptureFixture[str],
) -> None:
    # velocity state outlives a forget for 25 hours: it must hold keyed digests, never PII
    m = Markers.fresh()
    data_dir = tmp_path / "data"
    config = make_config(
        data_dir,
        redis_url=SHARED_REDIS,
        redis_prefix=prefix,
        score_workers=1,
        log_level="debug",
        deadline_ms=5000,
    )
    running = create_server(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            for i in range(3):
                order = order_to_proto(canary_order(m, f"o-canary-r{i}"))
                stub.Score(scoring_pb2.ScoreRequest(order=order), timeout=10)
            batch = scoring_pb2.ScoreBatchRequest(
                orders=[order_to_proto(canary_order(m, f"o-canary-rb{i}")) for i in range(3)]
            )
            stub.ScoreBatch(batch, timeout=10)
    finally:
        running.stop(5)
    stored = _redis_contents(prefix)
    evidence = Evidence()
    evidence.add("redis", stored)
    evidence.add("riskd JSON logs", captured_logs.getvalue())
    out = capfd.readouterr()
    evidence.add("process stdout (worker included)", out.out)
    evidence.add("process stderr (worker included)", out.err)
    for path in data_dir.rglob("*"):
        if path.is_file():
            evidence.add(f"file {path.name}", path.read_bytes())

    assert stored.count(prefix) >= 6  # the orders were counted in this Redis namespace
    assert evidence.hits(m.needles()) == []
