"""Input checks on domain values, before anything is scored or counted.

Every failure is an ``InvalidArgumentError`` naming the field by its dotted
path (``order.items[2].quantity``) and never echoing the value, since it may be
PII. Checks run before the scorer sees the order, so a bad order changes no
velocity counter, no metric and no log record.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Sequence

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.domain.order import Order
from riskd.errors import InvalidArgumentError
from riskd.features.store import MAX_ORDER_ID_LEN
from riskd.pii.detect import refuse_pii

MAX_ITEMS = 200
MAX_STRING_CHARS = 256
MAX_AMOUNT_FEN = 10**12  # 10 billion CNY: far above any order, far below int64
# How far past the server's clock a reported outcome's time may be (clock skew).
MAX_EVENT_SKEW_S = 3600.0
# a reported outcome's time may not be earlier (2000-01-01T00:00:00Z): a smaller number is
# a unit or field mix-up by the caller (review: at = 5, 1970, was stored as given)
EARLIEST_EVENT_AT = 946_684_800.0

# Every string field of an Order, by its path below the order. None may hold NUL
# (PostgreSQL's text refuses it); the identifiers (not free text) no control character.
_STRINGS: tuple[tuple[str, Callable[[Order], str]], ...] = (
    ("order_id", lambda o: o.order_id),
    ("buyer.buyer_id", lambda o: o.buyer.buyer_id),
    ("buyer.phone", lambda o: o.buyer.phone),
    ("buyer.name", lambda o: o.buyer.name),
    ("buyer.id_number", lambda o: o.buyer.id_number),
    ("buyer.address.province", lambda o: o.buyer.address.province),
    ("buyer.address.city", lambda o: o.buyer.address.city),
    ("buyer.address.district", lambda o: o.buyer.address.district),
    ("buyer.address.detail", lambda o: o.buyer.address.detail),
    ("shop_id", lambda o: o.shop_id),
    ("merchant_id", lambda o: o.merchant_id),
    ("live_room_id", lambda o: o.live_room_id),
    ("video_id", lambda o: o.video_id),
    ("creator_id", lambda o: o.creator_id),
    ("coupon_code", lambda o: o.coupon_code),
    ("device_id", lambda o: o.device_id),
    ("ip", lambda o: o.ip),
)
_FREE_TEXT = frozenset(
    {
        "buyer.name",
        "buyer.address.province",
        "buyer.address.city",
        "buyer.address.district",
        "buyer.address.detail",
    }
)

_AMOUNTS = ("items", "discount", "coupon", "shipping", "total")


def validate_order(order: Order, field: str = "order") -> None:
    """Raise ``InvalidArgumentError`` for the first problem found in ``order``."""
    _validate_order_id(order.order_id, f"{field}.order_id")
    if not order.buyer.buyer_id.strip():
        # without a buyer the PII has no data key (nothing to encrypt it under or forget)
        raise InvalidArgumentError(f"{field}.buyer.buyer_id", "is required")
    for path, get in _STRINGS:
        _validate_string(get(order), f"{field}.{path}", free_text=path in _FREE_TEXT)
    if order.buyer.account_age_days < 0:
        raise InvalidArgumentError(f"{field}.buyer.account_age_days", "must not be negative")
    if not math.isfinite(order.client_time) or order.client_time < 0:
        raise InvalidArgumentError(f"{field}.client_time", "must be a non-negative epoch time")
    _validate_items(order, field)
    _validate_amounts(order, field)


def _validate_string(value: str, field: str, *, free_text: bool = False) -> None:
    if len(value) > MAX_STRING_CHARS:
        raise InvalidArgumentError(field, f"longer than {MAX_STRING_CHARS}")
    if free_text:
        if "\x00" in value:
            raise InvalidArgumentError(field, "must not contain NUL characters")
    elif not value.isprintable() and not all(c.isprintable() or _is_space(c) for c in value):
        raise InvalidArgumentError(field, "must not contain control characters")


def _is_space(c: str) -> bool:
    """A space separator (U+3000 typed by an IME, no-break space): not printable to
    ``str.isprintable``, harmless in an identifier (the blind index normalizes it)."""
    return unicodedata.category(c) == "Zs"


def _validate_order_id(order_id: str, field: str) -> None:
    """The id every velocity window and the decision log key on: the checks the feature
    store and the scorer would make later, made here so a batch fails before any order
    of it is scored (also when its orders go to different scoring workers)."""
    if not order_id.strip():
        raise InvalidArgumentError(field, "is required")
    if len(order_id) > MAX_ORDER_ID_LEN:
        raise InvalidArgumentError(field, f"is longer than {MAX_ORDER_ID_LEN}")
    if not order_id.isprintable():
        raise InvalidArgumentError(field, "must not contain control characters")


def _validate_items(order: Order, field: str) -> None:
    validate_item_count(len(order.items), f"{field}.items")
    for i, item in enumerate(order.items):
        at = f"{field}.items[{i}]"
        _validate_string(item.sku, f"{at}.sku")
        _validate_string(item.category, f"{at}.category")
        if not 0 <= item.unit_price <= MAX_AMOUNT_FEN:
            raise InvalidArgumentError(f"{at}.unit_price", "must be 0..10^12 fen")
        if not 1 <= item.quantity <= 1_000_000:
            raise InvalidArgumentError(f"{at}.quantity", "must be 1..1000000")


def _validate_amounts(order: Order, field: str) -> None:
    a = order.amounts
    for name in _AMOUNTS:
        if not 0 <= getattr(a, name) <= MAX_AMOUNT_FEN:
            raise InvalidArgumentError(f"{field}.amounts.{name}", "must be 0..10^12 fen")
    if a.items != sum(i.unit_price * i.quantity for i in order.items):
        raise InvalidArgumentError(
            f"{field}.amounts.items", "must equal the sum of unit_price * quantity"
        )
    if a.total != a.items - a.discount - a.coupon + a.shipping:
        raise InvalidArgumentError(
            f"{field}.amounts.total", "must equal items - discount - coupon + shipping"
        )


def validate_batch(orders: Sequence[Order], max_batch: int, field: str = "orders") -> None:
    """Check the batch size, then every order (paths like ``orders[3].amounts.total``)."""
    validate_batch_size(len(orders), max_batch, field)
    for i, order in enumerate(orders):
        validate_order(order, f"{field}[{i}]")


def validate_batch_size(count: int, max_batch: int, field: str = "orders") -> None:
    """A batch of ``count`` orders: at least one, at most ``max_batch`` (checked on the
    request before its orders are converted; a request over 64 KiB is checked on its bytes
    before its parse, ``riskd.service.server.element_limits``)."""
    if not count:
        raise InvalidArgumentError(field, "at least one order is required")
    if count > max_batch:
        raise InvalidArgumentError(field, f"more than {max_batch} orders in one batch")


def validate_item_count(count: int, field: str) -> None:
    """At most ``MAX_ITEMS`` items (``field``: the order's ``items``; also checked on the
    bytes of a large request, ``riskd.service.server.element_limits``)."""
    if count > MAX_ITEMS:
        raise InvalidArgumentError(field, f"more than {MAX_ITEMS} items")


def validate_event(event: OrderEvent, now: float) -> None:
    """A reported outcome needs an order id ``Score`` would take, a kind and a time in
    seconds since the epoch, not before 2000 (``EARLIEST_EVENT_AT``) nor later than
    ``now`` (plus ``MAX_EVENT_SKEW_S`` of clock skew), and a ``detail`` without personal
    data (``riskd.pii.detect``: the event is chained in ``order_events`` for good)."""
    _validate_order_id(event.order_id, "order_id")
    if event.kind is OrderEventKind.UNSPECIFIED:
        raise InvalidArgumentError("kind", "is required")
    if not math.isfinite(event.at) or event.at < 0:
        raise InvalidArgumentError("at", "must be a non-negative epoch time")
    if event.at < EARLIEST_EVENT_AT:
        raise InvalidArgumentError(
            "at", "must be seconds since the epoch, not before 2000 (0 means now)"
        )
    if event.at > now + MAX_EVENT_SKEW_S:
        raise InvalidArgumentError("at", "is in the future")
    if len(event.detail) > 4 * MAX_STRING_CHARS:
        raise InvalidArgumentError("detail", f"longer than {4 * MAX_STRING_CHARS}")
    if "\x00" in event.detail:
        raise InvalidArgumentError("detail", "must not contain NUL characters")
    refuse_pii("detail", event.detail)
