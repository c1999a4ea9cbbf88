"""Reading request bytes before their parse: what holds most of them, and the element limits."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from riskd.errors import InvalidArgumentError
from riskd.service import interceptors, validate, wire
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2
from riskd.service.server import element_limits

BATCH = scoring_pb2.ScoreBatchRequest
MAX_BATCH = 500


def _strings(max_len: int) -> st.SearchStrategy[str]:
    return st.integers(0, max_len).map(lambda n: "x" * n)


@st.composite
def _orders(draw: Any) -> order_pb2.Order:
    order = order_pb2.Order(
        order_id=draw(_strings(40)),
        shop_id=draw(_strings(300)),
        device_id=draw(_strings(300)),
        amounts=order_pb2.Amounts(total=draw(st.integers(0, 10**6))),
    )
    order.buyer.name = draw(_strings(300))
    order.buyer.address.detail = draw(_strings(3000))
    for sku in draw(st.lists(_strings(600), max_size=4)):
        order.items.add(sku=sku, quantity=1)
    return order


@settings(max_examples=300, deadline=None)
@given(orders=st.lists(_orders(), max_size=5), single=st.booleans())
def test_the_largest_field_on_the_wire_is_the_one_named_after_the_parse(
    orders: list[order_pb2.Order], single: bool
) -> None:
    """A request refused for its size unparsed names the field the parsed one did."""
    request: Any = scoring_pb2.ScoreRequest(order=orders[0]) if single and orders else None
    request = request or BATCH(orders=orders)
    data = request.SerializeToString()
    named = wire.largest_field(request.DESCRIPTOR, data, budget=10_000)
    assert named == interceptors._largest_field(request)


def test_the_largest_field_walk_names_what_it_read_when_out_of_budget() -> None:
    data = BATCH(orders=[order_pb2.Order()] * 1000).SerializeToString()
    assert wire.largest_field(BATCH.DESCRIPTOR, data, budget=100) == "orders"
    assert wire.largest_field(BATCH.DESCRIPTOR, data[:-1] + b"\x05", budget=10**6) == ""
    inside = b"\x0a\x34\x62\x64" + b"x" * 50  # orders[0].device_id ends inside its bytes
    assert wire.largest_field(BATCH.DESCRIPTOR, inside, budget=10**6) == ""
    short = b"\x0a\x34\x62\x32" + b"x" * 49  # ... one byte short
    assert wire.largest_field(BATCH.DESCRIPTOR, short, budget=10**6) == ""
    assert wire.largest_field(BATCH.DESCRIPTOR, b"\x02\x00" + data, budget=10**6) == ""  # field 0


def test_a_field_holding_exactly_half_of_its_message_is_not_descended_into() -> None:
    # the unparsed refusal names what the parsed one names (hypothesis rarely hits a tie)
    order = order_pb2.Order(
        order_id="x", buyer=order_pb2.Buyer(address=order_pb2.Address(detail="x"))
    )
    request = scoring_pb2.ScoreRequest(order=order)
    named = wire.largest_field(request.DESCRIPTOR, request.SerializeToString(), budget=100)
    assert named == interceptors._largest_field(request) == "order.buyer"


def _check(data: bytes, descriptor: Any = BATCH.DESCRIPTOR) -> str | None:
    try:
        element_limits(MAX_BATCH).check(descriptor, data)
    except InvalidArgumentError as e:
        return str(e)
    return None


def _full_order(items: int) -> order_pb2.Order:
    order = order_pb2.Order(order_id="o-1", shop_id="s", device_id="d")
    for j in range(items):
        order.items.add(sku=f"sku-{j}", category="c", unit_price=100, quantity=1)
    return order


def test_limits_refuse_with_the_errors_the_servicer_gives_after_the_parse() -> None:
    too_many = BATCH(orders=[order_pb2.Order()] * (MAX_BATCH + 1)).SerializeToString()
    assert _check(too_many) == f"orders: more than {MAX_BATCH} orders in one batch"
    items = BATCH(orders=[_full_order(3)] * 2 + [_full_order(validate.MAX_ITEMS + 1)])
    assert _check(items.SerializeToString()) == (
        f"orders[2].items: more than {validate.MAX_ITEMS} items"
    )
    at_the_limits = [_full_order(validate.MAX_ITEMS)] * MAX_BATCH
    assert _check(BATCH(orders=at_the_limits).SerializeToString()) is None
    with pytest.raises(InvalidArgumentError) as e:
        validate.validate_batch_size(MAX_BATCH + 1, MAX_BATCH)
    assert _check(too_many) == str(e.value)
    # the shortest order over the item limit: 201 empty items in exactly 402 bytes
    tight = BATCH(orders=[order_pb2.Order(items=[order_pb2.Item()] * (validate.MAX_ITEMS + 1))])
    assert _check(tight.SerializeToString()) == (
        f"orders[0].items: more than {validate.MAX_ITEMS} items"
    )


def test_a_singular_order_sent_twice_is_counted_as_the_parse_merges_it() -> None:
    half = scoring_pb2.ScoreRequest(order=_full_order(150)).SerializeToString()
    merged = scoring_pb2.ScoreRequest.FromString(half + half)
    assert len(merged.order.items) == 300  # what the servicer would see
    limit = f"order.items: more than {validate.MAX_ITEMS} items"
    assert _check(half + half, scoring_pb2.ScoreRequest.DESCRIPTOR) == limit
    assert _check(half, scoring_pb2.ScoreRequest.DESCRIPTOR) is None


def test_a_message_with_more_fields_than_a_valid_one_is_refused_where_it_is() -> None:
    """A serializer writes each singular field once: 1,000 order ids in one order are no
    valid order, and reading them all would cost more than refusing them (review)."""
    one_id = order_pb2.Order(order_id="o").SerializeToString()
    order = order_pb2.Order.FromString(one_id * 1000)  # the parse keeps the last one
    assert order.order_id == "o"
    payload = one_id * 1000
    data = BATCH(orders=[order_pb2.Order()]).SerializeToString()
    data += b"\x0a" + _varint(len(payload)) + payload
    assert _check(data) == "orders[1]: holds more than 64 singular fields (no Order does)"
    piece = scoring_pb2.ScoreRequest(order=order_pb2.Order(items=[order_pb2.Item()] * 3))
    piece = piece.SerializeToString()  # 3 empty items: 64 pieces hold 192
    assert len(piece) * 64 > 2 * (validate.MAX_ITEMS + 1)  # long enough to be read
    score = scoring_pb2.ScoreRequest.DESCRIPTOR
    assert _check(piece * 64, score) is None  # an order sent in 64 pieces, merged
    assert _check(piece * 65, score) == (
        "request: holds more than 64 singular fields (no ScoreRequest does)"
    )
    # the pieces of a singular order merge: their singular fields add up too
    ids = order_pb2.Order(order_id="o").SerializeToString() * 40
    pieces = (b"\x0a" + _varint(len(ids)) + ids) * 4
    assert _check(pieces, score) == "order: holds more than 64 singular fields (no Order does)"


def test_a_newer_clients_unknown_fields_are_read_up_to_a_bound() -> None:
    """Fields this riskd does not know (a newer client's), or a known field written with
    another wire type (the parse keeps it as unknown), are no reason to refuse (review);
    past ``OTHER_FIELDS`` in one request they are."""
    tags = b"".join(b"\x82\x01\x03tag" for _ in range(300))  # field 16, repeated string
    as_varint = b"\x78\x00" * 100  # client_time (a double) written as a varint
    order = _full_order(3).SerializeToString() + tags + as_varint
    data = b"".join(b"\x0a" + _varint(len(order)) + order for _ in range(40))
    assert len(BATCH.FromString(data).orders) == 40
    assert _check(data) is None
    over = data + b"\x10\x00" * (wire.OTHER_FIELDS - 16_000 + 1)  # unknown top-level varints
    assert _check(over) == (
        f"request: holds more than {wire.OTHER_FIELDS} unknown or oddly encoded fields"
    )


def test_tags_and_lengths_no_serializer_writes_are_read_off_a_bound() -> None:
    """Review: items with two-byte tags (``aa 00``) or lengths (``80 00``), which upb reads,
    missed the walk's fast path and made it cost ~10x a valid batch's. They count as odd
    fields now; tags or lengths longer than 5 bytes upb refuses, and so does the walk."""
    odd_tag, odd_length = b"\xaa\x00\x00", b"\x2a\x80\x00"
    for item in (odd_tag, odd_length):
        order = item * validate.MAX_ITEMS
        one = b"\x0a" + _varint(len(order)) + order
        assert len(BATCH.FromString(one).orders[0].items) == validate.MAX_ITEMS
        assert _check(one * 101) == (  # 20,200 of them
            f"request: holds more than {wire.OTHER_FIELDS} unknown or oddly encoded fields"
        )
        assert _check(one * 100) is None
    for long in (b"\x8a\x80\x80\x80\x80\x00\x00", b"\x0a\x80\x80\x80\x80\x80\x00"):
        data = long + _BIG_ORDER
        with pytest.raises(DecodeError):
            BATCH.FromString(data)
        with pytest.raises(wire.Broken):
            element_limits(MAX_BATCH).check(BATCH.DESCRIPTOR, data)


def _varint(n: int) -> bytes:
    out = b""
    while n >= 0x80:
        out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
    return out + bytes([n])


_BIG_ORDER = _full_order(validate.MAX_ITEMS).SerializeToString()


@pytest.mark.parametrize(
    "tail",
    [
        b"\x62\x05ab",  # device_id: ends inside its bytes
        b"\x0f",  # wire type 7
        b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
        b"\x5c",  # an end of group with no start
        b"\x5b\x6c",  # a group ended by another's tag
        b"\x02\x00",  # field number 0
        b"\x5b" * 101 + b"\x5c" * 101,  # groups nested deeper than upb reads
        b"\x5b\x08" + b"\xff" * 10 + b"\x01\x5c",  # an 11-byte varint in a group
        b"\x5b\x88\x80\x80\x80\x80\x00\x01\x5c",  # a 6-byte tag in a group
        b"\x5b\x0a\x80\x80\x80\x80\x80\x00\x5c",  # a 6-byte length in a group
    ],
)
def test_bytes_the_parse_refuses_are_broken_before_anything_is_built(tail: bytes) -> None:
    """Review: the walk gave up on them and the parse built 2M items before refusing."""
    order = _BIG_ORDER + tail
    data = b"\x0a" + _varint(len(order)) + order + b"\x0a\x00" * 10
    with pytest.raises(DecodeError):
        BATCH.FromString(data)
    with pytest.raises(wire.Broken):
        element_limits(MAX_BATCH).check(BATCH.DESCRIPTOR, data)


def test_a_run_of_items_ending_inside_its_last_is_broken() -> None:
    """The run of short items read at once stops at the bytes' end, as the parse does."""
    order = b"\x2a\x03\x0a\x01s" * 150 + b"\x2a\x05ab"  # the last item is cut short
    data = b"\x0a" + _varint(len(order)) + order
    with pytest.raises(DecodeError):
        BATCH.FromString(data)
    with pytest.raises(wire.Broken):
        element_limits(MAX_BATCH).check(BATCH.DESCRIPTOR, data)


def test_groups_are_skipped_as_the_parse_skips_them() -> None:
    """Review: an empty group, which the parse takes as an unknown field, hid the rest;
    upb takes field number 0 inside a group (review: the walk called that broken)."""
    group = b"\xfb\x06\x08\x01\x00\x00\xfc\x06"  # field 111: a group of two varints
    order = group + _full_order(validate.MAX_ITEMS + 1).SerializeToString()
    deep = b"\x5b" * 100 + b"\x5c" * 100  # as deep as upb reads them
    data = group + deep + b"\x0a" + _varint(len(order)) + order
    assert len(BATCH.FromString(data).orders[0].items) == validate.MAX_ITEMS + 1
    assert _check(data) == f"orders[0].items: more than {validate.MAX_ITEMS} items"


def test_limits_are_checked_when_built() -> None:
    def refuse(count: int, path: str) -> None:
        raise AssertionError

    with pytest.raises(ValueError, match="full name"):
        wire.ElementLimits({"orders": (1, refuse)}, [BATCH.DESCRIPTOR])
    with pytest.raises(ValueError, match=r"riskd\.v1\.ScoreBatchRequest\.orders"):
        wire.ElementLimits({"riskd.v1.Order.items": (2, refuse)}, [BATCH.DESCRIPTOR])


class _Spy:
    """A deserializer that counts its parses (the interceptor reads its DESCRIPTOR)."""

    DESCRIPTOR = BATCH.DESCRIPTOR

    def __init__(self) -> None:
        self.parses = 0

    def parse(self, data: bytes) -> Any:
        self.parses += 1
        return BATCH.FromString(data)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\x0a\x00" * 200_000, f"orders: more than {MAX_BATCH} orders in one batch"),
        (b"\x0a\x00" * 3_000_000, "orders: the request is 6000000 bytes, more than the limit"),
        (
            BATCH(orders=[order_pb2.Order(shop_id="s" * 5_000_000)]).SerializeToString(),
            "orders[0].shop_id: the request is 5000010 bytes, more than the limit",
        ),
        (
            BATCH(orders=[_full_order(validate.MAX_ITEMS)] * 20).SerializeToString() + b"\x0f",
            "request: is not a valid protobuf message",
        ),
    ],
)
def test_a_large_request_over_a_limit_is_refused_unparsed(data: bytes, error: str) -> None:
    """Review: 16 MiB of empty orders cost an admitted caller seconds of CPU to build."""
    spy = _Spy()
    deserialize = interceptors._lenient(spy.parse, 4 * 1024 * 1024, element_limits(MAX_BATCH))
    assert deserialize is not None
    refused = interceptors.parsed(deserialize(data))
    assert isinstance(refused, interceptors.Refused | interceptors.Undecodable)
    assert str(refused.error()).startswith(error)
    assert not isinstance(refused, interceptors.Refused) or refused.size == len(data)
    assert spy.parses == 0


def test_a_large_valid_request_is_parsed_once() -> None:
    spy = _Spy()
    deserialize = interceptors._lenient(spy.parse, 4 * 1024 * 1024, element_limits(MAX_BATCH))
    assert deserialize is not None
    request = BATCH(orders=[_full_order(validate.MAX_ITEMS)] * 20)
    assert len(request.SerializeToString()) > interceptors.EAGER_PARSE_BYTES
    deferred = deserialize(request.SerializeToString())
    assert spy.parses == 0  # not before admission
    assert interceptors.parsed(deferred) == request
    assert interceptors.parsed(deferred) == request
    assert spy.parses == 1


def _over(count: int, path: str) -> None:
    raise InvalidArgumentError(path, "over")


SMALL = wire.ElementLimits(
    {
        BATCH.DESCRIPTOR.fields_by_name["orders"].full_name: (4, _over),
        order_pb2.Order.DESCRIPTOR.fields_by_name["items"].full_name: (3, _over),
    },
    [BATCH.DESCRIPTOR],
)


@st.composite
def _small_orders(draw: Any) -> bytes:
    """An order of 0-5 items with skus of one- and two-byte lengths, maybe an unknown
    field with a two-byte tag among them."""
    order = order_pb2.Order(order_id=draw(_strings(3)))
    lengths = st.one_of(st.integers(0, 3), st.integers(120, 135))
    for n in draw(st.lists(lengths, max_size=5)):
        order.items.add(sku="s" * n)
    data = order.SerializeToString()
    extras = [
        b"\xaa\x01\x01x",  # field 21, length-delimited, one byte
        b"\x78\x00",  # client_time (a double) as a varint: an unknown field to the parse
        b"\x5b\x08\x01\x5c",  # field 11 as a group holding a varint
        b"\x2a\x00",  # one more (empty) item
    ]
    for extra in draw(st.lists(st.sampled_from(extras), max_size=3)):
        at = draw(st.integers(0, len(data)))
        at = at if _at_a_field(data, at) else len(data)
        data = data[:at] + extra + data[at:]
    return data


def _at_a_field(data: bytes, at: int) -> bool:
    """Whether ``at`` is where a top-level field of ``data`` starts (or its end)."""
    where, left = 0, [10**6]
    while where < at:
        where = wire._whole(data, where, len(data), left)[3]
    return where == at


@settings(max_examples=300, deadline=None)
@given(orders=st.lists(_small_orders(), max_size=6))
def test_limits_on_the_wire_answer_what_the_parsed_request_would(orders: list[bytes]) -> None:
    """The batch's size first, then each order's items in turn: the servicer's order."""
    data = b"".join(b"\x0a" + _varint(len(o)) + o for o in orders)
    parsed = BATCH.FromString(data)
    expected = None
    if len(parsed.orders) > 4:
        expected = "orders: over"
    else:
        over = [i for i, o in enumerate(parsed.orders) if len(o.items) > 3]
        expected = f"orders[{over[0]}].items: over" if over else None
    try:
        SMALL.check(BATCH.DESCRIPTOR, data)
        answer = None
    except InvalidArgumentError as e:
        answer = str(e)
    assert answer == expected
