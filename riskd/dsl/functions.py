"""Implementations of the builtin functions, keyed by overload id.

``registry`` declares the signatures; ``IMPLS`` here holds the code. A test
checks that the two name the same overloads.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal

from riskd.dsl import runtime as rt
from riskd.dsl.regex import search_dynamic
from riskd.dsl.values import (
    INT_MIN,
    Duration,
    EvalError,
    Timestamp,
    UInt,
    parse_duration,
    parse_timestamp,
    parse_zone,
)

_NS = 1_000_000_000
Impl = Callable[..., object]


def _div_int(a: int, b: int) -> int:
    if b == 0:
        raise EvalError("division by zero")
    q = abs(a) // abs(b)
    return rt.check_int(q if (a < 0) == (b < 0) else -q)


def _mod_int(a: int, b: int) -> int:
    if b == 0:
        raise EvalError("modulus by zero")
    if b == -1 and a == INT_MIN:  # as cel-go: the quotient it implies overflows, as in ``/``
        raise EvalError("integer overflow")
    r = abs(a) % abs(b)
    return -r if a < 0 else r


def _div_uint(a: int, b: int) -> UInt:
    if b == 0:
        raise EvalError("division by zero")
    return UInt(a // b)


def _mod_uint(a: int, b: int) -> UInt:
    if b == 0:
        raise EvalError("modulus by zero")
    return UInt(a % b)


def _div_double(a: float, b: float) -> float:
    try:
        return a / b
    except ZeroDivisionError:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _double_to_int(v: float) -> int:
    if math.isnan(v) or not -(2.0**63) < v < 2.0**63:
        raise EvalError("int conversion out of range")
    return rt.check_int(int(v))


def _double_to_uint(v: float) -> UInt:
    # a negative double is out of range even when it would truncate to 0 (-0.5), as in
    # cel-go and cel-cpp; -0.0 is not negative
    if math.isnan(v) or not 0.0 <= v < 2.0**64:
        raise EvalError("uint conversion out of range")
    return UInt(int(v))


# What CEL (cel-go's strconv) reads as a number: ASCII digits, no blanks; "_" only
# between the digits of a double (Go's ParseFloat reads "1_000.5" as Go source does;
# ParseInt with base 10 refuses it). Python's int() and float() also take surrounding
# whitespace and any Unicode digit ("٣" is 3), so a client's " 12" or Arabic-Indic
# digits would convert here and fail everywhere else.
_INT_TEXT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_UINT_TEXT = re.compile(r"[0-9]+", re.ASCII)
_DIGITS = r"[0-9]+(?:_[0-9]+)*"
_DOUBLE_TEXT = re.compile(
    rf"[+-]?(?:(?:{_DIGITS}\.?(?:{_DIGITS})?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?"
    r"|inf|infinity|nan)",
    re.ASCII | re.IGNORECASE,
)


def _string_to_int(s: str) -> int:
    if not _INT_TEXT.fullmatch(s):
        return _bad_conversion("int")
    return rt.check_int(_digits(s))


def _string_to_uint(s: str) -> UInt:
    if not _UINT_TEXT.fullmatch(s):
        return UInt(_bad_conversion("uint"))
    return rt.check_uint(_digits(s))


def _digits(s: str) -> int:
    """``s``'s value, or 2**70 (out of any 64-bit range) past 20 significant digits
    (Python refuses more than 4,300)."""
    return int(s, 10) if len(s.lstrip("+-0")) <= 20 else 1 << 70


# Go's ParseFloat also reads a hexadecimal mantissa with a binary exponent ("0x1p-2" is
# 0.25; the "p" exponent is required), as cel-go's double(string) does; "_" may also
# follow the "0x" ("0x_1p0").
_HEX = r"[0-9a-fA-F]+(?:_[0-9a-fA-F]+)*"
_HEX_DOUBLE_TEXT = re.compile(
    rf"[+-]?0[xX](?:_?{_HEX}\.?(?:{_HEX})?|\.{_HEX})[pP][+-]?{_DIGITS}", re.ASCII
)


def _string_to_double(s: str) -> float:
    if _HEX_DOUBLE_TEXT.fullmatch(s):
        try:
            return float.fromhex(s.replace("_", ""))
        except OverflowError:
            raise EvalError("double conversion out of range") from None
    if not _DOUBLE_TEXT.fullmatch(s):
        return float(_bad_conversion("double"))
    v = float(s.replace("_", ""))
    if math.isinf(v) and "n" not in s.lower():  # "1e400": out of range, not "inf"
        raise EvalError("double conversion out of range")
    return v


def _bad_conversion(kind: str) -> int:
    raise EvalError(f"type conversion error: cannot convert string to {kind}")


# Go's strconv.ParseBool, which cel-go's bool(string) is (capital "T" and "F" included)
_BOOLS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
          "0": False, "f": False, "F": False, "false": False, "FALSE": False,
          "False": False}  # fmt: skip


def _string_to_bool(s: str) -> bool:
    if s not in _BOOLS:
        raise EvalError("type conversion error: cannot convert string to bool")
    return _BOOLS[s]


def _bytes_to_string(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError("invalid UTF-8 in bytes") from exc


def _string_to_bytes(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a test's JSON string)
        raise EvalError("string is not valid Unicode") from None


def _double_to_string(v: float) -> str:
    """``string(double)`` as cel-go writes it (Go's ``%g``): the shortest digits that
    read back as ``v``, in exponent form (two digits at least) where the exponent
    is below -4 or from 6 up, else plain without a trailing ``.0``.

    >>> [_double_to_string(v) for v in (1.0, -0.0, 123456.0, 1e6, 1e100, 1.5e-7, 1e-4)]
    ['1', '-0', '123456', '1e+06', '1e+100', '1.5e-07', '0.0001']
    """
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    lead = "-" if math.copysign(1.0, v) < 0 else ""
    if v == 0:
        return lead + "0"
    # repr's digits are the shortest that round-trip, as Go's; only the layout differs
    _, digits, exponent = Decimal(repr(v)).as_tuple()
    point = len(digits) + int(exponent)  # where the decimal point falls in the digits
    text = "".join(map(str, digits)).rstrip("0")
    if not -4 <= point - 1 < 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{lead}{mantissa}e{'-' if point <= 0 else '+'}{abs(point - 1):02d}"
    if point <= 0:
        return f"{lead}0.{'0' * -point}{text}"
    if point >= len(text):
        return lead + text + "0" * (point - len(text))
    return f"{lead}{text[:point]}.{text[point:]}"


def _ts_to_int(t: Timestamp) -> int:
    return t.ns // _NS


def _int_to_ts(v: int) -> Timestamp:
    return Timestamp.checked(v * _NS)


def _local(t: Timestamp, tz: str = "UTC") -> _dt.datetime:
    d = t.to_datetime()
    try:
        return d if tz in ("UTC", "") else d.astimezone(parse_zone(tz))
    except (OverflowError, ValueError):  # the local time would fall before year 1 or after 9999
        raise EvalError("timestamp out of range in that time zone") from None


def _ts_accessor(get: Callable[[_dt.datetime], int]) -> Callable[..., int]:
    def impl(t: Timestamp, tz: str = "UTC") -> int:
        return get(_local(t, tz))

    return impl


# Each takes a time zone as an optional argument (``now.getHours("Asia/Shanghai")``).
_TS_ACCESSORS: dict[str, Callable[[_dt.datetime], int]] = {
    "getFullYear": lambda d: d.year,
    "getMonth": lambda d: d.month - 1,
    "getDate": lambda d: d.day,
    "getDayOfMonth": lambda d: d.day - 1,
    "getDayOfWeek": lambda d: (d.weekday() + 1) % 7,
    "getDayOfYear": lambda d: d.timetuple().tm_yday - 1,
    "getHours": lambda d: d.hour,
    "getMinutes": lambda d: d.minute,
    "getSeconds": lambda d: d.second,
    "getMilliseconds": lambda d: d.microsecond // 1000,
}
ZONED_METHODS = frozenset(_TS_ACCESSORS)


def _whole(unit_ns: int) -> Callable[[Duration], int]:
    """The duration in whole units, cut toward zero, in integers: a float quotient
    (``int(ns / unit)``) rounds a duration just short of a whole unit up to it once
    past about 104 days (2**53 ns), e.g. 200 days less 1 ns to 17280000000 ms."""

    def whole(d: Duration) -> int:
        q = abs(d.ns) // unit_ns
        return -q if d.ns < 0 else q

    return whole


_DUR_ACCESSORS: dict[str, Callable[[Duration], int]] = {
    "getHours": _whole(3600 * _NS),
    "getMinutes": _whole(60 * _NS),
    "getSeconds": _whole(_NS),
    "getMilliseconds": _whole(10**6),  # the total, as cel-go's (not the 0-999 part)
}


def _feature(features: Mapping[object, int], query: object) -> int:
    return features[query]


def _matches(s: str, pattern: str) -> bool:
    return search_dynamic(pattern, s)


IMPLS: dict[str, Impl] = {
    # arithmetic
    "add_int64": lambda a, b: rt.check_int(a + b),
    "add_uint64": lambda a, b: rt.check_uint(a + b),
    "add_double": lambda a, b: a + b,
    "add_string": rt.concat,
    "add_bytes": rt.concat,
    "add_list": rt.concat,
    "add_timestamp_duration": lambda a, b: Timestamp.checked(a.ns + b.ns),
    "add_duration_timestamp": lambda a, b: Timestamp.checked(a.ns + b.ns),
    "add_duration_duration": lambda a, b: Duration.checked(a.ns + b.ns),
    "subtract_int64": lambda a, b: rt.check_int(a - b),
    "subtract_uint64": lambda a, b: rt.check_uint(a - b),
    "subtract_double": lambda a, b: a - b,
    "subtract_timestamp_timestamp": lambda a, b: Duration.checked(a.ns - b.ns),
    "subtract_timestamp_duration": lambda a, b: Timestamp.checked(a.ns - b.ns),
    "subtract_duration_duration": lambda a, b: Duration.checked(a.ns - b.ns),
    "multiply_int64": lambda a, b: rt.check_int(a * b),
    "multiply_uint64": lambda a, b: rt.check_uint(a * b),
    "multiply_double": lambda a, b: a * b,
    "divide_int64": _div_int,
    "divide_uint64": _div_uint,
    "divide_double": _div_double,
    "modulo_int64": _mod_int,
    "modulo_uint64": _mod_uint,
    "negate_int64": lambda a: rt.check_int(-a),
    "negate_double": lambda a: -a,
    "logical_not": lambda a: not a,
    # equality, ordering, membership, indexing
    "equals": rt.equals,
    "not_equals": lambda a, b: not rt.equals(a, b),
    "in_list": lambda a, b: rt.contains(b, a),
    "in_map": lambda a, b: rt.contains(b, a),
    "index_list": rt.index,
    "index_map": rt.index,
    # sizes and strings
    "size_string": len,
    "size_bytes": len,
    "size_list": len,
    "size_map": len,
    "string_size": len,
    "bytes_size": len,
    "list_size": len,
    "map_size": len,
    "contains_string": lambda a, b: b in a,
    "starts_with_string": lambda a, b: a.startswith(b),
    "ends_with_string": lambda a, b: a.endswith(b),
    "matches_string": _matches,
    "matches": _matches,
    # conversions
    "int64_to_int64": lambda v: v,
    "uint64_to_int64": lambda v: rt.check_int(int(v)),
    "double_to_int64": _double_to_int,
    "string_to_int64": _string_to_int,
    "timestamp_to_int64": _ts_to_int,
    "uint64_to_uint64": lambda v: v,
    "int64_to_uint64": lambda v: rt.check_uint(v),
    "double_to_uint64": _double_to_uint,
    "string_to_uint64": _string_to_uint,
    "double_to_double": lambda v: v,
    "int64_to_double": float,
    "uint64_to_double": float,
    "string_to_double": _string_to_double,
    "string_to_string": lambda v: v,
    "int64_to_string": lambda v: str(int(v)),
    "uint64_to_string": lambda v: str(int(v)),
    "double_to_string": _double_to_string,
    "bytes_to_string": _bytes_to_string,
    "bool_to_string": lambda v: "true" if v else "false",
    "timestamp_to_string": str,
    "duration_to_string": str,
    "bytes_to_bytes": lambda v: v,
    "string_to_bytes": _string_to_bytes,
    "bool_to_bool": lambda v: v,
    "string_to_bool": _string_to_bool,
    "type": rt.type_of,
    "to_dyn": lambda v: v,
    "string_to_duration": parse_duration,
    "duration_to_duration": lambda v: v,
    "string_to_timestamp": parse_timestamp,
    "int64_to_timestamp": _int_to_ts,
    "timestamp_to_timestamp": lambda v: v,
    # riskd velocity features: (features snapshot, FeatureQuery) -> int
    "orders": _feature,
    "amount": _feature,
    "distinct": _feature,
}

_CMP = {"less": rt.less, "less_equals": rt.less_equals,
        "greater": rt.greater, "greater_equals": rt.greater_equals}  # fmt: skip
ORDERED = ("bool", "int64", "uint64", "double", "string", "bytes", "timestamp", "duration")
CROSS = (("int64", "uint64"), ("int64", "double"), ("uint64", "int64"),
         ("uint64", "double"), ("double", "int64"), ("double", "uint64"))  # fmt: skip
for _op, _fn in _CMP.items():
    for _t in ORDERED:
        IMPLS[f"{_op}_{_t}"] = _fn
    for _a, _b in CROSS:
        IMPLS[f"{_op}_{_a}_{_b}"] = _fn
for _name, _get in _TS_ACCESSORS.items():
    IMPLS[f"timestamp_{_name}"] = _ts_accessor(_get)
    IMPLS[f"timestamp_{_name}_tz"] = _ts_accessor(_get)
for _name, _dget in _DUR_ACCESSORS.items():
    IMPLS[f"duration_{_name}"] = _dget
