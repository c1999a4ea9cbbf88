"""Envelope encryption of PII fields under per-subject data keys, with rotation and shredding.

Where it sits: the evidence log (and cases, shop registration data) call
``encrypt`` before anything reaches SQL and ``decrypt`` only on an analyst's
audited request. Each subject (buyer or shop) has a random AES-256 data key,
stored wrapped by the keyring's master key in the ``KeyStore``; field values
are AES-256-GCM under that data key, with subject, record id and field name
bound as associated data, so a ciphertext moved to another record or field
does not decrypt.

Ciphertext layout (bytes)::

    0x01 | data-key generation (4, big-endian) | nonce (12) | ciphertext + tag (16)

The master key version lives with the wrapped data key, so rotation re-wraps
keys without touching a single field ciphertext. ``forget`` destroys every
generation of the subject's data key (a tombstone stays) and its blind-index
entries; a later write starts a new generation.

Unwrapped data keys are cached (bounded size, bounded age), so the hot path is
one AES-GCM per field. Another process's ``forget`` (``riskd pii forget``, a
replica) reaches this cache within ``cache_ttl_s``, except for the batches of
the decision log: ``prepare``/``prepare_in`` check the batch's cached keys
against the key store with one read per batch, so a buyer's orders placed after
the forget start a new generation at once instead of being sealed under the
destroyed key (and lost).

After ``riskd pii keygen`` a process started later wraps new data keys under the
new master version; a vault given ``reload`` (the daemon's, with a key file)
re-reads the keyring when it meets a version it does not know, so it reads and
writes those buyers' data without a restart.
"""

from __future__ import annotations

import os
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from riskd.domain.clock import Clock, SystemClock
from riskd.errors import CryptoError, InvalidArgumentError, RiskdError
from riskd.pii.blind import NORMALIZERS
from riskd.pii.detect import refuse_pii
from riskd.pii.keyring import KEY_BYTES, NONCE_BYTES, MasterKeyProvider, fingerprint
from riskd.pii.keystore import DataKeyRow, KeyStore, ShredResult, SqlKeyStore
from riskd.sql import Database, Tx

FORMAT_V1 = 1
_HEADER = struct.Struct(">BI")
_PREFIX = _HEADER.size + NONCE_BYTES
_TAG_BYTES = 16
_BUYER = NORMALIZERS["buyer"]  # a buyer id as velocity counting and ``forget`` match it

ForgetHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class _Cached:
    generation: int
    aead: AESGCM
    expires: float
    header: bytes


@dataclass(frozen=True, slots=True)
class RotateResult:
    """What ``Vault.rotate`` did: keys re-wrapped, and keys it could not unwrap."""

    rewrapped: int
    unrecoverable: int


class PreparedKeys:
    """Current data keys read or created inside a caller's transaction (``prepare_in``).

    Not cached until that transaction has committed (``Vault.adopt``): a key whose row
    was rolled back must never encrypt anything.
    """

    __slots__ = ("_forgotten", "_fresh", "_keys")

    def __init__(self) -> None:
        self._keys: dict[str, _Cached] = {}
        self._fresh: list[tuple[DataKeyRow, _Cached]] = []
        self._forgotten: dict[str, float] = {}

    def forgotten_at(self, subject_id: str) -> float | None:
        """When the subject's keys were last shredded (``forget``, as read in the
        transaction), None if never: a record of the subject made before then belongs
        to the forgotten data and must not be sealed under the new generation."""
        return self._forgotten.get(subject_id)

    def key(self, subject_id: str) -> _Cached:
        key = self._keys.get(subject_id)
        if key is None:
            raise CryptoError("no data key could be prepared for this subject")
        return key


def _aad(*parts: str) -> bytes:
    """Length-prefixed parts: unambiguous for any ids."""
    return "".join([f"{len(p)}:{p}" for p in parts]).encode()


_FIELD_AAD: dict[str, bytes] = {}


def _field_aad(field: str) -> bytes:
    # Field names are a handful of constants: encode each once.
    aad = _FIELD_AAD.get(field)
    if aad is None:
        aad = _aad(field)
        if len(_FIELD_AAD) < 1024:  # bounded: a caller could pass arbitrary names
            _FIELD_AAD[field] = aad
    return aad


def _forgotten_at(
    wanted: Iterable[str], normalized: Mapping[str, str], latest: Mapping[str, DataKeyRow]
) -> dict[str, float]:
    """When each of ``wanted`` was last forgotten: the later of its own spelling's and its
    normalized spelling's (``normalized``; ``latest``: both read) forget times."""
    out: dict[str, float] = {}
    for subject in wanted:
        rows = (latest.get(subject), latest.get(normalized.get(subject, subject)))
        times = [r.forgotten_at for r in rows if r is not None and r.forgotten_at is not None]
        if times:
            out[subject] = max(times)
    return out


def _dek_aad(subject_id: str, generation: int) -> bytes:
    return b"riskd-dek-v1|" + _aad(subject_id, str(generation))


def _seal(key: _Cached, nonce: bytes, aad_prefix: bytes, field: str, text: str) -> bytes:
    body = key.aead.encrypt(nonce, text.encode(), aad_prefix + _field_aad(field))
    return key.header + nonce + body


def _require(name: str, value: str) -> None:
    if not value:
        raise InvalidArgumentError(name, "must not be empty")


def _require_text(name: str, value: str) -> None:
    """An operator's buyer id or hold reason: blanks alone say nothing (review: ``riskd pii
    hold b-1 --reason " "`` placed a hold no one could explain, and ``forget " "`` reported
    success and wrote a tombstone for a buyer no order can have)."""
    if not value.strip():
        raise InvalidArgumentError(name, "must not be empty")


def bind_keyring(keyring: MasterKeyProvider, keystore: SqlKeyStore) -> bool:
    """Whether ``keyring`` is the one the key store's data was written with; the first
    time, its fingerprint is recorded (the daemon checks this before it starts).

    Another keyring would change every blind index (velocity counters restart) and
    wrap new buyers' data keys under a master key the right keyring cannot unwrap.
    A database written before fingerprints were recorded is recorded too, unless a
    data key under a version the keyring holds fails to unwrap and none unwraps.
    """
    mine = fingerprint(keyring)
    stored = keystore.keyring_fingerprint()
    if stored is None:
        if not _unwraps_any(keyring, keystore.sample_keys()):
            return False
        stored = keystore.record_keyring_fingerprint(mine)
    return stored == mine


def _unwraps_any(keyring: MasterKeyProvider, rows: Iterable[DataKeyRow]) -> bool:
    """True if no row can be tried (none, or all under retired versions) or one unwraps."""
    tried = False
    for row in rows:
        if row.wrapped is None or keyring.is_retired(row.wrapped.version):
            continue
        try:
            keyring.unwrap(row.wrapped, _dek_aad(row.subject_id, row.generation))
        except CryptoError:
            tried = True
            continue
        return True
    return not tried


class Vault:
    """Encrypt, decrypt, rotate and forget PII fields.

    >>> import tempfile, os
    >>> from riskd.sql import Database
    >>> from riskd.pii.keyring import Keyring
    >>> from riskd.pii.keystore import SqlKeyStore
    >>> store = SqlKeyStore(Database(os.path.join(tempfile.mkdtemp(), "k.db")))
    >>> v = Vault(Keyring.generate(), store)
    >>> ct = v.encrypt("buyer-1", "order-9", "phone", "13812345678")
    >>> v.decrypt("buyer-1", "order-9", "phone", ct)
    '13812345678'
    """

    def __init__(
        self,
        keyring: MasterKeyProvider,
        keystore: KeyStore,
        *,
        clock: Clock | None = None,
        cache_ttl_s: float = 60.0,
        cache_size: int = 100_000,
        reload: Callable[[], MasterKeyProvider] | None = None,
        reload_interval_s: float = 5.0,
    ) -> None:
        """``reload``: how to read the keyring again (the daemon passes ``Keyring.load`` of
        its key file). A data key wrapped under a master version this keyring does not
        know (another process ran ``riskd pii keygen`` and started after it, so wraps new
        buyers' keys under the new version) then makes the vault re-read the keyring, at
        most once per ``reload_interval_s``, and unwrap again. Without it (a keyring from
        ``RISKD_KEYRING``) such keys stay unreadable here until this process restarts."""
        self.keyring = keyring
        self._reload = reload
        self._reload_interval = reload_interval_s
        self._next_reload = float("-inf")
        self._reload_lock = threading.Lock()
        self.keystore = keystore
        self._clock = clock or SystemClock()
        self._ttl = cache_ttl_s
        self._size = cache_size
        # both in the order entries were cached (``_current`` also moves a hit to the end),
        # so the expired ones are found at the front (``_evict``)
        self._current: OrderedDict[str, _Cached] = OrderedDict()
        self._by_gen: OrderedDict[tuple[str, int], _Cached] = OrderedDict()
        self._lock = threading.Lock()
        self._hooks: list[ForgetHook] = []

    # -- fields ---------------------------------------------------------------------------

    def encrypt(self, subject_id: str, record_id: str, field: str, plaintext: str) -> bytes:
        """AES-256-GCM of ``plaintext`` under the subject's current data key."""
        _require("record_id", record_id)
        _require("field", field)
        key = self._current_key(subject_id)
        nonce = os.urandom(NONCE_BYTES)
        return _seal(key, nonce, _aad(subject_id, record_id), field, plaintext)

    def encrypt_fields(
        self,
        subject_id: str,
        record_id: str,
        fields: Mapping[str, str],
        keys: PreparedKeys | None = None,
    ) -> dict[str, bytes]:
        """Encrypt several fields of one record with one key lookup (the scoring hot path).

        With ``keys`` (from ``prepare_in``) the subject's key comes from there only.
        """
        _require("record_id", record_id)
        if keys is None:
            key = self._current_key(subject_id)
        else:
            _require("subject_id", subject_id)
            key = keys.key(subject_id)
        prefix = _aad(subject_id, record_id)
        # One random read for every nonce of the record (96 random bits each).
        nonces = os.urandom(NONCE_BYTES * len(fields))
        return {
            name: _seal(key, nonces[i * NONCE_BYTES : (i + 1) * NONCE_BYTES], prefix, name, text)
            for i, (name, text) in enumerate(fields.items())
        }

    def decrypt(self, subject_id: str, record_id: str, field: str, ciphertext: bytes) -> str:
        """The plaintext of one field.

        Raises:
            CryptoError: malformed ciphertext, shredded or unknown data key, retired master
                key, or a ciphertext moved to another subject, record or field.
        """
        if len(ciphertext) < _PREFIX + _TAG_BYTES:
            raise CryptoError(f"ciphertext of field {field!r} is too short")
        fmt, generation = _HEADER.unpack_from(ciphertext)
        if fmt != FORMAT_V1:
            raise CryptoError(f"ciphertext of field {field!r} has unknown format {fmt}")
        key = self._key_for(subject_id, generation)
        nonce = ciphertext[_HEADER.size : _PREFIX]
        try:
            plain = key.aead.decrypt(
                nonce, ciphertext[_PREFIX:], _aad(subject_id, record_id, field)
            )
        except InvalidTag:
            raise CryptoError(
                f"ciphertext of field {field!r} does not authenticate for this record "
                "(moved to another record or field, or altered)"
            ) from None
        return plain.decode()

    # -- data keys ------------------------------------------------------------------------

    def _current_key(self, subject_id: str) -> _Cached:
        now = self._clock.monotonic()
        with self._lock:
            hit = self._current.get(subject_id)
            if hit is not None and hit.expires > now:
                self._current.move_to_end(subject_id)
                return hit
        _require("subject_id", subject_id)
        row = self.keystore.latest(subject_id)
        if row is None or self._spent(row):
            row = self._new_generation(subject_id, 1 if row is None else row.generation + 1)
        return self._remember(row, now, current=True)

    def prepare(self, subject_ids: Iterable[str]) -> None:
        """Load or create the current data keys of many subjects at once (a batch's writer).

        Same outcome as ``_current_key`` for each subject, with one read of their latest
        generations and ONE transaction creating every missing (or shredded -> next)
        generation; the stored rows are what gets cached, so a race with another writer
        converges on its key. The read covers the subjects whose key is cached too: a
        cached key that another process has shredded since (``riskd pii forget``) is
        dropped and replaced, so ``encrypt``/``encrypt_fields`` right after this never
        seal a forgotten buyer's new order under the destroyed key. Subjects whose key
        cannot be prepared here (empty id, an unrecoverable wrapped key) are left to
        ``encrypt``/``encrypt_fields``, which raise as they always do.
        """
        now = self._clock.monotonic()
        wanted = [s for s in dict.fromkeys(subject_ids) if s]
        if not wanted:
            return
        latest = self.keystore.latest_many(wanted, None)
        valid = self._still_current(wanted, latest, now)
        missing = [s for s in wanted if s not in valid]
        if not missing:
            return
        for row in self._stored_keys(missing, None, latest):
            try:
                self._remember(row, now, current=True)
            except CryptoError:  # e.g. wrapped under a retired master key: encrypt raises it
                continue

    def _still_current(
        self, wanted: list[str], latest: Mapping[str, DataKeyRow], now: float
    ) -> dict[str, _Cached]:
        """The cached current keys of ``wanted`` that are still their stored latest generation.

        A cached key whose generation was shredded by another process (or is no longer
        the latest) is dropped from the cache here, with the subject's other cached
        generations; the caller prepares it again from ``latest``.
        """
        valid: dict[str, _Cached] = {}
        gone: list[str] = []
        with self._lock:
            for s in wanted:
                hit = self._current.get(s)
                if hit is None or hit.expires <= now:
                    continue
                row = latest.get(s)
                if row is None or row.shredded or row.generation != hit.generation:
                    gone.append(s)
                else:
                    valid[s] = hit
                    self._current.move_to_end(s)
        for s in gone:
            self._drop(s)
        return valid

    def _stored_keys(
        self, missing: list[str], tx: Tx | None, latest: Mapping[str, DataKeyRow]
    ) -> list[DataKeyRow]:
        """The current key rows of ``missing`` (``latest``: their latest rows, as read by the
        caller), creating (in one transaction, or in ``tx``) the generations they lack;
        rows forgotten again since they were read are left out (the slow path decides
        for them)."""
        ready = [r for s in missing if (r := latest.get(s)) is not None and not self._spent(r)]
        new = [
            (s, 1 if row is None else row.generation + 1)
            for s in missing
            if self._spent(row := latest.get(s))
        ]
        if new:
            keys = [
                (s, g, self.keyring.wrap(secrets.token_bytes(KEY_BYTES), _dek_aad(s, g)))
                for s, g in new
            ]
            ready.extend(self.keystore.create_many(keys, self._clock.now(), tx).values())
        return [row for row in ready if not row.shredded]

    def prepare_in(self, tx: Tx, subject_ids: Iterable[str]) -> PreparedKeys:
        """``prepare`` inside the caller's transaction ``tx`` on the keystore's database.

        One read in ``tx`` of the subjects' latest generations, cached or not, checks that
        each cached key is still current: one shredded by another process's ``forget``
        (which the cache would otherwise notice only after ``cache_ttl_s``) is dropped
        and the subject starts its next generation like a new buyer, so the batch's new
        orders stay revealable. The keys it creates are written by ``tx`` and commit
        with the caller's own rows (a decision-log batch and the new buyers' keys: one
        transaction, not two). Keys it read or created are cached only when the caller
        passes the result to ``adopt`` after the commit. The same read tells when each
        subject was last forgotten (``PreparedKeys.forgotten_at``), under its own spelling
        or the normalized one, which every forget marks (``SqlKeyStore.shred``): the
        decision log stores no ciphertext or blind index for a record appended before
        that, also under a spelling the forget could not find (nothing stored yet). Subjects
        whose key cannot be had (an empty id, a key wrapped under a retired master key)
        are left out: ``encrypt_fields`` with the result raises ``CryptoError`` for them.
        """
        now = self._clock.monotonic()
        out = PreparedKeys()
        wanted = [s for s in dict.fromkeys(subject_ids) if s]
        if not wanted:
            return out
        normalized = {s: n for s in wanted if (n := _BUYER(s)) and n != s}
        latest = self.keystore.latest_many([*wanted, *normalized.values()], tx)
        out._forgotten = _forgotten_at(wanted, normalized, latest)
        out._keys.update(self._still_current(wanted, latest, now))
        missing = [s for s in wanted if s not in out._keys]
        if not missing:
            return out
        for row in self._stored_keys(missing, tx, latest):
            try:
                entry = self._unwrapped(row, now)
            except CryptoError:
                continue
            out._keys[row.subject_id] = entry
            out._fresh.append((row, entry))
        return out

    def keeps_keys_in(self, db: Database) -> bool:
        """Whether the data keys live in ``db`` (so ``prepare_in`` can use its transactions)."""
        return getattr(self.keystore, "db", None) is db

    def adopt(self, keys: PreparedKeys) -> None:
        """Cache the keys of a ``prepare_in`` whose transaction has committed."""
        for row, entry in keys._fresh:
            self._cache(row, entry, current=True)

    def _spent(self, row: DataKeyRow | None) -> bool:
        """Whether a subject's latest key row cannot seal anything new, so its next write
        starts the next generation: none yet, shredded (``forget``), or wrapped under a
        master key version the keyring says is retired (its data key is lost; what it
        sealed stays unreadable). A version merely unknown here is not spent: a newer
        keyring holds it (re-read with ``reload``; else ``CryptoError`` when unwrapping)."""
        if row is None or row.wrapped is None:
            return True
        return self.keyring.is_retired(row.wrapped.version)

    def _key_for(self, subject_id: str, generation: int) -> _Cached:
        now = self._clock.monotonic()
        with self._lock:
            hit = self._by_gen.get((subject_id, generation))
            if hit is not None and hit.expires > now:
                return hit
        row = self.keystore.get(subject_id, generation)
        if row is None:
            raise CryptoError("no data key for this ciphertext (unknown subject or generation)")
        if row.shredded:
            raise CryptoError("data key destroyed: this subject's personal data was forgotten")
        return self._remember(row, now, current=False)

    def _new_generation(self, subject_id: str, generation: int) -> DataKeyRow:
        dek = secrets.token_bytes(KEY_BYTES)
        wrapped = self.keyring.wrap(dek, _dek_aad(subject_id, generation))
        return self.keystore.create(subject_id, generation, wrapped, self._clock.now())

    def _remember(self, row: DataKeyRow, now: float, *, current: bool) -> _Cached:
        return self._cache(row, self._unwrapped(row, now), current=current)

    def _unwrapped(self, row: DataKeyRow, now: float) -> _Cached:
        assert row.wrapped is not None
        aad = _dek_aad(row.subject_id, row.generation)
        keyring = self.keyring
        try:
            dek = keyring.unwrap(row.wrapped, aad)
        except CryptoError:
            if keyring.is_retired(row.wrapped.version) or not self._reloaded(keyring):
                raise
            dek = self.keyring.unwrap(row.wrapped, aad)
        header = _HEADER.pack(FORMAT_V1, row.generation)
        return _Cached(row.generation, AESGCM(dek), now + self._ttl, header)

    def _reloaded(self, seen: MasterKeyProvider) -> bool:
        """Re-read the keyring (``reload``) after an unwrap under ``seen`` failed for a
        version it does not hold: True when a newer keyring is in place (read now, or by
        another thread since ``seen``). At most once per ``reload_interval_s``; a keyring
        that cannot be read now keeps the one in use (the caller raises its error)."""
        if self._reload is None:
            return False
        with self._reload_lock:
            if self.keyring is not seen:
                return True
            now = self._clock.monotonic()
            if now < self._next_reload:
                return False
            self._next_reload = now + self._reload_interval
            try:
                fresh = self._reload()
            except RiskdError:
                return False
            self.keyring = fresh
            return True

    def _cache(self, row: DataKeyRow, entry: _Cached, *, current: bool) -> _Cached:
        with self._lock:
            generation = (row.subject_id, row.generation)
            self._by_gen[generation] = entry
            self._by_gen.move_to_end(generation)
            if current:
                self._current[row.subject_id] = entry
                self._current.move_to_end(row.subject_id)
            self._evict()
        return entry

    def _evict(self) -> None:
        """Past ``cache_size`` the oldest go; so do expired keys from the front, as new
        ones are cached (review: kept until the cache was full, ~3 KiB per buyer, up to
        ~300 MiB a process where the docs promise 60 s). A key used after its time is
        unwrapped again and cached anew; one in the middle goes once those before it have."""
        now = self._clock.monotonic()
        for cache in (self._current, self._by_gen):
            while len(cache) > self._size:
                cache.popitem(last=False)
            while cache:
                oldest = next(iter(cache.values()))
                if oldest.expires > now:
                    break
                cache.popitem(last=False)

    def _drop(self, subject_id: str) -> None:
        with self._lock:
            self._current.pop(subject_id, None)
            for key in [k for k in self._by_gen if k[0] == subject_id]:
                del self._by_gen[key]

    # -- rotation -------------------------------------------------------------------------

    def rotate(self, *, batch_size: int = 500) -> RotateResult:
        """Re-wrap every data key not under the primary master key.

        Field ciphertexts are not read or written. A data key that cannot be unwrapped
        (its master version retired or not in the keyring, or altered) is passed by and
        counted in ``unrecoverable``: it cannot block the rotation of the others.
        """
        primary = self.keyring.primary_version
        done = lost = 0
        after: tuple[str, int] | None = None
        while rows := self.keystore.stale(primary, batch_size, after):
            for row in rows:
                assert row.wrapped is not None
                aad = _dek_aad(row.subject_id, row.generation)
                try:
                    dek = self.keyring.unwrap(row.wrapped, aad)
                except CryptoError:
                    lost += 1
                    continue
                done += self.keystore.rewrap(row, self.keyring.wrap(dek, aad))
            after = (rows[-1].subject_id, rows[-1].generation)
        return RotateResult(done, lost)

    # -- crypto-shredding and legal holds -------------------------------------------------

    def add_forget_hook(self, hook: ForgetHook) -> None:
        """Call ``hook(subject_id)`` after each ``forget`` (e.g. to drop other stores' indexes);
        the hook deletes what it holds under every spelling of ``subject_id``."""
        self._hooks.append(hook)

    def forget(self, subject_id: str) -> ShredResult:
        """Destroy the subject's data keys and blind-index entries (PIPL right to deletion).

        Every stored spelling of the id that velocity counting takes for the same buyer
        (``b-77``, ``b-77 ``, ``ｂ-７７``) is forgotten with it; each hook is called once,
        with ``subject_id``, and matches the spellings in its own tables the same way
        (``riskd.pii.keystore.spellings``). Decisions and ledger entries stay; only the
        personal data becomes unreadable. Last, the key store's database is checkpointed
        (SQLite: the deleted bytes leave the file and its write-ahead log, unless a reader
        held that up: ``ShredResult.checkpointed`` says).

        Raises:
            InvalidArgumentError: ``subject_id`` is empty or blank; nothing changes.
            FailedPreconditionError: the subject is under legal hold; nothing changes.
        """
        _require_text("subject_id", subject_id)
        result = self.keystore.shred(subject_id, self._clock.now())
        try:
            for subject in result.subjects or (subject_id,):
                self._drop(subject)
            for hook in self._hooks:
                hook(subject_id)
        finally:  # after the hooks' deletes too; also when one failed
            checkpointed = self.keystore.checkpoint()
        return replace(result, checkpointed=checkpointed)

    def forgotten(self, subject_id: str, ciphertext: bytes | None = None) -> bool:
        """True when ``forget`` destroyed the subject's data keys, read from the key store.

        With ``ciphertext``: when the data key generation that sealed it was destroyed
        (also by another process whose ``forget`` this replica's cache has not seen
        yet; the cached key is dropped then). Without: when any generation was (the
        first stays as a tombstone, while a later write may have started a new one).
        """
        generation = 1
        if ciphertext is not None and len(ciphertext) >= _HEADER.size:
            generation = _HEADER.unpack_from(ciphertext)[1]
        row = self.keystore.get(subject_id, generation)
        shredded = row is not None and row.shredded
        if shredded:
            self._drop(subject_id)
        return shredded

    def hold(self, subject_id: str, reason: str) -> None:
        """Place a legal hold for ``reason``: ``forget`` is refused until every hold of the
        subject is released (each reason is its own hold; a hold under one spelling of
        the id holds them all).

        Raises:
            InvalidArgumentError: an empty or blank ``subject_id`` or ``reason``, or a
                ``reason`` that holds personal data (``refuse_pii``); nothing is held.
        """
        _require_text("subject_id", subject_id)
        _require_text("reason", reason)
        refuse_pii("reason", reason)  # stored in clear: ``holds`` and release's refusal list it
        self.keystore.hold(subject_id, reason, self._clock.now())

    def release_hold(self, subject_id: str, reason: str | None = None) -> bool:
        """Lift the legal hold placed for ``reason``; False if there was none.

        Without ``reason``: the subject's only hold. ``forget`` stays refused while any
        other hold remains.

        Raises:
            FailedPreconditionError: no ``reason`` and several holds (their reasons are
                listed); nothing changes.
        """
        _require("subject_id", subject_id)
        return self.keystore.release(subject_id, reason)

    def holds(self, subject_id: str) -> list[str]:
        """The reasons of the subject's legal holds, sorted (empty: ``forget`` may run)."""
        return self.keystore.holds(subject_id)

    # -- blind-index entries --------------------------------------------------------------

    def record_index(self, subject_id: str, digests: Mapping[str, str]) -> None:
        """Remember which blind-index digests (by field type) belong to a subject.

        ``forget`` deletes them; ``subjects_for`` answers exact-match lookups.
        """
        _require("subject_id", subject_id)
        self.keystore.add_index_entries((subject_id, ft, d) for ft, d in digests.items())

    def subjects_for(self, field_type: str, digest: str) -> list[str]:
        """Subjects whose recorded ``field_type`` digest equals ``digest``."""
        return self.keystore.subjects_for(field_type, digest)
