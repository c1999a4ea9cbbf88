"""``riskd pii``: key management and the right to deletion, for operators.

::

    riskd pii keygen              create the keyring, or add a master key version (primary)
    riskd pii rotate              re-wrap every data key under the primary master key
                                  (exit 3: some keys could not be unwrapped, left as is)
    riskd pii retire VERSION      destroy an old master key version (refused while in use)
    riskd pii forget BUYER_ID     crypto-shred a buyer's personal data (refused under hold),
                                  under every spelling of the id velocity counting takes
                                  for the same buyer (``b-77 ``, ``ｂ-７７``)
                                  (exit 3: a reader kept the SQLite checkpoint from
                                  running, the file still holds the deleted bytes)
    riskd pii hold BUYER_ID       place (or with --release, lift) a legal hold; one per
                                  --reason, forget is refused while any remains

The keyring is the file ``--keyring`` names, else the ``RISKD_KEYRING``
environment variable (a keyring document; read-only), else the configuration's
``keyring_file``. The database is ``--database``, else the configuration's; one that
does not exist yet is refused (exit 1): a key count or a forget in an empty database
made by mistake would report nothing to do, and ``retire`` would destroy keys in use.
A database that refuses a command (a locked, read-only or garbled SQLite file, a
missing privilege) is named by the refusal's kind and first line, exit 1 as well, and
a bug by its kind alone (its text could quote personal data), never a traceback.
Output names versions and counts, never key material or personal data.
``keygen`` and ``retire`` read, change and rewrite the key file under an
exclusive lock (``<key file>.lock``), so commands run at once never lose a version;
holding it, they first delete the part files that saves of that key file, killed
before their rename, left (master keys in them: ``riskd.pii.keyring.remove_stale_parts``),
each said on stderr by its name alone; one that cannot be deleted is said with the
system's reason, and the command goes on. A key file, lock or folder the file system
refuses (a folder that cannot be made, a file where a folder should be, not writable)
is named with the system's reason, exit 1, nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from riskd.cli import add_config_argument, existing_database, said
from riskd.config import Config, load_config
from riskd.errors import ConfigError
from riskd.evidence.log import forget_subject
from riskd.pii.keyring import (
    ENV_VAR,
    STALE_PART_S,
    Keyring,
    StaleParts,
    locked,
    remove_stale_parts,
)
from riskd.pii.keystore import SqlKeyStore
from riskd.pii.vault import Vault, bind_keyring
from riskd.sql import Database

DEFAULT_REASON = "legal hold"  # the reason of a hold placed without --reason
ROTATE_INCOMPLETE = 3  # exit status: rotate re-wrapped what it could; some keys are lost
FORGET_NOT_CHECKPOINTED = 3  # exit status: forgotten, but the SQLite file keeps the bytes

Command = Callable[[argparse.Namespace], int]


def register(subparsers: Any) -> None:
    """Add ``riskd pii`` and its subcommands to the ``riskd`` parser."""
    pii = subparsers.add_parser("pii", help="personal-data keys, rotation and deletion")
    sub = pii.add_subparsers(dest="pii_command", required=True)
    _add(sub, "keygen", "create the keyring or add a new primary master key", _keygen)
    _add(sub, "rotate", "re-wrap data keys under the primary master key", _rotate)
    retire = _add(sub, "retire", "destroy an old master key version", _retire)
    retire.add_argument("version", type=int, metavar="VERSION")
    retire.add_argument(
        "--force",
        action="store_true",
        help="retire even if data keys are still wrapped under it (data loss)",
    )
    forget = _add(sub, "forget", "crypto-shred a buyer's personal data", _forget)
    forget.add_argument("buyer_id", metavar="BUYER_ID")
    hold = _add(sub, "hold", "place or lift a legal hold on a buyer", _hold)
    hold.add_argument("buyer_id", metavar="BUYER_ID")
    hold.add_argument(
        "--reason",
        default=None,
        help="why (recorded with the hold; default 'legal hold'); each reason is its own "
        "hold, and with --release names the one to lift",
    )
    hold.add_argument(
        "--release",
        action="store_true",
        help="lift the hold instead (without --reason: the buyer's only hold)",
    )


def _add(sub: Any, name: str, help_text: str, fn: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text)
    add_config_argument(parser)
    parser.add_argument("--keyring", type=Path, default=None, help="key file")
    parser.add_argument("--database", default=None, help="database URL")
    parser.set_defaults(func=_guarded(fn))
    return parser


def _guarded(fn: Command) -> Command:
    """``fn``, its errors and the database's refusals said in one line, exit 1, and a bug
    by its kind alone (never a traceback: the driver's or the bug's text can quote the
    personal data these commands handle)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except Exception as e:
            print(f"riskd pii {args.pii_command}: error: {said(e)}", file=sys.stderr)
            return 1

    return run


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _key_file(args: argparse.Namespace) -> Path:
    path: Path = args.keyring or _config(args).keyring_path
    return path


def _load_keyring(args: argparse.Namespace) -> Keyring:
    if args.keyring is None and os.environ.get(ENV_VAR):
        return Keyring.from_env()
    return Keyring.load(_key_file(args))


def _writable_key_file(args: argparse.Namespace) -> Path:
    if args.keyring is None and os.environ.get(ENV_VAR):
        raise ConfigError(f"keyring: {ENV_VAR} is read-only here; pass --keyring FILE")
    return _key_file(args)


@contextmanager
def _locked_key_file(path: Path, command: str) -> Iterator[None]:
    """``locked(path)`` around a load-modify-save of the key file, the part files that
    killed saves of it left deleted first (``_say_stale_parts``); the file system
    refusing the file, its lock or its folder (not there and not creatable, a file where
    a folder should be, not writable, full) said as a ``ConfigError`` naming the path and
    the system's reason, never a traceback. Each ``OSError`` inside is the key file's:
    ``Keyring.load`` and ``load_config`` say their own, the database's are not ``OSError``."""
    try:
        with locked(path):
            _say_stale_parts(command, remove_stale_parts(path))
            yield
    except OSError as e:
        where = "" if e.filename is None else f"{e.filename}: "  # the path refused
        why = e.strerror or type(e).__name__
        raise ConfigError(f"keyring: cannot write key file {path}: {where}{why}") from None


def _say_stale_parts(command: str, parts: StaleParts) -> None:
    """Say on stderr what ``remove_stale_parts`` did, part files by name alone (what they
    hold is master keys); a part not removed does not stop the command."""
    head = f"riskd pii {command}:"
    lines = [
        f"{head} removed stale part file {name} (a save killed midway)" for name in parts.removed
    ]
    lines += [f"{head} cannot remove stale part file {name}: {why}" for name, why in parts.failed]
    lines += [
        f"{head} left part file {name}: an older riskd's, written in the last "
        f"{STALE_PART_S / 60:.0f} minutes (its save may be under way); removed by a later command"
        for name in parts.left
    ]
    if parts.unlisted is not None:
        lines.append(f"{head} cannot look for stale part files: {parts.unlisted}")
    if parts.unsynced is not None:
        lines.append(
            f"{head} stale part files removed, but the folder not synced: {parts.unsynced}"
        )
    for line in lines:
        print(line, file=sys.stderr)


def _vault(args: argparse.Namespace) -> tuple[Vault, Database]:
    # never count, rotate or forget in an empty database made here
    url = existing_database(args, lambda: _config(args).database)
    keyring = _load_keyring(args)
    db = Database(url)
    store = SqlKeyStore(db)
    try:
        same = bind_keyring(keyring, store)
    except BaseException:
        db.close()
        raise
    if not same:  # as the daemon refuses it (riskd.service.wiring): a rotate would re-wrap
        db.close()  # nothing and call every data key unrecoverable
        raise ConfigError(
            "keyring: not the keyring this database's data keys and blind indexes were made"
            " with: pass the daemon's key file (--keyring) or RISKD_KEYRING"
        )
    return Vault(keyring, store), db


def _keygen(args: argparse.Namespace) -> int:
    path = _writable_key_file(args)
    with _locked_key_file(path, args.pii_command):  # another keygen/retire: a version lost
        ring = Keyring.load(path).add_version() if path.exists() else Keyring.generate()
        ring.save(path)
    print(f"master key version {ring.primary} is primary in {path}")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    vault, db = _vault(args)
    try:
        result = vault.rotate()
    finally:
        db.close()
    version = vault.keyring.primary_version
    print(f"re-wrapped {result.rewrapped} data keys under master key version {version}")
    if result.unrecoverable:
        print(
            f"riskd pii rotate: {result.unrecoverable} data keys could not be unwrapped "
            "(master version retired or missing) and were left as they are",
            file=sys.stderr,
        )
        return ROTATE_INCOMPLETE
    return 0


def _retire(args: argparse.Namespace) -> int:
    path = _writable_key_file(args)
    Keyring.load(path)  # no key file to retire from: refused before a folder or lock is made
    with _locked_key_file(path, args.pii_command):  # serialised with keygen and retires
        ring = Keyring.load(path)  # read again: another keygen may have added a version
        vault, db = _vault(args)
        try:
            in_use = vault.keystore.count_under(args.version)
        finally:
            db.close()
        if in_use and not args.force:
            raise ConfigError(
                f"master key version {args.version} still wraps {in_use} data keys; "
                "run `riskd pii rotate` first (or --force to make them unreadable)"
            )
        ring.retire(args.version).save(path)
    print(f"master key version {args.version} retired")
    return 0


def _forget(args: argparse.Namespace) -> int:
    vault, db = _vault(args)
    deleted: list[int] = []
    # The decision log's rows beside its chain (ciphertexts, blind indexes): the daemon's
    # DecisionLog registers this hook in its process; this process registers it here.
    # It runs after the legal-hold check and the key shredding.
    shredded: list[str] = []  # the hook runs once the data keys are destroyed

    def hook(subject: str) -> None:
        shredded.append(subject)
        deleted.append(forget_subject(db, subject))

    vault.add_forget_hook(hook)
    try:
        result = vault.forget(args.buyer_id)
    except Exception:
        if shredded and not deleted:  # the keys are gone: the rest is done by a rerun
            print(
                "riskd pii forget: the buyer's data keys are destroyed (the personal data "
                "is unreadable), but the decision log's ciphertexts and blind indexes were "
                "not deleted; run the same forget again",
                file=sys.stderr,
            )
        raise
    finally:
        db.close()
    print(
        f"forgotten: {result.data_keys_destroyed} data keys destroyed, "
        f"{result.index_entries_deleted} blind-index entries deleted, "
        f"{sum(deleted)} evidence rows deleted"
    )
    if result.checkpointed is False:
        print(
            "riskd pii forget: another connection was still reading the database, so its "
            "file and write-ahead log keep the deleted bytes (the wrapped data keys among "
            "them) until a checkpoint completes; run the same forget again when no long "
            "read (riskd evidence verify, a backup) is running",
            file=sys.stderr,
        )
        return FORGET_NOT_CHECKPOINTED
    return 0


def _hold(args: argparse.Namespace) -> int:
    vault, db = _vault(args)
    try:
        if args.release:
            released = vault.release_hold(args.buyer_id, args.reason)
            left = len(vault.holds(args.buyer_id))
            if released:
                print(
                    f"legal hold released ({left} still placed)" if left else "legal hold released"
                )
            elif args.reason is not None:
                print(f"no legal hold with that reason ({left} placed)")
            else:
                print("no legal hold was placed")
        else:
            vault.hold(args.buyer_id, DEFAULT_REASON if args.reason is None else args.reason)
            print(f"legal hold placed ({len(vault.holds(args.buyer_id))} in all)")
    finally:
        db.close()
    return 0
