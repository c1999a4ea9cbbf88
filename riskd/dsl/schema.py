"""What a rule's ``when`` expression can see: the scoring request's schema.

Variables: ``order`` (``riskd.domain.order.Order``), ``shop``
(``riskd.domain.shop.ShopState``), ``now`` (timestamp of the scoring), the
enum namespaces ``Channel`` and ``PaymentMethod`` (so a rule writes
``order.channel == Channel.LIVE_ROOM`` rather than a bare number), and every
named list of the rule files. The object types are derived from the domain
dataclasses with ``schema_of``, so a field the request does not carry is a
compile error, not a silent false.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from types import MappingProxyType

from riskd.domain.order import Channel, Order, PaymentMethod
from riskd.domain.shop import ShopState
from riskd.dsl.expr import Env
from riskd.dsl.types import (
    DOUBLE,
    INT,
    STRING,
    TIMESTAMP,
    ListType,
    ObjectType,
    Type,
    schema_of,
)

ORDER_TYPE: ObjectType = schema_of(Order)
SHOP_TYPE: ObjectType = schema_of(ShopState)


def _namespace(enum_type: type[enum.IntEnum]) -> object:
    """A frozen dataclass instance whose fields are the enum's members (as ints)."""
    names = [m.name for m in enum_type if m.name != "UNSPECIFIED"]
    cls = dataclasses.make_dataclass(
        enum_type.__name__, [(n, int) for n in names], frozen=True, slots=True
    )
    return cls(**{n: int(enum_type[n]) for n in names})


# Constant variables: name -> run-time value (and, below, their types).
CONSTANTS: Mapping[str, object] = MappingProxyType(
    {"Channel": _namespace(Channel), "PaymentMethod": _namespace(PaymentMethod)}
)
_CONSTANT_TYPES: dict[str, Type] = {k: schema_of(type(v)) for k, v in CONSTANTS.items()}

REQUEST_VARIABLES: Mapping[str, Type] = MappingProxyType(
    {"order": ORDER_TYPE, "shop": SHOP_TYPE, "now": TIMESTAMP, **_CONSTANT_TYPES}
)
RESERVED: frozenset[str] = frozenset(REQUEST_VARIABLES)


def list_type(values: tuple[object, ...]) -> ListType | None:
    """The CEL type of a named list's values; None when they mix kinds.

    >>> str(list_type(("a", "b"))), str(list_type((1, 2.5))), list_type(("a", 1))
    ('list(string)', 'list(double)', None)
    """
    kinds = {_kind(v) for v in values}
    if not kinds:
        return ListType(STRING)
    if kinds == {"string"}:
        return ListType(STRING)
    if kinds == {"int"}:
        return ListType(INT)
    if kinds <= {"int", "double"}:
        return ListType(DOUBLE)
    return None


def _kind(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "other"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    return "other"


def rule_env(lists: Mapping[str, Type]) -> Env:
    """The environment every ``when`` expression is checked against."""
    return Env({**REQUEST_VARIABLES, **lists})
