"""Atomic file writes: a file is replaced whole or left as it was, never cut short.

Where it sits: under every layer (it imports nothing from riskd), so that each that keeps
a file of its own writes it the same way: the keyring (``riskd.pii.keyring``), the spill
files (``riskd.spillfile``) and ``riskd rules fmt`` (``riskd.cli.rules``).

``write`` puts the bytes in a part file beside the final name, syncs it, renames it over
the final name and syncs the folder, so that after a crash either the old file or the new
one is there, and once it returns the new one stays. A symbolic link is followed: its
target is replaced, the link kept. A part file is never left behind by a write that fails
(nor by one interrupted: ``BaseException``); one left by a process killed while writing is
its caller's to clear, since only the caller knows which names are its parts and when no
writer can still be at one: ``riskd.pii.keyring.remove_stale_parts`` (under the key file's
lock) and ``riskd.spillfile.remove_stale_parts`` (at start).

``sibling_name`` names a file that belongs to another (a part file, a lock) so that it
fits in a file name however long the other's name is.

``write_in_place`` is for where a rename cannot serve: a file with other hard links (a
rename would part them, the other names keeping the old text) or in a folder that
refuses a new name while the file itself is writable. It rewrites the file's own bytes,
and should that write fail (a full disk, a file size limit) puts the old bytes back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

KEEP = None
"""``write(mode=KEEP)``: the new file takes the mode (and, where allowed, the owner) of the
file it replaces."""
NAME_MAX = 255
"""The most bytes a file name may hold where the folder does not say (Linux's file
systems; some hold fewer: ``name_max``)."""
_RANDOM = 8  # characters tempfile puts in a name
_DIGEST = 16  # hex digits of SHA-256 standing for a name cut short
_SHORTENED = re.compile(rf".*~[0-9a-f]{{{_DIGEST}}}", re.DOTALL)


def name_max(folder: Path) -> int:
    """The most bytes a file name in ``folder`` may hold (``NAME_MAX`` where it cannot
    be asked, or the system sets no limit: -1)."""
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return NAME_MAX
    return most if most > 0 else NAME_MAX


def sibling_name(path: Path, prefix: str, suffix: str, reserve: int = 0) -> str:
    """The name of a file beside ``path`` that belongs to it (a lock, a part file):
    ``prefix + name + suffix``, leaving ``reserve`` bytes for what the caller appends.
    Where that would not fit in a name of the folder (``name_max``: a file named with more
    than ~230 bytes), the name's first bytes and ``~`` and 16 hex digits of its SHA-256
    stand for it, so the name fits and still belongs to that one file. A name already of
    that form (``~`` and 16 hex digits at its end) is shortened whatever its length, so
    no file named so shares another's siblings.

    >>> sibling_name(Path("/etc/riskd/keyring.json"), "", ".lock")
    'keyring.json.lock'
    >>> long = sibling_name(Path("/tmp") / ("k" * 255), "", ".lock")
    >>> len(long), long[-22:-5] == "~" + hashlib.sha256(b"k" * 255).hexdigest()[:16]
    (255, True)
    """
    name = path.name
    whole = f"{prefix}{name}{suffix}"
    most = name_max(path.parent)
    if len(os.fsencode(whole)) + reserve <= most and not _SHORTENED.fullmatch(name):
        return whole
    raw = os.fsencode(name)
    digest = hashlib.sha256(raw).hexdigest()[:_DIGEST]
    room = most - reserve - len(os.fsencode(prefix + suffix)) - 1 - _DIGEST
    return f"{prefix}{os.fsdecode(raw[: max(0, room)])}~{digest}{suffix}"


def write(
    path: Path,
    data: bytes,
    *,
    mode: int | None = 0o600,
    part_name: str | None = None,
    part_prefix: str | None = None,
    part_suffix: str = ".part",
    folder_sync_required: bool = False,
) -> Path:
    """Replace the file ``path`` (a symbolic link followed) with ``data``, atomically and
    durably; returns the path written (the link's target).

    Args:
        mode: the new file's permission bits; ``KEEP``: those of the file replaced, and
            its owner and group where this process may set them (only root may give a
            file to another user).
        part_name: the part file's name beside the target, created exclusively (it must
            not exist: a name unique to this write); by default a fresh temporary name,
            ``part_prefix`` (default ``.<target name>.``, shortened as ``sibling_name``
            says where it would not fit) + random + ``part_suffix``.
        folder_sync_required: raise when the folder cannot be synced after the rename
            (the file is in place then); by default that sync is best effort, since not
            every filesystem lets a folder be opened or synced.

    Raises:
        OSError: the file could not be written: the target is as it was, no part file is
            left (with ``folder_sync_required``, also: the folder could not be synced).
    """
    target = Path(os.path.realpath(path))
    before: os.stat_result | None = None
    if mode is None:  # KEEP
        before = target.stat()
        mode = stat.S_IMODE(before.st_mode)
    if part_name is not None:
        part = target.parent / part_name
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    else:
        prefix = part_prefix
        if prefix is None:
            prefix = sibling_name(target, ".", ".", _RANDOM + len(os.fsencode(part_suffix)))
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix=part_suffix)
        part = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if before is not None:
                with contextlib.suppress(OSError):  # another user's file: only root may
                    os.fchown(f.fileno(), before.st_uid, before.st_gid)  # keep it so
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, target)
    except BaseException:
        with contextlib.suppress(OSError):
            part.unlink()
        raise
    if folder_sync_required:
        sync_folder(target.parent)
    else:
        with contextlib.suppress(OSError):
            sync_folder(target.parent)
    return target


def write_in_place(path: Path, data: bytes) -> None:
    """Overwrite the file ``path`` (a symbolic link followed) with ``data`` in place, synced:
    its inode, links, mode and owner stay. The old bytes are kept in memory; a write, a
    truncation or a sync that fails writes them back (they fit where they were), so the
    file is as it was. Not atomic against a crash meanwhile, unlike ``write``: a reader
    at that moment, or a power cut, may see the new bytes partly written.

    Raises:
        OSError: the file could not be written: it is as it was (unless putting the old
            bytes back failed too: that error is raised then, the first as its context).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        old = _read_all(fd)
        try:
            _overwrite(fd, data)
        except BaseException:
            _overwrite(fd, old)
            raise
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _overwrite(fd: int, data: bytes) -> None:
    """Make ``data`` the whole content of the file open at ``fd``, synced."""
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def sync_folder(folder: Path) -> None:
    """Make a rename or delete under ``folder`` durable.

    Raises:
        OSError: the folder cannot be opened or synced.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
