"""Masking shows only the documented part of each value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskd.pii.mask import mask_address, mask_device, mask_id_number, mask_name, mask_phone


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("13812345678", "138****5678"),
        ("+86 138-1234-5678", "138****5678"),
        ("1234567", "*******"),
        ("", ""),
    ],
)
def test_mask_phone_shows_three_and_four(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


def test_mask_name_keeps_first_character() -> None:
    assert mask_name("张三") == "张*"
    assert mask_name(" Alice ") == "A****"


def test_mask_id_number_hides_birth_date() -> None:
    masked = mask_id_number("11010119900307123X")
    assert masked == "110***********123X"
    assert "19900307" not in masked


def test_mask_address_is_district_level() -> None:
    assert mask_address("浙江省", "杭州市", "西湖区") == "浙江省杭州市西湖区"


def test_mask_device_keeps_last_four() -> None:
    assert mask_device("6D92078A-8246-4BA4-AE5B-76104861E7DC") == "****E7DC"
    assert mask_device("abc") == "***"


@given(st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True))
def test_mask_phone_never_reveals_the_middle(phone: str) -> None:
    masked = mask_phone(phone)
    assert masked[3:7] == "****" and masked[:3] == phone[:3] and masked[7:] == phone[7:]
