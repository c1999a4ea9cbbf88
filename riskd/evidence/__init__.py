"""Evidence: the append-only, hash-chained decision log and outcome reports.

``DecisionLog`` (``log``) batches appends on a background writer; ``records``
holds the stored values; ``chain`` the hash chain and its verification;
``request`` the PII-protected form of an order; ``schema`` the tables.
"""

from riskd.evidence.chain import VerifyResult
from riskd.evidence.log import DecisionLog
from riskd.evidence.records import DecisionRecord

__all__ = ["DecisionLog", "DecisionRecord", "VerifyResult"]
