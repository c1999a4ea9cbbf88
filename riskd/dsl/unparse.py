"""Canonical source text for an AST: ``parse(unparse(e)) == e``.

Parentheses appear only where precedence needs them; strings use double
quotes with escapes; ``rules fmt`` builds on this.
"""

from __future__ import annotations

import math
import re

from riskd.dsl.lexer import KEYWORDS
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select
from riskd.dsl.values import UInt

_BINARY = {
    "_||_": ("||", 1), "_&&_": ("&&", 2),
    "_==_": ("==", 3), "_!=_": ("!=", 3), "_<_": ("<", 3), "_<=_": ("<=", 3),
    "_>_": (">", 3), "_>=_": (">=", 3), "@in": ("in", 3),
    "_+_": ("+", 4), "_-_": ("-", 4), "_*_": ("*", 5), "_/_": ("/", 5), "_%_": ("%", 5),
}  # fmt: skip
_UNARY = 6
_MEMBER = 7
_IDENT_RE = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_ESC = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def unparse(expr: Expr) -> str:
    """Render ``expr`` as canonical CEL text."""
    return _render(expr)[0]


def _wrap(expr: Expr, min_prec: int) -> str:
    text, prec = _render(expr)
    return f"({text})" if prec < min_prec else text


def _render(e: Expr) -> tuple[str, int]:
    if isinstance(e, Literal):
        return _literal(e.value)
    if isinstance(e, Ident):
        return e.name, _MEMBER
    if isinstance(e, Select):
        plain = _IDENT_RE.fullmatch(e.field) and e.field not in KEYWORDS  # m.`in`, as CEL
        field = e.field if plain else f"`{e.field}`"
        text = f"{_wrap(e.operand, _MEMBER)}.{field}"
        return (f"has({text})", _MEMBER) if e.test_only else (text, _MEMBER)
    if isinstance(e, Call):
        return _call(e)
    if isinstance(e, ListLit):
        return "[" + ", ".join(_wrap(x, 0) for x in e.elements) + "]", _MEMBER
    if isinstance(e, MapLit):
        items = (f"{_wrap(k, 0)}: {_wrap(v, 0)}" for k, v in e.entries)
        return "{" + ", ".join(items) + "}", _MEMBER
    return _comprehension(e)


def _comprehension(e: Comprehension) -> tuple[str, int]:
    parts = [e.var]
    if e.predicate is not None:
        parts.append(_wrap(e.predicate, 0))
    if e.transform is not None:
        parts.append(_wrap(e.transform, 0))
    return f"{_wrap(e.target, _MEMBER)}.{e.kind}({', '.join(parts)})", _MEMBER


def _call(e: Call) -> tuple[str, int]:
    fn, args = e.function, e.args
    if fn in _BINARY and len(args) == 2 and e.target is None:
        op, prec = _BINARY[fn]
        return f"{_wrap(args[0], prec)} {op} {_wrap(args[1], prec + 1)}", prec
    if fn == "_?_:_" and len(args) == 3 and e.target is None:
        return f"{_wrap(args[0], 1)} ? {_wrap(args[1], 1)} : {_wrap(args[2], 0)}", 0
    if fn in ("!_", "-_") and len(args) == 1 and e.target is None:
        operand = args[0]
        if fn == "-_" and _is_number(operand):
            return f"-({unparse(operand)})", _UNARY
        inner = _wrap(operand, _UNARY)
        if inner[:1] in ("!", "-") and inner[0] != fn[0]:  # CEL repeats one operator only
            inner = f"({inner})"
        return fn[0] + inner, _UNARY
    if fn == "_[_]" and len(args) == 2 and e.target is None:
        return f"{_wrap(args[0], _MEMBER)}[{_wrap(args[1], 0)}]", _MEMBER
    rendered = ", ".join(_wrap(a, 0) for a in args)
    if e.target is not None:
        return f"{_wrap(e.target, _MEMBER)}.{fn}({rendered})", _MEMBER
    return f"{fn}({rendered})", _MEMBER


def _is_number(e: Expr) -> bool:
    v = e.value if isinstance(e, Literal) else None
    return isinstance(v, int | float) and not isinstance(v, bool | UInt)


def _literal(v: object) -> tuple[str, int]:
    if v is None:
        return "null", _MEMBER
    if isinstance(v, bool):
        return ("true" if v else "false"), _MEMBER
    if isinstance(v, UInt):
        return f"{int(v)}u", _MEMBER
    if isinstance(v, int):
        return str(v), (_UNARY if v < 0 else _MEMBER)
    if isinstance(v, float):
        return _double(v), (_UNARY if math.copysign(1.0, v) < 0 else _MEMBER)
    if isinstance(v, str):
        return '"' + "".join(_escape_char(c) for c in v) + '"', _MEMBER
    if isinstance(v, bytes):
        return 'b"' + "".join(_escape_byte(b) for b in v) + '"', _MEMBER
    raise TypeError(f"not a literal value: {type(v).__name__}")


def _double(v: float) -> str:
    if math.isinf(v):
        return "1e999" if v > 0 else "-1e999"
    if math.isnan(v):
        return "(0.0 / 0.0)"
    text = repr(v)
    return text if any(c in text for c in ".en") else text + ".0"


def _escape_char(c: str) -> str:
    if c in _ESC:
        return _ESC[c]
    code = ord(c)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xD800 <= code <= 0xDFFF:
        return "\ufffd"
    return c


def _escape_byte(b: int) -> str:
    c = chr(b)
    if c in _ESC:
        return _ESC[c]
    if 0x20 <= b < 0x7F:
        return c
    return f"\\x{b:02x}"
