"""CEL types as the checker sees them, and the request schema derived from dataclasses.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Item:
...     sku: str
...     quantity: int
>>> schema_of(Item).field("quantity")
PrimitiveType(name='int')
"""

from __future__ import annotations

import dataclasses
import enum
import re
import types as _pytypes
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class PrimitiveType:
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class ListType:
    elem: Type

    def __str__(self) -> str:
        return f"list({self.elem})"


@dataclass(frozen=True, slots=True)
class MapType:
    key: Type
    value: Type

    def __str__(self) -> str:
        return f"map({self.key}, {self.value})"


@dataclass(frozen=True, slots=True)
class ObjectType:
    """A message-like type with named fields (derived from a frozen dataclass)."""

    name: str
    fields: tuple[tuple[str, Type], ...] = field(default=(), compare=False, repr=False)
    zero: tuple[tuple[str, object], ...] = field(default=(), compare=False, repr=False)

    def field(self, name: str) -> Type | None:
        for fname, ftype in self.fields:
            if fname == name:
                return ftype
        return None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class TypeType:
    """The type of type values such as ``int`` or ``type(x)``."""

    def __str__(self) -> str:
        return "type"


@dataclass(frozen=True, slots=True)
class TypeParam:
    """A type variable in a function signature (``A`` in ``size(list(A))``)."""

    name: str

    def __str__(self) -> str:
        return self.name


Type = PrimitiveType | ListType | MapType | ObjectType | TypeType | TypeParam

INT = PrimitiveType("int")
UINT = PrimitiveType("uint")
DOUBLE = PrimitiveType("double")
STRING = PrimitiveType("string")
BOOL = PrimitiveType("bool")
BYTES = PrimitiveType("bytes")
NULL = PrimitiveType("null_type")
DYN = PrimitiveType("dyn")
DURATION = PrimitiveType("google.protobuf.Duration")
TIMESTAMP = PrimitiveType("google.protobuf.Timestamp")
TYPE = TypeType()

NAMED: dict[str, Type] = {
    "int": INT, "uint": UINT, "double": DOUBLE, "string": STRING, "bool": BOOL,
    "bytes": BYTES, "null_type": NULL, "dyn": DYN, "duration": DURATION,
    "timestamp": TIMESTAMP, "google.protobuf.Duration": DURATION,
    "google.protobuf.Timestamp": TIMESTAMP, "type": TYPE,
}  # fmt: skip


def parse_type(text: str) -> Type:
    """Parse a type name such as ``int`` or ``map(string, list(int))``."""
    text = text.strip()
    m = re.fullmatch(r"(list|map)\((.*)\)", text)
    if m is None:
        if text not in NAMED:
            raise ValueError(f"unknown type {text!r}")
        return NAMED[text]
    args = _split_args(m.group(2))
    if m.group(1) == "list" and len(args) == 1:
        return ListType(parse_type(args[0]))
    if m.group(1) == "map" and len(args) == 2:
        return MapType(parse_type(args[0]), parse_type(args[1]))
    raise ValueError(f"bad type {text!r}")


def _split_args(text: str) -> list[str]:
    parts, level, cur = [], 0, ""
    for ch in text:
        if ch == "," and level == 0:
            parts.append(cur)
            cur = ""
            continue
        level += (ch == "(") - (ch == ")")
        cur += ch
    parts.append(cur)
    return parts


def schema_of(cls: type) -> ObjectType:
    """Derive an ``ObjectType`` from a frozen dataclass's type hints.

    str→string, int→int, float→double, bool→bool, IntEnum→int,
    tuple[X, ...]→list(X), nested dataclass→object, Mapping[K, V]→map(K, V).
    """
    return _schema(cls, {})


def _schema(cls: type, seen: dict[type, ObjectType]) -> ObjectType:
    if cls in seen:
        return seen[cls]
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Type]] = []
    zero: list[tuple[str, object]] = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        fields.append((f.name, _from_hint(hints[f.name], seen)))
        zero.append((f.name, _zero_of(f)))
    result = ObjectType(cls.__name__, tuple(fields), tuple(zero))
    seen[cls] = result
    return result


def _zero_of(f: dataclasses.Field[object]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _from_hint(hint: object, seen: dict[type, ObjectType]) -> Type:
    simple: dict[object, Type] = {str: STRING, int: INT, float: DOUBLE, bool: BOOL, bytes: BYTES}
    if hint in simple:
        return simple[hint]
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        return INT
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _schema(hint, seen)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return ListType(_from_hint(args[0], seen))
    if origin in (list, frozenset) and len(args) == 1:
        return ListType(_from_hint(args[0], seen))
    if origin in (dict, Mapping) and len(args) == 2:
        return MapType(_from_hint(args[0], seen), _from_hint(args[1], seen))
    if origin in (typing.Union, _pytypes.UnionType):
        return DYN
    raise TypeError(f"no CEL type for {hint!r}")


def is_dyn(t: Type) -> bool:
    return t == DYN or isinstance(t, TypeParam)
