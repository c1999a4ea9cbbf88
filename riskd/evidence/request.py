"""The order as evidence may store it: PII masked in the chain, never plaintext.

Where it sits: ``DecisionLog.protect`` turns the engine's ``Order`` into the
``request`` of a ``DecisionRecord``. Inside the hash-chained record the buyer's
phone, name, ID number and address appear only as masks (for people), the
device id as a short mask, the IP not at all. Their blind indexes (for exact
matching, e.g. "every decision for this phone") and Vault ciphertexts live
beside the chain (``decision_blind_index``, ``decision_pii``; see ``schema``),
keyed by order and field with the buyer as subject, so that forgetting the
buyer deletes them without breaking the chain.

The same form tells whether a retry sends the same order (``same_order``): equal
but for ``client_time``, which is informational (riskd keeps its own time) and a
checkout may set anew when it rebuilds a request; the record keeps the first. Its
``content_tag`` carries that comparison to the feature store, whose per-order marker
refuses other content before anything is counted, on whichever replica a retry reaches.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from riskd.domain.order import Order
from riskd.pii.blind import join_address
from riskd.pii.mask import mask_address, mask_device, mask_id_number, mask_name, mask_phone
from riskd.pii.vault import PreparedKeys
from riskd.sql import Database, Tx


class Indexer(Protocol):
    """``riskd.pii.BlindIndexer``: keyed hash of a normalized value (``""`` for empty)."""

    def index(self, field_type: str, value: str) -> str: ...


class Encryptor(Protocol):
    """``riskd.pii.Vault``: envelope encryption under the subject's data key."""

    def encrypt_fields(
        self,
        subject_id: str,
        record_id: str,
        fields: Mapping[str, str],
        keys: PreparedKeys | None = None,
    ) -> dict[str, bytes]: ...

    def prepare(self, subject_ids: Iterable[str]) -> None: ...

    def prepare_in(self, tx: Tx, subject_ids: Iterable[str]) -> PreparedKeys: ...

    def adopt(self, keys: PreparedKeys) -> None: ...

    def keeps_keys_in(self, db: Database) -> bool: ...

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


def blind_indexes(
    order: Order, indexer: Indexer | None, digests: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The blind index of each non-empty PII field (by ``pii_fields`` name), for the
    ``decision_blind_index`` table beside the chain.

    ``digests`` (field type -> blind index of this order's value, e.g. the engine's
    feature keys) are reused. Without an indexer there are none.
    """
    if indexer is None:
        return {}
    known = digests or {}
    out: dict[str, str] = {}
    for field, value in pii_fields(order).items():
        if not value.strip():
            continue
        digest = known.get(field) or indexer.index(field, value)
        if digest:
            out[field] = digest
    return out


def _buyer(order: Order) -> dict[str, Any]:
    b, a = order.buyer, order.buyer.address
    return {
        "buyer_id": b.buyer_id,
        "account_age_days": b.account_age_days,
        "phone": {"masked": mask_phone(b.phone)},
        "name": {"masked": mask_name(b.name)},
        "id_number": {"masked": mask_id_number(b.id_number)},
        "address": {"masked": mask_address(a.province, a.city, a.district)},
    }


def protect_order(order: Order) -> dict[str, Any]:
    """The order as JSON values with every PII field masked (the IP left out)."""
    return {
        "order_id": order.order_id,
        "buyer": _buyer(order),
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
        "device": {"masked": mask_device(order.device_id)},
        "payment_method": order.payment_method.name,
        "client_time": order.client_time,
    }


# Fields of the protected form a retry may change: the first call's stay in the record.
_NOT_COMPARED = ("client_time",)


def content_tag(protected: Mapping[str, Any]) -> str:
    """A 7-character tag (42 bits, URL-safe base64) of a protected form: two forms get the
    same tag when ``same_order`` holds and, but for one chance in 2^42, only then. The
    feature store keeps the first tag recorded with an order id and refuses another.

    It is a digest of the masked form (what the decision log already holds in clear),
    never of a plaintext PII field.

    >>> first = {"order_id": "o1", "amounts": {"total": 100}, "client_time": 1.5}
    >>> content_tag(first) == content_tag({**first, "client_time": 9.0})
    True
    >>> content_tag(first) == content_tag({**first, "amounts": {"total": 101}})
    False
    """
    body = {k: v for k, v in protected.items() if k not in _NOT_COMPARED}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(text.encode(), digest_size=6, person=b"riskd-content").digest()
    return base64.urlsafe_b64encode(digest).decode()[:7]


def same_order(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two protected forms (``protect_order``'s, or a record's ``request``) are of
    the same order: equal but for the fields a retry may change (``client_time``).

    >>> first = {"order_id": "o1", "amounts": {"total": 100}, "client_time": 1.5}
    >>> same_order(first, {**first, "client_time": 9.0})
    True
    >>> same_order(first, {**first, "amounts": {"total": 101}})
    False
    """
    if a == b:
        return True
    return {k: v for k, v in a.items() if k not in _NOT_COMPARED} == {
        k: v for k, v in b.items() if k not in _NOT_COMPARED
    }
