"""Helpers the feature-store tests share: the Redis URL and cleanup (own Redis: tests.own_redis)."""

from __future__ import annotations

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"
# two shards: two databases of the same Redis (the sharding does not care where they live)
SHARD_URLS = (REDIS_URL, "redis://127.0.0.1:6379/1")


def delete_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix`` (a test's own namespace)."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=10_000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])
