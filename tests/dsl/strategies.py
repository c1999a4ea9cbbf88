"""Hypothesis strategies for expression ASTs and the inputs they run on."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

from riskd.domain.order import Item
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select
from riskd.dsl.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DURATION,
    DYN,
    INT,
    STRING,
    TIMESTAMP,
    UINT,
    ListType,
    MapType,
    Type,
    schema_of,
)
from riskd.dsl.values import Duration, Timestamp, UInt

VARIABLES: dict[str, Type] = {
    "x": INT,
    "y": INT,
    "d": DOUBLE,
    "s": STRING,
    "b": BOOL,
    "l": ListType(INT),
    "m": MapType(STRING, INT),
    "it": schema_of(Item),
    "its": ListType(schema_of(Item)),
}
NAMES = st.sampled_from(["a", "b", "x", "y", "foo", "_z", "e1", "sku", "quantity", "unit_price"])
BINARY = ["_+_", "_-_", "_*_", "_/_", "_%_", "_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_",
          "_&&_", "_||_", "@in"]  # fmt: skip


def ints() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(-20, 20), st.sampled_from([2**63 - 1, -(2**63), 2**62]))


def literals() -> st.SearchStrategy[Expr]:
    values: st.SearchStrategy[object] = st.one_of(
        ints(),
        st.integers(0, 2**64 - 1).map(UInt),
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        st.text(max_size=6),
        st.binary(max_size=4),
        st.booleans(),
        st.none(),
    )
    return values.map(Literal)


def _extend(children: st.SearchStrategy[Expr]) -> st.SearchStrategy[Expr]:
    binary = st.builds(lambda f, a, b: Call(f, (a, b)), st.sampled_from(BINARY), children, children)
    unary = st.builds(lambda f, a: Call(f, (a,)), st.sampled_from(["!_", "-_"]), children)
    ternary = st.builds(lambda c, a, b: Call("_?_:_", (c, a, b)), children, children, children)
    index = st.builds(lambda a, b: Call("_[_]", (a, b)), children, children)
    func = st.builds(
        lambda f, a: Call(f, (a,)),
        st.sampled_from(["size", "int", "string", "double", "type", "dyn"]),
        children,
    )
    method = st.builds(
        lambda f, t, a: Call(f, (a,), target=t),
        st.sampled_from(["startsWith", "endsWith", "contains"]),
        children,
        children,
    )
    select = st.builds(lambda a, n, t: Select(a, n, t), children, NAMES, st.booleans())
    lists = st.lists(children, max_size=3).map(lambda xs: ListLit(tuple(xs)))
    maps = st.lists(st.tuples(children, children), max_size=2).map(lambda es: MapLit(tuple(es)))
    comp = st.builds(
        lambda k, t, v, p, x: Comprehension(
            k, t, v, p if k != "map" else None, x if k == "map" else None
        ),
        st.sampled_from(["all", "exists", "exists_one", "filter", "map"]),
        children,
        st.sampled_from(["e", "x"]),
        children,
        children,
    )
    return st.one_of(binary, unary, ternary, index, func, method, select, lists, maps, comp)


def exprs() -> st.SearchStrategy[Expr]:
    """Arbitrary (mostly ill-typed) expression trees, for the round-trip property."""
    leaves = st.one_of(literals(), NAMES.map(Ident))
    return st.recursive(leaves, _extend, max_leaves=12)


def _typed_leaves() -> st.SearchStrategy[Expr]:
    small = st.one_of(
        st.integers(-5, 5), st.sampled_from([2**63 - 1, -(2**63)]), st.booleans(),
        st.sampled_from(["", "ab", "b"]), st.sampled_from([0.0, 1.5, -2.0]),
    )  # fmt: skip
    return st.one_of(small.map(Literal), st.sampled_from(sorted(VARIABLES)).map(Ident))


def evaluable() -> st.SearchStrategy[Expr]:
    """Expressions over ``VARIABLES`` for the compiled == interpreted property."""
    return st.recursive(_typed_leaves(), _extend, max_leaves=10)


def activations() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {
            "x": ints(),
            "y": st.integers(-3, 3),
            "d": st.floats(allow_nan=True, width=32),
            "s": st.sampled_from(["", "ab", "abc", "b"]),
            "b": st.booleans(),
            "l": st.lists(st.integers(-3, 3), max_size=4),
            "m": st.dictionaries(st.sampled_from(["a", "b", "x"]), st.integers(-3, 3), max_size=3),
            "it": items(),
            "its": st.lists(items(), max_size=3),
        }
    )


def items() -> st.SearchStrategy[Item]:
    return st.builds(
        Item,
        st.sampled_from(["a", "sku-1"]),
        st.sampled_from(["cosmetics", "books"]),
        st.integers(0, 5),
        st.integers(-1, 3),
    )


# -- well-typed expressions over every primitive type, at the edges of their ranges ----

_LI, _LS, _MSD = ListType(INT), ListType(STRING), MapType(STRING, DOUBLE)
TYPED_VARIABLES: dict[str, Type] = {
    "i": INT, "j": INT, "u": UINT, "f": DOUBLE, "g": DOUBLE, "s": STRING, "t": STRING,
    "by": BYTES, "b": BOOL, "du": DURATION, "ts": TIMESTAMP, "li": _LI, "ls": _LS, "ms": _MSD,
    "dy": DYN,
}  # fmt: skip
_EDGE_INTS = [0, 1, -1, 2, 7, -7, 3, 1000, 2**63 - 1, -(2**63), 2**62, 2**53 + 1]
_EDGE_UINTS = [UInt(v) for v in (0, 1, 2, 7, 2**64 - 1, 2**63, 2**53 + 1)]
_EDGE_DOUBLES = [0.0, -0.0, 1.0, -1.5, 0.5, -0.5, 2.5, 0.1, 1e-7, 1.5e-7, 5e-324, 123456.0, 1e6,
                 1e21, 1e100, -1e100, 2.0**63, -(2.0**63), 2.0**64, 2.0**63 - 1024,
                 1.7976931348623157e308, math.nan, math.inf, -math.inf]  # fmt: skip
_EDGE_STRINGS = ["", "a", "ab", "é", "ß", "\U0001f600", "a\U0001f600b", "直播", "12", "-3", " 1",
                 "1e3", "nan", "-inf", "true", "f", "1h", "-1.5s", "2024-01-01T00:00:00Z",
                 "9223372036854775808", "18446744073709551615", "a.c"]  # fmt: skip
_EDGE_BYTES = [b"", b"a", b"ab", b"\xff", b"\xc3\xa9"]
_EDGE_DURATIONS = [Duration(v) for v in (0, 1, -1, 10**9, -1_500_000_000, 3600 * 10**9,
                                         2**63 - 1, -(2**63), 8999999999999999999)]  # fmt: skip
_EDGE_TIMESTAMPS = [Timestamp(v) for v in (0, -1, 10**18, 1_700_000_000_123_456_789,
                                           -62_135_596_800 * 10**9,
                                           253_402_300_800 * 10**9 - 1)]  # fmt: skip
_LITERALS: dict[Type, list[object]] = {
    INT: _EDGE_INTS, UINT: _EDGE_UINTS, STRING: _EDGE_STRINGS, BYTES: _EDGE_BYTES,
    BOOL: [True, False], DOUBLE: [v for v in _EDGE_DOUBLES if math.isfinite(v)],
}  # fmt: skip
_PRIMITIVES = [INT, UINT, DOUBLE, STRING, BYTES, BOOL, DURATION, TIMESTAMP]
_CONVERSIONS: dict[Type, tuple[str, list[Type]]] = {
    INT: ("int", [INT, UINT, DOUBLE, STRING, TIMESTAMP]),
    UINT: ("uint", [UINT, INT, DOUBLE, STRING]),
    DOUBLE: ("double", [DOUBLE, INT, UINT, STRING]),
    STRING: ("string", [STRING, INT, UINT, DOUBLE, BYTES, BOOL, TIMESTAMP, DURATION]),
    BYTES: ("bytes", [BYTES, STRING]),
    BOOL: ("bool", [BOOL, STRING]),
    DURATION: ("duration", [STRING, DURATION]),
    TIMESTAMP: ("timestamp", [STRING, INT, TIMESTAMP]),
}
_DURATION_PARTS = ["getHours", "getMinutes", "getSeconds", "getMilliseconds"]
_TIMESTAMP_PARTS = [*_DURATION_PARTS, "getFullYear", "getMonth", "getDate", "getDayOfMonth",
                    "getDayOfWeek", "getDayOfYear"]  # fmt: skip
_ZONES = ["UTC", "+08:00", "-02:30", "Asia/Shanghai", "America/New_York"]
_ORDERING = ["_<_", "_<=_", "_>_", "_>=_"]
Local = tuple[tuple[str, Type], ...]


def _call(fn: str, *args: Expr, target: Expr | None = None) -> Call:
    return Call(fn, tuple(args), target=target)


@st.composite
def typed(draw: st.DrawFn, t: Type, depth: int = 3, local: Local = ()) -> Expr:
    """A well-typed expression of type ``t`` over ``TYPED_VARIABLES`` and ``local``."""
    names = [n for n, vt in (*TYPED_VARIABLES.items(), *local) if vt == t]
    leaves: list[st.SearchStrategy[Expr]] = []
    if t in _LITERALS:
        leaves.append(st.sampled_from(_LITERALS[t]).map(Literal))
    if names:
        leaves.append(st.sampled_from(names).map(Ident))
    if depth <= 0 or (leaves and draw(st.integers(0, 4)) == 0):
        return draw(st.one_of(leaves))
    rules = _rules(t, depth - 1, local)
    return draw(st.sampled_from(rules).flatmap(lambda rule: rule))


def _rules(t: Type, depth: int, local: Local) -> list[st.SearchStrategy[Expr]]:
    def sub(tt: Type, scope: Local = local) -> st.SearchStrategy[Expr]:
        return typed(tt, depth, scope)

    def op(names: list[str], *types: Type) -> st.SearchStrategy[Expr]:
        return st.builds(lambda f, *a: Call(f, a), st.sampled_from(names), *map(sub, types))

    rules: list[st.SearchStrategy[Expr]] = [
        st.builds(lambda c, a, b: _call("_?_:_", c, a, b), sub(BOOL), sub(t), sub(t))
    ]
    if t in (INT, UINT, DOUBLE):
        rules.append(op(["_+_", "_-_", "_*_", "_/_"] + (["_%_"] if t != DOUBLE else []), t, t))
    if t in (INT, DOUBLE):
        rules.append(op(["-_"], t))
    if t in (STRING, BYTES, _LI, _LS):
        rules.append(op(["_+_"], t, t))
    if t in _CONVERSIONS:
        fn, sources = _CONVERSIONS[t]
        rules.append(st.sampled_from(sources).flatmap(sub).map(lambda a: _call(fn, a)))
    if t == INT:
        sized = st.sampled_from([STRING, BYTES, _LI, _LS, _MSD]).flatmap(sub)
        rules.append(sized.map(lambda a: _call("size", a)))
        parts = st.sampled_from(_DURATION_PARTS)
        rules.append(st.builds(lambda m, d: _call(m, target=d), parts, sub(DURATION)))
        zone = st.one_of(st.just(()), st.sampled_from(_ZONES).map(lambda z: (Literal(z),)))
        ts_parts = st.sampled_from(_TIMESTAMP_PARTS)
        rules.append(
            st.builds(lambda m, z, d: _call(m, *z, target=d), ts_parts, zone, sub(TIMESTAMP))
        )
        rules.append(op(["_[_]"], _LI, INT))
    if t == DOUBLE:
        rules.append(op(["_[_]"], _MSD, STRING))
    if t == STRING:
        rules.append(op(["_[_]"], _LS, INT))
    if t == DURATION:
        rules.append(op(["_+_", "_-_"], DURATION, DURATION))
        rules.append(op(["_-_"], TIMESTAMP, TIMESTAMP))
    if t == TIMESTAMP:
        rules.append(op(["_+_", "_-_"], TIMESTAMP, DURATION))
        rules.append(op(["_+_"], DURATION, TIMESTAMP))
    if t == BOOL:
        rules += _bool_rules(sub, op, depth, local)
    if t in (_LI, _LS):
        elem = INT if t == _LI else STRING
        rules.append(st.lists(sub(elem), max_size=3).map(lambda xs: ListLit(tuple(xs))))
        rules.append(_comprehension(["filter", "map"], t, elem, depth, local, elem))
    if t == _MSD:
        entries = st.lists(st.tuples(sub(STRING), sub(DOUBLE)), max_size=2)
        rules.append(entries.map(lambda es: MapLit(tuple(es))))
    return rules


def _bool_rules(
    sub: Callable[[Type], st.SearchStrategy[Expr]],
    op: Callable[..., st.SearchStrategy[Expr]],
    depth: int,
    local: Local,
) -> list[st.SearchStrategy[Expr]]:
    numeric = [INT, UINT, DOUBLE]
    same = st.sampled_from([*_PRIMITIVES, _LI]).flatmap(
        lambda a: op(["_==_", "_!=_"] + (_ORDERING if a != _LI else []), a, a)
    )
    mixed = st.tuples(st.sampled_from(numeric), st.sampled_from(numeric)).flatmap(
        lambda ab: op(_ORDERING, *ab)
    )
    string_tests = st.builds(lambda m, s, a: _call(m, a, target=s),
                             st.sampled_from(["startsWith", "endsWith", "contains"]),
                             sub(STRING), sub(STRING))  # fmt: skip
    patterns = st.sampled_from(["^a", "b$", "é", "^.$", "^$", "\\d+", "直"]).map(Literal)
    regex = st.builds(lambda s, p: _call("matches", p, target=s), sub(STRING), patterns)
    return [
        same,
        mixed,
        op(["_&&_", "_||_"], BOOL, BOOL),
        op(["!_"], BOOL),
        string_tests,
        regex,
        op(["@in"], INT, _LI),
        st.sampled_from([_LS, _MSD]).flatmap(lambda c: op(["@in"], STRING, c)),
        _comprehension(["all", "exists", "exists_one"], _LI, INT, depth, local, None),
        _comprehension(["all", "exists", "exists_one"], _LS, STRING, depth, local, None),
    ]


def _comprehension(
    kinds: list[str], target: Type, elem: Type, depth: int, local: Local, out: Type | None
) -> st.SearchStrategy[Expr]:
    """``target.kind(var, ...)``: a predicate for all/exists/filter, a transform for map."""

    @st.composite
    def build(draw: st.DrawFn) -> Expr:
        kind = draw(st.sampled_from(kinds))
        var = draw(st.sampled_from(["e", "x"]))
        scope = (*[(n, lt) for n, lt in local if n != var], (var, elem))
        over = draw(typed(target, depth, local))
        if kind == "map":
            assert out is not None
            return Comprehension(kind, over, var, None, draw(typed(out, depth, scope)))
        return Comprehension(kind, over, var, draw(typed(BOOL, depth, scope)), None)

    return build()


def typed_exprs() -> st.SearchStrategy[Expr]:
    """Well-typed expressions of every primitive type, for compiled == interpreted."""
    return st.sampled_from(_PRIMITIVES).flatmap(typed)


def typed_activations() -> st.SearchStrategy[dict[str, object]]:
    def pick(values: list[Any]) -> st.SearchStrategy[Any]:
        return st.sampled_from(values)

    return st.fixed_dictionaries(
        {
            "i": pick(_EDGE_INTS),
            "j": pick(_EDGE_INTS),
            "u": pick(_EDGE_UINTS),
            "f": pick(_EDGE_DOUBLES),
            "g": pick(_EDGE_DOUBLES),
            "s": pick(_EDGE_STRINGS),
            "t": pick(_EDGE_STRINGS),
            "by": pick(_EDGE_BYTES),
            "b": st.booleans(),
            "du": pick(_EDGE_DURATIONS),
            "ts": pick(_EDGE_TIMESTAMPS),
            "li": st.lists(pick(_EDGE_INTS), max_size=3),
            "ls": st.lists(pick(_EDGE_STRINGS), max_size=3),
            "ms": st.dictionaries(pick(_EDGE_STRINGS), pick(_EDGE_DOUBLES), max_size=3),
            "dy": pick([*_EDGE_INTS, *_EDGE_UINTS, *_EDGE_DOUBLES, *_EDGE_STRINGS]),
        }
    )
