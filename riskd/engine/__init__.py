"""The engine: order + features + compiled rules + shop state → ``Decision``, recorded.

``scorer.Scorer`` is the entry point; ``keys`` blind-indexes an order into a
feature-store ``Observation``; ``combine`` turns rule results into outcome,
score and reasons; ``fallback`` answers when a dependency is down; ``breaker``
and ``flights`` keep dead dependencies and concurrent retries cheap.
"""

from riskd.engine.fallback import FallbackPolicy
from riskd.engine.scorer import Scorer, ShopDirectory

__all__ = ["FallbackPolicy", "Scorer", "ShopDirectory"]
