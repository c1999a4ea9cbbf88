"""The expression AST: what the parser builds and every later phase walks.

Nodes are immutable. Each carries its position (``pos``), which does not take
part in equality, so ``parse(unparse(e)) == e``. Operators are calls with
CEL's internal names (``_+_``, ``_&&_``, ``!_``, ``_[_]``, ``_?_:_``, ``@in``);
``has(x.f)`` is a ``Select`` with ``test_only``; the macros ``all``,
``exists``, ``exists_one``, ``map`` and ``filter`` become ``Comprehension``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as _field

from riskd.dsl.diagnostics import Source


@dataclass(frozen=True, slots=True)
class Pos:
    """Where a node starts: an offset into its source text."""

    offset: int = 0
    source: Source | None = None

    def file_position(self) -> tuple[str, int, int]:
        if self.source is None:
            return "<expr>", 1, self.offset + 1
        line, col = self.source.position(self.offset)
        return self.source.file, line, col


NOWHERE = Pos()


@dataclass(frozen=True, slots=True)
class Literal:
    """A constant: int, uint (``UInt``), double, string, bytes, bool or null."""

    value: object
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Ident:
    name: str
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Select:
    """``operand.field``; with ``test_only`` it is ``has(operand.field)``."""

    operand: Expr
    field: str
    test_only: bool = False
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Call:
    """``function(args)`` or, with ``target``, ``target.function(args)``."""

    function: str
    args: tuple[Expr, ...]
    target: Expr | None = None
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ListLit:
    elements: tuple[Expr, ...]
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class MapLit:
    entries: tuple[tuple[Expr, Expr], ...]
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


MACROS = ("all", "exists", "exists_one", "map", "filter")


@dataclass(frozen=True, slots=True)
class Comprehension:
    """An expanded macro: ``target.kind(var, ...)``.

    ``predicate`` is the condition (all, exists, exists_one, filter, and the
    3-argument map); ``transform`` the mapped value (map only).
    """

    kind: str
    target: Expr
    var: str
    predicate: Expr | None
    transform: Expr | None = None
    pos: Pos = _field(default=NOWHERE, compare=False, repr=False)


Expr = Literal | Ident | Select | Call | ListLit | MapLit | Comprehension


def children(node: Expr) -> Iterator[Expr]:
    """The direct sub-expressions of a node, in source order."""
    if isinstance(node, Select):
        yield node.operand
    elif isinstance(node, Call):
        if node.target is not None:
            yield node.target
        yield from node.args
    elif isinstance(node, ListLit):
        yield from node.elements
    elif isinstance(node, MapLit):
        for k, v in node.entries:
            yield k
            yield v
    elif isinstance(node, Comprehension):
        yield node.target
        if node.predicate is not None:
            yield node.predicate
        if node.transform is not None:
            yield node.transform


def depth(node: Expr) -> int:
    """Height of the tree, computed without recursion."""
    best = 0
    stack: list[tuple[Expr, int]] = [(node, 1)]
    while stack:
        cur, d = stack.pop()
        best = max(best, d)
        stack.extend((c, d + 1) for c in children(cur))
    return best
