"""The one builtin registry: every declared overload is implemented and vice versa."""

from __future__ import annotations

import pytest

from riskd.dsl.functions import IMPLS
from riskd.dsl.registry import DEFAULT_REGISTRY, Function, Overload, Registry
from riskd.dsl.types import INT
from riskd.dsl.values import EvalError


def test_declared_and_implemented_names_are_the_same_set() -> None:
    assert DEFAULT_REGISTRY.declared_overloads() == set(IMPLS)


def test_overload_ids_are_unique() -> None:
    ids = [o.id for f in DEFAULT_REGISTRY.functions.values() for o in f.overloads]
    assert len(ids) == len(set(ids))


def test_registry_refuses_an_unimplemented_declaration() -> None:
    with pytest.raises(ValueError, match="without an implementation"):
        Registry([Function("f", (Overload("f_int", (INT,), INT),))], {})


def test_dynamic_dispatch_picks_by_runtime_type() -> None:
    assert DEFAULT_REGISTRY.dispatch("_+_", [1, 2], False) == 3
    assert DEFAULT_REGISTRY.dispatch("_+_", ["a", "b"], False) == "ab"
    assert DEFAULT_REGISTRY.dispatch("size", ["abc"], True) == 3
    with pytest.raises(EvalError, match="no such overload"):
        DEFAULT_REGISTRY.dispatch("_+_", [1, "b"], False)


def test_a_remembered_overload_choice_never_serves_other_types() -> None:
    """The choice is kept per argument types: an int's never serves a bool (CEL keeps
    them apart although Python's bool is an int), a refusal is never remembered."""
    registry = Registry(list(DEFAULT_REGISTRY.functions.values()), IMPLS)
    for _ in range(2):  # the second round runs on remembered choices
        assert registry.dispatch("_+_", [1, 2], False) == 3
        with pytest.raises(EvalError, match=r"no such overload: _\+_\(bool, int\)"):
            registry.dispatch("_+_", [True, 2], False)
        assert registry.dispatch("size", ["abc"], True) == 3
        assert registry.dispatch("size", [[1, 2]], True) == 2
        with pytest.raises(EvalError, match="no such overload"):
            registry.dispatch("size", [7], True)
        with pytest.raises(EvalError, match="no such overload"):
            registry.dispatch("_+_", [1, 2], True)  # receiver style is part of the choice


def test_velocity_functions_are_declared() -> None:
    for name in ("orders", "amount", "distinct"):
        assert name in DEFAULT_REGISTRY.functions
