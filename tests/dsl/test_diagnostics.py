"""Golden tests of diagnostics: testdata/diagnostics/<case>.expr → <case>.golden, compared exactly.

Set ``RISKD_UPDATE_GOLDEN=1`` to rewrite the golden files after a deliberate change.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from riskd.domain.order import Order
from riskd.domain.shop import ShopState
from riskd.dsl.checker import Env
from riskd.dsl.diagnostics import Diagnostic, Diagnostics, Source
from riskd.dsl.expr import compile_expr, parse_expr
from riskd.dsl.types import STRING, TIMESTAMP, ListType, schema_of

CASES = Path(__file__).parent / "testdata" / "diagnostics"
ENV = Env(
    {
        "order": schema_of(Order),
        "shop": schema_of(ShopState),
        "now": TIMESTAMP,
        "blocked_devices": ListType(STRING),
    }
)


def _render(path: Path) -> str:
    text = path.read_text(encoding="utf-8").rstrip("\n")
    compiled, diags = compile_expr(text, ENV, file=path.name)
    assert (compiled is None) != diags.ok
    return str(diags) + "\n"


@pytest.mark.parametrize("case", sorted(p.stem for p in CASES.glob("*.expr")))
def test_diagnostics_match_golden(case: str) -> None:
    actual = _render(CASES / f"{case}.expr")
    golden = CASES / f"{case}.golden"
    if os.environ.get("RISKD_UPDATE_GOLDEN"):
        golden.write_text(actual, encoding="utf-8")
    assert golden.exists(), f"missing {golden.name}; run with RISKD_UPDATE_GOLDEN=1"
    assert actual == golden.read_text(encoding="utf-8")


def test_diagnostic_str_has_place_code_line_and_caret() -> None:
    d = Diagnostic("riskd_type_error", "cannot compare int with string", "r.rules", 12, 8,
                   "  when order.amounts.total > \"500\"")  # fmt: skip
    assert str(d) == (
        "r.rules:12:8: riskd_type_error: cannot compare int with string\n"
        '  |   when order.amounts.total > "500"\n'
        "  |        ^"
    )


def test_positions_are_relative_to_the_enclosing_file() -> None:
    file_text = "rule x {\n  when: order.amounts.total >\n    'a'\n}\n"
    _, diags = compile_expr(
        "order.amounts.total >\n    'a'", ENV, file="f.rules", line=2, col=9, file_text=file_text
    )
    (d,) = diags
    assert (d.file, d.line, d.col) == ("f.rules", 2, 29)
    assert d.source_line == "  when: order.amounts.total >"


def test_every_lexer_error_is_reported() -> None:
    _, diags = parse_expr("a ¤ b § c")
    assert [d.col for d in diags] == [3, 7]
    assert all(d.code == "riskd_syntax_error" for d in diags)


def test_diagnostics_sequence_protocol() -> None:
    d = Diagnostic("c", "m", "f", 1, 1)
    ds = Diagnostics((d, d))
    assert not ds.ok and len(ds) == 2 and ds[0] is d and list(ds[1:]) == [d]
    assert Diagnostics().ok
    assert str(ds) == "f:1:1: c: m\nf:1:1: c: m"
    e = Diagnostic("c", "n", "f", 2, 1)
    assert list(Diagnostics((d,)) + Diagnostics((e,))) == [d, e]  # appended in order


def test_source_pads_first_line_without_file_text() -> None:
    src = Source("x +", "f", 3, 5)
    assert src.diagnostic("c", "m", 2).source_line == "    x +"


def test_caret_lines_up_after_fullwidth_and_invisible_characters() -> None:
    """A fullwidth letter takes two terminal columns; a zero-width space or an enclosing
    mark takes none."""
    d = Diagnostic("c", "m", "f", 1, 5, "Ａ\u200b\u20dd* y")
    assert str(d) == "f:1:5: c: m\n  | Ａ\u200b\u20dd* y\n  |    ^"


def test_source_maps_the_first_character_of_a_line_and_the_file_s_last_line() -> None:
    """An offset at the start of a continuation line is column 1 of that line, and a
    file that ends without a newline still quotes its last line."""
    file_text = "rule r {\n  when = a +\nb"
    src = Source("a +\nb", "f.rules", 2, 10, file_text)
    d = src.diagnostic("c", "m", 4)
    assert (d.line, d.col, d.source_line) == (3, 1, "b")
    assert src.position(len(src.text) + 5) == (3, 2)  # past the end: just after it
