"""Tokens of the expression language (CEL's lexical grammar).

The lexer never raises: bad characters and malformed literals become
diagnostics, and lexing continues so that every error is reported.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

from riskd.dsl.diagnostics import SYNTAX_ERROR, Diagnostic, Source
from riskd.dsl.values import INT_MAX, UINT_MAX, UInt


class Tok(enum.Enum):
    INT = "int"
    UINT = "uint"
    DOUBLE = "double"
    STRING = "string"
    BYTES = "bytes"
    IDENT = "identifier"
    QUOTED = "quoted identifier"
    PUNCT = "operator"
    EOF = "end of input"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Tok
    text: str
    offset: int
    value: object = None


RESERVED = frozenset(
    [
        "as",
        "break",
        "const",
        "continue",
        "else",
        "for",
        "function",
        "if",
        "import",
        "let",
        "loop",
        "package",
        "namespace",
        "return",
        "var",
        "void",
        "while",
    ]
)
# CEL's KEYWORD: literal and operator words, never a name (``m.null``, ``.true``); a map
# key that is one is selected back-quoted (``m.`in` ``)
KEYWORDS = frozenset(("true", "false", "null", "in"))
_PUNCT2 = frozenset(("==", "!=", "<=", ">=", "&&", "||"))
_SPACE = re.compile(r"(?:[ \t\n\r\f]+|//[^\n]*)+")
_WORD = re.compile(r"[A-Za-z0-9_]+")
_PUNCT1 = "()[]{}.,:?!-+*/%<>"
_SIMPLE_ESC = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", "?": "?", '"': '"', "'": "'", "`": "`",
}  # fmt: skip
_HEX = "0123456789abcdefABCDEF"


def _ascii_digit(ch: str) -> bool:
    """0-9 only: ``str.isdigit`` also accepts e.g. "²", which ``float()`` rejects."""
    return ch.isascii() and ch.isdigit()


class LexError(Exception):
    """Internal: a malformed token at ``offset``."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def tokenize(src: Source) -> tuple[list[Token], list[Diagnostic]]:
    """Split ``src.text`` into tokens; the last one is always EOF."""
    lexer = _Lexer(src.text)
    tokens: list[Token] = []
    diags: list[Diagnostic] = []
    while True:
        try:
            tok = lexer.next()
        except LexError as err:
            diags.append(src.diagnostic(SYNTAX_ERROR, str(err), err.offset))
            continue
        tokens.append(tok)
        if tok.kind is Tok.EOF:
            return tokens, diags


class _Lexer:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0

    def _skip_space(self) -> None:
        m = _SPACE.match(self.text, self.i)
        if m is not None:
            self.i = m.end()

    def next(self) -> Token:
        self._skip_space()
        t, start = self.text, self.i
        if start >= len(t):
            return Token(Tok.EOF, "", start)
        ch = t[start]
        if _ascii_digit(ch) or (ch == "." and _ascii_digit(t[start + 1 : start + 2])):
            return self._number()
        if ch in "\"'":
            return self._string(start, raw=False, is_bytes=False)
        if ch == "`":
            return self._quoted_ident()
        if ch.isascii() and (ch.isalpha() or ch == "_"):
            return self._ident_or_prefixed()
        pair = t[start : start + 2]
        if pair in _PUNCT2:
            self.i += 2
            return Token(Tok.PUNCT, pair, start)
        if ch in _PUNCT1:
            self.i += 1
            return Token(Tok.PUNCT, ch, start)
        self.i += 1
        raise LexError(f"unexpected character {ch!r}", start)

    def _ident_or_prefixed(self) -> Token:
        t, start = self.text, self.i
        m = _WORD.match(t, start)
        assert m is not None
        j = m.end()
        word = t[start:j]
        # CEL's prefixes: [bB]? then [rR]? ("br'x'", never "rb'x'", which is a name and a string)
        if j < len(t) and t[j] in "\"'" and word.lower() in ("r", "b", "br"):
            low = word.lower()
            self.i = j
            return self._string(start, raw="r" in low, is_bytes="b" in low)
        self.i = j
        return Token(Tok.IDENT, word, start)

    def _quoted_ident(self) -> Token:
        t, start = self.text, self.i
        end = t.find("`", start + 1)
        name = t[start + 1 : end] if end > 0 else ""
        if (
            end < 0
            or not name
            or any(not (c.isascii() and (c.isalnum() or c in "_.-/ ")) for c in name)
        ):
            self.i = len(t) if end < 0 else end + 1
            raise LexError("malformed quoted identifier", start)
        self.i = end + 1
        return Token(Tok.QUOTED, t[start : end + 1], start, name)

    def _number(self) -> Token:
        t, start = self.text, self.i
        if t.startswith("0x", start):  # CEL's hex prefix is lower case: 0X1F is 0 then X1F
            j = start + 2
            while j < len(t) and t[j] in _HEX:
                j += 1
            if j == start + 2:
                self.i = j
                raise LexError("malformed hexadecimal literal", start)
            return self._int_suffix(start, j, int(t[start + 2 : j], 16))
        j = start
        while j < len(t) and t[j].isascii() and t[j].isdigit():
            j += 1
        is_float = False
        if j < len(t) and t[j] == "." and _ascii_digit(t[j + 1 : j + 2]):
            is_float = True
            j += 1
            while j < len(t) and t[j].isascii() and t[j].isdigit():
                j += 1
        if j < len(t) and t[j] in "eE":
            k = j + 1
            if k < len(t) and t[k] in "+-":
                k += 1
            if k < len(t) and t[k].isascii() and t[k].isdigit():
                is_float = True
                j = k
                while j < len(t) and t[j].isascii() and t[j].isdigit():
                    j += 1
        if is_float:
            self.i = j
            value = float(t[start:j])
            if math.isinf(value):  # cel-go's parser refuses it too; 1e-400 is 0.0, as in Go
                raise LexError("double literal out of range", start)
            return Token(Tok.DOUBLE, t[start:j], start, value)
        # past 20 significant digits it is out of range whatever it is: never parsed (review:
        # 4,301 digits ended `riskd rules check` in Python's int-conversion limit)
        digits = t[start:j].lstrip("0")
        value = int(digits or "0") if len(digits) <= 20 else UINT_MAX + INT_MAX
        return self._int_suffix(start, j, value)

    def _int_suffix(self, start: int, j: int, value: int) -> Token:
        t = self.text
        if j < len(t) and t[j] in "uU":
            self.i = j + 1
            if value > UINT_MAX:
                raise LexError("unsigned integer literal out of range", start)
            return Token(Tok.UINT, t[start : j + 1], start, UInt(value))
        self.i = j
        if value > INT_MAX + 1:  # INT_MAX + 1 is allowed only after a unary minus
            raise LexError("integer literal out of range", start)
        return Token(Tok.INT, t[start:j], start, value)

    def _string(self, start: int, *, raw: bool, is_bytes: bool) -> Token:
        t = self.text
        q = t[self.i]
        triple = t.startswith(q * 3, self.i)
        delim = q * 3 if triple else q
        self.i += len(delim)
        out: list[str] = []
        bad: LexError | None = None
        while True:
            if self.i >= len(t):
                raise LexError("unterminated string literal", start)
            if t.startswith(delim, self.i):
                self.i += len(delim)
                if bad is not None:
                    raise bad
                break
            ch = t[self.i]
            if ch in "\n\r" and not triple:  # CEL: a one-line string holds no CR either
                self.i += 1
                raise LexError("newline in string literal", start)
            if ch == "\\" and not raw:
                try:
                    out.append(self._escape(is_bytes))
                except LexError as err:  # keep lexing to the closing quote
                    bad = bad or err
            else:
                out.append(ch)
                self.i += 1
        text = "".join(out)
        if is_bytes:
            return Token(Tok.BYTES, t[start : self.i], start, _to_bytes(out))
        return Token(Tok.STRING, t[start : self.i], start, text)

    def _escape(self, is_bytes: bool) -> str:
        t, at = self.text, self.i
        c = t[at + 1 : at + 2]
        if c in _SIMPLE_ESC:
            self.i += 2
            return _SIMPLE_ESC[c]
        if c in ("x", "X"):
            return self._hex_escape(at, 2, is_bytes)
        if c in ("u", "U") and not is_bytes:
            return self._hex_escape(at, 4 if c == "u" else 8, False)
        if (
            c in "0123"
            and c
            and len(t) >= at + 4
            and all(d in "01234567" for d in t[at + 1 : at + 4])
        ):
            self.i += 4
            code = int(t[at + 1 : at + 4], 8)
            return _BYTE_MARK + chr(code) if is_bytes else chr(code)
        self.i += 2
        raise LexError("invalid escape sequence", at)

    def _hex_escape(self, at: int, n: int, is_bytes: bool) -> str:
        digits = ""
        while len(digits) < n and self.text[at + 2 + len(digits) : at + 3 + len(digits)] in _HEX:
            if at + 2 + len(digits) >= len(self.text):
                break
            digits += self.text[at + 2 + len(digits)]
        self.i = at + 2 + len(digits)
        if len(digits) != n:
            raise LexError("invalid escape sequence", at)
        code = int(digits, 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise LexError("invalid unicode code point in escape", at)
        return _BYTE_MARK + chr(code) if is_bytes else chr(code)


# Inside bytes literals an escaped byte is kept as a marker pair so that it is
# emitted as one raw byte, while other characters are UTF-8 encoded.
_BYTE_MARK = "\x00\x00"


def _to_bytes(parts: list[str]) -> bytes:
    out = bytearray()
    for p in parts:
        if p.startswith(_BYTE_MARK) and len(p) == 3:
            out.append(ord(p[2]))
        else:
            out.extend(p.encode("utf-8", "surrogatepass"))
    return bytes(out)
