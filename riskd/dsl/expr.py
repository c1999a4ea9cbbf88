"""The expression core's facade: parse, check, compile, evaluate, explain, unparse.

>>> from riskd.dsl.types import INT
>>> compiled, diags = compile_expr("x * 2 > 10", Env({"x": INT}))
>>> compiled.evaluate({"x": 6})
True
>>> evaluate("size(items.filter(i, i > 1))", {"items": [1, 2, 3]})
2
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

from riskd.domain.features import FeatureQuery
from riskd.dsl.checker import Checked, Env, check
from riskd.dsl.compiler import Fn, compile_checked
from riskd.dsl.diagnostics import LIMIT_EXCEEDED, Diagnostics, Source
from riskd.dsl.interp import Interpreter
from riskd.dsl.nodes import Expr
from riskd.dsl.parser import parse
from riskd.dsl.registry import Registry
from riskd.dsl.runtime import as_eval_error
from riskd.dsl.tracer import Plan, explain, plan
from riskd.dsl.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DURATION,
    DYN,
    INT,
    NULL,
    STRING,
    TIMESTAMP,
    TYPE,
    UINT,
    ListType,
    MapType,
    Type,
    schema_of,
)
from riskd.dsl.unparse import unparse
from riskd.dsl.values import Duration, EvalError, Timestamp, TypeValue, UInt
from riskd.errors import RuleCompileError

__all__ = [
    "CompiledExpr",
    "Env",
    "check_expr",
    "compile_expr",
    "evaluate",
    "infer_type",
    "parse_expr",
    "to_json",
    "unparse",
]


@dataclass(frozen=True, slots=True, eq=False)
class CompiledExpr:
    """A checked expression compiled to a Python function.

    ``evaluate`` runs the compiled code and raises only ``EvalError``;
    ``explain`` re-runs the expression through the reference interpreter with
    a tracer, so tracing costs nothing on the ``evaluate`` path.
    """

    source: str
    type: Type
    feature_queries: frozenset[FeatureQuery]
    checked: Checked = dataclasses.field(repr=False)
    variables: Mapping[str, Type] = dataclasses.field(repr=False)
    registry: Registry = dataclasses.field(repr=False)
    fn: Fn = dataclasses.field(repr=False)
    # the explanation's plan, built on the first explain (a hit) and kept: most never need it
    _plan: list[Plan] = dataclasses.field(default_factory=list, repr=False)

    def evaluate(self, activation: Mapping[str, object]) -> object:
        """Evaluate against ``activation`` (variable name → value, plus ``"@features"``)."""
        try:
            return self.fn(activation)
        except EvalError:
            raise
        except Exception as exc:  # the generated code must never leak a Python error
            raise as_eval_error(exc) from None

    def interpret(self, activation: Mapping[str, object]) -> object:
        """Evaluate with the reference interpreter (same semantics, slower)."""
        try:
            return Interpreter(self.checked, self.variables, self.registry).evaluate(activation)
        except EvalError:
            raise
        except Exception as exc:
            raise as_eval_error(exc) from None

    def explain(self, activation: Mapping[str, object]) -> tuple[str, ...]:
        """The value of each sub-condition, e.g. ``a > 5 → true (a = 7)``."""
        if not self._plan:
            self._plan.append(plan(self.checked.root))
        return explain(self.checked, self.variables, self.registry, activation, self._plan[0])


def parse_expr(
    text: str,
    *,
    file: str = "<expr>",
    line: int = 1,
    col: int = 1,
    file_text: str | None = None,
) -> tuple[Expr | None, Diagnostics]:
    """Parse one expression.

    ``line``/``col`` are where ``text`` starts in ``file``; ``file_text`` (the
    whole file), when given, is used for the source lines under carets.
    """
    expr, diags = parse(Source(text, file, line, col, file_text))
    return expr, Diagnostics(tuple(diags))


def check_expr(expr: Expr, env: Env) -> tuple[Type | None, Diagnostics]:
    """Type-check a parsed expression against ``env``."""
    checked, diags = check(expr, env)
    if diags:
        return None, Diagnostics(tuple(diags))
    return checked.type_of(expr), Diagnostics()


def compile_expr(
    text: str,
    env: Env,
    *,
    file: str = "<expr>",
    line: int = 1,
    col: int = 1,
    file_text: str | None = None,
    strict: bool = True,
) -> tuple[CompiledExpr | None, Diagnostics]:
    """Parse, check and compile ``text``; returns the program or every diagnostic.

    ``strict=False`` skips type errors (they surface at run time instead), the
    mode CEL's conformance suite calls "disable_check".
    """
    src = Source(text, file, line, col, file_text)
    expr, diags = parse(src)
    if expr is None:
        return None, Diagnostics(tuple(diags))
    checked, type_diags = check(expr, env, strict=strict)
    if type_diags:
        return None, Diagnostics(tuple(type_diags))
    try:
        fn = compile_checked(checked, env.variables, env.registry, file)
    except (RecursionError, MemoryError, SyntaxError, ValueError):
        diag = src.diagnostic(LIMIT_EXCEEDED, "expression is too complex to compile", 0)
        return None, Diagnostics((diag,))
    queries = frozenset(checked.features.values())
    compiled = CompiledExpr(
        text, checked.type_of(expr), queries, checked, env.variables, env.registry, fn
    )
    return compiled, Diagnostics()


def infer_type(value: object) -> Type:
    """The CEL type of a Python value (used for ``riskd rules eval --var``)."""
    simple: list[tuple[type | tuple[type, ...], Type]] = [
        (bool, BOOL), (UInt, UINT), (int, INT), (float, DOUBLE), (str, STRING),
        (bytes, BYTES), (Duration, DURATION), (Timestamp, TIMESTAMP), (TypeValue, TYPE),
    ]  # fmt: skip
    if value is None:
        return NULL
    for kind, t in simple:
        if isinstance(value, kind):
            return t
    if isinstance(value, list | tuple | frozenset):
        return ListType(_join(infer_type(v) for v in value))
    if isinstance(value, dict):
        return MapType(
            _join(infer_type(k) for k in value), _join(infer_type(v) for v in value.values())
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return schema_of(type(value))
    raise ValueError(f"no CEL type for a value of Python type {type(value).__name__}")


def _join(types: object) -> Type:
    distinct = set(types)  # type: ignore[call-overload]
    if len(distinct) == 1:
        only: Type = distinct.pop()
        return only
    return DYN


def evaluate(text: str, variables: Mapping[str, object]) -> object:
    """Evaluate one expression; variable types are inferred from their values.

    Raises:
        RuleCompileError: the expression does not parse or type-check.
        EvalError: it failed at run time.
    """
    env = Env({name: infer_type(v) for name, v in variables.items() if not name.startswith("@")})
    compiled, diags = compile_expr(text, env)
    if compiled is None:
        raise RuleCompileError(diags)
    return compiled.evaluate(variables)


def to_json(value: object) -> object:
    """A run-time value as plain JSON data (for ``riskd rules eval``).

    >>> to_json({"a": [UInt(1), b"hi", duration_of(90)]})
    {'a': [1, 'aGk=', '90s']}
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, Duration | Timestamp | TypeValue):
        return str(value)
    if isinstance(value, list | tuple | frozenset | set):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(to_json(k)): to_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return repr(value)


def duration_of(seconds: float) -> Duration:
    """A ``Duration`` of ``seconds``."""
    return Duration.checked(round(seconds * 1_000_000_000))
