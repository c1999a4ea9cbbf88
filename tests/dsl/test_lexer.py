"""Lexer: literal forms, escapes, positions, and errors that never raise."""

from __future__ import annotations

import pytest

from riskd.dsl.diagnostics import Source
from riskd.dsl.lexer import Tok, tokenize
from riskd.dsl.values import UInt


def _values(text: str) -> list[object]:
    tokens, diags = tokenize(Source(text))
    assert not diags, diags
    return [t.value if t.value is not None else t.text for t in tokens[:-1]]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("0x1F", 31),
        ("7u", UInt(7)),
        ("0x10U", UInt(16)),
        ("2.5", 2.5),
        ("1e3", 1000.0),
        (".5", 0.5),
        ("1.7976931348623157e308", 1.7976931348623157e308),  # the largest double
        ("1e-400", 0.0),  # underflow is zero, as Go's ParseFloat has it
        ("'a\\tb'", "a\tb"),
        ('"\\u00e9\\U0001F431"', "é🐱"),
        ("'\\101\\x42'", "AB"),
        ("r'\\n'", "\\n"),
        ("br'\\n'", b"\\n"),
        ("Br'\\n'", b"\\n"),
        ("'''a\nb'''", "a\nb"),
        ("b'\\xff\\000'", b"\xff\x00"),
        ("b'é'", "é".encode()),
        ("`content-type`", "content-type"),
        ("`a b/c.d`", "a b/c.d"),  # CEL's quoted names: letters, digits and _ . - / and blank
        ("r'\\'", "\\"),  # a raw string's backslash escapes nothing, its quote included
        ('R"a\\"', "a\\"),
        ("br'\\'", b"\\"),
        ("r'''\\'''", "\\"),
    ],
)
def test_lexer_reads_literal(text: str, value: object) -> None:
    assert _values(text) == [value]
    assert type(_values(text)[0]) is type(value)


def test_lexer_a_raw_string_ends_at_its_first_quote_as_in_cel() -> None:
    # cel-go reads r'a\' + 'b' as "a\\" + "b"; when \' escaped a raw string's quote, the
    # first string ran on into the second
    assert _values(r"r'a\' + 'b'") == ["a\\", "+", "b"]
    _, diags = tokenize(Source(r"r'\''"))
    assert [d.message for d in diags] == ["unterminated string literal"]


def test_lexer_skips_comments_and_whitespace() -> None:
    assert _values("a // note\n\f && b") == ["a", "&&", "b"]


def test_lexer_tokens_carry_offsets() -> None:
    tokens, _ = tokenize(Source("ab >= 1"))
    assert [(t.kind, t.offset) for t in tokens] == [
        (Tok.IDENT, 0), (Tok.PUNCT, 3), (Tok.INT, 6), (Tok.EOF, 7),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("'abc", "unterminated string literal"),
        ("'a\nb'", "newline in string literal"),
        ("'\\q'", "invalid escape sequence"),
        ("'\\ud800'", "invalid unicode code point in escape"),
        ("'\\udfff'", "invalid unicode code point in escape"),
        ("'\\U00110000'", "invalid unicode code point in escape"),
        ("'\\400'", "invalid escape sequence"),  # an octal escape is at most \377
        ("b'\\u0041'", "invalid escape sequence"),
        ("18446744073709551616u", "unsigned integer literal out of range"),
        ("99999999999999999999", "integer literal out of range"),
        ("1" * 5000, "integer literal out of range"),  # review: Python's 4,300-digit limit
        ("1" * 5000 + "u", "unsigned integer literal out of range"),
        ("0x", "malformed hexadecimal literal"),
        ("1e400", "double literal out of range"),  # not +inf: as double("1e400"), an error
        ("x < -1.8e308", "double literal out of range"),
        ("a # b", "unexpected character '#'"),
        ("`a~b`", "malformed quoted identifier"),
        ("``", "malformed quoted identifier"),
        ("`a", "malformed quoted identifier"),
        (".²", "unexpected character '²'"),  # a Unicode digit is no digit of a number
        ("1.²", "unexpected character '²'"),
        ("1e٣", "unexpected character '٣'"),
        ("'a\rb'", "newline in string literal"),  # CEL: a one-line string holds no CR
        ("r'a\rb'", "newline in string literal"),
    ],
)
def test_lexer_reports_malformed_input(text: str, message: str) -> None:
    _, diags = tokenize(Source(text))
    assert diags and diags[0].message == message


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("0X1F", [0, "X1F"]),  # CEL's hex prefix is "0x" only
        ("rb'a'", ["rb", "a"]),  # CEL's prefixes are [bB][rR]?: "rb" is a name
        ("Rb'a'", ["Rb", "a"]),
    ],
)
def test_lexer_reads_only_cels_literal_prefixes(text: str, values: list[object]) -> None:
    # a form cel-go splits into two tokens must not be one literal here: it is then a
    # syntax error, in riskd as in every other CEL implementation
    assert _values(text) == values
