"""The decision log's spill files: what a stop could not commit, kept for the next start.

Where it sits: ``DecisionLog.close``, when its flush runs out of time (the database
down, locked by another writer, or hung), writes what is still queued here, in append
order, under the data folder; the next ``riskd serve`` appends it to the log before
serving (``DecisionLog.replay_spilled``) and deletes the file.

What a file holds: each decision's chained row exactly as the log would have stored it
(the copied columns and the canonical content text: PII masked, the buyer id as the
chained record holds it) and each outcome report's content. Neither the Vault's
ciphertexts nor the blind indexes (their rows name the buyer beside the digest) are
written: a replayed decision keeps its masked record only. A file is written beside its
final name, synced, then renamed, so a file under ``PREFIX`` is whole; it is readable by
its owner only. Its first line counts the lines after it, so a file cut short (a copy, a
disk that failed) is refused rather than half replayed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from riskd.evidence.chain import TextRow

PREFIX = "evidence-spill-"
SUFFIX = ".jsonl"
_FORMAT = 1


class SpillFileError(ValueError):
    """A spill file that is not one this module wrote whole (named by the caller)."""


def write(folder: Path, rows: Sequence[TextRow], events: Sequence[Mapping[str, Any]]) -> Path:
    """Write one spill file under ``folder``; returns its path.

    Named by the wall clock in nanoseconds, then the process id, so that files sort in
    the order they were written and two processes (scoring workers) never share one.

    Raises:
        OSError: the file could not be written (nothing is left under its final name).
    """
    name = f"{PREFIX}{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
    final = folder / name
    part = folder / f".{name}.part"
    head = {"riskd_spill": _FORMAT, "decisions": len(rows), "events": len(events)}
    lines: list[dict[str, Any]] = [head]
    lines += [{"d": list(columns), "c": text} for columns, text in rows]
    lines += [{"e": dict(content)} for content in events]
    data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, final)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    _sync_folder(folder)
    return final


def files(folder: Path) -> list[Path]:
    """The spill files under ``folder``, oldest first (none when it does not exist)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{PREFIX}*{SUFFIX}") if p.is_file())


def read(path: Path) -> tuple[list[TextRow], list[dict[str, Any]]]:
    """The decisions' rows and the reports' contents of one spill file, in append order.

    Raises:
        OSError: it cannot be read.
        SpillFileError: it is not a whole spill file of this format.
    """
    try:
        lines = [json.loads(line) for line in path.read_text("utf-8").splitlines()]
        head = lines[0]
        if head.get("riskd_spill") != _FORMAT:
            raise SpillFileError("not a spill file of this format")
        n, m = int(head["decisions"]), int(head["events"])
        if len(lines) != 1 + n + m:
            raise SpillFileError("cut short or extended")
        rows: list[TextRow] = []
        for line in lines[1 : 1 + n]:
            columns, text = line["d"], line["c"]
            if not isinstance(columns, list) or not isinstance(text, str):
                raise SpillFileError("a decision line is not a row")
            rows.append((tuple(columns), text))
        events = [dict(line["e"]) for line in lines[1 + n :]]
    except (UnicodeDecodeError, json.JSONDecodeError, LookupError, TypeError, ValueError) as e:
        if isinstance(e, SpillFileError):
            raise
        raise SpillFileError(f"unreadable ({type(e).__name__})") from None
    return rows, events


def remove(path: Path) -> None:
    """Delete a replayed file (already gone: another process replayed it too)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename or delete under ``folder`` durable (best effort: not every
    filesystem lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
