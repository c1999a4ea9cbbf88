"""Blind indexes: normalization makes equal values match; keys separate types and keyrings."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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
        ("address", "Hauptstraße 5", "HAUPTSTRASSE 5"),  # case-folded, not just lowered
        ("id_number", "11010119900307123X", "110101 19900307 123x"),
        ("device", "6D92078A-8246-4BA4-AE5B-76104861E7DC", "6d92078a82464ba4ae5b76104861e7dc"),
        ("device", "AA:BB:CC:DD:EE:FF", "aa-bb-cc-dd-ee-ff"),
        ("name", "Zhang  San", " zhang san "),
        ("phone", "13812345678", "+86 (0) 138 1234 5678"),  # the trunk 0 after +86
        ("phone", "13812345678", "138/1234/5678"),
        ("phone", "13812345678", "0086 13812345678"),
        ("phone", "010-1234-5678", "+86 10 1234 5678"),  # fixed line: the trunk 0
        ("phone", "010-1234-5678", "0086 (0)10 1234 5678"),
        ("phone", "0571-8888-7777", "+86 571 8888 7777"),
        ("phone", "0571-888-7777", "+86-571-888-7777"),  # a 7-digit local number
        ("phone", "400-123-4567", "+86 400 123 4567"),  # no trunk 0 at home either
        ("phone", "19912345678", "+86 (0) 199 1234 5678"),  # 19x mobiles are mobiles too
        ("phone", "13812345678", "\ufeff138 1234 5678"),  # a byte-order mark, from a file
        ("name", "张三", "张 三"),
        ("name", "张三", "张　三"),  # ideographic space
        ("name", "张三", " 张\u200b三 "),  # zero-width space
        ("name", "欧阳娜娜", "欧阳 娜娜"),
        ("name", "阿沛·阿旺晋美", "阿沛 · 阿旺晋美"),
        ("name", "Zhang San 张三", "zhang  san 张 三"),
        ("name", "José", "Jose\u200b\u0301"),  # the accent composes once the gap is gone
        ("name", "王𠮷", "王 𠮷"),  # a character of CJK extension B (review: untested)
        ("name", "阿沛・阿旺晋美", "阿沛 ・ 阿旺晋美"),  # the katakana middle dot
        ("name", "Strauß", "STRAUSS"),  # case-folded, not just lowered
        ("address", "浙江省杭州市西湖区文三路1号", "浙江省杭州市西湖区文三路1号。"),  # 。 too
        ("address", "万科城市花园3栋", "万科·城市花园3栋"),  # a middle dot
        ("address", "文三路1号B座", "文三路1号_B座"),
        ("payment_account", "6222021234567890", "6222 0212-3456 7890"),  # a card as written
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
        ("phone", "+86 10 1234 5678", "+86 20 1234 5678"),
        ("phone", "+86 10 1234 5678", "10 1234 5678"),  # no country code, no trunk 0
        ("phone", "+86 (0) 138 1234 5678", "+86 (0) 139 1234 5678"),
        ("phone", "+86 400 123 4567", "0400 123 4567"),
        ("phone", "0138 1234 5678", "138 1234 5678"),  # no country code: may be abroad
        ("phone", "+44 20 7946 0958", "020 7946 0958"),
        ("name", "张三", "张三丰"),
        ("name", "张三", "张 山"),
        ("name", "Zhang San", "ZhangSan"),  # Latin names keep their spaces
        ("name", "Zhang San", "Zhang·San"),
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


_PHONE_SEPARATORS = ["", " ", "-", "/", ".", "\u3000", " - ", "–"]
_MOBILE = st.from_regex(r"1[3-9][0-9]{9}", fullmatch=True)
_FIXED_LINE = st.one_of(  # area code without the trunk 0, local number
    st.tuples(
        st.from_regex(r"10|2[0-9]", fullmatch=True), st.from_regex(r"[2-9][0-9]{7}", fullmatch=True)
    ),
    st.tuples(
        st.from_regex(r"[3-9][0-9]{2}", fullmatch=True).filter(lambda a: a not in ("400", "800")),
        st.from_regex(r"[2-9][0-9]{6,7}", fullmatch=True),
    ),
)


@st.composite
def _numbers(draw: st.DrawFn) -> tuple[str, str]:
    """A Chinese number: ("mobile", its 11 digits) or (area code, local number)."""
    if draw(st.booleans()):
        return "mobile", draw(_MOBILE)
    area, local = draw(_FIXED_LINE)
    return area, local


def _domestic(number: tuple[str, str]) -> str:
    kind, digits = number
    return digits if kind == "mobile" else "0" + kind + digits


@st.composite
def _written(draw: st.DrawFn, number: tuple[str, str]) -> str:
    """``number`` as someone may write it: country code or not, trunk 0, separators."""
    kind, digits = number
    sep = draw(st.sampled_from(_PHONE_SEPARATORS))
    if kind == "mobile":
        prefix = draw(st.sampled_from(["", "+86", "0086", "+86 (0)", "0086(0)", "86"]))
        return prefix + sep + sep.join([digits[:3], digits[3:7], digits[7:]])
    groups = [kind, digits[:-4], digits[-4:]]
    prefix = draw(st.sampled_from(["0", "+86", "0086", "+86 (0)", "+86(0)", "(0"]))
    if prefix == "(0":
        return f"(0{kind}){sep}{sep.join(groups[1:])}"
    return prefix + sep + sep.join(groups)


@given(_numbers(), st.data())
def test_blind_index_phone_variants_match_and_other_numbers_stay_apart(
    number: tuple[str, str], data: st.DataObject
) -> None:
    # However a number is written (country code, trunk 0, separators), it is one digest;
    # the same number with one digit changed, written any way, is another.
    kind, digits = number
    i = data.draw(st.integers(2, len(digits) - 1))
    other_digit = data.draw(st.sampled_from("0123456789").filter(lambda d: d != digits[i]))
    other = (kind, digits[:i] + other_digit + digits[i + 1 :])
    a, b = data.draw(_written(number)), data.draw(_written(number))
    c = data.draw(_written(other))
    assert NORMALIZERS["phone"](a) == _domestic(number)
    assert IX.index("phone", a) == IX.index("phone", b)
    assert IX.index("phone", a) != IX.index("phone", c)


_HAN_NAMES = st.text(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), min_size=1, max_size=4
)
_NAME_GAPS = st.sampled_from(["", " ", "  ", "\u3000", "\u200b", " \u200b "])


@given(_HAN_NAMES, _HAN_NAMES, st.lists(_NAME_GAPS, min_size=4, max_size=4))
def test_blind_index_chinese_name_spacing_matches_and_names_stay_apart(
    a: str, b: str, gaps: list[str]
) -> None:
    spaced = "".join(c + gap for c, gap in zip(a, gaps, strict=False)).strip()
    assert IX.index("name", spaced) == IX.index("name", a)
    assert (IX.index("name", spaced) == IX.index("name", b)) == (a == b)


def test_blind_index_keeps_digest_of_phones_and_names_written_plainly() -> None:
    # What the upgrade must not disturb: the plain forms keep their normal form.
    phone = NORMALIZERS["phone"]
    assert phone("+86 138-1234-5678") == phone("13812345678") == "13812345678"
    assert phone("010-1234-5678") == "01012345678" and phone("4001234567") == "4001234567"
    assert phone("+1 (415) 555-0100") == "+14155550100"
    assert NORMALIZERS["name"]("张三") == "张三"
    assert NORMALIZERS["name"](" Zhang  SAN ") == "zhang san"


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


def test_blind_index_is_hmac_sha256_under_the_hkdf_key_of_its_field_type() -> None:
    """The documented construction (RFC 2104 HMAC-SHA256 of the normalized value, truncated
    to 128 bits, under HKDF-SHA256 of the index secret per field type): a change to it
    would change every stored digest and restart every velocity counter."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"riskd blind index v1\x00phone"
    )
    key = hkdf.derive(RING.index_secret)
    expected = hmac.new(key, b"13812345678", hashlib.sha256).hexdigest()[:32]
    assert IX.index("phone", "+86 138-1234-5678") == expected
