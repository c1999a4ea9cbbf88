"""Recursive-descent parser for CEL expressions, with macros expanded as it goes.

``parse(src)`` never raises: every problem is a diagnostic with a stable code.
Nesting and length are bounded (``MAX_LENGTH``, ``MAX_DEPTH``) so that no input
can exhaust the Python stack, here or in the phases after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from riskd.dsl.diagnostics import LIMIT_EXCEEDED, SYNTAX_ERROR, Diagnostic, Source
from riskd.dsl.lexer import KEYWORDS, RESERVED, Tok, Token, tokenize
from riskd.dsl.nodes import (
    MACROS,
    Call,
    Comprehension,
    Expr,
    Ident,
    ListLit,
    Literal,
    MapLit,
    Pos,
    Select,
    depth,
)
from riskd.dsl.values import INT_MAX

MAX_LENGTH = 20_000
MAX_DEPTH = 100
# Parsing recurses; this bounds the Python frames it may use (about 5 per level of
# brackets, 3 per nested operator) so that no text can exhaust the stack.
MAX_FRAMES = 400
_EXPR_FRAMES = 5
_OPERAND_FRAMES = 3
MAX_ERRORS = 20
_LOGIC_STOPS = frozenset(("&&", "||", "?", ":", ","))
_ITEM_STOPS = frozenset((",", ":"))

_BINARY: dict[str, tuple[int, str]] = {
    "||": (1, "_||_"),
    "&&": (2, "_&&_"),
    "==": (3, "_==_"), "!=": (3, "_!=_"), "<": (3, "_<_"), "<=": (3, "_<=_"),
    ">": (3, "_>_"), ">=": (3, "_>=_"), "in": (3, "@in"),
    "+": (4, "_+_"), "-": (4, "_-_"),
    "*": (5, "_*_"), "/": (5, "_/_"), "%": (5, "_%_"),
}  # fmt: skip


class _ParseError(Exception):
    def __init__(self, message: str, offset: int, code: str = SYNTAX_ERROR) -> None:
        super().__init__(message)
        self.offset = offset
        self.code = code


def parse(src: Source) -> tuple[Expr | None, list[Diagnostic]]:
    """Parse one expression; returns the AST (or None) and every diagnostic."""
    if len(src.text) > MAX_LENGTH:
        msg = f"expression is {len(src.text)} characters long; the limit is {MAX_LENGTH}"
        return None, [src.diagnostic(LIMIT_EXCEEDED, msg, 0)]
    tokens, diags = tokenize(src)
    if diags:
        return None, diags
    parser = _Parser(tokens, src)
    try:
        expr = parser.parse_all()
    except _ParseError as err:
        parser.errors.append(err)
    except RecursionError:  # a safety net: the frame budget should make this unreachable
        parser.errors.append(_ParseError("expression is nested too deeply", 0, LIMIT_EXCEEDED))
    if parser.errors:
        first_per_offset = {e.offset: e for e in reversed(parser.errors)}
        errors = sorted(first_per_offset.values(), key=lambda e: e.offset)
        return None, [src.diagnostic(e.code, str(e), e.offset) for e in errors]
    if depth(expr) > MAX_DEPTH:
        msg = f"expression is nested more than {MAX_DEPTH} levels deep"
        return None, [src.diagnostic(LIMIT_EXCEEDED, msg, 0)]
    return expr, []


class _Parser:
    def __init__(self, tokens: list[Token], src: Source) -> None:
        self.toks = tokens
        self.k = 0
        self.src = src
        self.frames = 0
        self.errors: list[_ParseError] = []

    # -- error recovery: report a syntax error, skip to a safe token, go on -------
    def recovering(self, parse: Callable[[], Expr], stops: frozenset[str]) -> Expr:
        frames = self.frames
        try:
            return parse()
        except _ParseError as err:
            if err.code != SYNTAX_ERROR or len(self.errors) >= MAX_ERRORS:
                raise
            self.errors.append(err)
            self.frames = frames
            self.skip_to(stops)
            return Literal(None, pos=self.pos(err.offset))

    def skip_to(self, stops: frozenset[str]) -> None:
        level = 0
        while (tok := self.peek()).kind is not Tok.EOF:
            text = tok.text if tok.kind is Tok.PUNCT else ""
            if level == 0 and text in stops:
                return
            if text in "([{" and text:
                level += 1
            elif text in ")]}" and text:
                if level == 0:
                    return
                level -= 1
            self.advance()

    # -- token helpers -------------------------------------------------------
    def peek(self) -> Token:
        return self.toks[self.k]  # the last token is EOF, which advance() never passes

    def advance(self) -> Token:
        tok = self.toks[self.k]
        if tok.kind is not Tok.EOF:
            self.k += 1
        return tok

    def at(self, text: str) -> bool:
        tok = self.peek()
        return tok.kind is Tok.PUNCT and tok.text == text

    def expect(self, text: str) -> Token:
        if not self.at(text):
            tok = self.peek()
            raise _ParseError(f"expected '{text}', found {_describe(tok)}", tok.offset)
        return self.advance()

    def pos(self, offset: int) -> Pos:
        return Pos(offset, self.src)

    # -- grammar -------------------------------------------------------------
    def parse_all(self) -> Expr:
        expr = self.expr()
        tok = self.peek()
        if tok.kind is not Tok.EOF:
            raise _ParseError(f"unexpected {_describe(tok)}", tok.offset)
        return expr

    def spend(self, frames: int) -> None:
        self.frames += frames
        if self.frames > MAX_FRAMES:
            raise _ParseError("expression is nested too deeply", self.peek().offset, LIMIT_EXCEEDED)

    def expr(self) -> Expr:
        self.spend(_EXPR_FRAMES)
        cond = self.binary(1)
        if self.at("?"):
            q = self.advance()
            then = self.binary(1)
            self.expect(":")
            other = self.expr()
            cond = Call("_?_:_", (cond, then, other), pos=self.pos(q.offset))
        self.frames -= _EXPR_FRAMES
        return cond

    def binary(self, min_prec: int) -> Expr:
        left = self.unary()
        while True:
            tok = self.peek()
            op = tok.text if tok.kind in (Tok.PUNCT, Tok.IDENT) else ""
            if op not in _BINARY or (tok.kind is Tok.IDENT and op != "in"):
                return left
            prec, name = _BINARY[op]
            if prec < min_prec:
                return left
            self.advance()
            # a bad operand is reported and skipped so that later errors show too
            self.spend(_OPERAND_FRAMES)
            right = self.recovering(functools.partial(self.binary, prec + 1), _LOGIC_STOPS)
            self.frames -= _OPERAND_FRAMES
            left = Call(name, (left, right), pos=self.pos(tok.offset))

    def unary(self) -> Expr:
        ops: list[Token] = []
        while self.at("!") or self.at("-"):
            tok = self.advance()
            if ops and tok.text != ops[0].text:  # CEL's grammar: one operator, repeated
                a, b = ops[0].text, tok.text
                msg = f"unexpected '{b}' after '{a}' (put it in parentheses: {a}({b}x))"
                raise _ParseError(msg, tok.offset)
            ops.append(tok)
        first = self.peek()
        node = self.member()
        folds = ops and ops[-1].text == "-" and first.kind in (Tok.INT, Tok.DOUBLE)
        if folds and isinstance(node, Literal) and node.pos.offset == first.offset:
            value = node.value
            assert isinstance(value, int | float)
            node = Literal(-value, pos=self.pos(ops[-1].offset))
            ops.pop()
        self.check_int_range(node, first)
        for op in reversed(ops):
            node = Call("!_" if op.text == "!" else "-_", (node,), pos=self.pos(op.offset))
        return node

    def check_int_range(self, node: Expr, first: Token) -> None:
        value = first.value
        big = first.kind is Tok.INT and isinstance(value, int) and value > INT_MAX
        if big and not (isinstance(node, Literal) and node.value == -INT_MAX - 1):
            raise _ParseError("integer literal out of range", first.offset)

    def member(self) -> Expr:
        node = self.primary()
        while True:
            if self.at("."):
                node = self.select(node)
            elif self.at("["):
                tok = self.advance()
                index = self.expr()
                self.expect("]")
                node = Call("_[_]", (node, index), pos=self.pos(tok.offset))
            else:
                return node

    def select(self, operand: Expr) -> Expr:
        self.advance()  # the dot
        tok = self.advance()
        if tok.kind is Tok.QUOTED:
            assert isinstance(tok.value, str)
            return Select(operand, tok.value, pos=self.pos(tok.offset))
        if tok.kind is not Tok.IDENT:
            raise _ParseError(f"expected a field name, found {_describe(tok)}", tok.offset)
        if tok.text in KEYWORDS:  # CEL's grammar: a keyword is no field or method name
            word = tok.text
            msg = f"'{word}' is a keyword, not a field name (a map key is selected `{word}`)"
            raise _ParseError(msg, tok.offset)
        if not self.at("("):
            return Select(operand, tok.text, pos=self.pos(tok.offset))
        args = self.args()
        if tok.text in MACROS:
            return self.macro(tok, operand, args)
        return Call(tok.text, args, target=operand, pos=self.pos(tok.offset))

    def args(self) -> tuple[Expr, ...]:
        self.expect("(")
        args: list[Expr] = []
        if not self.at(")"):
            args.append(self.recovering(self.expr, _ITEM_STOPS))
            while self.at(","):
                self.advance()
                args.append(self.recovering(self.expr, _ITEM_STOPS))
        self.expect(")")
        return tuple(args)

    def macro(self, name: Token, target: Expr, args: tuple[Expr, ...]) -> Expr:
        kind = name.text
        arity = (2, 3) if kind == "map" else (2,)
        if len(args) not in arity:
            raise _ParseError(
                f"{kind}() takes {' or '.join(map(str, arity))} arguments", name.offset
            )
        var = args[0]
        if not isinstance(var, Ident):
            raise _ParseError(f"the first argument of {kind}() must be a simple name", name.offset)
        pos = self.pos(name.offset)
        if kind == "map":
            pred = args[1] if len(args) == 3 else None
            return Comprehension(kind, target, var.name, pred, args[-1], pos=pos)
        return Comprehension(kind, target, var.name, args[1], pos=pos)

    def primary(self) -> Expr:
        tok = self.peek()
        if tok.kind in (Tok.INT, Tok.UINT, Tok.DOUBLE, Tok.STRING, Tok.BYTES):
            self.advance()
            return Literal(tok.value, pos=self.pos(tok.offset))
        if tok.kind is Tok.IDENT:
            return self.ident_or_call()
        if self.at("."):
            self.advance()
            if self.peek().kind is not Tok.IDENT or self.peek().text in KEYWORDS:
                raise _ParseError("expected a name after '.'", self.peek().offset)
            return self.ident_or_call()
        if self.at("("):
            self.advance()
            inner = self.expr()
            self.expect(")")
            return inner
        if self.at("["):
            return self.list_lit()
        if self.at("{"):
            return self.map_lit()
        raise _ParseError(f"unexpected {_describe(tok)}", tok.offset)

    def ident_or_call(self) -> Expr:
        tok = self.advance()
        word = tok.text
        pos = self.pos(tok.offset)
        if word in ("true", "false"):
            return Literal(word == "true", pos=pos)
        if word == "null":
            return Literal(None, pos=pos)
        if word in RESERVED or word == "in":
            raise _ParseError(f"'{word}' is a reserved word", tok.offset)
        if not self.at("("):
            return Ident(word, pos=pos)
        args = self.args()
        if word == "has":
            if len(args) != 1 or not isinstance(args[0], Select) or args[0].test_only:
                raise _ParseError("has() takes one field selection, e.g. has(a.b)", tok.offset)
            sel = args[0]
            return Select(sel.operand, sel.field, test_only=True, pos=pos)
        return Call(word, args, pos=pos)

    def list_lit(self) -> Expr:
        start = self.expect("[")
        items: list[Expr] = []
        while not self.at("]"):
            items.append(self.recovering(self.expr, _ITEM_STOPS))
            if not self.at(","):
                break
            self.advance()
        self.expect("]")
        return ListLit(tuple(items), pos=self.pos(start.offset))

    def map_lit(self) -> Expr:
        start = self.expect("{")
        entries: list[tuple[Expr, Expr]] = []
        while not self.at("}"):
            key = self.expr()
            self.expect(":")
            entries.append((key, self.recovering(self.expr, _ITEM_STOPS)))
            if not self.at(","):
                break
            self.advance()
        self.expect("}")
        return MapLit(tuple(entries), pos=self.pos(start.offset))


def _describe(tok: Token) -> str:
    if tok.kind is Tok.EOF:
        return "end of input"
    return f"'{tok.text}'"
