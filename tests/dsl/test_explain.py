"""Explain: sub-conditions and their values, through the tracer (not the hot path)."""

from __future__ import annotations

from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Amounts, Buyer, Item, Order
from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr
from riskd.dsl.tracer import format_value
from riskd.dsl.types import STRING, ListType, schema_of
from riskd.dsl.values import Duration, UInt

ENV = Env({"order": schema_of(Order), "cats": ListType(STRING)})
ORDER = Order(
    "o1",
    Buyer("b1", account_age_days=3),
    "s1",
    "m1",
    items=(Item("a", "cosmetics", 100, 1),),
    amounts=Amounts(total=62000),
)
Q = FeatureQuery(Agg.COUNT, "device", "1h")
ACT = {"order": ORDER, "cats": ["cosmetics"], "@features": {Q: 7}}


def _explain(text: str) -> tuple[str, ...]:
    compiled, diags = compile_expr(text, ENV)
    assert compiled is not None, str(diags)
    return compiled.explain(ACT)


def test_explain_lists_sub_conditions_with_values() -> None:
    lines = _explain("order.amounts.total > 50000 && order.buyer.account_age_days < 7")
    assert lines == (
        "order.amounts.total > 50000 && order.buyer.account_age_days < 7 → true",
        "order.amounts.total > 50000 → true (order.amounts.total = 62000)",
        "order.buyer.account_age_days < 7 → true (order.buyer.account_age_days = 3)",
    )


def test_explain_shows_velocity_values_and_short_circuits() -> None:
    lines = _explain('orders("device", "1h") > 10 && order.amounts.total > 1')
    assert lines == (
        'orders("device", "1h") > 10 && order.amounts.total > 1 → false',
        'orders("device", "1h") > 10 → false (orders("device", "1h") = 7)',
        "order.amounts.total > 1 → not evaluated",
    )


def test_explain_reports_errors_and_macros() -> None:
    lines = _explain("order.items.exists(i, i.category in cats) || 1 / 0 == 1")
    assert lines[1] == "order.items.exists(i, i.category in cats) → true"
    assert lines[2] == "1 / 0 == 1 → not evaluated"


def test_explain_of_a_failing_condition_names_the_error() -> None:
    lines = _explain("order.amounts.total / 0 > 1")
    assert lines == ("order.amounts.total / 0 > 1 → error: division by zero",)


def test_format_value_renders_cel_like_text() -> None:
    assert format_value(UInt(3)) == "3u"
    assert format_value(["a", None, True]) == '["a", null, true]'
    assert format_value(Duration(1_500_000_000)) == 'duration("1.5s")'
    assert format_value(ORDER) == "Order{…}"
