"""One Python function for a whole rule program: the scorer's hot path.

Calling 200 compiled expressions one by one costs a Python call and a few
activation lookups per rule, about as much as the conditions themselves. This
module asks the expression compiler for each rule's Python expression tree and
assembles them into a single function::

    def _program(_act):
        V_order = _act['order']            # each variable read once; lists are constants
        _F = _act['@features']
        try:
            _r0 = V_order.amounts.total > 50000     # rule 0, as the compiler emits it
        except Exception:
            _r0 = _FAILED
        ...
        return (_H0 if _r0 is True else _N0 if _r0 is False else _E(0, _act), ...)

``_H*``/``_N*`` are the rules' precomputed HIT/NO_HIT results and ``_E``
builds the ERROR result of a rule that raised (or returned a non-bool): one
rule's failure never touches the others, exactly as with per-rule calls.

The fused code is the compiler's own output, renamed so rules can share one
scope; ``Program`` falls back to per-rule calls if fusing is not possible (and
a test checks the two agree on every starter rule test case).
"""

from __future__ import annotations

import ast as py
from collections.abc import Callable, Mapping, Sequence

from riskd.dsl import compiler as _compiler
from riskd.dsl.compiler import _args, _assign, _name, _subscript  # one set of AST builders
from riskd.dsl.expr import CompiledExpr
from riskd.dsl.helpers import HELPERS, make_dispatch

FEATURES = "@features"

Fused = Callable[[Mapping[str, object]], tuple[object, ...]]
ErrorResult = Callable[[int, Mapping[str, object]], object]


class _Rename(py.NodeTransformer):
    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = names

    def visit_Name(self, node: py.Name) -> py.Name:
        new = self.names.get(node.id)
        return py.Name(id=new, ctx=node.ctx) if new is not None else node


def fuse(
    exprs: Sequence[CompiledExpr],
    hits: Sequence[object],
    no_hits: Sequence[object],
    on_error: ErrorResult,
    static: Mapping[str, object],
) -> Fused:
    """Compile ``exprs`` into one function returning one result per expression.

    ``static`` holds the variables that are the same for every request (the
    named lists, enum namespaces): they are bound once here, so the request's
    activation only carries ``order``, ``shop``, ``now`` and ``@features``.
    Raises whatever the compiler raises if an expression cannot be re-emitted;
    callers treat that as "not fusable".
    """
    namespace: dict[str, object] = {"__builtins__": {}, **HELPERS, "_E": on_error}
    namespace["_FAILED"] = _FAILED
    namespace["_Exc"] = Exception  # the generated code has no builtins
    variables: dict[str, str] = {}  # CEL variable -> shared Python name
    prologue_src: dict[str, CompiledExpr] = {}
    body: list[py.stmt] = []
    uses_features = False
    for i, ce in enumerate(exprs):
        em = _compiler._Emitter(ce.checked, ce.variables, ce.registry)
        tree, _ = em.emit(ce.checked.root)
        names = {local: _var_name(cel) for cel, local in em.var_names.items()}
        names.update({c: f"{c}_r{i}" for c in em.constants})
        tree = _Rename(names).visit(tree)
        namespace.update({f"{c}_r{i}": v for c, v in em.constants.items()})
        namespace.setdefault("_call", make_dispatch(ce.registry))
        for cel in em.var_names:
            variables.setdefault(cel, _var_name(cel))
            prologue_src.setdefault(cel, ce)
        uses_features = uses_features or em.uses_features
        namespace[f"_H{i}"], namespace[f"_N{i}"] = hits[i], no_hits[i]
        body.extend(_rule_block(i, tree))
    for cel in static.keys() & prologue_src.keys():
        namespace[_var_name(cel)] = static[cel]
        del prologue_src[cel]
    prologue = _prologue(prologue_src, namespace)
    if uses_features:
        prologue.append(_assign("_F", _subscript(_name("_act"), py.Constant(FEATURES))))
    picks = py.Tuple(elts=[_pick(i) for i in range(len(exprs))], ctx=py.Load())
    stmts = [*prologue, *body, py.Return(picks)]
    fn = py.FunctionDef(
        name="_program", args=_args("_act"), body=stmts, decorator_list=[], returns=None
    )
    module = py.fix_missing_locations(py.Module(body=[fn], type_ignores=[]))
    exec(compile(module, "<rules>", "exec"), namespace)
    result = namespace["_program"]
    assert callable(result)
    return result


class _Failed:
    """The value of a rule whose expression raised (never a CEL value)."""


_FAILED = _Failed()


def _var_name(cel: str) -> str:
    """CEL variables are identifiers: ``V_order`` cannot clash with the compiler's names."""
    return "V_" + cel


def _prologue(sources: Mapping[str, CompiledExpr], namespace: dict[str, object]) -> list[py.stmt]:
    """Read each variable once, exactly as the compiler reads it (coercions included)."""
    out: list[py.stmt] = []
    for cel, ce in sources.items():
        em = _compiler._Emitter(ce.checked, ce.variables, ce.registry)
        read = em.var_read(cel)
        names = {c: f"{c}_p_{_var_name(cel)}" for c in em.constants}
        read = _Rename(names).visit(read)
        namespace.update({names[c]: v for c, v in em.constants.items()})
        out.append(_assign(_var_name(cel), read))
    return out


def _rule_block(i: int, tree: py.expr) -> list[py.stmt]:
    """``try: _r{i} = <expr> / except: _r{i} = _FAILED``."""
    guarded = py.Try(
        body=[_assign(f"_r{i}", tree)],
        handlers=[
            py.ExceptHandler(
                type=_name("_Exc"), name=None, body=[_assign(f"_r{i}", _name("_FAILED"))]
            )
        ],
        orelse=[],
        finalbody=[],
    )
    return [guarded]


def _pick(i: int) -> py.expr:
    """``_H{i} if _r{i} is True else _N{i} if _r{i} is False else _E(i, _act)``."""
    error = py.Call(func=_name("_E"), args=[py.Constant(i), _name("_act")], keywords=[])
    r = _name(f"_r{i}")
    return py.IfExp(
        test=py.Compare(left=r, ops=[py.Is()], comparators=[py.Constant(True)]),
        body=_name(f"_H{i}"),
        orelse=py.IfExp(
            test=py.Compare(left=r, ops=[py.Is()], comparators=[py.Constant(False)]),
            body=_name(f"_N{i}"),
            orelse=error,
        ),
    )
