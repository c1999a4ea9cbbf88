"""Keyring: versions, retirement, persistence and the errors it gives."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

import pytest

from riskd.atomicfile import NAME_MAX
from riskd.domain.clock import FakeClock
from riskd.errors import ConfigError, CryptoError
from riskd.pii.keyring import (
    STALE_PART_S,
    Keyring,
    StaleParts,
    WrappedKey,
    locked,
    new_part_name,
    remove_stale_parts,
)


def test_keyring_generate_has_one_active_primary_version() -> None:
    ring = Keyring.generate()
    assert ring.primary_version == 1
    assert ring.active_versions == (1,)


def test_keyring_add_version_makes_new_primary_and_keeps_old_unwrappable() -> None:
    ring = Keyring.generate()
    old = ring.wrap(b"d" * 32, b"aad")
    ring2 = ring.add_version()
    assert ring2.primary_version == 2
    assert ring2.wrap(b"d" * 32, b"aad").version == 2
    assert ring2.unwrap(old, b"aad") == b"d" * 32


def test_keyring_unwrap_retired_version_names_the_version() -> None:
    ring = Keyring.generate()
    old = ring.wrap(b"d" * 32, b"aad")
    ring = ring.add_version().retire(1)
    with pytest.raises(CryptoError, match="master key version 1 is retired"):
        ring.unwrap(old, b"aad")


def test_keyring_unwrap_with_other_aad_fails() -> None:
    ring = Keyring.generate()
    wrapped = ring.wrap(b"d" * 32, b"subject-a")
    with pytest.raises(CryptoError, match="does not authenticate"):
        ring.unwrap(wrapped, b"subject-b")


def test_keyring_add_version_never_reuses_a_version_number() -> None:
    """A key file from which a retired entry was deleted (versions 1 and 3): the next
    version is 4, and version 3's key, which wraps data keys, stays."""
    doc = json.loads(Keyring.generate().add_version().add_version().to_json())
    doc["keys"] = [k for k in doc["keys"] if k["version"] != 2]
    ring = Keyring.from_json(json.dumps(doc))
    wrapped = ring.wrap(b"k" * 32, b"aad")
    grown = ring.add_version()
    assert grown.versions == (1, 3, 4)
    assert grown.unwrap(wrapped, b"aad") == b"k" * 32


def test_keyring_wrap_draws_a_fresh_nonce_for_every_data_key() -> None:
    # one master key wraps every buyer's data key: a repeated GCM nonce would expose them
    ring = Keyring.generate()
    blobs = {ring.wrap(b"k" * 32, b"aad").blob[:12] for _ in range(3)}
    assert len(blobs) == 3


def test_keyring_wrap_uses_the_primary_key_even_when_a_newer_version_is_active() -> None:
    """A keyring set back to an older primary wraps under that one's key: the data keys
    must unwrap wherever that version is held."""
    ring = Keyring.generate()
    newer = ring.add_version()
    rolled_back = Keyring(newer.keys, 1, newer.index_secret)
    wrapped = rolled_back.wrap(b"k" * 32, b"aad")
    assert wrapped.version == 1
    assert ring.unwrap(wrapped, b"aad") == b"k" * 32


def test_keyring_unwrap_unknown_version_fails() -> None:
    with pytest.raises(CryptoError, match="version 7 is not in the keyring"):
        Keyring.generate().unwrap(WrappedKey(7, b"x" * 40), b"")


def test_keyring_retire_primary_is_refused() -> None:
    with pytest.raises(ConfigError, match="primary"):
        Keyring.generate().retire(1)


def test_keyring_retire_unknown_version_is_refused() -> None:
    with pytest.raises(ConfigError, match="no master key version 5"):
        Keyring.generate().retire(5)


def test_keyring_json_round_trip_keeps_keys_and_retirement() -> None:
    ring = Keyring.generate().add_version().add_version().retire(1)
    back = Keyring.from_json(ring.to_json())
    assert back == ring
    doc = json.loads(ring.to_json())
    assert [k["state"] for k in doc["keys"]] == ["retired", "active", "active"]
    assert "key" not in doc["keys"][0]  # retired material is destroyed, not kept


def test_keyring_save_writes_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keyring.json"
    ring = Keyring.generate()
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path) == ring


def test_keyring_save_through_a_symlink_updates_the_shared_target(tmp_path: Path) -> None:
    """A key file on shared storage, linked from each host, stays one file."""
    shared = tmp_path / "shared" / "keyring.json"
    link = tmp_path / "node" / "keyring.json"
    link.parent.mkdir()
    link.symlink_to(shared)  # dangling until the first save
    ring = Keyring.generate()
    with locked(link):
        ring.save(link)
    with locked(link):
        rotated = Keyring.load(link).add_version()
        rotated.save(link)
    assert link.is_symlink() and link.resolve() == shared.resolve()
    assert Keyring.load(shared).primary_version == 2
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600
    assert (shared.parent / "keyring.json.lock").exists()
    assert sorted(p.name for p in link.parent.iterdir()) == ["keyring.json"]


def test_keyring_from_env_reads_the_document() -> None:
    ring = Keyring.generate()
    assert Keyring.from_env(environ={"RISKD_KEYRING": ring.to_json()}) == ring
    with pytest.raises(ConfigError, match="RISKD_KEYRING is not set"):
        Keyring.from_env(environ={})


def test_keyring_repr_never_shows_key_material() -> None:
    ring = Keyring.generate()
    text = repr(ring) + repr(ring.keys[1])
    assert ring.keys[1].material.hex() not in text
    assert str(list(ring.keys[1].material)) not in text
    assert "material" not in text and "index_secret" not in text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="x"), "format"),
        (lambda d: d.pop("keys"), "keys must be a list"),
        (lambda d: d.update(keys=[]), "keys is empty"),
        (lambda d: d.update(primary="1"), "primary must be a int"),
        (lambda d: d.update(primary=9), "primary version 9"),
        (lambda d: d.update(index_secret="!!"), "index_secret is not valid base64"),
        (lambda d: d["keys"][0].update(key="AAAA"), r"keys\[0\].key must be 32 bytes"),
        (lambda d: d["keys"][0].update(state="on"), r"keys\[0\].state"),
        (lambda d: d["keys"][0].update(version=0), r"keys\[0\].version must be between 1 and"),
        # a retired primary would wrap new data keys under no key at all
        (lambda d: d["keys"][0].update(state="retired"), "primary version 1 has no active key"),
        # a shorter secret would weaken every blind index
        (lambda d: d.update(index_secret="A" * 24), "index_secret must be 32 bytes"),
    ],
)
def test_keyring_from_json_names_the_bad_field_without_secrets(mutate, message) -> None:  # type: ignore[no-untyped-def]
    ring = Keyring.generate()
    doc = json.loads(ring.to_json())
    secret = doc["keys"][0]["key"]
    mutate(doc)
    with pytest.raises(ConfigError, match=message) as info:
        Keyring.from_json(json.dumps(doc))
    assert secret not in str(info.value)


def test_keyring_load_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read key file"):
        Keyring.load(tmp_path / "none.json")


@pytest.mark.parametrize("version", [0, 2**31, 2**63, -1])
def test_keyring_refuses_versions_the_database_cannot_hold(version: int) -> None:
    doc = json.loads(Keyring.generate().to_json())
    doc["keys"][0]["version"] = doc["primary"] = version
    with pytest.raises(ConfigError, match=r"keys\[0\]\.version must be between 1 and") as e:
        Keyring.from_json(json.dumps(doc))
    assert doc["keys"][0]["key"] not in str(e.value)


def test_keyring_refuses_a_duplicate_version_naming_the_field() -> None:
    doc = json.loads(Keyring.generate().add_version().to_json())
    doc["keys"][1]["version"] = 1
    with pytest.raises(ConfigError, match=r"keys\[1\]\.version 1 appears twice") as e:
        Keyring.from_json(json.dumps(doc))
    assert all(k["key"] not in str(e.value) for k in doc["keys"])


def test_keyring_load_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_bytes(b'{"format": "\xff\xfe"}')
    with pytest.raises(ConfigError, match="keyring: not UTF-8 text"):
        Keyring.load(path)


def test_keyring_failed_save_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save of the same key file that fails at its rename (review: the failing save
    went to another path, so the old file was never at risk)."""
    path = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.save(path)
    before = path.read_bytes()

    def refused(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(OSError):
        ring.add_version().save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keyring.json"]
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "x").write_text("")  # a non-empty directory where the key file should be
    monkeypatch.undo()
    with pytest.raises(OSError):
        ring.add_version().save(blocked)
    assert (blocked / "x").exists() and not list(tmp_path.glob(".*keyring-*"))


def test_keyring_save_names_its_part_after_the_key_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part says which key file it belongs to, beside the file a symbolic link names."""
    (tmp_path / "shared").mkdir()
    link = tmp_path / "node.json"
    link.symlink_to(tmp_path / "shared" / "keyring.json")
    renamed: list[tuple[Path, Path]] = []
    replace = os.replace

    def spy(src: Path, dst: Path) -> None:
        renamed.append((Path(src), Path(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    Keyring.generate().save(link)
    [(part, final)] = renamed
    assert final == (tmp_path / "shared" / "keyring.json").resolve()
    assert part.parent == final.parent
    assert re.fullmatch(r"\.keyring\.json\.keyring-[0-9a-f]{16}", part.name)


def write_part(folder: Path, name: str, ring: Keyring) -> Path:
    """A part file as a save killed before its rename leaves it."""
    part = folder / name
    part.write_text(ring.to_json())
    part.chmod(0o600)
    return part


def test_keyring_remove_stale_parts_removes_this_key_files_parts_only(tmp_path: Path) -> None:
    key_file, other = tmp_path / "keyring.json", tmp_path / "keyring.json.keyring-0123456789abcdef"
    ring = Keyring.generate()
    ring.save(key_file)
    ring.save(other)
    with locked(key_file):
        mine = [write_part(tmp_path, new_part_name(key_file), ring) for _ in range(2)]
        theirs = write_part(tmp_path, new_part_name(other), ring)  # its name starts as ours
        lookalike = write_part(tmp_path, ".keyring.json.keyring-notapart", ring)
        done = remove_stale_parts(key_file)
    assert done.removed == tuple(sorted(p.name for p in mine))
    assert (done.failed, done.left, done.unlisted, done.unsynced) == ((), (), None, None)
    assert not any(p.exists() for p in mine)
    assert theirs.exists() and lookalike.exists()
    assert Keyring.load(key_file) == ring and Keyring.load(other) == ring
    assert (tmp_path / "keyring.json.lock").exists()


@pytest.mark.parametrize("name", ["k" * NAME_MAX, "密钥" * 42 + "k", "k" * 229 + ".json"])
def test_keyring_a_key_file_with_the_longest_name_saves_locks_and_clears_its_parts(
    tmp_path: Path, name: str
) -> None:
    """Any name the file system takes works: where ``.<name>.keyring-<16 hex>`` or
    ``<name>.lock`` would be over 255 bytes, the name is shortened with a hash of it, cut on
    a byte (the second name's characters are three bytes: one is cut)."""
    key_file = tmp_path / name
    twin = tmp_path / (name[:-1] + ("x" if name[-1] != "x" else "y"))  # same first bytes
    ring = Keyring.generate()
    with locked(key_file):
        ring.save(key_file)
        twin_part = write_part(tmp_path, new_part_name(twin), ring)
        parts = [write_part(tmp_path, new_part_name(key_file), ring) for _ in range(2)]
        done = remove_stale_parts(key_file)
    assert Keyring.load(key_file) == ring
    assert done.removed == tuple(sorted(p.name for p in parts)) and not done.failed
    assert twin_part.exists()
    for p in (*parts, twin_part):
        assert len(os.fsencode(p.name)) <= NAME_MAX
    assert sorted(os.fsencode(p.name) for p in tmp_path.iterdir()) == sorted(
        os.fsencode(p.name) for p in (key_file, twin_part, *tmp_path.glob("*.lock"))
    )


def test_keyring_a_key_file_named_as_a_long_name_s_stand_in_leaves_its_parts_and_lock(
    tmp_path: Path,
) -> None:
    """Review: a key file named with the first bytes of a long one's name, ``~`` and the
    16 hex digits standing for it took the long one's parts and lock."""
    long = tmp_path / ("k" * NAME_MAX)
    ring = Keyring.generate()
    ring.save(long)
    part = write_part(tmp_path, new_part_name(long), ring)
    stand_in = tmp_path / part.name[1 : -len(".keyring-") - 16]
    ring.save(stand_in)
    with locked(stand_in):
        assert remove_stale_parts(stand_in) == StaleParts()
    with locked(long):
        pass
    assert part.exists()
    assert len(list(tmp_path.glob("*.lock"))) == 2  # one each


def test_keyring_remove_stale_parts_leaves_a_key_file_named_like_a_part(
    tmp_path: Path,
) -> None:
    """Review: a key file named ``.keyring-abcdefgh`` (an old-form part's name) or as
    another key file's part was deleted by that key file's keygen; one that has a lock of
    its own is a key file and is left."""
    key_file = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.save(key_file)
    named = [tmp_path / ".keyring-abcdefgh", tmp_path / new_part_name(key_file)]
    for other in named:
        with locked(other):
            ring.save(other)
        os.utime(other, (0, 0))
    with locked(key_file):
        assert remove_stale_parts(key_file, FakeClock()) == StaleParts()
    assert all(Keyring.load(other) == ring for other in named)


def test_keyring_remove_stale_parts_follows_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "keyring.json"
    link = tmp_path / "keyring.json"
    link.symlink_to(target)
    Keyring.generate().save(link)
    part = write_part(target.parent, new_part_name(target), Keyring.generate())
    assert remove_stale_parts(link).removed == (part.name,)
    assert link.is_symlink() and not part.exists()


def test_keyring_remove_stale_parts_takes_an_old_form_part_once_no_save_can_be_writing_it(
    tmp_path: Path,
) -> None:
    """``.keyring-*`` (before parts named their key file) may be another key file's, saved
    by an older riskd under another lock: removed only once unwritten for 10 minutes."""
    key_file = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.save(key_file)
    clock = FakeClock()
    old = write_part(tmp_path, ".keyring-abcd_123", ring)
    young = write_part(tmp_path, ".keyring-young123", ring)
    os.utime(old, (clock.now() - STALE_PART_S, clock.now() - STALE_PART_S))
    os.utime(young, (clock.now() - 5, clock.now() - 5))
    with locked(key_file):
        done = remove_stale_parts(key_file, clock)
    assert (done.removed, done.left) == ((old.name,), (young.name,))
    assert not old.exists() and young.exists()


def test_keyring_remove_stale_parts_reports_a_part_it_cannot_remove_and_goes_on(
    tmp_path: Path,
) -> None:
    key_file = tmp_path / "keyring.json"
    ring = Keyring.generate()
    ring.save(key_file)
    stuck = tmp_path / new_part_name(key_file)
    stuck.mkdir()  # unlink refuses a folder, even to root
    part = write_part(tmp_path, new_part_name(key_file), ring)
    with locked(key_file):
        done = remove_stale_parts(key_file)
    assert done.removed == (part.name,)
    assert done.failed == ((stuck.name, os.strerror(errno.EISDIR)),)
    assert stuck.is_dir() and not part.exists()


def test_keyring_remove_stale_parts_of_a_key_file_in_no_folder_does_nothing(
    tmp_path: Path,
) -> None:
    assert remove_stale_parts(tmp_path / "none" / "keyring.json") == StaleParts()
