"""PII cost of one scoring request: encrypt and blind-index phone, name, ID number, address, device.

Target (issue 5): under 50 µs median on one core. Run::

    taskset -c 0 .venv/bin/python -m pytest benchmarks/test_pii_bench.py --benchmark-only

The data key is cached per subject (as in the server), so the measured path is
one AES-256-GCM per field plus one HMAC-SHA256 per field, with normalization.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from riskd.pii.blind import BlindIndexer, join_address
from riskd.pii.keyring import Keyring
from riskd.pii.keystore import SqlKeyStore
from riskd.pii.vault import Vault
from riskd.sql import Database

FIELDS = {
    "phone": "+86 138-1234-5678",
    "name": "张三丰",
    "id_number": "11010119900307123X",
    "address": join_address("浙江省", "杭州市", "西湖区", "文三路 478 号 华星科技大厦 12 楼"),
    "device": "6D92078A-8246-4BA4-AE5B-76104861E7DC",
}


@pytest.fixture
def pii(tmp_path: Path) -> tuple[Vault, BlindIndexer]:
    ring = Keyring.generate()
    vault = Vault(ring, SqlKeyStore(Database(tmp_path / "bench.db")))
    vault.encrypt_fields("buyer-1", "warm-up", FIELDS)  # the data key is now cached
    return vault, BlindIndexer(ring)


def protect_request(vault: Vault, indexer: BlindIndexer, order_id: str) -> int:
    sealed = vault.encrypt_fields("buyer-1", order_id, FIELDS)
    digests = [indexer.index(field, value) for field, value in FIELDS.items()]
    return len(sealed) + len(digests)


def test_bench_pii_one_scoring_request(benchmark, pii) -> None:  # type: ignore[no-untyped-def]
    vault, indexer = pii
    assert benchmark(protect_request, vault, indexer, "order-1") == 10
    median_us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info["median_us"] = round(median_us, 2)
    assert median_us < 50, f"median {median_us:.1f} µs exceeds the 50 µs budget"


def test_bench_pii_encrypt_only(benchmark, pii) -> None:  # type: ignore[no-untyped-def]
    vault, _ = pii
    benchmark(vault.encrypt_fields, "buyer-1", "order-1", FIELDS)


def test_bench_pii_index_only(benchmark, pii) -> None:  # type: ignore[no-untyped-def]
    _, indexer = pii
    benchmark(lambda: [indexer.index(f, v) for f, v in FIELDS.items()])
