"""Personal data in free text: what keeps it out of the records riskd never forgets.

Where it sits: free text that riskd stores as written is scanned by
``refuse_pii`` before anything is written: a reported outcome's ``detail``
(``riskd.service.validate``, chained into ``order_events``), a ledger request's
``reason`` and ``evidence`` (``riskd.ledger.validate.check_note``, the journal),
an analyst's reason for a reveal (``riskd.evidence.access``, the chained
``pii_access_log``) and a legal hold's reason (``Vault.hold``). A hit is
``INVALID_ARGUMENT`` naming the field and the kind of data, never the value.
Such records cannot be edited, and only the encrypted PII fields can be
forgotten, so plaintext PII there would stay for good.

What counts, each shaped for few false positives on what these fields carry
(courier tracking numbers, order ids, amounts, dates and times, SKU codes,
Chinese text). A number is a run of digits that spaces or tabs (not line
breaks) or a dash split into groups of two digits or more (``138 1234 5678``,
``6222-0212-…``; a card's last group may be one digit), read after NFKC
(full-width digits and brackets) and without zero-width characters. A closing
bracket splits groups too, and a group may open with one (``(010) 1234-5678``,
``+86 (0)138…``). A dot or a slash splits groups only in a phone's layout, a
group of 3-4 digits and then groups of 4 (``138.1234.5678``, ``0571/8888/8888``;
3-4 after an area code): they also split decimals, dates, IP addresses,
versions and ratios (``1381234.5678``, ``172.160.100.20``, ``1500/2300/800``:
none is refused). A candidate is one group or several adjacent ones: a longer
number never hides a shorter one beside it (``2023 12 01 13812345678``), and a
candidate never cuts a group. A group glued to an ASCII letter is an identifier
(``JDVA13812345678``, ``SF1234567890123``), never a candidate. Each group is
read a bounded number of times, so a long text costs time in proportion to its
length.

- mobile phone number: 11 digits ``1[3-9]…``, also after ``+86`` / ``0086`` and
  a trunk ``0`` or ``(0)``;
- landline phone number: an area code of its own group (``010``, ``02x``, or
  ``0`` and three digits but 400 and 800) and 7 or 8 digits (8 after ``010`` and
  ``02x``) in one or two groups (``010-1234-5678``, ``(0571) 888 8888``), or
  after ``+86`` (``+86 10 1234 5678``, ``+861012345678``) or a ``0086`` written
  apart; never one glued to its area code (``05711234567``: as likely a tracking
  number), nor three times of day (``0900-1800 1900-2100``). Together the two
  refuse a Chinese number that the phone blind index
  (``riskd.pii.blind.normalize_phone``) reads as one in the layouts it is written
  in: a mobile 3-4-4 with any of the separators, 3-8 or 7-4 with spaces or
  dashes; a landline's area code apart, then 4-4 or 3-4 digits, or 7-8 in one
  group after a blank, dash or bracket; with ``+86``, a trunk, brackets. Not: the bare
  landline above, ``86`` glued to a mobile number (``8613812345678``: a 13-digit
  tracking number as often), and dots or slashes in other layouts;
- resident ID number: 18 characters, a province code, a real birth date
  (1900-2099) and the ISO 7064 MOD 11-2 check character. The 15-digit legacy
  numbers (out of use since 2013) have no check character: a province and a date
  alone pass 1.2% of random 15-digit tracking numbers, so they are not detected;
- bank card number: an issuer prefix for its length (15: American Express; 16:
  Visa, Mastercard, UnionPay, JCB, Discover; 17-19: UnionPay ``62`` and the
  domestic ``9558``/``9559``) and a valid Luhn digit. 13 and 14 digits are not
  cards here: with 13-19 digits and Luhn alone, 7.4% of random 12-15 digit
  tracking numbers would be refused;
- e-mail address: ``local@domain.tld``;
- shipping address: a part precise enough to find a home, in digits (full-width
  too) or Chinese numerals (``零〇一…十百``), blanks or tabs between its pieces or
  not: a road, street, lane or alley (路 街 巷 胡同, 大道, 道 里) and its house
  number (``文三路 90 号``, ``长安街十八号``, ``90-2号``, ``长乐路123弄``,
  ``人民南路三段17号``); a building, a compound or a unit and another part after it
  (``A栋1203室``, ``5号楼2单元1801``, ``3号院1号楼``, ``B座 12层``, ``3栋1楼``);
  a room with its floor (``1203室``); a village's group or house (``红旗村三组``,
  ``李家村15号``). Read as a road only where the word is one: 道 and 里 end far
  more words than roads (``知道``, ``频道``, ``这里``, ``店里``, each before a date
  in ``知道3号发货``), so they count after a province, city, district, county or
  town in the same phrase (``和平区成都道100号``, ``朝阳区团结湖北里5号``) or as
  大道; the commonest words in 路 街 道 里 that are no road (``线路``, ``逛街``,
  ``店里``: a Chinese dictionary's, jieba's) never. Not: a province, city or
  district alone (``商家在深圳市南山区发货``), a road without its number
  (``快递到了文三路营业部``), 号 without a road (dates ``3月1号``, list items
  ``直播间2号链接``, sizes ``5号电池``, ``1号线``, ``号码``), one part of a
  building alone (``5号楼``, ``第3单元课程``, ``5层收纳架``), a flat's layout
  (``3室2厅``, a furniture listing's or a buyer's: it finds no home),
  ``5-2-1203`` (a SKU's shape as often), ``幸福小区12号`` (a number after a
  compound reads as a date as often), and addresses written in English or in
  traditional characters other than 號 樓 棟 單元. What no detector can tell
  apart: a merchant's or a warehouse's street address is refused like a buyer's
  (``仓库在文三路90号``), and so is a date right after a road (``步行街3号开业``)
  or after 道 or 里 and a place, unless the word is listed (``…都知道3号发货``
  passes because 知道 is);
- a person's name, only where a label says one follows (``riskd.pii.names``): a field
  label (姓名, 收件人, 收货人, 联系人, 持卡人, 户名, 寄件人, 签收人, …) and a surname
  with one or two given characters (``收件人：张伟``, ``姓名 欧阳娜娜``); a role word
  (买家, 客户, 顾客, 用户, 消费者) and such a name, then what the buyer said or asked
  (``买家王小明说没收到``, ``客户张伟要求退款``; after a colon, any: ``买家：李娜``);
  an English label and capitalised words (``contact name: John Smith``). Not: a label
  followed by what is no name (``收件人未填写``, ``联系人不详``, ``姓名已脱敏``,
  ``收件人电话错误``, ``买家说``, ``买家 已退款``), a masked name (``张**``, ``张*明``,
  ``张某``), a surname with a title (``王先生``), a surname and the character after it
  that begin a common word (``买家马上到``, ``客户方面``), and a name with no label before
  it (``张伟说没收到``: a bare Chinese name cannot be told from other words).

Measured on 100,000 random 12-15 digit tracking-style numbers (two seeds, one in
``tests/pii/test_detect.py``): the ID detector refuses none, the phone detector
0-1 (15 digits that read as 0086 and a mobile number), the card detector 44-50
(0.05%: 15 digits that start 34 or 37 and pass Luhn); carrier ids with their
letters (``SF…``, ``JD…``, ``JDVA…``, ``YT…``) none. On 100,000 each of random IPv4
addresses, dates (``2026.11.28``, ``/``, ``-``), decimals (up to 10 digits, 1-4
after the point) and versions (2-4 numbers up to 999): none is refused; on
100,000 random numbers up to 9999 joined by slashes (two or three): 258 (0.26%,
each ``1xx/xxxx/xxxx``, a mobile number's layout). What no detector can tell
apart: a bare 11-digit number starting 13-19 is a mobile number (7% of random
11-digit numbers), and a bare 16-digit one with a card prefix and a Luhn digit a
card (2.4% of random 16-digit numbers; 0.1% of 17-19 digit ones, such as order ids).

Shipping addresses, measured (``tests/pii/test_detect_address.py``): of 100,000 notes
of one to four clauses drawn from what these fields carry (dates in digits and Chinese
numerals, ``直播间3号链接``, ``38码``, ``5号电池``, ``1号线``, ``5层``, ``3室2厅``,
``第3单元课程``, provinces, cities and districts, roads without a number, tracking and
order ids, amounts, case numbers, words ending in 道 or 里 before a date), none is
refused; of 100,000 addresses in the layouts above, none is missed. Before a date
(``…3号发货``), the words of jieba's dictionary (0.42.1; place and person names left
out) that end in 路 街 巷 胡同 read as a road for 24% of their uses, counted by its
frequencies: road words themselves (公路, 马路, 山路, 二路 as in 科技二路) and 一路
(``all the way``, but 科技一路 too); those in 道 and 里 for 3.0%, 12.5% after a
district (大道 a quarter of it; then 御道, 山道, 五里, 人行道, …).

Names, measured (``tests/pii/test_detect_name.py``): of 100,000 notes of one to four
clauses (the address test's notes, and labels and role words followed by what is no name:
``收件人未填写``, ``买家马上到``, ``买家向平台投诉``, a comma and a new clause
``收件人，周一送达``, masked names, surnames with a title), none is refused; of 100,000
labelled names (one of 253 single surnames, or one time in twenty of 37 compound ones,
and one or two of 150 characters common in given names; one in ten after a comma or
split by a blank, ``收件人，张伟，``, ``收件人：张 伟``), 303
(0.30%) are missed, each a surname and a character that begin a word (黄山, 王家, 全文,
时光, 周一). After a label, the words of jieba's dictionary (0.42.1; person and place
names left out) read as a name after 收件人 and before a comma for 0.43% of their uses
by its frequencies, rare words that begin with a surname (盛名, 白果, 游荡); of its 20,000
commonest such words, 233 (1.2%, measured at 4c3b6c0, before the words analysts write
after a label were listed). After a role word and a comma none does (14 rare words in
all, each ending in a saying: 武侠小说); before 037912a and the saying rule, 0.40%.
After 收件人 and a comma (a name standing alone there: ``收件人，张伟，``), a word followed
by more text is read as a name for 0.0005% of the dictionary's uses (31 rare words:
武侠小说, 白头偕老), one followed by a comma for 0.38% (the rare words above). Its place
names between 收件人 and a comma: 2.43% of their uses; after 收件人 and a comma, standing
alone, 1.71% (江城, 沙湾, 苏北; 2.07% before a place's last character, 区 县 市 港 …, was
read as no name's). A 256 KiB text of labels is read in 0.02-0.8 s (free text is at
most 1,024 characters).
"""

from __future__ import annotations

import datetime
import enum
import itertools
import re

from riskd.errors import InvalidArgumentError
from riskd.pii.blind import _CN_GEOGRAPHIC, _DASHES, _INVISIBLE_CHAR, _nfkc
from riskd.pii.names import labelled_name


class PiiKind(enum.StrEnum):
    """What a detector found, as an error message says it."""

    MOBILE = "a mobile phone number"
    LANDLINE = "a landline phone number"
    ID_NUMBER = "a resident ID number"
    BANK_CARD = "a bank card number"
    EMAIL = "an e-mail address"
    ADDRESS = "a shipping address"
    NAME = "a person's name"


# A number: digit groups split by spaces or tabs (not a line break: numbers one a line
# are a list), one dash (spaces either side or not), one dot or slash, or a closing
# bracket (``(010) 1234-5678``, ``+86 (0)138…``); a group may open with a bracket
# (``+86(0)10…``), and the ID number's check letter may end it. ``+`` or letters before
# it are read from the text around the match. Possessive quantifiers: no backtracking,
# so a long input costs time in proportion to its length.
_BLANK = r"[ \t]*+"
_SPLIT = rf"{_BLANK}[{_DASHES}]{_BLANK}|[ \t]++|[./]|{_BLANK}\){_BLANK}"
_NUMBER = re.compile(rf"\(?+[0-9]++(?:(?:{_SPLIT})?+\(?+[0-9]++)*+[Xx]?")
_GROUP = re.compile(r"[0-9]+[Xx]?")
_WEAK_GAP = frozenset("./")
"""Separators that also split decimals, dates, IP addresses, versions and ratios: they join
only a phone's groups, 3 or 4 digits and then 4 (``138.1234.5678``, ``0571/8888/8888``;
3 or 4 after an area code: ``0571.888.8888``), never ``1381234.5678``,
``172.160.100.20`` or ``1500/2300/800``."""
_WEAK_GROUP = range(3, 5)
_MIN_CARD_DIGITS, _MAX_DIGITS = 15, 19  # the shortest and the longest card number
_CN_MOBILE = re.compile(r"1[3-9][0-9]{9}")
_AREA_CODE = re.compile(r"0(?:10|2[0-9]|(?!400|800)[3-9][0-9]{2})")
"""A Chinese geographic area code with its trunk 0: 010 Beijing, 02x, or 0 and three
digits (``riskd.pii.blind``'s fixed lines; 400 and 800 numbers are not geographic)."""
_SUBSCRIBER = re.compile(r"[1-9][0-9]{6,7}")
_MAX_NATIONAL = 12  # a trunk 0, a three-digit area code and eight digits
_ID_NUMBER = re.compile(r"(?:1[1-5]|2[1-3]|3[1-7]|4[1-6]|5[0-4]|6[1-5]|71|8[1-3])[0-9]{15}[0-9X]")
"""A province-level code (71 Taiwan, 81 Hong Kong, 82 Macao; 83 begins the residence
permits of Taiwan residents, which carry the same check), 15 digits, a check character."""
_ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))
_ID_CHECK = "10X98765432"
_CARD_PREFIXES: dict[int, tuple[tuple[int, int], ...]] = {
    15: ((34, 34), (37, 37)),
    16: (
        (4, 4),
        (51, 55),
        (2221, 2720),
        (3528, 3589),
        (6011, 6011),
        (62, 62),
        (644, 649),
        (65, 65),
    ),
    17: ((62, 62),),
    18: ((62, 62),),
    19: ((62, 62), (9558, 9559)),
}
"""Issuer prefix ranges (inclusive) by card length."""
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?![A-Za-z0-9])"
)


# A shipping address: a house number after a road, a building's parts, a room, a village's
# group. Every number opens at the start of its run (``(?<![0-9])``), and the quantifiers
# are possessive: a match begins only at a road word, a number's first digit or letter
# or a village, and reads the runs after it twice at most (a road's section, ``三段``, is
# tried first), so a long text costs time in proportion to its length.
_CN_DIGITS = "零〇一二三四五六七八九十百"
"""Chinese numerals as house numbers use them (``十八号``, ``三组``); not 两 or 千 (``两栋``
is a count)."""
_HOUSE = rf"(?:(?<![0-9])[0-9]++|(?<![{_CN_DIGITS}])[{_CN_DIGITS}]++)"
_GAP = r"[ \t]*+"
_ROAD_HOUSE = re.compile(
    rf"(?:胡同|[路街巷道里]){_GAP}(?:{_HOUSE}{_GAP}段{_GAP})?+"
    rf"{_HOUSE}(?:{_GAP}[-之]{_GAP}{_HOUSE})?+{_GAP}[号號弄](?![线綫码碼])"
)
"""A road, street, lane or alley and a house number (``文三路 90 号``, ``长安街十八号``,
``长乐路123弄``, ``90-2号``, ``人民南路三段17号``); not a metro line (``1号线``) or ``号码``."""
_NOT_A_ROAD = {
    "路": "线电网思套销出走赶上半退门道铁各行去指引前迷带让修来归领拦回通顺开探问短链之",
    "街": "上逛满当过出游沿",
    "道": "知说报问难一两喝答写喊味轨通渠频管公地力跑声车故河穴隧航赤八交言绕吸"
    "肠水信称念唱世霸门铁街",
    "里": "这那哪公心家手城嘴屋眼怀夜村山房地口院店县市区镇乡省厂群单包车仓库间"
    "箱袋盒万千百故海宫肚庙数棚内寺队园子下",
}
"""The characters before a road's that make a word that is no road and stands before a
date or a list item (``线路3号恢复``, ``知道3号发货``, ``直播间里2号链接``): the most
frequent such words of a Chinese dictionary (jieba's), and what outcome notes say
(``订单里``, ``群里``)."""
_LOOSE_ROADS = frozenset("道里")
"""道 and 里 end many more words: they count as a road only after a province, city,
district, county or town in the same phrase (``和平区成都道100号``, ``朝阳区团结湖北里5号``),
and 道 after 大 (``深南大道6008号``) always."""
_PLACES = frozenset("省市区县镇乡")
_PHRASE_END = frozenset("，,。.；;！!？?：:\n")
_PLACE_WINDOW = 16  # characters looked back for a place before 道 or 里
_UNIT = (
    rf"(?:{_HOUSE}{_GAP}(?:[栋幢棟]|[号號][楼樓院]|[单單]元)"
    rf"|(?<![A-Za-z0-9])[A-Za-z]{_GAP}[栋幢棟座])"
)
_NEXT_PART = (
    rf"(?:{_HOUSE}{_GAP}(?:[栋幢棟]|[号號][楼樓院]?|[单單]元|[层層楼樓室房])"
    rf"|(?<![0-9])[0-9]{{3,4}}+(?![0-9年元页件个次天]))"
)
_BUILDING = re.compile(rf"{_UNIT}{_GAP}(?:[{_DASHES}]{_GAP})?+{_NEXT_PART}")
"""A building, a compound or a unit and another part after it (``A栋1203室``,
``5号楼2单元1801``, ``3号院1号楼``, ``B座 12层``); one alone is not a home (``第3单元课程``),
nor a count after it (``A座2024年``, ``第2单元101页``)."""
_ROOM = re.compile(r"(?<![0-9])[0-9]{3,4}+[ \t]*+室(?![内外])")
"""A room with its floor (``1203室``); a flat's layout is not (``3室2厅``), nor ``室内``."""
_VILLAGE = re.compile(rf"村{_GAP}{_HOUSE}{_GAP}(?:[组組队隊社]|[号號](?![线綫码碼]))")
"""A village's group or house (``红旗村三组``, ``李家村15号``)."""


def find_pii(text: str) -> PiiKind | None:
    """The kind of personal data ``text`` seems to hold (the first of ``pii_kinds``), or None.

    >>> find_pii("买家电话 +86 138-1234-5678"), find_pii("顺丰 SF1234567890123 已签收")
    (<PiiKind.MOBILE: 'a mobile phone number'>, None)
    >>> find_pii("身份证 11010519491231002x"), find_pii("buyer@example.com 来信")
    (<PiiKind.ID_NUMBER: 'a resident ID number'>, <PiiKind.EMAIL: 'an e-mail address'>)
    >>> find_pii("卡号 6222 0212 3456 7890 128"), find_pii("订单 2023-12-01 12:30 ¥138.00")
    (<PiiKind.BANK_CARD: 'a bank card number'>, None)
    >>> find_pii("电话 138.1234.5678"), find_pii("座机 (010) 1234-5678")
    (<PiiKind.MOBILE: 'a mobile phone number'>, <PiiKind.LANDLINE: 'a landline phone number'>)
    >>> find_pii("IP 172.160.100.20 金额 1381234.5678"), find_pii("版本 2026.11.28")
    (None, None)
    >>> find_pii("收件人：张伟 已确认"), find_pii("收件人未填写，买家说已退款")
    (<PiiKind.NAME: "a person's name">, None)
    """
    kinds = pii_kinds(text)
    return kinds[0] if kinds else None


def pii_kinds(text: str) -> tuple[PiiKind, ...]:
    """Every kind of personal data ``text`` seems to hold, each once, in ``PiiKind``'s order:
    a refusal names them all, so one edit can clear the text.

    >>> pii_kinds("收件人：张伟，电话13812345678，杭州市文三路90号")
    (<PiiKind.MOBILE: 'a mobile phone number'>, <PiiKind.ADDRESS: 'a shipping address'>, \
<PiiKind.NAME: "a person's name">)
    >>> pii_kinds("订单 2023-12-01 已退款")
    ()
    """
    text = _INVISIBLE_CHAR.sub("", _nfkc(text))
    found: set[PiiKind] = set()
    if "@" in text and _EMAIL.search(text):
        found.add(PiiKind.EMAIL)
    for match in _NUMBER.finditer(text):
        kind = _scan_number(text, match)
        if kind is not None:
            found.add(kind)
    if _address(text):
        found.add(PiiKind.ADDRESS)
    if labelled_name(text):
        found.add(PiiKind.NAME)
    return tuple(kind for kind in PiiKind if kind in found) if found else ()


def has_address(text: str) -> bool:
    """Whether ``text`` holds a shipping address precise enough to find a home.

    >>> has_address("浙江杭州西湖区文三路 90 号"), has_address("幸福小区３栋２单元５０１")
    (True, True)
    >>> has_address("2024年3月1号发货，直播间2号链接"), has_address("商家在深圳市南山区发货")
    (False, False)
    """
    return _address(_INVISIBLE_CHAR.sub("", _nfkc(text)))


def _address(text: str) -> bool:
    """``has_address`` on a text already read (NFKC, no zero-width characters)."""
    if any(_road(text, m) for m in _ROAD_HOUSE.finditer(text)):
        return True
    return any(p.search(text) for p in (_BUILDING, _ROOM, _VILLAGE))


def _road(text: str, match: re.Match[str]) -> bool:
    """Whether a road word and a house number are a road's: not a word that merely ends in
    one (``线路``), and ``道`` or ``里`` after a place (``_LOOSE_ROADS``)."""
    at = match.start()
    before = text[at - 1] if at else ""
    if before and before in _NOT_A_ROAD.get(text[at], ""):
        return False
    if text[at] not in _LOOSE_ROADS or before + text[at] == "大道":
        return True
    for char in reversed(text[max(0, at - _PLACE_WINDOW) : at]):
        if char in _PHRASE_END:
            return False
        if char in _PLACES:
            return True
    return False


def refuse_pii(field: str, text: str) -> None:
    """Raise ``InvalidArgumentError`` naming ``field`` and every kind of personal data
    ``text`` seems to hold (never the data).

    >>> refuse_pii("detail", "客户手机13812345678")
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: detail: looks like it holds a mobile phone number; \
free text must not carry personal data
    >>> refuse_pii("reason", "收件人张伟，手机13812345678，卡号6222021234567890128")
    Traceback (most recent call last):
    riskd.errors.InvalidArgumentError: reason: looks like it holds a mobile phone number, \
a bank card number and a person's name; free text must not carry personal data
    """
    kinds = pii_kinds(text)
    if kinds:
        held = kinds[0] if len(kinds) == 1 else f"{', '.join(kinds[:-1])} and {kinds[-1]}"
        raise InvalidArgumentError(
            field, f"looks like it holds {held}; free text must not carry personal data"
        )


def _scan_number(text: str, match: re.Match[str]) -> PiiKind | None:
    """Check every run of whole groups of one number; groups glued to letters are skipped."""
    number = match.group()
    found = list(_GROUP.finditer(number))
    groups = [g.group().upper() for g in found]
    # whether the separator before each group is a dot or a slash (``_WEAK_GAP``)
    weak = [False] + [
        not _WEAK_GAP.isdisjoint(number[x.end() : y.start()]) for x, y in itertools.pairwise(found)
    ]
    start, end = match.span()
    if start and number[0] != "(" and _glued(text[start - 1]):
        groups, weak = groups[1:], weak[1:]
    elif _country_code(text, start, groups[0]):
        plus = start > 0 and text[start - 1] == "+"
        groups[0] = groups[0][2:] if plus else groups[0][4:]
        kind = _national(groups, fixed_line=plus or not groups[0])
        if kind is not None:
            return kind
    if end < len(text) and _glued(text[end]):
        groups, weak = groups[:-1], weak[:-1]
    for i in range(len(groups)):  # indexes, not slices: a long number stays linear
        kind = PiiKind.LANDLINE if _landline(groups, weak, i) else _run(groups, weak, i)
        if kind is not None:
            return kind
    return None


def _glued(char: str) -> bool:
    """An ASCII letter: digits beside it are an identifier (``JDVA13812345678``)."""
    return char.isascii() and char.isalpha()


def _joins(groups: list[str], weak: list[bool], j: int) -> bool:
    """Whether group ``j`` joins the one before it (a dot or slash between: ``_WEAK_GAP``)."""
    return not weak[j] or (len(groups[j - 1]) in _WEAK_GROUP and len(groups[j]) == 4)


def _run(groups: list[str], weak: list[bool], i: int) -> PiiKind | None:
    """The first kind that whole groups from ``i`` on read as, the shortest run first."""
    digits = ""
    for j in range(i, len(groups)):
        group = groups[j]
        # a lone digit joins nothing but a card's tail (``6222 0212 3456 7890 1``)
        if len(group) < 2 and len(digits) < _MIN_CARD_DIGITS:
            break
        if j > i and not _joins(groups, weak, j):
            break
        digits += group
        if len(digits) > _MAX_DIGITS:
            break
        kind = _classify(digits)
        if kind is not None:
            return kind
    return None


def _landline(groups: list[str], weak: list[bool], i: int) -> bool:
    """A fixed-line number from group ``i``: an area code of its own, then 7 or 8 digits
    (8 after 010 and 02x) in one or two groups of three digits or more (3 or 4 after a dot
    or a slash: an area code is 3-4 digits, an IP address's groups too few). Never glued to its
    area code: a bare ``05711234567`` is as likely a tracking number; and not times of
    day among more of them (opening hours ``0900-1800 1900-2100``: 0900 reads as an area
    code); three alone are a phone (``0755 2000 0000``: hypothesis found it taken for
    hours)."""
    if not _AREA_CODE.fullmatch(groups[i]):
        return False
    subscriber = ""
    for j in range(i + 1, min(i + 3, len(groups))):
        if len(groups[j]) < 3 or (weak[j] and len(groups[j]) not in _WEAK_GROUP):
            return False
        subscriber += groups[j]
        if _SUBSCRIBER.fullmatch(subscriber) and (len(subscriber) == 8 or len(groups[i]) == 4):
            return not _opening_hours(groups, i, j)
    return False


def _opening_hours(groups: list[str], i: int, j: int) -> bool:
    """Groups ``i`` to ``j`` all times of day (``hhmm``) and a time beside them too: hours
    come in start-end pairs, so a phone's three groups alone are not hours."""
    if not all(map(_time_of_day, groups[i : j + 1])):
        return False
    return (j + 1 < len(groups) and _time_of_day(groups[j + 1])) or (
        i > 0 and _time_of_day(groups[i - 1])
    )


def _time_of_day(group: str) -> bool:
    """``hhmm``: 0000 to 2359, and 2400, midnight as a closing time (``0900-1200 1400-2400``)."""
    if len(group) != 4 or not group.isdigit():
        return False
    return group == "2400" or (int(group[:2]) < 24 and int(group[2:]) < 60)


def _national(groups: list[str], *, fixed_line: bool) -> PiiKind | None:
    """What follows a country code (stripped from ``groups[0]``) as ``riskd.pii.blind``
    reads it: a mobile or, when ``fixed_line`` (after ``+86``, or a code written apart), a
    fixed line, its trunk 0 written or not (``+86 (0)10 1234 5678``), in any grouping."""
    digits = ""
    for group in groups:
        digits += group
        if len(digits) > _MAX_NATIONAL:
            break
        national = digits[1:] if digits.startswith("0") else digits
        if _CN_MOBILE.fullmatch(national):
            return PiiKind.MOBILE
        if fixed_line and _CN_GEOGRAPHIC.fullmatch(national):
            return PiiKind.LANDLINE
    return None


def _country_code(text: str, start: int, first: str) -> bool:
    """``+86…`` or ``0086…`` before a number."""
    if start and text[start - 1] == "+":
        return first.startswith("86")
    return first.startswith("0086")


def _classify(digits: str) -> PiiKind | None:
    if len(digits) == 11 and _CN_MOBILE.fullmatch(digits):
        return PiiKind.MOBILE
    if len(digits) == 18 and is_id_number(digits):
        return PiiKind.ID_NUMBER
    if digits.isdigit() and is_card_number(digits):
        return PiiKind.BANK_CARD
    return None


def is_id_number(text: str) -> bool:
    """An 18-character resident ID number: province code, birth date, MOD 11-2 check.

    >>> is_id_number("11010519491231002X"), is_id_number("110105194912310021")
    (True, False)
    """
    if not _ID_NUMBER.fullmatch(text):
        return False
    try:
        born = datetime.date(int(text[6:10]), int(text[10:12]), int(text[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2099:
        return False
    total = sum(int(c) * w for c, w in zip(text, _ID_WEIGHTS, strict=False))
    return _ID_CHECK[total % 11] == text[17]


def is_card_number(digits: str) -> bool:
    """A payment card number: an issuer prefix for its length and a valid Luhn digit.

    >>> is_card_number("4111111111111111"), is_card_number("4111111111111112")
    (True, False)
    """
    ranges = _CARD_PREFIXES.get(len(digits))
    if ranges is None:
        return False
    if not any(lo <= int(digits[: len(str(lo))]) <= hi for lo, hi in ranges):
        return False
    return luhn_valid(digits)


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits.

    >>> luhn_valid("79927398713"), luhn_valid("79927398710")
    (True, False)
    """
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0
