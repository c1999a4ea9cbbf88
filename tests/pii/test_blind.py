"""Blind indexes: normalization makes equal values match; keys separate types and keyrings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskd.errors import InvalidArgumentError
from riskd.pii.blind import NORMALIZERS, BlindIndexer, join_address
from riskd.pii.keyring import Keyring

RING = Keyring.generate()
IX = BlindIndexer(RING)


@pytest.mark.parametrize(
    ("field_type", "a", "b"),
    [
        ("phone", "13812345678", "+86 138 1234 5678"),
        ("phone", "13812345678", "0086-138-1234-5678"),
        ("phone", "13812345678", "86 13812345678"),
        ("phone", "13812345678", "１３８１２３４５６７８"),  # full-width digits
        ("phone", "13812345678", "(138) 1234.5678"),
        ("phone", "13812345678", "138–1234—5678"),  # en and em dash
        ("phone", "13812345678", "138\u200b1234\u200b5678"),  # zero-width space
        ("phone", "13812345678", "tel:+86-138-1234-5678"),
        ("phone", "+14155550100", "TEL:+1 (415) 555-0100"),
        (
            "address",
            "浙江省杭州市西湖区文三路1号",
            "浙江省 杭州市 西湖区　文三路 1 号",
        ),  # ideographic space
        ("address", "Room 12A, Main St.", "ＲＯＯＭ １２Ａ  main st"),
        ("address", "文三路1-23号", "文三路 1 - 23 号"),
        ("address", "文三路1-23号", "文三路１－２３号"),  # full-width digits and dash
        ("address", "文三路1-23号", "文三路1／23号"),
        ("address", "2-1-1201", "2 - 1 - 1201"),
        ("address", "2-1-1201", "2/1/1201"),
        ("address", "2-1-1201", "2．1　1201"),  # full-width stop, ideographic space
        ("address", "Room 1/23", "room 1 - 23"),
        ("id_number", "11010119900307123X", "110101 19900307 123x"),
        ("device", "6D92078A-8246-4BA4-AE5B-76104861E7DC", "6d92078a82464ba4ae5b76104861e7dc"),
        ("device", "AA:BB:CC:DD:EE:FF", "aa-bb-cc-dd-ee-ff"),
        ("name", "Zhang  San", " zhang san "),
        ("ip", "::ffff:10.0.0.1", "10.0.0.1"),
        ("ip", "[2001:db8::1]", "2001:db8::1"),
        ("ip", "[2001:DB8:0::1]", "2001:db8::1"),
    ],
)
def test_blind_index_matches_equal_values_in_other_formats(field_type: str, a: str, b: str) -> None:
    assert IX.index(field_type, a) == IX.index(field_type, b)


@pytest.mark.parametrize(
    ("field_type", "a", "b"),
    [
        ("phone", "13812345678", "13812345679"),
        ("phone", "13812345678", "+1 3812345678"),
        ("address", "文三路1号", "文三路2号"),
        ("address", "文三路1-23号", "文三路12-3号"),
        ("address", "文三路1-23号", "文三路123号"),
        ("address", "Room 1/23", "Room 12/3"),
        ("address", "2-1-1201", "21-1201"),
        ("address", "2-1-1201", "211201"),
        ("address", "Room 5, 12 Main St", "Room 51, 2 Main St"),
        ("id_number", "11010119900307123X", "110101199003071230"),
    ],
)
def test_blind_index_separates_different_values(field_type: str, a: str, b: str) -> None:
    assert IX.index(field_type, a) != IX.index(field_type, b)


def test_blind_index_address_keeps_digest_of_addresses_without_digit_separators() -> None:
    # What an upgrade must not disturb: no separator between two digits, same normal form.
    assert NORMALIZERS["address"]("浙江省 杭州市，西湖区 文三路 1 号 B座-3单元") == (
        "浙江省杭州市西湖区文三路1号b座3单元"
    )
    assert NORMALIZERS["address"]("Room 12A, Main St.") == "room12amainst"


_ADDRESS_DASHES = [
    "\u2010",  # hyphen
    "\u2011",  # non-breaking hyphen
    "\u2012",  # figure dash
    "\u2013",  # en dash
    "\u2014",  # em dash
    "\u2015",  # horizontal bar
    "\u2212",  # minus sign
    "\ufe58",  # small em dash
    "\ufe63",  # small hyphen-minus
    "~",
    "\u301c",  # wave dash
    "\uff5e",  # full-width tilde
    "\u200b",  # zero-width space
]


@pytest.mark.parametrize("dash", _ADDRESS_DASHES)
def test_blind_index_address_unicode_dashes_match_the_ascii_dash(dash: str) -> None:
    # What IMEs and smart punctuation type: one flat, whichever dash, is one address.
    flat = "浙江省 杭州市 西湖区 文三路3-1-1201"
    variant = f"浙江省 杭州市 西湖区 文三路3{dash}1{dash}1201"
    assert IX.index("address", variant) == IX.index("address", flat)
    assert IX.index("address", f"文三路{dash}B座") == IX.index("address", "文三路B座")
    other_flat = f"浙江省 杭州市 西湖区 文三路3{dash}1{dash}1202"
    assert IX.index("address", other_flat) != IX.index("address", flat)
    assert IX.index("address", f"文三路31{dash}1201") != IX.index("address", flat)


def test_blind_index_keys_differ_per_field_type() -> None:
    digests = {IX.index(ft, "13812345678") for ft in ("phone", "device", "id_number", "buyer")}
    assert len(digests) == 4


def test_blind_index_differs_between_keyrings_and_survives_rotation() -> None:
    other = BlindIndexer(Keyring.generate())
    rotated = BlindIndexer(RING.add_version().add_version().retire(1))
    assert other.index("phone", "13812345678") != IX.index("phone", "13812345678")
    assert rotated.index("phone", "13812345678") == IX.index("phone", "13812345678")


def test_blind_index_is_hex_and_never_contains_the_value() -> None:
    digest = IX.index("phone", "13812345678")
    assert len(digest) == 32 and int(digest, 16) >= 0
    assert "13812345678" not in digest


def test_blind_index_empty_value_gives_empty_digest() -> None:
    assert IX.index("phone", " - ") == ""
    assert IX.index("address", "") == ""


def test_blind_index_unknown_field_type_names_the_field() -> None:
    with pytest.raises(InvalidArgumentError, match="field_type"):
        IX.index("email", "a@b.c")


def test_blind_index_covers_every_feature_key() -> None:
    from riskd.domain.features import KEYS

    assert set(KEYS) <= set(NORMALIZERS)


def test_join_address_matches_one_free_text_address() -> None:
    joined = join_address("浙江省", "杭州市", "西湖区", "文三路1号")
    assert IX.index("address", joined) == IX.index("address", "浙江省杭州市西湖区文三路1号")


@given(
    st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True),
    st.sampled_from(["", "+86", "0086", "86"]),
    st.sampled_from([" ", "-", ""]),
)
def test_blind_index_phone_formats_property(digits: str, prefix: str, sep: str) -> None:
    formatted = prefix + sep + sep.join((digits[:3], digits[3:7], digits[7:]))
    assert IX.index("phone", formatted) == IX.index("phone", digits)


_SEPARATORS = ["-", "/", ".", " ", "－", "／", "．", "\u3000", " - ", "#", "、"]
_SEPARATORS += ["—", "\u2212", "～"]  # em dash, minus sign, full-width tilde


@given(
    st.lists(st.tuples(st.integers(0, 9999), st.sampled_from(_SEPARATORS)), min_size=2, max_size=4)
)
def test_blind_index_address_number_separators_property(groups: list[tuple[int, str]]) -> None:
    # Any separator run between digit groups is one separator; the groups stay apart.
    spaced = "文三路 " + "".join(f"{n}{sep}" for n, sep in groups[:-1]) + f"{groups[-1][0]} 号"
    plain = "文三路" + "-".join(str(n) for n, _ in groups) + "号"
    merged = "文三路" + "".join(str(n) for n, _ in groups) + "号"
    assert IX.index("address", spaced) == IX.index("address", plain)
    assert IX.index("address", spaced) != IX.index("address", merged)
    once = NORMALIZERS["address"](spaced)
    assert NORMALIZERS["address"](once) == once


@given(st.text(st.characters(exclude_categories=("M", "Cs")), max_size=40))
def test_blind_index_normalizers_are_idempotent(text: str) -> None:
    for field_type, normalize in NORMALIZERS.items():
        once = normalize(text)
        assert normalize(once) == once, field_type
