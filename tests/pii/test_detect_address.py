"""Shipping addresses in free text: an address that finds a home is refused, while dates,
list items, sizes, places and what outcome notes, ledger reasons and reveal reasons
carry pass."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from riskd.pii.detect import PiiKind, find_pii, has_address

ADDRESSES = [
    "买家地址广东省深圳市南山区科技园路1号A栋1203室",
    "收货地址：北京市朝阳区建国路88号SOHO现代城5号楼2单元1801",
    "浙江杭州西湖区文三路 90 号",
    "浙江杭州西湖区文三路\t90\t号",
    "文三路９０号",  # full-width digits
    "北京市东城区长安街十八号",  # Chinese numerals
    "北京市东城区长安街一百二十号",  # 百 (review: a numeral dropped went unnoticed)
    "上海市徐汇区长乐路１２３弄４５号",
    "文三路90-2号",
    "成都市武侯区人民南路三段17号",
    "深圳市南山区高新南一路6号",
    "深圳市福田区深南大道6008号",
    "天津市和平区成都道100号",
    "天津市和平区幸福大街新华里12号",  # the district 7 characters before 里
    "长沙县团结里5号",  # a county before 里
    "横店镇万盛里12号",  # a town (review: one place's character dropped went unnoticed)
    "城关乡团结里3号",
    "北京市朝阳区呼家楼街道团结湖北里5号",  # the district 10 characters before 里
    "星光大道88号",  # 大道 with no place before it
    "文三路90之2号",
    "北京市朝阳区团结湖北里5号楼",
    "东城区南锣鼓巷 8 号",
    "西城区百花深处胡同3号",
    "曹安公路4800号",
    "幸福小区3栋2单元501",
    "幸福小区5幢501",  # 幢, as Zhejiang writes it (review: untested)
    "幸福小區5棟12樓",  # traditional 棟 and 樓
    "幸福小区 5 栋 2 单元 1203 室",
    "阳光花园 B座 12层",
    "阳光花园B座-3单元",
    "万科城3号院1号楼",
    "幸福小区3栋12房",
    "快递放在3栋1楼",
    "三单元五〇二室",
    "华星科技大厦1203室",
    "湖南省衡阳县红旗村三组",
    "李家村5组15号",
    "红旗村三队",
    "红旗村3社",  # 社, as Sichuan writes a village's group (review: untested)
    "台北市中山區長安東路二段100號",  # traditional: 號
]

NOT_ADDRESSES = [
    "商家在深圳市南山区发货",
    "广东省的订单",
    "快递到了杭州转运中心",
    "快递到了文三路营业部",
    "2024年3月1号发货",
    "三月一号发货",
    "3号到货",
    "1号链接",
    "直播间2号链接",
    "直播间里2号链接缺货",
    "5号商品",
    "第3单元课程",
    "第一单元第二课无法播放",
    "5层收纳架",
    "三层置物架，两栋楼的邻居拼单",  # 两 counts, it is no house number
    "户型3室2厅，沙发太大",  # a layout: decided not an address
    "世纪大道2号线换乘口自提",  # a metro line after a road (review: untested)
    "视频里2号链接缺货",  # 里 with no place before it is no road (review: untested)
    "南山区仓库已发货。过道3号货架",  # a district in another sentence, each ending
    "南山区仓库已发货；过道3号货架",
    "南山区发货了吗？过道3号货架",
    "南山区仓库已发货！过道3号货架",
    "南山区仓库\n过道3号货架",
    "仓库B栋12点前截单",  # a time after a building, no room (review: untested)
    "B座500元押金已退",  # a count after a building, each of its words (review: untested)
    "仓库A栋300个货位已满",
    "B座365天不打烊",
    "第2单元120次课",
    "A栋20241201批次到货",  # a date: more digits than a room's
    "38码偏小",
    "5号电池漏液",
    "手机号码已脱敏",
    "地铁1号线附近自提",
    "5号楼",
    "我知道3号发货",
    "南山区的人都知道3号发货",
    "店里1号链接",
    "物流线路3号恢复",
    "网络链路3号恢复",
    "客服说这里2号补发",
    "订单里3号链接少发",
    "菜鸟驿站3号货架",
    "2024室内拖鞋",
    "2024室外烧烤架",
    "别墅户型10室4厅",
    "南山区仓库已发货，过道3号货架",  # the district is in another phrase than 道
    "仓库B栋120件已入库",
    "影城IMAX座 3层",  # a letter in a word is no building
    "A座2024年交付",
    "第2单元101页有错字",
    "案号(2024)浙0106民初1234号",
    "o-20261128-000123 SKU-A1024 x2",
    "顺丰 SF1234567890123 已签收",
    "",
]


@pytest.mark.parametrize("text", ADDRESSES)
def test_an_address_that_finds_a_home_is_refused_as_an_address(text: str) -> None:
    assert find_pii(text) == PiiKind.ADDRESS
    assert find_pii(f"买家备注：{text}，请尽快发货") == PiiKind.ADDRESS


@pytest.mark.parametrize("text", NOT_ADDRESSES)
def test_places_dates_list_items_and_sizes_are_not_addresses(text: str) -> None:
    assert find_pii(text) is None
    assert not has_address(text)


ROAD_LIKE_WORDS = [
    word
    for line in (
        "线路 电路 网路 思路 套路 销路 出路 走路 赶路 上路 半路 退路 门路 道路 铁路 各路",
        "行路 去路 指路 引路 前路 迷路 带路 让路 修路 来路 归路 领路 拦路 回路 通路 顺路",
        "开路 探路 问路 短路 链路 之路 上街 逛街 满街 当街 过街 出街 游街 沿街 知道 说道",
        "报道 问道 难道 一道 两道 喝道 答道 写道 喊道 味道 轨道 通道 渠道 频道 管道 公道",
        "地道 力道 跑道 声道 车道 故道 河道 穴道 隧道 航道 赤道 八道 交道 言道 绕道 吸道",
        "肠道 水道 信道 称道 念道 唱道 世道 霸道 门道 铁道 街道 这里 那里 哪里 公里 心里",
        "家里 手里 城里 嘴里 屋里 眼里 怀里 夜里 村里 山里 房里 地里 口里 院里 店里 县里",
        "市里 区里 镇里 乡里 省里 厂里 群里 单里 包里 车里 仓里 库里 间里 箱里 袋里 盒里",
        "万里 千里 百里 故里 海里 宫里 肚里 庙里 数里 棚里 内里 寺里 队里 园里 子里 下里",
    )
    for word in line.split()
]
"""Words that end in 路 街 道 里 and are no road, as ``riskd.pii.detect`` lists them."""


@pytest.mark.parametrize("word", ROAD_LIKE_WORDS)
def test_a_word_that_ends_like_a_road_before_a_date_is_not_an_address(word: str) -> None:
    """Each listed word, after a district too (review: the notes draw 12 of these 144, so one
    dropped from the list went unnoticed: 网路, 逛街, 手里)."""
    assert find_pii(f"{word}3号发货") is None
    assert find_pii(f"南山区{word}3号发货") is None


# The notes these fields carry, built from their pieces: a reported outcome's detail, a
# ledger request's reason, an analyst's reveal reason, a legal hold's reason.
PROVINCES = ["广东省", "浙江省", "北京市", "四川省", "湖南省", "江苏省", ""]
CITIES = ["深圳市", "杭州市", "成都市", "长沙市", "苏州市", "义乌", "广州", ""]
DISTRICTS = ["南山区", "西湖区", "余杭区", "武侯区", "朝阳区", "宝安区", "长沙县", "横店镇", ""]
ROADS = ["文三路", "科技园路", "建国路", "深南大道", "长安街", "南锣鼓巷"]
CARRIERS = ["SF", "JD", "JDVA", "YT", "ZTO", "JT"]
ITEMS = ["口红", "收纳架", "连衣裙", "奶粉", "电饭煲", "面膜", "沙发", "童鞋", "零食礼包"]
ROAD_ENDING_WORDS = ["我知道", "客服说这里", "店里", "物流线路", "直播间里", "订单里", "群里"]
LOOSE_WORDS = ["频道", "渠道", "味道", "通道", "那里", "哪里", "家里", "心里"]


def _number(rnd: random.Random, low: int, high: int) -> str:
    n = rnd.randint(low, high)
    if rnd.random() < 0.1:  # written in Chinese numerals
        return "零一二三四五六七八九十"[n] if n <= 10 else f"十{'一二三四五六七八九'[n % 10 - 1]}"
    if rnd.random() < 0.1:  # typed with a Chinese IME: full-width digits
        return str(n).translate({48 + d: 0xFF10 + d for d in range(10)})
    return str(n)


def _date(rnd: random.Random) -> str:
    day = _number(rnd, 1, 19)
    return rnd.choice(
        [
            f"{rnd.randint(2023, 2026)}年{rnd.randint(1, 12)}月{day}号",
            f"{rnd.randint(1, 12)}月{day}号",
            f"{day}号",
        ]
    )


def _place(rnd: random.Random) -> str:
    return rnd.choice(PROVINCES) + rnd.choice(CITIES) + rnd.choice(DISTRICTS)


def _tracking(rnd: random.Random) -> str:
    return rnd.choice(CARRIERS) + "".join(rnd.choices("0123456789", k=rnd.randint(12, 15)))


def _piece(rnd: random.Random) -> str:
    """One clause of a note (none holds a house number, a building's parts or a room)."""
    n, date, item = _number(rnd, 1, 19), _date(rnd), rnd.choice(ITEMS)
    return rnd.choice(
        [
            "已签收",
            "买家称未收到货",
            f"快递单号{_tracking(rnd)}",
            f"{_tracking(rnd)} 已揽收",
            f"直播间{n}号链接退款",
            f"{date}发起退款",
            f"{date}发货",
            f"{n}号链接的{item}少发一件",
            f"{n}号商品色差",
            f"商家在{_place(rnd)}发货",
            f"{_place(rnd)}的订单",
            f"快递到了{_place(rnd)}转运中心",
            f"已到达{_place(rnd)}营业部",
            f"{rnd.choice(ROADS)}营业点已揽件",
            f"{rnd.choice(ROADS)}站点{date}派送",
            f"{rnd.choice(ROAD_ENDING_WORDS)}{date}补发",
            f"{rnd.choice(ROAD_ENDING_WORDS)}{n}号链接缺货",
            f"{_place(rnd)}{rnd.choice(LOOSE_WORDS)}{n}号",
            f"{rnd.randint(34, 44)}码偏小",
            f"{n}号电池漏液",
            f"{item}（{n}层）到货破损",
            f"户型{rnd.randint(1, 4)}室{rnd.randint(1, 2)}厅，{item}尺寸不合适",
            f"第{n}单元课程无法观看",
            f"订单o-2026{rnd.randint(1, 12):02d}28-{rnd.randint(0, 999999):06d}重复付款",
            f"退款¥{rnd.randint(1, 99999)}.{rnd.randint(0, 99):02d}",
            f"SKU-A{rnd.randint(100, 9999)} x{rnd.randint(1, 5)}",
            f"菜鸟驿站{n}号货架",
            f"放在{n}楼前台",
            f"地铁{n}号线附近自提",
            "手机号码已脱敏",
            f"物流停滞超过72小时，{date}已补发",
            f"假货处罚 case/c-{rnd.randint(1, 99999)}，违规{n}次",
            f"先行赔付 dispute/d-{rnd.randint(1, 99999)}",
            f"核对收货地址是否在{_place(rnd)}",
            f"复核{date}投诉",
            f"{_place(rnd)}法院调取证据，案号(2024)浙0106民初{rnd.randint(1, 9999)}号",
        ]
    )


def note(rnd: random.Random) -> str:
    """A note of one to four clauses, joined the ways people write them (or not at all)."""
    pieces = [_piece(rnd) for _ in range(rnd.randint(1, 4))]
    return "".join(p + rnd.choice(["", "，", "。", " ", "；"]) for p in pieces)


def address(rnd: random.Random) -> str:
    """An address that finds a home, in one of the layouts buyers write."""
    road = rnd.choice(ROADS) + _number(rnd, 1, 19 if rnd.random() < 0.3 else 10) + "号"
    if rnd.random() < 0.3:
        road = rnd.choice(ROADS) + f" {rnd.randint(1, 999)} 号"
    room = f"{rnd.randint(1, 32)}0{rnd.randint(1, 4)}"
    building = rnd.choice(
        [
            f"{_number(rnd, 1, 19)}栋{rnd.randint(1, 3)}单元{room}",
            f"{rnd.choice('ABCD')}栋{room}室",
            f"{rnd.randint(1, 19)}号楼{_number(rnd, 1, 6)}单元{room}",
            f"{rnd.randint(1, 9)}号院{rnd.randint(1, 19)}号楼",
        ]
    )
    village = f"{rnd.choice(['红旗', '李家', '新华'])}村{_number(rnd, 1, 10)}组"
    return _place(rnd) + rnd.choice([road, building, road + building, village])


@given(st.randoms(use_true_random=False))
def test_no_generated_note_is_refused(rnd: random.Random) -> None:
    text = note(rnd)
    assert find_pii(text) is None, text


@given(st.randoms(use_true_random=False))
def test_every_generated_address_in_a_note_is_refused_as_an_address(rnd: random.Random) -> None:
    text = f"{note(rnd)}买家地址{address(rnd)}"
    assert find_pii(text) == PiiKind.ADDRESS, text


def test_false_positives_on_100k_generated_notes_are_as_measured() -> None:
    """The figures in riskd.pii.detect's docstring: 100,000 notes, 100,000 addresses."""
    rnd = random.Random(20261129)
    refused = [text for text in (note(rnd) for _ in range(100_000)) if find_pii(text)]
    assert refused == []
    missed = [text for text in (address(rnd) for _ in range(100_000)) if not has_address(text)]
    assert missed == []


@pytest.mark.parametrize(
    "text",
    [
        "路1" * 131_072,
        "路" + "1" * 262_143,
        "x道1号" * 65_536,  # each 道 looks back for a place: a bounded window
        "1栋x" * 87_381,
        "一" * 262_144,
        "A " * 131_072,
        "村 1 " * 65_536,
        "1单元x" * 65_536,
        ("1" + " " * 60 + "x") * 4_228,
    ],
)
def test_a_256_kib_text_is_scanned_for_addresses_in_linear_time(text: str) -> None:
    """Each number is read from its first digit only (``(?<![0-9])``): a regex trying every
    position of a run of n digits would read it n^2/2 times. 0.02-0.06 s measured."""
    started = time.process_time()
    assert not has_address(text)
    assert time.process_time() - started < 2.0
