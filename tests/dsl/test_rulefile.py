"""Rule file parsing and checking: positions, and golden diagnostics for broken files.

Each folder under ``testdata/rulefiles/`` is one rule set; ``expected.txt``
holds every diagnostic its files produce, exactly as ``riskd rules check``
prints them. ``RISKD_UPDATE_GOLDEN=1`` rewrites the expected files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from riskd.domain.decision import Outcome
from riskd.dsl.program import Mode, check_rules, rule_files
from riskd.dsl.rulefile import Array, Name, Object, Scalar, When, parse
from riskd.dsl.ruleset import compile_sources

DATA = Path(__file__).parent / "testdata" / "rulefiles"
CASES = sorted(p.name for p in DATA.iterdir() if p.is_dir() and p.name != "ok")


@pytest.mark.parametrize("case", CASES)
def test_rulefile_diagnostics_golden(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(DATA)  # file names in diagnostics are relative: case/x.rules
    program, diags = check_rules(*rule_files(Path(case)))
    assert program is None
    got = str(diags) + "\n"
    expected = DATA / case / "expected.txt"
    if os.environ.get("RISKD_UPDATE_GOLDEN"):
        expected.write_text(got, encoding="utf-8")
    assert got == expected.read_text(encoding="utf-8")


def test_rulefile_reports_every_error_of_every_file_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(DATA)
    _, diags = check_rules(*rule_files(Path("syntax")), *rule_files(Path("fields")))
    files = {d.file for d in diags}
    assert files == {"syntax/bad.rules", "fields/f.rules"}
    assert len(diags) >= 8


def test_rulefile_parse_keeps_positions() -> None:
    text = 'list l = ["a", 2]\n\nrule r {\n  when = a &&\n      b.c\n}\n'
    tree, diags = parse(text, "p.rules")
    assert diags.ok
    lst, rule = tree.items
    assert isinstance(lst.value, Array)
    assert (lst.value.pos.line, lst.value.pos.col) == (1, 10)
    first = lst.value.items[1]
    assert isinstance(first, Scalar) and first.value == 2 and first.pos.col == 16
    when = rule.fields[0].value
    assert isinstance(when, When)
    assert (when.pos.line, when.pos.col) == (4, 10)
    assert when.raw == "a &&\n      b.c"
    assert when.lines == ("a &&", "b.c")


def test_rulefile_when_braces_inside_strings_and_maps_do_not_end_the_block() -> None:
    text = 'rule r {\n  when = {"}": 1}["}"] == 1 && "{" != "}" // }\n}\ntest "t" {expect = []}\n'
    tree, diags = parse(text)
    assert diags.ok, str(diags)
    when = tree.items[0].fields[0].value
    assert isinstance(when, When) and when.lines == ('{"}": 1}["}"] == 1 && "{" != "}" // }',)
    assert tree.items[1].keyword == "test"


def test_rulefile_values_are_json_like() -> None:
    tree, diags = parse('test "x" { order = {a: [1, 2.5, -3, true, null, "s"], "b c": {}} }')
    assert diags.ok, str(diags)
    obj = tree.items[0].fields[0].value
    assert isinstance(obj, Object)
    assert [e.key for e in obj.entries] == ["a", "b c"]
    arr = obj.entries[0].value
    assert isinstance(arr, Array)
    assert [(s.value, s.kind) for s in arr.items if isinstance(s, Scalar)] == [
        (1, "int"), (2.5, "float"), (-3, "int"), (True, "bool"), (None, "null"), ("s", "string"),
    ]  # fmt: skip


def test_rulefile_bare_names_are_names() -> None:
    tree, _ = parse("rule r { mode = shadow }")
    assert tree.items[0].fields[0].value == Name("shadow")


@pytest.mark.parametrize(
    "text",
    ["", "rule", "rule r {", 'test "', "list l = [", "rule r { when = (((", "}}}", "#"],
)
def test_rulefile_parse_never_raises_on_truncated_input(text: str) -> None:
    tree, diags = parse(text)
    assert tree is not None
    assert diags.ok == (text.strip() in ("", "#"))


_FUZZ_ALPHABET = 'rule test list scenario when = {}[]"#:,\n-1.5abc_'


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.sampled_from(list('rule test list scenario when = {}[]"#:,\n-1.5abc_')),
        max_size=120,
    )
)
def test_rulefile_parse_and_check_never_raise_on_arbitrary_text(text: str) -> None:
    tree, _ = parse(text, "fuzz.rules")
    assert tree is not None
    program, diags = compile_sources({"fuzz.rules": text})
    assert program is not None or not diags.ok


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_rulefile_parse_never_raises_on_any_unicode(text: str) -> None:
    parse(text)


def test_a_value_nested_too_deep_is_a_diagnostic_not_a_recursion_error() -> None:
    """Review: a list nested ~500 deep (1 KB) ended ``riskd rules check`` and ``fmt`` in a
    RecursionError; 64 levels is far more than an order (3 or 4) needs."""
    deep = "[" * 600 + "1" + "]" * 600
    _, diags = parse(f'scenario s = "S"\nlist x = {deep}\n', "p.rules")
    assert [(d.line, d.col, d.message) for d in diags] == [
        (2, 10 + 64, "a value nested deeper than 64 levels")
    ]
    _, ok = parse(f"list x = {'[' * 64}1{']' * 64}\n", "p.rules")
    assert ok.ok


def test_the_line_quoted_under_a_diagnostic_is_the_line_it_names() -> None:
    """Review: with U+2028, a form feed or U+0085 in a comment the caret sat under an
    earlier line (lines quoted by ``str.splitlines``, numbered at newlines alone)."""
    text = (
        'scenario s = "S"\n# a note\u2028with a separator\x0c and \x85\nrule r {\n'
        '  description = "d"\n  owner = "o"\n  scenarios = [s]\n  mode = active\n'
        '  action = review\n  score = 1\n  reason = R\n  when = order.amounts.total > "x"\n}\n'
    )
    program, diags = compile_sources({"p.rules": text})
    assert program is None
    (d,) = diags
    assert d.line == 11
    assert '\n  |   when = order.amounts.total > "x"\n' in str(d)


_RULE = (
    'scenario s = "S"\nrule r {\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n'
    "  mode = active\n  action = review\n  score = 1\n  reason = R\n"
    "  when = order.amounts.total > 0\n}\n"
)


def test_rulefile_when_a_brace_inside_a_triple_quoted_string_does_not_end_the_block() -> None:
    text = _RULE.replace("> 0\n", "> 0 && order.device_id != '''x'}'''\n")
    program, diags = compile_sources({"p.rules": text})
    assert diags.ok, str(diags)
    assert program is not None
    assert program.rules[0].when == "order.amounts.total > 0 && order.device_id != '''x'}'''"


def test_rulefile_a_raw_string_ending_in_a_backslash_does_not_hide_the_closing_brace() -> None:
    # CEL's r'\' is one backslash: the string ends there, and the brace inside the
    # string after it stays inside that string (escapes read there ended the block at it)
    when = r"order.amounts.total > 0 && order.device_id != r'\' + '}'"
    text = _RULE.replace("order.amounts.total > 0\n", when + "\n")
    program, diags = compile_sources({"p.rules": text})
    assert diags.ok, str(diags)
    assert program is not None
    assert program.rules[0].when == when


def test_rulefile_a_field_written_after_when_is_named_as_such_and_still_read() -> None:
    """A field after ``when`` was read into the expression: the author saw the field
    reported missing and a syntax error at its ``=``."""
    text = _RULE.replace("  reason = R\n", "").replace("> 0\n", "> 0\n\n  reason = R\n")
    program, diags = compile_sources({"p.rules": text})
    assert program is None
    assert [(d.code, d.line, d.col, d.message) for d in diags] == [
        (
            "riskd_syntax_error",
            11,
            3,
            "'when' must be the last field of a block: 'reason' follows it",
        )
    ]
    # not a field: "==" on a line of its own, a field-like line inside a string,
    # after a comment or inside brackets
    for when in (
        "order.amounts.total\n  == 0",
        "order.device_id != '''\n  reason = R\n'''",
        "order.amounts.total > 0 // \n  && [\n  x == 1 ? 1 : 2].size() > 0",
        "order.amounts.total > 0 && (\n  x = 1)",
        "order.amounts.total > 0 &&\n  x == 1",
        "order.device_id != '''x\n}'''",
    ):
        tree, diags = parse(_RULE.replace("order.amounts.total > 0", when), "p.rules")
        assert diags.ok, (when, str(diags))
        fields = tree.items[1].fields
        assert isinstance(fields[-1].value, When) and fields[-1].value.raw == when


@pytest.mark.parametrize(
    ("after", "place", "when"),
    [
        # the first field after it is named, and the expression ends there
        ("> 0\n  reason = R\n  score = 2\n", (10, 3), "order.amounts.total > 0"),
        ("> 0  // why\n  reason = R\n", (10, 3), "order.amounts.total > 0  // why"),
        # comment lines above the field are its own, not CEL text (which has no "#")
        ("> 0\n\n  # why\n  reason = R\n", (12, 3), "order.amounts.total > 0"),
        # a string left open ends at its line (the CEL compiler names it): not the field
        ("> 0 && 'x\n  reason = R\n", (10, 3), "order.amounts.total > 0 && 'x"),
    ],
)
def test_rulefile_the_first_field_after_when_ends_it_wherever_its_line_starts(
    after: str, place: tuple[int, int], when: str
) -> None:
    text = _RULE.replace("  reason = R\n", "").replace("> 0\n", after)
    tree, diags = parse(text, "p.rules")
    message = "'when' must be the last field of a block: 'reason' follows it"
    assert [(d.line, d.col, d.message) for d in diags] == [(*place, message)]
    fields = {f.name: f.value for f in tree.items[1].fields}
    assert isinstance(fields["when"], When) and fields["when"].raw == when
    assert fields["reason"] == Name("R")


def test_rulefile_a_stray_closing_bracket_in_when_is_named_where_it_is() -> None:
    """Review: ``when = a > 1)`` was reported as an expression running to the end of the
    file, at its start, and the rules after it went unread; the block ends at its brace
    and CEL's parser names the bracket."""
    second = _RULE.split("\n", 1)[1].replace("rule r", "rule r2")
    for stray in (")", "]"):
        text = _RULE.replace("> 0\n", f"> 0{stray}\n") + second
        program, diags = compile_sources({"p.rules": text})
        assert program is None
        assert [(d.code, d.line, d.col, d.message) for d in diags] == [
            ("riskd_syntax_error", 10, 33, f"unexpected '{stray}'")
        ]


def test_rulefile_an_empty_when_is_named_at_the_closing_brace() -> None:
    _, diags = parse("rule r {\n  when =\n}\n", "p.rules")
    assert [(d.code, d.line, d.col, d.message) for d in diags] == [
        ("riskd_syntax_error", 3, 1, "'when' needs an expression")
    ]


def test_rulefile_a_keyword_written_as_a_field_name_does_not_end_the_block() -> None:
    # only a keyword in column 1 starts an item; "scenario" for "scenarios" is a field
    tree, diags = parse("rule r {\n  scenario = s\n}\n", "p.rules")
    assert diags.ok, str(diags)
    assert [f.name for f in tree.items[0].fields] == ["scenario"]


def test_rulefile_a_comment_inside_a_value_is_a_diagnostic_at_its_hash() -> None:
    _, diags = parse('list x = ["a", # c\n  "b"]\n', "p.rules")
    assert [(d.code, d.line, d.col) for d in diags] == [("riskd_misplaced_comment", 1, 16)]
    _, diags = parse('list x = ["a",\n  "b"  # c\n]\n', "p.rules")  # before the bracket
    assert [(d.code, d.line, d.col) for d in diags] == [("riskd_misplaced_comment", 2, 8)]


def test_rulefile_a_number_beyond_a_double_is_a_diagnostic() -> None:
    _, diags = parse("list x = [1e999]\n", "p.rules")
    assert [(d.code, d.line, d.col, d.message) for d in diags] == [
        ("riskd_bad_number", 1, 11, "number out of range")
    ]


def test_rulefile_score_bounds_are_inclusive_and_scenario_tags_deduplicated() -> None:
    for score in ("1000", "-1000"):
        text = _RULE.replace("score = 1\n", f"score = {score}\n")
        text = text.replace("scenarios = [s]", "scenarios = [s, s]")
        program, diags = compile_sources({"p.rules": text})
        assert diags.ok, str(diags)
        assert program is not None
        (rule,) = program.rules
        assert rule.score == float(score)
        assert rule.scenarios == ("s",)


@pytest.mark.parametrize(
    ("old", "new", "place", "message"),
    [
        (
            "scenarios = [s]",
            "scenarios = []",
            (5, 15),
            "scenarios must be a non-empty list of scenario tags",
        ),
        ("scenarios = [s]", 'scenarios = ["s"]', (5, 16), "scenario tags are bare names"),
        (
            'description = "d"',
            'description = "  "',
            (3, 17),
            "description must be a non-empty string",
        ),
        ('owner = "o"', 'owner = ""', (4, 11), "owner must be a non-empty string"),
        (
            "reason = R",
            'reason = " "',
            (9, 12),
            "reason must be a code such as NEW_ACCOUNT_HIGH_VALUE",
        ),
        ("score = 1", "score = -5000", (8, 11), "score must be a number between -1000 and 1000"),
        ('scenario s = "S"', 'scenario s = ""', (1, 14), "a scenario needs a description string"),
    ],
)
def test_rulefile_a_blank_empty_or_out_of_range_field_is_refused_at_its_value(
    old: str, new: str, place: tuple[int, int], message: str
) -> None:
    program, diags = compile_sources({"p.rules": _RULE.replace(old, new)})
    assert program is None
    d = diags[0]
    assert (d.code, d.line, d.col, d.message) == ("riskd_bad_value", *place, message)


def test_rulefile_test_names_are_unique_within_a_file_not_across_files() -> None:
    other = _RULE.replace('scenario s = "S"\n', "").replace("rule r {", "rule q {")
    program, diags = compile_sources(
        {
            "a.rules": _RULE + 'test "t" { expect = [r] }\n',
            "b.rules": other + 'test "t" { expect = [q] }\n',
        }
    )
    assert diags.ok, str(diags)
    assert program is not None
    assert [(t.name, t.file, t.expect) for t in program.tests] == [
        ("t", "a.rules", frozenset({"r"})),
        ("t", "b.rules", frozenset({"q"})),
    ]


def test_rulefile_a_compiled_rule_keeps_what_its_block_says_and_where() -> None:
    text = _RULE.replace("> 0\n", '> 0\n      && order.device_id != ""\n')
    text = text.replace('owner = "o"', 'owner = "risk-team"').replace(
        "score = 1\n", "score = 12.5\n"
    )
    text = text.replace('scenario s = "S"\n', 'scenario s = "S"\nscenario live = "Live rooms"\n')
    program, diags = compile_sources({"p.rules": text})
    assert diags.ok, str(diags)
    assert program is not None
    (rule,) = program.rules
    assert (rule.id, rule.description, rule.owner, rule.file, rule.line) == (
        "r",
        "d",
        "risk-team",
        "p.rules",
        3,
    )
    assert (rule.scenarios, rule.mode, rule.action, rule.score, rule.reason_code) == (
        ("s",),
        Mode.ACTIVE,
        Outcome.REVIEW,
        12.5,
        "R",
    )
    assert rule.when == 'order.amounts.total > 0\n&& order.device_id != ""'
    assert [(s.tag, s.description, s.file, s.line) for s in program.scenario_info] == [
        ("s", "S", "p.rules", 1),
        ("live", "Live rooms", "p.rules", 2),
    ]
    assert program.scenarios == ("s", "live")


def test_rulefile_crlf_line_endings_stay_out_of_the_quoted_line() -> None:
    text = _RULE.replace("> 0\n", '> "x"\n').replace("\n", "\r\n")
    _, diags = compile_sources({"p.rules": text})
    (d,) = diags
    assert (d.code, d.line, d.col) == ("riskd_type_error", 10, 30)
    assert "\r" not in str(d)


def test_rulefile_crlf_line_endings_stay_out_of_a_file_level_diagnostic() -> None:
    """Errors of the file's own shape (not of an expression) quote their line without
    the CR of a file saved with Windows line endings (review: ``| score = 5000\\r``)."""
    text = _RULE.replace("score = 1\n", "score = 5000\n").replace("\n", "\r\n")
    _, diags = compile_sources({"p.rules": text})
    (d,) = diags
    assert (d.code, d.line) == ("riskd_bad_value", 8)
    assert d.source_line == "  score = 5000"
    assert "\r" not in str(d)
