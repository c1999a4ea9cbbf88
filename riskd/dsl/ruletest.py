"""Test cases of rule files: building them from ``test`` blocks and running them.

A ``test`` block gives an order (JSON-like; any field left out takes a test
default, and ``amounts`` are derived from the items when not given), the
shop's state, feature values by name (``count_per_device_1h``,
``sum_per_buyer_24h``, ``distinct_buyer_per_device_24h``...), the scoring
time ``now`` and the rule ids expected to fire::

    test "three accounts on one phone in a day" {
      order    = {buyer: {account_age_days: 1}, device_id: "dev-1"}
      features = {distinct_buyer_per_device_24h: 3}
      expect   = [shared_device_new_accounts]
    }

A feature the rules need but the test does not give is what a fresh store
would say about this order alone: counts and distinct counts are 1, sums are
the order's total. A case passes when the rules of its own file (plus the
expected ones) that hit are exactly ``expect``; a rule ERROR fails it.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from riskd.domain.features import KEYS, WINDOWS, Agg, FeatureQuery
from riskd.domain.order import Buyer, Item, Order
from riskd.domain.shop import ShopState
from riskd.dsl.program import Program, RuleStatus, RuleTest
from riskd.dsl.rulefile import Array, Entry, Name, Object, Pos, Reporter, Scalar, Value, When
from riskd.dsl.rulefile import Item as SyntaxItem
from riskd.dsl.values import EvalError, Timestamp, parse_timestamp

DEFAULT_NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z: tests never read the wall clock
TEST_FIELDS: tuple[str, ...] = ("order", "shop", "features", "now", "expect")

BAD_TEST_INPUT = "riskd_bad_test_input"
UNKNOWN_FEATURE = "riskd_unknown_feature"
UNKNOWN_RULE = "riskd_unknown_rule"

# Fields without a default in the domain dataclasses get these in tests.
_TEST_DEFAULTS: dict[type, dict[str, object]] = {
    Order: {
        "order_id": "test-order",
        "buyer": Buyer("test-buyer"),
        "shop_id": "test-shop",
        "merchant_id": "test-merchant",
    },
    Buyer: {"buyer_id": "test-buyer"},
    Item: {"sku": "test-sku", "category": "other", "unit_price": 0, "quantity": 1},
}


def feature_names() -> dict[str, FeatureQuery]:
    """Every feature a test may set, by ``FeatureQuery.name``."""
    out: dict[str, FeatureQuery] = {}
    for key in KEYS:
        for window in WINDOWS:
            for agg in (Agg.COUNT, Agg.SUM):
                q = FeatureQuery(agg, key, window)
                out[q.name] = q
            for of in KEYS:
                if of != key:
                    q = FeatureQuery(Agg.DISTINCT, key, window, of=of)
                    out[q.name] = q
    return out


_FEATURES = feature_names()


# ------------------------------------------------------------------------ building


@dataclass(frozen=True, slots=True)
class _Scope:
    """What a test may refer to: every rule id, and those of its own file."""

    all_rules: frozenset[str]
    file_rules: frozenset[str]


def build_test(
    item: SyntaxItem, all_rules: frozenset[str], file_rules: frozenset[str], rep: Reporter
) -> RuleTest | None:
    """Turn a ``test`` block into a ``RuleTest``; problems are reported, not raised.

    ``all_rules`` are the rule ids ``expect`` may name; ``file_rules`` those of
    the test's own file (the rules whose hits the test accounts for).
    """
    scope = _Scope(all_rules, file_rules)
    before = len(rep.items)
    fields = _fields_by_name(item, rep)
    order = _order(fields.get("order"), rep)
    shop = _shop(fields.get("shop"), order.shop_id, rep)
    features = _features(fields.get("features"), rep)
    now = _now(fields.get("now"), rep)
    expect = _expect(fields.get("expect"), item.pos, scope, rep)
    if len(rep.items) > before:
        return None
    return RuleTest(
        name=item.label,
        file=item.pos.file,
        line=item.pos.line,
        order=order,
        shop=shop,
        features=features,
        now=now,
        expect=expect,
        scope=scope.file_rules | expect,
    )


def _fields_by_name(item: SyntaxItem, rep: Reporter) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for f in item.fields:
        if f.name not in TEST_FIELDS:
            known = ", ".join(TEST_FIELDS)
            rep.report("riskd_unknown_field", f"tests have no field {f.name!r} ({known})", f.pos)
        elif f.name in out:
            rep.report("riskd_duplicate_field", f"field {f.name!r} is given twice", f.pos)
        elif isinstance(f.value, When):
            rep.report(BAD_TEST_INPUT, "'when' belongs in rules", f.pos)
        else:
            out[f.name] = f.value
    return out


def _order(value: Value | None, rep: Reporter) -> Order:
    if value is None:
        return _derive_amounts(_build(Order, Object(()), rep), Object(()))
    if not isinstance(value, Object):
        rep.report(BAD_TEST_INPUT, "order must be an object {...}", value.pos)
        return _build(Order, Object(()), rep)
    return _derive_amounts(_build(Order, value, rep), value)


def _derive_amounts(order: Order, given: Object) -> Order:
    """Fill amounts.items from the items and amounts.total from the parts, unless given."""
    amounts_obj = next((e.value for e in given.entries if e.key == "amounts"), Object(()))
    keys = {e.key for e in amounts_obj.entries} if isinstance(amounts_obj, Object) else set()
    a = order.amounts
    if "items" not in keys:
        a = dataclasses.replace(a, items=sum(i.unit_price * i.quantity for i in order.items))
    if "total" not in keys:
        a = dataclasses.replace(a, total=a.items - a.discount - a.coupon + a.shipping)
    return dataclasses.replace(order, amounts=a)


def _shop(value: Value | None, shop_id: str, rep: Reporter) -> ShopState:
    if value is None:
        return ShopState(shop_id)
    if not isinstance(value, Object):
        rep.report(BAD_TEST_INPUT, "shop must be an object {...}", value.pos)
        return ShopState(shop_id)
    entries = value.entries
    if not any(e.key == "shop_id" for e in entries):
        entries = (Entry("shop_id", Scalar(shop_id, "string")), *entries)
    return _build(ShopState, Object(entries, value.pos), rep)


def _features(value: Value | None, rep: Reporter) -> Mapping[FeatureQuery, int]:
    if value is None:
        return {}
    if not isinstance(value, Object):
        rep.report(BAD_TEST_INPUT, "features must be an object {name: count}", value.pos)
        return {}
    out: dict[FeatureQuery, int] = {}
    for e in value.entries:
        q = _FEATURES.get(e.key)
        if q is None:
            hint = "e.g. count_per_device_1h, sum_per_buyer_24h, distinct_buyer_per_device_24h"
            rep.report(UNKNOWN_FEATURE, f"no feature named {e.key!r} ({hint})", e.pos)
        elif not (isinstance(e.value, Scalar) and e.value.kind == "int"):
            rep.report(BAD_TEST_INPUT, f"feature {e.key!r} must be an integer", e.value.pos)
        else:
            out[q] = int(typing.cast(int, e.value.value))
    return out


def _now(value: Value | None, rep: Reporter) -> float:
    if value is None:
        return DEFAULT_NOW
    if isinstance(value, Scalar) and value.kind in ("int", "float"):
        seconds = float(typing.cast(float, value.value))
        if _instant(seconds) is None:
            rep.report(BAD_TEST_INPUT, "now is out of range (years 1 to 9999)", value.pos)
            return DEFAULT_NOW
        return seconds
    if isinstance(value, Scalar) and value.kind == "string":
        try:
            ns = parse_timestamp(str(value.value)).ns
        except EvalError:
            ns = None
        if ns is not None:
            return _seconds_of(ns, value.pos, rep)
    rep.report(BAD_TEST_INPUT, "now must be epoch seconds or an RFC 3339 string", value.pos)
    return DEFAULT_NOW


def _instant(seconds: float) -> Timestamp | None:
    """What evaluation turns ``seconds`` into (``Program.evaluate``), None: out of range."""
    try:
        return Timestamp.from_seconds(seconds)
    except (EvalError, OverflowError, ValueError):
        return None


def _seconds_of(ns: int, pos: Pos, rep: Reporter) -> float:
    """The epoch seconds (a double, as the service's clock gives them) that evaluation
    turns into the instant ``ns`` exactly; reported when there are none (finer than a
    double holds there: review, ``now = "...13:30:00.0000005Z"`` was tested as
    ``.000000477``), so a test never runs at an instant other than the one written.

    ``ns / 10**9`` is the nearest double (``ns / 1e9`` rounds twice: review, ``.25`` was
    tested as ``.249999762``)."""
    seconds = ns / 10**9
    instant = _instant(seconds)
    if instant is None:
        rep.report(BAD_TEST_INPUT, "now is out of range (years 1 to 9999)", pos)
        return DEFAULT_NOW
    if instant.ns != ns:
        rep.report(
            BAD_TEST_INPUT,
            f"now is finer than epoch seconds hold at that time; the nearest is {instant}",
            pos,
        )
        return DEFAULT_NOW
    return seconds


def _expect(value: Value | None, at: Pos, scope: _Scope, rep: Reporter) -> frozenset[str]:
    if value is None:
        rep.report("riskd_missing_field", "test needs 'expect = [rule ids]'", at)
        return frozenset()
    if not isinstance(value, Array):
        rep.report(BAD_TEST_INPUT, "expect must be a list of rule ids", value.pos)
        return frozenset()
    out: set[str] = set()
    for v in value.items:
        if not isinstance(v, Name):
            rep.report(BAD_TEST_INPUT, "expect must list rule ids (bare names)", v.pos)
        elif v.name not in scope.all_rules:
            rep.report(UNKNOWN_RULE, f"no rule named {v.name!r}", v.pos)
        else:
            out.add(v.name)
    return frozenset(out)


_C = typing.TypeVar("_C")


def _build(cls: type[_C], obj: Object, rep: Reporter) -> _C:
    """A dataclass instance from an object literal, type-checked field by field."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    kwargs: dict[str, object] = dict(_TEST_DEFAULTS.get(cls, {}))
    seen: set[str] = set()
    for e in obj.entries:
        if e.key not in names:
            rep.report("riskd_unknown_field", f"{cls.__name__} has no field {e.key!r}", e.pos)
            continue
        if e.key in seen:
            rep.report("riskd_duplicate_field", f"field {e.key!r} is given twice", e.pos)
            continue
        seen.add(e.key)
        ok, converted = _convert(hints[e.key], e.value, f"{cls.__name__}.{e.key}", rep)
        if ok:
            kwargs[e.key] = converted
    return cls(**kwargs)


def _convert(hint: object, value: Value, where: str, rep: Reporter) -> tuple[bool, object]:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, Object):
            return True, _build(hint, value, rep)
        return _bad(where, "an object {...}", value, rep)
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        return _enum(hint, value, where, rep)
    if typing.get_origin(hint) is tuple:
        (elem, _) = typing.get_args(hint)
        if not isinstance(value, Array):
            return _bad(where, "a list [...]", value, rep)
        results = [_convert(elem, v, where + "[]", rep) for v in value.items]
        return all(ok for ok, _ in results), tuple(v for _, v in results)
    return _scalar(hint, value, where, rep)


def _scalar(hint: object, value: Value, where: str, rep: Reporter) -> tuple[bool, object]:
    want = {str: ("string",), int: ("int",), bool: ("bool",), float: ("int", "float")}
    kinds = want.get(hint)  # type: ignore[call-overload]
    assert kinds is not None, f"unsupported field type {hint!r}"
    if isinstance(value, Scalar) and value.kind in kinds:
        return True, float(typing.cast(float, value.value)) if hint is float else value.value
    names = {str: "a string", int: "an integer", bool: "true or false", float: "a number"}
    return _bad(where, names[hint], value, rep)  # type: ignore[index]


def _enum(hint: type[enum.IntEnum], value: Value, where: str, rep: Reporter) -> tuple[bool, object]:
    if isinstance(value, Scalar) and value.kind == "int":
        try:
            return True, hint(typing.cast(int, value.value))
        except ValueError:
            pass
    text = value.name if isinstance(value, Name) else None
    if isinstance(value, Scalar) and value.kind == "string":
        text = str(value.value)
    if text is not None and text.upper() in hint.__members__:
        return True, hint[text.upper()]
    choices = ", ".join(m.name for m in hint)
    return _bad(where, f"one of {choices}", value, rep)


def _bad(where: str, expected: str, value: Value, rep: Reporter) -> tuple[bool, object]:
    rep.report(BAD_TEST_INPUT, f"{where} must be {expected}", value.pos)
    return False, None


# ------------------------------------------------------------------------- running


@dataclass(frozen=True, slots=True)
class CaseResult:
    """The outcome of one test case."""

    test: RuleTest
    fired: frozenset[str]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    errors: tuple[tuple[str, str], ...]
    why: tuple[tuple[str, tuple[str, ...]], ...] = ()  # rule id -> explanation, on failure

    @property
    def passed(self) -> bool:
        return not (self.missing or self.unexpected or self.errors)

    def describe(self) -> str:
        """``PASS file:line name`` or ``FAIL ...`` with what went wrong, for people."""
        head = f"{'PASS' if self.passed else 'FAIL'} {self.test.file}:{self.test.line} "
        lines = [head + self.test.name]
        if self.missing:
            lines.append(f"     expected to fire but did not: {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"     fired but not expected: {', '.join(self.unexpected)}")
        lines.extend(f"     {rid}: error: {msg}" for rid, msg in self.errors)
        for rid, explanation in self.why:
            lines.append(f"     why {rid}:")
            lines.extend(f"       {e}" for e in explanation)
        return "\n".join(lines)


def features_for(program: Program, test: RuleTest) -> dict[FeatureQuery, int]:
    """The test's features, with what a fresh store would say for the ones it leaves out."""
    out: dict[FeatureQuery, int] = {}
    for q in program.feature_queries:
        out[q] = test.order.amounts.total if q.agg is Agg.SUM else 1
    out.update(test.features)
    return out


def run_test(program: Program, test: RuleTest) -> CaseResult:
    """Evaluate one case; a failure carries the explanation of each rule that surprised."""
    features = features_for(program, test)
    results = program.evaluate(test.order, test.shop, features, test.now)
    in_scope = [r for r in results if r.rule_id in test.scope]
    fired = frozenset(r.rule_id for r in in_scope if r.status is RuleStatus.HIT)
    errors = tuple((r.rule_id, r.error) for r in in_scope if r.status is RuleStatus.ERROR)
    missing = tuple(sorted(test.expect - fired))
    unexpected = tuple(sorted(fired - test.expect))
    why: list[tuple[str, tuple[str, ...]]] = []
    if missing or unexpected:
        act = program.activation(test.order, test.shop, features, test.now)
        for rid in (*missing, *unexpected):
            rule = program.rule(rid)
            if rule is not None and rule.expr is not None:
                why.append((rid, _why(rule.expr.explain, act)))
    return CaseResult(test, fired, missing, unexpected, errors, tuple(why))


def _why(
    explain: Callable[[Mapping[str, object]], tuple[str, ...]], act: Mapping[str, object]
) -> tuple[str, ...]:
    """A rule's explanation for a failing case; a failure to explain is one line, not a crash."""
    try:
        return explain(act)
    except EvalError as exc:
        return (f"explanation failed: {exc}",)
    except Exception as exc:
        return (f"explanation failed ({type(exc).__name__})",)


def run_tests(program: Program) -> tuple[CaseResult, ...]:
    """Run every test case of the program's rule files, in file order."""
    return tuple(run_test(program, t) for t in program.tests)


def summary(results: tuple[CaseResult, ...]) -> str:
    failed = sum(1 for r in results if not r.passed)
    return f"{len(results) - failed} passed, {failed} failed, {len(results)} test cases"
