"""Versioned master keys: the root of every PII key riskd holds.

Where it sits: the ``Vault`` wraps each subject's data key with the keyring's
primary master key, and the ``BlindIndexer`` derives its per-field-type HMAC
keys from the keyring's index secret. Nothing else touches key material.

A keyring is a JSON document, kept in a file (mode 0600) or in an environment
variable::

    {"format": "riskd-keyring-v1",
     "primary": 2,
     "index_secret": "<base64, 32 bytes>",
     "keys": [{"version": 1, "state": "retired"},
              {"version": 2, "state": "active", "key": "<base64, 32 bytes>"}]}

Rotation adds a version and makes it primary (new data keys are wrapped under
it); ``Vault.rotate`` re-wraps old data keys; ``retire`` then destroys an old
version's material, after which anything still wrapped under it fails with a
``CryptoError`` that names the version. The index secret is never rotated with
the master keys: blind indexes must stay equal across rotations, or velocity
counters and the link graph would stop matching.

A KMS plugs in by implementing ``MasterKeyProvider`` (``wrap``/``unwrap`` run
remotely; the index keys are derived once at start-up and held in memory).

A save writes the document to a part file beside the key file, named after it
(``.<key file name>.keyring-<16 hex digits>``, the name shortened where it would not
fit: ``riskd.atomicfile.sibling_name``), then renames it over the key file. A
process killed in between leaves that part, master keys in it (a version retired since
among them): ``remove_stale_parts``, run under ``locked`` by every load-modify-save of
the key file (``riskd pii keygen`` and ``retire``), deletes it.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from riskd import atomicfile
from riskd.domain.clock import Clock, SystemClock
from riskd.errors import ConfigError, CryptoError

FORMAT = "riskd-keyring-v1"
KEY_BYTES = 32
NONCE_BYTES = 12
ENV_VAR = "RISKD_KEYRING"
MAX_VERSION = 2**31 - 1  # master_version is an SQL INTEGER column
_INDEX_INFO = b"riskd blind index v1\x00"
_FINGERPRINT_KEY = "\x00keyring fingerprint"  # never a field type (NORMALIZERS' names)
_FINGERPRINT_LABEL = b"riskd keyring fingerprint v1"
PART_INFIX = ".keyring-"  # a part file: "." + the key file's name + this + 16 hex digits
STALE_PART_S = 600.0
"""How long an old-form part file (``.keyring-*``, which names no key file) must have gone
unwritten before ``remove_stale_parts`` takes it for a leftover."""
_OLD_PART = re.compile(r"\.keyring-[a-z0-9_]{8}")  # tempfile's names, before parts named a key file
_PART_RANDOM = 16  # hex digits after PART_INFIX


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key encrypted under one master key version."""

    version: int
    blob: bytes


class MasterKeyProvider(Protocol):
    """What the ``Vault`` and the ``BlindIndexer`` need from a keyring (or a KMS)."""

    @property
    def primary_version(self) -> int:
        """The version new data keys are wrapped under."""
        ...

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        """Encrypt ``key`` under the primary master key, bound to ``aad``."""
        ...

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        """Decrypt a data key; ``CryptoError`` if its version is retired/unknown or it was moved."""
        ...

    def derive_index_key(self, field_type: str) -> bytes:
        """The HMAC key of one blind-index field type (stable across rotations)."""
        ...

    def is_retired(self, version: int) -> bool:
        """Whether ``version``'s material was destroyed (False for a version not known here:
        it may be one a newer keyring added, not yet loaded by this process)."""
        ...


@dataclass(frozen=True, slots=True)
class MasterKey:
    """One version of the master key; ``material`` is empty once retired."""

    version: int
    material: bytes = field(default=b"", repr=False)

    @property
    def retired(self) -> bool:
        return not self.material


@dataclass(frozen=True, slots=True)
class Keyring:
    """Versioned AES-256 master keys plus the blind-index secret (immutable).

    >>> ring = Keyring.generate()
    >>> ring = ring.add_version()
    >>> ring.primary_version, ring.versions
    (2, (1, 2))
    >>> w = ring.wrap(b"k" * 32, b"aad")
    >>> ring.unwrap(w, b"aad") == b"k" * 32
    True
    """

    keys: Mapping[int, MasterKey] = field(repr=False)
    primary: int
    index_secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        key = self.keys.get(self.primary)
        if key is None or key.retired:
            raise ConfigError(f"keyring: primary version {self.primary} has no active key")
        if len(self.index_secret) != KEY_BYTES:
            raise ConfigError("keyring: index_secret must be 32 bytes")

    # -- construction -----------------------------------------------------------------

    @classmethod
    def generate(cls) -> Keyring:
        """A fresh keyring with one master key (version 1) and a new index secret."""
        return cls({1: MasterKey(1, secrets.token_bytes(KEY_BYTES))}, 1, secrets.token_bytes(32))

    def add_version(self) -> Keyring:
        """A copy with a new master key version, made primary (step one of rotation)."""
        version = max(self.keys) + 1
        if version > MAX_VERSION:
            raise ConfigError(f"keyring: no master key version left after {MAX_VERSION}")
        keys = {**self.keys, version: MasterKey(version, secrets.token_bytes(KEY_BYTES))}
        return replace(self, keys=keys, primary=version)

    def retire(self, version: int) -> Keyring:
        """A copy with ``version``'s material destroyed; the primary cannot be retired."""
        if version not in self.keys:
            raise ConfigError(f"keyring: no master key version {version}")
        if version == self.primary:
            raise ConfigError(f"keyring: version {version} is primary; add a new version first")
        return replace(self, keys={**self.keys, version: MasterKey(version)})

    @property
    def versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    @property
    def active_versions(self) -> tuple[int, ...]:
        return tuple(v for v in self.versions if not self.keys[v].retired)

    # -- MasterKeyProvider --------------------------------------------------------------

    @property
    def primary_version(self) -> int:
        return self.primary

    def wrap(self, key: bytes, aad: bytes) -> WrappedKey:
        nonce = os.urandom(NONCE_BYTES)
        blob = nonce + AESGCM(self.keys[self.primary].material).encrypt(nonce, key, aad)
        return WrappedKey(self.primary, blob)

    def unwrap(self, wrapped: WrappedKey, aad: bytes) -> bytes:
        master = self.keys.get(wrapped.version)
        if master is None:
            raise CryptoError(f"master key version {wrapped.version} is not in the keyring")
        if master.retired:
            raise CryptoError(
                f"master key version {wrapped.version} is retired; data keys wrapped under it "
                "can no longer be unwrapped (run `riskd pii rotate` before retiring a version)"
            )
        nonce, body = wrapped.blob[:NONCE_BYTES], wrapped.blob[NONCE_BYTES:]
        try:
            return AESGCM(master.material).decrypt(nonce, body, aad)
        except InvalidTag:
            raise CryptoError("wrapped data key does not authenticate (moved or altered)") from None

    def is_retired(self, version: int) -> bool:
        key = self.keys.get(version)
        return key is not None and key.retired

    def derive_index_key(self, field_type: str) -> bytes:
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=_INDEX_INFO + field_type.encode()
        )
        return hkdf.derive(self.index_secret)

    # -- persistence --------------------------------------------------------------------

    def to_json(self) -> str:
        """The keyring document (contains secrets: write it only to a 0600 file or a vault)."""
        keys: list[dict[str, Any]] = []
        for v in self.versions:
            k = self.keys[v]
            entry: dict[str, Any] = {"version": v, "state": "retired" if k.retired else "active"}
            if not k.retired:
                entry["key"] = _b64(k.material)
            keys.append(entry)
        doc = {
            "format": FORMAT,
            "primary": self.primary,
            "index_secret": _b64(self.index_secret),
            "keys": keys,
        }
        return json.dumps(doc, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Keyring:
        """Parse a keyring document; ``ConfigError`` names the bad field (never a secret)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError("keyring: not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(f"keyring: format must be {FORMAT!r}")
        keys: dict[int, MasterKey] = {}
        for i, entry in enumerate(_field(doc, "keys", list)):
            version, key = _parse_key(i, entry)
            if version in keys:
                raise ConfigError(f"keyring: keys[{i}].version {version} appears twice")
            keys[version] = key
        if not keys:
            raise ConfigError("keyring: keys is empty")
        secret = _unb64(_field(doc, "index_secret", str), "index_secret")
        return cls(keys, _field(doc, "primary", int), secret)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a key file."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError("keyring: not UTF-8 text") from None
        except OSError as e:
            raise ConfigError(f"keyring: cannot read key file {path}: {e.strerror}") from None

    @classmethod
    def from_env(cls, var: str = ENV_VAR, environ: Mapping[str, str] | None = None) -> Keyring:
        """Read the keyring document from an environment variable."""
        text = (os.environ if environ is None else environ).get(var, "")
        if not text:
            raise ConfigError(f"keyring: environment variable {var} is not set")
        return cls.from_json(text)

    def save(self, path: Path) -> None:
        """Write atomically to ``path`` with mode 0600, durable once this returns.

        The document goes to a part file beside ``path`` (``new_part_name``: named
        after the key file; removed if anything fails), is fsynced, renamed over
        ``path``, and the directory is fsynced so the rename survives a crash
        (``riskd.atomicfile``; a directory that cannot be synced raises ``OSError``). A
        process killed before the rename leaves the part: ``remove_stale_parts`` clears
        it. Concurrent writers must serialise load-modify-save themselves (``riskd pii``
        holds ``locked(path)``): the rename is atomic, the read-modify-write around it
        is not. A symbolic link (a key file on shared storage) is followed: its target
        is replaced, the link kept.
        """
        path = _resolved(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomicfile.write(
            path,
            self.to_json().encode("utf-8"),
            mode=0o600,
            part_name=new_part_name(path),
            folder_sync_required=True,
        )


def fingerprint(keyring: MasterKeyProvider) -> str:
    """What identifies a keyring across rotations: an HMAC of a fixed label under a key
    derived from the index secret (hex, 128 bits), so it reveals no key.

    Only the index secret goes in: ``add_version`` and ``retire`` keep it (and the blind
    indexes), while another keyring's differs. The database records it on first use
    (``riskd.pii.vault.bind_keyring``).

    >>> ring = Keyring.generate()
    >>> fingerprint(ring) == fingerprint(ring.add_version().retire(1))
    True
    >>> fingerprint(ring) == fingerprint(Keyring.generate())
    False
    """
    key = keyring.derive_index_key(_FINGERPRINT_KEY)
    return hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:32]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the key file ``path`` (a sibling ``<name>.lock`` file,
    shortened as ``riskd.atomicfile.sibling_name`` says where the name is too long).

    Wrap every load-modify-save of a key file in it: two ``riskd pii keygen`` run at
    once would otherwise both read version n and both write their own n+1, one key
    lost (and data keys wrapped under it unreadable). ``flock`` locks are released
    when the process dies, so a killed command leaves no stale lock. The lock sits
    beside the file a symbolic link ``path`` points to, so every host that links to
    one shared key file takes the same lock (where the storage honours ``flock``).
    """
    path = _resolved(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_file(path), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def new_part_name(path: Path) -> str:
    """A fresh name for a part file of the key file ``path`` (no symbolic link followed:
    pass the file itself), ``.<key file name>.keyring-<16 hex digits>``: it names the one
    key file it belongs to, since the 25 characters after the name are the same in every
    part (two key files in one folder never take each other's parts). A name too long
    for that is shortened as ``riskd.atomicfile.sibling_name`` says.

    >>> new_part_name(Path("/etc/riskd/keyring.json"))[:22]
    '.keyring.json.keyring-'
    """
    return _part_stem(path) + secrets.token_hex(_PART_RANDOM // 2)


def _part_stem(path: Path) -> str:
    """What every part file of the key file ``path`` starts with."""
    return atomicfile.sibling_name(path, ".", PART_INFIX, reserve=_PART_RANDOM)


def _lock_file(path: Path) -> Path:
    """The lock file of the key file ``path``."""
    return path.with_name(atomicfile.sibling_name(path, "", ".lock"))


@dataclass(frozen=True, slots=True)
class StaleParts:
    """What ``remove_stale_parts`` did, by part file name (never a file's content)."""

    removed: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    """Parts that could not be removed: (name, the system's reason)."""
    left: tuple[str, ...] = ()
    """Old-form parts written in the last ``STALE_PART_S``: a save may be writing them."""
    unlisted: str | None = None
    """Why the folder could not be listed (nothing removed then)."""
    unsynced: str | None = None
    """Why the folder could not be synced after removing (a crash may bring them back)."""


def remove_stale_parts(path: Path, clock: Clock | None = None) -> StaleParts:
    """Delete the part files that saves of the key file ``path`` (a symbolic link
    followed) left when killed before their rename, then sync the folder; each one is
    reported by name. Call it only while holding ``locked(path)``.

    A part of the key file's own form (``new_part_name``) is always stale under the lock:
    every save of the key file holds it (``riskd pii keygen`` and ``retire``, and a
    daemon's first start generating ``<data_dir>/keyring.json``), so none of them is
    writing one. Another key file's parts, in the same folder, are left: its own lock
    guards them.

    An old-form part (``.keyring-`` and 8 characters, written by a riskd from before
    parts named their key file) names no key file, so the lock held says nothing about
    its writer: it could be an older riskd saving another key file of the folder right
    now. It is removed once unwritten for ``STALE_PART_S`` (10 minutes: a save is one
    small file and an fsync, so no writer is still at it, whichever key file it was
    saving); a younger one is left and reported, for a later command to remove.

    A file named like a part that has a lock file of its own (``locked``) is a key file
    that was given such a name: it is left. One never locked is taken for a part.
    """
    path = _resolved(path)
    folder = path.parent
    now = (clock or SystemClock()).now()
    own = re.compile(re.escape(_part_stem(path)) + f"[0-9a-f]{{{_PART_RANDOM}}}")
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return StaleParts()
    except OSError as e:
        return StaleParts(unlisted=_why(e))
    removed: list[str] = []
    failed: list[tuple[str, str]] = []
    left: list[str] = []
    for name in names:
        old_form = _OLD_PART.fullmatch(name) is not None
        if name == path.name or not (old_form or own.fullmatch(name)):
            continue
        if _lock_file(folder / name).exists():
            continue  # a key file named like a part: it has been locked, so it is one
        try:
            (removed if _removed(folder / name, old_form, now) else left).append(name)
        except FileNotFoundError:  # an old-form part that another key file's command took
            pass
        except OSError as e:
            failed.append((name, _why(e)))
    unsynced = _synced(folder) if removed else None
    return StaleParts(tuple(removed), tuple(failed), tuple(left), unsynced=unsynced)


def _removed(part: Path, old_form: bool, now: float) -> bool:
    """Delete ``part``, unless it is an old-form part written in the last ``STALE_PART_S``;
    whether it was deleted.

    Raises:
        FileNotFoundError: it is gone already.
        OSError: it could not be deleted.
    """
    if old_form and now - os.lstat(part).st_mtime < STALE_PART_S:
        return False
    part.unlink()
    return True


def _synced(folder: Path) -> str | None:
    """Sync ``folder``; None, or why it could not be synced."""
    try:
        atomicfile.sync_folder(folder)
    except OSError as e:
        return _why(e)
    return None


def _why(e: OSError) -> str:
    """The system's reason for ``e`` (never a path or a file's content)."""
    return e.strerror or type(e).__name__


def _resolved(path: Path) -> Path:
    """``path`` with symbolic links followed (also to a target not written yet)."""
    return Path(os.path.realpath(path))


def _parse_key(i: int, entry: object) -> tuple[int, MasterKey]:
    if not isinstance(entry, dict):
        raise ConfigError(f"keyring: keys[{i}] must be an object")
    version = _field(entry, "version", int, f"keys[{i}].")
    if not 1 <= version <= MAX_VERSION:
        raise ConfigError(f"keyring: keys[{i}].version must be between 1 and {MAX_VERSION}")
    state = _field(entry, "state", str, f"keys[{i}].")
    if state == "retired":
        return version, MasterKey(version)
    if state != "active":
        raise ConfigError(f"keyring: keys[{i}].state must be 'active' or 'retired'")
    material = _unb64(_field(entry, "key", str, f"keys[{i}]."), f"keys[{i}].key")
    if len(material) != KEY_BYTES:
        raise ConfigError(f"keyring: keys[{i}].key must be 32 bytes")
    return version, MasterKey(version, material)


def _field(doc: Mapping[str, Any], name: str, kind: type, prefix: str = "") -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"keyring: {prefix}{name} must be a {kind.__name__}")
    return value


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"keyring: {name} is not valid base64") from None
