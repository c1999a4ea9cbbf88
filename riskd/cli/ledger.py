"""``riskd ledger``: statements and operator actions on the merchant-money ledger.

::

    riskd ledger accounts                          every account and its balance
    riskd ledger statement ACCOUNT [--after SEQ]   an account's balance and history
    riskd ledger shop SHOP_ID                      deposit, claims, freeze, penalties
    riskd ledger dispute DISPUTE_ID                paid, recovered, collected, written off, open
    riskd ledger verify                            recheck every invariant (exit 1 on a problem)
    riskd ledger register-shop SHOP_ID [--merchant M]
    riskd ledger fund-top-up AMOUNT_FEN --key K --reason R [--evidence E]
    riskd ledger unfreeze SHOP_ID --key K --reason R
    riskd ledger write-off SHOP_ID REF --key K --reason R [--amount FEN]

It opens the ledger's database directly: ``--database URL``, else the daemon
configuration's (``--config`` file, ``RISKD_DATABASE_URL``, else the SQLite file
under ``data_dir``), so it runs on the daemon's host, with the daemon up or
down (SQLite admits one writer at a time; PostgreSQL writers queue on the
ledger's advisory lock). A database that does not exist yet is refused (exit 2):
statements and ``verify`` of an empty one made by mistake would say all is well.
Money actions need ``--key`` (a retry with the same key does nothing twice) and
record ``--actor`` (default ``cli:$USER``; ``cli:uid:<n>`` for a user id with no
name). Amounts are integer fen. ``--json`` prints machine-readable output.
Whatever stops a command is one line on stderr, exit 2, never a traceback: a bad
value or riskd's refusal by its message, the database's by its kind and first
line, a bug by its kind alone; so ``verify``'s 1 means a broken invariant only.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from enum import Enum
from typing import Any

from riskd.cli import add_config_argument, existing_database, said
from riskd.config import load_config
from riskd.domain.money import format_fen
from riskd.ledger import Book, Receipt, load_schedule
from riskd.sql import Database

Command = Callable[[Book, argparse.Namespace], Any]


def register(subparsers: Any) -> None:
    """Add ``riskd ledger`` and its subcommands to the ``riskd`` parser."""
    ledger = subparsers.add_parser("ledger", help="merchant money: statements and operator actions")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)
    _add(sub, "accounts", "every account and its balance", lambda b, a: b.accounts())
    p = _add(sub, "statement", "an account's balance and history", _statement)
    p.add_argument("account", metavar="ACCOUNT", help="e.g. platform:fund, shop:ID:deposit")
    p.add_argument("--after", type=int, default=0, help="transfers after this journal position")
    p.add_argument("--limit", type=int, default=100)
    p = _add(
        sub, "shop", "a shop's deposit, claims and freeze", lambda b, a: b.shop_statement(a.id)
    )
    p.add_argument("id", metavar="SHOP_ID")
    p = _add(sub, "dispute", "one dispute's story", lambda b, a: b.dispute_statement(a.id))
    p.add_argument("id", metavar="DISPUTE_ID")
    _add(sub, "verify", "recheck every ledger invariant", _verify)
    p = _add(sub, "register-shop", "open a shop's accounts", _register, writes=True)
    p.add_argument("id", metavar="SHOP_ID")
    p.add_argument("--merchant", default="", help="merchant id")
    p = _money(sub, "fund-top-up", "add money to the compensation fund", _top_up)
    p.add_argument("amount", type=int, metavar="AMOUNT_FEN")
    p.add_argument("--evidence", default="", help="transfer or approval reference")
    p = _money(sub, "unfreeze", "lift a shop's freeze", _unfreeze)
    p.add_argument("id", metavar="SHOP_ID")
    p = _money(sub, "write-off", "give up (part of) a claim", _write_off)
    p.add_argument("id", metavar="SHOP_ID")
    p.add_argument("ref", metavar="REF", help="dispute/ID or case/ID")
    p.add_argument("--amount", type=int, default=0, help="fen (default: all that is open)")


def _add(
    sub: Any, name: str, help_text: str, fn: Command, *, writes: bool = False
) -> argparse.ArgumentParser:
    """A subcommand; one that does not ``writes`` opens the book read-only."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    add_config_argument(parser)
    parser.add_argument("--database", default="", help="database URL (default: configuration's)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=lambda args: _run(fn, args, writes=writes))
    return parser


def _money(sub: Any, name: str, help_text: str, fn: Command) -> argparse.ArgumentParser:
    parser = _add(sub, name, help_text, fn, writes=True)
    parser.add_argument("--key", required=True, help="idempotency key (reuse it to retry)")
    parser.add_argument("--reason", required=True, help="why (recorded with the transfers)")
    parser.add_argument("--actor", help="who is acting (default: cli:<login name>)")
    return parser


def _run(fn: Command, args: argparse.Namespace, *, writes: bool) -> int:
    """Exit 2 for what stops the command (a bad value, the database refusing it: named;
    a bug: by its kind alone), never a traceback: its exit status, 1, would say that
    ``verify`` found a broken invariant."""
    try:
        config = load_config(args.config)
        schedule_path = config.rules_dir / "penalties.toml"
        schedule = load_schedule(schedule_path) if schedule_path.exists() else None
        # statements and verify of an empty database made here would lie
        url = existing_database(args, lambda: config.database)
        book = Book(Database(url), schedule=schedule, read_only=not writes)
        try:
            result = fn(book, args)
        finally:
            book.close()
        text = _render(result, as_json=args.json)
    except Exception as e:  # a bug too; said() gives its kind alone, never its text
        print(f"error: {said(e)}", file=sys.stderr)
        return 2
    print(text)
    return 1 if isinstance(result, _Problems) and result else 0


class _Problems(tuple[str, ...]):
    """What ``verify`` found (empty: sound)."""


def _actor(args: argparse.Namespace) -> str:
    """``--actor``, or ``cli:`` and the login name (``cli:uid:<n>`` for a user id the
    system has no name for: a container run with ``--user 12345``; review: every
    ``riskd`` command, ``serve`` and ``health`` too, failed there building this default)."""
    if args.actor is not None:
        return str(args.actor)
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no passwd entry (KeyError before Python 3.13)
        return f"cli:uid:{os.getuid()}"


def _statement(book: Book, args: argparse.Namespace) -> Any:
    return book.account_statement(args.account, after_seq=args.after, limit=args.limit)


def _verify(book: Book, args: argparse.Namespace) -> _Problems:
    return _Problems(book.verify())


def _register(book: Book, args: argparse.Namespace) -> dict[str, Any]:
    return {"shop_id": args.id, "created": book.register_shop(args.id, merchant_id=args.merchant)}


def _top_up(book: Book, args: argparse.Namespace) -> Receipt:
    return book.top_up_fund(
        args.key, args.amount, actor=_actor(args), reason=args.reason, evidence=args.evidence
    )


def _unfreeze(book: Book, args: argparse.Namespace) -> Receipt:
    return book.unfreeze(args.key, args.id, actor=_actor(args), reason=args.reason)


def _write_off(book: Book, args: argparse.Namespace) -> Receipt:
    return book.write_off_claim(
        args.key, args.id, args.ref, actor=_actor(args), reason=args.reason, amount=args.amount
    )


def _plain(value: Any) -> Any:
    """Dataclasses, enums and tuples as JSON-ready values (with ``balance`` on accounts)."""
    if is_dataclass(value) and not isinstance(value, type):
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        if hasattr(value, "balance"):
            out["balance"] = value.balance
        return out
    if isinstance(value, Enum):
        return value.name if isinstance(value.value, int) else value.value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _render(result: Any, *, as_json: bool) -> str:
    if isinstance(result, _Problems):
        if as_json:
            return json.dumps({"problems": list(result)})
        return "\n".join(result) if result else "ok: every ledger invariant holds"
    data = _plain(result)
    if as_json:
        return json.dumps(data, indent=2, sort_keys=True)
    return "\n".join(_lines(data, ""))


def _lines(data: Any, indent: str) -> list[str]:
    """An indented, human-readable view; fen fields also shown as CNY."""
    if isinstance(data, list):
        out = []
        for item in data:
            out += (
                _lines(item, indent + "  ")
                if isinstance(item, dict | list)
                else [f"{indent}- {item}"]
            )
            if isinstance(item, dict):
                out.append("")
        return out
    if not isinstance(data, dict):
        return [f"{indent}{data}"]
    out = []
    for key, value in data.items():
        if isinstance(value, dict | list) and value:
            out.append(f"{indent}{key}:")
            out += _lines(value, indent + "  ")
        elif isinstance(value, int) and not isinstance(value, bool) and _is_money(key):
            out.append(f"{indent}{key}: {value} fen ({format_fen(value)})")
        else:
            out.append(f"{indent}{key}: {value}")
    return out


_MONEY_FIELDS = frozenset(
    {"amount", "balance", "debits", "credits", "deposit", "owed", "outstanding", "paid"}
    | {"recovered_from_deposit", "collected", "written_off", "order_amount"}
)


def _is_money(key: str) -> bool:
    return key in _MONEY_FIELDS
