"""Input validation: each bad order names its field; valid orders pass."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import pytest

from riskd.domain.events import OrderEvent, OrderEventKind
from riskd.domain.order import MAX_ORDER_ID_LEN, Amounts, Item, Order
from riskd.errors import InvalidArgumentError
from riskd.service import validate
from tests.service.sample import full_order

NOW = 1_790_000_000.0


def with_amounts(order: Order, **changes: int) -> Order:
    return dataclasses.replace(order, amounts=dataclasses.replace(order.amounts, **changes))


def with_buyer(order: Order, **changes: object) -> Order:
    return dataclasses.replace(order, buyer=dataclasses.replace(order.buyer, **changes))


BAD = {
    "order.order_id": lambda o: dataclasses.replace(o, order_id=""),
    "order.buyer.buyer_id": lambda o: with_buyer(o, buyer_id=" "),
    "order.amounts.total": lambda o: with_amounts(o, total=o.amounts.total + 1),
    "order.amounts.items": lambda o: with_amounts(o, items=o.amounts.items + 1),
    "order.amounts.discount": lambda o: with_amounts(o, discount=-1),
    "order.items[1].unit_price": lambda o: dataclasses.replace(
        o, items=(o.items[0], Item("s", "c", -5, 1))
    ),
    "order.items[0].quantity": lambda o: dataclasses.replace(
        o, items=(Item("s", "c", 5, 0),), amounts=Amounts(items=0, total=0)
    ),
    "order.items": lambda o: dataclasses.replace(
        o,
        items=(Item("s", "c", 1, 1),) * (validate.MAX_ITEMS + 1),
        amounts=Amounts(items=validate.MAX_ITEMS + 1, total=validate.MAX_ITEMS + 1),
    ),
    "order.buyer.address.detail": lambda o: with_buyer(
        o, address=dataclasses.replace(o.buyer.address, detail="x" * 10_000)
    ),
    "order.buyer.phone": lambda o: with_buyer(o, phone="1" * 1000),
    "order.device_id": lambda o: dataclasses.replace(o, device_id="d" * 257),
    "order.buyer.account_age_days": lambda o: with_buyer(o, account_age_days=-1),
    "order.client_time": lambda o: dataclasses.replace(o, client_time=float("nan")),
}


@pytest.mark.parametrize("field", list(BAD))
def test_bad_order_names_the_field(field: str) -> None:
    order = BAD[field](full_order())
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_order(order)
    assert e.value.field == field


def test_error_message_never_echoes_pii() -> None:
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_order(with_buyer(full_order(), phone="13812345678" * 30))
    assert "13812345678" not in str(e.value)


def test_valid_order_passes() -> None:
    validate.validate_order(full_order())


def test_batch_too_large_or_empty() -> None:
    with pytest.raises(InvalidArgumentError, match="more than 3"):
        validate.validate_batch([full_order()] * 4, 3)
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_batch([], 3)
    assert e.value.field == "orders"


@pytest.mark.parametrize(
    ("order_id", "message"),
    [
        ("   ", "is required"),
        ("o" * 129, "longer than 128"),
        ("o-1\n", "control characters"),
        ("o\x00", "control characters"),
    ],
)
def test_order_ids_the_store_would_refuse_are_refused_here(order_id: str, message: str) -> None:
    # checked before scoring, so no order of a batch is scored when one of them is bad
    orders = [full_order(), dataclasses.replace(full_order(), order_id=order_id)]
    with pytest.raises(InvalidArgumentError, match=message) as e:
        validate.validate_batch(orders, 10)
    assert e.value.field == "orders[1].order_id"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda o: with_buyer(o, buyer_id="b-\x00x"), "order.buyer.buyer_id"),
        (lambda o: with_buyer(o, name="张\x00三"), "order.buyer.name"),
        (lambda o: dataclasses.replace(o, shop_id="s-1\n"), "order.shop_id"),
        (lambda o: dataclasses.replace(o, device_id="d\x1b[0m"), "order.device_id"),
        (
            lambda o: dataclasses.replace(
                o, items=(Item("sku\x00", "c", 5, 1),), amounts=Amounts(items=5, total=5)
            ),
            "order.items[0].sku",
        ),
    ],
)
def test_nul_anywhere_and_control_characters_in_identifiers_are_refused(
    change: Callable[[Order], Order], field: str
) -> None:
    # PostgreSQL's text refuses NUL: such an order would stop the decision log's writer
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_order(change(full_order()))
    assert e.value.field == field


def test_free_text_may_span_lines() -> None:
    address = dataclasses.replace(full_order().buyer.address, detail="3588号\n2单元 1201")
    validate.validate_order(with_buyer(full_order(), address=address))


def test_full_width_spaces_in_an_identifier_field_pass() -> None:
    """A phone typed with an IME: full-width digits and ideographic spaces (U+3000), which
    the blind index normalizes; review: refused as "control characters"."""
    validate.validate_order(with_buyer(full_order(), phone="１３８\u3000１２３４\u3000５６７８"))
    with pytest.raises(InvalidArgumentError) as e:  # a line break is still refused
        validate.validate_order(with_buyer(full_order(), phone="138\u20281234"))
    assert e.value.field == "order.buyer.phone"


def test_batch_names_the_bad_order() -> None:
    bad = dataclasses.replace(full_order(), order_id="")
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_batch([full_order(), bad], 10)
    assert e.value.field == "orders[1].order_id"


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (OrderEvent("", OrderEventKind.PAID, 1.0), "order_id"),
        (OrderEvent("  ", OrderEventKind.PAID, 1.0), "order_id"),
        (OrderEvent("o" * 129, OrderEventKind.PAID, 1.0), "order_id"),
        (OrderEvent("o\n", OrderEventKind.PAID, 1.0), "order_id"),
        (OrderEvent("o", OrderEventKind.UNSPECIFIED, 1.0), "kind"),
        (OrderEvent("o", OrderEventKind.PAID, -1.0), "at"),
        (OrderEvent("o", OrderEventKind.PAID, 1e300), "at"),
        (OrderEvent("o", OrderEventKind.PAID, NOW + 2 * 3600), "at"),
        (OrderEvent("o", OrderEventKind.PAID, 5.0), "at"),  # 1970: a unit mix-up
        (OrderEvent("o", OrderEventKind.PAID, 946_684_799.0), "at"),
        (OrderEvent("o", OrderEventKind.PAID, NOW, "bank\x00"), "detail"),
        (OrderEvent("o", OrderEventKind.PAID, float("nan")), "at"),  # no order of events
        (OrderEvent("o", OrderEventKind.PAID, NOW, "x" * 1025), "detail"),  # kept for good
    ],
)
def test_bad_event_names_the_field(event: OrderEvent, field: str) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_event(event, NOW)
    assert e.value.field == field


def test_event_within_clock_skew_passes() -> None:
    validate.validate_event(OrderEvent("o", OrderEventKind.PAID, NOW + 60), NOW)
    validate.validate_event(OrderEvent("o", OrderEventKind.PAID, NOW + 3600), NOW)  # the skew
    validate.validate_event(OrderEvent("o", OrderEventKind.PAID, 946_684_800.0), NOW)
    validate.validate_event(OrderEvent("o", OrderEventKind.PAID, NOW, "x" * 1024), NOW)


def _string_paths(cls: type, prefix: str = "") -> list[str]:
    """Every str field below ``cls``, by its path (an item's as the second item's)."""
    hints, paths = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind is str:
            paths.append(prefix + f.name)
        elif dataclasses.is_dataclass(kind):
            paths += _string_paths(kind, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        elif typing.get_origin(kind) is tuple:
            paths += _string_paths(typing.get_args(kind)[0], f"{prefix}{f.name}[1].")
    return paths


STRINGS = _string_paths(Order)
FREE_TEXT = {
    "buyer.name",
    *(f"buyer.address.{f}" for f in ("province", "city", "district", "detail")),
}


def with_string(value: Any, path: str, text: str) -> Any:
    head, _, rest = path.partition(".")
    if head == "items[1]":
        items = list(value.items)
        items[1] = with_string(items[1], rest, text)
        return dataclasses.replace(value, items=tuple(items))
    inner = with_string(getattr(value, head), rest, text) if rest else text
    return dataclasses.replace(value, **{head: inner})


@pytest.mark.parametrize("path", STRINGS)
def test_every_string_of_an_order_is_bounded_and_holds_no_nul(path: str) -> None:
    """Review: only some fields were tested; a NUL in any stops the decision log's writer."""
    assert len(STRINGS) == 19 and set(STRINGS) >= FREE_TEXT
    most = MAX_ORDER_ID_LEN if path == "order_id" else validate.MAX_STRING_CHARS
    validate.validate_order(with_string(full_order(), path, "x" * most))
    bad = ["x" * (most + 1), "a\x00b"] + ([] if path in FREE_TEXT else ["a\x1bb"])
    for text in bad:
        with pytest.raises(InvalidArgumentError) as e:
            validate.validate_order(with_string(full_order(), path, text))
        assert e.value.field == f"order.{path}"


def test_an_order_at_every_limit_passes() -> None:
    most = 10**12  # the bound callers read in the error ("must be 0..10^12 fen")
    items = (Item("s", "c", most, 1),) + (Item("s", "c", 0, 1_000_000),) * (validate.MAX_ITEMS - 1)
    amounts = Amounts(items=most, discount=most, coupon=0, shipping=most, total=most)
    order = dataclasses.replace(
        with_buyer(full_order("o" * MAX_ORDER_ID_LEN), account_age_days=0),  # signed up today
        items=items,
        amounts=amounts,
        client_time=0.0,
    )
    validate.validate_order(order)
    validate.validate_batch([order] * 3, 3)


def _cart(price: int, quantity: int) -> Callable[[Order], Order]:
    def change(order: Order) -> Order:
        total = price * quantity
        amounts = Amounts(items=total, total=total)
        return dataclasses.replace(order, items=(Item("s", "c", price, quantity),), amounts=amounts)

    return change


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_cart(10**12 + 1, 1), "order.items[0].unit_price"),
        (_cart(0, 1_000_001), "order.items[0].quantity"),
        (_cart(validate.MAX_AMOUNT_FEN, 2), "order.amounts.items"),
        (
            lambda o: with_amounts(o, shipping=-1, total=o.amounts.total - 801),
            "order.amounts.shipping",
        ),
        (lambda o: with_amounts(o, discount=5000, total=-202), "order.amounts.total"),
        (lambda o: dataclasses.replace(o, client_time=-1.0), "order.client_time"),
        (lambda o: dataclasses.replace(o, client_time=float("inf")), "order.client_time"),
    ],
)
def test_amounts_and_quantities_out_of_range_name_the_field_even_when_they_add_up(
    change: Callable[[Order], Order], field: str
) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_order(change(full_order()))
    assert e.value.field == field
