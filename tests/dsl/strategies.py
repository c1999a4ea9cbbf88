"""Hypothesis strategies for expression ASTs and the inputs they run on."""

from __future__ import annotations

from hypothesis import strategies as st

from riskd.domain.order import Item
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select
from riskd.dsl.types import BOOL, DOUBLE, INT, STRING, ListType, MapType, Type, schema_of
from riskd.dsl.values import UInt

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
