"""Reading a request's protobuf wire bytes without building the message.

grpcio's parse builds every element of a repeated field, and any admitted caller chooses
how many there are: 4 MiB of empty orders take ~0.35 s of CPU to build (~2 s at gRPC's
16 MiB receive limit), to be refused afterwards for holding more than ``max_batch`` orders
or more than ``max_message_bytes``. The interceptors read a large request's bytes here
first (``riskd.service.interceptors.Deferred``):

- ``largest_field``: the path of what holds most of an oversized request
  (``order.buyer.address.detail``), so that it is refused by its size unparsed;
- ``ElementLimits.check``: counts the elements of the repeated fields with a limit
  (``orders``, each order's ``items``) and refuses the request at the first one over it,
  with the error the servicer gives once it is parsed (a request refused for several
  reasons may be named by another of them than the servicer would name: an order's
  unknown ``channel`` before a later order's 201 items); bytes protobuf would refuse
  are ``Broken``, so the parse does not build what comes before the break;
- ``bad_string``: the first string field that is not UTF-8 (``orders[2].order_id``), for
  bytes the parse refused.

A walk runs in Python (~0.3–2.5 µs per field read, more than upb's parse per field), so
each reads a bounded number of fields: the limit walk no more than a valid request can
hold (what a newer client adds included, up to ``OTHER_FIELDS``); the others a budget,
past which they answer with what they read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from riskd.errors import InvalidArgumentError

LENGTH_DELIMITED = 2
_SKIP = {0: -1, 1: 8, 5: 4}  # varints (-1) and fixed widths: their bytes
_START_GROUP, _END_GROUP = 3, 4
MAX_GROUP_DEPTH = 100
"""upb refuses groups nested deeper than this (in the message at the top: fewer below)."""

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


def _next(data: bytes, at: int, end: int, budget: list[int]) -> tuple[int, int, int, int]:
    """The tag at ``at`` and what follows it: (number, wire type, start of its payload,
    offset after it). A length-delimited field's payload is ``data[start:after]``; other
    types have none (start == after), a group's start or end tag is returned alone.
    IndexError for bytes protobuf refuses too (they end inside a field, wire type 6 or 7,
    a tag or a length longer than 5 bytes). Field number 0 is the caller's to refuse: in
    a group upb takes it."""
    budget[0] -= 1
    if budget[0] < 0:
        raise OutOfBudget
    tag, after = varint(data, at)
    if after - at > 5:
        raise IndexError("a tag longer than 5 bytes")
    number, wire, at = tag >> 3, tag & 7, after
    if wire == LENGTH_DELIMITED:
        size, at = varint(data, after)
        if at - after > 5:
            raise IndexError("a length longer than 5 bytes")
        after = at + size
    elif wire in _SKIP:
        after = varint(data, at)[1] if _SKIP[wire] < 0 else at + _SKIP[wire]
        at = after
    elif wire in (_START_GROUP, _END_GROUP):
        return number, wire, at, at
    else:
        raise IndexError(f"wire type {wire}")
    if after > end:
        raise IndexError("the bytes end inside a field")
    return number, wire, at, after


def _skip_group(data: bytes, at: int, end: int, number: int, budget: list[int]) -> int:
    """The offset after the group ``number`` whose fields start at ``at`` (groups in it
    included, at most ``MAX_GROUP_DEPTH`` deep, as upb reads them)."""
    open_groups = [number]
    while open_groups:
        inner, wire, _, at = _next(data, at, end, budget)
        if wire == _START_GROUP:
            open_groups.append(inner)
            if len(open_groups) > MAX_GROUP_DEPTH:
                raise IndexError("groups nested too deep")
        elif wire == _END_GROUP and open_groups.pop() != inner:
            raise IndexError("a group ends with another's tag")
    return at


def _whole(data: bytes, at: int, end: int, budget: list[int]) -> tuple[int, int, int, int]:
    """``_next`` for a field of a message: a group is skipped whole (each field in it read
    off ``budget``); an end of group (no group is open here) and field number 0 are
    IndexError."""
    number, wire, start, after = _next(data, at, end, budget)
    if wire == _START_GROUP:
        after = _skip_group(data, after, end, number, budget)
    elif wire == _END_GROUP:
        raise IndexError("an end of group with no start")
    if number == 0:
        raise IndexError("field number 0")
    return number, wire, start, after


def bad_string(
    descriptor: Descriptor, data: bytes, path: str = "", *, budget: list[int]
) -> str | None:
    """The path of the first string field in ``data`` that is not UTF-8 (``orders[2].order_id``),
    or None (the bytes are broken some other way). ``budget[0]``: fields left to read."""
    seen: dict[int, int] = {}  # field number → elements of it read so far
    at, end = 0, len(data)
    while at < end:
        number, wire, start, at = _whole(data, at, end, budget)
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
                number, wire, start, at = _whole(data, at, end, left)
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
    limited one; its other singular fields (a serializer writes each once); the fewest
    bytes in which it can be over a limit (a shorter message is skipped: each element
    takes at least two bytes, its tag and its length)."""

    name: str
    fields: dict[int, _Limited]
    singular: dict[int, int]  # field number → its wire type
    over_in: int


SINGULAR_FIELDS = 64
"""The most singular fields a walked message may hold besides its limited ones (an
``Order`` declares 14; a serializer writes each once, a merge of pieces a few times)."""

OTHER_FIELDS = 20_000
"""The most fields of any other kind a walk reads in one request: unknown ones (a newer
client's), repeated ones with no limit, and any whose tag or length is not minimally
encoded (no serializer writes one; upb reads them all) (~10–40 ms)."""


class Broken(Exception):
    """Bytes protobuf refuses to parse too (the walk came upon where)."""


class ElementLimits:
    """The most elements some repeated fields may hold, checked on the wire before the parse.

    ``limits`` maps a field's full name (``riskd.v1.ScoreBatchRequest.orders``) to its most
    elements and the check that refuses more (it raises); ``requests`` are the messages
    checked. A walk reads only the fields on the way to a limited one, and none of a
    message too short to be over a limit (a checkout order of ~300 bytes cannot hold 201
    items). It reads no more than a valid request can hold: a message with more than
    ``SINGULAR_FIELDS`` singular fields, or a request with more than ``OTHER_FIELDS``
    others, is refused where the walk is, unread further."""

    def __init__(
        self, limits: Mapping[str, tuple[int, Refuse]], requests: Sequence[Descriptor]
    ) -> None:
        for name in limits:
            if not name.count("."):
                raise ValueError(f"{name!r} is not a field's full name")
        self._limits = dict(limits)
        built: dict[str, _Plan | None] = {}
        for descriptor in requests:
            self._build(descriptor, built)
        # built once, before any request: read by every RPC thread, never written
        self._plans = {name: plan for name, plan in built.items() if plan is not None}

    def check(self, descriptor: Descriptor, data: bytes) -> None:
        """Raise the limit's error for the first field in ``data`` over its limit (the
        servicer's order: a batch's orders, then each order's items in turn), or
        ``InvalidArgumentError`` for more fields than a valid request holds; ``Broken``
        for bytes protobuf refuses too; return when none of these."""
        plan = self._plans.get(descriptor.full_name)
        if plan is None or len(data) < plan.over_in:
            return
        try:
            _count(plan, data, 0, len(data), "", {}, [OTHER_FIELDS])
        except IndexError as e:
            raise Broken(str(e)) from None
        except OutOfBudget:
            message = f"holds more than {OTHER_FIELDS} unknown or oddly encoded fields"
            raise InvalidArgumentError("request", message) from None

    def _build(self, descriptor: Descriptor, built: dict[str, _Plan | None]) -> _Plan | None:
        """What to read of ``descriptor`` (None: nothing leads to a limited field)."""
        name = descriptor.full_name
        if name in built:
            return built[name]
        built[name] = None  # a message that holds itself leads nowhere new
        fields: dict[int, _Limited] = {}
        over_in = []
        for fd in descriptor.fields:
            most, refuse = self._limits.get(fd.full_name, (None, None))
            inner = None
            if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type is not None:
                inner = self._build(fd.message_type, built)
            if most is None and inner is None:
                continue
            repeated = is_repeated(fd)
            if repeated and most is None:
                raise ValueError(f"{fd.full_name} leads to a limit but has none of its own")
            fields[fd.number] = _Limited(fd.name, repeated, most, refuse, inner)
            over_in += [2 * (most + 1)] if most is not None else []
            over_in += [inner.over_in] if inner is not None else []
        if fields:
            singular = {
                fd.number: _wire_type(fd) for fd in descriptor.fields if not is_repeated(fd)
            }
            built[name] = _Plan(descriptor.name, fields, singular, min(over_in))
        return built[name]


_FIXED64 = {
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_FIXED32 = {FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
_DELIMITED = {FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE}


def _wire_type(fd: FieldDescriptor) -> int:
    """The wire type a singular field of ``fd``'s type is written with."""
    if fd.type in _DELIMITED:
        return LENGTH_DELIMITED
    if fd.type in _FIXED64:
        return 1
    if fd.type in _FIXED32:
        return 5
    return _START_GROUP if fd.type == FieldDescriptor.TYPE_GROUP else 0


def _count(
    plan: _Plan,
    data: bytes,
    at: int,
    end: int,
    path: str,
    counts: dict[int, Any],
    others: list[int],
) -> None:
    """Count the limited fields of the message in ``data[at:end]``, then of the messages in
    it. ``path``: the message's own, with a trailing dot. ``counts``: field number →
    elements read, 0 → singular fields read, and -number → the counts of a singular
    message field, shared by its occurrences (the parse merges a singular message sent
    twice: its counts add up). ``others[0]``: the request's other fields left to read.
    The hot loop of a large batch: one-byte tags and lengths, and varints, are read
    inline, and a run of short elements (items) at once."""
    fields, singular, most_singular = plan.fields, plan.singular, SINGULAR_FIELDS
    seen_singular = counts.get(0, 0)
    inside: list[tuple[_Plan, int, int, str, dict[int, Any]]] = []
    while at < end:
        first = at
        tag = data[at]
        if tag < 0x80:
            at += 1
        else:  # a field number over 15; none of riskd's, unless its tag is not minimal
            tag, at = varint(data, at)
            if at - first > 5:
                raise IndexError("a tag longer than 5 bytes")
            if data[at - 1] == 0:  # no serializer writes it: read off the others' budget
                others[0] -= 1
        number, wire = tag >> 3, tag & 7
        if wire == LENGTH_DELIMITED:
            size = data[at]
            if size < 0x80:
                start = at + 1
            else:
                size, start = varint(data, at)
                if start - at > 5:
                    raise IndexError("a length longer than 5 bytes")
                if data[start - 1] == 0:  # not minimal, as above
                    others[0] -= 1
            at = start + size
        elif wire == 0:
            start = at
            while data[at] >= 0x80:
                at += 1
                if at - start >= 10:
                    raise IndexError("varint too long")
            at = start = at + 1
        elif wire == 1 or wire == 5:
            at = start = at + (8 if wire == 1 else 4)
        else:  # a group (read in full), an end of group, wire type 6 or 7
            number, wire, start, at = _whole(data, first, end, others)
            others[0] += 1  # the field itself is counted below; a group's inside here
        if number == 0:
            raise IndexError("field number 0")
        if tag >= 0x80:
            tag = -1  # no run of it is read at once: its tag takes more than one byte
        if others[0] < 0:
            raise OutOfBudget
        if at > end:
            raise IndexError("the bytes end inside a field")
        field = fields.get(number) if wire == LENGTH_DELIMITED else None
        if field is None or (field.plan is not None and not field.repeated):
            if singular.get(number) == wire:  # else the parse keeps it as an unknown field
                seen_singular += 1
                if seen_singular > most_singular:
                    message = (
                        f"holds more than {most_singular} singular fields (no {plan.name} does)"
                    )
                    raise InvalidArgumentError(path[:-1] or "request", message)
            else:
                others[0] -= 1
                if others[0] < 0:
                    raise OutOfBudget
            if field is not None and field.plan is not None:  # merged: counted once
                merged = counts.setdefault(-number, {})
                inside.append((field.plan, start, at, f"{path}{field.name}.", merged))
            continue
        name, _, most, refuse, inner = field
        count = counts.get(number, 0) + 1
        if inner is None and most is not None:  # the short elements after it, at once
            while count <= most and at + 1 < end and data[at] == tag:
                if data[at + 1] >= 0x80:
                    break
                at, count = at + 2 + data[at + 1], count + 1
            if at > end:
                raise IndexError("the bytes end inside a field")
        counts[number] = count
        if most is not None and count > most and refuse is not None:
            refuse(count, path + name)
        if inner is not None and at - start >= inner.over_in:
            inside.append((inner, start, at, f"{path}{name}[{count - 1}].", {}))
    counts[0] = seen_singular
    for inner_plan, start, after, inner_path, inner_counts in inside:
        _count(inner_plan, data, start, after, inner_path, inner_counts, others)
