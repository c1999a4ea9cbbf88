"""Protobuf ↔ domain values, for the servicers: the first and last step of every request.

Unknown enum values (proto3 enums are open, so a newer client can send them)
are rejected with ``InvalidArgumentError`` naming the field; nothing here
checks amounts or sizes (that is ``validate``).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import TypeVar

from riskd.domain.decision import Decision, Outcome, Reason
from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order, PaymentMethod
from riskd.errors import InvalidArgumentError
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2
from riskd.service.validate import validate_item_count

E = TypeVar("E", bound=enum.IntEnum)


def enum_value(kind: type[E], value: int, field: str) -> E:
    """The domain enum member for a wire value; unknown values name ``field``.

    >>> enum_value(Channel, 2, "order.channel").name
    'LIVE_ROOM'
    """
    try:
        return kind(value)
    except ValueError:
        raise InvalidArgumentError(field, f"unknown enum value {value}") from None


def order_from_proto(msg: order_pb2.Order, field: str = "order") -> Order:
    """A ``riskd.v1.Order`` as a domain ``Order`` (``field`` prefixes error paths).

    The item count is checked first: a request of millions of empty items is refused
    before they are built."""
    validate_item_count(len(msg.items), f"{field}.items")
    return Order(
        order_id=msg.order_id,
        buyer=_buyer(msg.buyer),
        shop_id=msg.shop_id,
        merchant_id=msg.merchant_id,
        items=tuple(Item(i.sku, i.category, i.unit_price, i.quantity) for i in msg.items),
        amounts=_amounts(msg.amounts),
        channel=enum_value(Channel, msg.channel, f"{field}.channel"),
        live_room_id=msg.live_room_id,
        video_id=msg.video_id,
        creator_id=msg.creator_id,
        coupon_code=msg.coupon_code,
        device_id=msg.device_id,
        ip=msg.ip,
        payment_method=enum_value(PaymentMethod, msg.payment_method, f"{field}.payment_method"),
        client_time=msg.client_time,
    )


def _buyer(msg: order_pb2.Buyer) -> Buyer:
    a = msg.address
    return Buyer(
        buyer_id=msg.buyer_id,
        account_age_days=msg.account_age_days,
        phone=msg.phone,
        name=msg.name,
        id_number=msg.id_number,
        address=Address(a.province, a.city, a.district, a.detail),
    )


def _amounts(msg: order_pb2.Amounts) -> Amounts:
    return Amounts(msg.items, msg.discount, msg.coupon, msg.shipping, msg.total)


def order_to_proto(order: Order) -> order_pb2.Order:
    """A domain ``Order`` as a ``riskd.v1.Order`` (for clients and tests)."""
    b, a, m = order.buyer, order.buyer.address, order.amounts
    return order_pb2.Order(
        order_id=order.order_id,
        buyer=order_pb2.Buyer(
            buyer_id=b.buyer_id,
            account_age_days=b.account_age_days,
            phone=b.phone,
            name=b.name,
            id_number=b.id_number,
            address=order_pb2.Address(
                province=a.province, city=a.city, district=a.district, detail=a.detail
            ),
        ),
        shop_id=order.shop_id,
        merchant_id=order.merchant_id,
        items=[
            order_pb2.Item(
                sku=i.sku, category=i.category, unit_price=i.unit_price, quantity=i.quantity
            )
            for i in order.items
        ],
        amounts=order_pb2.Amounts(
            items=m.items, discount=m.discount, coupon=m.coupon, shipping=m.shipping, total=m.total
        ),
        channel=int(order.channel),  # type: ignore[arg-type]
        live_room_id=order.live_room_id,
        video_id=order.video_id,
        creator_id=order.creator_id,
        coupon_code=order.coupon_code,
        device_id=order.device_id,
        ip=order.ip,
        payment_method=int(order.payment_method),  # type: ignore[arg-type]
        client_time=order.client_time,
    )


def decision_to_proto(decision: Decision) -> scoring_pb2.Decision:
    """A domain ``Decision`` as a ``riskd.v1.Decision``."""
    return scoring_pb2.Decision(
        order_id=decision.order_id,
        outcome=int(decision.outcome),  # type: ignore[arg-type]
        score=decision.score,
        reasons=[_reason(r) for r in decision.reasons],
        rules_version=decision.rules_version,
        model_versions=dict(decision.model_versions),
        degraded=bool(decision.degraded),
        unavailable=list(decision.degraded),
        elapsed_us=decision.elapsed_us,
        decided_at=decision.decided_at,
        replayed=decision.replayed,
    )


def _reason(reason: Reason) -> scoring_pb2.Reason:
    return scoring_pb2.Reason(
        rule_id=reason.rule_id,
        reason_code=reason.reason_code,
        action=int(reason.action),  # type: ignore[arg-type]
        score=reason.score,
        explanation=reason.explanation,
    )


def decision_from_proto(msg: scoring_pb2.Decision) -> Decision:
    """A ``riskd.v1.Decision`` as a domain ``Decision`` (for clients and tests)."""
    return Decision(
        order_id=msg.order_id,
        outcome=enum_value(Outcome, msg.outcome, "decision.outcome"),
        score=msg.score,
        reasons=tuple(
            Reason(
                r.rule_id,
                r.reason_code,
                enum_value(Outcome, r.action, "reason.action"),
                r.score,
                tuple(r.explanation),
            )
            for r in msg.reasons
        ),
        rules_version=msg.rules_version,
        model_versions=dict(msg.model_versions),
        degraded=tuple(msg.unavailable) if msg.degraded else (),
        elapsed_us=msg.elapsed_us,
        decided_at=msg.decided_at,
    )


def event_from_proto(msg: scoring_pb2.ReportOutcomeRequest, now: float) -> OrderEvent:
    """A ``ReportOutcomeRequest`` as an ``OrderEvent``; ``at == 0`` means ``now``."""
    kind = enum_value(OrderEventKind, msg.kind, "kind")
    return OrderEvent(msg.order_id, kind, msg.at or now, msg.detail)


def orders_from_proto(msgs: Iterable[order_pb2.Order], field: str = "orders") -> list[Order]:
    """Each order of a batch, error paths as ``orders[3].channel``."""
    return [order_from_proto(m, f"{field}[{i}]") for i, m in enumerate(msgs)]
