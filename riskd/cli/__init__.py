"""The ``riskd`` command: one subcommand group per module in this package.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which adds
its subcommands and sets ``func`` (returning the exit code) on each parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

COMMANDS: tuple[str, ...] = (
    "riskd.cli.rules",  # riskd rules check|test|fmt|eval
    "riskd.cli.serve",  # riskd serve, riskd score
    "riskd.cli.ledger",  # riskd ledger statements|verify|top-up|unfreeze|write-off
    "riskd.cli.pii",  # riskd pii keygen|rotate|retire|forget|hold
    "riskd.cli.evidence",  # riskd evidence verify
)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, defaulting to ``$RISKD_CONFIG`` (as for ``riskd serve``), so every
    command finds the daemon's configuration, and with it its database."""
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("RISKD_CONFIG") or None,
        help="riskd TOML configuration (default $RISKD_CONFIG)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="riskd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
