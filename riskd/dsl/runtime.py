"""Run-time semantics shared by the compiled code and the reference interpreter.

Equality, ordering, membership, indexing, map construction and the integer
range checks live here once; the builtin implementations in ``functions``
and the compiler's helpers both call them.

An ``EvalError``'s message never quotes a run-time value (an index, a key, a
string): it reaches the decision log and explanations, and the value may be
personal data. Types, and names written in the rule itself, are fine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from typing import Any

from riskd.domain.features import FeatureQuery
from riskd.dsl.values import (
    INT_MAX,
    INT_MIN,
    UINT_MAX,
    Duration,
    EvalError,
    ListValue,
    Timestamp,
    TypeValue,
    UInt,
    type_name,
)

_SIMPLE = (str, bytes, bool, float)
_LISTS = (list, tuple, frozenset, set)


def check_int(r: int) -> int:
    if INT_MIN <= r <= INT_MAX:
        return r
    raise EvalError("integer overflow")


def check_uint(r: int) -> UInt:
    if 0 <= r <= UINT_MAX:
        return UInt(r)
    raise EvalError("unsigned integer overflow")


MAX_CONCAT = 1 << 20  # elements or characters a concatenation may produce
MAX_COMPREHENSION = MAX_CONCAT  # elements a map() or filter() may range over (and produce)


def concat(a: Any, b: Any) -> Any:
    """``a + b`` for strings, bytes and lists, bounded so no rule can exhaust memory."""
    if len(a) + len(b) > MAX_CONCAT:
        raise EvalError(f"concatenation longer than {MAX_CONCAT}")
    if isinstance(a, str | bytes):
        return a + b
    return [*a, *b]


def bounded(target: Any) -> Any:
    """A ``map()``/``filter()`` target, refused when its output could exhaust memory."""
    if len(target) > MAX_COMPREHENSION:
        raise EvalError(f"{MAX_COMPREHENSION} elements is the most a comprehension may produce")
    return target


def as_eval_error(exc: Exception) -> EvalError:
    """``exc`` as the ``EvalError`` a rule reports: a Python error never escapes a rule.

    The message names the error's type, never its text (which may quote a value).
    """
    if isinstance(exc, EvalError):
        return exc
    if isinstance(exc, KeyError):
        key = exc.args[0] if exc.args else ""
        if isinstance(key, FeatureQuery):
            return EvalError(f"missing feature {key.name}")
        if isinstance(key, str) and (key.isidentifier() or key == "@features"):
            return EvalError(f"missing input {key}")
    return EvalError(f"evaluation failed ({type(exc).__name__})")


def is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def equals(a: object, b: object) -> bool:
    """CEL's heterogeneous equality: never an error; numbers compare by value."""
    ta, tb = type(a), type(b)
    if ta is tb and ta in _SIMPLE:
        return a == b
    if is_number(a) and is_number(b):
        return numbers_equal(a, b)
    if a is None or b is None:
        return a is b
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, _LISTS) and isinstance(b, _LISTS):
        if len(a) != len(b):
            return False
        return all(equals(x, y) for x, y in zip(_ordered(a), _ordered(b), strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return _map_equals(a, b)
    if type_name(a) != type_name(b):
        return False
    return a == b


def _ordered(v: Iterable[object]) -> list[object]:
    return sorted(v, key=repr) if isinstance(v, frozenset | set) else list(v)


def _map_equals(a: dict[object, object], b: dict[object, object]) -> bool:
    if len(a) != len(b):
        return False
    for k, v in a.items():
        found, other = lookup(b, k)
        if not found or not equals(v, other):
            return False
    return True


def lookup(m: Mapping[object, object], key: object) -> tuple[bool, object]:
    """Find ``key`` in a CEL map (bool keys never match numeric ones)."""
    if isinstance(key, float):
        if not key.is_integer():
            return False, None
    elif not isinstance(key, str | int):
        return False, None
    try:
        value = m[key]
    except (KeyError, TypeError):
        return False, None
    if isinstance(key, bool) or (key == 0 or key == 1):
        for k in m:
            if k == key and isinstance(k, bool) == isinstance(key, bool):
                return True, m[k]
        return False, None
    return True, value


def numbers_equal(a: Any, b: Any) -> bool:
    """``==`` between two numbers as cel-go has it: ``compare(a, b) == 0``.

    An int (uint) against a double is compared as a double, as ``<`` and ``>=`` compare
    it, so ``dyn(9007199254740993) == 9007199254740992.0`` is true: were ``==`` exact,
    ``a <= b && a >= b && a != b`` would hold for that pair.
    """
    if isinstance(a, float) or isinstance(b, float):
        return float(a) == float(b)
    return bool(a == b)


def compare(a: object, b: object) -> int:
    """-1, 0 or 1 for an ordered pair of the same kind (numbers mix freely)."""
    x: Any = a
    y: Any = b
    if is_number(a) and is_number(b):
        # CEL orders an int against a double by converting the int to double.
        if isinstance(a, float) or isinstance(b, float):
            x, y = float(x), float(y)
    elif not (type(a) is type(b) and isinstance(a, str | bytes | bool | Duration | Timestamp)):
        raise EvalError(f"no such overload: cannot order {type_name(a)} and {type_name(b)}")
    if x < y:
        return -1
    if x > y:
        return 1
    return 0 if x == y else 2  # 2: unordered (NaN)


def less(a: object, b: object) -> bool:
    return compare(a, b) == -1


def less_equals(a: object, b: object) -> bool:
    return compare(a, b) in (-1, 0)


def greater(a: object, b: object) -> bool:
    return compare(a, b) == 1


def greater_equals(a: object, b: object) -> bool:
    return compare(a, b) in (0, 1)


def contains(container: object, item: object) -> bool:
    """``item in container`` for a CEL list or map."""
    if isinstance(container, ListValue):
        return item in container  # one hash lookup at most: see ``ListValue``
    if isinstance(container, frozenset | set) and type(item) in (str, int):
        return item in container or any(equals(item, x) for x in container if is_number(x))
    if isinstance(container, _LISTS):
        return any(equals(item, x) for x in container)
    if isinstance(container, dict):
        return lookup(container, item)[0]
    raise EvalError(f"no such overload: 'in' on {type_name(container)}")


def index(container: object, key: object) -> object:
    """``container[key]`` for a list (int index) or a map."""
    if isinstance(container, list | tuple):
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if not isinstance(key, int) or isinstance(key, bool):
            raise EvalError(f"invalid argument: list index of type {type_name(key)}")
        if not 0 <= key < len(container):
            raise EvalError("invalid argument: index out of range")  # never the value: PII
        return normalize_value(container[key])
    if isinstance(container, dict):
        found, value = lookup(container, key)
        if not found:
            raise EvalError("no such key")
        return normalize_value(value)
    raise EvalError(f"no such overload: cannot index {type_name(container)}")


def select(operand: object, name: str) -> object:
    """``operand.name`` on a map or an object whose type the checker did not know."""
    if isinstance(operand, dict):
        found, value = lookup(operand, name)
        if not found:
            raise EvalError(f"no such key: {name!r}")
        return normalize_value(value)
    if _has_field(operand, name):
        return normalize_value(getattr(operand, name))
    raise EvalError(f"no such field {name!r} on {type_name(operand)}")


def has(operand: object, name: str) -> bool:
    """``has(operand.name)``: a map key is present, or an object field is set."""
    if isinstance(operand, dict):
        return lookup(operand, name)[0]
    if _has_field(operand, name):
        return is_set(getattr(operand, name))
    raise EvalError(f"no such overload: has() on {type_name(operand)}")


def is_set(value: object) -> bool:
    """Proto3-style presence: a scalar is set when it is not its zero value."""
    if dataclasses.is_dataclass(value):
        return True
    return value not in (None, "", b"", 0, False, (), []) or isinstance(value, Duration)


def _has_field(operand: object, name: str) -> bool:
    if name.startswith("_") or not dataclasses.is_dataclass(operand) or isinstance(operand, type):
        return False
    return name in _field_names(type(operand))


@functools.cache  # the request's dataclass types: a handful, fixed by the code
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls))


def make_map(pairs: Iterable[tuple[object, object]]) -> dict[object, object]:
    """Build a map literal; keys must be int, uint, string or bool, and distinct."""
    out: dict[object, object] = {}
    seen: list[object] = []
    for k, v in pairs:
        if not isinstance(k, str | int):
            raise EvalError(f"unsupported key type {type_name(k)}")
        if contains(seen, k):
            raise EvalError("map literal with a repeated key")
        if k in out:  # true and 1 (false and 0): one Python key, two CEL keys
            raise EvalError("unsupported map: a bool key and a number key of equal value")
        seen.append(k)
        out[k] = v
    return out


def iterate(target: object) -> Iterable[object]:
    """The elements a macro ranges over: list elements or map keys."""
    if isinstance(target, (*_LISTS, dict)):
        return [normalize_value(x) for x in target]
    raise EvalError(f"no such overload: cannot range over {type_name(target)}")


def as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise EvalError(f"no such overload: expected bool, got {type_name(value)}")


def normalize_value(value: object) -> object:
    """IntEnum members become plain ints; everything else passes through."""
    if type(value) is int or not isinstance(value, int) or isinstance(value, bool | UInt):
        return value
    return int(value)


def type_of(value: object) -> TypeValue:
    name = type_name(value)
    return TypeValue({"google.protobuf.Duration": "google.protobuf.Duration"}.get(name, name))
