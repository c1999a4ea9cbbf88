"""Spill files: what a stop could not keep in its database, written for the next start.

Where it sits: beside ``riskd.sql``, under every layer that spills (it imports nothing
from riskd but ``riskd.atomicfile``), so that each writes its own kind under the data
folder, named by its prefix: the decision log (``riskd.evidence.spill``:
``evidence-spill-*``) and the features catch-up (``riskd.engine.catchup``:
``features-catch-up-*``). What a line holds is the caller's; the file itself is this
module's.

A file is written beside its final name (``.<name>.part``), synced, then renamed
(``riskd.atomicfile``), so a file under its prefix is whole; it is readable by its owner
only. Its first line names the format and counts the lines after it, by section
(``{"riskd_spill": 1, "decisions": 3, "events": 1}``), so a file cut short (a copy, a
disk that failed) is refused rather than half read. Files are named by the wall clock in
nanoseconds, then the process id, so that they sort in the order they were written and
two processes (scoring workers) never share one. A process that takes a file back holds
it (``held``) while it reads it and replaces or removes it, so processes that start
together (scoring workers) never take the same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from riskd import atomicfile

SUFFIX = ".jsonl"
_FORMAT = 1


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
    head: dict[str, int] = {"riskd_spill": _FORMAT}
    head.update((section, len(lines)) for section, lines in sections.items())
    lines = [head, *(line for section in sections.values() for line in section)]
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    atomicfile.write(final, data, part_name=f".{name}.part")
    return final


def files(folder: Path, prefix: str) -> list[Path]:
    """The spill files under ``folder`` named from ``prefix``, oldest first (none when
    ``folder`` does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{prefix}*{SUFFIX}") if p.is_file())


def read(path: Path, sections: Sequence[str]) -> dict[str, list[Any]]:
    """The lines of each of ``sections`` in one spill file, as written.

    Raises:
        OSError: it cannot be read.
        SpillFileError: it is not a whole spill file of this format with these sections.
    """
    try:
        lines = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        head = lines[0]
        if not isinstance(head, dict) or head.get("riskd_spill") != _FORMAT:
            raise SpillFileError("not a spill file of this format")
        counts = [int(head[section]) for section in sections]
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
