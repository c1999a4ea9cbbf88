"""Masked forms of PII for display: what auditors and case views show instead of plaintext.

Masking is for people, not matching (that is the blind index's job). Each
function accepts any input, including malformed values, and never returns more
than the documented visible part.
"""

from __future__ import annotations

from riskd.pii.blind import normalize_id_number, normalize_phone


def mask_phone(phone: str) -> str:
    """First three and last four digits; everything shorter than eight is fully masked.

    >>> mask_phone("13812345678"), mask_phone("+86 138-1234-5678"), mask_phone("12345")
    ('138****5678', '138****5678', '*****')
    """
    digits = normalize_phone(phone)
    if len(digits) < 8:
        return "*" * len(digits)
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
    """First three and last four characters of an ID number; short ones fully masked.

    >>> mask_id_number("11010119900307123X")
    '110***********123X'
    """
    text = normalize_id_number(id_number)
    if len(text) < 10:
        return "*" * len(text)
    return text[:3] + "*" * (len(text) - 7) + text[-4:]


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
