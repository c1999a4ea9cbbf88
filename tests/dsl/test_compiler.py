"""Compiler: results, CEL error semantics, safety of the generated code, fast paths."""

from __future__ import annotations

import ast
import dis
import math

import pytest

from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Amounts, Buyer, Channel, Item, Order
from riskd.dsl.checker import Env
from riskd.dsl.expr import CompiledExpr, compile_expr, evaluate, to_json
from riskd.dsl.types import DURATION, DYN, INT, STRING, TIMESTAMP, ListType, MapType, schema_of
from riskd.dsl.values import Duration, EvalError, Timestamp, UInt

ENV = Env(
    {
        "order": schema_of(Order),
        "now": TIMESTAMP,
        "cats": ListType(STRING),
        "blocked": ListType(STRING),
        "m": MapType(STRING, INT),
        "x": DYN,
        "n": INT,
    }
)
ORDER = Order(
    "o1",
    Buyer("b1", account_age_days=3),
    "s1",
    "m1",
    items=(Item("a", "cosmetics", 30000, 2), Item("b", "books", 500, 1)),
    amounts=Amounts(items=60500, total=62000),
    channel=Channel.LIVE_ROOM,
    device_id="dev-1",
)
DEVICE_1H = FeatureQuery(Agg.COUNT, "device", "1h")
ACT: dict[str, object] = {
    "order": ORDER,
    "now": 1_700_000_000.0,
    "cats": ("cosmetics", "small_appliances"),
    "blocked": frozenset({"dev-9"}),
    "m": {"a": 1},
    "x": {"k": [1, 2]},
    "n": 5,
    "@features": {DEVICE_1H: 7},
}


def _compile(text: str) -> CompiledExpr:
    compiled, diags = compile_expr(text, ENV)
    assert compiled is not None, str(diags)
    return compiled


def _run(text: str) -> object:
    compiled = _compile(text)
    fast = compiled.evaluate(ACT)
    assert fast == compiled.interpret(ACT)
    return fast


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("order.amounts.total > 50000 && order.buyer.account_age_days < 7", True),
        ('orders("device", "1h") > 5', True),
        ("order.items.exists(i, i.category in cats)", True),
        ("order.device_id in blocked", False),
        ("order.items.all(i, i.quantity > 0)", True),
        ("order.items.exists_one(i, i.unit_price > 1000)", True),
        ("order.items.map(i, i.unit_price * i.quantity)", [60000, 500]),
        ("order.items.filter(i, i.category == 'books').map(i, i.sku)", ["b"]),
        ("order.items.map(i, i.quantity > 1, i.sku)", ["a"]),
        ("order.channel == 2", True),
        ("has(order.coupon_code)", False),
        ("has(order.device_id)", True),
        ("size(order.items) == 2", True),
        ("order.device_id.startsWith('dev') && order.device_id.endsWith('-1')", True),
        ("order.device_id.contains('v-')", True),
        ("order.device_id.matches('^dev-[0-9]+$')", True),
        # a method of a value known only at run time is dispatched as a method
        ("dyn(order.device_id).startsWith('dev') && dyn(order.device_id).contains('v-')", True),
        ("m.a + m['a']", 2),
        ("x.k[1]", 2),
        ("n / 2 + n % 2", 3),
        ("-n", -5),
        ("double(n) / 2.0", 2.5),
        ("string(n) + 'x'", "5x"),
        ("uint(n)", UInt(5)),
        ("n > 2 ? 'big' : 'small'", "big"),
        ("now - duration('1h') < now", True),
        ("now.getFullYear()", 2023),
        ("timestamp('2024-01-02T03:04:05Z') + duration('1h30m')",
         Timestamp((1704164645 + 5400) * 10**9)),
        ("duration('90s').getMinutes()", 1),
        ("[n, n].exists_one(i, i > 0)", False),
        ("dyn(0.0 / 0.0) <= 1.0", False),  # NaN is unordered: not below, equal nor above
        ("dyn(1.0) >= 0.0 / 0.0", False),
        ("dyn(0.0 / 0.0) > 1.0", False),
        ("dyn(1.0) < 0.0 / 0.0", False),
        ("[0.0 / 0.0].exists(d, d in [d])", False),  # NaN is in no list, not even its own
        # a number never equals a bool, though Python's 1 == True
        ('n - 4 in [dyn(true), "a"]', False),
        ("dyn(n - 4) == dyn(true)", False),  # both dyn: still CEL's ==, not Python's
        ("dyn(n - 5) != dyn(false)", True),
        ('dyn(n - 4) in dyn({true: "x"}) || dyn(n - 5) in dyn({false: "x"})', False),
        ("int(timestamp(100))", 100),
        ("type(order)", None),
    ],
)  # fmt: skip
def test_compiled_expression_evaluates(text: str, expected: object) -> None:
    result = _run(text)
    if expected is not None:
        assert result == expected
        assert type(result) is type(expected)


@pytest.mark.parametrize(
    "text",
    [
        "n + 9223372036854775807 > 0",
        "n * 9223372036854775807 > 0",
        "-(n - n - 9223372036854775807 - 1) > 0",
        "n / 0 > 1",
        "n % 0 > 1",
        "m.b > 0",
        "x.k[5] == 1",
        "x.nope == 1",
        "uint(-n) > 0u",
        "duration(order.device_id) < duration('1s')",  # a literal is a compile error
        "string(b'\\xff') == ''",
        "x.k.matches('a')",
        # a macro's predicate that fails for some element and holds for none
        "[n - n].all(i, n / i == 1)",
        "[n - n, n].exists(i, n / i == 0)",
        'dyn({true: "x"})[dyn(n - 4)] == "x"',
        "{n: 1, 5: 2}.size() == 2",  # a key repeated at run time (n is 5): an error
    ],
)
def test_runtime_errors_are_eval_errors(text: str) -> None:
    compiled = _compile(text)
    with pytest.raises(EvalError):
        compiled.evaluate(ACT)
    with pytest.raises(EvalError):
        compiled.interpret(ACT)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m.nope > 1 || true", True),
        ("true || m.nope > 1", True),
        ("m.nope > 1 && false", False),
        ("[1, 0].exists(i, 1 / i == 1)", True),
        ("[0, 1].all(i, 1 / i == 5)", False),
        # both operands can fail: the error is absorbed whichever side raises
        ("m.a > 1 && m.nope > 1", False),
        ("m.a == 1 || m.nope > 1", True),
        # a macro whose predicate failed is itself fallible inside && and ||
        ("[0].exists_one(i, 1 / i == 1) || true", True),
        # a nested && or ?: with one operand that can fail is itself fallible inside ||
        ("(n > 0 && m.nope > 1) || n > 0", True),
        ("(n < 0 ? true : m.nope > 1) || n > 0", True),
    ],
)
def test_and_or_and_macros_absorb_errors(text: str, expected: bool) -> None:
    assert _run(text) is expected


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("m.nope > 1 || n / 0 > 1", "no such key: 'nope'"),
        ("n / 0 > 1 && m.nope > 1", "division by zero"),
        ("n % 0 > 1 || m.nope > 1 || n / 0 > 1", "modulus by zero"),
        # a macro whose predicate fails for several elements reports the first one's error
        ("[0, 1].exists(i, i == 0 ? n / i > 1 : n % (i - 1) > 1)", "division by zero"),
        ("[1, 0].all(i, i == 0 ? n / i > 1 : n % (i - 1) > 1)", "modulus by zero"),
    ],
)
def test_and_or_with_every_operand_failing_report_the_first_error(text: str, error: str) -> None:
    compiled = _compile(text)
    for run in (compiled.evaluate, compiled.interpret):
        with pytest.raises(EvalError) as info:
            run(ACT)
        assert str(info.value) == error


def test_int_against_double_is_ordered_as_a_double() -> None:
    # cel-go converts the int: 2**53 + 1 is neither above nor below 2.0**53 in either path
    compiled = _compile("n > 9007199254740992.0 || n < 9007199254740992.0")
    for run in (compiled.evaluate, compiled.interpret):
        assert run({**ACT, "n": 2**53 + 1}) is False


@pytest.mark.parametrize(
    "text",
    [
        "x.contains('k')",  # x is a map with key "k": no Python `in` on it
        "!x",
        "dyn(b'abc').matches('b')",  # RE2 would search bytes too
        "[1].exists(i, x)",  # a map is no bool, however truthy in Python
        "dyn(order.device_id).exists(c, c == 'd')",  # a string is no list to range over
    ],
)
def test_a_dyn_operand_of_the_wrong_type_fails_in_both_paths(text: str) -> None:
    compiled = _compile(text)
    for run in (compiled.evaluate, compiled.interpret):
        with pytest.raises(EvalError, match="no such overload"):
            run(ACT)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true in {1: true}", False),  # a bool key never matches a numeric one
        ("[nope].exists(i, true) || true", True),  # an unbound name's error is absorbed
        ("1 + 1u", None),  # mixed int and uint have no '+': an error, not 2
        ("1 + 1.0", None),
    ],
)
def test_unchecked_expressions_agree_with_the_interpreter(text: str, expected: object) -> None:
    # conformance runs with the checker off: the fast paths must not assume its types
    compiled, diags = compile_expr(text, ENV, strict=False)
    assert compiled is not None, str(diags)
    for run in (compiled.evaluate, compiled.interpret):
        if expected is None:
            with pytest.raises(EvalError, match="no such overload"):
                run(ACT)
        else:
            assert run(ACT) is expected


@pytest.mark.parametrize(
    ("probe", "members", "found"),
    [
        ("dyn(9007199254740993)", frozenset({9007199254740992.0}), True),  # compared as doubles
        ("dyn(3)", frozenset({3.0, 4.5}), True),
        ("dyn(true)", frozenset({1, 2}), False),  # true is not 1, though Python hashes alike
        ("dyn(false)", frozenset({0}), False),
    ],
)
def test_membership_in_a_set_given_as_a_list_is_cel_equality(
    probe: str, members: frozenset[object], found: bool
) -> None:
    # a frozenset is accepted as an unordered list (``riskd.dsl.values``): ``in`` must
    # answer what a scan with CEL's == answers, not Python's hash lookup
    compiled, diags = compile_expr(f"{probe} in s", Env({"s": ListType(DYN)}))
    assert compiled is not None, str(diags)
    for run in (compiled.evaluate, compiled.interpret):
        assert run({"s": members}) is found


@pytest.mark.parametrize(
    ("text", "col"),
    [
        ('{1: "a", true: "b"}[1] == "a"', 10),
        ('{true: "b", 1u: "a"}[true] == "b"', 13),
        ('{n - 5: "a", false: "b"}.size() == 2', None),  # one key computed: unchecked
    ],
)
def test_a_map_with_a_bool_key_and_an_equal_number_key_is_an_error_not_merged(
    text: str, col: int | None
) -> None:
    # CEL keeps true and 1 apart (cel-spec fields/map_fields/map_key_mixed_type); a
    # Python dict merges them and kept the last value under the first key: a wrong
    # answer with no error. riskd does not support such a map: rules check refuses
    # literal keys, and at run time it is an error
    _, diags = compile_expr(text, ENV)
    message = "unsupported map: a bool key and a number key of equal value"
    assert [(d.code, d.col, d.message) for d in diags] == (
        [] if col is None else [("riskd_bad_argument", col, message)]
    )
    compiled, _ = compile_expr(text, ENV, strict=False)
    assert compiled is not None
    for run in (compiled.evaluate, compiled.interpret):
        with pytest.raises(EvalError, match="bool key and a number key"):
            run(ACT)


def test_a_repeated_literal_map_key_is_refused_at_check_time_and_an_error_unchecked() -> None:
    # it fails every evaluation: rules check says so; unchecked, it is an error, never
    # the last value (a plain dict would keep the 2)
    text = "{'a': n, 'a': 2}.a == 2"
    _, diags = compile_expr(text, ENV)
    assert [(d.code, d.col, d.message) for d in diags] == [
        ("riskd_bad_argument", 10, "map literal with a repeated key")
    ]
    compiled, _ = compile_expr(text, ENV, strict=False)
    assert compiled is not None
    for run in (compiled.evaluate, compiled.interpret):
        with pytest.raises(EvalError, match="repeated key"):
            run(ACT)


def test_epoch_seconds_past_year_9999_are_out_of_range() -> None:
    compiled = _compile("now > timestamp(0)")
    for seconds in (253_402_300_800, 253_402_300_800.0):
        for run in (compiled.evaluate, compiled.interpret):
            with pytest.raises(EvalError, match="timestamp out of range"):
                run({**ACT, "now": seconds})


def test_missing_feature_is_an_error_of_the_whole_expression() -> None:
    compiled = _compile('orders("device", "24h") > 5 || true')
    with pytest.raises(EvalError, match="missing feature count_per_device_24h"):
        compiled.evaluate(ACT)


def test_missing_variable_is_an_eval_error() -> None:
    with pytest.raises(EvalError, match="missing input n"):
        _compile("n > 1").evaluate({})


def test_wrongly_typed_activation_never_leaks_a_python_error() -> None:
    compiled = _compile("order.amounts.total > 1")
    with pytest.raises(EvalError):
        compiled.evaluate({**ACT, "order": "not an order"})


def _generated_tree(compiled: CompiledExpr) -> list[str]:
    return [i.opname for i in dis.get_instructions(compiled.fn)]


def test_generated_code_has_no_builtins_imports_or_dunders() -> None:
    compiled = _compile("order.items.exists(i, i.category in cats) && order.buyer.buyer_id != ''")
    fn = compiled.fn
    assert fn.__globals__["__builtins__"] == {}
    names = set(fn.__code__.co_names) | {
        n for c in fn.__code__.co_consts if hasattr(c, "co_names") for n in c.co_names
    }
    assert not any(n.startswith("__") for n in names)
    assert {"category", "items", "buyer", "buyer_id"} <= names
    assert "IMPORT_NAME" not in _generated_tree(compiled)


def test_dynamic_field_access_cannot_reach_dunders() -> None:
    env = Env({"x": DYN})
    compiled, _ = compile_expr("x.__class__", env)
    assert compiled is not None
    with pytest.raises(EvalError):
        compiled.evaluate({"x": ORDER})
    compiled, _ = compile_expr("x._private", env)
    assert compiled is not None
    with pytest.raises(EvalError):
        compiled.evaluate({"x": ORDER})


def test_typed_rules_compile_to_plain_python_operations() -> None:
    compiled = _compile("order.amounts.total > 50000 && order.device_id in blocked")
    ops = _generated_tree(compiled)
    assert "CALL" not in ops  # no helper call on the typed hot path
    assert "CONTAINS_OP" in ops and "COMPARE_OP" in ops


def test_literal_regex_is_compiled_once_and_dynamic_regex_is_bounded() -> None:
    assert evaluate("s.matches(p)", {"s": "abc", "p": "b+"}) is True
    with pytest.raises(EvalError, match="invalid regular expression"):
        evaluate("s.matches(p)", {"s": "abc", "p": "("})
    with pytest.raises(EvalError, match="invalid regular expression") as err:
        evaluate("s.matches(p)", {"s": "abc", "p": "13812345678("})
    assert "1381" not in str(err.value)
    with pytest.raises(EvalError, match="invalid regular expression"):
        evaluate("s.matches(p)", {"s": "abc", "p": "a" * 5000})
    # RE2 runs in linear time: the classic catastrophic pattern is instant.
    assert evaluate("s.matches('^(a+)+$')", {"s": "a" * 5000 + "!"}) is False


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a" * 1001, "pattern is longer than 1000 characters"),
        ("(abc|def){700}", "pattern is too complex"),  # 14 characters, a large program
    ],
)
def test_a_regex_over_the_size_bounds_is_refused(pattern: str, message: str) -> None:
    _, diags = compile_expr(f'order.device_id.matches("{pattern}")', ENV)
    assert [d.code for d in diags] == ["riskd_bad_regex"]
    assert diags[0].message == f"invalid regular expression: {message}"
    with pytest.raises(EvalError, match="invalid regular expression"):
        evaluate("s.matches(p)", {"s": "abc", "p": pattern})
    assert evaluate("s.matches(p)", {"s": "a" * 1000, "p": "a" * 1000}) is True  # the bound


def test_evaluate_infers_variable_types() -> None:
    assert evaluate("a + size(b) + c.k", {"a": 1, "b": ["x"], "c": {"k": 2}}) == 4
    assert evaluate("f || n > 0", {"f": True, "n": 1}) is True  # a bool is no int
    assert evaluate("u + 1u", {"u": UInt(2)}) == UInt(3)
    assert evaluate("d > duration('1s')", {"d": Duration(2 * 10**9)}) is True
    assert math.isnan(evaluate("0.0 / 0.0", {}))  # type: ignore[arg-type]
    assert evaluate("o.amounts.total", {"o": ORDER}) == 62000


def test_python_ast_is_valid() -> None:
    compiled = _compile("n > 1")
    assert isinstance(compiled.checked.root, object)
    assert ast.parse("x")  # the stdlib ast is not shadowed by riskd.dsl modules


def test_concatenation_is_bounded() -> None:
    expr = "((s + s) + (s + s)) + ((s + s) + (s + s))"
    with pytest.raises(EvalError, match="concatenation longer than"):
        evaluate(expr, {"s": "x" * (1 << 18)})
    with pytest.raises(EvalError, match="concatenation longer than"):
        evaluate("(l + l) + (l + l) + (l + l)", {"l": list(range(1 << 18))})
    assert evaluate("s + s", {"s": "x" * (1 << 19)}) == "x" * (1 << 20)  # the bound itself: fine


def test_to_json_turns_values_into_plain_data() -> None:
    value = evaluate(
        "[1u, b'hi', duration('90s'), timestamp(0), int, 0.0 / 0.0, {'k': [true, null]}]", {}
    )
    assert to_json(value) == [1, "aGk=", "90s", "1970-01-01T00:00:00Z", "int", "nan",
                              {"k": [True, None]}]  # fmt: skip
    assert to_json(Amounts(total=5)) == {"items": 0, "discount": 0, "coupon": 0, "shipping": 0,
                                         "total": 5}  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "written"),
    [
        (1_700_000_000.001, "2023-11-14T22:13:20.001Z"),  # was .000999936: before the literal
        (1_700_000_000.123, "2023-11-14T22:13:20.123Z"),  # was .122999808: 122 ms
        (1_700_000_000.123456, "2023-11-14T22:13:20.123456Z"),
        (-0.25, "1969-12-31T23:59:59.75Z"),
        (5e-8, "1970-01-01T00:00:00.00000005Z"),  # finer than a microsecond: kept
    ],
)
def test_float_epoch_seconds_mean_the_decimal_written(seconds: float, written: str) -> None:
    compiled = _compile(f"now == timestamp('{written}') && string(now) == '{written}'")
    act = {**ACT, "now": seconds}
    assert compiled.evaluate(act) is True
    assert compiled.interpret(act) is True


@pytest.mark.parametrize(("seconds", "written"), [(1.5, "1.5s"), (1.000000007, "1.000000007s")])
def test_duration_variables_accept_seconds(seconds: float, written: str) -> None:
    """A duration variable given as seconds is the nearest nanosecond (1.000000007 is
    1000000006.9999999 ns as a double)."""
    compiled, diags = compile_expr(f"d == duration('{written}')", Env({"d": DURATION}))
    assert compiled is not None, str(diags)
    assert compiled.evaluate({"d": seconds}) is True
    assert compiled.interpret({"d": seconds}) is True
