"""``riskd rules``: check, test, format rule files and evaluate one expression by hand.

riskd rules check [DIR]              type-check every rule file; diagnostics, exit 1 on error
riskd rules test [DIR]               run the files' test cases; PASS/FAIL per case
riskd rules fmt [--check] [PATH...]  rewrite files canonically (--check: only report)
riskd rules eval 'EXPR' [--var NAME=JSON ...]   print the value as JSON
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from riskd import atomicfile
from riskd.dsl.diagnostics import Diagnostics
from riskd.dsl.expr import evaluate
from riskd.dsl.fmt import format_text
from riskd.dsl.holder import compile_directory
from riskd.dsl.program import RULE_FILE_SUFFIX, rule_files, unreadable_file, unwritable_file
from riskd.dsl.ruletest import run_tests, summary
from riskd.dsl.values import Duration, EvalError, Timestamp, UInt
from riskd.errors import RuleCompileError

DEFAULT_DIR = Path("rules")


def register(subparsers: Any) -> None:
    """Add ``riskd rules ...`` to the top-level parser."""
    rules = subparsers.add_parser("rules", help="check, test, format and try rule files")
    sub = rules.add_subparsers(dest="rules_command", required=True)

    check = sub.add_parser("check", help="type-check every rule file of DIR")
    check.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    check.set_defaults(func=cmd_check)

    test = sub.add_parser("test", help="run the test cases of the rule files of DIR")
    test.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    test.add_argument("-q", "--quiet", action="store_true", help="print failures only")
    test.set_defaults(func=cmd_test)

    fmt = sub.add_parser("fmt", help="rewrite rule files in canonical form")
    fmt.add_argument(
        "paths", nargs="*", type=Path, help=f"files or directories (default {DEFAULT_DIR})"
    )
    fmt.add_argument("--check", action="store_true", help="only list files that would change")
    fmt.set_defaults(func=cmd_fmt)

    ev = sub.add_parser("eval", help="evaluate one expression against JSON variables")
    ev.add_argument("expr")
    ev.add_argument("--var", action="append", default=[], metavar="NAME=JSON")
    ev.set_defaults(func=cmd_eval)


def _out() -> TextIO:
    return sys.stdout


def _err() -> TextIO:
    return sys.stderr


def cmd_check(args: argparse.Namespace) -> int:
    files = rule_files(args.dir)
    if not files:
        print(f"{args.dir}: no {RULE_FILE_SUFFIX} files", file=_err())
        return 1
    program, diags, _ = compile_directory(args.dir)  # as the daemon would take them
    if program is None:
        print(diags, file=_err())
        print(f"{len(diags)} error(s) in {args.dir}", file=_err())
        return 1
    active = sum(1 for r in program.rules if r.mode.value == "active")
    print(
        f"ok: {len(files)} files, {len(program.rules)} rules ({active} active), "
        f"{len(program.lists)} lists, {len(program.scenarios)} scenarios, "
        f"{len(program.tests)} test cases; version {program.version}",
        file=_out(),
    )
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    files = rule_files(args.dir)
    if not files:  # "0 passed" would read as success
        print(f"{args.dir}: no {RULE_FILE_SUFFIX} files", file=_err())
        return 1
    program, diags, _ = compile_directory(args.dir)
    if program is None:
        print(diags, file=_err())
        return 1
    results = run_tests(program)
    for r in results:
        if not (args.quiet and r.passed):
            print(r.describe(), file=_out())
    print(summary(results), file=_out())
    return 0 if all(r.passed for r in results) else 1


def cmd_fmt(args: argparse.Namespace) -> int:
    paths: list[Path] = []
    for p in args.paths or [DEFAULT_DIR]:
        paths.extend(rule_files(p) if p.is_dir() else [p])
    changed, failed = 0, 0
    for path in paths:
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:  # said as `rules check` says it
            print(unreadable_file(path, exc), file=_err())
            failed += 1
            continue
        text = raw.removeprefix("\ufeff")  # a BOM is dropped (check reads past it)
        formatted, diags = format_text(text, str(path))
        if formatted is None:
            print(diags, file=_err())
            failed += 1
        elif formatted != raw:
            changed += 1
            if args.check:
                print(f"would reformat {path}", file=_out())
            elif not _rewrite(path, formatted):
                failed += 1
    if failed:
        return 1
    return 1 if (args.check and changed) else 0


def _rewrite(path: Path, text: str) -> bool:
    """Write ``text`` over the rule file ``path`` and say so; False when the file system
    refuses (said as a diagnostic, the file as it was)."""
    try:
        _replace(path, text)
    except OSError:
        print(unwritable_file(path), file=_err())
        return False
    print(f"reformatted {path}", file=_out())
    return True


def _replace(path: Path, text: str) -> None:
    """Write ``text`` beside ``path``, synced, then rename it over ``path`` and sync the
    folder (``riskd.atomicfile``): a write that fails (a full disk, a file not writable)
    leaves the file whole as it was, never cut short. The file keeps its mode and, where
    allowed, its owner; a symbolic link is followed (its target replaced, the link kept).

    A file with other hard links, or in a folder that refuses a new name (not writable,
    or sticky) while the file is writable, is rewritten in place instead, the old bytes
    written back should that fail: a rename would part the links (the other names keeping
    the old text), or be refused outright.
    """
    if not os.access(path, os.W_OK):  # a rename would pass over the file's own mode
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    data = text.encode("utf-8")
    if os.stat(path).st_nlink > 1:
        atomicfile.write_in_place(path, data)
        return
    try:
        atomicfile.write(path, data, mode=atomicfile.KEEP)
    except PermissionError:  # the folder's refusal: the file itself is writable (above)
        atomicfile.write_in_place(path, data)


def cmd_eval(args: argparse.Namespace) -> int:
    variables: dict[str, object] = {}
    for spec in args.var:
        name, sep, raw = spec.partition("=")
        if not sep or not name.isidentifier():
            print(f"--var {name!r}: expected NAME=JSON", file=_err())
            return 2
        try:
            variables[name] = json.loads(raw)
        except json.JSONDecodeError as exc:
            print(f"--var {name}: not valid JSON ({exc.msg})", file=_err())
            return 2
    try:
        value = evaluate(args.expr, variables)
    except RuleCompileError as exc:
        print(exc.diagnostics if isinstance(exc.diagnostics, Diagnostics) else exc, file=_err())
        return 1
    except EvalError as exc:
        print(f"<expr>: riskd_eval_error: {exc}", file=_err())
        return 1
    print(json.dumps(to_json(value), ensure_ascii=False), file=_out())
    return 0


def to_json(value: object) -> object:
    """A CEL value as JSON (timestamps and durations as their CEL strings)."""
    if isinstance(value, Timestamp | Duration):
        return str(value)
    if isinstance(value, UInt):
        return int(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def main(argv: Sequence[str]) -> int:
    """Run ``riskd rules`` with ``argv`` (for tools that embed it)."""
    parser = argparse.ArgumentParser(prog="riskd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["rules", *argv])
    rc: int = args.func(args)
    return rc
