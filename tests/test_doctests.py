"""The examples in riskd's docstrings run: every module that has one (review: only three
modules' examples ran; the ledger's, the engine's and the domain's never did)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import riskd

ROOT = Path(riskd.__file__).resolve().parent
MODULES = sorted(
    ".".join(("riskd", *path.relative_to(ROOT).with_suffix("").parts))
    for path in ROOT.rglob("*.py")
    if "gen" not in path.relative_to(ROOT).parts and ">>> " in path.read_text(encoding="utf-8")
)


def test_the_examples_are_found() -> None:
    assert {"riskd.dsl.expr", "riskd.ledger.accounts", "riskd.engine.fallback"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
    assert result.attempted > 0
