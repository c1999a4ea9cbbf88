"""riskd.dsl: the rule language — source → parser → checker → compiler → program (+ tracer).

The expression core (``riskd.dsl.expr``) is re-exported here. Imports are
kept light: submodules load on first attribute access, so importing
``riskd.dsl`` costs nothing until something is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from riskd.dsl.checker import Env
    from riskd.dsl.diagnostics import Diagnostic, Diagnostics
    from riskd.dsl.expr import (
        CompiledExpr,
        check_expr,
        compile_expr,
        evaluate,
        infer_type,
        parse_expr,
        to_json,
        unparse,
    )
    from riskd.dsl.holder import ProgramHolder
    from riskd.dsl.program import (
        Mode,
        Program,
        Rule,
        RuleResult,
        RuleStatus,
        compile_rules,
        load_rules,
    )
    from riskd.dsl.types import ObjectType, Type, schema_of
    from riskd.dsl.values import Duration, EvalError, Timestamp, UInt

_EXPORTS: dict[str, str] = {
    "CompiledExpr": "riskd.dsl.expr",
    "check_expr": "riskd.dsl.expr",
    "compile_expr": "riskd.dsl.expr",
    "evaluate": "riskd.dsl.expr",
    "infer_type": "riskd.dsl.expr",
    "parse_expr": "riskd.dsl.expr",
    "to_json": "riskd.dsl.expr",
    "unparse": "riskd.dsl.expr",
    "Env": "riskd.dsl.checker",
    "Diagnostic": "riskd.dsl.diagnostics",
    "Diagnostics": "riskd.dsl.diagnostics",
    "ObjectType": "riskd.dsl.types",
    "Type": "riskd.dsl.types",
    "schema_of": "riskd.dsl.types",
    "Duration": "riskd.dsl.values",
    "EvalError": "riskd.dsl.values",
    "Timestamp": "riskd.dsl.values",
    "UInt": "riskd.dsl.values",
    "Mode": "riskd.dsl.program",
    "Program": "riskd.dsl.program",
    "Rule": "riskd.dsl.program",
    "RuleResult": "riskd.dsl.program",
    "RuleStatus": "riskd.dsl.program",
    "compile_rules": "riskd.dsl.program",
    "load_rules": "riskd.dsl.program",
    "ProgramHolder": "riskd.dsl.holder",
}

__all__ = [
    "CompiledExpr",
    "Diagnostic",
    "Diagnostics",
    "Duration",
    "Env",
    "EvalError",
    "Mode",
    "ObjectType",
    "Program",
    "ProgramHolder",
    "Rule",
    "RuleResult",
    "RuleStatus",
    "Timestamp",
    "Type",
    "UInt",
    "check_expr",
    "compile_expr",
    "compile_rules",
    "evaluate",
    "infer_type",
    "load_rules",
    "parse_expr",
    "schema_of",
    "to_json",
    "unparse",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'riskd.dsl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
