"""The structure of a rule file: lexer and parser, with positions and diagnostics.

A rule file (``*.rules``) is a sequence of items, each introduced by a keyword::

    # Scenario tags rules may claim to cover.
    scenario live_room_checkout = "Checkout from inside a live room"

    list high_risk_categories = ["cosmetics", "small_appliances"]

    rule new_account_high_value {
      description = "Account younger than 7 days orders more than 500 CNY"
      owner       = "risk-ops"
      scenarios   = [new_account, live_room_checkout]
      mode        = active
      action      = review
      score       = 40
      reason      = NEW_ACCOUNT_HIGH_VALUE
      when        = order.buyer.account_age_days < 7
          && order.amounts.total > 50000
    }

    test "a 2-day-old account buys for 800 CNY" {
      order  = {buyer: {account_age_days: 2}, amounts: {items: 80000, total: 80000}}
      expect = [new_account_high_value]
    }

Values are JSON-like (strings, numbers, ``true``/``false``/``null``, ``[...]``,
``{key: value}``) plus bare identifiers. The ``when`` field holds CEL text that
runs to the block's closing brace, so it is always a rule's last field. ``#``
starts a comment (kept by the formatter); inside ``when`` the comment is CEL's
``//``.

This module only knows the shape of a file: ``parse`` returns a generic syntax
tree (``RuleFile``) and diagnostics; what the fields mean is checked by
``riskd.dsl.program``. Positions never take part in equality, so
``parse(format(tree)) == tree``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

from riskd.dsl.diagnostics import SYNTAX_ERROR, Diagnostic, Diagnostics

KEYWORDS: tuple[str, ...] = ("scenario", "list", "rule", "test")
BLOCK_KEYWORDS: tuple[str, ...] = ("rule", "test")
WHEN = "when"
BLANK = "\n"  # in a comment tuple: a blank line between comment lines

BAD_STRING = "riskd_bad_string"
BAD_NUMBER = "riskd_bad_number"
UNTERMINATED = "riskd_unterminated"
MISPLACED_COMMENT = "riskd_misplaced_comment"

_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_START = re.compile(r"-?[0-9]")
_BLANKS_RE = re.compile(r"[ \t\r\n]+")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_PUNCT = "{}[]=,:"
# a line of a block that assigns a field (CEL has no lone "="): one written after ``when``;
# its leading blanks are those the formatter strips (str.isspace), or fmt could make one
_FIELD_LINE = re.compile(r"[^\S\n]*([A-Za-z_][A-Za-z0-9_]*)[ \t]*=(?!=)")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Pos:
    """Where something starts in its file (1-based line and column)."""

    file: str = "<rules>"
    line: int = 1
    col: int = 1


_NOPOS = Pos()


@dataclass(frozen=True, slots=True)
class Scalar:
    """A string, number, bool or null; ``kind`` keeps ``1``, ``1.0`` and ``true`` apart."""

    value: str | int | float | bool | None
    kind: str  # "string" | "int" | "float" | "bool" | "null"
    pos: Pos = field(default=_NOPOS, compare=False)


@dataclass(frozen=True, slots=True)
class Name:
    """A bare identifier used as a value, e.g. ``active`` or a scenario tag."""

    name: str
    pos: Pos = field(default=_NOPOS, compare=False)


@dataclass(frozen=True, slots=True)
class Array:
    items: tuple[Value, ...]
    pos: Pos = field(default=_NOPOS, compare=False)


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``key: value`` of an object; ``key`` was written bare or quoted."""

    key: str
    value: Value
    pos: Pos = field(default=_NOPOS, compare=False)


@dataclass(frozen=True, slots=True)
class Object:
    entries: tuple[Entry, ...]
    pos: Pos = field(default=_NOPOS, compare=False)


Value: TypeAlias = Scalar | Name | Array | Object


@dataclass(frozen=True, slots=True)
class When:
    """CEL text of a ``when`` field.

    ``lines`` is the text with each line stripped and blank lines dropped (what
    the formatter writes back); ``raw`` is the exact slice of the file, which
    is what gets compiled so that positions inside it are the file's.
    """

    lines: tuple[str, ...]
    raw: str = field(default="", compare=False)
    pos: Pos = field(default=_NOPOS, compare=False)

    @property
    def text(self) -> str:
        return self.raw if self.raw else "\n".join(self.lines)


@dataclass(frozen=True, slots=True)
class Field:
    """``name = value`` inside a block, with the comment lines above it."""

    name: str
    value: Value | When
    comments: tuple[str, ...] = ()
    trailing: str = ""
    pos: Pos = field(default=_NOPOS, compare=False)


@dataclass(frozen=True, slots=True)
class Item:
    """A top-level ``keyword name = value`` or ``keyword name { fields }``.

    ``value`` is set for declarations (``scenario``, ``list``), ``fields`` for
    blocks (``rule``, ``test``); ``end_comments`` are comments before ``}``.
    """

    keyword: str
    name: Scalar | Name
    value: Value | None = None
    fields: tuple[Field, ...] = ()
    comments: tuple[str, ...] = ()
    trailing: str = ""
    end_comments: tuple[str, ...] = ()
    pos: Pos = field(default=_NOPOS, compare=False)

    @property
    def label(self) -> str:
        """The item's name as text (a test may be named by a string)."""
        return self.name.name if isinstance(self.name, Name) else str(self.name.value)


@dataclass(frozen=True, slots=True)
class RuleFile:
    items: tuple[Item, ...]
    end_comments: tuple[str, ...] = ()
    path: str = field(default="<rules>", compare=False)
    text: str = field(default="", compare=False)


# --------------------------------------------------------------------------- lexer


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "ident" | "string" | "number" | "punct" | "eof"
    text: str
    offset: int
    line: int
    col: int


@dataclass(frozen=True, slots=True)
class Comment:
    text: str  # without the leading "#" and surrounding blanks
    line: int
    own_line: bool  # nothing but blanks before it on its line
    col: int = 1  # of its "#"


class ParseAbort(Exception):
    """Internal: stop the current item after a syntax error (never escapes ``parse``)."""


class _Scanner:
    """Turns file text into tokens on demand; the parser can ask for raw CEL text."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.lines = text.split("\n")
        self.pos = 0
        self.line = 1
        self.col = 1
        self.comments: list[Comment] = []
        self.diags: list[Diagnostic] = []
        self._peeked: Token | None = None
        self._last_line = 0  # line of the last token handed out

    def diag(self, code: str, message: str, line: int, col: int) -> None:
        src = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        self.diags.append(Diagnostic(code, message, self.path, line, col, src))

    def _advance(self, n: int) -> None:
        end = self.pos + n
        newlines = self.text.count("\n", self.pos, end)
        if newlines:
            self.line += newlines
            self.col = end - self.text.rfind("\n", self.pos, end)
        else:
            self.col += n
        self.pos = end

    def _skip_blanks(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t\r\n":
                m = _BLANKS_RE.match(text, self.pos)
                assert m is not None
                self._advance(m.end() - self.pos)
            elif ch == "#":
                end = text.find("\n", self.pos)
                end = len(text) if end < 0 else end
                body = text[self.pos + 1 : end].strip()
                own = self.text[self.pos - self.col + 1 : self.pos].strip() == ""
                self.comments.append(Comment(body, self.line, own, self.col))
                self._advance(end - self.pos)
            else:
                return

    def peek(self) -> Token:
        if self._peeked is None:
            self._peeked = self._scan()
        return self._peeked

    def next(self) -> Token:
        tok = self.peek()
        self._peeked = None
        self._last_line = tok.line
        return tok

    def _scan(self) -> Token:
        self._skip_blanks()
        start, line, col = self.pos, self.line, self.col
        if start >= len(self.text):
            return Token("eof", "", start, line, col)
        ch = self.text[start]
        kind, length = self._classify(ch, start)
        self._advance(length)
        return Token(kind, self.text[start : start + length], start, line, col)

    def _classify(self, ch: str, start: int) -> tuple[str, int]:
        if ch in _PUNCT:
            return "punct", 1
        if ch == '"':
            return "string", self._string_length(start)
        if _NUMBER_START.match(self.text, start):
            m = _NUMBER_RE.match(self.text, start)
            assert m is not None  # _NUMBER_START guarantees at least "-?[0-9]"
            return "number", m.end() - start
        m = _IDENT_RE.match(self.text, start)
        if m is not None:
            return "ident", m.end() - start
        return "punct", 1  # an unexpected character; the parser reports it

    def _string_length(self, start: int) -> int:
        i = start + 1
        while i < len(self.text):
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                return i + 1 - start
            if ch == "\n":
                break
            i += 1
        self.diag(UNTERMINATED, "string is not closed on its line", self.line, self.col)
        return max(i - start, 1)

    def raw_expression(self) -> tuple[str, int, int, int] | None:
        """The raw CEL text up to the block's closing brace: (text, offset, line, col).

        Brackets are balanced and string literals and ``//`` comments skipped,
        so a ``}`` inside the expression does not end it. None (with a
        diagnostic) when the file ends first.
        """
        assert self._peeked is None
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self._advance(1)
        start, line, col = self.pos, self.line, self.col
        found = _expression_end(self.text, start)
        if found is None:
            self.diag(UNTERMINATED, "expression runs to the end of the file", line, col)
            return None
        end, field_at = found
        if field_at is not None:  # a field after ``when``: it ends the expression
            end = field_at
            name = _FIELD_LINE.match(self.text, field_at + 1)
            assert name is not None
            at_line = line + self.text.count("\n", start, field_at + 1)
            message = f"'when' must be the last field of a block: {name.group(1)!r} follows it"
            self.diag(SYNTAX_ERROR, message, at_line, name.start(1) - field_at)
            end = _before_comment_lines(self.text, start, end)  # the field's own comments
        self._advance(end - start)
        return self.text[start:end], start, line, col

    def take_comments(self) -> tuple[Comment, ...]:
        out = tuple(self.comments)
        self.comments.clear()
        return out


def _before_comment_lines(text: str, start: int, end: int) -> int:
    """``end`` (a newline) moved back over the ``#`` comment and blank lines just before
    it: in a block they belong to the field that follows, never to CEL (which has no ``#``).

    >>> text = "a\\n  # why\\n\\n  reason = R"
    >>> _before_comment_lines(text, 0, text.index("\\n  reason"))
    1
    """
    while True:
        previous = text.rfind("\n", start, end)
        if previous < 0 or text[previous + 1 : end].strip()[:1] not in ("", "#"):
            return end
        end = previous


def _expression_end(text: str, start: int) -> tuple[int, int | None] | None:
    """Offset of the ``}`` that closes the block holding a ``when`` expression, and of
    the first newline outside brackets, strings and comments that a field follows
    (``reason = X``: CEL has no ``=``), if any.

    >>> _expression_end("a > 1 } b", 0), _expression_end("a >\\n 1\\n  score = 1\\n}", 0)
    ((6, None), (19, 6))
    """
    depth = 0
    i = start
    n = len(text)
    field_at: int | None = None
    while i < n:
        ch = text[i]
        if ch == "\n" and depth == 0 and field_at is None and _FIELD_LINE.match(text, i + 1):
            field_at = i
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0 and ch == "}":
                return i, field_at
            depth = max(depth - 1, 0)  # a stray ")" or "]": CEL's parser names it
        elif ch in "\"'":
            i = _skip_cel_string(text, i, raw=_raw_prefix(text, start, i))
            continue
        elif text.startswith("//", i):
            nl = text.find("\n", i)
            i = n if nl < 0 else nl
            continue
        i += 1
    return None


def _raw_prefix(text: str, start: int, i: int) -> bool:
    """Whether the quote at ``i`` opens a raw string: the word before it is r or br.

    >>> _raw_prefix("x == r'a'", 0, 6), _raw_prefix("x == bR'a'", 0, 7), _raw_prefix("r'a'", 1, 1)
    (True, True, False)
    """
    k = i
    while k > start and text[k - 1].isascii() and (text[k - 1].isalnum() or text[k - 1] == "_"):
        k -= 1
    return text[k:i].lower() in ("r", "br")  # CEL's order: "rb'x'" is no literal


def _skip_cel_string(text: str, i: int, *, raw: bool) -> int:
    r"""Offset just past the CEL string literal starting at ``i`` (quotes only).

    As CEL's grammar: a backslash escapes the next character except in a raw string
    (``r'\'`` is one backslash), and only a triple-quoted string spans lines.

    >>> text = r"r'\' + '\''"
    >>> _skip_cel_string(text, 1, raw=True), _skip_cel_string(text, 7, raw=False)
    (4, 11)
    """
    quote = text[i]
    delim = quote * 3 if text.startswith(quote * 3, i) else quote
    j = i + len(delim)
    while j < len(text):
        if text.startswith(delim, j):
            return j + len(delim)
        if text[j] == "\n" and len(delim) == 1:
            return j  # unclosed: the newline is the expression's again (a field may follow)
        j += 2 if text[j] == "\\" and not raw else 1
    return len(text)


# -------------------------------------------------------------------------- parser


# how deep a list or object value may nest (an order is 3 or 4 deep): each level is a
# frame here and in what reads the value (review: ~500 levels, 1 KB, a RecursionError)
MAX_VALUE_DEPTH = 64


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.s = _Scanner(text, path)
        self.path = path
        self._depth = 0

    # ---- helpers
    def pos_of(self, tok: Token) -> Pos:
        return Pos(self.path, tok.line, tok.col)

    def fail(self, tok: Token, message: str, code: str = SYNTAX_ERROR) -> ParseAbort:
        self.s.diag(code, message, tok.line, tok.col)
        return ParseAbort()

    def expect(self, text: str) -> Token:
        tok = self.s.next()
        if tok.kind != "punct" or tok.text != text:
            raise self.fail(tok, f"expected {text!r}, found {_describe(tok)}")
        return tok

    def leading(self, before_token: bool = True) -> tuple[str, ...]:
        """The pending comment lines, with ``BLANK`` where blank lines separate them.

        With ``before_token``, a blank line between the last comment and the
        next token is kept too (a comment block detached from what follows).
        """
        comments = self.s.take_comments()
        out: list[str] = []
        for i, c in enumerate(comments):
            if i and c.line - comments[i - 1].line > 1:
                out.append(BLANK)
            out.append(c.text)
        if comments and before_token and self.s.peek().line - comments[-1].line > 1:
            out.append(BLANK)
        return tuple(out)

    def trailing(self, line: int) -> str:
        """A comment on ``line`` after the last token: it belongs to what ended there."""
        self.s.peek()  # scans up to the next token, collecting the comments before it
        pending = self.s.comments
        if pending and not pending[0].own_line and pending[0].line == line:
            return pending.pop(0).text
        return ""

    # ---- file
    def parse_file(self) -> RuleFile:
        items: list[Item] = []
        while True:
            self.s.peek()
            if self.s.peek().kind == "eof":
                break
            try:
                items.append(self.parse_item())
            except ParseAbort:
                self.recover()
        end = self.leading(before_token=False)
        return RuleFile(tuple(items), end, self.path, self.s.text)

    def recover(self) -> None:
        """Skip to the next keyword at the start of a line, so later items are still checked."""
        while True:
            tok = self.s.peek()
            # Items start at column 1: resume at the next name there (a keyword or
            # a misspelt one, which then gets its own diagnostic).
            if tok.kind == "eof" or (tok.kind == "ident" and tok.col == 1):
                self.s.comments.clear()
                return
            self.s.next()

    def parse_item(self) -> Item:
        comments = self.leading()
        kw = self.s.next()
        if kw.kind != "ident" or kw.text not in KEYWORDS:
            raise self.fail(kw, f"expected one of {', '.join(KEYWORDS)}, found {_describe(kw)}")
        name = self.parse_item_name(kw.text)
        if kw.text in BLOCK_KEYWORDS:
            self.expect("{")
            fields, end_comments = self.parse_block(kw.text)
            close = self.s.next()  # the "}" checked by parse_block
            trailing = self.trailing(close.line)
            return Item(
                kw.text, name, None, fields, comments, trailing, end_comments, self.pos_of(kw)
            )
        self.expect("=")
        value = self.parse_value()
        trailing = self.trailing(self.s._last_line)
        return Item(kw.text, name, value, (), comments, trailing, (), self.pos_of(kw))

    def parse_item_name(self, keyword: str) -> Scalar | Name:
        tok = self.s.next()
        if tok.kind == "ident":
            return Name(tok.text, self.pos_of(tok))
        if tok.kind == "string" and keyword == "test":
            return Scalar(self.decode_string(tok), "string", self.pos_of(tok))
        what = "a name or a string" if keyword == "test" else "a name"
        raise self.fail(tok, f"expected {what} after {keyword!r}, found {_describe(tok)}")

    def parse_block(self, keyword: str) -> tuple[tuple[Field, ...], tuple[str, ...]]:
        fields: list[Field] = []
        while True:
            tok = self.s.peek()
            if tok.kind == "punct" and tok.text == "}":
                return tuple(fields), self.leading(before_token=False)
            if tok.kind == "eof" or _starts_item(tok):
                msg = f"{keyword} block is not closed with '}}'"
                self.s.diag(UNTERMINATED, msg, tok.line, tok.col)
                raise ParseAbort()
            fields.append(self.parse_field())

    def parse_field(self) -> Field:
        comments = self.leading()
        tok = self.s.next()
        if tok.kind != "ident":
            raise self.fail(tok, f"expected a field name, found {_describe(tok)}")
        self.expect("=")
        if tok.text == WHEN:
            return self.parse_when(tok, comments)
        value = self.parse_value()
        trailing = self.trailing(self.s._last_line)
        return Field(tok.text, value, comments, trailing, self.pos_of(tok))

    def parse_when(self, tok: Token, comments: tuple[str, ...]) -> Field:
        self.s.take_comments()  # none can be pending: "=" was the last token
        raw = self.s.raw_expression()
        if raw is None:
            raise ParseAbort()
        text, _, line, col = raw
        raw_text = text.rstrip()
        lines = tuple(ln.strip() for ln in raw_text.split("\n") if ln.strip())
        if not lines:
            raise self.fail(self.s.peek(), "'when' needs an expression")
        when = When(lines, raw_text, Pos(self.path, line, col))
        return Field(WHEN, when, comments, "", self.pos_of(tok))

    # ---- values
    def parse_value(self) -> Value:
        if self.s.comments:
            c = self.s.comments[0]
            self.s.diag(MISPLACED_COMMENT, "a comment cannot go inside a value", c.line, c.col)
            self.s.comments.clear()
        tok = self.s.next()
        pos = self.pos_of(tok)
        if tok.kind == "string":
            return Scalar(self.decode_string(tok), "string", pos)
        if tok.kind == "number":
            return self.decode_number(tok)
        if tok.kind == "ident":
            return _ident_value(tok.text, pos)
        if tok.kind == "punct" and tok.text in ("[", "{"):
            if self._depth >= MAX_VALUE_DEPTH:
                raise self.fail(tok, f"a value nested deeper than {MAX_VALUE_DEPTH} levels")
            self._depth += 1
            try:
                if tok.text == "[":
                    return Array(tuple(self.parse_sequence("]", self.parse_value)), pos)
                return Object(tuple(self.parse_sequence("}", self.parse_entry)), pos)
            finally:
                self._depth -= 1
        raise self.fail(tok, f"expected a value, found {_describe(tok)}")

    def parse_entry(self) -> Entry:
        tok = self.s.next()
        if tok.kind == "ident":
            key = tok.text
        elif tok.kind == "string":
            key = self.decode_string(tok)
        else:
            raise self.fail(tok, f"expected a key, found {_describe(tok)}")
        self.expect(":")
        return Entry(key, self.parse_value(), self.pos_of(tok))

    def parse_sequence(self, close: str, element: Callable[[], _T]) -> list[_T]:
        out: list[_T] = []
        while True:
            tok = self.s.peek()
            if tok.kind == "punct" and tok.text == close:
                self.s.next()
                self._no_comments_inside()
                return out
            out.append(element())
            sep = self.s.next()
            if sep.kind == "punct" and sep.text == close:
                self._no_comments_inside()
                return out
            if sep.kind != "punct" or sep.text != ",":
                raise self.fail(sep, f"expected ',' or {close!r}, found {_describe(sep)}")

    def _no_comments_inside(self) -> None:
        for c in self.s.comments:
            self.s.diag(MISPLACED_COMMENT, "a comment cannot go inside a value", c.line, c.col)
        self.s.comments.clear()

    def decode_string(self, tok: Token) -> str:
        if len(tok.text) < 2 or not tok.text.endswith('"'):
            raise ParseAbort()  # unterminated: the scanner has reported it
        body = tok.text[1:-1]
        if "\\" not in body and body.isprintable():
            return body  # the common case: no escapes to decode
        try:
            value = json.loads(tok.text)
        except ValueError:
            value = None
        if not isinstance(value, str):
            raise self.fail(tok, "malformed string literal", BAD_STRING)
        if _LONE_SURROGATE.search(value):  # not text: no UTF-8 file, log or reply can hold it
            raise self.fail(tok, "a \\u escape of half a surrogate pair is not text", BAD_STRING)
        return value

    def decode_number(self, tok: Token) -> Scalar:
        pos = self.pos_of(tok)
        try:
            if re.fullmatch(r"-?[0-9]+", tok.text):
                return Scalar(int(tok.text), "int", pos)
            value = float(tok.text)
        except ValueError:
            raise self.fail(tok, "malformed number", BAD_NUMBER) from None
        if value in (float("inf"), float("-inf")):
            raise self.fail(tok, "number out of range", BAD_NUMBER)
        return Scalar(value, "float", pos)


def _starts_item(tok: Token) -> bool:
    return tok.kind == "ident" and tok.col == 1 and tok.text in KEYWORDS


def _ident_value(text: str, pos: Pos) -> Scalar | Name:
    if text == "true":
        return Scalar(True, "bool", pos)
    if text == "false":
        return Scalar(False, "bool", pos)
    if text == "null":
        return Scalar(None, "null", pos)
    return Name(text, pos)


def _describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "end of file"
    text = tok.text if len(tok.text) <= 20 else tok.text[:17] + "..."
    return repr(text)


def parse(text: str, path: str = "<rules>") -> tuple[RuleFile, Diagnostics]:
    """Parse one rule file's text into its syntax tree, reporting every syntax error.

    Never raises on bad input: items with errors are left out of the tree and
    each problem becomes a diagnostic with file, line, column and caret.

    >>> tree, diags = parse('scenario new_account = "Accounts under 7 days"')
    >>> diags.ok, tree.items[0].label
    (True, 'new_account')
    """
    parser = _Parser(text, path)
    tree = parser.parse_file()
    return tree, Diagnostics(tuple(parser.s.diags))


def is_identifier(text: str) -> bool:
    """True when ``text`` can be written bare (a name, not a keyword value)."""
    return _IDENT_RE.fullmatch(text) is not None and text not in ("true", "false", "null")


class Reporter:
    """Collects diagnostics at syntax-tree positions, with the file's source line for the caret."""

    def __init__(self, sources: Mapping[str, str]) -> None:
        self._sources = dict(sources)
        self._lines = {path: text.split("\n") for path, text in sources.items()}
        self.items: list[Diagnostic] = []

    def source(self, path: str) -> str | None:
        """The whole text of a file, for carets under expression errors."""
        return self._sources.get(path)

    def report(self, code: str, message: str, pos: Pos) -> None:
        lines = self._lines.get(pos.file, [])
        src = lines[pos.line - 1] if 0 < pos.line <= len(lines) else ""
        src = src.removesuffix("\r")  # a file saved with CRLF line ends
        self.items.append(Diagnostic(code, message, pos.file, pos.line, pos.col, src))

    def extend(self, diags: Iterable[Diagnostic]) -> None:
        self.items.extend(diags)

    def diagnostics(self, order: Sequence[str] = ()) -> Diagnostics:
        """Every diagnostic, sorted by file (in ``order``), line and column."""
        rank = {path: i for i, path in enumerate(order)}
        key = lambda d: (rank.get(d.file, len(rank)), d.file, d.line, d.col)  # noqa: E731
        return Diagnostics(tuple(sorted(self.items, key=key)))
