"""Reading a request's protobuf wire bytes without building the message.

grpcio's parse builds every element of a repeated field, and any admitted caller chooses
how many there are: 4 MiB of empty orders take ~0.5 s of CPU to build (2 s at gRPC's 16 MiB
receive limit), to be refused afterwards for holding more than ``max_batch`` orders or more
than ``max_message_bytes``. The interceptors read a large request's bytes here first
(``riskd.service.interceptors.Deferred``), each walk bounded by a number of fields read:

- ``largest_field``: the path of what holds most of an oversized request
  (``order.buyer.address.detail``), so that it is refused by its size unparsed;
- ``ElementLimits.check``: counts the elements of the repeated fields with a limit
  (``orders``, each order's ``items``) and refuses the request at the first one over it,
  with the error the checks after the parse would have given;
- ``bad_string``: the first string field that is not UTF-8 (``orders[2].order_id``), for
  bytes the parse refused.

A walk runs in Python (~0.5 µs per field read, more than upb's parse per field): it pays
where it stops early. When it runs out of fields to read, or the bytes end inside a
field, it gives no answer and the parse decides, as it did before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from riskd.errors import InvalidArgumentError

LENGTH_DELIMITED = 2
_SKIP = {0: -1, 1: 8, 5: 4}  # the other wire types: -1 a varint, else that many bytes

Refuse = Callable[[int, str], None]
"""Raises for ``count`` elements of the repeated field at ``path`` (``orders[3].items``)."""


class OutOfBudget(Exception):
    """A walk read as many fields as it was allowed without an answer."""


def varint(data: bytes, at: int) -> tuple[int, int]:
    """The varint at ``at`` and the offset after it (IndexError past the end)."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def is_repeated(fd: FieldDescriptor) -> bool:
    # newer protobufs have is_repeated (and no label); older ones only the label
    repeated = getattr(fd, "is_repeated", None)
    if repeated is None:
        repeated = getattr(fd, "label", None) == FieldDescriptor.LABEL_REPEATED
    return bool(repeated)


def _field(data: bytes, at: int, end: int, budget: list[int]) -> tuple[int, int, int, int]:
    """The field at ``at``: (number, wire type, start of its payload, offset after it).
    A length-delimited field's payload is ``data[start:after]``; other types have none
    (start == after). IndexError for bytes that end inside it or a group."""
    budget[0] -= 1
    if budget[0] < 0:
        raise OutOfBudget
    tag, at = varint(data, at)
    wire = tag & 7
    if wire == LENGTH_DELIMITED:
        size, at = varint(data, at)
        after = at + size
    elif wire in _SKIP:
        after = varint(data, at)[1] if _SKIP[wire] < 0 else at + _SKIP[wire]
        at = after
    else:
        raise IndexError("groups are not in riskd's messages")
    if after > end:
        raise IndexError("the bytes end inside a field")
    return tag >> 3, wire, at, after


def bad_string(
    descriptor: Descriptor, data: bytes, path: str = "", *, budget: list[int]
) -> str | None:
    """The path of the first string field in ``data`` that is not UTF-8 (``orders[2].order_id``),
    or None (the bytes are broken some other way). ``budget[0]``: fields left to read."""
    seen: dict[int, int] = {}  # field number → elements of it read so far
    at, end = 0, len(data)
    while at < end:
        number, wire, start, at = _field(data, at, end, budget)
        fd = descriptor.fields_by_number.get(number)
        if fd is None or wire != LENGTH_DELIMITED:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if is_repeated(fd):
            seen[number] = seen.get(number, -1) + 1
            name = f"{name}[{seen[number]}]"
        if fd.type == FieldDescriptor.TYPE_STRING:
            try:
                data[start:at].decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
            found = bad_string(fd.message_type, data[start:at], name, budget=budget)
            if found is not None:
                return found
    return None


class _Seen:
    """One field number's occurrences at one level: their bytes and the largest one."""

    __slots__ = ("after", "count", "index", "largest", "size", "start")

    def __init__(self) -> None:
        self.size = self.count = 0
        self.largest = self.index = self.start = self.after = -1

    def add(self, size: int, start: int, after: int) -> None:
        self.size += size
        if size > self.largest:
            self.largest, self.index, self.start, self.after = size, self.count, start, after
        self.count += 1


def largest_field(descriptor: Descriptor, data: bytes, *, budget: int) -> str:
    """The path to what holds most of ``data``'s bytes, as ``interceptors._largest_field``
    finds it in a parsed message: descend while one field (or one element of a repeated
    one) holds more than half of its message. Where the walk runs out of ``budget``
    fields, the field holding most of what it read, without descending; "" when the
    bytes end inside a field."""
    path, at, end, left = "", 0, len(data), [budget]
    while True:
        seen: dict[int, _Seen] = {}
        total, complete = end - at, True
        try:
            while at < end:
                number, wire, start, at = _field(data, at, end, left)
                if number in descriptor.fields_by_number:
                    size = at - start if wire == LENGTH_DELIMITED else 8
                    seen.setdefault(number, _Seen()).add(size, start, at)
        except OutOfBudget:
            complete = False
        except IndexError:
            return ""
        if not seen:
            return path
        number, best = max(seen.items(), key=lambda kv: kv[1].size)
        fd = descriptor.fields_by_number[number]
        path = f"{path}.{fd.name}" if path else fd.name
        if not complete or 2 * best.size <= total:
            return path
        if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.message_type is None:
            return path
        if is_repeated(fd):
            if 2 * best.largest <= best.size:
                return path
            path = f"{path}[{best.index}]"
        descriptor, at, end = fd.message_type, best.start, best.after


class _Limited(NamedTuple):
    """A field a limit walk reads: its name, its limit (if any) and its message's plan."""

    name: str
    repeated: bool
    most: int | None
    refuse: Refuse | None
    plan: _Plan | None


class _Plan(NamedTuple):
    """What a limit walk reads of one message type: the fields that hold or lead to a
    limited one; the fewest bytes in which it can be over a limit (a shorter message is
    skipped: each element takes at least two bytes, its tag and its length); the most
    fields a walk reads of a valid one."""

    name: str
    fields: dict[int, _Limited]
    over_in: int
    most_fields: int


OTHER_FIELDS = 64
"""Fields a walked message may hold besides its limited ones (an ``Order`` has 17 numbers;
a serializer writes each singular field once)."""


class ElementLimits:
    """The most elements some repeated fields may hold, checked on the wire before the parse.

    ``limits`` maps a field's full name (``riskd.v1.ScoreBatchRequest.orders``) to its most
    elements and the check that refuses more (it raises). A walk reads only the fields on
    the way to a limited one, and none of a message too short to be over a limit (a
    checkout order of ~300 bytes cannot hold 201 items). It reads no more of a message
    than a valid one can hold (its limits, and ``OTHER_FIELDS``): one that holds more is
    refused there, unread further."""

    def __init__(self, limits: Mapping[str, tuple[int, Refuse]]) -> None:
        for name in limits:
            if not name.count("."):
                raise ValueError(f"{name!r} is not a field's full name")
        self._limits = dict(limits)
        self._plans: dict[str, _Plan | None] = {}

    def check(self, descriptor: Descriptor, data: bytes) -> None:
        """Raise the limit's error for the first field in ``data`` over its limit, or
        ``InvalidArgumentError`` for a message with more fields than a valid one holds
        (``orders[3]``); return when neither, or when the bytes end inside a field (the
        parse says so)."""
        plan = self._plan(descriptor)
        if plan is None or len(data) < plan.over_in:
            return
        try:
            _count(plan, data, 0, len(data), "", {})
        except IndexError:
            return

    def _plan(self, descriptor: Descriptor) -> _Plan | None:
        """What to read of ``descriptor`` (None: nothing leads to a limited field)."""
        name = descriptor.full_name
        if name not in self._plans:
            self._plans[name] = None  # a message that holds itself leads nowhere new
            fields: dict[int, _Limited] = {}
            over_in, most_fields = [], OTHER_FIELDS
            for fd in descriptor.fields:
                most, refuse = self._limits.get(fd.full_name, (None, None))
                inner = None
                if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
                    inner = self._plan(fd.message_type)
                if most is None and inner is None:
                    continue
                repeated = is_repeated(fd)
                if repeated and most is None:
                    raise ValueError(f"{fd.full_name} leads to a limit but has none of its own")
                fields[fd.number] = _Limited(fd.name, repeated, most, refuse, inner)
                over_in += [2 * (most + 1)] if most is not None else []
                over_in += [inner.over_in] if inner is not None else []
                inner_fields = inner.most_fields if inner is not None else 0
                most_fields += (most if repeated and most is not None else 1) * (1 + inner_fields)
            self._plans[name] = (
                _Plan(descriptor.name, fields, min(over_in), most_fields) if fields else None
            )
        return self._plans[name]


def _count(plan: _Plan, data: bytes, at: int, end: int, path: str, counts: dict[int, Any]) -> None:
    """Count the limited fields of the message in ``data[at:end]``, then of the messages in
    it, as the servicer checks them once parsed: a batch's orders, then each order's items
    in turn. ``path``: the message's own, with a trailing dot. ``counts``: field number →
    elements read, and -number → the counts of a singular message field, shared by its
    occurrences (the parse merges a singular message sent twice: its counts add up).
    The hot loop of a large batch, so one- and two-byte tags and lengths are read inline,
    and a run of short elements (items) at once."""
    fields, left = plan.fields, plan.most_fields
    inside: list[tuple[_Plan, int, int, str, dict[int, Any]]] = []
    while at < end:
        left -= 1
        if left < 0:
            message = f"holds more than the {plan.most_fields} fields a valid {plan.name} can"
            raise InvalidArgumentError(path[:-1] or "request", message)
        tag = data[at]
        if tag >= 0x80 or tag & 7 != LENGTH_DELIMITED or at + 3 > end:
            number, wire, start, at = _field(data, at, end, [1])
            tag = -1  # no run of it is read at once
            if wire != LENGTH_DELIMITED:
                continue
        else:
            number, size = tag >> 3, data[at + 1]
            if size < 0x80:
                start = at + 2
            elif data[at + 2] < 0x80:
                size, start = (size & 0x7F) | data[at + 2] << 7, at + 3
            else:
                size, start = varint(data, at + 1)
            at = start + size
            if at > end:
                raise IndexError("the bytes end inside a field")
        field = fields.get(number)
        if field is None:
            continue
        name, repeated, most, refuse, inner = field
        if repeated:
            count = counts.get(number, 0) + 1
            if inner is None and most is not None:  # the short elements after it, at once
                while count <= most and left > 0 and at + 1 < end and data[at] == tag:
                    if data[at + 1] >= 0x80:
                        break
                    at, count, left = at + 2 + data[at + 1], count + 1, left - 1
                if at > end:
                    raise IndexError("the bytes end inside a field")
            counts[number] = count
            if most is not None and count > most and refuse is not None:
                refuse(count, path + name)
            if inner is not None and at - start >= inner.over_in:
                inside.append((inner, start, at, f"{path}{name}[{count - 1}].", {}))
        elif inner is not None:  # merged with its earlier occurrences: counted once
            inside.append((inner, start, at, f"{path}{name}.", counts.setdefault(-number, {})))
    for inner, start, after, inner_path, inner_counts in inside:
        _count(inner, data, start, after, inner_path, inner_counts)
