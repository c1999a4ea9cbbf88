"""The decision log's spill files: what a stop could not commit, kept for the next start.

Where it sits: ``DecisionLog.close``, when its flush runs out of time (the database
down, locked by another writer, or hung), writes what is still queued here, in append
order, under the data folder; the next ``riskd serve`` appends it to the log before
serving (``DecisionLog.replay_spilled``) and deletes the file.

What a file holds: each decision's chained row exactly as the log would have stored it
(the copied columns and the canonical content text: PII masked, the buyer id as the
chained record holds it) and each outcome report's content. Neither the Vault's
ciphertexts nor the blind indexes (their rows name the buyer beside the digest) are
written: a replayed decision keeps its masked record only. The file itself (written whole,
owner-only, its first line counting the lines after it, so a file cut short is refused
rather than half replayed) is ``riskd.spillfile``'s; this module says what its lines hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from riskd import spillfile
from riskd.evidence.chain import TextRow
from riskd.spillfile import SpillFileError, remove

__all__ = ["PREFIX", "SpillFileError", "files", "read", "remove", "remove_stale_parts", "write"]

PREFIX = "evidence-spill-"
_SECTIONS = ("decisions", "events")


def write(folder: Path, rows: Sequence[TextRow], events: Sequence[Mapping[str, Any]]) -> Path:
    """Write one spill file under ``folder``; returns its path (``riskd.spillfile.write``:
    two processes never share one).

    Raises:
        OSError: the file could not be written (nothing is left under its final name).
    """
    decisions = [{"d": list(columns), "c": text} for columns, text in rows]
    reports = [{"e": dict(content)} for content in events]
    return spillfile.write(folder, PREFIX, {"decisions": decisions, "events": reports})


def files(folder: Path) -> list[Path]:
    """The spill files under ``folder``, oldest first (none when it does not exist)."""
    return spillfile.files(folder, PREFIX)


def remove_stale_parts(folder: Path) -> int:
    """Delete the part files under ``folder`` left by a process killed while writing a
    spill file (``riskd.spillfile.remove_stale_parts``: none a live writer may still be
    writing); returns how many."""
    return spillfile.remove_stale_parts(folder, PREFIX)


def read(path: Path) -> tuple[list[TextRow], list[dict[str, Any]]]:
    """The decisions' rows and the reports' contents of one spill file, in append order.

    Raises:
        OSError: it cannot be read.
        SpillFileError: it is not a whole spill file of this format.
    """
    lines = spillfile.read(path, _SECTIONS)
    try:
        rows: list[TextRow] = []
        for line in lines["decisions"]:
            columns, text = line["d"], line["c"]
            if not isinstance(columns, list) or not isinstance(text, str):
                raise SpillFileError("a decision line is not a row")
            rows.append((tuple(columns), text))
        events = [dict(line["e"]) for line in lines["events"]]
    except (LookupError, TypeError, ValueError) as e:
        if isinstance(e, SpillFileError):
            raise
        raise SpillFileError(f"unreadable ({type(e).__name__})") from None
    return rows, events
