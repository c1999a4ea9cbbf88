"""Hypothesis properties of the expression core.

- the parser never raises anything but its own diagnostics, on any text;
- ``parse(unparse(e)) == e``;
- compiled evaluation equals the reference interpreter on generated
  expressions and inputs (in both checked and unchecked mode).
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr, parse_expr, unparse
from riskd.dsl.nodes import Expr
from riskd.dsl.runtime import equals
from riskd.dsl.values import EvalError, type_name
from tests.dsl.strategies import VARIABLES, activations, evaluable, exprs

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
