"""The order as evidence may store it: PII masked and blind-indexed, never plaintext.

Where it sits: ``DecisionLog.protect`` turns the engine's ``Order`` into the
``request`` of a ``DecisionRecord``. The buyer's phone, name, ID number and
street address appear only as masks (for people) and blind indexes (for exact
matching, e.g. "every decision for this phone"); the device id and IP only as
blind index (plus a short device mask). The plaintext of those fields is kept
only as Vault ciphertext, outside the hash chain (see ``schema``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from riskd.domain.order import Order
from riskd.pii.blind import join_address
from riskd.pii.mask import mask_address, mask_device, mask_id_number, mask_name, mask_phone


class Indexer(Protocol):
    """``riskd.pii.BlindIndexer``: keyed hash of a normalized value (``""`` for empty)."""

    def index(self, field_type: str, value: str) -> str: ...


class Encryptor(Protocol):
    """``riskd.pii.Vault``: envelope encryption under the subject's data key."""

    def encrypt_fields(
        self, subject_id: str, record_id: str, fields: Mapping[str, str]
    ) -> dict[str, bytes]: ...

    def add_forget_hook(self, hook: Callable[[str], None]) -> None: ...


def pii_fields(order: Order) -> dict[str, str]:
    """The order's PII fields by name (non-empty ones): what the Vault encrypts."""
    b, a = order.buyer, order.buyer.address
    fields = {
        "phone": b.phone,
        "name": b.name,
        "id_number": b.id_number,
        "address": join_address(a.province, a.city, a.district, a.detail).strip(),
        "device": order.device_id,
        "ip": order.ip,
    }
    return {k: v for k, v in fields.items() if v}


class _Digests:
    """Blind indexes, reusing those the engine already computed for the feature keys."""

    __slots__ = ("_indexer", "_known")

    def __init__(self, indexer: Indexer | None, known: Mapping[str, str] | None) -> None:
        self._indexer = indexer
        self._known = known or {}

    def index(self, field_type: str, value: str) -> str:
        if self._indexer is None or not value.strip():
            return ""
        known = self._known.get(field_type)
        return known if known is not None else self._indexer.index(field_type, value)


def _index(ix: _Digests, field_type: str, value: str) -> str:
    return ix.index(field_type, value)


def _buyer(order: Order, ix: _Digests) -> dict[str, Any]:
    b, a = order.buyer, order.buyer.address
    return {
        "buyer_id": b.buyer_id,
        "account_age_days": b.account_age_days,
        "phone": {"masked": mask_phone(b.phone), "index": _index(ix, "phone", b.phone)},
        "name": {"masked": mask_name(b.name), "index": _index(ix, "name", b.name)},
        "id_number": {
            "masked": mask_id_number(b.id_number),
            "index": _index(ix, "id_number", b.id_number),
        },
        "address": {
            "masked": mask_address(a.province, a.city, a.district),
            "index": _index(
                ix, "address", join_address(a.province, a.city, a.district, a.detail).strip()
            ),
        },
    }


def protect_order(
    order: Order, indexer: Indexer | None, digests: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The order as JSON values with every PII field masked and blind-indexed.

    Without an indexer the PII fields are only masked (their ``index`` is empty).
    ``digests`` (field type -> blind index of this order's value) are reused.
    """
    ix = _Digests(indexer, digests)
    return {
        "order_id": order.order_id,
        "buyer": _buyer(order, ix),
        "shop_id": order.shop_id,
        "merchant_id": order.merchant_id,
        "items": [
            {
                "sku": i.sku,
                "category": i.category,
                "unit_price": i.unit_price,
                "quantity": i.quantity,
            }
            for i in order.items
        ],
        "amounts": {
            "items": order.amounts.items,
            "discount": order.amounts.discount,
            "coupon": order.amounts.coupon,
            "shipping": order.amounts.shipping,
            "total": order.amounts.total,
        },
        "channel": order.channel.name,
        "live_room_id": order.live_room_id,
        "video_id": order.video_id,
        "creator_id": order.creator_id,
        "coupon_code": order.coupon_code,
        "device": {
            "masked": mask_device(order.device_id),
            "index": _index(ix, "device", order.device_id),
        },
        "ip": {"index": _index(ix, "ip", order.ip)},
        "payment_method": order.payment_method.name,
        "client_time": order.client_time,
    }
