"""Canonical text of a rule file (``riskd rules fmt``): ``parse(format_file(t)) == t``.

The layout is fixed so that diffs show only what changed: two-space indents,
field names padded to the longest one in their block, one blank line between
items (consecutive scenario lines stay together), values inline when they fit
in ``WIDTH`` columns and one element per line with a trailing comma when they
do not, and ``when`` continuation lines indented four spaces past the field
(except a line that starts inside a multi-line string: that is the string's text,
kept byte for byte, so formatting never changes what a rule does).
Comments are kept where they were attached (above an item or field, at the end
of a line, before a closing brace).
"""

from __future__ import annotations

import json

from riskd.dsl.diagnostics import Diagnostics, Source
from riskd.dsl.lexer import Tok, tokenize
from riskd.dsl.rulefile import (
    BLANK,
    Array,
    Field,
    Item,
    Name,
    Object,
    RuleFile,
    Scalar,
    Value,
    When,
    is_identifier,
    parse,
)

WIDTH = 100
INDENT = "  "
WHEN_INDENT = "    "
_STRINGS = (Tok.STRING, Tok.BYTES)


def format_file(tree: RuleFile) -> str:
    """The canonical text of a parsed rule file (ends with one newline)."""
    out: list[str] = []
    prev: Item | None = None
    for item in tree.items:
        if prev is not None and not _keeps_together(prev, item):
            out.append("")
        out.extend(_format_item(item))
        prev = item
    if tree.end_comments:
        if out:
            out.append("")
        out.extend(_comment_lines(tree.end_comments, ""))
    return "\n".join(out) + "\n" if out else ""


def format_text(text: str, path: str = "<rules>") -> tuple[str | None, Diagnostics]:
    """Format source text; ``(None, diagnostics)`` when it does not parse."""
    tree, diags = parse(text, path)
    if not diags.ok:
        return None, diags
    return format_file(tree), diags


def _keeps_together(prev: Item, item: Item) -> bool:
    return prev.keyword == item.keyword == "scenario" and not item.comments


def _comment_lines(comments: tuple[str, ...], indent: str) -> list[str]:
    return ["" if c == BLANK else f"{indent}# {c}".rstrip() for c in comments]


def _with_trailing(line: str, trailing: str) -> str:
    return f"{line}  # {trailing}".rstrip() if trailing else line


def _format_item(item: Item) -> list[str]:
    lines = _comment_lines(item.comments, "")
    head = f"{item.keyword} {_format_name(item.name)}"
    if item.value is not None:
        body = _format_value(item.value, "", len(head) + 3)
        body[0] = f"{head} = {body[0]}"
        body[-1] = _with_trailing(body[-1], item.trailing)
        return lines + body
    lines.append(f"{head} {{")
    width = max((len(f.name) for f in item.fields), default=0)
    for f in item.fields:
        lines.extend(_format_field(f, width))
    lines.extend(_comment_lines(item.end_comments, INDENT))
    lines.append(_with_trailing("}", item.trailing))
    return lines


def _format_name(name: Scalar | Name) -> str:
    return name.name if isinstance(name, Name) else _format_scalar(name)


def _format_field(f: Field, width: int) -> list[str]:
    lines = _comment_lines(f.comments, INDENT)
    head = f"{INDENT}{f.name.ljust(width)} = "
    if isinstance(f.value, When):
        (first, _), *rest = _when_lines(f.value)
        lines.append(head + first)
        lines.extend(INDENT + WHEN_INDENT + ln if reindent else ln for ln, reindent in rest)
        return lines
    body = _format_value(f.value, INDENT, len(head))
    body[0] = head + body[0]
    body[-1] = _with_trailing(body[-1], f.trailing)
    return lines + body


def _when_lines(when: When) -> list[tuple[str, bool]]:
    """The lines of a ``when`` and whether each may be re-indented.

    A line that starts inside a string literal (a triple-quoted one spans lines) is
    part of the string's value: it is written as it is, and so are blanks before a
    line break inside a string. Only the other lines are stripped and re-indented (and
    dropped when blank). An expression that does not lex (it cannot compile either)
    has every line re-indented.
    """
    raw = when.raw or "\n".join(when.lines)
    tokens, diags = tokenize(Source(raw))
    if diags:
        return [(ln, True) for ln in when.lines]
    spans = [(t.offset, t.offset + len(t.text)) for t in tokens if t.kind in _STRINGS]

    def in_string(offset: int) -> bool:
        return any(start < offset < end for start, end in spans)

    out: list[tuple[str, bool]] = []
    start = 0
    for line in raw.split("\n"):
        end = start + len(line)
        inside = in_string(start)
        text = line if inside else line.lstrip()
        if not in_string(end):
            text = text.rstrip()
        if text or inside:
            out.append((text, not inside))
        start = end + 1
    return out


def _format_value(value: Value, indent: str, used: int) -> list[str]:
    """Lines of a value; the first is appended after ``used`` columns of prefix."""
    flat = _flat(value)
    if used + len(flat) <= WIDTH or not isinstance(value, Array | Object):
        return [flat]
    inner = indent + INDENT
    lines = ["[" if isinstance(value, Array) else "{"]
    if isinstance(value, Array):
        for element in value.items:
            sub = _format_value(element, inner, len(inner))
            sub[0] = inner + sub[0]
            sub[-1] += ","
            lines.extend(sub)
        lines.append(indent + "]")
        return lines
    for entry in value.entries:
        key = f"{_format_key(entry.key)}: "
        sub = _format_value(entry.value, inner, len(inner) + len(key))
        sub[0] = inner + key + sub[0]
        sub[-1] += ","
        lines.extend(sub)
    lines.append(indent + "}")
    return lines


def _flat(value: Value) -> str:
    if isinstance(value, Scalar):
        return _format_scalar(value)
    if isinstance(value, Name):
        return value.name
    if isinstance(value, Array):
        return "[" + ", ".join(_flat(v) for v in value.items) + "]"
    parts = (f"{_format_key(e.key)}: {_flat(e.value)}" for e in value.entries)
    return "{" + ", ".join(parts) + "}"


def _format_key(key: str) -> str:
    return key if is_identifier(key) else json.dumps(key, ensure_ascii=False)


def _format_scalar(s: Scalar) -> str:
    if s.kind == "string":
        return json.dumps(s.value, ensure_ascii=False)
    if s.kind == "bool":
        return "true" if s.value else "false"
    if s.kind == "null":
        return "null"
    if s.kind == "float":
        assert isinstance(s.value, float)
        return repr(s.value)
    return str(s.value)
