"""Masked forms of PII for display: what auditors and case views show instead of plaintext.

Masking is for people, not matching (that is the blind index's job). Each
function accepts any input, including malformed values, and never returns more
than the documented visible part. The masks stay in the hash-chained decision
record after the buyer is forgotten, so a short phone or ID number shows at most
half of its characters.
"""

from __future__ import annotations

from riskd.pii.blind import normalize_id_number, normalize_phone


def mask_phone(phone: str) -> str:
    """A mainland number (eleven digits or more) keeps its first three and last four digits;
    a shorter one, or one with another country code, its last four only, and one shorter
    than eight digits nothing. Short numbers never show more than half of themselves.

    >>> mask_phone("13812345678"), mask_phone("+86 138-1234-5678"), mask_phone("12345")
    ('138****5678', '138****5678', '*****')
    >>> mask_phone("9123 4567"), mask_phone("+852 9123 4567")
    ('****4567', '********4567')
    """
    digits = normalize_phone(phone)  # a number with another country code keeps its "+"
    if len(digits) < 8:
        return "*" * len(digits)
    if len(digits) < 11 or not digits.isdigit():
        return _last_four(digits)
    return digits[:3] + "*" * (len(digits) - 7) + digits[-4:]


def mask_name(name: str) -> str:
    """The first character, then one star per remaining character (at least one).

    >>> mask_name("张三丰"), mask_name("李"), mask_name("")
    ('张**', '李*', '')
    """
    name = name.strip()
    if not name:
        return ""
    return name[0] + "*" * max(1, len(name) - 1)


def mask_id_number(id_number: str) -> str:
    """A mainland ID number (fifteen or eighteen characters) keeps its first three and last
    four; one of ten to fourteen characters its last four only, and a shorter one nothing.
    Short numbers never show more than half of themselves.

    >>> mask_id_number("11010119900307123X"), mask_id_number("A123456789")
    ('110***********123X', '******6789')
    """
    text = normalize_id_number(id_number)
    if len(text) < 10:
        return "*" * len(text)
    if len(text) < 15:
        return _last_four(text)
    return text[:3] + "*" * (len(text) - 7) + text[-4:]


def _last_four(text: str) -> str:
    """One star per character but the last four (``text`` has at least eight)."""
    return "*" * (len(text) - 4) + text[-4:]


def mask_address(province: str, city: str, district: str) -> str:
    """District-level address: province, city and district; the street detail never shown.

    >>> mask_address("浙江省", "杭州市", "西湖区")
    '浙江省杭州市西湖区'
    """
    return "".join(part.strip() for part in (province, city, district))


def mask_device(device_id: str) -> str:
    """The last four characters of a device identifier.

    >>> mask_device("6D92078A-8246-4BA4-AE5B-76104861E7DC")
    '****E7DC'
    """
    text = device_id.strip()
    return "****" + text[-4:] if len(text) > 8 else "*" * len(text)
