"""Score, ScoreBatch and ReportOutcome through a real channel to a real server."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from riskd.config import Config
from riskd.domain.clock import SystemClock
from riskd.domain.decision import Decision
from riskd.domain.order import Order
from riskd.errors import DeadlineExceededError
from riskd.service import convert, interceptors, validate
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2, scoring_pb2_grpc
from riskd.service.metrics import Metrics
from riskd.service.scoring import ScoringServicer
from riskd.service.server import RunningServer, create_server
from tests.service.conftest import make_config
from tests.service.sample import full_order
from tests.service.test_scoring_deadlines import BudgetScorer

Stub = scoring_pb2_grpc.ScoringServiceStub


def fresh(**changes: object) -> Order:
    """A valid order with its own order id and device (so velocity starts at zero)."""
    order = full_order(f"o-{uuid.uuid4().hex}", f"dev-{uuid.uuid4().hex}")
    return dataclasses.replace(order, **changes)  # type: ignore[arg-type]


def score(stub: Stub, order: Order | order_pb2.Order) -> scoring_pb2.Decision:
    msg = order if isinstance(order, order_pb2.Order) else convert.order_to_proto(order)
    return stub.Score(scoring_pb2.ScoreRequest(order=msg), timeout=5).decision


def test_score_allows_a_first_order(stub: Stub) -> None:
    order = fresh()
    decision = score(stub, order)
    assert decision.order_id == order.order_id
    assert decision.outcome == scoring_pb2.OUTCOME_ALLOW
    assert decision.rules_version and not decision.degraded
    assert decision.elapsed_us > 0


def test_velocity_rules_hit_on_later_orders_from_one_device(stub: Stub) -> None:
    first = fresh()
    second = dataclasses.replace(fresh(), device_id=first.device_id)
    third = dataclasses.replace(fresh(), device_id=first.device_id)
    outcomes = [score(stub, o).outcome for o in (first, second, third)]
    assert outcomes == [
        scoring_pb2.OUTCOME_ALLOW,
        scoring_pb2.OUTCOME_REVIEW,
        scoring_pb2.OUTCOME_BLOCK,
    ]
    reasons = score(stub, third).reasons
    assert {r.reason_code for r in reasons} == {"DEVICE_VELOCITY", "DEVICE_BURST"}


def test_concurrent_retries_return_one_decision_and_count_once(stub: Stub) -> None:
    order = fresh()
    with ThreadPoolExecutor(8) as pool:
        decisions = list(pool.map(lambda _: score(stub, order), range(16)))
    firsts = [d for d in decisions if not d.replayed]
    assert len(firsts) == 1  # one call decided; the other 15 got its recorded decision
    for d in decisions:
        d.replayed = False
    assert all(d == decisions[0] for d in decisions)
    # Had any retry been counted, this second order from the device would be a third: BLOCK.
    second = dataclasses.replace(fresh(), device_id=order.device_id)
    assert score(stub, second).outcome == scoring_pb2.OUTCOME_REVIEW


def test_score_batch_answers_in_request_order(stub: Stub) -> None:
    orders = [fresh() for _ in range(64)]
    reply = stub.ScoreBatch(
        scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in orders]),
        timeout=10,
    )
    assert [d.order_id for d in reply.decisions] == [o.order_id for o in orders]
    assert {d.outcome for d in reply.decisions} == {scoring_pb2.OUTCOME_ALLOW}
    # A batch member is recorded: scoring it alone returns the same decision, replayed.
    assert not reply.decisions[5].replayed
    again = score(stub, orders[5])
    assert again.replayed
    again.replayed = False
    assert again == reply.decisions[5]


def test_report_outcome(stub: Stub) -> None:
    order = fresh()
    score(stub, order)
    stub.ReportOutcome(
        scoring_pb2.ReportOutcomeRequest(
            order_id=order.order_id, kind=scoring_pb2.ORDER_EVENT_KIND_CHARGEBACK, detail="bank"
        ),
        timeout=5,
    )


def _set(path: str, value: object) -> Callable[[order_pb2.Order], None]:
    def change(msg: order_pb2.Order) -> None:
        *parents, leaf = path.split(".")
        target = msg
        for p in parents:
            target = getattr(target, p)
        setattr(target, leaf, value)

    return change


def _add_items(n: int) -> Callable[[order_pb2.Order], None]:
    def change(msg: order_pb2.Order) -> None:
        del msg.items[:]
        for _ in range(n):
            msg.items.add(sku="s", category="c", unit_price=1, quantity=1)
        msg.amounts.items = msg.amounts.total = n
        msg.amounts.discount = msg.amounts.coupon = msg.amounts.shipping = 0

    return change


BAD_ORDERS: dict[str, Callable[[order_pb2.Order], None]] = {
    "order.order_id": _set("order_id", ""),
    "order.buyer.buyer_id": _set("buyer.buyer_id", ""),
    "order.amounts.total": _set("amounts.total", 1),
    "order.amounts.items": _set("amounts.items", 7),
    "order.amounts.coupon": _set("amounts.coupon", -500),
    "order.items[0].unit_price": lambda m: setattr(m.items[0], "unit_price", -1),
    "order.items[1].quantity": lambda m: setattr(m.items[1], "quantity", -3),
    "order.channel": _set("channel", 42),
    "order.payment_method": _set("payment_method", 9),
    "order.items": _add_items(validate.MAX_ITEMS + 1),
    "order.buyer.address.detail": _set("buyer.address.detail", "x" * 5000),
    "order.shop_id": _set("shop_id", "s" * 300),
    "order.buyer.account_age_days": _set("buyer.account_age_days", -1),
    "order.client_time": _set("client_time", float("inf")),
}


def counters(server: RunningServer) -> float:
    return sum(
        server.metrics.value("riskd_decisions_total", {"outcome": o})
        for o in ("allow", "review", "block")
    )


def logged(server: RunningServer, order_id: str) -> bool:
    """Whether the decision log holds a decision for ``order_id`` (queued or committed)."""
    log = server.components.decision_log
    assert log is not None
    return log.get(order_id) is not None


@pytest.mark.parametrize("field", list(BAD_ORDERS))
def test_bad_order_is_invalid_argument_and_changes_nothing(
    stub: Stub, server: RunningServer, field: str
) -> None:
    order = fresh()
    msg = convert.order_to_proto(order)
    BAD_ORDERS[field](msg)
    before = counters(server)
    with pytest.raises(grpc.RpcError) as e:
        score(stub, msg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ")
    assert "13812345678" not in e.value.details()
    assert counters(server) == before
    assert not logged(server, order.order_id)  # nor kept as evidence
    # Nothing was counted: the same device's next (valid) order is its first.
    retry = dataclasses.replace(fresh(), device_id=order.device_id)
    assert score(stub, retry).outcome == scoring_pb2.OUTCOME_ALLOW
    assert logged(server, retry.order_id)  # the check above can see a decision


def test_retry_is_replayed_and_counted_once_in_the_metrics(
    stub: Stub, server: RunningServer
) -> None:
    order = fresh()
    before = counters(server)
    first = score(stub, order)
    again = score(stub, order)
    both = stub.ScoreBatch(
        scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(order)] * 2), timeout=5
    ).decisions
    assert not first.replayed
    assert again.replayed and all(d.replayed for d in both)
    assert counters(server) == before + 1


def test_a_batchs_decisions_are_each_counted_in_the_metrics(
    stub: Stub, server: RunningServer
) -> None:
    # dashboards and alerts on decision rates see the checkout's batches too
    before = counters(server)
    orders = [convert.order_to_proto(fresh()) for _ in range(3)]
    stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(orders=orders), timeout=5)
    assert counters(server) == before + 3


def test_same_order_id_with_other_content_is_already_exists(
    stub: Stub, server: RunningServer
) -> None:
    order = fresh()
    first = score(stub, order)
    changed = convert.order_to_proto(order)
    _add_items(3)(changed)  # same id, another cart
    before = counters(server)
    with pytest.raises(grpc.RpcError) as e:
        score(stub, changed)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert e.value.details().startswith("order.order_id: ")
    assert counters(server) == before
    again = score(stub, order)  # the order itself is still answered as recorded
    assert again.replayed and again.decided_at == first.decided_at


class _Context:
    def __init__(self, remaining: float) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float:
        return self.remaining


def test_a_call_with_no_time_left_is_deadline_exceeded_and_records_nothing(
    server: RunningServer,
) -> None:
    class Scorer:
        def score(self, order: Order, *, timeout_s: float | None = None) -> object:
            raise AssertionError("nothing may be scored without time to answer")

    servicer = ScoringServicer(
        Scorer(),  # type: ignore[arg-type]
        server.metrics,
        server.components.clock,
        default_deadline_s=0.2,
        max_batch=10,
    )
    request = scoring_pb2.ScoreRequest(order=convert.order_to_proto(fresh()))
    with pytest.raises(DeadlineExceededError):
        servicer.Score(request, _Context(0.001))  # type: ignore[arg-type]
    assert interceptors.status_code(DeadlineExceededError("x")) is grpc.StatusCode.DEADLINE_EXCEEDED


def test_the_servicer_hands_each_calls_decisions_to_on_decided() -> None:
    """A scoring worker learns from ``on_decided`` which answers its log will not hold;
    a unary call and a batch each report their own decisions, once."""
    seen: list[tuple[str, ...]] = []

    def on_decided(decisions: Sequence[Decision]) -> None:
        seen.append(tuple(d.order_id for d in decisions))

    servicer = ScoringServicer(
        BudgetScorer(),  # type: ignore[arg-type]
        Metrics(),
        SystemClock(),
        default_deadline_s=0.2,
        max_batch=10,
        on_decided=on_decided,
    )
    one, a, b = fresh(), fresh(), fresh()
    servicer.Score(scoring_pb2.ScoreRequest(order=convert.order_to_proto(one)), _Context(1.0))  # type: ignore[arg-type]
    batch = scoring_pb2.ScoreBatchRequest(orders=[convert.order_to_proto(o) for o in (a, b)])
    servicer.ScoreBatch(batch, _Context(1.0))  # type: ignore[arg-type]
    assert seen == [(one.order_id,), (a.order_id, b.order_id)]


def test_bad_batch_member_rejects_the_whole_batch(stub: Stub, server: RunningServer) -> None:
    good, bad = convert.order_to_proto(fresh()), convert.order_to_proto(fresh())
    bad.amounts.total += 1
    before = counters(server)
    with pytest.raises(grpc.RpcError) as e:
        stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(orders=[good, bad]), timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("orders[1].amounts.total: ")
    assert counters(server) == before
    assert not logged(server, good.order_id) and not logged(server, bad.order_id)


def test_too_many_orders_in_a_batch(stub: Stub, server: RunningServer) -> None:
    msg = convert.order_to_proto(fresh())
    request = scoring_pb2.ScoreBatchRequest(orders=[msg] * (Config().max_batch + 1))
    with pytest.raises(grpc.RpcError) as e:
        stub.ScoreBatch(request, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("orders: ")


def test_too_many_orders_is_named_even_when_the_deadline_is_short(
    stub: Stub, server: RunningServer
) -> None:
    """Review: 2,000 small orders with 120 ms got DEADLINE_EXCEEDED ("the deadline has
    passed") from the reply margin of 2,000 decisions; a client retrying on that status
    was never told its batch was too big."""
    msg = order_pb2.Order(order_id="o")
    request = scoring_pb2.ScoreBatchRequest(orders=[msg] * 2000)
    before = counters(server)
    with pytest.raises(grpc.RpcError) as e:
        stub.ScoreBatch(request, timeout=0.12)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"orders: more than {Config().max_batch} orders in one batch"
    assert counters(server) == before


def _refuse_building(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Fail the call if ``convert`` builds one of these (the limits come first)."""

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("built before the limit was checked")

    for name in names:
        monkeypatch.setattr(convert, name, refuse)


def test_a_batch_over_the_limit_is_refused_before_its_orders_are_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: a million empty orders (2 MB) took 10 s of CPU and 600 MiB to be refused.
    Its own server: an oversized batch spends the caller's whole rate-limit burst."""
    request = scoring_pb2.ScoreBatchRequest(orders=[order_pb2.Order()] * 100_000)
    running = create_server(make_config(tmp_path))
    _refuse_building(monkeypatch, "order_from_proto", "Item")
    try:
        with (
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch,
            pytest.raises(grpc.RpcError) as e,
        ):
            scoring_pb2_grpc.ScoringServiceStub(ch).ScoreBatch(request, timeout=10)
    finally:
        running.stop(0)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"orders: more than {Config().max_batch} orders in one batch"


def test_an_order_over_the_item_limit_is_refused_before_its_items_are_built(
    stub: Stub, server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    msg = convert.order_to_proto(fresh())
    msg.items.extend([order_pb2.Item()] * 100_000)
    _refuse_building(monkeypatch, "Item")
    with pytest.raises(grpc.RpcError) as e:
        score(stub, msg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == f"order.items: more than {validate.MAX_ITEMS} items"


@pytest.mark.parametrize(
    ("method", "request_", "spoil", "field"),
    [
        (
            "Score",
            scoring_pb2.ScoreRequest(order=order_pb2.Order(order_id="o-XX")),
            b"XX",
            "order.order_id: is not valid UTF-8",
        ),
        (
            "ScoreBatch",
            scoring_pb2.ScoreBatchRequest(
                orders=[
                    order_pb2.Order(order_id="a"),
                    order_pb2.Order(
                        order_id="b", items=[order_pb2.Item(), order_pb2.Item(sku="XX")]
                    ),
                ]
            ),
            b"XX",
            "orders[1].items[1].sku: is not valid UTF-8",
        ),
        (
            "ReportOutcome",
            scoring_pb2.ReportOutcomeRequest(order_id="o-XX"),
            b"XX",
            "order_id: is not valid UTF-8",
        ),
        (
            "Score",
            scoring_pb2.ScoreRequest(order=order_pb2.Order(order_id="o-XX")),
            b"-XX",
            "request: is not a valid protobuf message",
        ),  # the bytes end inside a field
        (
            "ScoreBatch",
            scoring_pb2.ScoreBatchRequest(
                orders=[order_pb2.Order(order_id=f"o-{i:04}" + "." * 200) for i in range(400)]
                + [order_pb2.Order(order_id="XX")]
            ),
            b"XX",
            "orders[400].order_id: is not valid UTF-8",
        ),  # over EAGER_PARSE_BYTES: parsed and named after admission
        (
            "ScoreBatch",
            scoring_pb2.ScoreBatchRequest(
                orders=[order_pb2.Order(items=[order_pb2.Item()] * validate.MAX_ITEMS)]
                * (interceptors.NAMING_FIELDS // validate.MAX_ITEMS + 1)
                + [order_pb2.Order(order_id="XX")]
            ),
            b"XX",
            "request: is not a valid protobuf message",
        ),  # the spoiled field lies past what the naming walk reads
    ],
)
def test_bytes_that_do_not_parse_are_invalid_argument_not_internal(
    channel: grpc.Channel,
    server: RunningServer,
    method: str,
    request_: Any,
    spoil: bytes,
    field: str,
) -> None:
    """What a non-Python or hostile client can send: grpcio answered INTERNAL before any
    riskd code ran, unlogged and uncounted (review)."""
    data = request_.SerializeToString()
    data = data.replace(spoil, b"\xff\xfe") if spoil == b"XX" else data[:-2]
    call = channel.unary_unary(f"/riskd.v1.ScoringService/{method}")
    labels = {"method": f"/riskd.v1.ScoringService/{method}", "code": "INVALID_ARGUMENT"}
    errors, before = server.metrics.value("riskd_rpc_errors_total", labels), counters(server)
    with pytest.raises(grpc.RpcError) as e:
        call(data, timeout=5)
    assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, field)
    assert server.metrics.value("riskd_rpc_errors_total", labels) == errors + 1
    assert counters(server) == before


def test_oversized_message_is_invalid_argument_naming_the_field(
    stub: Stub, server: RunningServer
) -> None:
    msg = convert.order_to_proto(fresh())
    msg.buyer.address.detail = "x" * (5 * 1024 * 1024)  # over max_message_bytes (4 MiB)
    before = counters(server)
    with pytest.raises(grpc.RpcError) as e:
        score(stub, msg)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("order.buyer.address.detail: the request is 52")
    assert e.value.details().endswith(f"more than the limit of {Config().max_message_bytes}")
    assert counters(server) == before


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (scoring_pb2.ReportOutcomeRequest(kind=scoring_pb2.ORDER_EVENT_KIND_PAID), "order_id"),
        (scoring_pb2.ReportOutcomeRequest(order_id="o"), "kind"),
        (scoring_pb2.ReportOutcomeRequest(order_id="o", kind=99), "kind"),  # type: ignore[arg-type]
    ],
)
def test_bad_report_outcome(
    stub: Stub, request_: scoring_pb2.ReportOutcomeRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        stub.ReportOutcome(request_, timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: ")


def test_metrics_count_decisions_and_rule_hits(stub: Stub, server: RunningServer) -> None:
    import urllib.request

    first = fresh()
    score(stub, first)
    score(stub, dataclasses.replace(fresh(), device_id=first.device_id))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'riskd_decisions_total{outcome="review"}' in text
    assert 'riskd_rule_hits_total{rule_id="device_velocity"}' in text
    assert "riskd_rpc_latency_seconds_bucket" in text
    assert "\nriskd_evidence_backlog " in text  # the decision log writer's state
    assert "\nriskd_evidence_rejected 0.0\n" in text
    assert "\nriskd_evidence_unsealed 0.0\n" in text
    assert "\nriskd_evidence_superseded_total 0.0\n" in text
    assert "13812345678" not in text


def test_every_exported_metric_is_in_the_readme(server: RunningServer) -> None:
    """Operators read the README's Metrics table: it names every family /metrics exports."""
    import urllib.request

    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    families = [line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE riskd_")]
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    table = readme[readme.index("## Metrics") :].split("\n## ", 1)[0]
    names = [
        f"{name}_total" if kind == "counter" and not name.endswith("_total") else name
        for name, kind in families
        if not name.endswith("_created")  # the client library's creation timestamps
    ]
    assert len(names) >= 13
    assert [n for n in names if f"`{n}`" not in table] == []


def test_threads_are_not_leaked_per_call(stub: Stub) -> None:
    before = threading.active_count()
    for _ in range(20):
        score(stub, fresh())
    assert threading.active_count() <= before + 2


def test_message_size_limit_names_the_field_then_grpc_refuses_far_larger(
    tmp_path: Path,
) -> None:
    limit = 64 * 1024
    running = create_server(make_config(tmp_path, max_message_bytes=limit))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = scoring_pb2_grpc.ScoringServiceStub(ch)
            batch = [convert.order_to_proto(fresh()) for _ in range(400)]  # ~80 KB in all
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(orders=batch), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("orders: the request is ")
            one = convert.order_to_proto(fresh())
            one.items[0].sku = "s" * 100_000
            with pytest.raises(grpc.RpcError) as e:
                stub.ScoreBatch(scoring_pb2.ScoreBatchRequest(orders=[one]), timeout=5)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert e.value.details().startswith("orders[0].items[0].sku: the request is 100")
            one.items[0].sku = "s" * (4 * limit)  # past gRPC's own receive limit
            with pytest.raises(grpc.RpcError) as e:
                score(stub, one)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert score(stub, fresh()).outcome == scoring_pb2.OUTCOME_ALLOW
        assert running.metrics.value("riskd_decisions_total", {"outcome": "allow"}) == 1
    finally:
        running.stop(1)
