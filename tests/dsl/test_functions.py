"""Builtin functions at the edges of their ranges, as cel-go computes them.

Each case runs through the compiled code and the reference interpreter: both
call the same implementation, so a wrong implementation is wrong in both and
only a fixed expected value (cel-go's) catches it.
"""

from __future__ import annotations

import pytest

from riskd.dsl.checker import Env
from riskd.dsl.expr import compile_expr
from riskd.dsl.types import DOUBLE
from riskd.dsl.values import EvalError, ListValue, UInt

ENV = Env({"v": DOUBLE})


def _both(text: str, **act: object) -> tuple[object, object]:
    compiled, diags = compile_expr(text, ENV)
    assert compiled is not None, str(diags)
    return compiled.evaluate(act), compiled.interpret(act)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (-0.0, "-0"),
        (0.0, "0"),
        (2.5, "2.5"),
        (100.0, "100"),
        (123456.0, "123456"),
        (1e6, "1e+06"),
        (1234567.0, "1.234567e+06"),
        (1e21, "1e+21"),
        (1e100, "1e+100"),
        (-1.5e300, "-1.5e+300"),
        (1e-4, "0.0001"),
        (-4.5e-3, "-0.0045"),
        (1e-5, "1e-05"),
        (1.5e-7, "1.5e-07"),
        (5e-324, "5e-324"),
        (0.1 + 0.2, "0.30000000000000004"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
        (float("nan"), "NaN"),
    ],
)
def test_string_of_double_is_go_percent_g(value: float, text: str) -> None:
    # cel-go: String(fmt.Sprintf("%g", float64(d))); the conformance data has
    # string(123.456) == "123.456" and string(-4.5e-3) == "-0.0045".
    assert _both("string(v)", v=value) == (text, text)


@pytest.mark.parametrize(
    ("duration", "hours", "minutes", "seconds", "millis"),
    [
        # 200 days less a nanosecond: a float quotient rounded it up to 200 days
        ("4799h59m59.999999999s", 4799, 287999, 17279999, 17279999999),
        ("-4799h59m59.999999999s", -4799, -287999, -17279999, -17279999999),
        ("8999999999.999999999s", 2499999, 149999999, 8999999999, 8999999999999),
        ("2562047h47m16.854775807s", 2562047, 153722867, 9223372036, 9223372036854),
        ("-1.5s", 0, 0, -1, -1500),
    ],
)
def test_duration_parts_are_whole_units_cut_toward_zero(
    duration: str, hours: int, minutes: int, seconds: int, millis: int
) -> None:
    d = f"duration('{duration}')"
    text = f"[{d}.getHours(), {d}.getMinutes(), {d}.getSeconds(), {d}.getMilliseconds()]"
    want = [hours, minutes, seconds, millis]
    assert _both(text) == (want, want)


@pytest.mark.parametrize(
    "text",
    [
        "(-9223372036854775807 - 1) % -1 == 0",  # cel-go: overflow, as ``/`` by -1 is
        "uint(-0.5) == 0u",
        "uint(-1e-300) == 0u",
        "uint(18446744073709551616.0) > 0u",
        "int(-9223372036854775808.0) < 0",
        "timestamp('9999-12-31T23:59:59Z') + duration('1s') > timestamp(0)",
        # cel-spec timestamps/timestamp_range and duration_range: each operator checks
        "duration('1s') + timestamp('9999-12-31T23:59:59Z') > timestamp(0)",
        "timestamp('0001-01-01T00:00:00Z') - duration('1s') < timestamp(0)",
        "duration('2562047h') + duration('2562047h') > duration('0s')",
        "duration('-2562047h') - duration('2562047h') < duration('0s')",
        # uint overflow under dyn, where the generic overloads run (not the typed fast path)
        "dyn(18446744073709551615u) + dyn(1u) > 0u",
        "dyn(0u) - dyn(1u) > 0u",
        "dyn(4294967296u) * dyn(4294967296u) > 0u",
    ],
)
def test_out_of_range_arithmetic_and_conversions_are_errors(text: str) -> None:
    compiled, diags = compile_expr(text, ENV)
    assert compiled is not None, str(diags)
    with pytest.raises(EvalError):
        compiled.evaluate({})
    with pytest.raises(EvalError):
        compiled.interpret({})


def test_in_range_edges_still_convert() -> None:
    assert _both("uint(-0.0)") == (UInt(0), UInt(0))
    assert _both("uint(0.99)") == (UInt(0), UInt(0))
    assert _both("-9223372036854775807 % -1") == (0, 0)
    assert _both("(-9223372036854775807 - 1) % 1") == (0, 0)
    assert _both("(-9223372036854775807 - 1) % 2") == (0, 0)
    # int(timestamp) is Go's Unix(): whole seconds down, also before 1970
    assert _both("int(timestamp('1969-12-31T23:59:59.5Z'))") == (-1, -1)


@pytest.mark.parametrize(
    ("text", "value"),
    [("-7 / 2", -3), ("7 / -2", -3), ("-7 / -2", 3), ("-7 % 2", -1), ("7 % -2", 1)],
)
def test_int_division_cuts_toward_zero(text: str, value: int) -> None:
    # cel-go: Go's / and %, not Python's floor division
    assert _both(text) == (value, value)


@pytest.mark.parametrize(
    ("when", "day"),
    [
        ("2026-01-04T12:00:00Z", 0),
        ("2009-02-13T23:31:30Z", 5),
        ("2026-01-03T23:59:59Z", 6),
        ("0001-01-01T00:00:00Z", 1),  # a Monday, as Go's proleptic calendar has it
    ],
)
def test_day_of_week_counts_from_sunday(when: str, day: int) -> None:
    assert _both(f"timestamp('{when}').getDayOfWeek()") == (day, day)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # cel-spec timestamps/timestamp_selectors and timestamp_selectors_tz
        ("timestamp('2009-02-13T23:31:30Z').getFullYear()", 2009),
        ("timestamp('2009-02-13T23:31:30Z').getMonth()", 1),
        ("timestamp('2009-02-13T23:31:30Z').getDate()", 13),
        ("timestamp('2009-02-13T23:31:30Z').getDayOfMonth()", 12),
        ("timestamp('2009-02-13T23:31:30Z').getDayOfYear()", 43),
        ("timestamp('2009-02-13T23:31:30Z').getHours()", 23),
        ("timestamp('2009-02-13T23:31:30Z').getMinutes()", 31),
        ("timestamp('2009-02-13T23:31:30Z').getSeconds()", 30),
        ("timestamp('2009-02-13T23:31:30Z').getDate('Australia/Sydney')", 14),
        ("timestamp('2009-02-13T23:31:30Z').getDayOfMonth('+11:00')", 13),
        ("timestamp('2009-02-13T02:00:00Z').getDayOfMonth('-02:30')", 11),
        # the last day of a leap year, and the first of the next one in a zone ahead
        ("timestamp('2024-12-31T20:00:00Z').getDayOfYear()", 365),
        ("timestamp('2024-12-31T20:00:00Z').getMonth()", 11),
        ("timestamp('2024-12-31T20:00:00Z').getDayOfYear('+08:00')", 0),
        ("timestamp('2024-12-31T20:00:00Z').getMonth('+08:00')", 0),
        # a tenth of a microsecond before 1970 is still 1969 (the instant is floored)
        ("timestamp('1969-12-31T23:59:59.9999999Z').getFullYear()", 1969),
        ("timestamp('1969-12-31T23:59:59.9999999Z').getSeconds()", 59),
        ("string(timestamp('1969-12-31T23:59:59.9999999Z'))", "1969-12-31T23:59:59.9999999Z"),
    ],
)
def test_timestamp_parts_count_months_and_days_as_cel_spec_does(text: str, value: object) -> None:
    # getMonth, getDayOfMonth and getDayOfYear count from 0, getDate from 1
    assert _both(text) == (value, value)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("string(1.0 / -0.0)", "-Inf"),  # IEEE: the zero's sign counts, as in Go
        ("string(-1.0 / -0.0)", "+Inf"),
        ("string(-dyn(0.0))", "-0"),  # negation under dyn keeps the sign of zero
        ("string(true)", "true"),
        ("string(false)", "false"),
        # uint division is exact in 64 bits, not through a double
        ("18446744073709551615u / 1u", UInt(18446744073709551615)),
        ("18446744073709551615u / 3u", UInt(6148914691236517205)),
    ],
)
def test_builtins_compute_what_cel_go_computes(text: str, value: object) -> None:
    assert _both(text) == (value, value)


def test_epoch_seconds_past_year_9999_from_the_request_are_an_error() -> None:
    # a literal is refused by the checker; a value computed at run time fails there
    compiled, diags = compile_expr("timestamp(int(v)) > timestamp(0)", ENV)
    assert compiled is not None, str(diags)
    for run in (compiled.evaluate, compiled.interpret):
        with pytest.raises(EvalError, match="timestamp out of range"):
            run({"v": 253402300800.0})
        assert run({"v": 253402300799.0}) is True


def test_milliseconds_of_a_timestamp_are_cut_not_rounded() -> None:
    assert _both("timestamp('2026-01-02T03:04:05.9996Z').getMilliseconds()") == (999, 999)


@pytest.mark.parametrize(("text", "value"), [("bool('T')", True), ("bool('F')", False)])
def test_bool_of_string_reads_what_go_parse_bool_reads(text: str, value: bool) -> None:
    # cel-go's bool(string) is strconv.ParseBool: a client's "T" is true there, not an error
    assert _both(text) == (value, value)


@pytest.mark.parametrize(
    "text",
    [
        "dyn(9007199254740993) == 9007199254740992.0",
        "dyn(9223372036854775807) == 9223372036854775808.0",
        "dyn(18446744073709551615u) == 18446744073709551616.0",
        "dyn(9007199254740993) in [9007199254740992.0]",
        "!(dyn(9007199254740993) != 9007199254740992.0)",
    ],
)
def test_int_double_equality_agrees_with_their_ordering(text: str) -> None:
    # cel-go's == is compare() == 0, and the suite's ordering converts the int to a double
    # (9223372036854775807 >= 9223372036854775808.0): == must not disagree with <= and >=
    assert _both(text) == (True, True)


def test_named_list_membership_compares_numbers_as_cel_equality_does() -> None:
    # ``x in NAME`` is a hash lookup; it must answer what a scan with CEL's == answers
    named = ListValue((9007199254740992.0, 3))
    assert (9007199254740993 in named, 3.0 in named, 4 in named) == (True, True, False)
    assert 9007199254740992.0 in ListValue((9007199254740993,))
    assert 9007199254740992 not in ListValue((9007199254740993,))


@pytest.mark.parametrize(
    ("text", "value"), [("double('0x1p-2')", 0.25), ("double('-0X1.8P1')", -3.0)]
)
def test_double_of_string_reads_go_hexadecimal_floats(text: str, value: float) -> None:
    # cel-go's double(string) is Go's ParseFloat, which reads "0x1p-2"; an error here
    # would turn such an order field into a rule ERROR that cel-go never raises
    assert _both(text) == (value, value)
