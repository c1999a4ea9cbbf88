"""Regular expressions for ``matches``, on RE2 (linear time: no pattern can hang the scorer).

Literal patterns are compiled once, at compile time, so a bad pattern is a
diagnostic; dynamic patterns are compiled at run time under a size bound and
cached.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import re2

from riskd.dsl.values import EvalError

MAX_PATTERN_LENGTH = 1_000
MAX_PROGRAM_SIZE = 5_000
# Dynamic patterns kept compiled (~2 KiB each; a compile is ~30 µs). A rule that scans a
# named list of patterns (``pats.exists(p, s.matches(p))``) cycles through all of them
# each order: with fewer places than patterns an LRU keeps none it will need next, and
# the rule compiled every pattern every order (300 patterns in 256 places: 16× slower).
PATTERN_CACHE = 4_096


class RegexError(Exception):
    """A pattern RE2 rejects, or one over the size bound."""


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """Compile ``pattern``; returns a predicate ``text -> bool`` (unanchored search)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise RegexError(f"pattern is longer than {MAX_PATTERN_LENGTH} characters")
    if _has_any_byte(pattern):
        raise RegexError(r"invalid escape sequence: \C (cel-go's RE2 has no any-byte class)")
    options = re2.Options()
    options.max_mem = 8 << 20
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options)
    except re2.error as exc:
        raise RegexError(_message(exc)) from exc
    if compiled.programsize > MAX_PROGRAM_SIZE:
        raise RegexError("pattern is too complex")
    search = compiled.search

    def matches(text: str) -> bool:
        try:
            return search(text) is not None
        except UnicodeEncodeError:  # a lone surrogate (a test's JSON string): not text RE2 reads
            raise EvalError("string is not valid Unicode") from None

    return matches


@functools.lru_cache(maxsize=PATTERN_CACHE)
def _cached(pattern: str) -> Callable[[str], bool]:
    return compile_pattern(pattern)


def search_dynamic(pattern: str, text: str) -> bool:
    """``text.matches(pattern)`` for a pattern known only at run time."""
    try:
        return _cached(pattern)(text)
    except (RegexError, UnicodeEncodeError):  # a lone surrogate: no pattern RE2 can read
        # RE2's message quotes the pattern, which here is data (maybe PII): never echo it.
        raise EvalError("invalid regular expression (computed at run time)") from None


def _message(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else ""
    text = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
    return text or "invalid regular expression"


def _has_any_byte(pattern: str) -> bool:
    r"""Whether ``pattern`` uses ``\C`` (one byte): C++ RE2 has it, cel-go's Go RE2 refuses
    it, and it matches part of a character (``"é".matches("^\\C")``).

    >>> _has_any_byte(r"a\Cb"), _has_any_byte(r"a\\Cb"), _has_any_byte(r"[\C]")
    (True, False, True)
    """
    i = pattern.find("\\")
    while 0 <= i < len(pattern) - 1:
        if pattern[i + 1] == "C":
            return True
        i = pattern.find("\\", i + 2)
    return False
