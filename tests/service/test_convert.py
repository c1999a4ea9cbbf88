"""Proto ↔ domain conversion: field parity with the dataclasses, round trips, unknown enums."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from google.protobuf.descriptor import Descriptor

from riskd.domain import order as domain_order
from riskd.domain.decision import Decision, Outcome, Reason
from riskd.domain.events import OrderEventKind
from riskd.domain.order import Amounts, Buyer, Channel, PaymentMethod
from riskd.errors import InvalidArgumentError
from riskd.service import convert, validate
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2
from tests.service.sample import full_order

PAIRS = [
    (order_pb2.Order.DESCRIPTOR, domain_order.Order),
    (order_pb2.Buyer.DESCRIPTOR, domain_order.Buyer),
    (order_pb2.Address.DESCRIPTOR, domain_order.Address),
    (order_pb2.Item.DESCRIPTOR, domain_order.Item),
    (order_pb2.Amounts.DESCRIPTOR, domain_order.Amounts),
]


@pytest.mark.parametrize(("descriptor", "cls"), PAIRS, ids=[c.__name__ for _, c in PAIRS])
def test_proto_fields_equal_domain_dataclass_fields(descriptor: Descriptor, cls: type) -> None:
    # The DSL derives the rule schema from the dataclasses; the API must carry the same names.
    proto_names = [f.name for f in descriptor.fields]
    domain_names = [f.name for f in dataclasses.fields(cls)]
    assert proto_names == domain_names


def test_proto_enums_match_domain_enums() -> None:
    for proto_enum, domain_enum, prefix in (
        (order_pb2.Channel, Channel, "CHANNEL_"),
        (order_pb2.PaymentMethod, PaymentMethod, "PAYMENT_METHOD_"),
        (scoring_pb2.OrderEventKind, OrderEventKind, "ORDER_EVENT_KIND_"),
    ):
        assert {n.removeprefix(prefix): v for n, v in proto_enum.items()} == {
            m.name: m.value for m in domain_enum
        }
    outcomes = {n.removeprefix("OUTCOME_"): v for n, v in scoring_pb2.Outcome.items()}
    assert outcomes == {"UNSPECIFIED": 0, **{m.name: m.value for m in Outcome}}


def test_nested_dataclass_types_are_proto_messages() -> None:
    hints = typing.get_type_hints(domain_order.Order)
    assert hints["buyer"] is Buyer and hints["amounts"] is Amounts


def test_order_round_trips_through_proto() -> None:
    order = full_order()
    wire = convert.order_to_proto(order).SerializeToString()
    assert convert.order_from_proto(order_pb2.Order.FromString(wire)) == order


def test_decision_round_trips_through_proto() -> None:
    decision = Decision(
        order_id="o-1",
        outcome=Outcome.REVIEW,
        score=0.75,
        reasons=(Reason("r1", "VELOCITY", Outcome.REVIEW, 0.5, ("orders(device, 1h) = 3",)),),
        rules_version="abc",
        model_versions={"iforest": "1"},
        degraded=("features",),
        elapsed_us=1234,
        decided_at=1_700_000_000.0,
    )
    msg = convert.decision_to_proto(decision)
    assert msg.degraded and list(msg.unavailable) == ["features"]
    assert convert.decision_from_proto(msg) == decision


@pytest.mark.parametrize("field", ["channel", "payment_method"])
def test_unknown_enum_value_is_rejected_naming_the_field(field: str) -> None:
    msg = convert.order_to_proto(full_order())
    setattr(msg, field, 99)
    with pytest.raises(InvalidArgumentError) as e:
        convert.order_from_proto(msg)
    assert e.value.field == f"order.{field}"


def test_batch_errors_name_the_order_index() -> None:
    bad = convert.order_to_proto(full_order())
    bad.channel = 42  # type: ignore[assignment]
    with pytest.raises(InvalidArgumentError) as e:
        convert.orders_from_proto([convert.order_to_proto(full_order()), bad])
    assert e.value.field == "orders[1].channel"


def test_too_many_items_are_refused_before_they_are_built() -> None:
    msg = convert.order_to_proto(full_order())
    msg.items.extend(order_pb2.Item(sku="s", quantity=1) for _ in range(validate.MAX_ITEMS))
    with pytest.raises(InvalidArgumentError) as e:
        convert.orders_from_proto([msg])
    assert e.value.field == "orders[0].items"


@pytest.mark.parametrize(
    ("field", "spoil"),
    [
        ("decision.outcome", lambda m: setattr(m, "outcome", 9)),
        ("reason.action", lambda m: setattr(m.reasons.add(), "action", 9)),
    ],
)
def test_decision_unknown_outcome_is_rejected_naming_the_field(
    field: str, spoil: typing.Callable[[scoring_pb2.Decision], None]
) -> None:
    msg = scoring_pb2.Decision(order_id="o-1", outcome=scoring_pb2.OUTCOME_ALLOW)
    spoil(msg)
    with pytest.raises(InvalidArgumentError) as e:
        convert.decision_from_proto(msg)
    assert e.value.field == field


def test_report_outcome_unknown_kind_is_rejected() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        convert.event_from_proto(scoring_pb2.ReportOutcomeRequest(order_id="o", kind=77), 1.0)
    assert e.value.field == "kind"


def test_report_outcome_time_defaults_to_now() -> None:
    req = scoring_pb2.ReportOutcomeRequest(
        order_id="o", kind=scoring_pb2.ORDER_EVENT_KIND_CHARGEBACK
    )
    event = convert.event_from_proto(req, 123.0)
    assert (event.kind, event.at) == (OrderEventKind.CHARGEBACK, 123.0)


def test_report_outcome_keeps_the_reported_time_and_detail() -> None:
    """The reported ``at`` tells a retry from a new report (README): it is kept as sent."""
    req = scoring_pb2.ReportOutcomeRequest(
        order_id="o", kind=scoring_pb2.ORDER_EVENT_KIND_PAID, at=1_750_000_000.25, detail=" SF1\n"
    )
    event = convert.event_from_proto(req, 123.0)
    assert (event.order_id, event.at, event.detail) == ("o", 1_750_000_000.25, " SF1\n")
