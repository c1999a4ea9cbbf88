"""Run-time values of the expression language and the one run-time error type.

CEL values map onto Python values: int, ``UInt`` (an int subclass that keeps
its CEL type), float (double), str, bytes, bool, None (null), list/tuple
(a frozenset is accepted as an unordered list), dict (map), ``Duration``,
``Timestamp``, ``TypeValue`` and frozen dataclass instances (objects).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
import re
import zoneinfo
from typing import ClassVar

from riskd.errors import RiskdError

INT_MIN = -(2**63)
INT_MAX = 2**63 - 1
UINT_MAX = 2**64 - 1
_NS = 1_000_000_000
_TS_MIN_S = -62_135_596_800  # 0001-01-01T00:00:00Z
_TS_MAX_S = 253_402_300_799  # 9999-12-31T23:59:59Z
_DUR_MAX_DIGITS = 30  # more digits than any duration in range has, in any unit


class EvalError(RiskdError):
    """An expression failed at run time (overflow, division by zero, no such key...)."""

    status: ClassVar[str] = "INVALID_ARGUMENT"


class UInt(int):
    """A CEL ``uint``: a non-negative int that remembers its type."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"{int(self)}u"


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Duration:
    """A signed span of time in nanoseconds, within a 64-bit int (about 292 years).

    cel-spec limits a duration to a single int64 of nanoseconds ("roughly +-290
    years"), as cel-go's ``time.Duration`` is: beyond it, a conversion or an
    arithmetic result is an error. Its string form is the seconds in decimal,
    exactly: ``1.000000001s``, ``-0.5s``, ``90s``.

    >>> str(Duration(1)), str(Duration(-1_500_000_000)), str(Duration(5_400 * 10**9))
    ('0.000000001s', '-1.5s', '5400s')
    """

    ns: int

    @staticmethod
    def checked(ns: int) -> Duration:
        if not INT_MIN <= ns <= INT_MAX:
            raise EvalError("duration out of range")
        return Duration(ns)

    def __str__(self) -> str:
        seconds, frac = divmod(abs(self.ns), _NS)
        sign = "-" if self.ns < 0 else ""
        return sign + str(seconds) + (f".{frac:09d}".rstrip("0") if frac else "") + "s"


class ListValue(tuple[object, ...]):
    """A named list at run time: ordered like a list, ``in`` as fast as a set.

    Rules mostly ask ``x in blocked_devices``; with thousands of entries a
    tuple scan would cost per order what a hash lookup does not. A named list
    holds strings, or numbers (``riskd.dsl.ruleset``), never a bool or NaN; the
    constructor refuses anything else. Under CEL's equality a string equals only
    a string and a number only a number of the same value (``1 == 1.0 == 1u``,
    where Python's hashing and equality agree), while a bool, bytes, null, a
    list, a map, a duration or any other value equals neither. So ``in`` answers
    any probe, whatever the types the checker saw (a ``dyn`` value), with at most
    two hash lookups (an int against a double compares as doubles, past 2**53
    too), exactly as a scan with ``riskd.dsl.runtime.equals`` would.

    >>> v = ListValue(("a", "b", 1)); ("b" in v, 1.0 in v, True in v, v[0], len(v))
    (True, True, False, 'a', 3)
    """

    _members: frozenset[object]
    _doubles: frozenset[float]  # the double members
    _as_doubles: frozenset[float]  # every number member as a double

    def __new__(cls, values: tuple[object, ...] = ()) -> ListValue:
        if not all(_is_key(v) for v in values):
            raise TypeError("a named list holds strings and numbers other than NaN")
        self = super().__new__(cls, values)
        self._members = frozenset(values)
        numbers = [v for v in values if not isinstance(v, str)]
        self._doubles = frozenset(v for v in numbers if isinstance(v, float))
        self._as_doubles = frozenset(float(v) for v in numbers)  # type: ignore[arg-type]
        return self

    def __contains__(self, item: object) -> bool:
        if not _is_key(item):
            return False  # a NaN probe too: no member is NaN
        if item in self._members:
            return True
        # CEL compares an int with a double as doubles (``runtime.numbers_equal``), which
        # hashing does not: 2**53 + 1 equals the double 2.0**53 there, not here
        if isinstance(item, float):
            return item in self._as_doubles
        return isinstance(item, int) and float(item) in self._doubles


def _is_key(value: object) -> bool:
    """A string or a number, bool excepted: what CEL and Python compare alike."""
    return isinstance(value, str | int | float) and not isinstance(value, bool) and value == value


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """An instant as nanoseconds since the Unix epoch (UTC)."""

    ns: int

    @staticmethod
    def checked(ns: int) -> Timestamp:
        if not _TS_MIN_S * _NS <= ns <= (_TS_MAX_S + 1) * _NS - 1:
            raise EvalError("timestamp out of range")
        return Timestamp(ns)

    @staticmethod
    def from_seconds(seconds: float) -> Timestamp:
        """Epoch seconds as written: ``1700000000.001`` is .001000000, not .000999936.

        A double near today's epoch holds a second to about 240 ns, so ``seconds * 1e9``
        lands up to ~120 ns off the decimal the caller meant (and off a ``timestamp()``
        literal with that decimal). Whole microseconds are taken when they read back as
        the same double (any value given to 6 decimals), else the nearest nanosecond.

        >>> [str(Timestamp.from_seconds(s)) for s in (1700000000.001, 1.5, 5e-8, 1700000000)]
        ['2023-11-14T22:13:20.001Z', '1970-01-01T00:00:01.5Z', '1970-01-01T00:00:00.00000005Z', \
'2023-11-14T22:13:20Z']
        """
        if isinstance(seconds, int):
            return Timestamp.checked(seconds * _NS)
        micros = round(seconds * 1_000_000)
        if micros / 1_000_000 == seconds:
            return Timestamp.checked(micros * 1000)
        whole = math.floor(seconds)  # the fraction is then exact, and so its nanoseconds
        return Timestamp.checked(whole * _NS + round((seconds - whole) * _NS))

    def to_datetime(self) -> _dt.datetime:
        return _EPOCH + _dt.timedelta(microseconds=self.ns // 1000)

    def __str__(self) -> str:
        """RFC 3339 in UTC, the year always of four digits (``0001-01-01T00:00:00Z``)."""
        base = self.to_datetime().replace(tzinfo=None).isoformat(timespec="seconds")
        frac = self.ns % _NS
        return base + (f".{frac:09d}".rstrip("0") if frac else "") + "Z"


@dataclasses.dataclass(frozen=True, slots=True)
class TypeValue:
    """A CEL type as a value, e.g. the result of ``type(1)`` (``int``)."""

    name: str

    def __str__(self) -> str:
        return self.name


# Go's time.ParseDuration, which cel-go's duration() is: an optional sign, then
# numbers of ASCII digits, each with a unit ("µs" in either of Unicode's mu);
# "0" alone needs none. No blanks, no exponent, units in lower case.
_DUR_UNIT = "(h|ms|m|s|us|\u00b5s|\u03bcs|ns)"
_DUR_TEXT = re.compile(rf"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+){_DUR_UNIT})+")
_DUR_PART = re.compile(rf"([0-9]*)\.?([0-9]*){_DUR_UNIT}")
_UNIT_NS = {"h": 3600 * _NS, "m": 60 * _NS, "s": _NS, "ms": 10**6,
            "us": 1000, "\u00b5s": 1000, "\u03bcs": 1000, "ns": 1}  # fmt: skip


def parse_duration(text: str) -> Duration:
    """Parse a duration as cel-go does: ``"1h30m"``, ``"-2.5s"``, ``"+.5ms"``, ``"0"``.

    Each number's fraction is cut (not rounded) to whole nanoseconds, as Go does.

    >>> [str(parse_duration(t)) for t in ("1h30m", "-1.5s", "+1.s", ".5us", "1.0000000019s")]
    ['5400s', '-1.5s', '1s', '0.0000005s', '1.000000001s']
    """
    if text in ("0", "-0", "+0"):
        return Duration(0)
    if not _DUR_TEXT.fullmatch(text):
        raise EvalError("invalid duration")
    total = 0
    for whole, frac, unit in _DUR_PART.findall(text):
        scale = _UNIT_NS[unit]
        whole = whole.lstrip("0")
        if len(whole) > _DUR_MAX_DIGITS:  # int() refuses over 4300 digits; far out of range
            raise EvalError("duration out of range")
        total += int(whole or "0") * scale
        if frac:
            frac = frac[:_DUR_MAX_DIGITS]  # further digits are far below a nanosecond
            total += int(frac) * scale // 10 ** len(frac)
    return Duration.checked(-total if text.startswith("-") else total)


# RFC 3339 as cel-go's timestamp() reads it (its strict RFC 3339 gate, then Go's
# time.Parse): ASCII digits, upper-case "T" and "Z" (Go's parser is case-sensitive),
# a "." fraction of any length (cut to nanoseconds), a zone of "Z" or +hh:mm up to
# 23:59. Month, day, hour, minute and second are checked by datetime (no leap
# second, no 2026-02-30).
_TS_TEXT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:Z|([+-])([0-9]{2}):([0-9]{2}))"
)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
_SECOND = _dt.timedelta(seconds=1)


def parse_timestamp(text: str) -> Timestamp:
    """Parse an RFC 3339 timestamp as cel-go does, e.g. ``"2024-01-02T03:04:05+08:00"``.

    >>> str(parse_timestamp("2024-01-02T03:04:05.1234567891+08:00"))
    '2024-01-01T19:04:05.123456789Z'
    """
    m = _TS_TEXT.fullmatch(text)
    if m is None:
        raise EvalError("invalid timestamp")
    y, mo, d, h, mi, s = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    sign, zh, zm = m.group(8, 9, 10)
    if y == 0:
        raise EvalError("timestamp out of range")  # cel-spec: before 0001-01-01
    try:
        base = _dt.datetime(y, mo, d, h, mi, s, tzinfo=_dt.UTC)
    except ValueError as exc:
        raise EvalError("invalid timestamp") from exc
    offset = 0
    if sign is not None:
        if int(zh) > 23 or int(zm) > 59:
            raise EvalError("invalid timestamp")
        offset = (int(zh) * 3600 + int(zm) * 60) * (1 if sign == "+" else -1)
    nanos = int(m.group(7)[:9].ljust(9, "0")) if m.group(7) else 0
    return Timestamp.checked(((base - _EPOCH) // _SECOND - offset) * _NS + nanos)


# A fixed zone as cel-spec writes it ("+08:00"), or unsigned as cel-spec's
# conformance cases and cel-go also read it ("02:00"): two ASCII digits each, the
# hours to 23 and the minutes to 59, as cel-go checks them.
_FIXED_ZONE = re.compile(r"([+-]?)([0-9]{2}):([0-9]{2})")


def parse_zone(tz: str) -> _dt.tzinfo:
    """A timestamp method's time zone argument: an IANA name or a fixed offset.

    >>> str(parse_zone("-02:30")), str(parse_zone("08:00")), str(parse_zone("Asia/Shanghai"))
    ('UTC-02:30', 'UTC+08:00', 'Asia/Shanghai')
    """
    fixed = _FIXED_ZONE.fullmatch(tz)
    if fixed is not None:
        sign, hours, minutes = fixed.group(1, 2, 3)
        if int(hours) > 23 or int(minutes) > 59:
            raise EvalError("time zone offset out of range")
        offset = _dt.timedelta(hours=int(hours), minutes=int(minutes))
        return _dt.timezone(-offset if sign == "-" else offset)
    try:
        return zoneinfo.ZoneInfo(tz)
    except (ValueError, OSError, zoneinfo.ZoneInfoNotFoundError):
        raise EvalError("unknown time zone") from None


def type_name(value: object) -> str:
    """The CEL type name of a run-time value."""
    if value is None:
        return "null_type"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, UInt):
        return "uint"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bytes):
        return "bytes"
    if isinstance(value, list | tuple | frozenset | set):
        return "list"
    if isinstance(value, dict):
        return "map"
    if isinstance(value, Duration):
        return "google.protobuf.Duration"
    if isinstance(value, Timestamp):
        return "google.protobuf.Timestamp"
    if isinstance(value, TypeValue):
        return "type"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return type(value).__name__
    raise EvalError(f"unsupported value of Python type {type(value).__name__}")


def is_int(value: object) -> bool:
    """True for a CEL int (IntEnum members count; bool and uint do not)."""
    return isinstance(value, int) and not isinstance(value, bool | UInt)


def normalize(value: object) -> object:
    """Turn an IntEnum into a plain int; other values are returned unchanged."""
    if isinstance(value, enum.IntEnum):
        return int(value)
    return value
