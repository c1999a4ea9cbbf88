"""A spill file (``riskd.spillfile``) is read back as written, section by section, or not
at all: one cut short, or not one of its kind, is refused."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from riskd import spillfile


def test_a_spill_file_is_read_back_by_section_and_named_by_its_prefix_and_process(
    tmp_path: Path,
) -> None:
    path = spillfile.write(tmp_path, "kind-", {"one": [[1, "a"]], "two": [{"b": 2}, 3]})
    assert path.name.startswith("kind-") and path.name.endswith(f"-{os.getpid()}.jsonl")
    assert path.stat().st_mode & 0o777 == 0o600
    assert spillfile.files(tmp_path, "kind-") == [path]
    assert spillfile.files(tmp_path, "other-") == []
    assert spillfile.read(path, ("one", "two")) == {"one": [[1, "a"]], "two": [{"b": 2}, 3]}
    spillfile.remove(path)
    spillfile.remove(path)  # gone already: another process took it
    assert spillfile.files(tmp_path, "kind-") == []


@pytest.mark.parametrize(
    "text",
    [
        '{"riskd_spill": 1, "one": 2}\n[1]\n',  # cut short
        '{"riskd_spill": 1, "one": 1}\n[1]\n[2]\n',  # extended
        '{"riskd_spill": 1, "one": -1}\n',
        '[{"riskd_spill": 1, "one": 0}]\n',  # a head that is no object
        '{"riskd_spill": 2, "one": 0}\n',
        '{"riskd_spill": 1}\n',  # no count for the section
        "",
        "\xff",
    ],
)
def test_a_file_that_is_not_a_whole_spill_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "kind-1.jsonl"
    path.write_text(text, "latin-1")
    with pytest.raises(spillfile.SpillFileError):
        spillfile.read(path, ("one",))


def test_a_spill_file_damaged_or_edited_inside_a_line_is_refused(tmp_path: Path) -> None:
    # the same lines, one value changed: counted right, it would be appended as written
    path = spillfile.write(tmp_path, "kind-", {"one": [{"total": 50000}, [1, "a"]]})
    data = path.read_bytes()
    path.write_bytes(data.replace(b"50000", b"90000"))
    with pytest.raises(spillfile.SpillFileError, match="digest"):
        spillfile.read(path, ("one",))
    path.write_bytes(data)
    assert spillfile.read(path, ("one",)) == {"one": [{"total": 50000}, [1, "a"]]}


@pytest.mark.parametrize("form", ["true", "1.0", '"1"'])
def test_a_format_named_otherwise_than_by_its_number_is_refused(tmp_path: Path, form: str) -> None:
    path = tmp_path / "kind-1.jsonl"
    path.write_text(f'{{"riskd_spill": {form}, "one": 1}}\n[1]\n', "utf-8")
    with pytest.raises(spillfile.SpillFileError, match="format"):
        spillfile.read(path, ("one",))


def test_an_older_riskds_spill_file_without_a_digest_is_still_read(tmp_path: Path) -> None:
    # format 1, counts only: what a stop before the upgrade spilled is still taken back
    path = tmp_path / "kind-1.jsonl"
    path.write_text('{"riskd_spill": 1, "one": 2}\n[1]\n{"b": "é"}\n', "utf-8")
    assert spillfile.read(path, ("one",)) == {"one": [[1], {"b": "é"}]}


def test_a_negative_count_is_refused_even_where_the_lines_add_up(tmp_path: Path) -> None:
    """-1 and 2 make the one line there: read, "two" would hold the head itself."""
    path = tmp_path / "kind-1.jsonl"
    path.write_text('{"riskd_spill": 1, "one": -1, "two": 2}\n[1]\n', "utf-8")
    with pytest.raises(spillfile.SpillFileError):
        spillfile.read(path, ("one", "two"))


def test_spill_files_are_listed_oldest_first(tmp_path: Path) -> None:
    """They are taken back in the order they were written (the log's append order)."""
    written = [spillfile.write(tmp_path, "kind-", {"one": [i]}) for i in range(3)]
    assert spillfile.files(tmp_path, "kind-") == written


def test_a_spill_file_is_written_under_the_part_name_a_later_start_clears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process killed while writing leaves ``.<name>.part``: the name
    ``remove_stale_parts`` knows, so the next start clears it."""
    real = os.fsync
    present: list[list[str]] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the part, written, not renamed yet
            present.append(sorted(p.name for p in tmp_path.iterdir()))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    assert present == [[f".{path.name}.part"]]
    left = tmp_path / present[0][0]  # as if this process was killed before the rename
    left.write_bytes(path.read_bytes())
    path.unlink()
    assert spillfile.remove_stale_parts(tmp_path, "kind-") == 1 and not left.exists()


def test_removing_a_spill_file_syncs_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file taken back and removed must not come back after a power cut (replayed twice)."""
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    real = os.fsync
    synced: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    spillfile.remove(path)
    assert not path.exists() and synced == [tmp_path.stat().st_ino]


@pytest.mark.parametrize("meanwhile", ["removed", "replaced"])
def test_a_file_taken_between_its_open_and_its_lock_is_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
) -> None:
    """Another process held it while this one opened it, then removed it (or put another
    file under its name) and let go: the lock this one gets is on a file no longer there."""
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    real = fcntl.flock

    def flock(fd: int, operation: int) -> None:
        if meanwhile == "removed":
            path.unlink()
        else:
            spillfile.write(tmp_path, "kind-", {"one": [2]}).replace(path)
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    with spillfile.held(path) as mine:
        assert not mine


def test_a_spill_file_is_taken_where_the_file_system_has_no_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network file systems refuse flock (ENOLCK): a start still takes its files back."""
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})

    def flock(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    with spillfile.held(path) as mine:
        assert mine


def test_a_spill_file_is_held_by_one_taker_at_a_time_and_not_once_removed(tmp_path: Path) -> None:
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    with spillfile.held(path) as mine:
        assert mine
        with spillfile.held(path) as other:  # another process (or open file) meanwhile
            assert not other
        spillfile.remove(path)
    with spillfile.held(path) as late:  # gone: taken already
        assert not late


def _part(folder: Path, prefix: str, pid: int, age_s: float = 0.0) -> Path:
    """A part file as ``write`` names it, as if ``pid`` began writing it ``age_s`` ago."""
    path = folder / f".{prefix}{time.time_ns():020d}-{pid}.jsonl.part"
    path.write_text('{"riskd_spill": 1, "one": 2}\n[1]\n', "utf-8")
    at = time.time() - age_s
    os.utime(path, (at, at))
    return path


def _gone_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_parts_no_process_can_still_write_are_removed_and_logged_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process killed while writing leaves its part file: the next start removes it;
    one a live process may be writing stays."""
    caplog.set_level(logging.WARNING, logger="riskd.spillfile")
    live = os.getppid()  # a live process, not this one
    dead = _part(tmp_path, "kind-", _gone_pid())
    own = _part(tmp_path, "kind-", os.getpid())  # this pid's before a restart (pid 1)
    old = _part(tmp_path, "kind-", live, spillfile.STALE_PART_S + 60)  # a pid used again
    writing = _part(tmp_path, "kind-", live, 5)
    other_kind = _part(tmp_path, "other-", _gone_pid())
    not_ours = tmp_path / ".kind-x.jsonl.part"
    not_ours.write_text("")
    whole = spillfile.write(tmp_path, "kind-", {"one": [1]})
    assert spillfile.remove_stale_parts(tmp_path, "kind-") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (writing, other_kind, not_ours, whole)
    )
    logged = [(r.getMessage(), getattr(r, "fields", None)) for r in caplog.records]
    assert sorted(logged, key=str) == sorted(
        [("stale spill part file removed", {"file": p.name}) for p in (dead, own, old)], key=str
    )
    assert spillfile.remove_stale_parts(tmp_path, "kind-") == 0
    assert spillfile.remove_stale_parts(tmp_path / "none", "kind-") == 0


def test_a_part_named_with_pid_0_is_stale(tmp_path: Path) -> None:
    """No process has pid 0 (``kill(0)`` would signal this process's own group, alive)."""
    _part(tmp_path, "kind-", 0)
    assert spillfile.remove_stale_parts(tmp_path, "kind-") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_part_this_process_is_writing_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread of this process (the decision log's close, a catch-up's start)
    clears stale parts while this one writes: its own part stays."""
    real = os.fsync
    cleared: list[int] = []

    def fsync(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):  # the part, written, not renamed yet
            cleared.append(spillfile.remove_stale_parts(tmp_path, "kind-"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    assert cleared == [0]
    assert spillfile.read(path, ("one",)) == {"one": [1]}
