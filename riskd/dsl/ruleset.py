"""Rule files → ``Program``: declarations, rule fields, ``when`` expressions, test cases.

The pass runs over all files together (a rule may use a list or a scenario
declared in another file) and reports every problem it finds, sorted by file,
line and column; ``riskd.dsl.program.compile_rules`` raises them as one
``RuleCompileError``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from riskd.domain.decision import Outcome
from riskd.dsl.checker import MAX_ITERATIONS, TYPE_NAMES, iteration_cost
from riskd.dsl.diagnostics import LIMIT_EXCEEDED, TYPE_ERROR, Diagnostics
from riskd.dsl.expr import CompiledExpr, Env, compile_expr
from riskd.dsl.lexer import RESERVED as LEXER_RESERVED
from riskd.dsl.program import Mode, Program, Rule, RuleTest, Scenario, content_version
from riskd.dsl.rulefile import Array, Field, Item, Name, Pos, Reporter, RuleFile, Scalar, When
from riskd.dsl.rulefile import parse as parse_file
from riskd.dsl.ruletest import build_test
from riskd.dsl.schema import CONSTANTS, RESERVED, list_type, rule_env
from riskd.dsl.types import BOOL, Type, is_dyn
from riskd.dsl.values import INT_MAX, INT_MIN, ListValue

DUPLICATE_RULE = "riskd_duplicate_rule"
DUPLICATE_LIST = "riskd_duplicate_list"
DUPLICATE_SCENARIO = "riskd_duplicate_scenario"
DUPLICATE_TEST = "riskd_duplicate_test"
DUPLICATE_FIELD = "riskd_duplicate_field"
UNKNOWN_FIELD = "riskd_unknown_field"
MISSING_FIELD = "riskd_missing_field"
BAD_VALUE = "riskd_bad_value"
UNKNOWN_SCENARIO = "riskd_unknown_scenario"
UNKNOWN_MODE = "riskd_unknown_mode"
UNKNOWN_ACTION = "riskd_unknown_action"
LIST_MIXED_TYPES = "riskd_list_mixed_types"
RESERVED_NAME = "riskd_reserved_name"

# Names a list cannot take: a type (``int`` would shadow ``type(x) == int``), a
# literal or a reserved word of the expression language.
_UNUSABLE_NAMES = frozenset({*TYPE_NAMES, "dyn", "true", "false", "null", "in", *LEXER_RESERVED})

RULE_FIELDS: tuple[str, ...] = (
    "description",
    "owner",
    "scenarios",
    "mode",
    "action",
    "score",
    "reason",
    "when",
)
_ACTIONS = {"allow": Outcome.ALLOW, "review": Outcome.REVIEW, "block": Outcome.BLOCK}


@dataclass(slots=True)
class _Decls:
    """What the files declare, gathered before any rule is compiled."""

    scenarios: dict[str, Scenario] = field(default_factory=dict)
    lists: dict[str, ListValue] = field(default_factory=dict)
    list_types: dict[str, Type] = field(default_factory=dict)
    rules: dict[str, Pos] = field(default_factory=dict)
    rules_by_file: dict[str, set[str]] = field(default_factory=dict)


def compile_sources(sources: Mapping[str, str]) -> tuple[Program | None, Diagnostics]:
    """Compile rule files given as ``{path: text}``; the program is None on any error."""
    rep = Reporter(sources)
    trees: list[RuleFile] = []
    for path, text in sources.items():
        tree, diags = parse_file(text, path)
        rep.extend(diags)
        trees.append(tree)
    decls = _declare(trees, rep)
    env = rule_env(decls.list_types)
    rules = tuple(
        r for t in trees for i in t.items if i.keyword == "rule" for r in _rule(i, decls, env, rep)
    )
    tests = _tests(trees, decls, rep)
    diags = rep.diagnostics(tuple(sources))
    if not diags.ok:
        return None, diags
    scenarios = tuple(decls.scenarios.values())
    version = content_version(sources)
    return Program.build(version, rules, decls.lists, scenarios, tests, CONSTANTS), diags


# -------------------------------------------------------------------- declarations


def _declare(trees: list[RuleFile], rep: Reporter) -> _Decls:
    decls = _Decls()
    for tree in trees:
        decls.rules_by_file.setdefault(tree.path, set())
        for item in tree.items:
            if item.keyword == "scenario":
                _declare_scenario(item, decls, rep)
            elif item.keyword == "list":
                _declare_list(item, decls, rep)
            elif item.keyword == "rule":
                _declare_rule(item, decls, rep)
    return decls


def _where(pos: Pos) -> str:
    return f"{pos.file}:{pos.line}"


def _declare_scenario(item: Item, decls: _Decls, rep: Reporter) -> None:
    tag = item.label
    if tag in decls.scenarios:
        first = decls.scenarios[tag]
        msg = f"scenario {tag!r} is already declared at {first.file}:{first.line}"
        rep.report(DUPLICATE_SCENARIO, msg, item.name.pos)
        return
    value = item.value
    if not (isinstance(value, Scalar) and value.kind == "string" and value.value):
        rep.report(BAD_VALUE, "a scenario needs a description string", _pos(value, item.pos))
        return
    decls.scenarios[tag] = Scenario(tag, str(value.value), item.pos.file, item.pos.line)


def _declare_list(item: Item, decls: _Decls, rep: Reporter) -> None:
    name = item.label
    if name in RESERVED:
        rep.report(
            RESERVED_NAME, f"{name!r} is a built-in variable; pick another list name", item.name.pos
        )
        return
    if name in _UNUSABLE_NAMES:
        what = "a type name" if name in TYPE_NAMES else "a word of the expression language"
        rep.report(RESERVED_NAME, f"{name!r} is {what}; pick another list name", item.name.pos)
        return
    if name in decls.list_types:
        rep.report(DUPLICATE_LIST, f"list {name!r} is already declared", item.name.pos)
        return
    value = item.value
    if not isinstance(value, Array) or not all(
        isinstance(v, Scalar) and v.kind in ("string", "int", "float") for v in value.items
    ):
        msg = 'a list holds strings or numbers: list name = ["a", "b"]'
        rep.report(BAD_VALUE, msg, _pos(value, item.pos))
        return
    out_of_range = [
        v for v in value.items if isinstance(v, Scalar) and v.kind == "int" and not _is_int64(v)
    ]
    for v in out_of_range:  # the same literal in a 'when' is an error too
        rep.report(BAD_VALUE, "integer out of range (beyond a 64-bit int)", v.pos)
    if out_of_range:
        return
    values = tuple(typing.cast(Scalar, v).value for v in value.items)
    ltype = list_type(values)
    if ltype is None:
        rep.report(LIST_MIXED_TYPES, f"list {name!r} mixes strings and numbers", value.pos)
        return
    if str(ltype) == "list(double)":
        values = tuple(float(typing.cast(float, v)) for v in values)
    decls.list_types[name] = ltype
    decls.lists[name] = ListValue(values)


def _is_int64(v: Scalar) -> bool:
    return isinstance(v.value, int) and INT_MIN <= v.value <= INT_MAX


def _declare_rule(item: Item, decls: _Decls, rep: Reporter) -> None:
    rid = item.label
    if rid in decls.rules:
        msg = f"rule {rid!r} is already defined at {_where(decls.rules[rid])}"
        rep.report(DUPLICATE_RULE, msg, item.name.pos)
        return
    decls.rules[rid] = item.pos
    decls.rules_by_file.setdefault(item.pos.file, set()).add(rid)


def _pos(value: object, default: Pos) -> Pos:
    pos = getattr(value, "pos", None)
    return pos if isinstance(pos, Pos) else default


# ------------------------------------------------------------------------- rules


def _rule(item: Item, decls: _Decls, env: Env, rep: Reporter) -> tuple[Rule, ...]:
    """The compiled rule, or () when it has errors (each reported)."""
    if decls.rules.get(item.label) is not item.pos:
        return ()  # a duplicate, already reported
    before = len(rep.items)
    fields = _rule_fields(item, rep)
    desc = _string(fields.get("description"), "description", rep)
    owner = _string(fields.get("owner"), "owner", rep)
    scenarios = _scenarios(fields.get("scenarios"), decls, rep)
    mode = _choice(fields.get("mode"), {m.value: m for m in Mode}, UNKNOWN_MODE, rep)
    action = _choice(fields.get("action"), _ACTIONS, UNKNOWN_ACTION, rep)
    score = _score(fields.get("score"), rep)
    reason = _reason(fields.get("reason"), rep)
    when = fields.get("when")
    expr = _compile_when(when, env, decls, rep) if when is not None else None
    if len(rep.items) > before or expr is None or mode is None or action is None:
        return ()
    assert isinstance(when, Field) and isinstance(when.value, When)
    return (
        Rule(
            id=item.label,
            description=desc,
            owner=owner,
            scenarios=scenarios,
            mode=mode,
            action=action,
            score=score,
            reason_code=reason,
            when="\n".join(when.value.lines),
            file=item.pos.file,
            line=item.pos.line,
            expr=expr,
        ),
    )


def _rule_fields(item: Item, rep: Reporter) -> dict[str, Field]:
    out: dict[str, Field] = {}
    for f in item.fields:
        if f.name not in RULE_FIELDS:
            known = ", ".join(RULE_FIELDS)
            rep.report(UNKNOWN_FIELD, f"rules have no field {f.name!r} ({known})", f.pos)
        elif f.name in out:
            rep.report(DUPLICATE_FIELD, f"field {f.name!r} is given twice", f.pos)
        else:
            out[f.name] = f
    missing = [n for n in RULE_FIELDS if n not in out]
    if missing:
        msg = f"rule {item.label!r} is missing {', '.join(missing)}"
        rep.report(MISSING_FIELD, msg, item.name.pos)
    return out


def _string(f: Field | None, what: str, rep: Reporter) -> str:
    if f is None:
        return ""
    if isinstance(f.value, Scalar) and f.value.kind == "string" and str(f.value.value).strip():
        return str(f.value.value)
    rep.report(BAD_VALUE, f"{what} must be a non-empty string", _pos(f.value, f.pos))
    return ""


def _scenarios(f: Field | None, decls: _Decls, rep: Reporter) -> tuple[str, ...]:
    if f is None:
        return ()
    if not isinstance(f.value, Array) or not f.value.items:
        rep.report(
            BAD_VALUE, "scenarios must be a non-empty list of scenario tags", _pos(f.value, f.pos)
        )
        return ()
    tags: list[str] = []
    for v in f.value.items:
        if not isinstance(v, Name):
            rep.report(BAD_VALUE, "scenario tags are bare names", v.pos)
        elif v.name not in decls.scenarios:
            rep.report(
                UNKNOWN_SCENARIO,
                f"unknown scenario {v.name!r} (declare it in rules/scenarios.rules)",
                v.pos,
            )
        elif v.name not in tags:
            tags.append(v.name)
    return tuple(tags)


_V = typing.TypeVar("_V")


def _choice(f: Field | None, choices: Mapping[str, _V], code: str, rep: Reporter) -> _V | None:
    if f is None:
        return None
    if isinstance(f.value, Name) and f.value.name in choices:
        return choices[f.value.name]
    what = "mode" if code == UNKNOWN_MODE else "action"
    rep.report(code, f"{what} must be one of {', '.join(choices)}", _pos(f.value, f.pos))
    return None


def _score(f: Field | None, rep: Reporter) -> float:
    if f is None:
        return 0.0
    v = f.value
    if isinstance(v, Scalar) and v.kind in ("int", "float"):
        score = float(typing.cast(float, v.value))
        if math.isfinite(score) and abs(score) <= 1000:
            return score
    rep.report(BAD_VALUE, "score must be a number between -1000 and 1000", _pos(v, f.pos))
    return 0.0


def _reason(f: Field | None, rep: Reporter) -> str:
    if f is None:
        return ""
    v = f.value
    if isinstance(v, Name):
        return v.name
    if isinstance(v, Scalar) and v.kind == "string" and str(v.value).strip():
        return str(v.value)
    rep.report(BAD_VALUE, "reason must be a code such as NEW_ACCOUNT_HIGH_VALUE", _pos(v, f.pos))
    return ""


def _compile_when(f: Field, env: Env, decls: _Decls, rep: Reporter) -> CompiledExpr | None:
    if not isinstance(f.value, When):
        rep.report(BAD_VALUE, "'when' must be an expression", f.pos)
        return None
    pos = f.value.pos
    text = f.value.text
    file_text = rep.source(pos.file)
    compiled, diags = compile_expr(
        text, env, file=pos.file, line=pos.line, col=pos.col, file_text=file_text
    )
    rep.extend(diags)
    if compiled is None:
        return None
    if compiled.type != BOOL and not is_dyn(compiled.type):
        rep.report(TYPE_ERROR, f"'when' must be a bool expression, not {compiled.type}", pos)
        return None
    sizes = {name: len(values) for name, values in decls.lists.items()}
    cost, where = iteration_cost(compiled.checked, sizes)
    if cost > MAX_ITERATIONS:
        message = (
            f"this rule may take about {cost:,} steps for one order, over the limit of"
            f" {MAX_ITERATIONS:,} (a comprehension runs once per element, nested ones"
            " multiply; an order's items count as 200): iterate over fewer elements"
        )
        src = where.pos.source if where is not None else None
        if where is not None and src is not None:
            rep.extend([src.diagnostic(LIMIT_EXCEEDED, message, where.pos.offset)])
        else:
            rep.report(LIMIT_EXCEEDED, message, pos)
        return None
    return compiled


# ------------------------------------------------------------------------- tests


def _tests(trees: list[RuleFile], decls: _Decls, rep: Reporter) -> tuple[RuleTest, ...]:
    all_rules = frozenset(decls.rules)
    out: list[RuleTest] = []
    for tree in trees:
        file_rules = frozenset(decls.rules_by_file.get(tree.path, ()))
        names: set[str] = set()
        for item in tree.items:
            if item.keyword != "test":
                continue
            if item.label in names:
                rep.report(
                    DUPLICATE_TEST,
                    f"test {item.label!r} is already defined in this file",
                    item.name.pos,
                )
                continue
            names.add(item.label)
            test = build_test(item, all_rules, file_rules, rep)
            if test is not None:
                out.append(test)
    return tuple(out)
