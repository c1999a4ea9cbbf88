"""Compiler: checked AST → Python ``ast`` → one code object per expression.

Where the checker proved the operand types, operators become plain Python
operations (``a > b``, ``a in b``, ``x.field``); helpers are called only where
CEL semantics need them (overflow, error absorption, dynamic dispatch).
``&&``/``||`` with at most one operand that can fail, and macros whose
predicate cannot fail, compile to Python's own ``and``/``or``/``any``/``all``
(the infallible operand first, which is exactly CEL's error absorption).

The generated code runs with empty builtins, uses attribute access only for
object fields the checker verified (never a dunder), and never imports.
"""

from __future__ import annotations

import ast as py
import itertools
import math
from collections.abc import Callable, Mapping

from riskd.dsl.checker import Checked, Ref
from riskd.dsl.helpers import HELPERS, make_dispatch
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select
from riskd.dsl.registry import Registry
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
    UINT,
    ListType,
    MapType,
    ObjectType,
    PrimitiveType,
    Type,
)
from riskd.dsl.values import UInt

Fn = Callable[[Mapping[str, object]], object]
Emitted = tuple[py.expr, bool]  # (python expression, may raise an absorbable EvalError)

_EQ_TYPES = (INT, UINT, DOUBLE, STRING, BOOL, BYTES, NULL, DURATION, TIMESTAMP)
_ORD_TYPES = (STRING, BYTES, BOOL, DURATION, TIMESTAMP)
_NUMERIC = (INT, UINT, DOUBLE)
_IN_TYPES = (STRING, INT, UINT, BOOL)
_CMP_OPS: dict[str, py.cmpop] = {
    "_==_": py.Eq(), "_!=_": py.NotEq(), "_<_": py.Lt(), "_<=_": py.LtE(),
    "_>_": py.Gt(), "_>=_": py.GtE(),
}  # fmt: skip
_CMP_HELPERS = {"_<_": "_lt", "_<=_": "_le", "_>_": "_gt", "_>=_": "_ge"}
_ARITH: dict[str, py.operator] = {"_+_": py.Add(), "_-_": py.Sub(), "_*_": py.Mult()}
FEATURES = "@features"


def compile_checked(
    checked: Checked, variables: Mapping[str, Type], registry: Registry, filename: str
) -> Fn:
    """Build the Python function ``f(activation) -> value`` for a checked expression."""
    em = _Emitter(checked, variables, registry)
    body_expr, _ = em.emit(checked.root)
    stmts: list[py.stmt] = [
        _assign(py_name, em.var_read(cel_name)) for cel_name, py_name in em.var_names.items()
    ]
    if em.uses_features:
        stmts.append(_assign("_F", _subscript(_name("_act"), py.Constant(FEATURES))))
    stmts.append(py.Return(body_expr))
    fn = py.FunctionDef(
        name="_expr",
        args=_args("_act"),
        body=stmts,
        decorator_list=[],
        returns=None,
    )
    module = _locate(py.Module(body=[fn], type_ignores=[]))
    code = compile(module, filename, "exec")
    namespace: dict[str, object] = {"__builtins__": {}}
    namespace.update(HELPERS)
    namespace["_call"] = make_dispatch(registry)
    namespace.update(em.constants)
    exec(code, namespace)
    result = namespace["_expr"]
    assert callable(result)
    return result


def _locate(root: py.Module) -> py.Module:
    """Give every node position 1:0 (a leaner ``ast.fix_missing_locations``)."""
    stack: list[py.AST] = [root]
    while stack:
        node = stack.pop()
        if node._attributes:
            node.lineno = node.end_lineno = 1  # type: ignore[attr-defined]
            node.col_offset = node.end_col_offset = 0  # type: ignore[attr-defined]
        for name in node._fields:
            value = getattr(node, name, None)
            if isinstance(value, list):
                stack.extend(v for v in value if isinstance(v, py.AST))
            elif isinstance(value, py.AST):
                stack.append(value)
    return root


def _name(n: str) -> py.Name:
    return py.Name(id=n, ctx=py.Load())


def _assign(target: str, value: py.expr) -> py.Assign:
    return py.Assign(targets=[py.Name(id=target, ctx=py.Store())], value=value)


def _subscript(value: py.expr, key: py.expr) -> py.Subscript:
    return py.Subscript(value=value, slice=key, ctx=py.Load())


def _args(*names: str) -> py.arguments:
    return py.arguments(
        posonlyargs=[],
        args=[py.arg(arg=n) for n in names],
        kwonlyargs=[],
        kw_defaults=[],
        defaults=[],
    )


def _call(fn: str, *args: py.expr) -> py.Call:
    return py.Call(func=_name(fn), args=list(args), keywords=[])


def _lambda(body: py.expr, *params: str) -> py.Lambda:
    return py.Lambda(args=_args(*params), body=body)


class _Emitter:
    def __init__(self, checked: Checked, variables: Mapping[str, Type], registry: Registry):
        self.c = checked
        self.variables = variables
        self.registry = registry
        self.constants: dict[str, object] = {}
        self.var_names: dict[str, str] = {}
        self.uses_features = False
        self._ids = itertools.count()

    def const(self, prefix: str, value: object) -> py.Name:
        name = f"_{prefix}{next(self._ids)}"
        self.constants[name] = value
        return _name(name)

    def var_read(self, cel_name: str) -> py.expr:
        raw = _subscript(_name("_act"), py.Constant(cel_name))
        t = self.variables[cel_name]
        if t in (TIMESTAMP, DURATION):
            return _call("_coerce", self.const("t", t), raw)
        if t in (INT, UINT):
            return _call("_norm", raw)
        return raw

    def type_of(self, node: Expr) -> Type:
        return self.c.type_of(node)

    def emit(self, node: Expr) -> Emitted:
        if isinstance(node, Literal):
            return self.literal(node.value), False
        if isinstance(node, Ident | Select):
            ref = self.c.refs.get(id(node))
            if ref is not None:
                return self.ref(ref)
            assert isinstance(node, Select)
            return self.select(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, ListLit):
            parts = [self.emit(e) for e in node.elements]
            return py.List(elts=[p for p, _ in parts], ctx=py.Load()), any(e for _, e in parts)
        if isinstance(node, MapLit):
            return self.map_lit(node)
        return self.comprehension(node)

    def literal(self, value: object) -> py.expr:
        if isinstance(value, UInt) or (isinstance(value, float) and not math.isfinite(value)):
            return self.const("k", value)
        assert value is None or isinstance(value, str | bytes | bool | int | float)
        return py.Constant(value)

    def ref(self, ref: Ref) -> Emitted:
        if ref.kind == "local":
            return _name(f"l_{ref.name}"), False
        if ref.kind == "var":
            if ref.name not in self.var_names:
                self.var_names[ref.name] = f"v{len(self.var_names)}"
            return _name(self.var_names[ref.name]), False
        if ref.kind == "type":
            return _call("_type", py.Constant(ref.name)), False
        return _call("_unbound", _name("_act"), py.Constant(ref.name)), True

    def select(self, node: Select) -> Emitted:
        operand, err = self.emit(node.operand)
        otype = self.type_of(node.operand)
        field = py.Constant(node.field)
        verified = (
            isinstance(otype, ObjectType)
            and otype.field(node.field) is not None
            and not node.field.startswith("_")
        )
        if verified and node.test_only:
            attr = py.Attribute(value=operand, attr=node.field, ctx=py.Load())
            return _call("_isset", attr), err
        if verified:
            return py.Attribute(value=operand, attr=node.field, ctx=py.Load()), err
        return _call("_has" if node.test_only else "_select", operand, field), True

    def map_lit(self, node: MapLit) -> Emitted:
        keys = [k.value for k, _ in node.entries if isinstance(k, Literal)]
        parts = [(self.emit(k), self.emit(v)) for k, v in node.entries]
        err = any(ke or ve for (_, ke), (_, ve) in parts)
        simple = len(keys) == len(node.entries) and all(type(k) is str for k in keys)
        if simple and len(set(keys)) == len(keys):
            return py.Dict(keys=[k for (k, _), _ in parts], values=[v for _, (v, _) in parts]), err
        pairs: list[py.expr] = [py.Tuple(elts=[k, v], ctx=py.Load()) for (k, _), (v, _) in parts]
        return _call("_mkmap", py.Tuple(elts=pairs, ctx=py.Load())), True

    # -- calls ---------------------------------------------------------------
    def call(self, node: Call) -> Emitted:
        fn = node.function
        if node.target is None and fn in ("_&&_", "_||_"):
            return self.logic(node)
        if node.target is None and fn == "_?_:_":
            (cond, ce), (a, ae), (b, be) = (self.emit(x) for x in node.args)
            if self.type_of(node.args[0]) != BOOL:
                cond, ce = _call("_bool", cond), True
            return py.IfExp(test=cond, body=a, orelse=b), ce or ae or be
        query = self.c.features.get(id(node))
        if query is not None:
            self.uses_features = True
            return _subscript(_name("_F"), self.const("q", query)), False
        operands = ([node.target] if node.target is not None else []) + list(node.args)
        emitted = [self.emit(a) for a in operands]
        types = [self.type_of(a) for a in operands]
        args = [e for e, _ in emitted]
        err = any(e for _, e in emitted)
        fast = self.fast_path(node, types, args)
        if fast is not None:
            return fast[0], err or fast[1]
        return self.generic(node, types, args), True

    def logic(self, node: Call) -> Emitted:
        (a, ae), (b, be) = (self.emit(x) for x in node.args)
        typed = all(self.type_of(x) == BOOL for x in node.args)
        if typed and not (ae and be):
            # With at most one fallible operand, evaluating the infallible one first and
            # short-circuiting is exactly CEL's commutative, error-absorbing && and ||.
            op: py.boolop = py.And() if node.function == "_&&_" else py.Or()
            values = [b, a] if ae else [a, b]
            return py.BoolOp(op=op, values=values), ae or be
        helper = "_and" if node.function == "_&&_" else "_or"
        return _call(helper, _lambda(a), _lambda(b)), True

    def fast_path(self, node: Call, types: list[Type], args: list[py.expr]) -> Emitted | None:
        fn = node.function
        if fn in _CMP_OPS and len(args) == 2:
            return self.comparison(fn, types, args)
        if fn in _ARITH and len(args) == 2 and types[0] == types[1]:
            t = types[0]
            expr = py.BinOp(left=args[0], op=_ARITH[fn], right=args[1])
            if t == INT:
                return _call("_ci", expr), True
            if t == UINT:
                return _call("_cu", expr), True
            if t == DOUBLE:
                return expr, False
            if fn == "_+_" and t in (STRING, BYTES):
                return _call("_concat", args[0], args[1]), True
        if fn == "!_" and types == [BOOL]:
            return py.UnaryOp(op=py.Not(), operand=args[0]), False
        if fn == "-_" and types == [DOUBLE]:
            return py.UnaryOp(op=py.USub(), operand=args[0]), False
        if fn == "-_" and types == [INT]:
            return _call("_ci", py.UnaryOp(op=py.USub(), operand=args[0])), True
        if fn == "@in" and len(args) == 2:
            return self.membership(types, args)
        if fn == "_[_]" and node.target is None:
            return _call("_index", *args), True
        if fn == "size" and len(types) == 1 and _sized(types[0]):
            return _call("_len", args[0]), False
        if types and all(t == STRING for t in types) and len(args) == 2 and node.target is not None:
            return self.string_method(node, args)
        return None

    def comparison(self, fn: str, types: list[Type], args: list[py.expr]) -> Emitted:
        a, b = types
        same = a == b and (a in _EQ_TYPES if fn in ("_==_", "_!=_") else a in _ORD_TYPES + _NUMERIC)
        both_numeric = (
            a in _NUMERIC and b in _NUMERIC and fn not in ("_==_", "_!=_") and DOUBLE not in types
        )
        if same or both_numeric:
            return py.Compare(left=args[0], ops=[_CMP_OPS[fn]], comparators=[args[1]]), False
        if fn == "_==_":
            return _call("_eq", *args), False
        if fn == "_!=_":
            return py.UnaryOp(op=py.Not(), operand=_call("_eq", *args)), False
        return _call(_CMP_HELPERS[fn], *args), True

    def membership(self, types: list[Type], args: list[py.expr]) -> Emitted:
        elem, container = types
        inner = None
        if isinstance(container, ListType):
            inner = container.elem
        elif isinstance(container, MapType):
            inner = container.key
        if inner is not None and inner == elem and elem in _IN_TYPES:
            return py.Compare(left=args[0], ops=[py.In()], comparators=[args[1]]), False
        return _call("_in", *args), True

    def string_method(self, node: Call, args: list[py.expr]) -> Emitted | None:
        fn = node.function
        if fn == "startsWith":
            return _call("_startswith", *args), False
        if fn == "endsWith":
            return _call("_endswith", *args), False
        if fn == "contains":
            return py.Compare(left=args[1], ops=[py.In()], comparators=[args[0]]), False
        regex = self.c.regexes.get(id(node))
        if fn == "matches" and regex is not None:
            return _call(self.const("rx", regex).id, args[0]), False
        return None

    def generic(self, node: Call, types: list[Type], args: list[py.expr]) -> py.expr:
        candidates = self.c.calls.get(id(node), ())
        if not candidates and node.function not in self.registry.functions:
            return _call("_nofn", py.Constant(node.function))
        regex = self.c.regexes.get(id(node))
        if regex is not None and types[0] == STRING:
            return _call(self.const("rx", regex).id, args[0])
        concrete = all(isinstance(t, PrimitiveType) and t != DYN for t in types)
        if len(candidates) == 1 and concrete:
            impl = self.registry.impls[candidates[0].id]
            return py.Call(func=self.const("o", impl), args=args, keywords=[])
        receiver = py.Constant(node.target is not None)
        return _call("_call", py.Constant(node.function), receiver, *args)

    # -- macros --------------------------------------------------------------
    def comprehension(self, node: Comprehension) -> Emitted:
        target, err = self.emit(node.target)
        if not isinstance(self.type_of(node.target), ListType | MapType):
            target, err = _call("_iter", target), True
        var = f"l_{node.var}"
        pred: py.expr | None = None
        if node.predicate is not None:
            pred, perr = self.emit(node.predicate)
            if self.type_of(node.predicate) != BOOL:
                pred, perr = _call("_bool", pred), True
            err = err or perr
        if node.kind in ("all", "exists"):
            assert pred is not None
            if not err:
                gen = _genexp(pred, var, target)
                return _call("_pyall" if node.kind == "all" else "_pyany", gen), False
            return _call(f"_{node.kind}", target, _lambda(pred, var)), True
        if node.kind == "exists_one":
            assert pred is not None
            ones = _genexp(py.Constant(1), var, target, pred)
            total = _call("_pysum", ones)
            return py.Compare(left=total, ops=[py.Eq()], comparators=[py.Constant(1)]), err
        target, err = _call("_bounded", target), True  # map()/filter() build a list
        out: py.expr = _name(var)
        if node.transform is not None:
            out, terr = self.emit(node.transform)
            err = err or terr
        loop = py.comprehension(
            target=py.Name(id=var, ctx=py.Store()),
            iter=target,
            ifs=[pred] if pred is not None else [],
            is_async=0,
        )
        return py.ListComp(elt=out, generators=[loop]), err


def _genexp(elt: py.expr, var: str, target: py.expr, cond: py.expr | None = None) -> py.expr:
    gen = py.comprehension(
        target=py.Name(id=var, ctx=py.Store()),
        iter=target,
        ifs=[cond] if cond is not None else [],
        is_async=0,
    )
    return py.GeneratorExp(elt=elt, generators=[gen])


def _sized(t: Type) -> bool:
    return t in (STRING, BYTES) or isinstance(t, ListType | MapType)
