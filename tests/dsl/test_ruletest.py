"""Rule-file test cases: building inputs, defaults, scope, pass/fail reporting."""

from __future__ import annotations

from pathlib import Path

import pytest

from riskd.domain.order import Channel, PaymentMethod
from riskd.dsl.program import Program, compile_rules, load_rules
from riskd.dsl.ruletest import DEFAULT_NOW, run_tests, summary
from riskd.errors import RuleCompileError

ROOT = Path(__file__).resolve().parents[2]
RULE = (
    'rule {rid} {{\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n  mode = active\n'
    "  action = review\n  score = 1\n  reason = R\n  when = {when}\n}}\n"
)


def compile_texts(tmp_path: Path, **files: str) -> Program:
    paths = []
    for name, text in files.items():
        p = tmp_path / f"{name}.rules"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return compile_rules(*paths)


def test_ruletest_starter_rules_all_pass() -> None:
    results = run_tests(load_rules(ROOT / "rules"))
    failed = [r.describe() for r in results if not r.passed]
    assert not failed, "\n".join(failed)
    assert len(results) >= 50


def test_ruletest_builds_orders_with_defaults_and_derived_amounts(tmp_path: Path) -> None:
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n'
        + RULE.format(rid="r", when="true")
        + 'test "t" {\n  order = {channel: live_room, payment_method: "COD", '
        'items: [{sku: "a", category: "beauty", unit_price: 250, quantity: 4}], '
        "amounts: {discount: 30, coupon: 100, shipping: 50}, client_time: 5}\n"
        '  now = "2026-02-01T00:00:00Z"\n  expect = [r]\n}\n',
    )
    (test,) = p.tests
    assert test.order.channel is Channel.LIVE_ROOM
    assert test.order.payment_method is PaymentMethod.COD
    assert test.order.amounts.items == 1000 and test.order.amounts.total == 920
    assert test.order.client_time == 5.0 and isinstance(test.order.client_time, float)
    assert test.order.order_id and test.order.buyer.buyer_id and test.shop.shop_id == "test-shop"
    assert test.now == 1_769_904_000.0
    assert DEFAULT_NOW == 1_767_225_600.0


def test_ruletest_missing_features_default_to_this_order_alone(tmp_path: Path) -> None:
    rules = (
        RULE.format(rid="once", when='orders("device", "1h") == 1')
        + RULE.format(rid="spent", when='amount("buyer", "24h") == order.amounts.total')
        + RULE.format(rid="lonely", when='distinct("device", "buyer", "24h") == 1')
        + RULE.format(rid="given", when='orders("ip", "1m") == 7')
    )
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n' + rules + 'test "t" {\n  order = {amounts: {total: 123}}\n'
        "  features = {count_per_ip_1m: 7}\n  expect = [once, spent, lonely, given]\n}\n",
    )
    (result,) = run_tests(p)
    assert result.passed, result.describe()


def test_ruletest_reports_missing_unexpected_and_errors(tmp_path: Path) -> None:
    rules = (
        RULE.format(rid="fires", when="true")
        + RULE.format(rid="quiet", when="false")
        + RULE.format(rid="broken", when="order.amounts.total / order.amounts.coupon > 0")
    )
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n' + rules + 'test "wrong" {\n  expect = [quiet]\n}\n',
    )
    (result,) = run_tests(p)
    assert not result.passed
    assert result.missing == ("quiet",) and result.unexpected == ("fires",)
    assert result.errors == (("broken", "division by zero"),)
    text = result.describe()
    assert text.startswith("FAIL ") and "main.rules:" in text and "wrong" in text
    assert "expected to fire but did not: quiet" in text
    assert "fired but not expected: fires" in text
    assert "     why quiet:\n       " in text  # then the explanation lines
    assert summary((result,)) == "0 passed, 1 failed, 1 test cases"


def test_ruletest_rules_of_other_files_are_out_of_scope(tmp_path: Path) -> None:
    p = compile_texts(
        tmp_path,
        a='scenario s = "S"\n' + RULE.format(rid="everything", when="true"),
        b=RULE.format(rid="big", when="order.amounts.total > 10")
        + 'test "small order" {\n  order = {amounts: {total: 5}}\n  expect = []\n}\n'
        + 'test "names a rule of a.rules" {\n  expect = [everything]\n}\n',
    )
    results = run_tests(p)
    assert [r.passed for r in results] == [True, True], [r.describe() for r in results]


def test_ruletest_now_given_as_a_boundary_instant_is_that_instant(tmp_path: Path) -> None:
    # A campaign starting at .001 s past the second: the test sets now to that very
    # instant, written as the rule writes it. now reached the rule ~64 ns early (review:
    # epoch seconds times 1e9 in floating point), so the rule did not hit.
    start = "2023-11-14T22:13:20.001Z"
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n'
        + RULE.format(rid="started", when=f'now >= timestamp("{start}")')
        + f'test "at the start" {{\n  order = {{}}\n  now = "{start}"\n'
        + "  expect = [started]\n}\n"
        + 'test "in seconds" {\n  order = {}\n  now = 1700000000.001\n'
        + "  expect = [started]\n}\n",
    )
    results = run_tests(p)
    assert [r.passed for r in results] == [True, True], [r.describe() for r in results]


@pytest.mark.parametrize(
    "start", ["2026-11-28T13:30:00.25Z", "2026-11-28T13:30:00.75Z", "2026-11-28T13:30:00.000001Z"]
)
def test_ruletest_now_written_as_text_is_that_instant(tmp_path: Path, start: str) -> None:
    # review: the text's nanoseconds / 1e9 rounded twice, and .25 reached the rule as
    # .249999762 (26% of the microseconds of this decade were off by a step)
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n'
        + RULE.format(rid="started", when=f'now >= timestamp("{start}")')
        + RULE.format(rid="exact", when=f'now == timestamp("{start}")')
        + f'test "at the start" {{\n  order = {{}}\n  now = "{start}"\n'
        + "  expect = [started, exact]\n}\n",
    )
    results = run_tests(p)
    assert [r.passed for r in results] == [True], [r.describe() for r in results]


@pytest.mark.parametrize(
    ("now", "said"),
    [
        # a double near today holds a second to ~240 ns: the test ran at .000000477
        ("2023-11-14T22:13:20.0000005Z", "the nearest is 2023-11-14T22:13:20.000000477Z"),
        # rounded up past the last instant: `riskd rules test` ended in a traceback
        ("9999-12-31T23:59:59.999999999Z", "now is out of range"),
    ],
)
def test_ruletest_now_that_epoch_seconds_cannot_hold_is_refused(
    tmp_path: Path, now: str, said: str
) -> None:
    text = (
        'scenario s = "S"\n'
        + RULE.format(rid="r", when="true")
        + f'test "t" {{\n  order = {{}}\n  now = "{now}"\n  expect = [r]\n}}\n'
    )
    with pytest.raises(RuleCompileError) as refused:
        compile_texts(tmp_path, main=text)
    assert "riskd_bad_test_input" in str(refused.value) and said in str(refused.value)


def test_ruletest_builds_enums_from_numbers_items_with_default_quantity_and_the_shop_id(
    tmp_path: Path,
) -> None:
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n'
        + RULE.format(rid="r", when="true")
        + 'test "t" {\n  order = {shop_id: "shop-9", channel: 2, payment_method: 5, '
        "items: [{unit_price: 250}]}\n  shop = {open_claims: 2}\n  expect = [r]\n}\n"
        + 'test "no shop" {\n  order = {shop_id: "shop-7"}\n  expect = [r]\n}\n',
    )
    test, no_shop = p.tests
    assert test.order.channel is Channel.LIVE_ROOM
    assert test.order.payment_method is PaymentMethod.COD
    assert test.order.items[0].quantity == 1 and test.order.amounts.total == 250
    assert test.shop.shop_id == "shop-9" and test.shop.open_claims == 2
    assert no_shop.shop.shop_id == "shop-7"


def test_ruletest_a_field_given_twice_in_an_object_is_refused(tmp_path: Path) -> None:
    text = (
        'scenario s = "S"\n'
        + RULE.format(rid="r", when="true")
        + 'test "t" {\n  order = {device_id: "a", device_id: "b"}\n  expect = [r]\n}\n'
    )
    with pytest.raises(RuleCompileError) as refused:
        compile_texts(tmp_path, main=text)
    assert "main.rules:13:28: riskd_duplicate_field: field 'device_id' is given twice" in str(
        refused.value
    )


def test_ruletest_a_rule_error_alone_fails_the_case(tmp_path: Path) -> None:
    p = compile_texts(
        tmp_path,
        main='scenario s = "S"\n'
        + RULE.format(rid="broken", when="order.amounts.total / order.amounts.coupon > 0")
        + 'test "t" {\n  expect = []\n}\n',
    )
    (result,) = run_tests(p)
    assert not result.passed and not result.missing and not result.unexpected
    assert "     broken: error: division by zero" in result.describe()


def test_ruletest_errors_of_rules_in_other_files_do_not_fail_a_case(tmp_path: Path) -> None:
    p = compile_texts(
        tmp_path,
        a='scenario s = "S"\n'
        + RULE.format(rid="broken", when="order.amounts.total / order.amounts.coupon > 0"),
        b=RULE.format(rid="big", when="order.amounts.total > 10")
        + 'test "small order" {\n  order = {amounts: {total: 5}}\n  expect = []\n}\n',
    )
    (result,) = run_tests(p)
    assert result.passed and result.errors == (), result.describe()
