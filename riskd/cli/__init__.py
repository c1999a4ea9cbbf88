"""The ``riskd`` command: one subcommand group per module in this package.

Each module listed in ``COMMANDS`` exposes ``register(subparsers)``, which adds
its subcommands and sets ``func`` (returning the exit code) on each parser. ``main``
imports only the module of the command it runs: ``riskd health``, a container's health
check every few seconds, then costs a gRPC client, not the daemon, the DSL and Redis.
``main`` holds a SIGHUP that comes while ``riskd serve`` starts (``HeldHangup``)
and ends quietly when its reader goes away (``riskd ... | head``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

DESCRIPTION = "riskd: risk-control and fraud-detection daemon for short-video and live-room shops"

# exit status of a command whose output's reader went away (128 + SIGPIPE, as `yes | head`)
BROKEN_PIPE_EXIT = 141

COMMANDS: dict[str, str] = {
    "rules": "riskd.cli.rules",  # riskd rules check|test|fmt|eval
    "serve": "riskd.cli.serve",
    "score": "riskd.cli.serve",
    "health": "riskd.cli.serve",
    "ledger": "riskd.cli.ledger",  # riskd ledger accounts|statement|...|write-off
    "pii": "riskd.cli.pii",  # riskd pii keygen|rotate|retire|forget|hold
    "evidence": "riskd.cli.evidence",  # riskd evidence verify
}
"""Each command, in the order ``riskd --help`` lists them, and the module that registers it."""


def existing_database(args: argparse.Namespace, configured: Callable[[], str]) -> str:
    """The database URL a command works on: ``--database``, else the configuration's
    (``configured()``), refused unless it is there already (``require_existing``); its
    errors name where the URL came from (``--database`` or ``database_url``)."""
    from riskd.errors import UnavailableError
    from riskd.sql import check_postgres_url, is_postgres, require_existing

    url = args.database or configured()
    key = "--database" if args.database else "database_url"
    if is_postgres(url):
        check_postgres_url(url, key)  # one libpq cannot read: named, never quoted
    try:
        require_existing(url, key)
    except UnavailableError as e:  # not there: the driver's error by kind, never its text
        cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
        raise UnavailableError(f"{key}: {e}{cause}") from e
    return url


def said(e: Exception) -> str:
    """A riskd error's message; a database's refusal by its kind and first line (it names
    a table or privilege, never the URL; the lines after it, ``DETAIL`` among them, can
    quote row values); anything else, a bug, by its kind alone (its text can quote data)."""
    from riskd.errors import RiskdError
    from riskd.sql import driver_errors, refusal

    if isinstance(e, RiskdError):
        return str(e)
    if isinstance(e, driver_errors()):
        return f"the database refused ({refusal(e)})"
    return type(e).__name__


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, defaulting to ``$RISKD_CONFIG`` (as for ``riskd serve``), so every
    command finds the daemon's configuration, and with it its database."""
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("RISKD_CONFIG") or None,
        help="riskd TOML configuration (default $RISKD_CONFIG)",
    )


class HeldHangup:
    """SIGHUP's default action ends the process: ``riskd serve`` holds one that comes while it
    starts (imports, rules compile, stores open) and reloads the rules once it serves.

    Installed by ``main`` before the subcommands' modules are imported; ``release`` puts the
    previous handler back (the server's own replaces it once up).
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = signal.signal(signal.SIGHUP, self._on_hangup)

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()

    def release(self) -> None:
        signal.signal(signal.SIGHUP, self._previous)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``riskd`` parser: every command, or only ``command``'s module's when it names
    one (the usage line still lists them all, as errors print it)."""
    parser = argparse.ArgumentParser(prog="riskd", description=DESCRIPTION)
    if command in COMMANDS:
        metavar = "{" + ",".join(COMMANDS) + "}"  # what argparse writes for all of them
        sub = parser.add_subparsers(dest="command", required=True, metavar=metavar)
        importlib.import_module(COMMANDS[command]).register(sub)
        return parser
    sub = parser.add_subparsers(dest="command", required=True)
    for name in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # grpcio's core writes its own errors (a client's malformed header) straight to stderr
    # as plain text, outside Python's logging, which writes JSON lines: none unless the
    # operator asks (README); read when grpc is first imported, which is below
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    # the top-level parser has no options but -h: a serve command starts with "serve"
    held = HeldHangup() if argv[:1] == ["serve"] else None
    try:
        try:
            args = build_parser(argv[0] if argv else None).parse_args(argv)
        except BaseException:  # usage errors and --help exit here
            if held is not None:
                held.release()
            raise
        args.held_hangup = held  # run_serve takes it over
        rc: int = args.func(args)
        sys.stdout.flush()  # inside the try: a reader gone shows here, not at exit
    except BrokenPipeError:
        _drop_stdout()
        return BROKEN_PIPE_EXIT
    return rc


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass


if __name__ == "__main__":
    sys.exit(main())
