"""The identities an order is counted by, as blind indexes: the feature store's ``Observation``.

Where it sits: first step of ``Scorer.score``. Every ``riskd.domain.features.KEYS``
value the order carries is replaced by its keyed hash (``BlindIndexer``), so
velocity counters, in process or in Redis, never hold a phone, an address, a
device id or an IP in clear (nor a platform id: one rule, no exceptions). The
order id the stores remember (idempotency) is a keyed hash too: in clear, the
orders listed under one hashed identity would show which orders share a buyer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from riskd.domain.order import Order
from riskd.evidence.request import content_tag, protect_order
from riskd.features.store import Observation
from riskd.pii.blind import join_address


class Indexer(Protocol):
    """``riskd.pii.BlindIndexer``."""

    def index(self, field_type: str, value: str) -> str: ...


def raw_keys(order: Order) -> dict[str, str]:
    """KEYS name -> plaintext value, for the keys this order carries (in memory only).

    The address counts only when it has a street detail: a bare province or
    city would lump thousands of buyers together.
    """
    a = order.buyer.address
    address = join_address(a.province, a.city, a.district, a.detail) if a.detail.strip() else ""
    values = {
        "buyer": order.buyer.buyer_id,
        "device": order.device_id,
        "ip": order.ip,
        "address": address,
        "phone": order.buyer.phone,
        "shop": order.shop_id,
        "live_room": order.live_room_id,
        "creator": order.creator_id,
    }
    return {k: v for k, v in values.items() if v.strip()}


def observation_keys(order: Order, indexer: Indexer) -> dict[str, str]:
    """KEYS name -> blind index of the order's value (empty values left out)."""
    keys = {}
    for name, value in raw_keys(order).items():
        digest = indexer.index(name, value)
        if digest:
            keys[name] = digest
    return keys


def observe(
    order: Order, indexer: Indexer, at: float, protected: Mapping[str, Any] | None = None
) -> Observation:
    """The order as the feature store sees it, seen at ``at`` (riskd's clock, not the
    client's), with its content tag (from ``protected``, its ``protect_order`` form, when
    the caller has it): the store refuses the order id's other content."""
    order_id = indexer.index("order", order.order_id)
    keys = observation_keys(order, indexer)
    tag = content_tag(protect_order(order) if protected is None else protected)
    return Observation(order_id, at, order.amounts.total, keys, tag)
