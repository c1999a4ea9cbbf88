"""The one registry of builtin functions: signatures for the checker, code for the runtime.

Each function has overloads; each overload has an id, parameter types, a
result type, whether it is called as a receiver (``s.startsWith(x)``) and its
implementation from ``functions.IMPLS``. The runtime's dynamic dispatch (for
``dyn`` arguments) picks the first overload whose parameters match the values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from riskd.dsl.functions import _DUR_ACCESSORS, _TS_ACCESSORS, CROSS, IMPLS, ORDERED
from riskd.dsl.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DURATION,
    DYN,
    INT,
    STRING,
    TIMESTAMP,
    TYPE,
    UINT,
    ListType,
    MapType,
    ObjectType,
    PrimitiveType,
    Type,
    TypeParam,
    TypeType,
)
from riskd.dsl.values import Duration, EvalError, Timestamp, TypeValue, UInt, is_int, type_name

A = TypeParam("A")
B = TypeParam("B")
LIST_A = ListType(A)
MAP_AB = MapType(A, B)
VELOCITY = ("orders", "amount", "distinct")


@dataclass(frozen=True, slots=True)
class Overload:
    id: str
    params: tuple[Type, ...]
    result: Type
    receiver: bool = False


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    overloads: tuple[Overload, ...]


class Registry:
    """Functions by name, with their implementations by overload id."""

    def __init__(self, functions: Sequence[Function], impls: Mapping[str, Callable[..., object]]):
        self.functions: dict[str, Function] = {f.name: f for f in functions}
        declared = {o.id for f in functions for o in f.overloads}
        missing = declared - impls.keys()
        if missing:
            raise ValueError(f"overloads without an implementation: {sorted(missing)}")
        self.impls: dict[str, Callable[..., object]] = {k: impls[k] for k in declared}
        # the overload each (name, receiver, argument types) chose: the choice depends on
        # the values' types only (``value_matches``), so it is made once per combination
        self._chosen: dict[tuple[object, ...], Callable[..., object]] = {}

    def declared_overloads(self) -> set[str]:
        return {o.id for f in self.functions.values() for o in f.overloads}

    def dispatch(self, name: str, args: Sequence[object], receiver: bool) -> object:
        """Call ``name`` on run-time values, choosing the overload by their types."""
        key = (name, receiver, *[type(a) for a in args])
        impl = self._chosen.get(key)
        if impl is None:
            impl = self._choose(name, args, receiver)
            if len(self._chosen) < _MAX_CHOSEN:
                self._chosen[key] = impl
        return impl(*args)

    def _choose(self, name: str, args: Sequence[object], receiver: bool) -> Callable[..., object]:
        fn = self.functions.get(name)
        if fn is not None:
            for o in fn.overloads:
                if o.receiver == receiver and _fits(o.params, args):
                    return self.impls[o.id]
        kinds = ", ".join(type_name(a) for a in args)
        raise EvalError(f"no such overload: {name}({kinds})")


_MAX_CHOSEN = 4096  # names x type combinations: bounded by the code, but never trust that


def _fits(params: Sequence[Type], args: Sequence[object]) -> bool:
    if len(params) != len(args):
        return False
    return all(value_matches(t, v) for t, v in zip(params, args, strict=True))


def value_matches(t: Type, v: object) -> bool:
    """Does run-time value ``v`` fit parameter type ``t``? (element types are not checked)."""
    if isinstance(t, TypeParam) or t == DYN:
        return True
    if isinstance(t, ListType):
        return isinstance(v, list | tuple | frozenset | set)
    if isinstance(t, MapType):
        return isinstance(v, dict)
    if isinstance(t, TypeType):
        return isinstance(v, TypeValue)
    if isinstance(t, ObjectType):
        return dataclasses.is_dataclass(v) and type(v).__name__ == t.name
    return _PRIMITIVE_CHECKS[t.name](v)


_PRIMITIVE_CHECKS: dict[str, Callable[[object], bool]] = {
    "int": is_int,
    "uint": lambda v: isinstance(v, UInt),
    "double": lambda v: isinstance(v, float),
    "string": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "bytes": lambda v: isinstance(v, bytes),
    "null_type": lambda v: v is None,
    "google.protobuf.Duration": lambda v: isinstance(v, Duration),
    "google.protobuf.Timestamp": lambda v: isinstance(v, Timestamp),
}

_T: dict[str, PrimitiveType] = {
    "bool": BOOL, "int64": INT, "uint64": UINT, "double": DOUBLE, "string": STRING,
    "bytes": BYTES, "timestamp": TIMESTAMP, "duration": DURATION,
}  # fmt: skip


def _fn(name: str, *overloads: Overload) -> Function:
    return Function(name, overloads)


def _o(oid: str, params: tuple[Type, ...], result: Type, receiver: bool = False) -> Overload:
    return Overload(oid, params, result, receiver)


def _arith(name: str, op: str, kinds: Sequence[str]) -> Function:
    return _fn(name, *(_o(f"{op}_{k}", (_T[k], _T[k]), _T[k]) for k in kinds))


def _compare(name: str, op: str) -> Function:
    same = [_o(f"{op}_{k}", (_T[k], _T[k]), BOOL) for k in ORDERED]
    cross = [_o(f"{op}_{a}_{b}", (_T[a], _T[b]), BOOL) for a, b in CROSS]
    return _fn(name, *same, *cross)


def _conversion(name: str, target: str, sources: Sequence[str]) -> Function:
    return _fn(name, *(_o(f"{s}_to_{target}", (_T[s],), _T[target]) for s in sources))


def _string_fn(name: str, oid: str) -> Function:
    return _fn(name, _o(oid, (STRING, STRING), BOOL, receiver=True))


def _size() -> Function:
    plain: list[tuple[str, Type]] = [
        ("string", STRING),
        ("bytes", BYTES),
        ("list", LIST_A),
        ("map", MAP_AB),
    ]
    return _fn(
        "size",
        *(_o(f"size_{k}", (t,), INT) for k, t in plain),
        *(_o(f"{k}_size", (t,), INT, receiver=True) for k, t in plain),
    )


def _accessors() -> list[Function]:
    out = []
    for name in _TS_ACCESSORS:
        ovs = [
            _o(f"timestamp_{name}", (TIMESTAMP,), INT, True),
            _o(f"timestamp_{name}_tz", (TIMESTAMP, STRING), INT, True),
        ]
        if name in _DUR_ACCESSORS:
            ovs.append(_o(f"duration_{name}", (DURATION,), INT, True))
        out.append(_fn(name, *ovs))
    return out


def _builtins() -> list[Function]:
    return [
        _fn("_+_", *_arith("", "add", ["int64", "uint64", "double", "string", "bytes"]).overloads,
            _o("add_list", (LIST_A, LIST_A), LIST_A),
            _o("add_timestamp_duration", (TIMESTAMP, DURATION), TIMESTAMP),
            _o("add_duration_timestamp", (DURATION, TIMESTAMP), TIMESTAMP),
            _o("add_duration_duration", (DURATION, DURATION), DURATION)),
        _fn("_-_", *_arith("", "subtract", ["int64", "uint64", "double"]).overloads,
            _o("subtract_timestamp_timestamp", (TIMESTAMP, TIMESTAMP), DURATION),
            _o("subtract_timestamp_duration", (TIMESTAMP, DURATION), TIMESTAMP),
            _o("subtract_duration_duration", (DURATION, DURATION), DURATION)),
        _arith("_*_", "multiply", ["int64", "uint64", "double"]),
        _arith("_/_", "divide", ["int64", "uint64", "double"]),
        _arith("_%_", "modulo", ["int64", "uint64"]),
        _fn("-_", _o("negate_int64", (INT,), INT), _o("negate_double", (DOUBLE,), DOUBLE)),
        _fn("!_", _o("logical_not", (BOOL,), BOOL)),
        _fn("_==_", _o("equals", (A, A), BOOL)),
        _fn("_!=_", _o("not_equals", (A, A), BOOL)),
        _compare("_<_", "less"),
        _compare("_<=_", "less_equals"),
        _compare("_>_", "greater"),
        _compare("_>=_", "greater_equals"),
        _fn("@in", _o("in_list", (A, LIST_A), BOOL), _o("in_map", (A, MAP_AB), BOOL)),
        _fn("_[_]", _o("index_list", (LIST_A, INT), A), _o("index_map", (MAP_AB, A), B)),
        _size(),
        _string_fn("contains", "contains_string"),
        _string_fn("startsWith", "starts_with_string"),
        _string_fn("endsWith", "ends_with_string"),
        _fn("matches", _o("matches_string", (STRING, STRING), BOOL, True),
            _o("matches", (STRING, STRING), BOOL)),
        _conversion("int", "int64", ["int64", "uint64", "double", "string", "timestamp"]),
        _conversion("uint", "uint64", ["uint64", "int64", "double", "string"]),
        _conversion("double", "double", ["double", "int64", "uint64", "string"]),
        _conversion("string", "string", ["string", "int64", "uint64", "double", "bytes",
                                         "bool", "timestamp", "duration"]),
        _conversion("bytes", "bytes", ["bytes", "string"]),
        _conversion("bool", "bool", ["bool", "string"]),
        _conversion("duration", "duration", ["string", "duration"]),
        _conversion("timestamp", "timestamp", ["string", "int64", "timestamp"]),
        _fn("type", _o("type", (A,), TYPE)),
        _fn("dyn", _o("to_dyn", (A,), DYN)),
        *_accessors(),
        _fn("orders", _o("orders", (STRING, STRING), INT)),
        _fn("amount", _o("amount", (STRING, STRING), INT)),
        _fn("distinct", _o("distinct", (STRING, STRING, STRING), INT)),
    ]  # fmt: skip


DEFAULT_REGISTRY = Registry(_builtins(), IMPLS)
