"""Personal data: keyring, envelope encryption, blind indexes, masking.

``riskd.pii`` depends only on ``riskd.errors``, ``riskd.domain`` and ``riskd.sql``;
features, evidence and the link graph key on its blind indexes, so it sits low.
"""

from riskd.pii.blind import NORMALIZERS, BlindIndexer, join_address
from riskd.pii.keyring import Keyring, MasterKeyProvider, WrappedKey
from riskd.pii.keystore import KeyStore, ShredResult, SqlKeyStore
from riskd.pii.mask import mask_address, mask_device, mask_id_number, mask_name, mask_phone
from riskd.pii.vault import Vault

__all__ = [
    "NORMALIZERS",
    "BlindIndexer",
    "KeyStore",
    "Keyring",
    "MasterKeyProvider",
    "ShredResult",
    "SqlKeyStore",
    "Vault",
    "WrappedKey",
    "join_address",
    "mask_address",
    "mask_device",
    "mask_id_number",
    "mask_name",
    "mask_phone",
]
