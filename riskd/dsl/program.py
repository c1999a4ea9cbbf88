"""Rule programs: a checked, compiled, immutable rule set and its evaluation.

Where it sits in the flow: rule files → ``rulefile.parse`` → ``compile_rules``
(declarations, field checks, each ``when`` through ``riskd.dsl.expr``) →
``Program``; the engine calls ``Program.evaluate`` once per order with the
feature snapshot it fetched for ``Program.feature_queries``.

``compile_rules`` reports every problem of every file at once by raising
``riskd.errors.RuleCompileError``; ``Program.evaluate`` never raises for a
rule's run-time error: that rule's result is ``RuleStatus.ERROR``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from riskd.domain.decision import Outcome
from riskd.domain.features import FeatureQuery
from riskd.domain.order import Order
from riskd.domain.shop import ShopState
from riskd.dsl.diagnostics import Diagnostic, Diagnostics
from riskd.dsl.expr import CompiledExpr
from riskd.dsl.fusion import Fused, fuse
from riskd.dsl.tracer import PII_FIELDS
from riskd.dsl.values import EvalError, Timestamp
from riskd.errors import RuleCompileError

_log = logging.getLogger("riskd.dsl.rules")

FEATURES_VAR = "@features"
RULE_FILE_SUFFIX = ".rules"
UNREADABLE = "riskd_unreadable_file"
UNWRITABLE = "riskd_unwritable_file"


class Mode(enum.Enum):
    """Whether a rule's hits count: ACTIVE enforce, SHADOW only record, DISABLED skip."""

    ACTIVE = "active"
    SHADOW = "shadow"
    DISABLED = "disabled"


class RuleStatus(enum.Enum):
    HIT = "hit"
    NO_HIT = "no_hit"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule; ``file``/``line`` say where it is defined."""

    id: str
    description: str
    owner: str
    scenarios: tuple[str, ...]
    mode: Mode
    action: Outcome
    score: float
    reason_code: str
    when: str = ""
    file: str = ""
    line: int = 0
    expr: CompiledExpr | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RuleResult:
    """What one rule said about one order (data, never an exception)."""

    rule_id: str
    status: RuleStatus
    mode: Mode
    action: Outcome
    score: float
    reason_code: str
    error: str = ""
    explanation: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Scenario:
    """A transaction scenario tag rules can claim to cover (from ``scenario`` lines)."""

    tag: str
    description: str
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class RuleTest:
    """One ``test`` block: an input and the rules expected to fire.

    ``scope`` is the rule ids of the test's own file plus the expected ones:
    rules of other files that also fire do not fail it.
    """

    name: str
    file: str
    line: int
    order: Order
    shop: ShopState
    features: Mapping[FeatureQuery, int]
    now: float
    expect: frozenset[str]
    scope: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Step:
    """A rule ready to run: its evaluate function and its two precomputed results."""

    rule: Rule
    run: Callable[[Mapping[str, object]], object]
    hit: RuleResult
    no_hit: RuleResult


@dataclass(frozen=True, slots=True)
class Program:
    """An immutable, compiled rule set; ``version`` is a content hash of its files."""

    version: str
    rules: tuple[Rule, ...]
    lists: Mapping[str, tuple[object, ...]]
    scenarios: tuple[str, ...]
    scenario_info: tuple[Scenario, ...] = ()
    feature_queries: frozenset[FeatureQuery] = frozenset()
    tests: tuple[RuleTest, ...] = field(default=(), compare=False, repr=False)
    constants: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    _steps: tuple[_Step, ...] = field(default=(), compare=False, repr=False)
    _base: Mapping[str, object] = field(default_factory=dict, compare=False, repr=False)
    _fused: Fused | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def build(
        version: str,
        rules: tuple[Rule, ...],
        lists: Mapping[str, tuple[object, ...]],
        scenarios: tuple[Scenario, ...],
        tests: tuple[RuleTest, ...] = (),
        constants: Mapping[str, object] | None = None,
    ) -> Program:
        """Assemble a program from compiled rules (``compile_rules`` is the usual way)."""
        steps = tuple(_step(r) for r in rules if r.mode is not Mode.DISABLED)
        queries = frozenset(q for r in rules for q in _queries(r))
        base = MappingProxyType({**(constants or {}), **lists})
        fused = _fuse(steps, base)
        return Program(
            version=version,
            rules=rules,
            lists=MappingProxyType(dict(lists)),
            scenarios=tuple(s.tag for s in scenarios),
            scenario_info=scenarios,
            feature_queries=queries,
            tests=tests,
            constants=MappingProxyType(dict(constants or {})),
            _steps=steps,
            _base=base,
            _fused=fused,
        )

    def rule(self, rule_id: str) -> Rule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None

    def activation(
        self, order: Order, shop: ShopState, features: Mapping[FeatureQuery, int], now: float
    ) -> dict[str, object]:
        """The variables every ``when`` sees for one order (built once per evaluation)."""
        act = dict(self._base)
        act["order"] = order
        act["shop"] = shop
        act["now"] = Timestamp.from_seconds(now)
        act[FEATURES_VAR] = features
        return act

    def evaluate(
        self,
        order: Order,
        shop: ShopState,
        features: Mapping[FeatureQuery, int],
        now: float,
        *,
        explain: bool = False,
    ) -> tuple[RuleResult, ...]:
        """Run every non-disabled rule on one order; one result per rule, in file order.

        ``features`` must hold every query in ``feature_queries`` (a missing one
        is an ERROR for the rules that read it). With ``explain``, hits carry
        their sub-conditions and values.
        """
        results: tuple[RuleResult, ...] | None = None
        if self._fused is not None:
            # lists and constants are bound inside the fused code: only the request travels
            fast = {"order": order, "shop": shop, "now": Timestamp.from_seconds(now)}
            fast[FEATURES_VAR] = features
            try:
                results = self._fused(fast)  # type: ignore[assignment]
            except Exception:  # a variable the shared prologue could not read
                results = None
        if results is None:
            results = self._evaluate_each(self.activation(order, shop, features, now), order)
        if not self.feature_queries <= features.keys():
            results = self._missing(results, features)
        if explain:
            results = self.explain(order, shop, features, now, results)
        return results

    def explain(
        self,
        order: Order,
        shop: ShopState,
        features: Mapping[FeatureQuery, int],
        now: float,
        results: Sequence[RuleResult],
    ) -> tuple[RuleResult, ...]:
        """``results`` (this program's ``evaluate`` of the same inputs) with hits explained.

        Only the rules that hit run again, traced: the caller that evaluated untraced
        first (most orders hit nothing) does not pay for a second run of every rule.
        Never raises for one rule: a rule whose explanation fails keeps its result,
        explained as ``explanation failed ...``.
        """
        hit = RuleStatus.HIT
        act = self.activation(order, shop, features, now)
        forms = _secret_forms(order)  # once per order, not once per line of each hit
        return tuple(
            _explained(s, act, forms) if r.status is hit else r
            for s, r in zip(self._steps, results, strict=True)
        )

    def _missing(
        self, results: Sequence[RuleResult], features: Mapping[FeatureQuery, int]
    ) -> tuple[RuleResult, ...]:
        """A rule reading a velocity value ``features`` lacks is an ERROR whatever the rest
        of its condition says: docs/dsl.md's "the whole rule is an error" (review: the
        compiled code short-circuited past the value, so `orders(…) > 20 || total > 500`
        was an ERROR and the same with its operands swapped a hit). In degraded mode the
        fallback policy answers for such rules, whatever order their operands are in."""
        missing = {q for q in self.feature_queries if q not in features}
        out = list(results)
        error = RuleStatus.ERROR
        for i, step in enumerate(self._steps):
            r = out[i]
            if r.status is error and r.error.startswith("missing feature "):
                continue  # most of them: the evaluation met the missing value already
            reads = _queries(step.rule)
            if reads and not reads.isdisjoint(missing):
                gone = min(q.name for q in reads & missing)
                out[i] = _error(step, f"missing feature {gone}")
        return tuple(out)

    def _evaluate_each(self, act: Mapping[str, object], order: Order) -> tuple[RuleResult, ...]:
        """One call per rule: the path when the program could not be fused."""
        out: list[RuleResult] = []
        append = out.append
        for step in self._steps:
            try:
                value = step.run(act)
            except Exception:  # the raw compiled code; _failure gets the EvalError's message
                append(_error(step, _scrub(_failure(step, act), order)))
                continue
            if value is True:
                append(step.hit)
            elif value is False:
                append(step.no_hit)
            else:
                append(_error(step, "'when' did not produce a bool"))
        return tuple(out)


def _fuse(steps: tuple[_Step, ...], static: Mapping[str, object]) -> Fused | None:
    """All rules as one function (see ``riskd.dsl.fusion``), or None to call them one by one."""
    exprs = [s.rule.expr for s in steps]
    if not steps or any(e is None for e in exprs):
        return None

    def on_error(i: int, request: Mapping[str, object]) -> RuleResult:
        step = steps[i]
        act = {**static, **request}
        order = act.get("order")
        message = _failure(step, act)
        return _error(step, _scrub(message, order) if isinstance(order, Order) else message)

    try:
        return fuse(
            [e for e in exprs if e is not None],
            [s.hit for s in steps],
            [s.no_hit for s in steps],
            on_error,
            static,
        )
    except Exception:  # the compiler could not re-emit a rule: fall back, never fail a load
        _log.warning("rule program could not be fused; evaluating rule by rule", exc_info=True)
        return None


def _step(rule: Rule) -> _Step:
    assert rule.expr is not None, f"rule {rule.id} is not compiled"
    hit = RuleResult(rule.id, RuleStatus.HIT, rule.mode, rule.action, rule.score, rule.reason_code)
    no_hit = dataclasses.replace(hit, status=RuleStatus.NO_HIT)
    # ``fn`` is the compiled code itself: the hot path skips evaluate()'s exception mapping
    # and pays for it only when a rule fails (see _failure).
    return _Step(rule, rule.expr.fn, hit, no_hit)


def _failure(step: _Step, act: Mapping[str, object]) -> str:
    """The EvalError message of a rule that raised (re-run through ``evaluate``)."""
    assert step.rule.expr is not None
    try:
        step.rule.expr.evaluate(act)
    except EvalError as exc:
        return str(exc)
    return "'when' did not produce a bool"


def _queries(rule: Rule) -> frozenset[FeatureQuery]:
    if rule.expr is None or rule.mode is Mode.DISABLED:
        return frozenset()
    return rule.expr.feature_queries


def _error(step: _Step, message: str) -> RuleResult:
    return dataclasses.replace(step.no_hit, status=RuleStatus.ERROR, error=message)


def _explained(step: _Step, act: Mapping[str, object], forms: Sequence[str]) -> RuleResult:
    """``step``'s hit, explained; ``forms``: ``_secret_forms`` of the order in ``act``."""
    assert step.rule.expr is not None
    try:
        lines = step.rule.expr.explain(act)
    except EvalError as exc:  # explain re-runs the expression; report, do not fail
        lines = (f"explanation failed: {exc}",)
    except Exception as exc:  # never lose the results for one rule's explanation
        _log.warning(
            "rule explanation failed",
            extra={"fields": {"rule_id": step.rule.id, "error_type": type(exc).__name__}},
        )
        lines = (f"explanation failed ({type(exc).__name__})",)
    # explanations quote values: never a PII one
    lines = tuple(_scrub_forms(line, forms) for line in lines)
    return dataclasses.replace(step.hit, explanation=lines)


def _scrub(message: str, order: Order) -> str:
    """Mask any PII value of the order that a message might quote.

    The tracer already writes ``"***"`` for PII values; this catches what it does not
    render (an error message quoting a value). A value is found verbatim, escaped the
    way ``format_value`` (JSON) or ``repr`` writes it, or cut short by a clip (``…``).
    """
    return _scrub_forms(message, _secret_forms(order))


def _secret_forms(order: object) -> tuple[str, ...]:
    """What ``_scrub`` looks for: each PII value of ``order`` (none when it is not an
    ``Order``) in each form text may quote it, a value's longest form first."""
    if not isinstance(order, Order):
        return ()
    return tuple(
        form for secret in _pii_values(order) if len(secret) >= 2 for form in _quoted_forms(secret)
    )


def _scrub_forms(message: str, forms: Sequence[str]) -> str:
    """``_scrub`` with the forms computed once for many messages of one order."""
    for form in forms:
        if form in message:
            message = message.replace(form, "***")
        if _CLIP in message:
            message = _scrub_clipped(message, form)
    return message


_CLIP = "…"
_MIN_CLIPPED = 4  # a shorter prefix before a clip is too likely to be something else


def _pii_values(order: Order) -> Iterator[str]:
    """The order's values of the fields ``riskd.dsl.tracer.PII_FIELDS`` names."""
    for holder in (order, order.buyer, order.buyer.address):
        for name in sorted(PII_FIELDS.get(type(holder), ())):
            value = getattr(holder, name)
            if isinstance(value, str):
                yield value


def _quoted_forms(secret: str) -> list[str]:
    """``secret`` as text may hold it: verbatim, JSON-escaped (both ways), repr-escaped;
    the longest first, so that no shorter form breaks a longer one apart."""
    forms = {
        secret,
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
    }
    return sorted(forms, key=len, reverse=True)


def _scrub_clipped(message: str, form: str) -> str:
    """Mask each run of text that starts like ``form`` and is cut off by a clip (``…``)."""
    head = form[:_MIN_CLIPPED]
    if len(form) <= _MIN_CLIPPED:
        return message
    start = message.find(head)
    while start >= 0:
        end = message.find(_CLIP, start)
        if end < 0:
            break
        if form.startswith(message[start:end]):
            message = message[:start] + "***" + message[end:]
        start = message.find(head, start + 1)
    return message


# ------------------------------------------------------------------ compile facade


def rule_files(directory: Path) -> tuple[Path, ...]:
    """The rule files of a directory (``*.rules``, recursively), in a stable order.

    Hidden files and folders (a name starting with ``.``) are skipped: an editor's or
    an atomic writer's temporary file, and the ``..data``/``..2026_…`` folders behind
    the symlinks of a Kubernetes ConfigMap mount, which would define every rule twice.
    A folder symlink that leads to a folder inside ``directory`` is followed (review: a
    ConfigMap item under a subfolder, ``team_a -> ..data/team_a``, was never read:
    ``Path.rglob`` follows none), each real folder once; one that leads outside it
    (``up -> ..``, ``prev -> ../rules.prev``) is not, as before.

    A ``*.rules`` link that leads nowhere (its target deleted) is listed, so that reading
    it fails the load (``riskd_unreadable_file``): skipped, a reload served the rules
    without that file's, silently. Other names that are not files (a pipe) are skipped.
    """
    found: list[Path] = []
    root = os.path.realpath(directory)
    seen: set[str] = set()
    for top, dirs, names in os.walk(directory, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [
            d
            for d in dirs
            if not d.startswith(".") and _within(os.path.realpath(os.path.join(top, d)), root)
        ]
        here = Path(top)
        found.extend(
            here / n
            for n in names
            if n.endswith(RULE_FILE_SUFFIX) and not n.startswith(".") and _rule_file(here / n)
        )
    return tuple(sorted(found))


def _rule_file(path: Path) -> bool:
    """A file, or a link to nothing (``rule_files``)."""
    return path.is_file() or (path.is_symlink() and not path.exists())


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def content_version(sources: Mapping[str, str]) -> str:
    """A content hash of the rule files: names (as given) and texts, order-independent."""
    h = hashlib.sha256()
    for name in sorted(sources):
        text = sources[name].encode()
        h.update(f"{Path(name).name}\0{len(text)}\0".encode())
        h.update(text)
    return h.hexdigest()[:16]


def compile_rules(*paths: Path) -> Program:
    """Compile rule files into one program, or raise ``RuleCompileError`` with every problem."""
    program, diags = check_rules(*paths)
    if program is None or not diags.ok:
        raise RuleCompileError(diags)
    return program


def check_rules(*paths: Path) -> tuple[Program | None, Diagnostics]:
    """Like ``compile_rules`` but returns ``(program or None, diagnostics)``."""
    # ruleset builds Programs out of the types above, so it is imported here, not at the top.
    from riskd.dsl.ruleset import compile_sources

    sources, unreadable = read_sources(*paths)
    if not unreadable.ok:
        return None, unreadable
    return compile_sources(sources)


def read_sources(*paths: Path) -> tuple[dict[str, str], Diagnostics]:
    """The text of each rule file by path, and an error for each that cannot be read."""
    sources: dict[str, str] = {}
    unreadable: list[Diagnostic] = []
    for p in paths:
        try:
            sources[str(p)] = p.read_text(encoding="utf-8-sig")  # an editor's BOM is no item
        except (OSError, UnicodeDecodeError) as exc:
            unreadable.append(unreadable_file(p, exc))
    return sources, Diagnostics(tuple(unreadable))


def unreadable_file(path: Path, error: OSError | UnicodeDecodeError) -> Diagnostic:
    """The error for a rule file that cannot be read (``riskd_unreadable_file``)."""
    reason = "not UTF-8 text" if isinstance(error, UnicodeDecodeError) else "cannot be read"
    return Diagnostic(UNREADABLE, f"rule file {reason}", str(path), 1, 1)


def unwritable_file(path: Path) -> Diagnostic:
    """The error for a rule file that cannot be written back (``riskd_unwritable_file``,
    by ``riskd rules fmt``)."""
    return Diagnostic(UNWRITABLE, "rule file cannot be written", str(path), 1, 1)


def load_rules(directory: Path) -> Program:
    """Compile every rule file under ``directory``."""
    return compile_rules(*rule_files(directory))
