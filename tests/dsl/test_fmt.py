"""The canonical formatter: format then parse is the identity; formatting is idempotent."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from riskd.dsl.fmt import format_file, format_text
from riskd.dsl.rulefile import (
    BLANK,
    Array,
    Entry,
    Field,
    Item,
    Name,
    Object,
    RuleFile,
    Scalar,
    Value,
    When,
    parse,
)

_names = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True).filter(
    lambda s: s not in ("true", "false", "null")
)
_text = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029\x85"),
    max_size=20,
)
_comment_lines = st.lists(st.one_of(_text.map(str.strip), st.just(BLANK)), max_size=4)


def _valid_comments(lines: list[str], *, blank_last: bool) -> bool:
    """BLANK separates comment lines: never first, never twice in a row."""
    for i, c in enumerate(lines):
        if c == BLANK and (i == 0 or lines[i - 1] == BLANK):
            return False
    return blank_last or not lines or lines[-1] != BLANK


_comments = _comment_lines.filter(lambda c: _valid_comments(c, blank_last=True)).map(tuple)
_end_comments = _comment_lines.filter(lambda c: _valid_comments(c, blank_last=False)).map(tuple)
_scalars = st.one_of(
    _text.map(lambda s: Scalar(s, "string")),
    st.integers(-(2**63), 2**63 - 1).map(lambda i: Scalar(i, "int")),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Scalar(f, "float")),
    st.booleans().map(lambda b: Scalar(b, "bool")),
    st.just(Scalar(None, "null")),
    _names.map(Name),
)
_values: st.SearchStrategy[Value] = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: Array(tuple(xs))),
        st.lists(st.builds(Entry, st.one_of(_names, _text), inner), max_size=4).map(
            lambda es: Object(tuple(es))
        ),
    ),
    max_leaves=12,
)
_exprs = st.sampled_from(
    [
        ("order.amounts.total > 50000",),
        ("order.buyer.account_age_days < 7", "&& order.amounts.total > 50000"),
        ('{"a": 1}["a"] == 1 // a comment with a } brace',),
        ('order.items.exists(i, i.category in ["beauty"])', '|| "}" == "{"'),
    ]
)
_fields = st.builds(
    Field, _names.filter(lambda n: n != "when"), _values, _comments, _text.map(str.strip)
)
_when_field = st.builds(Field, st.just("when"), _exprs.map(When), _comments)


@st.composite
def _items(draw: st.DrawFn) -> Item:
    keyword = draw(st.sampled_from(["scenario", "list", "rule", "test"]))
    comments = draw(_comments)
    trailing = draw(_text.map(str.strip))
    if keyword in ("scenario", "list"):
        return Item(keyword, Name(draw(_names)), draw(_values), (), comments, trailing)
    name: Scalar | Name = Name(draw(_names))
    if keyword == "test" and draw(st.booleans()):
        name = Scalar(draw(_text), "string")
    fields = draw(st.lists(_fields, max_size=4))
    end = draw(_end_comments)
    if keyword == "rule" and draw(st.booleans()):
        fields.append(draw(_when_field))
        end = ()  # the expression runs to the closing brace: nothing can follow it
    return Item(keyword, name, None, tuple(fields), comments, trailing, end)


_files = st.builds(RuleFile, st.lists(_items(), max_size=5).map(tuple), _end_comments)


@settings(max_examples=100, deadline=None)
@given(_files)
def test_format_then_parse_is_identity(tree: RuleFile) -> None:
    text = format_file(tree)
    parsed, diags = parse(text, "gen.rules")
    assert diags.ok, f"{diags}\n---\n{text}"
    assert parsed == tree, text


@settings(max_examples=40, deadline=None)
@given(_files)
def test_format_is_idempotent(tree: RuleFile) -> None:
    once = format_file(tree)
    twice, diags = format_text(once)
    assert diags.ok
    assert twice == once


def test_format_canonical_layout() -> None:
    messy = (
        '# top\nrule r {description="d"   # note\n score=1\n'
        "   when = a &&\n        b }\n"
        'scenario a = "A"\nscenario b = "B"\n'
        'test "t" { order = {buyer: {account_age_days: 2}}, expect=[r] }\n'
    )
    out, diags = format_text(messy.replace("}, expect", "}\n expect"))
    assert diags.ok, str(diags)
    assert out == (
        "# top\n"
        "rule r {\n"
        '  description = "d"  # note\n'
        "  score       = 1\n"
        "  when        = a &&\n"
        "      b\n"
        "}\n"
        "\n"
        'scenario a = "A"\n'
        'scenario b = "B"\n'
        "\n"
        'test "t" {\n'
        "  order  = {buyer: {account_age_days: 2}}\n"
        "  expect = [r]\n"
        "}\n"
    )


def test_format_breaks_long_values_one_element_per_line() -> None:
    tree, _ = parse("list l = [" + ", ".join(f'"element-{i:03d}"' for i in range(12)) + "]")
    out = format_file(tree)
    assert out.startswith('list l = [\n  "element-000",\n')
    assert out.endswith('  "element-011",\n]\n')


def test_format_keeps_a_value_of_exactly_the_width_on_one_line() -> None:
    line = 'list l = ["' + "a" * 87 + '"]'
    assert len(line) == 100
    out, diags = format_text(line + "\n")
    assert diags.ok, str(diags)
    assert out == line + "\n"
    longer = line.replace('"a', '"aa')  # one column more: one element per line
    assert format_text(longer + "\n")[0] == f'list l = [\n  "{"a" * 88}",\n]\n'


def test_format_separates_a_commented_scenario_from_the_one_before() -> None:
    out, diags = format_text('scenario a = "A"\nscenario b = "B"\n# about c\nscenario c = "C"\n')
    assert diags.ok, str(diags)
    assert out == 'scenario a = "A"\nscenario b = "B"\n\n# about c\nscenario c = "C"\n'


def test_format_keeps_the_text_of_a_multi_line_string(tmp_path: Path) -> None:
    """Re-indenting a line inside a triple-quoted string would change what the rule matches."""
    from riskd.domain.order import Buyer, Order
    from riskd.domain.shop import ShopState
    from riskd.dsl.program import compile_rules

    scenario = tmp_path / "s.rules"
    scenario.write_text('scenario s = "a scenario"\n', encoding="utf-8")
    rule = (
        'rule x {\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n  mode = active\n'
        "  action = review\n  score = 10\n  reason = X\n"
        '  when = order.coupon_code == """a\n  b\n\nc  """ ||\n order.coupon_code == "x"\n}\n'
    )
    path = tmp_path / "a.rules"
    order = Order("o-1", Buyer("b-1"), "s-1", "m-1", coupon_code="a\n  b\n\nc  ")

    def status() -> str:
        program = compile_rules(scenario, path)
        return program.evaluate(order, ShopState("s-1"), {}, 0.0)[0].status.name

    path.write_text(rule, encoding="utf-8")
    assert status() == "HIT"
    formatted, diags = format_text(rule)
    assert diags.ok and formatted is not None
    assert '"""a\n  b\n\nc  """ ||\n      order.coupon_code == "x"\n' in formatted
    path.write_text(formatted, encoding="utf-8")
    assert status() == "HIT"
    canonical = compile_rules(scenario, path).version
    assert format_text(formatted)[0] == formatted  # canonical text is left alone: same version
    path.write_text(format_text(formatted)[0] or "", encoding="utf-8")
    assert compile_rules(scenario, path).version == canonical


def test_format_never_turns_a_line_of_when_into_a_field() -> None:
    """Review: a line of ``when`` that starts with a form feed or a no-break space was
    CEL text to the parser and a field after ``when`` once fmt had stripped the blank."""
    for blank in ("\x0c", "\u00a0"):
        out, diags = format_text(f"rule r {{\n  when = a\n{blank}reason = R\n}}\n", "p.rules")
        assert out is None
        d = diags[0]
        assert (d.line, d.col, d.message) == (
            3,
            2,
            "'when' must be the last field of a block: 'reason' follows it",
        )


def test_format_drops_blank_lines_before_a_closing_brace_and_at_the_end() -> None:
    messy = 'rule r {\n  owner = "o"\n  # c\n\n}\nscenario s = "S"\n# end\n\n\n'
    out, diags = format_text(messy)
    assert diags.ok, str(diags)
    assert out == 'rule r {\n  owner = "o"\n  # c\n}\n\nscenario s = "S"\n\n# end\n'
    assert format_text("\n\n")[0] == ""


def test_format_breaks_a_nested_value_where_its_own_line_is_too_long() -> None:
    # a value inside a broken one is measured from its indent and after its key:
    # each of these lines would be 101 columns long unbroken
    a, b = "a" * 90, "b" * 93
    out, diags = format_text(f'test "t" {{\n  order = {{k: ["{a}"]}}\n  shop = [["{b}"]]\n}}\n')
    assert diags.ok, str(diags)
    assert out == (
        f'test "t" {{\n  order = {{\n    k: [\n      "{a}",\n    ],\n  }}\n'
        f'  shop  = [\n    [\n      "{b}",\n    ],\n  ]\n}}\n'
    )


def test_format_reindents_a_when_line_that_starts_with_a_string() -> None:
    out, diags = format_text("rule r {\n  when = order.device_id ==\n'x'\n}\n")
    assert diags.ok, str(diags)
    assert out == "rule r {\n  when = order.device_id ==\n      'x'\n}\n"


def test_format_keeps_blanks_before_a_line_break_inside_a_string() -> None:
    text = "rule r {\n  when = order.coupon_code == '''a  \nb'''\n}\n"
    assert format_text(text)[0] == text


def test_format_reindents_every_line_of_a_when_that_does_not_lex() -> None:
    # not CEL (it will not compile), but fmt formats the file's shape all the same
    out, diags = format_text("rule r {\n  when = a @\n\n          b\n}\n")
    assert diags.ok, str(diags)
    assert out == "rule r {\n  when = a @\n      b\n}\n"
