"""Spill files: what a stop could not keep in its database, written for the next start.

Where it sits: beside ``riskd.sql``, under every layer that spills (it imports nothing
from riskd but ``riskd.atomicfile``), so that each writes its own kind under the data
folder, named by its prefix: the decision log (``riskd.evidence.spill``:
``evidence-spill-*``) and the features catch-up (``riskd.engine.catchup``:
``features-catch-up-*``). What a line holds is the caller's; the file itself is this
module's.

A file is written beside its final name (``.<name>.part``), synced, then renamed
(``riskd.atomicfile``), so a file under its prefix is whole; it is readable by its owner
only. Its first line names the format, counts the lines after it by section and holds
the SHA-256 of their bytes (``{"riskd_spill": 2, "decisions": 3, "events": 1, "sha256":
"…"}``), so a file cut short, damaged or edited (a copy, a disk that failed, a value
changed inside a line) is refused rather than half or wrongly read; an older riskd's
files (format 1, counts only) are still read. The digest is not keyed: it finds damage,
not a rewrite (as the decision log's chain, ``docs/ledger.md``). Files are named by the
wall clock in nanoseconds, then the process id, so that they sort in the order they were
written and two processes (scoring workers) never share one. A process that takes a file
back holds it (``held``) while it reads it and replaces or removes it, so processes that
start together (scoring workers) never take the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from riskd import atomicfile

SUFFIX = ".jsonl"
PART = ".part"
STALE_PART_S = 600.0
"""How long a part file may go unwritten before ``remove_stale_parts`` takes its writer
for gone even when a process with its pid is alive (a pid used again)."""
_FORMAT = 2
_FORMATS = (1, 2)  # read: format 1 (an older riskd's) has no digest
_log = logging.getLogger("riskd.spillfile")
_writing: set[str] = set()  # this process's part files being written (their names)


class SpillFileError(ValueError):
    """A spill file that is not one this module wrote whole (named by the caller)."""


def write(folder: Path, prefix: str, sections: Mapping[str, Sequence[Any]]) -> Path:
    """Write one spill file under ``folder``, named from ``prefix``; returns its path.
    ``sections``: each section's lines (JSON values), written in that order.

    Raises:
        OSError: the file could not be written (nothing is left under its final name).
    """
    name = f"{prefix}{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
    final = folder / name
    head: dict[str, int | str] = {"riskd_spill": _FORMAT}
    head.update((section, len(lines)) for section, lines in sections.items())
    body = "".join(
        json.dumps(line, ensure_ascii=False) + "\n" for lines in sections.values() for line in lines
    ).encode()
    head["sha256"] = hashlib.sha256(body).hexdigest()
    data = json.dumps(head).encode() + b"\n" + body
    part = f".{name}{PART}"
    _writing.add(part)  # before the part exists, until it is renamed or removed
    try:
        atomicfile.write(final, data, part_name=part)
    finally:
        _writing.discard(part)
    return final


def files(folder: Path, prefix: str) -> list[Path]:
    """The spill files under ``folder`` named from ``prefix``, oldest first (none when
    ``folder`` does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{prefix}*{SUFFIX}") if p.is_file())


def remove_stale_parts(folder: Path, prefix: str) -> int:
    """Delete the part files under ``folder`` named from ``prefix`` that no process can be
    writing any more (left by one killed while writing); returns how many. Call at start,
    where the spill files are taken back: each is logged by name.

    Scoring workers start and stop at any time over one data folder, so a part is kept
    while its writer may still be writing it. The pid in its name tells the writer: a
    part of this process is stale unless this process is writing it now (it knows which:
    a container's daemon has the same pid after every restart); one whose pid is no live
    process here is stale (a process never comes back; the data folder is one host's);
    one whose pid is alive is kept until nothing has written to it for ``STALE_PART_S``
    (10 minutes: a write is one file's bytes and an fsync, and a stop is killed within
    two minutes; past that, its pid is one used again). Names not of ``write``'s form are
    not this module's and are left alone.
    """
    if not folder.is_dir():
        return 0
    form = re.compile(rf"\.{re.escape(prefix)}\d{{20}}-(\d+){re.escape(SUFFIX + PART)}")
    removed = 0
    for path in sorted(folder.glob(f".{prefix}*{SUFFIX}{PART}")):
        named = form.fullmatch(path.name)
        if named is None or not _stale(path, int(named[1])):
            continue
        try:
            path.unlink()
        except FileNotFoundError:  # renamed by its writer, or removed by another process
            continue
        except OSError as e:
            fields = {"file": path.name, "error_type": type(e).__name__}
            _log.warning("stale spill part file not removed", extra={"fields": fields})
            continue
        removed += 1
        _log.warning("stale spill part file removed", extra={"fields": {"file": path.name}})
    if removed:
        _sync_folder(folder)
    return removed


def _stale(part: Path, pid: int) -> bool:
    """Whether no process can still be writing ``part`` (``remove_stale_parts``)."""
    if pid == os.getpid():
        return part.name not in _writing
    if not _alive(pid):
        return True
    try:
        return time.time() - part.stat().st_mtime > STALE_PART_S
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (another user's included)."""
    if pid < 1:  # no process; kill(0) would signal this process's group
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or past any pid
        return False
    except OSError:  # PermissionError: alive, another user's; else not known: kept
        return True
    return True


def read(path: Path, sections: Sequence[str]) -> dict[str, list[Any]]:
    """The lines of each of ``sections`` in one spill file, as written.

    Raises:
        OSError: it cannot be read.
        SpillFileError: it is not a whole spill file of this format with these sections.
    """
    data = path.read_bytes()
    first, _, body = data.partition(b"\n")
    try:
        head = json.loads(first)
        form = head.get("riskd_spill") if isinstance(head, dict) else None
        if type(form) is not int or form not in _FORMATS:
            raise SpillFileError("not a spill file of this format")
        if form != 1 and head["sha256"] != hashlib.sha256(body).hexdigest():
            raise SpillFileError("its lines do not match its digest (damaged or edited)")
        counts = [int(head[section]) for section in sections]
        lines = [head, *(json.loads(line) for line in body.decode("utf-8").splitlines())]
    except (UnicodeDecodeError, json.JSONDecodeError, LookupError, TypeError, ValueError) as e:
        if isinstance(e, SpillFileError):
            raise
        raise SpillFileError(f"unreadable ({type(e).__name__})") from None
    if min(counts, default=0) < 0 or len(lines) != 1 + sum(counts):
        raise SpillFileError("cut short or extended")
    found, start = {}, 1
    for section, n in zip(sections, counts, strict=True):
        found[section] = lines[start : start + n]
        start += n
    return found


@contextlib.contextmanager
def held(path: Path) -> Iterator[bool]:
    """Hold the spill file ``path`` for this process alone while it is read and replaced
    or removed (an exclusive lock on it: let go on leaving, or by the system should the
    process die, the file then left for a later start): True while held, False when
    another process holds it or has taken it already (gone, or removed under the lock).

    Raises:
        OSError: it cannot be opened (not readable).
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is taking it
            yield False
            return
        except OSError:  # no locks here (some network file systems): taken unheld, as
            pass  # before; an order queued by two processes is still counted once
        try:  # still the file under that name: not removed by one that held it before
            mine = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            mine = False
        yield mine
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Delete a file taken back (already gone: another process took it too)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a delete under ``folder`` durable (best effort: not every filesystem lets a
    folder be opened)."""
    with contextlib.suppress(OSError):
        atomicfile.sync_folder(folder)
