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


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("91234567", "****4567"),  # a Hong Kong mobile without its country code
        ("+852 9123 4567", "********4567"),
        ("612345678", "*****5678"),
        ("+1 (415) 555-0100", "********0100"),
    ],
)
def test_mask_phone_shows_only_the_last_four_of_a_short_or_foreign_number(
    phone: str, masked: str
) -> None:
    assert mask_phone(phone) == masked


@given(st.text(alphabet="0123456789", min_size=1, max_size=10))
def test_mask_phone_of_a_short_number_shows_at_most_half_of_it(phone: str) -> None:
    masked = mask_phone(phone)
    assert len(masked.replace("*", "")) <= len(masked) // 2


@pytest.mark.parametrize(
    ("id_number", "masked"),
    [
        ("A123456789", "******6789"),
        ("K01234567(8)", "********7(8)"),
        ("123456789", "*********"),
        ("12345678901234", "**********1234"),  # fourteen: not a mainland number
        ("110101900307123", "110********7123"),  # a 15-digit mainland number
    ],
)
def test_mask_id_number_of_a_short_number_shows_only_its_last_four(
    id_number: str, masked: str
) -> None:
    assert mask_id_number(id_number) == masked


@given(st.text(alphabet="0123456789ABX()", min_size=1, max_size=14))
def test_mask_id_number_of_a_short_number_shows_at_most_half_of_it(id_number: str) -> None:
    masked = mask_id_number(id_number)
    assert len(masked.replace("*", "")) <= len(masked) // 2


def test_mask_name_keeps_first_character() -> None:
    assert mask_name("张三") == "张*"
    assert mask_name(" Alice ") == "A****"
    assert mask_name("李") == "李*"  # a one-character name is never shown whole


def test_mask_id_number_hides_birth_date() -> None:
    masked = mask_id_number("11010119900307123X")
    assert masked == "110***********123X"
    assert "19900307" not in masked


def test_mask_address_is_district_level() -> None:
    assert mask_address("浙江省", "杭州市", "西湖区") == "浙江省杭州市西湖区"


def test_mask_device_keeps_last_four() -> None:
    assert mask_device("6D92078A-8246-4BA4-AE5B-76104861E7DC") == "****E7DC"
    assert mask_device("abc") == "***"
    # a short id (eight characters or fewer) shows nothing: four would be half of it
    assert mask_device("A1B2C3D4") == "********"
    assert mask_device("A1B2C3D4E") == "****3D4E"
    assert mask_device(" A1B2C3D4 ") == "********"  # blanks count for nothing (review: half shown)


@given(st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True))
def test_mask_phone_never_reveals_the_middle(phone: str) -> None:
    masked = mask_phone(phone)
    assert masked[3:7] == "****" and masked[:3] == phone[:3] and masked[7:] == phone[7:]
