"""Blind indexes: keyed hashes of normalized PII values, for exact matching without plaintext.

Where it sits: the engine indexes an order's phone, address, device, ... once
per request; feature counters, lists and the shop-link graph then key on those
digests, and the evidence log stores them beside the encrypted fields. Each
field type has its own HMAC-SHA256 key (HKDF from the keyring's index secret),
so equal values of different types never collide and one leaked key exposes one
type only. Values are normalized first, so ``+86 138-1234-5678`` and
``13812345678`` match, and so do ``张 三`` and ``张三``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Mapping

from riskd.errors import InvalidArgumentError
from riskd.pii.keyring import MasterKeyProvider

DIGEST_BYTES = 16  # 128-bit digests: collisions are negligible, keys stay short

_DASHES = "-\u2010\u2012\u2013\u2014\u2015\u2212"
"""Hyphen-minus, the Unicode hyphen and dashes, and the minus sign, as NFKC leaves them.

NFKC has already folded the non-breaking hyphen (U+2011) into U+2010, the small em
dash (U+FE58) into U+2014, and the small and full-width hyphen-minus into ``-``.
"""
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"
"""Zero-width characters, which NFKC keeps."""
_INVISIBLE_CHAR = re.compile(f"[{_INVISIBLE}]")
_PHONE_DROP = "()./" + _DASHES + _INVISIBLE
"""Phone punctuation: ASCII (``138/1234/5678`` too), the Unicode dashes and minus, and
zero-width characters."""
_CN_MOBILE = re.compile(r"1[3-9][0-9]{9}")
"""A Chinese mobile number (11 digits from 13 to 19)."""
_CN_GEOGRAPHIC = re.compile(r"(?:10|2[0-9])[0-9]{8}|(?!400|800)[3-9][0-9]{9,10}")
"""A Chinese fixed-line number without its trunk 0, as written after +86: a two-digit
area code (10 Beijing, 2x) and 8 digits, or a three-digit one and 7 or 8. 400 and 800
numbers are not geographic: they are dialled without a 0 at home too."""

_ADDRESS_DROP = ",，、.。·_/#~\u301c" + _DASHES + _INVISIBLE
"""Address separators: the phone's dashes and zero-width characters, and the tilde and
wave dash written for ranges (``3~5号``; NFKC turns the full-width tilde into ``~``)."""
_ADDRESS_NUMBER_GAP = re.compile(rf"(?<=[0-9])[\s{re.escape(_ADDRESS_DROP)}]+(?=[0-9])")
"""A run of whitespace or separators between two digits: ``1-23``, ``2 / 1``, ``5, 12``."""
_ADDRESS_NUMBER_SEP = "-"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff\u00b7\u30fb"
"""Chinese characters (the unified ideographs; NFKC has mapped the compatibility ones
onto them) and the middle dots between the parts of a name (``阿沛·阿旺晋美``)."""
_HAN_GAP = re.compile(f"(?<=[{_HAN}]) (?=[{_HAN}])")
"""A space between two of them: Chinese names are written without (``张 三`` is ``张三``)."""
_ID_DROP = "-"
_DEVICE_DROP = "-:"


def _nfkc(value: str) -> str:
    """Unicode NFKC: full-width letters, digits and spaces become their ASCII forms."""
    return value.strip() if value.isascii() else unicodedata.normalize("NFKC", value).strip()


def _drop(text: str, chars: str) -> str:
    """``text`` without any whitespace and without ``chars`` (faster than a regex or translate)."""
    text = "".join(text.split())
    for c in chars:
        if c in text:
            text = text.replace(c, "")
    return text


def _recompose(text: str) -> str:
    """NFKC again after deletions: dropping a space can leave a combining mark to compose."""
    return text if text.isascii() else unicodedata.normalize("NFKC", text)


def normalize_phone(value: str) -> str:
    """Digits only, a Chinese number in its domestic form: without the +86 / 0086 / 86
    country prefix; after +86 or 0086, a mobile without a ``(0)`` trunk written before
    it and a fixed line with its trunk 0, as they are dialled at home.

    Only the country code says a number is Chinese: without one the digits stay as
    written (``0138…`` may be a number abroad), and after it a number that is neither
    mobile nor fixed-line (``+86 400 …``, a short code) keeps its digits as written.

    >>> normalize_phone("+86 138-1234-5678"), normalize_phone("（138）1234 5678")
    ('13812345678', '13812345678')
    >>> normalize_phone("+86 (0) 138 1234 5678"), normalize_phone("138/1234/5678")
    ('13812345678', '13812345678')
    >>> normalize_phone("+86 10 1234 5678"), normalize_phone("010-1234-5678")
    ('01012345678', '01012345678')
    >>> normalize_phone("+1 (415) 555-0100"), normalize_phone("tel:138–1234–5678")
    ('+14155550100', '13812345678')
    """
    text = _recompose(_drop(_nfkc(value), _PHONE_DROP))
    if text[:4].lower() == "tel:":  # an RFC 3966 URI, as copied from a link
        text = text[4:]
    if text.startswith("+86"):
        return _domestic(text[3:])
    if text.startswith("0086"):
        return _domestic(text[4:])
    if len(text) == 13 and text.startswith("861") and text.isascii() and text.isdigit():
        return text[2:]
    return text


def _domestic(national: str) -> str:
    """The domestic form of what followed +86: a mobile as is, a fixed line with its
    trunk 0, whether or not it was written (``+86 (0) 10 …``); anything else as is."""
    number = national[1:] if national.startswith("0") else national
    if _CN_MOBILE.fullmatch(number):
        return number
    if _CN_GEOGRAPHIC.fullmatch(number):
        return "0" + number
    return national


def normalize_address(value: str) -> str:
    """Case-folded, without whitespace or separator punctuation (full-width included).

    Between two digits a run of them is kept as one ``-`` instead: ``1-23`` and
    ``12-3`` (building-unit-room ``2-1-1201`` and ``21-1201``) are different
    households, and merging the digits would count them as one address.

    >>> a = normalize_address("浙江省 杭州市，西湖区  文三路 1 号")
    >>> a == normalize_address("浙江省杭州市西湖区文三路1号")
    True
    >>> normalize_address("Ｒｏｏｍ  12A, Main St.")
    'room12amainst'
    >>> normalize_address("文三路 1 - 23 号"), normalize_address("2 / 1．1201")
    ('文三路1-23号', '2-1-1201')
    """
    parts = _ADDRESS_NUMBER_GAP.split(_nfkc(value).casefold())
    return _recompose(_ADDRESS_NUMBER_SEP.join(_drop(part, _ADDRESS_DROP) for part in parts))


def normalize_id_number(value: str) -> str:
    """Without spaces or dashes, check letter upper-cased.

    >>> normalize_id_number("11010119900307 123x")
    '11010119900307123X'
    """
    return _recompose(_drop(_nfkc(value), _ID_DROP).upper())


def normalize_device(value: str) -> str:
    """Lower-cased, without separators (IDFA dashes, MAC colons).

    >>> normalize_device("6D92078A-8246-4BA4") == normalize_device("6d92078a82464ba4")
    True
    """
    return _recompose(_drop(_nfkc(value), _DEVICE_DROP).lower())


def normalize_name(value: str) -> str:
    """Case-folded, inner whitespace collapsed to one space, none between two Chinese
    characters (or a middle dot between them), no zero-width characters.

    >>> normalize_name("张 三") == normalize_name("张三"), normalize_name("Zhang  San")
    (True, 'zhang san')
    >>> normalize_name("阿沛 · 阿旺晋美")
    '阿沛·阿旺晋美'
    """
    text = _nfkc(value)
    if text.isascii():
        return " ".join(text.split()).casefold()
    if _INVISIBLE_CHAR.search(text):
        text = _recompose(_INVISIBLE_CHAR.sub("", text))
    text = " ".join(text.split())
    if " " in text:
        text = _HAN_GAP.sub("", text)
    return text.casefold()


def normalize_ip(value: str) -> str:
    """The canonical text of an IP address (``::ffff:1.2.3.4`` becomes ``1.2.3.4``).

    A bracketed address, as written in URLs (``[2001:db8::1]``), loses its brackets.
    """
    text = _nfkc(value)
    try:
        ip = ipaddress.ip_address(text[1:-1] if text[:1] == "[" and text[-1:] == "]" else text)
    except ValueError:
        return text.lower()
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def normalize_opaque(value: str) -> str:
    """Platform identifiers (buyer, shop, live room, creator): surrounding space only."""
    return _nfkc(value)


def normalize_exact(value: str) -> str:
    """Order ids: as given (two ids that differ in any way are two orders)."""
    return value


NORMALIZERS: Mapping[str, Callable[[str], str]] = {
    "phone": normalize_phone,
    "address": normalize_address,
    "id_number": normalize_id_number,
    "device": normalize_device,
    "name": normalize_name,
    "ip": normalize_ip,
    "payment_account": normalize_id_number,
    "buyer": normalize_opaque,
    "shop": normalize_opaque,
    "live_room": normalize_opaque,
    "creator": normalize_opaque,
    "order": normalize_exact,
}
"""Every field type that may be indexed, with its normalizer."""


def join_address(province: str, city: str, district: str, detail: str) -> str:
    """One string for a structured address (what ``index("address", ...)`` is given)."""
    return " ".join((province, city, district, detail))


class _Hmac:
    """HMAC-SHA256 with the padded-key states hashed once (RFC 2104, about 2x hmac.digest)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        padded = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))

    def digest(self, message: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class BlindIndexer:
    """HMAC-SHA256 of normalized values, one key per field type.

    >>> from riskd.pii.keyring import Keyring
    >>> ix = BlindIndexer(Keyring.generate())
    >>> ix.index("phone", "+86 138 1234 5678") == ix.index("phone", "13812345678")
    True
    >>> ix.index("phone", "13812345678") == ix.index("device", "13812345678")
    False
    >>> ix.index("phone", "  ")
    ''
    """

    __slots__ = ("_keys",)

    def __init__(self, keyring: MasterKeyProvider) -> None:
        self._keys = {ft: _Hmac(keyring.derive_index_key(ft)) for ft in NORMALIZERS}

    def index(self, field_type: str, value: str) -> str:
        """The hex digest of ``value``'s normalized form; ``""`` when nothing is left to index.

        Raises:
            InvalidArgumentError: ``field_type`` is not one of ``NORMALIZERS``.
        """
        key = self._keys.get(field_type)
        if key is None:
            raise InvalidArgumentError("field_type", "unknown blind-index field type")
        normalized = NORMALIZERS[field_type](value)
        if not normalized:
            return ""
        return key.digest(normalized.encode())[:DIGEST_BYTES].hex()
