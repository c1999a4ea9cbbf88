"""The only names compiled expressions can see (besides their own constants).

Compiled code runs with ``{"__builtins__": {}}``; everything it calls is
listed in ``HELPERS``. Helpers implement the CEL semantics that plain Python
operators do not: error absorption in ``&&``/``||`` and the macros, overflow
checks, heterogeneous equality, dynamic dispatch. Error absorption treats any
exception as an evaluation error (``runtime.as_eval_error``), as the reference
interpreter does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from riskd.dsl import runtime as rt
from riskd.dsl.interp import coerce
from riskd.dsl.registry import Registry
from riskd.dsl.values import EvalError, TypeValue

Thunk = Callable[[], object]
Pred = Callable[[object], object]


def logic_and(a: Thunk, b: Thunk) -> bool:
    return _logic(a, b, absorbing=False)


def logic_or(a: Thunk, b: Thunk) -> bool:
    return _logic(a, b, absorbing=True)


def _logic(a: Thunk, b: Thunk, *, absorbing: bool) -> bool:
    # Any exception counts as the operand's error, exactly as in the reference
    # interpreter: whichever order the two evaluate operands in, they agree.
    first: EvalError | None = None
    for thunk in (a, b):
        try:
            value = rt.as_bool(thunk())
        except Exception as exc:
            first = first or rt.as_eval_error(exc)
            continue
        if value is absorbing:
            return absorbing
    if first is not None:
        raise first
    return not absorbing


def all_of(items: Iterable[object], pred: Pred) -> bool:
    return _quantify(items, pred, want=False)


def any_of(items: Iterable[object], pred: Pred) -> bool:
    return _quantify(items, pred, want=True)


def _quantify(items: Iterable[object], pred: Pred, *, want: bool) -> bool:
    first: EvalError | None = None
    for item in items:
        try:
            if rt.as_bool(pred(item)) is want:
                return want
        except Exception as exc:  # absorbed like an EvalError, as in the interpreter
            first = first or rt.as_eval_error(exc)
    if first is not None:
        raise first
    return not want


def unbound(act: Mapping[str, object], name: str) -> object:
    if name in act:
        return rt.normalize_value(act[name])
    raise EvalError(f"undeclared reference to '{name}'")


def no_function(name: str) -> object:
    raise EvalError(f"unbound function '{name}'")


def make_dispatch(registry: Registry) -> Callable[..., object]:
    def dispatch(name: str, receiver: bool, *args: object) -> object:
        return registry.dispatch(name, args, receiver)

    return dispatch


HELPERS: dict[str, object] = {
    "_and": logic_and,
    "_or": logic_or,
    "_all": all_of,
    "_exists": any_of,
    "_pyall": all,
    "_pyany": any,
    "_pysum": sum,
    "_len": len,
    "_ci": rt.check_int,
    "_concat": rt.concat,
    "_cu": rt.check_uint,
    "_eq": rt.equals,
    "_lt": rt.less,
    "_le": rt.less_equals,
    "_gt": rt.greater,
    "_ge": rt.greater_equals,
    "_in": lambda a, b: rt.contains(b, a),
    "_index": rt.index,
    "_select": rt.select,
    "_has": rt.has,
    "_isset": rt.is_set,
    "_mkmap": rt.make_map,
    "_iter": rt.iterate,
    "_bounded": rt.bounded,
    "_bool": rt.as_bool,
    "_norm": rt.normalize_value,
    "_coerce": coerce,
    "_unbound": unbound,
    "_nofn": no_function,
    "_startswith": str.startswith,
    "_endswith": str.endswith,
    "_type": TypeValue,
}
