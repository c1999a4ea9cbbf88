"""Type checker: resolves names and overloads against an ``Env`` and reports type errors.

The checker annotates (it does not rewrite) the AST: ``Checked`` maps each
node to its type, each identifier to what it names, each call to its
candidate overloads, each velocity call to its ``FeatureQuery`` and each
literal ``matches`` pattern to its compiled RE2 predicate. With
``strict=False`` (the "unchecked" mode CEL's conformance suite uses)
problems become run-time errors instead of diagnostics.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from riskd.domain.features import KEYS, WINDOWS, Agg, FeatureQuery
from riskd.dsl import runtime as rt
from riskd.dsl.diagnostics import (
    BAD_ARGUMENT,
    BAD_REGEX,
    TYPE_ERROR,
    UNDECLARED,
    UNKNOWN_FIELD,
    UNKNOWN_FUNCTION,
    Diagnostic,
)
from riskd.dsl.functions import ZONED_METHODS
from riskd.dsl.nodes import (
    Call,
    Comprehension,
    Expr,
    Ident,
    ListLit,
    Literal,
    MapLit,
    Select,
    children,
)
from riskd.dsl.regex import RegexError, compile_pattern
from riskd.dsl.registry import DEFAULT_REGISTRY, VELOCITY, Overload, Registry
from riskd.dsl.types import (
    BOOL,
    BYTES,
    DOUBLE,
    DYN,
    INT,
    NULL,
    STRING,
    TYPE,
    UINT,
    ListType,
    MapType,
    ObjectType,
    Type,
    TypeParam,
    TypeType,
    is_dyn,
)
from riskd.dsl.values import (
    EvalError,
    Timestamp,
    TypeValue,
    UInt,
    parse_duration,
    parse_timestamp,
    parse_zone,
)

TYPE_NAMES = (
    "int",
    "uint",
    "double",
    "string",
    "bool",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
)
_ORDER_OPS = {"_<_": "<", "_<=_": "<=", "_>_": ">", "_>=_": ">="}
_EQ_OPS = {"_==_": "==", "_!=_": "!="}
_ARITH_OPS = {"_+_": "+", "_-_": "-", "_*_": "*", "_/_": "/", "_%_": "%"}
_AGG = {"orders": Agg.COUNT, "amount": Agg.SUM, "distinct": Agg.DISTINCT}


@dataclass(frozen=True, slots=True)
class Env:
    """What an expression may refer to: typed variables and the function registry."""

    variables: Mapping[str, Type]
    registry: Registry = DEFAULT_REGISTRY


@dataclass(frozen=True, slots=True)
class Ref:
    """What an identifier (or qualified name) resolves to.

    kind: ``var`` (an Env variable), ``local`` (a macro variable), ``type``
    (a type denotation such as ``int``) or ``unbound`` (a run-time error).
    """

    kind: str
    name: str


@dataclass(slots=True)
class Checked:
    """The checker's annotations, keyed by ``id(node)`` of nodes in ``root``."""

    root: Expr
    types: dict[int, Type] = field(default_factory=dict)
    refs: dict[int, Ref] = field(default_factory=dict)
    calls: dict[int, tuple[Overload, ...]] = field(default_factory=dict)
    features: dict[int, FeatureQuery] = field(default_factory=dict)
    regexes: dict[int, Callable[[str], bool]] = field(default_factory=dict)

    def type_of(self, node: Expr) -> Type:
        return self.types.get(id(node), DYN)


def check(root: Expr, env: Env, *, strict: bool = True) -> tuple[Checked, list[Diagnostic]]:
    """Check ``root``; returns the annotations and (in strict mode) every type error."""
    c = _Checker(env, strict, Checked(root))
    c.visit(root)
    return c.out, c.diags


def type_value(name: str) -> TypeValue:
    return TypeValue(name)


class _Checker:
    def __init__(self, env: Env, strict: bool, out: Checked) -> None:
        self.env = env
        self.strict = strict
        self.out = out
        self.diags: list[Diagnostic] = []
        self.scopes: list[dict[str, Type]] = []

    def error(self, node: Expr, code: str, message: str) -> None:
        if not self.strict:
            return
        src = node.pos.source
        if src is None:
            self.diags.append(Diagnostic(code, message, "<expr>", 1, node.pos.offset + 1))
        else:
            self.diags.append(src.diagnostic(code, message, node.pos.offset))

    def visit(self, node: Expr) -> Type:
        t = self._visit(node)
        self.out.types[id(node)] = t
        return t

    def _visit(self, node: Expr) -> Type:
        if isinstance(node, Literal):
            return _literal_type(node.value)
        if isinstance(node, Ident):
            return self.ident(node)
        if isinstance(node, Select):
            return self.select(node)
        if isinstance(node, Call):
            return self.call(node)
        if isinstance(node, ListLit):
            return ListType(self.join([self.visit(e) for e in node.elements]))
        if isinstance(node, MapLit):
            return self.map_lit(node)
        return self.comprehension(node)

    # -- names ---------------------------------------------------------------
    def local(self, name: str) -> Type | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def ident(self, node: Ident) -> Type:
        local = self.local(node.name)
        if local is not None:
            self.out.refs[id(node)] = Ref("local", node.name)
            return local
        if node.name in self.env.variables:
            self.out.refs[id(node)] = Ref("var", node.name)
            return self.env.variables[node.name]
        if node.name in TYPE_NAMES:
            self.out.refs[id(node)] = Ref("type", node.name)
            return TYPE
        self.out.refs[id(node)] = Ref("unbound", node.name)
        self.error(node, UNDECLARED, f"undeclared reference to '{node.name}'")
        return DYN

    def qualified(self, node: Select) -> str | None:
        parts: list[str] = [node.field]
        cur: Expr = node.operand
        while isinstance(cur, Select) and not cur.test_only:
            parts.append(cur.field)
            cur = cur.operand
        if not isinstance(cur, Ident) or self.local(cur.name) is not None:
            return None
        return ".".join([cur.name, *reversed(parts)])

    def select(self, node: Select) -> Type:
        name = self.qualified(node) if not node.test_only else None
        if name is not None and name in self.env.variables:
            self.out.refs[id(node)] = Ref("var", name)
            return self.env.variables[name]
        operand = self.visit(node.operand)
        result = self.field_type(node, operand)
        return BOOL if node.test_only else result

    def field_type(self, node: Select, operand: Type) -> Type:
        if isinstance(operand, ObjectType):
            ft = operand.field(node.field)
            if ft is None or node.field.startswith("_"):
                names = [n for n, _ in operand.fields]
                close = difflib.get_close_matches(node.field, names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                message = f"{operand.name} has no field '{node.field}'{hint}"
                self.error(node, UNKNOWN_FIELD, message)
                return DYN
            return ft
        if isinstance(operand, MapType):
            if not (is_dyn(operand.key) or operand.key == STRING):
                self.error(node, TYPE_ERROR, f"cannot select a field of {operand}")
            return operand.value
        if is_dyn(operand):
            return DYN
        self.error(node, TYPE_ERROR, f"type '{operand}' does not support field selection")
        return DYN

    # -- literals ------------------------------------------------------------
    def join(self, types: list[Type]) -> Type:
        if not types:
            return DYN
        first = types[0]
        return first if all(t == first for t in types) else DYN

    def map_lit(self, node: MapLit) -> Type:
        keys, values = [], []
        literal: list[object] = []  # the literal keys so far
        for k, v in node.entries:
            kt = self.visit(k)
            if not (is_dyn(kt) or kt in (INT, UINT, STRING, BOOL)):
                self.error(k, TYPE_ERROR, f"unsupported map key type {kt}")
            elif isinstance(k, Literal) and isinstance(k.value, str | int):
                # fails every evaluation (CEL's repeated key: 1 and 1u are one key, true not)
                if rt.contains(literal, k.value):
                    self.error(k, BAD_ARGUMENT, "map literal with a repeated key")
                elif k.value in literal:  # true and 1: two CEL keys, one Python key
                    msg = "unsupported map: a bool key and a number key of equal value"
                    self.error(k, BAD_ARGUMENT, msg)
                literal.append(k.value)
            keys.append(kt)
            values.append(self.visit(v))
        return MapType(self.join(keys), self.join(values))

    # -- macros --------------------------------------------------------------
    def comprehension(self, node: Comprehension) -> Type:
        target = self.visit(node.target)
        if isinstance(target, ListType):
            var = target.elem
        elif isinstance(target, MapType):
            var = target.key
        else:
            if not is_dyn(target):
                self.error(node, TYPE_ERROR, f"{node.kind}() cannot range over {target}")
            var = DYN
        self.scopes.append({node.var: var})
        try:
            if node.predicate is not None:
                self.expect_bool(node.predicate, self.visit(node.predicate), node.kind)
            out = self.visit(node.transform) if node.transform is not None else var
        finally:
            self.scopes.pop()
        if node.kind in ("map", "filter"):
            return ListType(out)
        return BOOL

    def expect_bool(self, node: Expr, t: Type, what: str) -> None:
        if t != BOOL and not is_dyn(t):
            self.error(node, TYPE_ERROR, f"{what} needs a bool, got {t}")

    # -- calls ---------------------------------------------------------------
    def call(self, node: Call) -> Type:
        fn = node.function
        if node.target is None and fn in ("_&&_", "_||_"):
            for a in node.args:
                self.expect_bool(a, self.visit(a), "'&&'" if fn == "_&&_" else "'||'")
            return BOOL
        if node.target is None and fn == "_?_:_":
            cond, then, other = node.args
            self.expect_bool(cond, self.visit(cond), "the condition of '?:'")
            return self.join([self.visit(then), self.visit(other)])
        if node.target is None and fn in VELOCITY:
            return self.velocity(node)
        args = [self.visit(a) for a in node.args]
        if node.target is not None:
            args.insert(0, self.visit(node.target))
        if fn == "matches":
            self.literal_regex(node)
        self.literal_time(node)
        return self.resolve(node, args)

    def resolve(self, node: Call, args: list[Type]) -> Type:
        function = self.env.registry.functions.get(node.function)
        if function is None:
            self.error(node, UNKNOWN_FUNCTION, f"undeclared function '{node.function}'")
            self.out.calls[id(node)] = ()
            return DYN
        receiver = node.target is not None
        matches: list[tuple[Overload, Type]] = []
        for o in function.overloads:
            if o.receiver != receiver or len(o.params) != len(args):
                continue
            binds: dict[str, Type] = {}
            if all(unify(p, a, binds) for p, a in zip(o.params, args, strict=True)):
                matches.append((o, substitute(o.result, binds)))
        if not matches:
            self.error(node, TYPE_ERROR, _overload_message(node, args))
            self.out.calls[id(node)] = ()  # resolved at run time, if at all
            return DYN
        self.out.calls[id(node)] = tuple(o for o, _ in matches)
        return self.join([r for _, r in matches])

    def velocity(self, node: Call) -> Type:
        fn = node.function
        want = 3 if fn == "distinct" else 2
        for a in node.args:
            self.visit(a)
        if len(node.args) != want:
            usage = f"{fn}(KEY, OF, WINDOW)" if want == 3 else f"{fn}(KEY, WINDOW)"
            self.error(node, BAD_ARGUMENT, f"{fn}() takes {want} arguments: {usage}")
            return INT
        texts: list[str] = []
        for i, a in enumerate(node.args):
            allowed = WINDOWS if i == want - 1 else KEYS
            what = "window" if i == want - 1 else "key"
            if not isinstance(a, Literal) or not isinstance(a.value, str):
                self.error(a, BAD_ARGUMENT, f"the {what} of {fn}() must be a string literal")
                return INT
            if a.value not in allowed:
                choices = ", ".join(f'"{x}"' for x in allowed)
                self.error(
                    a, BAD_ARGUMENT, f'unknown {what} "{a.value}"; expected one of {choices}'
                )
                return INT
            texts.append(a.value)
        of = texts[1] if want == 3 else ""
        if of and of == texts[0]:  # one value per order's own key: always 1, and no test sets it
            message = f'distinct() counts other identities than its key: OF "{of}" is the KEY'
            self.error(node.args[1], BAD_ARGUMENT, message)
            return INT
        query = FeatureQuery(_AGG[fn], texts[0], texts[-1], of=of)
        self.out.features[id(node)] = _QUERIES.setdefault(query, query)
        self.out.calls[id(node)] = self.env.registry.functions[fn].overloads
        return INT

    def literal_time(self, node: Call) -> None:
        """A string literal that ``duration()``, ``timestamp()`` or a time zone argument
        cannot read would fail every evaluation: it is a diagnostic at the literal."""
        text = node.args[0] if len(node.args) == 1 else None
        if not isinstance(text, Literal):
            return
        if _epoch_seconds(text.value) and node.target is None and node.function == "timestamp":
            try:
                Timestamp.checked(cast(int, text.value) * 10**9)
            except EvalError as exc:
                self.error(text, BAD_ARGUMENT, _TIME_HINTS.get(str(exc), str(exc)))
            return
        if not isinstance(text.value, str):
            return
        if node.target is None and node.function in _TIME_LITERALS:
            read = _TIME_LITERALS[node.function]
        elif node.target is not None and node.function in ZONED_METHODS:
            read = parse_zone
        else:
            return
        try:
            read(text.value)
        except EvalError as exc:
            self.error(text, BAD_ARGUMENT, _TIME_HINTS.get(str(exc), str(exc)))

    def literal_regex(self, node: Call) -> None:
        pattern = node.args[-1] if node.args else None
        if not isinstance(pattern, Literal) or not isinstance(pattern.value, str):
            return
        try:
            self.out.regexes[id(node)] = compile_pattern(pattern.value)
        except RegexError as exc:
            self.error(pattern, BAD_REGEX, f"invalid regular expression: {exc}")


def _epoch_seconds(value: object) -> bool:
    """An int literal, as ``timestamp(int)`` takes it (a uint or bool is no overload)."""
    return isinstance(value, int) and not isinstance(value, bool | UInt)


_TIME_LITERALS: dict[str, Callable[[str], object]] = {
    "duration": parse_duration,
    "timestamp": parse_timestamp,
}
_TIME_HINTS = {
    "invalid duration": 'not a duration: write it as Go does, e.g. "1h30m", "-1.5s", "250ms"',
    "duration out of range": "duration out of range (a 64-bit count of nanoseconds: ±292 years)",
    "invalid timestamp": 'not an RFC 3339 timestamp, e.g. "2024-06-18T12:00:00Z" or "...+08:00"',
    "timestamp out of range": "timestamp out of range (years 0001 to 9999)",
    "unknown time zone": 'unknown time zone: an IANA name ("Asia/Shanghai") or "+08:00"',
    "time zone offset out of range": "time zone offset out of range (at most 23:59)",
}


# One object per distinct query for every rule ever compiled (a few hundred at most): the
# feature snapshot is keyed by the program's queries, and a rule's lookup that finds the
# very same object never calls ``FeatureQuery.__eq__``.
_QUERIES: dict[FeatureQuery, FeatureQuery] = {}


def _overload_message(node: Call, args: list[Type]) -> str:
    fn = node.function
    if fn in _EQ_OPS or fn in _ORDER_OPS:
        return f"cannot compare {args[0]} with {args[1]}"
    if fn in _ARITH_OPS:
        return f"cannot apply '{_ARITH_OPS[fn]}' to {args[0]} and {args[1]}"
    if fn == "@in":
        return f"cannot test membership of {args[0]} in {args[1]}"
    if fn == "_[_]":
        return f"cannot index {args[0]} with {args[1]}"
    shown = {"!_": "!", "-_": "-"}.get(fn, fn)
    return f"no matching overload for '{shown}' applied to ({', '.join(map(str, args))})"


def _literal_type(value: object) -> Type:
    if value is None:
        return NULL
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, UInt):
        return UINT
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return DOUBLE
    if isinstance(value, bytes):
        return BYTES
    return STRING


def unify(param: Type, arg: Type, binds: dict[str, Type]) -> bool:
    """Can ``arg`` be passed where ``param`` is expected? Binds type parameters."""
    if isinstance(param, TypeParam):
        bound = binds.get(param.name)
        if bound is None:
            binds[param.name] = arg
            return True
        if assignable(bound, arg):
            if is_dyn(bound) and not is_dyn(arg):
                return True
            binds[param.name] = bound if bound == arg else _widen(bound, arg)
            return True
        return False
    if arg == DYN or param == DYN:
        return True
    if isinstance(param, ListType):
        return isinstance(arg, ListType) and unify(param.elem, arg.elem, binds)
    if isinstance(param, MapType):
        return (
            isinstance(arg, MapType)
            and unify(param.key, arg.key, binds)
            and unify(param.value, arg.value, binds)
        )
    if isinstance(param, TypeType):
        return isinstance(arg, TypeType)
    return param == arg


def assignable(a: Type, b: Type) -> bool:
    """Structural compatibility where ``dyn`` matches anything."""
    if is_dyn(a) or is_dyn(b):
        return True
    if isinstance(a, ListType) and isinstance(b, ListType):
        return assignable(a.elem, b.elem)
    if isinstance(a, MapType) and isinstance(b, MapType):
        return assignable(a.key, b.key) and assignable(a.value, b.value)
    if isinstance(a, TypeType):
        return isinstance(b, TypeType)
    return a == b


def _widen(a: Type, b: Type) -> Type:
    return a if a == b else DYN


def substitute(t: Type, binds: Mapping[str, Type]) -> Type:
    if isinstance(t, TypeParam):
        return binds.get(t.name, DYN)
    if isinstance(t, ListType):
        return ListType(substitute(t.elem, binds))
    if isinstance(t, MapType):
        return MapType(substitute(t.key, binds), substitute(t.value, binds))
    return t


__all__ = ["DOUBLE", "Checked", "Env", "Ref", "check", "type_value"]


# ------------------------------------------------------------------ worst-case cost

# A comprehension runs its body once per element, and nested ones multiply: two macros
# over a 3,000-entry list cost 9 million steps (over a second). ``iteration_cost`` bounds
# what a ``when`` can cost before it ever runs, so that rule files with a rule too slow
# for the scoring deadline are refused (``riskd.dsl.ruleset``), shadow rules included.
MAX_ITERATIONS = 50_000  # worst-case steps per rule (~7 ms); two macros over an order's items fit
ORDER_LIST_BOUND = 200  # items in an order (``riskd.service.validate.MAX_ITEMS``)
REGEX_STEPS = 30  # a ``matches`` search (~4 µs through RE2's binding) in steps (~0.14 µs)


def iteration_cost(checked: Checked, sizes: Mapping[str, int]) -> tuple[int, Expr | None]:
    """The worst-case number of steps of ``checked``'s expression, and where most are spent.

    A step is one run of a comprehension's body, or one element a list concatenation
    copies, a membership test on a list literal scans or an equality of two lists (maps)
    compares; a ``matches`` counts ``REGEX_STEPS``. A named list counts its size
    (``sizes``), a list of the order ``ORDER_LIST_BOUND``, a literal its elements, and a
    list of unknown size (an index into a map of lists, say) ``ORDER_LIST_BOUND``. The
    node returned is the outermost costliest comprehension (None when there is none).
    """
    est = _Cost(checked, sizes)
    return est.cost(checked.root, {}), est.worst


class _Cost:
    def __init__(self, checked: Checked, sizes: Mapping[str, int]) -> None:
        self.c = checked
        self.sizes = sizes
        self.worst: Expr | None = None
        self.worst_cost = -1

    def cost(self, node: Expr, local: Mapping[str, int]) -> int:
        if isinstance(node, Comprehension):
            inner = {**local, node.var: self.elem_size(node.target, local)}
            body = sum(self.cost(e, inner) for e in (node.predicate, node.transform) if e)
            total = self.cost(node.target, local) + self.size(node.target, local) * (1 + body)
            if total > self.worst_cost:
                self.worst, self.worst_cost = node, total
            return total
        own = 0
        if isinstance(node, Call) and isinstance(self.c.type_of(node), ListType):
            own = self.size(node, local) if node.function == "_+_" else 0
        if isinstance(node, Call) and node.function == "@in" and len(node.args) == 2:
            container = node.args[1]
            if isinstance(container, ListLit):
                own = len(container.elements)
        if isinstance(node, Call) and node.function == "matches":
            own = REGEX_STEPS
        if (
            isinstance(node, Call)
            and node.function in ("_==_", "_!=_")
            and any(isinstance(self.c.type_of(a), ListType | MapType) for a in node.args)
        ):
            own = min(self.size(a, local) for a in node.args)  # pairs compared
        return own + sum(self.cost(c, local) for c in children(node))

    def size(self, node: Expr, local: Mapping[str, int]) -> int:
        """At most how many elements a list (or keys a map) ``node`` evaluates to has."""
        if isinstance(node, Literal):
            return 0
        if isinstance(node, ListLit):
            return len(node.elements)
        if isinstance(node, MapLit):
            return len(node.entries)
        ref = self.c.refs.get(id(node))
        if ref is not None and ref.kind == "var" and ref.name in self.sizes:
            return self.sizes[ref.name]
        if ref is not None and ref.kind == "local":
            return local.get(ref.name, ORDER_LIST_BOUND)
        if isinstance(node, Comprehension) and node.kind in ("map", "filter"):
            return self.size(node.target, local)
        if isinstance(node, Call) and node.target is None:
            args = node.args
            if node.function == "_+_" and len(args) == 2:
                return self.size(args[0], local) + self.size(args[1], local)
            if node.function == "_?_:_":
                return max(self.size(args[1], local), self.size(args[2], local))
            if node.function == "dyn" and len(args) == 1:
                return self.size(args[0], local)
            if node.function == "_[_]" and len(args) == 2:
                return self.elem_size(args[0], local)
        return ORDER_LIST_BOUND

    def elem_size(self, node: Expr, local: Mapping[str, int]) -> int:
        """At most how many elements each element of list ``node`` has (0: not lists)."""
        if isinstance(node, ListLit):
            return max((self.size(e, local) for e in node.elements), default=0)
        elem = self.c.type_of(node)
        if isinstance(elem, ListType) and not isinstance(elem.elem, ListType | MapType):
            return 0 if not is_dyn(elem.elem) else ORDER_LIST_BOUND
        return ORDER_LIST_BOUND
