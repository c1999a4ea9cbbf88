"""``riskd.atomicfile.write``: a file is replaced whole or left as it was, and no part file
stays behind either way."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from riskd import atomicfile


def _synced_folders(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The inodes of the folders ``os.fsync`` is called on from now."""
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            synced.append(st.st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_write_replaces_the_file_owner_only_and_syncs_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    path.chmod(0o644)
    synced = _synced_folders(monkeypatch)
    assert atomicfile.write(path, b"new") == path
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert synced == [tmp_path.stat().st_ino]
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_write_keeps_the_mode_of_the_file_it_replaces_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "f"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "f"
    link.symlink_to(target)
    assert atomicfile.write(link, b"new", mode=atomicfile.KEEP) == target
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["f"]


def test_write_names_its_part_file_as_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        # beside the target: a rename from another file system (/tmp) fails, EXDEV
        assert Path(src).parent == Path(dst).parent == tmp_path
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    atomicfile.write(tmp_path / "a", b"1", part_name=".a.part")
    atomicfile.write(tmp_path / "b", b"2", part_prefix=".ring-", part_suffix="")
    atomicfile.write(tmp_path / "c", b"3")
    assert seen[0] == ".a.part"
    assert seen[1].startswith(".ring-") and not seen[1].endswith(".part")
    assert seen[2].startswith(".c.") and seen[2].endswith(".part")


def test_an_exclusive_part_name_already_there_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / ".a.part").write_bytes(b"another writer's")
    with pytest.raises(FileExistsError):
        atomicfile.write(tmp_path / "a", b"1", part_name=".a.part")
    assert (tmp_path / ".a.part").read_bytes() == b"another writer's"
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("part_name", [None, ".f.part"])
def test_an_interrupted_write_leaves_the_file_as_it_was_and_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part_name: str | None
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def fsync(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        atomicfile.write(path, b"new", part_name=part_name)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another user")
def test_write_keeps_the_owner_of_the_file_it_replaces(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    os.chown(path, 4321, 4322)
    atomicfile.write(path, b"new", mode=atomicfile.KEEP)
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4322)
    atomicfile.write(path, b"newer")  # a mode given: the file is this process's
    assert (path.stat().st_uid, path.stat().st_gid) == (os.geteuid(), os.getegid())


def test_an_interrupted_write_in_place_puts_the_old_bytes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old text")
    other = tmp_path / "g"
    other.hardlink_to(path)
    real = os.fsync
    calls: list[int] = []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the new bytes', written: the old ones' goes through
            raise KeyboardInterrupt
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        atomicfile.write_in_place(path, b"new")
    assert path.read_bytes() == other.read_bytes() == b"old text"
    assert len(calls) == 2


def test_a_folder_that_cannot_be_synced_raises_only_when_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def sync_folder(folder: Path) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(atomicfile, "sync_folder", sync_folder)
    atomicfile.write(tmp_path / "f", b"1")
    with pytest.raises(OSError):
        atomicfile.write(tmp_path / "f", b"2", folder_sync_required=True)
    assert (tmp_path / "f").read_bytes() == b"2"  # in place: only its durability unknown


@pytest.mark.parametrize("name", ["r" * 255, "规则" * 42 + "r", "r" * 240 + ".rules"])
def test_write_replaces_a_file_with_the_longest_name(tmp_path: Path, name: str) -> None:
    """The default part name, ``.<name>.`` + 8 random + ``.part``, would be 15 bytes over a
    long name's: it is cut and a hash of the name added (review: File name too long)."""
    target = tmp_path / name
    target.write_bytes(b"old")
    assert atomicfile.write(target, b"new", mode=atomicfile.KEEP) == target
    assert target.read_bytes() == b"new"
    assert [os.fsencode(p.name) for p in tmp_path.iterdir()] == [os.fsencode(name)]


def test_sibling_names_fit_and_stay_one_file_s(tmp_path: Path) -> None:
    """Two long names alike in their first bytes get different siblings; a name of the
    shortened form is shortened too, so it never takes another file's siblings."""
    long = "k" * 255
    twin = "k" * 254 + "j"
    mine = atomicfile.sibling_name(tmp_path / long, ".", ".keyring-", reserve=16)
    assert len(os.fsencode(mine)) + 16 == atomicfile.NAME_MAX
    assert mine != atomicfile.sibling_name(tmp_path / twin, ".", ".keyring-", reserve=16)
    crafted = mine[1 : -len(".keyring-")]  # a file named as the long one's stand-in
    assert atomicfile.sibling_name(tmp_path / crafted, ".", ".keyring-", reserve=16) != mine
    assert atomicfile.sibling_name(tmp_path / "keyring.json", "", ".lock") == "keyring.json.lock"


def test_a_folder_that_sets_no_name_limit_gets_the_usual_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pathconf answers -1 where the system sets no limit: not a limit of -1 bytes (every
    sibling would be shortened to its hash), nor one the folder cannot be asked for."""
    assert atomicfile.name_max(tmp_path / "not-there") == atomicfile.NAME_MAX  # ENOENT
    monkeypatch.setattr(os, "pathconf", lambda folder, name: -1)
    assert atomicfile.name_max(tmp_path) == atomicfile.NAME_MAX
    assert atomicfile.sibling_name(tmp_path / "keyring.json", "", ".lock") == "keyring.json.lock"
