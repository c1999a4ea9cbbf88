"""Checker: types, overloads, the request schema, velocity functions, regexes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Order
from riskd.dsl.checker import Env, check
from riskd.dsl.expr import check_expr, compile_expr, parse_expr
from riskd.dsl.types import (
    BOOL,
    DOUBLE,
    DYN,
    INT,
    STRING,
    TIMESTAMP,
    ListType,
    MapType,
    ObjectType,
    Type,
    parse_type,
    schema_of,
)

ENV = Env(
    {
        "order": schema_of(Order),
        "now": TIMESTAMP,
        "cats": ListType(STRING),
        "m": MapType(STRING, INT),
        "x": DYN,
    }
)


def _type(text: str, env: Env = ENV) -> Type:
    expr, diags = parse_expr(text)
    assert expr is not None, diags
    t, diags = check_expr(expr, env)
    assert diags.ok, str(diags)
    assert t is not None
    return t


def _errors(text: str) -> list[tuple[str, str]]:
    expr, _ = parse_expr(text)
    assert expr is not None
    _, diags = check_expr(expr, ENV)
    return [(d.code, d.message) for d in diags]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("order.amounts.total > 50000", BOOL),
        ("order.items", schema_of(Order).field("items")),
        ("order.items.map(i, i.unit_price * i.quantity)", ListType(INT)),
        ("order.items.filter(i, i.category in cats)[0].sku", STRING),
        ("size(order.items)", INT),
        ("order.client_time + 1.5", DOUBLE),
        ("m['a']", INT),
        ("m.a", INT),
        ("x.anything.goes", DYN),
        ("[1, 'a']", ListType(DYN)),
        ("{'a': 1}", MapType(STRING, INT)),
        ("true ? 1 : 2", INT),
        ("now - duration('1h') < now", BOOL),
        ("orders('device', '1h')", INT),
        ("type(1) == int", BOOL),
        ("has(order.coupon_code)", BOOL),
        ("dyn(1) == 1.0", BOOL),
        ("1 < 2.5", BOOL),
        # branches or list parts of different types are dyn, so either compares at run time
        ("x ? 1 : 'a'", DYN),
        ("[1] + [x]", ListType(DYN)),
    ],
)
def test_checker_infers_type(text: str, expected: Type | None) -> None:
    assert _type(text) == expected


def test_checker_rejects_unknown_fields_of_the_request() -> None:
    assert _errors("order.coupon == ''") == [
        ("riskd_unknown_field", "Order has no field 'coupon'; did you mean 'coupon_code'?")
    ]
    assert _errors("order.buyer._secret == ''")[0][0] == "riskd_unknown_field"


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        ("order.amounts.total > '1'", "riskd_type_error", "cannot compare int with string"),
        ("1 + 'a'", "riskd_type_error", "cannot apply '+' to int and string"),
        ("!1", "riskd_type_error", "no matching overload for '!' applied to (int)"),
        ("nope", "riskd_undeclared_reference", "undeclared reference to 'nope'"),
        ("nope(1)", "riskd_unknown_function", "undeclared function 'nope'"),
        ("1 && true", "riskd_type_error", "'&&' needs a bool, got int"),
        ("1 ? 2 : 3", "riskd_type_error", "the condition of '?:' needs a bool, got int"),
        ("(1).foo", "riskd_type_error", "type 'int' does not support field selection"),
        ("{1.5: true}.size() == 1", "riskd_type_error", "unsupported map key type double"),
        ("'a'.matches('(')", "riskd_bad_regex", "invalid regular expression: missing ): ("),
        # cel-go's (Go) RE2 refuses \C; C++ RE2 would match half of a character with it
        ("'é'.matches('^\\\\C')", "riskd_bad_regex",
         "invalid regular expression: invalid escape sequence: \\C (cel-go's RE2 has no "
         "any-byte class)"),
        ("orders('device')", "riskd_bad_argument",
         "orders() takes 2 arguments: orders(KEY, WINDOW)"),
        ("orders('device', '1h', 'device') > 1", "riskd_bad_argument",
         "orders() takes 2 arguments: orders(KEY, WINDOW)"),
        # each of these would pass the check and then fail every order at run time
        ("startsWith(order.device_id, 'dev')", "riskd_type_error",
         "no matching overload for 'startsWith' applied to (string, string)"),
        ("{1: 2}.a == 2", "riskd_type_error", "cannot select a field of map(int, int)"),
        ("(1).exists(i, true)", "riskd_type_error", "exists() cannot range over int"),
        ("matches(order.device_id, '(')", "riskd_bad_regex",
         "invalid regular expression: missing ): ("),
        ("int == 1", "riskd_type_error", "cannot compare type with int"),
        ("amount('device', '5m')", "riskd_bad_argument",
         'unknown window "5m"; expected one of "1m", "1h", "24h"'),
        # distinct devices per this device is always 1: the rule could never fire
        ("distinct('device', 'device', '24h') > 1", "riskd_bad_argument",
         'distinct() counts other identities than its key: OF "device" is the KEY'),
        # a literal duration(), timestamp() or zone that fails every evaluation
        ("duration('1 h') > duration('0')", "riskd_bad_argument",
         'not a duration: write it as Go does, e.g. "1h30m", "-1.5s", "250ms"'),
        ("duration('3000000h') > duration('0')", "riskd_bad_argument",
         "duration out of range (a 64-bit count of nanoseconds: ±292 years)"),
        ("now > timestamp('2026-01-02t00:00:00Z')", "riskd_bad_argument",
         'not an RFC 3339 timestamp, e.g. "2024-06-18T12:00:00Z" or "...+08:00"'),
        ("now > timestamp('0000-01-01T00:00:00Z')", "riskd_bad_argument",
         "timestamp out of range (years 0001 to 9999)"),
        ("now > timestamp(253402300800)", "riskd_bad_argument",
         "timestamp out of range (years 0001 to 9999)"),
        ("now > timestamp(-62135596801)", "riskd_bad_argument",
         "timestamp out of range (years 0001 to 9999)"),
        ("now.getHours('Asia/Shangai') < 6", "riskd_bad_argument",
         'unknown time zone: an IANA name ("Asia/Shanghai") or "+08:00"'),
        ("now.getDayOfWeek('+08:99') == 1", "riskd_bad_argument",
         "time zone offset out of range (at most 23:59)"),
    ],
)  # fmt: skip
def test_checker_reports(text: str, code: str, message: str) -> None:
    assert (code, message) in _errors(text)


def test_checker_records_feature_queries() -> None:
    compiled, diags = compile_expr(
        "orders('device', '1h') > 5 && distinct('device', 'buyer', '24h') > 2 "
        "&& amount('shop', '1m') > 100",
        ENV,
    )
    assert compiled is not None, diags
    assert compiled.feature_queries == {
        FeatureQuery(Agg.COUNT, "device", "1h"),
        FeatureQuery(Agg.DISTINCT, "device", "24h", of="buyer"),
        FeatureQuery(Agg.SUM, "shop", "1m"),
    }


def test_checker_lenient_mode_reports_nothing() -> None:
    expr, _ = parse_expr("'a' && nope(1) && missing")
    assert expr is not None
    _, diags = check(expr, ENV, strict=False)
    assert diags == []


def test_qualified_variable_names_resolve_to_the_longest_declared_name() -> None:
    env = Env({"a.b.c": STRING, "a.b": MapType(STRING, STRING)})
    assert _type("a.b.c", env) == STRING
    assert _type("a.b.d", env) == STRING
    assert _type("[1].exists(a, a == 1)", env) == BOOL


@dataclass(frozen=True, slots=True)
class _Leaf:
    name: str
    tags: tuple[str, ...]
    score: float
    flag: bool
    note: str | None = None  # a union is dyn
    _cache: int = 0  # private: not part of the schema


@dataclass(frozen=True, slots=True)
class _Root:
    leaf: _Leaf
    counts: dict[str, int]


def test_schema_of_derives_object_types() -> None:
    root = schema_of(_Root)
    leaf = root.field("leaf")
    assert isinstance(leaf, ObjectType) and leaf.name == "_Leaf"
    assert leaf.field("tags") == ListType(STRING)
    assert leaf.field("score") == DOUBLE and leaf.field("flag") == BOOL
    assert leaf.field("note") == DYN and leaf.field("_cache") is None
    assert root.field("counts") == MapType(STRING, INT)
    assert schema_of(Order).field("channel") == INT  # IntEnum
    with pytest.raises(TypeError):
        schema_of(int)


def test_parse_type_reads_conformance_type_names() -> None:
    assert parse_type("map(string, list(int))") == MapType(STRING, ListType(INT))
    for bad in ("set(int)", "list(int, int)", "map(string)"):
        with pytest.raises(ValueError):
            parse_type(bad)
