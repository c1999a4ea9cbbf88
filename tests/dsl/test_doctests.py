"""The examples in the expression core's docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["riskd.dsl.expr", "riskd.dsl.types", "riskd.dsl.diagnostics"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_pass(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name))
    assert result.failed == 0
    assert result.attempted > 0 or name == "riskd.dsl.diagnostics"
