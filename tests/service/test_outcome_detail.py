"""ReportOutcome's ``detail`` through a real server, on SQLite and on PostgreSQL: a detail
holding a buyer's phone, ID, card, e-mail, street address or labelled name is refused and
stored nowhere; what details really carry (tracking numbers, order ids, amounts, dates,
places, list items, labels without a name, Chinese text) is stored."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from riskd.evidence.log import DecisionLog
from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc
from riskd.service.server import RunningServer, create_server
from riskd.sql import Database
from tests.service.conftest import make_config

PG_BASE = "postgresql://postgres@127.0.0.1:5432/test"
DISPUTED = scoring_pb2.ORDER_EVENT_KIND_DISPUTED


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    data = Path(tmp_path_factory.mktemp("riskd"))
    url = "" if request.param == "sqlite" else f"{PG_BASE}?schema=outcome_{uuid.uuid4().hex[:12]}"
    running = create_server(make_config(data, database_url=url))
    yield running
    running.stop(1)
    if url:
        db = Database(url)
        db.drop_schema()
        db.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[scoring_pb2_grpc.ScoringServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield scoring_pb2_grpc.ScoringServiceStub(channel)


def events_of(server: RunningServer, order_id: str) -> list[str]:
    log = server.components.decision_log
    assert isinstance(log, DecisionLog)
    log.flush(5)
    return [e.detail for e in log.events(order_id)]


def report(stub: scoring_pb2_grpc.ScoringServiceStub, order_id: str, detail: str) -> None:
    stub.ReportOutcome(
        scoring_pb2.ReportOutcomeRequest(order_id=order_id, kind=DISPUTED, detail=detail),
        timeout=5,
    )


@pytest.mark.parametrize(
    ("detail", "secret", "kind"),
    [
        ("买家电话 138-1234-5678 要求退款", "5678", "a mobile phone number"),
        ("buyer called from +86 139 8765 4321", "4321", "a mobile phone number"),
        ("买家电话 138.1234.5678 要求退款", "5678", "a mobile phone number"),
        ("买家电话 (138) 1234-5678", "5678", "a mobile phone number"),
        ("买家座机 (010) 6543-2187 要求退款", "2187", "a landline phone number"),
        ("身份证 11010519491231002X 已核验", "002X", "a resident ID number"),
        ("退款到卡 6222 0212 3456 7890 128", "7890", "a bank card number"),
        ("联系邮箱 zhang.san@example.com", "zhang.san", "an e-mail address"),
        ("买家改地址：杭州市西湖区文三路 90 号 5栋1203室", "文三路", "a shipping address"),
        ("收货地址北京市朝阳区建国路八十八号", "建国路", "a shipping address"),
        ("收件人：张伟 已确认，要求退款", "张伟", "a person's name"),
        ("买家王小明说没收到", "王小明", "a person's name"),
        ("contact name: John Smith", "Smith", "a person's name"),
        ("收件人：张伟，电话 138-1234-5678", "5678", "a mobile phone number and a person's name"),
    ],
)
def test_a_detail_with_pii_is_refused_naming_detail_and_stored_nowhere(
    stub: scoring_pb2_grpc.ScoringServiceStub,
    server: RunningServer,
    detail: str,
    secret: str,
    kind: str,
) -> None:
    order_id = f"o-{uuid.uuid4().hex}"
    with pytest.raises(grpc.RpcError) as e:
        report(stub, order_id, detail)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == (
        f"detail: looks like it holds {kind}; free text must not carry personal data"
    )
    assert secret not in e.value.details()
    assert events_of(server, order_id) == []  # nothing chained into order_events


@pytest.mark.parametrize(
    "detail",
    [
        "顺丰 SF1234567890123 已签收",
        "中通 75312345678901，圆通 YT1234567890123，京东 JDVA13812345678-1-1-",
        "同单 4987654321098765432 重复付款，退款 ¥138.00",
        "2023-12-01 13:45 买家申请仅退款，SKU A-1024 x2",
        "IP 172.160.100.20 于 2026.11.28 12:30:45 下单 ¥1,234.56，客户端 v2.13.8",
        "商家在深圳市南山区发货，快递到了杭州转运中心",
        "2024年3月1号发货，直播间2号链接退款，5层收纳架 38码",
        "收件人未填写，联系人不详，买家说已退款，收件人：张**，买家王先生称未收到",
        "bank",
    ],
)
def test_a_detail_without_pii_is_stored(
    stub: scoring_pb2_grpc.ScoringServiceStub, server: RunningServer, detail: str
) -> None:
    order_id = f"o-{uuid.uuid4().hex}"
    report(stub, order_id, detail)
    assert events_of(server, order_id) == [detail]
