"""Expression-level speed: compiled riskd expressions vs the same logic hand-written.

Four typical rule conditions, each evaluated against one order, compiled
(``CompiledExpr.fn``, what the program's hot path calls) and hand-written.
The reference interpreter is timed too, to show what compiling buys.

Run::

    .venv/bin/python -m pytest benchmarks/test_dsl_expr_bench.py -q \\
        --benchmark-columns=median,min,rounds --benchmark-sort=name
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Amounts, Buyer, Item, Order
from riskd.dsl.checker import Env
from riskd.dsl.expr import CompiledExpr, compile_expr
from riskd.dsl.types import STRING, TIMESTAMP, ListType, schema_of

Act = Mapping[str, Any]
ENV = Env(
    {
        "order": schema_of(Order),
        "now": TIMESTAMP,
        "high_risk_categories": ListType(STRING),
        "blocked_devices": ListType(STRING),
    }
)
ORDER = Order(
    "o1",
    Buyer("b1", account_age_days=3),
    "s1",
    "m1",
    items=(Item("a", "food", 100, 1), Item("b", "books", 100, 1), Item("c", "cosmetics", 9, 1)),
    amounts=Amounts(total=62000),
    device_id="dev-42",
)
QUERY = FeatureQuery(Agg.COUNT, "device", "1h")
ACT: dict[str, object] = {
    "order": ORDER,
    "now": 1_767_225_600.0,
    "high_risk_categories": frozenset({"cosmetics", "small_appliances"}),
    "blocked_devices": frozenset({"dev-1", "dev-2"}),
    "@features": {QUERY: 7},
}
CASES: dict[str, Callable[[Act], object]] = {
    "order.amounts.total > 50000 && order.buyer.account_age_days < 7": lambda a: (
        a["order"].amounts.total > 50000 and a["order"].buyer.account_age_days < 7
    ),
    'orders("device", "1h") > 5': lambda a: a["@features"][QUERY] > 5,
    "order.items.exists(i, i.category in high_risk_categories)": lambda a: any(
        i.category in a["high_risk_categories"] for i in a["order"].items
    ),
    "order.device_id in blocked_devices": lambda a: a["order"].device_id in a["blocked_devices"],
}


def _compiled() -> list[CompiledExpr]:
    out = []
    for text in CASES:
        compiled, diags = compile_expr(text, ENV)
        assert compiled is not None, str(diags)
        out.append(compiled)
    return out


COMPILED = _compiled()
# The feature map the program builds is keyed by the program's own query objects.
ACT["@features"] = {next(iter(COMPILED[1].feature_queries)): 7}


def _run_compiled() -> list[object]:
    return [c.fn(ACT) for c in COMPILED]


def _run_handwritten() -> list[object]:
    return [f(ACT) for f in CASES.values()]


def _run_interpreted() -> list[object]:
    return [c.interpret(ACT) for c in COMPILED]


def test_all_three_agree() -> None:
    assert _run_compiled() == _run_handwritten() == _run_interpreted()


@pytest.mark.parametrize(
    "run", [_run_compiled, _run_handwritten, _run_interpreted], ids=lambda f: f.__name__
)
def test_bench_typical_conditions(benchmark: Any, run: Callable[[], list[object]]) -> None:
    benchmark(run)


def test_bench_compile_typical_conditions(benchmark: Any) -> None:
    benchmark(_compiled)
