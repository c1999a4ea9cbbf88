"""Hypothesis properties of the expression core.

- the parser never raises anything but its own diagnostics, on any text;
- ``parse(unparse(e)) == e``;
- compiled evaluation equals the reference interpreter on generated
  expressions and inputs (in both checked and unchecked mode), and on
  well-typed expressions over every primitive type at its range edges
  (int64/uint64 bounds, -0.0, NaN, infinities, huge doubles, non-BMP strings,
  durations and timestamps at their limits), where the fast paths apply;
- ``x in NAME``, a lookup in a named list, answers as a scan with CEL's equality.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr, parse_expr, unparse
from riskd.dsl.nodes import Expr
from riskd.dsl.runtime import contains, equals
from riskd.dsl.values import (
    Duration,
    EvalError,
    ListValue,
    Timestamp,
    TypeValue,
    UInt,
    type_name,
)
from tests.dsl.strategies import (
    TYPED_VARIABLES,
    VARIABLES,
    activations,
    evaluable,
    exprs,
    typed_activations,
    typed_exprs,
)

CEL_ALPHABET = st.sampled_from(
    [*"()[]{}.,:?!-+*/%<>=&|'\"`\\ \n\tabxyzru019eE_", "in", "true", "has(", ".all(", "'''"]
)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_parser_never_raises_on_arbitrary_text(text: str) -> None:
    expr, diags = parse_expr(text)
    assert (expr is None) == (not diags.ok)


@settings(max_examples=200, deadline=None)
@given(st.lists(CEL_ALPHABET, max_size=40).map("".join))
def test_parser_never_raises_on_cel_like_text(text: str) -> None:
    expr, diags = parse_expr(text)
    assert (expr is None) != diags.ok
    for d in diags:
        assert d.code.startswith("riskd_")


def test_parser_bounds_nesting_without_recursion_error() -> None:
    for text in ("(" * 5000 + "1" + ")" * 5000, "-" * 5000 + "1", "!" * 5000 + "true",
                 "[" * 3000 + "]" * 3000, " + ".join(["1"] * 3000), "a" + ".b" * 3000):  # fmt: skip
        expr, diags = parse_expr(text)
        assert expr is None
        assert diags[0].code == "riskd_limit_exceeded"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exprs())
def test_parse_unparse_is_identity(expr: Expr) -> None:
    text = unparse(expr)
    parsed, diags = parse_expr(text)
    assert diags.ok, f"{text}: {diags}"
    assert parsed == expr, text


@pytest.mark.parametrize("text", ["m.`content-type`", "has(m.`foo.txt`)", "m.`/api/v1`.x"])
def test_unparse_quotes_a_field_that_is_no_identifier(text: str) -> None:
    expr, diags = parse_expr(text)
    assert expr is not None and diags.ok
    assert unparse(expr) == text


def _outcome(run: object, activation: dict[str, object]) -> tuple[str, object]:
    assert callable(run)
    try:
        return "value", run(activation)
    except EvalError:
        return "error", None


def _same(a: tuple[str, object], b: tuple[str, object]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "error":
        return True
    x, y = a[1], b[1]
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    return type_name(x) == type_name(y) and equals(x, y) and repr(x) == repr(y)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(evaluable(), activations(), st.booleans())
def test_compiled_equals_reference_interpreter(
    expr: Expr, activation: dict[str, object], strict: bool
) -> None:
    compiled, diags = compile_expr(unparse(expr), Env(VARIABLES), strict=strict)
    if compiled is None:
        assert strict and not diags.ok
        return
    fast = _outcome(compiled.evaluate, activation)
    slow = _outcome(compiled.interpret, activation)
    assert _same(fast, slow), (unparse(expr), fast, slow)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(typed_exprs(), typed_activations(), st.booleans())
def test_compiled_equals_reference_interpreter_on_typed_edges(
    expr: Expr, activation: dict[str, object], strict: bool
) -> None:
    text = unparse(expr)
    compiled, diags = compile_expr(text, Env(TYPED_VARIABLES), strict=strict)
    if compiled is None:  # only a literal that duration()/timestamp() cannot read
        assert all(d.code == "riskd_bad_argument" for d in diags), f"{text}: {diags}"
        return
    fast = _outcome(compiled.evaluate, activation)
    slow = _outcome(compiled.interpret, activation)
    assert _same(fast, slow), (text, fast, slow)


# Members a named list may hold: strings and numbers, some equal across types.
_NUMBERS = st.one_of(
    st.integers(-3, 3),
    st.integers(0, 3).map(UInt),
    st.integers(-3, 3).map(float),
    st.sampled_from([0.5, -0.0, math.inf, -math.inf, 2.0**53, 2**53 + 1, 2**63 - 1, 2.0**63]),
    st.floats(allow_nan=False),
)
_MEMBERS = st.one_of(st.text("ab1", max_size=2), _NUMBERS)
_OTHERS = st.one_of(  # values no member ever equals, some hashing like one that does
    st.booleans(),
    st.none(),
    st.just(math.nan),
    st.binary(max_size=2),
    st.text("ab1", max_size=2).map(str.encode),
    st.lists(_MEMBERS, max_size=2),
    st.dictionaries(st.text("ab", max_size=1), _MEMBERS, max_size=2),
    st.integers(-3, 3).map(Duration),
    st.integers(-3, 3).map(Timestamp),
    st.sampled_from([TypeValue("int"), TypeValue("string")]),
)


def _shifted(value: object) -> object:
    """``value`` as another numeric type, or a bool where it is 0 or 1."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return float(value) if isinstance(value, int) else value


@settings(max_examples=400, deadline=None)
@given(st.lists(_MEMBERS, max_size=8), st.data())
def test_named_list_lookup_equals_a_cel_equality_scan(
    members: list[object], data: st.DataObject
) -> None:
    probes = st.one_of(_MEMBERS, _OTHERS)
    if members:
        picked = st.sampled_from(members)
        probes = st.one_of(probes, picked, picked.map(_shifted))
    probe = data.draw(probes)
    named = ListValue(tuple(members))
    assert contains(named, probe) == any(equals(probe, m) for m in members)


@pytest.mark.parametrize("member", [True, False, math.nan, None, b"a", ("a",)])
def test_a_named_list_holds_only_strings_and_numbers(member: object) -> None:
    with pytest.raises(TypeError):
        ListValue(("a", member))
