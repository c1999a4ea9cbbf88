"""Parser: precedence, macros, has(), positions and syntax diagnostics."""

from __future__ import annotations

import pytest

from riskd.dsl.expr import parse_expr, unparse
from riskd.dsl.nodes import Call, Comprehension, Expr, Ident, ListLit, Literal, MapLit, Select


def _parse(text: str) -> Expr:
    expr, diags = parse_expr(text)
    assert diags.ok, str(diags)
    assert expr is not None
    return expr


def test_parser_binds_by_cel_precedence() -> None:
    e = _parse("a || b && c == d + e * f")
    assert unparse(e) == "a || b && c == d + e * f"
    assert isinstance(e, Call) and e.function == "_||_"
    assert unparse(_parse("(a || b) && c")) == "(a || b) && c"
    assert unparse(_parse("a - (b - c)")) == "a - (b - c)"
    assert unparse(_parse("(a - b) - c")) == "a - b - c"
    assert unparse(_parse("(a in b) + c")) == "(a in b) + c"


def test_parser_ternary_is_right_associative() -> None:
    e = _parse("a ? b : c ? d : e")
    assert isinstance(e, Call) and e.function == "_?_:_"
    assert isinstance(e.args[2], Call) and e.args[2].function == "_?_:_"
    assert unparse(e) == "a ? b : c ? d : e"


def test_parser_folds_negative_literals() -> None:
    assert _parse("-9223372036854775808") == Literal(-(2**63))
    assert _parse("-(5)") == Call("-_", (Literal(5),))
    assert _parse("--5") == Call("-_", (Literal(-5),))


def test_parser_repeats_one_unary_operator_only_as_cel_does() -> None:
    # CEL's grammar: ('!')+ member | ('-')+ member; "!-x" and "-!x" need parentheses
    for text, col, message in (
        ("!-x", 2, "unexpected '-' after '!' (put it in parentheses: !(-x))"),
        ("-!x", 2, "unexpected '!' after '-' (put it in parentheses: -(!x))"),
        ("a && !!-1 == 1", 8, "unexpected '-' after '!' (put it in parentheses: !(-x))"),
    ):
        expr, diags = parse_expr(text)
        assert expr is None
        assert [(d.code, d.col, d.message) for d in diags] == [
            ("riskd_syntax_error", col, message)
        ], text
    for text in ("!!x", "--x", "!(-x)", "-(!x)", "!(-1)", "--(!x)"):
        e = _parse(text)
        assert unparse(e) == text and _parse(unparse(e)) == e
    assert unparse(Call("!_", (Literal(-1),))) == "!(-1)"
    assert unparse(Call("-_", (Call("!_", (Ident("x"),)),))) == "-(!x)"


def test_unparse_keeps_a_negation_apart_from_what_follows_it() -> None:
    # a negated number is no literal (-5 would be one): under a member it keeps its
    # parentheses
    for e in (
        Select(Call("-_", (Literal(5),)), "f"),
        Call("_[_]", (Call("-_", (Literal(1.5),)), Literal(0))),
    ):
        assert _parse(unparse(e)) == e, unparse(e)


def test_unparse_escapes_control_characters_in_strings() -> None:
    assert unparse(Literal("a\rb\x7fc\td")) == '"a\\rb\\x7fc\\td"'


def test_parser_expands_macros() -> None:
    e = _parse("order.items.exists(i, i.category in cats)")
    assert isinstance(e, Comprehension) and e.kind == "exists" and e.var == "i"
    m = _parse("xs.map(x, x > 1, x * 2)")
    assert isinstance(m, Comprehension) and m.predicate is not None and m.transform is not None
    assert _parse("has(a.b)") == Select(Ident("a"), "b", test_only=True)


def test_parser_builds_literals_and_calls() -> None:
    assert _parse("[1, 'a',]") == ListLit((Literal(1), Literal("a")))
    assert _parse("{'k': 1}") == MapLit(((Literal("k"), Literal(1)),))
    assert _parse("s.startsWith('a')") == Call("startsWith", (Literal("a"),), Ident("s"))
    assert _parse("m[1]") == Call("_[_]", (Ident("m"), Literal(1)))
    assert _parse("{'a': 1}.`a`") == Select(MapLit(((Literal("a"), Literal(1)),)), "a")


def test_parser_positions_point_into_the_file() -> None:
    e = _parse("a +\n  b")
    assert isinstance(e, Call)
    assert e.pos.file_position() == ("<expr>", 1, 3)
    assert e.args[1].pos.file_position() == ("<expr>", 2, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a +", "unexpected end of input"),
        ("(a", "expected ')', found end of input"),
        ("a b", "unexpected 'b'"),
        ("if", "'if' is a reserved word"),
        ("has(a)", "has() takes one field selection, e.g. has(a.b)"),
        ("l.all(1, true)", "the first argument of all() must be a simple name"),
        ("l.exists(x)", "exists() takes 2 arguments"),
        ("a.1", "unexpected '.1'"),
        ("{1: 2", "expected '}', found end of input"),
        # CEL's keywords are never names: cel-go refuses these, so riskd must too
        ("m.true", "'true' is a keyword, not a field name (a map key is selected `true`)"),
        ("m.null", "'null' is a keyword, not a field name (a map key is selected `null`)"),
        ("m.in(x)", "'in' is a keyword, not a field name (a map key is selected `in`)"),
        (".false", "expected a name after '.'"),
        (".null", "expected a name after '.'"),
    ],
)
def test_parser_reports_syntax_errors(text: str, message: str) -> None:
    expr, diags = parse_expr(text)
    assert expr is None
    assert diags[0].code == "riskd_syntax_error"
    assert diags[0].message == message


def test_parser_limits_length() -> None:
    expr, diags = parse_expr("1 + " * 6000 + "1")
    assert expr is None and diags[0].code == "riskd_limit_exceeded"


def test_parser_reports_several_syntax_errors() -> None:
    _, diags = parse_expr("a > && b == ")
    assert [(d.col, d.message) for d in diags] == [
        (5, "unexpected '&&'"),
        (13, "unexpected end of input"),
    ]
    _, diags = parse_expr("f(1 +, 2 *, 3)")
    assert [d.col for d in diags] == [6, 11]


def test_parser_frame_budget_holds_for_nested_operator_chains() -> None:
    text = "a || b && c == d + e * (" * 60 + "1" + ")" * 60
    expr, diags = parse_expr(text)
    assert expr is None and diags[0].code == "riskd_limit_exceeded"


def test_parser_keyword_field_error_names_its_column() -> None:
    _, diags = parse_expr("m.a ||\n  m.null")
    assert [(d.line, d.col, d.code) for d in diags] == [(2, 5, "riskd_syntax_error")]


def test_parser_selects_reserved_and_quoted_keyword_names() -> None:
    # CEL reserves 'if' etc. only as identifiers; a field may carry the name, and a
    # keyword key is reachable back-quoted
    assert _parse("m.if") == Select(Ident("m"), "if")
    assert _parse("m.`in`") == Select(Ident("m"), "in")
    assert unparse(_parse("m.`in` && has(m.`null`)")) == "m.`in` && has(m.`null`)"
