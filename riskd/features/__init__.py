"""Velocity counters and distinct counts over sliding windows: in-process and Redis.

``store`` holds the contract (``Observation``, the ``FeatureStore`` protocol);
``memory`` the embedded single-node backend; ``redis_store`` the backend that
replicas share. Both pass one contract suite (``tests/features``).
"""

from riskd.features.memory import InProcessFeatureStore, StoreSize
from riskd.features.redis_store import RedisFeatureStore
from riskd.features.store import FeatureStore, Observation

__all__ = [
    "FeatureStore",
    "InProcessFeatureStore",
    "Observation",
    "RedisFeatureStore",
    "StoreSize",
]
