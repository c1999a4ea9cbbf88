"""``riskd evidence``: the auditor's check of the hash-chained evidence tables.

::

    riskd evidence verify [--expect TABLE:SEQ:HASH ...] [--json]

Walks the decision log, the outcome reports and the PII access log
(``riskd.evidence.chain``) on the daemon's database (``--database URL``, else
the configuration's) and prints the rows checked and each table's head
``(seq, hash)``. An edited, inserted, reordered or deleted row fails the walk, and
so does a row put beside the chain (``seq`` NULL, below 1 or not an integer).
Rows cut from the end (or a tail rebuilt with a fresh chain) cannot be seen
from inside a table: keep the heads printed today and pass them back next time
with ``--expect``; a head that is gone or hashes differently fails. Exit 0 when
everything checks out, 1 when something does not, 2 when it could not run (a
database's refusal named by its kind and first line, as ``riskd ledger`` names it).
Output holds order ids, sequence numbers and hashes, never personal data.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from riskd.cli import add_config_argument, existing_database, said
from riskd.config import load_config
from riskd.evidence.chain import TABLES, check_anchor, verify
from riskd.evidence.schema import MAX_SEQ
from riskd.sql import Database


def register(subparsers: Any) -> None:
    """Add ``riskd evidence`` and its subcommands to the ``riskd`` parser."""
    evidence = subparsers.add_parser("evidence", help="verify the hash-chained evidence")
    sub = evidence.add_subparsers(dest="evidence_command", required=True)
    p = sub.add_parser("verify", help="walk every evidence chain; check kept heads")
    add_config_argument(p)
    p.add_argument("--database", default="", help="database URL (default: configuration's)")
    p.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="TABLE:SEQ:HASH",
        help="a head kept from an earlier verify; must still be there (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_verify)


_DECIMAL = re.compile(r"[0-9]{1,19}", re.ASCII)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def _anchors(texts: list[str]) -> list[tuple[str, int, str]]:
    out = []
    for text in texts:
        table, _, rest = text.partition(":")
        seq, _, digest = rest.partition(":")
        digest = digest.lower()  # a head copied through a spreadsheet or ticket may change case
        if table not in TABLES or not _DECIMAL.fullmatch(seq) or not _HEX64.fullmatch(digest):
            known = ", ".join(TABLES)
            raise ValueError(
                f"--expect {text!r}: want TABLE:SEQ:HASH (HASH 64 hex digits), TABLE one of {known}"
            )
        if int(seq) > MAX_SEQ:
            raise ValueError(f"--expect {text!r}: SEQ must be at most {MAX_SEQ}")
        out.append((table, int(seq), digest))
    return out


def _verify(args: argparse.Namespace) -> int:
    try:
        anchors = _anchors(args.expect)
        url = existing_database(args, lambda: load_config(args.config).database)
        db = Database(url)
    except ValueError as e:  # a bad --expect
        print(f"riskd evidence verify: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a refusal, or a bug (by its kind): never a broken chain's 1
        print(f"riskd evidence verify: error: {said(e)}", file=sys.stderr)
        return 2
    try:
        result = verify(db)
        problems = [
            f"{table} {problem}"
            for table, seq, digest in anchors
            if (problem := check_anchor(db, TABLES[table], seq, digest)) is not None
        ]
    except Exception as e:  # anything, a bug too: exit 1 would say the chain is broken
        print(f"riskd evidence verify: error: cannot read the evidence: {said(e)}", file=sys.stderr)
        return 2
    finally:
        db.close()
    if not result.ok:
        at = "" if result.seq is None else f" seq {result.seq}"
        where = f"{result.table}{at} (order {result.order_id})"
        problems.insert(0, f"{where}: {result.problem}")
    heads = {t: f"{t}:{seq}:{digest}" for t, (seq, digest) in result.head.items()}
    if args.json:
        doc = {"ok": not problems, "checked": result.checked, "heads": heads, "problems": problems}
        print(json.dumps(doc, indent=2))
    else:
        print(f"{'ok' if not problems else 'FAILED'}: {result.checked} rows checked")
        for problem in problems:
            print(f"  problem: {problem}")
        print("heads (keep them; pass them back with --expect next time):")
        for head in heads.values():
            print(f"  {head}")
    return 1 if problems else 0
