"""Explanations: which sub-conditions of an expression held, with their values.

``explain`` runs the reference interpreter with a recording tracer, so the
compiled hot path carries no tracing code at all. Each line reads like::

    order.amounts.total > 50000 → true (order.amounts.total = 62000)

Explanations travel to the caller and into the hash-chained decision log, so
they never quote personal data: a value read from a field in ``PII_FIELDS``,
and every value computed from one (a concatenation, a conversion, a size, a
list or map holding it), is written ``"***"`` whatever it contains; only a
bool (the condition's own answer) and an empty string show as they are. The
error of a node computed from one is written ``"***"`` too.
``riskd.dsl.program`` scrubs the rendered lines once more for the order's PII
values, as a second line of defence.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping

from riskd.domain.order import Address, Buyer, Order
from riskd.dsl.checker import Checked
from riskd.dsl.interp import Interpreter
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, Literal, Select, children
from riskd.dsl.registry import Registry
from riskd.dsl.types import Type
from riskd.dsl.unparse import unparse
from riskd.dsl.values import Duration, EvalError, Timestamp, TypeValue, UInt

_CONDITIONS = {"_==_", "_!=_", "_<_", "_<=_", "_>_", "_>=_", "@in", "_&&_", "_||_", "!_"}
_OPERATORS = {"_+_", "_-_", "_*_", "_/_", "_%_", "-_", "_[_]", "_?_:_"}
_MAX_TEXT = 80
_HIDDEN = '"***"'

# The request's personal data, by the domain type that holds it and the field name: what
# the decision log keeps only masked or encrypted (``riskd.evidence.request.pii_fields``;
# of an address, the street detail and the district). ``riskd.dsl.program`` scrubs the
# same fields' values.
PII_FIELDS: Mapping[type, frozenset[str]] = {
    Buyer: frozenset({"phone", "name", "id_number"}),
    Address: frozenset({"detail", "district"}),
    Order: frozenset({"device_id", "ip"}),
}


@dataclasses.dataclass(slots=True)
class RecordingTracer:
    """Keeps the last value (or error) of every evaluated node.

    ``secret`` holds the nodes whose value (or error) is, or was computed from, a
    PII field: a ``Select`` of a ``PII_FIELDS`` field, or any node with such a
    child. The interpreter reports a node after its children, so one pass marks
    them all (a node marked in one run of a macro body stays marked: it only
    hides more).
    """

    values: dict[int, object] = dataclasses.field(default_factory=dict)
    errors: dict[int, EvalError] = dataclasses.field(default_factory=dict)
    secret: set[int] = dataclasses.field(default_factory=set)

    def on_value(self, node: Expr, value: object) -> None:
        self.values[id(node)] = value
        if _reads_pii(node, self.values) or self._from_secret(node):
            self.secret.add(id(node))

    def on_error(self, node: Expr, error: EvalError) -> None:
        self.errors[id(node)] = error
        if _reads_pii(node, self.values) or self._from_secret(node):
            self.secret.add(id(node))  # its error may be about a PII value: shown as "***"

    def _from_secret(self, node: Expr) -> bool:
        # most rules read no PII field: then nothing is secret and no child is looked at
        secret = self.secret
        return bool(secret) and any(id(c) in secret for c in children(node))


@dataclasses.dataclass(frozen=True, slots=True)
class _Step:
    """One line of an explanation: a sub-condition, its text and its operands' texts."""

    node: Expr
    text: str
    operands: tuple[tuple[Expr, str], ...]


Plan = tuple[_Step, ...]


def plan(root: Expr) -> Plan:
    """What ``explain`` shows for an expression: fixed per expression, so built once."""
    return tuple(
        _Step(node, _clip(unparse(node)), tuple((c, _clip(unparse(c))) for c in _operands(node)))
        for node in _conditions(root, True)
    )


def explain(
    checked: Checked,
    variables: Mapping[str, Type],
    registry: Registry,
    activation: Mapping[str, object],
    steps: Plan | None = None,
) -> tuple[str, ...]:
    """Evaluate with tracing and render one line per sub-condition (``steps``: the
    expression's ``plan``, when the caller keeps it)."""
    tracer = RecordingTracer()
    try:
        Interpreter(checked, variables, registry, tracer).evaluate(activation)
    except EvalError:
        pass  # the failing nodes are in the tracer; their lines say so
    except Exception as exc:  # the interpreter maps every error to EvalError: a bug
        # never the exception's text: it may quote a value
        return (f"{_clip(unparse(checked.root))} → explanation failed ({type(exc).__name__})",)
    return tuple(_line(step, tracer) for step in steps or plan(checked.root))


def _conditions(node: Expr, top: bool) -> Iterator[Expr]:
    is_function = isinstance(node, Call) and node.function not in _OPERATORS
    is_has = isinstance(node, Select) and node.test_only
    if top or is_function or is_has or isinstance(node, Comprehension):
        yield node
    if isinstance(node, Comprehension):
        return  # the body runs once per element; the macro's own result is what matters
    logic = isinstance(node, Call) and node.function in ("_&&_", "_||_")
    compares = isinstance(node, Call) and node.function in _CONDITIONS and not logic
    for child in children(node):
        if logic and not isinstance(child, Call | Comprehension):
            yield child
        if compares and isinstance(child, Call) and child.function not in _CONDITIONS:
            # shown as an operand value on this comparison's line; look inside it only
            for grandchild in children(child):
                yield from _conditions(grandchild, False)
            continue
        yield from _conditions(child, False)


def _line(step: _Step, tracer: RecordingTracer) -> str:
    node, text, values = step.node, step.text, tracer.values
    if id(node) in tracer.errors and id(node) not in values:
        error = _HIDDEN if id(node) in tracer.secret else str(tracer.errors[id(node)])
        return f"{text} → error: {error}"
    if id(node) not in values:
        return f"{text} → not evaluated"
    details = [f"{t} = {_shown(c, tracer)}" for c, t in step.operands if id(c) in values]
    suffix = f" ({', '.join(details)})" if details else ""
    return f"{text} → {_shown(node, tracer)}{suffix}"


def _reads_pii(node: Expr, values: Mapping[int, object]) -> bool:
    """Whether ``node`` selects a PII field (known by its operand's run-time type)."""
    if not isinstance(node, Select) or node.test_only:
        return False
    fields = PII_FIELDS.get(type(values.get(id(node.operand))))
    return fields is not None and node.field in fields


def _shown(node: Expr, tracer: RecordingTracer) -> str:
    """A node's value as an explanation writes it: ``"***"`` for one made from PII."""
    value = tracer.values[id(node)]
    if id(node) in tracer.secret and not isinstance(value, bool) and value != "":
        return _HIDDEN
    return format_value(value)


def _operands(node: Expr) -> Iterator[Expr]:
    if not isinstance(node, Call) or node.function in ("_&&_", "_||_"):
        return
    for c in children(node):
        if isinstance(c, Select | Ident) or (
            isinstance(c, Call) and c.function not in _CONDITIONS and not isinstance(c, Literal)
        ):
            yield c


_MAX_ITEMS = 10  # of a list or map shown; the rest is counted


def _more(shown: list[str], size: int) -> list[str]:
    """``shown`` and, when it is not all of them, how many more there are: a list cut
    silently read as a list of ten."""
    return shown if size <= len(shown) else [*shown, f"… {size - len(shown)} more"]


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 1] + "…"


def format_value(value: object) -> str:
    """A short CEL-like rendering of a run-time value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, UInt):
        return f"{int(value)}u"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(int(value))
    if isinstance(value, str):
        return _clip(json.dumps(value, ensure_ascii=False))
    if isinstance(value, bytes):
        return _clip(repr(value))
    if isinstance(value, Duration):
        return f'duration("{value}")'
    if isinstance(value, Timestamp):
        return f'timestamp("{value}")'
    if isinstance(value, TypeValue):
        return value.name
    if isinstance(value, list | tuple | frozenset | set):
        shown = [format_value(v) for v in list(value)[:_MAX_ITEMS]]
        return _clip("[" + ", ".join(_more(shown, len(value))) + "]")
    if isinstance(value, dict):
        items = list(value.items())[:_MAX_ITEMS]
        pairs = [f"{format_value(k)}: {format_value(v)}" for k, v in items]
        return _clip("{" + ", ".join(_more(pairs, len(value))) + "}")
    return f"{type(value).__name__}{{…}}"
