"""Explain: sub-conditions and their values, through the tracer (not the hot path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Address, Amounts, Buyer, Item, Order
from riskd.domain.shop import ShopState
from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr
from riskd.dsl.program import Program, RuleResult, RuleStatus, _scrub, compile_rules
from riskd.dsl.tracer import format_value
from riskd.dsl.types import BOOL, STRING, ListType, schema_of
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
NOW = 1_767_225_600.0


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


def test_explain_shows_a_bare_bool_operand_of_and_or_on_its_own_line() -> None:
    compiled, _ = compile_expr(
        "flagged && order.amounts.total > 1", Env({"order": schema_of(Order), "flagged": BOOL})
    )
    assert compiled is not None
    assert compiled.explain({"order": ORDER, "flagged": True}) == (
        "flagged && order.amounts.total > 1 → true",
        "flagged → true",
        "order.amounts.total > 1 → true (order.amounts.total = 62000)",
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
    # a long list or map says how much is not shown (cut silently, it read as ten)
    assert format_value(list(range(12))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … 2 more]"
    assert format_value(list(range(10))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"
    assert format_value({i: i for i in range(11)}).endswith(", 9: 9, … 1 more}")


# ------------------------------------------------------------------ PII never quoted

HIDDEN_ADDRESSES = [
    '集运仓 "Sunny" Apt 88号',  # a quote: JSON-escaped when rendered
    "集运仓 C:\\Users\\forwarder 88号",  # backslashes
    "集运仓 line one\nline two 88号",  # a newline
    "集运仓 tab\there \u2028 sep 88号",  # a tab and a line separator
    "集运仓 " + "长街" * 50 + " 88号",  # far longer than a clipped value
    "集运仓 " + "x" * 75 + ' "q" 88号',  # an escape right where the value is clipped
]
# Each address's tell-tale parts: none may appear in any form in an explanation.
SECRETS = ("Sunny", "Users", "forwarder", "line one", "line two", "tab", "长街", "xxxxx", "88号")
PII_RULES = {
    # the production rule (rules/shipping.rules), its field quoted as an operand
    "forwarder": 'order.buyer.address.detail.matches("集运")',
    # functions and operators over the field: their values are derived from it
    "derived": 'string(order.buyer.address.detail).contains("88")'
    " && size(bytes(order.buyer.address.detail)) > 2"
    ' && ("addr: " + order.buyer.address.detail).endsWith("号")'
    ' && dyn(order.buyer.address.detail) != ""',
    "picked": '[order.buyer.address.detail, "x"][0] != ""'
    ' && (order.ip == "" ? "none" : order.buyer.address.detail) != ""'
    ' && {"k": order.buyer.address.detail}["k"] != ""',
    "others": 'order.buyer.phone != "" && order.buyer.name != ""'
    ' && order.buyer.id_number != "" && order.device_id != "" && order.ip != ""'
    ' && order.buyer.address.district != ""',
    # an error message that quotes the value (a missing map key), under a rule that hits
    "erring": '{"x": 1}[order.buyer.address.detail] > 0 || true',
    "macro": '[order.buyer.address.detail].exists(d, d.contains("88"))'
    ' && [order.buyer.address.detail].map(d, d + "!").size() == 1',
}
OTHER_PII = {
    "phone": "13812345678",
    "name": "王小明",
    "id_number": "11010119900307123X",
    "device_id": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
    "ip": "203.0.113.77",
    "district": "西湖区",
}


def _pii_program(tmp_path: Path) -> Program:
    text = 'scenario s = "a scenario"\n' + "\n".join(
        f'rule {rid} {{\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n'
        f"  mode = active\n  action = review\n  score = 10\n  reason = R_{rid.upper()}\n"
        f"  when = {when}\n}}\n"
        for rid, when in PII_RULES.items()
    )
    path = tmp_path / "pii.rules"
    path.write_text(text, encoding="utf-8")
    return compile_rules(path)


def _pii_order(detail: str) -> Order:
    buyer = Buyer(
        "b-1",
        phone=OTHER_PII["phone"],
        name=OTHER_PII["name"],
        id_number=OTHER_PII["id_number"],
        address=Address("浙江省", "杭州市", OTHER_PII["district"], detail),
    )
    return Order(
        "o-1", buyer, "shop-1", "m-1", device_id=OTHER_PII["device_id"], ip=OTHER_PII["ip"]
    )


def _assert_no_pii(results: tuple[RuleResult, ...], detail: str) -> None:
    assert [r.rule_id for r in results if r.status is not RuleStatus.HIT] == []
    text = "\n".join(line for r in results for line in r.explanation)
    assert "order.buyer.address.detail" in text and '"***"' in text
    assert '→ error: "***"' in text  # an error computed from PII is hidden too
    for secret in (*SECRETS, *OTHER_PII.values()):
        if secret in detail or secret in OTHER_PII.values():
            assert secret not in text, secret


@pytest.mark.parametrize("detail", HIDDEN_ADDRESSES)
def test_scored_explanations_never_quote_a_pii_value(tmp_path: Path, detail: str) -> None:
    """What the scorer does: evaluate untraced, then explain the hits."""
    program, order = _pii_program(tmp_path), _pii_order(detail)
    results = program.evaluate(order, ShopState("shop-1"), {}, NOW)
    _assert_no_pii(program.explain(order, ShopState("shop-1"), {}, NOW, results), detail)


@pytest.mark.parametrize("detail", HIDDEN_ADDRESSES)
def test_traced_explanations_never_quote_a_pii_value(tmp_path: Path, detail: str) -> None:
    program, order = _pii_program(tmp_path), _pii_order(detail)
    _assert_no_pii(program.evaluate(order, ShopState("shop-1"), {}, NOW, explain=True), detail)


def test_the_tracer_itself_masks_pii_fields_and_values_made_from_them() -> None:
    """Below the program's scrub: the rendering never writes the value in the first place."""
    detail = '集运仓 "Sunny" Apt 88号'
    order = _pii_order(detail)
    act = {"order": order, "cats": [], "@features": {}}
    compiled, _ = compile_expr(
        'order.buyer.address.detail.matches("集运") && order.buyer.address.city == "杭州市"'
        ' && (order.buyer.address.detail + "!").size() > 0 && order.device_id != ""',
        ENV,
    )
    assert compiled is not None
    lines = compiled.explain(act)
    assert lines[-4:] == (
        'order.buyer.address.detail.matches("集运") → true (order.buyer.address.detail = "***")',
        'order.buyer.address.city == "杭州市" → true (order.buyer.address.city = "杭州市")',
        '(order.buyer.address.detail + "!").size() > 0 → true'
        ' ((order.buyer.address.detail + "!").size() = "***")',
        'order.device_id != "" → true (order.device_id = "***")',
    )


def test_an_empty_pii_field_shows_as_empty() -> None:
    """An empty value reveals nothing, and says why a ``!= ""`` guard did not hold."""
    lines = _explain('order.device_id != ""')
    assert lines == ('order.device_id != "" → false (order.device_id = "")',)


def test_scrub_catches_escaped_and_clipped_forms() -> None:
    """The program's second line of defence, for text the tracer did not render."""
    detail = "集运仓 " + "x" * 75 + ' "q" \\ 88号\nline two'
    order = _pii_order(detail)
    quoted = format_value(detail)  # JSON-escaped and clipped at 80 characters
    assert quoted.endswith("…")
    for message in (
        f"x = {quoted}",
        f"x = {format_value(['a', detail])}",  # clipped inside a list
        f"no such key: {detail!r}",
        f"value {json.dumps(detail)}",
        f"value {json.dumps(detail, ensure_ascii=False)} and {detail}",
    ):
        scrubbed = _scrub(message, order)
        assert "xxxxx" not in scrubbed and "88号" not in scrubbed and "line two" not in scrubbed
        assert "***" in scrubbed
    assert _scrub("order.amounts.total = 62000", order) == "order.amounts.total = 62000"
    # a clipped value that only starts like the address (a few characters, or then other
    # text) is not a piece of it: left as it is
    other = 'a = "集运…", b = "集运仓 yyyy…"'
    assert _scrub(other, order) == other
