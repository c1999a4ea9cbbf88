"""Compile-time diagnostics: a stable code, a place, the source line and a caret.

Every phase (lexer, parser, checker) returns diagnostics instead of raising;
only the facades raise (``riskd.errors.RuleCompileError``). ``str()`` of a
diagnostic is the block analysts see::

    rules/velocity.rules:12:9: riskd_type_error: cannot compare int with string
      |   when order.amounts.total > "500"
      |        ^
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

SYNTAX_ERROR = "riskd_syntax_error"
LIMIT_EXCEEDED = "riskd_limit_exceeded"
TYPE_ERROR = "riskd_type_error"
UNKNOWN_FIELD = "riskd_unknown_field"
UNDECLARED = "riskd_undeclared_reference"
UNKNOWN_FUNCTION = "riskd_unknown_function"
BAD_ARGUMENT = "riskd_bad_argument"
BAD_REGEX = "riskd_bad_regex"


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One problem found at compile time."""

    code: str
    message: str
    file: str
    line: int
    col: int
    source_line: str = ""

    def __str__(self) -> str:
        head = f"{self.file}:{self.line}:{self.col}: {self.code}: {self.message}"
        if not self.source_line:
            return head
        pad = "".join(map(_blank, self.source_line[: self.col - 1]))
        return f"{head}\n  | {self.source_line}\n  | {pad}^"


def _blank(ch: str) -> str:
    r"""What goes under ``ch`` so that the caret lines up in a terminal: a tab stays a
    tab, a wide character (CJK, emoji) takes two columns, a combining mark none.

    >>> [_blank(c) for c in "\ta直\U0001F600\u0301"]
    ['\t', ' ', '  ', '  ', '']
    """
    if ch == "\t":
        return ch
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Me", "Cf"):
        return ""
    return "  " if unicodedata.east_asian_width(ch) in ("W", "F") else " "


@dataclass(frozen=True, slots=True)
class Diagnostics(Sequence[Diagnostic]):
    """An immutable list of diagnostics; ``ok`` when empty."""

    items: tuple[Diagnostic, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.items

    def __len__(self) -> int:
        return len(self.items)

    @overload
    def __getitem__(self, index: int) -> Diagnostic: ...

    @overload
    def __getitem__(self, index: slice) -> Diagnostics: ...

    def __getitem__(self, index: int | slice) -> Diagnostic | Diagnostics:
        if isinstance(index, slice):
            return Diagnostics(self.items[index])
        return self.items[index]

    def __iter__(self) -> Iterator[Diagnostic]:
        return iter(self.items)

    def __add__(self, other: Iterable[Diagnostic]) -> Diagnostics:
        return Diagnostics(self.items + tuple(other))

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.items)


@dataclass(slots=True)
class Source:
    """Maps offsets in an expression's text to file positions and source lines.

    ``line``/``col`` are where the expression's first character sits in the
    enclosing file. ``file_text``, when given, supplies the file's real lines
    for carets; otherwise the expression's own lines are shown (the first one
    indented so that the caret column still matches the file).
    """

    text: str
    file: str = "<expr>"
    line: int = 1
    col: int = 1
    file_text: str | None = None
    _starts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._starts = [0]
        for i, ch in enumerate(self.text):
            if ch == "\n":
                self._starts.append(i + 1)

    def position(self, offset: int) -> tuple[int, int]:
        """File (line, col), 1-based, of an offset into the expression text."""
        offset = max(0, min(offset, len(self.text)))
        lo, hi = 0, len(self._starts) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._starts[mid] <= offset:
                lo = mid
            else:
                hi = mid - 1
        col = offset - self._starts[lo] + 1
        if lo == 0:
            return self.line, self.col + col - 1
        return self.line + lo, col

    def source_line(self, file_line: int) -> str:
        if self.file_text is not None:
            # lines as they are numbered: at "\n" alone (review: splitlines also breaks at
            # U+2028, form feed or U+0085, and the line quoted was an earlier one)
            lines = self.file_text.split("\n")
            return lines[file_line - 1].removesuffix("\r") if 0 < file_line <= len(lines) else ""
        idx = file_line - self.line
        lines = self.text.split("\n")
        if not 0 <= idx < len(lines):
            return ""
        if idx == 0:
            return " " * (self.col - 1) + lines[0]
        return lines[idx]

    def diagnostic(self, code: str, message: str, offset: int) -> Diagnostic:
        line, col = self.position(offset)
        return Diagnostic(code, message, self.file, line, col, self.source_line(line))
