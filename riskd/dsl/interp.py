"""Reference interpreter: a plain tree walk over the checked AST.

It defines the semantics the compiler must reproduce (a hypothesis property
compares the two) and, with a ``Tracer``, produces ``explain`` output. It is
not on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from riskd.dsl import runtime as rt
from riskd.dsl.checker import Checked
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select
from riskd.dsl.registry import DEFAULT_REGISTRY, Registry
from riskd.dsl.types import DURATION, TIMESTAMP, Type
from riskd.dsl.values import Duration, EvalError, Timestamp, TypeValue

FEATURES = "@features"


class Tracer(Protocol):
    """Observes evaluation: called once per evaluated node with its value or error."""

    def on_value(self, node: Expr, value: object) -> None: ...

    def on_error(self, node: Expr, error: EvalError) -> None: ...


def coerce(t: Type, value: object) -> object:
    """Accept epoch seconds for timestamp variables and seconds for durations."""
    if t == TIMESTAMP and isinstance(value, int | float) and not isinstance(value, bool):
        return Timestamp.from_seconds(value)
    if t == DURATION and isinstance(value, int | float) and not isinstance(value, bool):
        return Duration.checked(round(value * 1_000_000_000))
    return rt.normalize_value(value)


class Interpreter:
    """Evaluates one checked expression against an activation."""

    def __init__(
        self,
        checked: Checked,
        variables: Mapping[str, Type],
        registry: Registry = DEFAULT_REGISTRY,
        tracer: Tracer | None = None,
    ) -> None:
        self.checked = checked
        self.variables = variables
        self.registry = registry
        self.tracer = tracer

    def evaluate(self, activation: Mapping[str, object]) -> object:
        return self.eval(self.checked.root, activation, {})

    def eval(self, node: Expr, act: Mapping[str, object], local: dict[str, object]) -> object:
        try:
            value = self._eval(node, act, local)
        except Exception as exc:
            # Any Python error is this node's EvalError (as in the compiled code's
            # helpers), so ``||``, ``&&`` and the macros absorb it the same way.
            err = rt.as_eval_error(exc)
            if self.tracer is not None:
                self.tracer.on_error(node, err)
            if err is exc:
                raise
            raise err from None
        if self.tracer is not None:
            self.tracer.on_value(node, value)
        return value

    def _eval(self, node: Expr, act: Mapping[str, object], local: dict[str, object]) -> object:
        if isinstance(node, Literal):
            return node.value
        if isinstance(node, Ident | Select):
            ref = self.checked.refs.get(id(node))
            if ref is not None:
                return self.name(ref.kind, ref.name, act, local)
            assert isinstance(node, Select)
            operand = self.eval(node.operand, act, local)
            if node.test_only:
                return rt.has(operand, node.field)
            return rt.select(operand, node.field)
        if isinstance(node, Call):
            return self.call(node, act, local)
        if isinstance(node, ListLit):
            return [self.eval(e, act, local) for e in node.elements]
        if isinstance(node, MapLit):
            return rt.make_map(
                (self.eval(k, act, local), self.eval(v, act, local)) for k, v in node.entries
            )
        return self.comprehension(node, act, local)

    def name(
        self, kind: str, name: str, act: Mapping[str, object], local: dict[str, object]
    ) -> object:
        if kind == "local":
            return local[name]
        if kind == "var":
            return coerce(self.variables[name], act[name])
        if kind == "type":
            return TypeValue(name)
        if name in act:
            return rt.normalize_value(act[name])
        raise EvalError(f"undeclared reference to '{name}'")

    def call(self, node: Call, act: Mapping[str, object], local: dict[str, object]) -> object:
        fn = node.function
        if node.target is None and fn in ("_&&_", "_||_"):
            return self.logic(node, act, local, absorbing=(fn == "_||_"))
        if node.target is None and fn == "_?_:_":
            cond = rt.as_bool(self.eval(node.args[0], act, local))
            return self.eval(node.args[1] if cond else node.args[2], act, local)
        query = self.checked.features.get(id(node))
        if query is not None:
            features = act[FEATURES]
            assert isinstance(features, Mapping)
            return features[query]
        args = [self.eval(a, act, local) for a in node.args]
        if node.target is not None:
            args.insert(0, self.eval(node.target, act, local))
        if fn == "_[_]" and node.target is None:
            return rt.index(args[0], args[1])
        regex = self.checked.regexes.get(id(node))
        if regex is not None and isinstance(args[0], str):
            return regex(args[0])
        return self.registry.dispatch(fn, args, node.target is not None)

    def logic(
        self, node: Call, act: Mapping[str, object], local: dict[str, object], *, absorbing: bool
    ) -> bool:
        """``&&`` (absorbing=False) or ``||`` (absorbing=True) with CEL's error absorption."""
        first: EvalError | None = None
        for arg in node.args:
            try:
                value = rt.as_bool(self.eval(arg, act, local))
            except EvalError as err:
                first = first or err
                continue
            if value is absorbing:
                return absorbing
        if first is not None:
            raise first
        return not absorbing

    def comprehension(
        self, node: Comprehension, act: Mapping[str, object], local: dict[str, object]
    ) -> object:
        items = rt.iterate(self.eval(node.target, act, local))
        if node.kind in ("map", "filter"):
            rt.bounded(items)
        scope = dict(local)

        def pred(item: object) -> bool:
            scope[node.var] = item
            assert node.predicate is not None
            return rt.as_bool(self.eval(node.predicate, act, scope))

        if node.kind in ("all", "exists"):
            want = node.kind == "exists"
            first: EvalError | None = None
            for item in items:
                try:
                    if pred(item) is want:
                        return want
                except EvalError as err:
                    first = first or err
            if first is not None:
                raise first
            return not want
        if node.kind == "exists_one":
            return sum(1 for item in items if pred(item)) == 1
        if node.kind == "filter":
            return [item for item in items if pred(item)]
        out = []
        for item in items:
            if node.predicate is None or pred(item):
                scope[node.var] = item
                assert node.transform is not None
                out.append(self.eval(node.transform, act, scope))
        return out
