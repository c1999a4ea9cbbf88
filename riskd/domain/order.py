"""The order being scored, as a pure value (what ``service`` converts a ``riskd.v1.Order`` into).

Field names match ``protos/riskd/v1/order.proto`` one for one; the rule DSL's
request schema is derived from these dataclasses, and a service test checks
that the two agree. Amounts are integer fen. PII fields (phone, name, ID
number, address) are plaintext here, in memory only: they are encrypted or
blind-indexed before anything is stored, counted or logged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

MAX_ORDER_ID_LEN = 128
"""The longest ``order_id``: the feature store, the scorer, the service and the PII access
trail all key on it (here, below them all, so that siblings share one bound)."""


class Channel(enum.IntEnum):
    """Where the buyer found the item."""

    UNSPECIFIED = 0
    SHORT_VIDEO = 1
    LIVE_ROOM = 2
    SHOP_PAGE = 3
    SEARCH = 4


class PaymentMethod(enum.IntEnum):
    UNSPECIFIED = 0
    WALLET = 1
    BANK_CARD = 2
    CREDIT = 3
    INSTALMENT = 4
    COD = 5


@dataclass(frozen=True, slots=True)
class Address:
    """A shipping address. ``detail`` (street and number) is the most sensitive part."""

    province: str = ""
    city: str = ""
    district: str = ""
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Buyer:
    buyer_id: str
    account_age_days: int = 0
    phone: str = ""
    name: str = ""
    id_number: str = ""
    address: Address = field(default_factory=Address)


@dataclass(frozen=True, slots=True)
class Item:
    sku: str
    category: str
    unit_price: int
    quantity: int


@dataclass(frozen=True, slots=True)
class Amounts:
    """Fen. ``total = items - discount - coupon + shipping`` (the service checks it)."""

    items: int = 0
    discount: int = 0
    coupon: int = 0
    shipping: int = 0
    total: int = 0


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    buyer: Buyer
    shop_id: str
    merchant_id: str
    items: tuple[Item, ...] = ()
    amounts: Amounts = field(default_factory=Amounts)
    channel: Channel = Channel.UNSPECIFIED
    live_room_id: str = ""
    video_id: str = ""
    creator_id: str = ""
    coupon_code: str = ""
    device_id: str = ""
    ip: str = ""
    payment_method: PaymentMethod = PaymentMethod.UNSPECIFIED
    client_time: float = 0.0
