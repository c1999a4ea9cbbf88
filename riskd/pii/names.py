"""Names in free text: a person's name where the text says it is one.

Where it sits: ``riskd.pii.detect.find_pii`` reads it beside the numbers, the e-mail and
the address, so every field that ``refuse_pii`` guards (an outcome's ``detail``, a ledger
request's ``reason`` and ``evidence``, a reveal's and a legal hold's ``reason``) refuses a
buyer's name as ``a person's name``.

A bare Chinese name cannot be told from other words (``高明``, ``马上``, ``江南``), so a
name counts only after a label that says one follows:

- a field label, whose value is a name: 姓名 (买家姓名, 真实姓名, …), 收件人, 收货人,
  寄件人, 发件人, 签收人, 取件人, 提货人, 联系人, 持卡人, 开户人, 户名 (开户名,
  账户名, 账户名称; not 用户名, 客户名 or 商户名…), 收款人, 付款人, 下单人,
  购买人, 投诉人, 申请人, each with 名字 or 名称 after it or not (``收件人名字``); then
  blanks, a colon, a dash, ``=``, a slash or bar, an opening bracket or quote, and one
  of 是 为 叫 (``收件人为张伟``), or none. Not 名字 alone, which shops and goods have
  too (``店铺名字``), nor ``名字段`` (a field: ``收件人名字段为空``);
- a role word, which a name may follow or not: 买家, 买方, 客户, 顾客, 用户, 消费者
  (``买家王小明说没收到``, ``买家已收货``). After a colon or ``=`` (``买家：李娜``) it is a
  field label; else the name must be the subject of what the buyer said or asked
  (说, 称, 表示, 反馈, 投诉, 要求, 申请, 来电, …: ``_SAYS``), since a role word is far
  more often followed by what the buyer is or has (``用户高风险，建议拦截``,
  ``买家陈皮收到后发霉``): ``买家王小明``, ``买家张伟的订单`` are not looked for. With
  名字 after it, a field label (``买家名字：张伟``, ``客户名字是李娜``); with 叫, 名叫 or
  叫做 after it, a name that stands alone or says something, as after a comma
  (``买家叫张伟说没收到``, ``客户名叫李娜，``; not ``买家叫师傅上门``: 叫 asks, too);
- after either, a comma (``，`` or ``、``) and a name that stands alone, since after a
  comma a new clause begins as often (``收件人，周一送达``, ``收件人，高度怀疑``): after a
  field label followed by punctuation, a bracket or quote, a blank, a digit, a title or
  the end (``收件人，张伟，电话…``, ``收件人，张伟（本人签收）``, ``收件人，张伟女士``), and
  not ending as a place does (``收件人，龙岗区，``: ``_PLACE_ENDS``); after a role word
  only by a saying (``买家，张伟说没收到``; ``用户，高消费，`` is no name). Likewise a name
  split by one blank after its surname (``收件人：张 伟``, ``收件人 张 伟 已签收``);
- an English label: ``name`` (``full name``, ``buyer name``, ``first_name``, …; not
  after another word, ``product name``, ``"shop_name"``), ``cardholder``, ``recipient``,
  ``consignee``, ``addressee`` (one capitalised word is enough), and ``buyer``, ``customer``,
  ``contact``, ``sender``, ``receiver`` (a colon after them, or two capitalised words);
  not when one of the first four capitalised words makes them a place, a business or a
  product (``sender: Shenzhen Warehouse``, ``customer Apple Watch``: ``_NOT_A_PERSON``).

A Chinese name is a surname (the commonest 253 single ones and 37 compound ones:
``_SURNAMES``, ``_COMPOUND_SURNAMES``) and one or two Han characters that can be in a
given name (not 的, 了, 说, 已, …: ``_NOT_GIVEN``); a Latin one, capitalised words
(``John Smith``, ``Zhang Wei``; not all capitals, ``VIP``, nor ``Unknown``, ``Support``,
…: ``_NOT_A_LATIN_NAME``). Not a name: a masked one (``张**``, ``张*明``, ``张某``, ``张x``:
what ``riskd.pii.mask.mask_name`` writes, and what analysts are told to write), a
surname with a title (``王先生``, ``李女士``, ``张总``, ``刘老师``: a surname alone finds
nobody), a label followed by what is no name (``收件人未填写``, ``联系人不详``,
``姓名已脱敏``, ``收件人电话错误``, ``买家说``, ``买家 已退款``), and a surname and the
character after it that begin a common word (``买家马上到``, ``收件人包裹丢失``,
``客户方面``: ``_NOT_A_NAME``), this trade's among them (``买家黄牛``,
``用户白嫖``, ``买家杨梅坏了``: ``_TRADE_WORDS``) and the words and adverbs analysts write
after a label (``收件人周三签收``, ``投诉人于直播间下单``, ``收件人曾拒收``:
``_ANALYSTS_WORDS``, ``_FUNCTION_WORDS``). What no detector tells apart: a real
name whose surname and first given character begin such a word is missed (``王国庆``,
``王家伟``, ``黄山``);
a name with neither label nor role word before it is not looked for (``张伟说没收到``);
and a surname and a rare word after a label read as a name (``收件人盛名在外``; after a
comma only when a comma or the end follows it, ``收件人，盛名，``).

Each label is matched once, as a literal, and what follows it is read for a bounded
number of characters, so a long text costs time in proportion to its length. The false
positives and misses measured: ``riskd.pii.detect``'s docstring.
"""

from __future__ import annotations

import re

from riskd.pii.blind import _DASHES, _INVISIBLE_CHAR, _nfkc


def _words(table: str) -> tuple[str, ...]:
    """The blank-separated words of a table below."""
    return tuple(table.split())


_SURNAMES = frozenset(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏"
    "魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付傅方白邹孟熊秦邱江尹薛闫阎段雷侯龙史陶黎贺顾毛郝"
    "龚邵万钱严覃武戴莫孔汤常温康施文牛樊葛邢安齐易乔伍庞颜倪庄聂章鲁岳翟殷詹申欧耿关兰焦俞左柳"
    "甘祝包宁尚符舒阮柯纪梅童凌毕单季裴霍涂成苗谷盛曲翁冉骆蓝路游辛靳管柴蒙鲍华喻祁蒲房滕屈饶解"
    "牟艾尤阳时穆农司卓古吉缪简车项连芦麦褚娄窦戚岑景党宫费卜冷晏席卫米柏宗瞿桂全佟应臧闵苟邬边"
    "卞姬师仇栾隋商刁沙荣巫寇桑郎甄丛仲虞敖巩明佘池查麻苑迟邝"
)
"""About the 250 commonest single surnames of the published rankings; 和 and 向 are left
out, being the conjunction and the preposition far more often (``收件人和下单人不一致``,
``买家向平台投诉``)."""
_COMPOUND_SURNAMES = frozenset(
    _words(
        "欧阳 司马 诸葛 上官 东方 皇甫 尉迟 公孙 慕容 长孙 宇文 司徒 令狐 夏侯 独孤 端木 西门 南宫"
        " 轩辕 呼延 申屠 澹台 公冶 太史 闻人 万俟 钟离 赫连 濮阳 淳于 单于 拓跋 百里 东郭 仲孙 司空"
        " 左丘"
    )
)
_NOT_A_NAME = {
    group[0]: frozenset(group[1:])
    for group in _words(
        "王国室家位 张湾 黄河金冈石色州陂土昏家连陵沙山花安海鳝豆 "
        "周围恩期边年刊末长岁到二身六日一黑 徐州 马克上来路蹄头力车铃列鞍里到 "
        "胡说乱须 何况必处以等时不在故人事种尝用 "
        "高速度级兴中校考原新手等于大温出层山低效呼尚声压血举涨产档空粱高位亢端分程地处职贵额铁 "
        "林区业中 罗马田 郑州重克 宋代朝 唐代朝 许多家久许 韩国版束 曾经 肖像 "
        "田地径间 董事 于是今昨前当本次近上下周月年日晚早中午凌 余种地家下万额年脉处 "
        "叶片 程度序 苏联州维丹格区泊宁 任务何期免职命教意用 沈阳 陆续地游上路 "
        "范围 金融属银额钱牌花牙星轮代丝台色箔子正黄 "
        "石首油头桥化门窟膏器碑壁湖墨子板块灰刻兽雕 夏天季 付出款费 "
        "方面法式向案针便言才程丈位形略可解 白色天沙衣马族鳍人家嫩俄 秦腔 "
        "江南夏陵苏湖西汉北山淮水面中河豚岸东流 雷电 龙头门大袍泉 史料学书记册 "
        "陶器瓷 黎族 顾及源虑不 毛主病尖笔衣巾 "
        "万元吨亩公岁美平历一年家多立万辆千物余分里人向股尾名个头事 钱币 "
        "严重格肃厉峻密谨禁寒守整惩刑酷 武汉器昌装当士力艺警官陵术将大备 莫非名大 "
        "常委常务见用规设有绿年住数人识驻言买 温度暖和带柔差州 康师 施工行展主加 "
        "文化学章物字件艺库献书理华人集武革官责科教凭体中本坛 牛肉奶车筋 葛洲 "
        "安全排装徽陆慰定置乡心理宁放庆踏 齐名国 易于 庞大 颜色 庄严重稼家 章程 "
        "岳家 申请报诉花 欧洲盟元阳亚美版莱 "
        "关系于键注心闭节联中头山税上切门口东押照外内 兰州蔻 焦点急山虑躁 "
        "左右手侧边臂派腿脚 甘肃泉蔗心 包括含围袱裹装机扎邮 宁夏愿波 尚书未无有且 "
        "符合号 舒服适 纪念录律要 童年话装鞋 凌晨 毕业竟生 "
        "单位独纯行一个元刀词板人打身体调号据子方 季节度风 涂料 "
        "成为立功绩长果员本分熟就都人效化交千型年虫因排书群品色名败像 苗族 谷地物子 "
        "盛产行大开 曲折线调子 骆驼 蓝色 路线上桥边过面径子灯口旁 "
        "游客行戏泳览击牧人离记子玩 辛亥苦 管理辖道家制事 柴油 蒙古牛 "
        "华北表山夏中侨盛人东南瑞沙为 房子间屋地中县里门价基产 屈原服辱 "
        "解决释放除开答散体读脱剖析毒救题说 艾滋 尤其为 阳性 "
        "时间候期代刻机辰分尚报常光时说而节任空日数速人 穆斯 "
        "农业民村产作历场田奴家药户用行牧夫 司法令机长空 "
        "古代墓城怪迹人典巴今希都称籍物时罗 吉林利 简单称介直历化易陋洁明 "
        "车程辆站上牌子间厢城体身长轮 项目 连续接忙连同夜声长锁年队成带日任 芦花苇 "
        "景点观区象色物 党中员委内组政派风 宫廷女中灯门里墙 费用力 冷静却冷战漠淡水 "
        "席位 卫生士兵队国衣龙 米兰饭色 宗教旨室族派 "
        "全国省部面市体球身年世都长党境军民力会书新然县家局场称文权城线方区邦心州程集队额款 "
        "应该用当付有聘届急城力试变为邀声酬 边缘界境防区上疆陲沿际 "
        "师父妹范长弟徒团资大 仇恨人 隋唐朝 "
        "商品业人量议城务店场贸用代朝洛学家标旅周定 沙漠市发湖河俄包 荣耀 巫山 "
        "丛书中 仲裁 巩固 明显确代朝清天日明年知亮末教儿史月细白 池河塘 "
        "查看询处出无到 麻烦袋布雀 迟疑早迟到 "
    )
}
"""The characters after a surname that begin a word, not a name (``马上``, ``高兴``,
``万公顷``): the first two characters of every word of jieba's dictionary (0.42.1) of
frequency 300 or more that begins with a surname, its person names left out; those of
orders and shops (付款, 包裹, 单号, 金额, colours, brands: 华为, 卫龙, 兰蔻); and ``东方``
that reads as the east (``东方红``, ``东方明珠``, ``东方航空``, ``东方甄选``)."""
_NOT_A_NAME["东方"] = frozenset("红明航甄不")
_TRADE_WORDS = _words(
    "黄牛 白嫖 马甲 钱包 高价 高仿 龙虾 鲍鱼 杨梅 李子 石榴 桂圆 柳丁 柳橙 车厘 包包 熊猫 孔雀"
    " 牛仔 石斛 常温 金条 金饰 秦椒 蒋记 冯记 毛绒 裴记 邵记 卢记 温泉 戴森 雷蛇 龙井 白茶"
    " 黄酒 红酒 叶酸 米粉 米线 花甲 燕窝 苏打 柏木 苗条 宫保 文胸 文玩 安踏 李宁 乔丹"
)
"""Words of this trade that begin with a surname and read as a name after a role word
(``买家黄牛``, ``用户白嫖``, ``买家马甲号``, ``买家杨梅坏了``): the scalpers, freeloaders and
sock puppets analysts write of, and goods of the platform's categories (food, beauty,
fashion, home); also brands named after a person (李宁, 乔丹), which no detector tells
from that person."""
_ANALYSTS_WORDS = _words(
    "周三 周四 周五 陈述 陈列 陈旧 雷同 连麦 解封 解绑 解冻 解约 高风 高频 高危 白条 白名 申通 商户"
    " 单笔 单日 单月 单周 全天 成天 时隔 查收 查验 查实 查明 房东 房客 房主 孙子 孙女 岳父 岳母"
    " 师傅 钟点 高净 白金 关机 连电 连快 连包 连货 连门 连话 车主 时段"
)
"""Words that begin with a surname and that analysts write right after a label, which the
dictionary's table above lacks (review: each refused as a name): week days (``收件人周三
签收``, ``买家周五来电称…``), 陈述 (``投诉人陈述属实``), 雷同 (``收件人姓名雷同``), the
live room's call-in (``用户连麦说…``), an account's unblocking (``用户解封申请``), risk
levels (``付款人高风险``, ``申请人高频申请``), 白条 and 白名单, a courier (申通) and a
merchant (``收款人为商户``); a phone switched off (``联系人关机``), 连 (even: ``收件人连电话
都不接``); limits per order and day (``付款人单笔支付超限额``,
``付款人单日支付20笔``), times (``收件人全天不在家``, ``投诉人时隔三天再次投诉``), checks
(``买家查收后称少件``, ``付款人查实为本人``), who took a parcel in (``收件人为房东``,
``收件人为孙子``, ``收件人为岳母``, ``联系人：师傅``, ``收件人为钟点工``, ``收件人，车主``),
member tiers (``客户：高净值``, ``用户：白金会员``) and a list of fields (``联系人、时段、
地址待确认``)."""
_FUNCTION_WORDS = {
    "于": "签收直平线网店评多同抖微淘京群私电客发付单第两三四五六七八九十每首事售订物快",
    "曾": "多来提电私留表致要申投反拒签更使以有收发下购用两三几先连屡试通出参遭作担任为"
    "询咨确否承同回"
    "工进认知开决",
    "应": "提补承返按予负尽立即遵配核视属以注支赔由进主先通联如",
    "时": "电提显发拒告联",
}
"""After a label, 于 (at, on) the preposition and 曾 (once), 应 (should) and 时 (when) the
adverbs far more often than the surnames, before the words that follow them in notes
(``收件人于签收后反馈``, ``投诉人于直播间下单``, ``投诉人曾多次来电``, ``买家曾来电称…``,
``申请人应提供凭证``, ``联系收件人时电话关机``; review: each refused as a name). A name
so spelt is missed (``于平``, ``应立``)."""
for _word in _TRADE_WORDS + _ANALYSTS_WORDS:
    _NOT_A_NAME[_word[0]] = _NOT_A_NAME.get(_word[0], frozenset()) | {_word[1]}
for _surname, _after in _FUNCTION_WORDS.items():
    _NOT_A_NAME[_surname] = _NOT_A_NAME.get(_surname, frozenset()) | frozenset(_after)
_NOT_A_NAME["西门"] = frozenset("保卫岗口外")  # the west gate (``签收人为西门保安``)
_NOT_GIVEN = frozenset(
    "的了着过吗呢吧啊呀么们个这那哪我你他她它您咱其之所以而且或但因则即便很太最挺再将"
    "能得地每各该此些说称讲问已未没不无在于和与及是也都就又还要想把被对向给从让等并跟比往到自"
    "某号件次块份买卖退寄拿取看穿吃喝做去走"
)
"""Characters a given name does not hold here: particles, pronouns, verbs of saying,
negations, prepositions and conjunctions, counters; and 某, a name masked (``张某``)."""
_SAYS = _words(
    "说 称 讲 问 表示 反映 反馈 投诉 要求 申请 申诉 声称 坚称 致电 来电 询问 咨询 催促 拒收 拒绝"
    " 同意 确认 承认 否认 坚持 希望 提出 留言 回复"
)
"""What a name after a role word is followed by (``买家张伟申请退款``, ``客户王小明 称未收到``):
the buyer saying or asking, so the words before it are a person."""
_TITLES = _words(
    "先生 女士 小姐 师傅 老师 老板 经理 总 姐 哥 叔 姨 阿姨 大爷 大妈 同学 老 律师 医生 警官 主管"
    " 主任 店长 厂长 队长 站长 组长 院长 科长 处长 局长 部长 所长 校长 太太 夫人 奶奶 爷爷 小哥"
)
"""After a surname, a title: no name (``王先生``)."""
_CN_LABEL = re.compile(
    "姓名|收件人|收货人|寄件人|发件人|签收人|取件人|提货人|联系人|持卡人|开户人|户名|收款人|付款人"
    "|下单人|购买人|投诉人|申请人|(?P<role>买家|买方|客户|顾客|用户|消费者)"
)
_NOT_A_LABEL_BEFORE = {"户名": "用客商"}
"""``用户名`` is a username, ``客户名单`` a list, ``商户名`` a shop's name (``商户名：刘记
烧烤``, ``商户名单中``; review: refused)."""
_NAME_WORDS = ("名字", "名称")
"""After a field label, words that say a name follows (``收件人名字：张伟``; and 称 after
户名, ``账户名称：张伟``; review: missed)."""
_SEPARATORS = frozenset(" \t:=([【「『《“‘\"'/|~>" + _DASHES)
"""Between a label and its value (``收件人：张伟``, ``姓名（张伟）``: NFKC reads full-width
colons and brackets as ASCII ones; ``收件人——张伟``, ``收件人/张伟/电话…``, ``收件人|张伟``,
``收件人『张伟』``: review, missed)."""
_MAX_SEPARATORS = 4
_BLANKS = frozenset(" \t")  # between a name after a role word and its saying
_COMMAS = frozenset(",、")  # NFKC reads ``，`` as ``,``
_PLACE_ENDS = frozenset("区县市省镇乡村港街路")
"""What ends a place's name, not a person's: a surname's character and one or two more
standing alone after a comma are a place then (``收件人，龙岗区，``, ``收件人，张家港，``;
review: refused)."""
_OPENINGS = frozenset("([{<【「『《“‘\"'")
_NAME_END = frozenset(" \t,、.。;:!?)]}>】」』》”’/|~" + _DASHES) | _OPENINGS
"""What ends a name that must stand on its own (after a comma, or split by a blank):
punctuation, a bracket or quote, a blank (``收件人，张伟（本人签收）``); or a digit, a title
(``收件人，张伟女士``), or the end of the text."""
_COPULAS = frozenset("是为叫")
_CALLED = ("名叫", "叫做", "叫")
"""After a role word, what says a name follows (``买家叫张伟说没收到``, ``客户名叫李娜``);
the name must then stand alone or say something, as after a comma, since 叫 also asks
someone to do a thing (``买家叫师傅上门``, ``买家叫商家补发``)."""
_EN_LABEL = re.compile(
    r"(?<![A-Za-z])(?:"
    r"(?:(?:buyer|customer|recipient|receiver|consignee|contact|cardholder|card[ \t_]holder"
    r"|account[ \t_]holder|sender|payee|payer|beneficiary|full|real|legal|first|last|given"
    r"|family|middle)(?:'s)?[ \t_-])?(?P<name>name)"
    r"|(?P<strong>cardholder|card[ \t]holder|recipient|consignee|addressee)"
    r"|buyer|customer|contact|sender|receiver"
    r")(?![A-Za-z])",
    re.IGNORECASE,
)
_LATIN_WORD = re.compile(r"[A-Z][a-z]{1,30}+(?:[-'][A-Za-z][a-z]{0,30}+)?(?![A-Za-z])")
_NOT_A_LATIN_NAME = frozenset(
    _words(
        "Unknown None Null Nil Not No Missing Redacted Masked Hidden Withheld Anonymous Guest"
        " Same Empty Blank Pending Required Invalid Wrong Changed Updated Verified Confirmed"
        " The This That Our Your His Her Their Is Was Has Had And Or Of On In At For To From"
        " With By As See Please Info Information Details Detail Address Phone Number Mobile"
        " Email Field Name Said Says Called Reported Requested Refund Request Order Support"
        " Service Team Care Center Centre Hotline App Account User Buyer Customer Seller"
        " Merchant Shop Store Platform Admin Agent Courier Driver Ltd Inc Co Company Limited"
        " Dispute Disputes Disputed Chargeback Authorization Authorisation Authentication"
        " Verification Mismatch Fraud Fraudulent Denied Declined Refused Unauthorized"
        " Unauthorised Does Did Present Absent Signature Claim Complaint Consent"
    )
)
"""Capitalised words after a label that are no name (``name: Unknown``, ``contact:
Support``), card networks' chargeback reasons among them (``Cardholder Dispute``, ``No
Cardholder Authorization``; review: refused)."""
_NOT_A_PERSON = frozenset(
    _words(
        "Warehouse Logistics Express Delivery Depot Hub Station Office Store Shop Mall Outlet"
        " Market Supermarket Factory Company Corp Corporation Group Trading Technology"
        " Technologies Electronics Industries Industry University College School Hospital"
        " Clinic Hotel Airport Road Avenue District City County Province Village Building"
        " Tower Plaza Center Centre Watch Phone Pad Pro Mini Plus Ultra Air Charger Cable"
        " Earbuds Headphones Speaker Laptop Tablet Camera Set Bag Shoes Sneakers Dress Shirt"
        " Jacket Cream Serum Lipstick Perfume Mask Powder Formula Bottle Vacuum Blender Fryer"
        " Cooker Kettle Purifier"
    )
)
"""Capitalised words that make the words before them a place, a business or a product, not
a person (``sender: Shenzhen Warehouse``, ``customer Apple Watch``, ``recipient: Yiwu
Logistics Center``): looked for among the capitalised words after a label, up to the
next field's label (``Name: John Smith City: London``). Words that are names as often
(Park, Max, Case, Kit, Street, Port, Branch) are left out."""
_MAX_LATIN_WORDS = 4


def has_name(text: str) -> bool:
    """Whether ``text`` holds a person's name after a label that says one follows.

    >>> has_name("收件人：张伟 已确认"), has_name("买家王小明说没收到")
    (True, True)
    >>> has_name("contact name: John Smith"), has_name("收件人未填写，买家说已退款")
    (True, False)
    >>> has_name("收件人：张**"), has_name("买家王先生称未收到"), has_name("买家马上到")
    (False, False, False)
    """
    return labelled_name(_INVISIBLE_CHAR.sub("", _nfkc(text)))


def labelled_name(text: str) -> bool:
    """``has_name`` on a text already read (NFKC, no zero-width characters)."""
    for match in _CN_LABEL.finditer(text):
        skip = _NOT_A_LABEL_BEFORE.get(match.group(), "")
        if match.start() and text[match.start() - 1] in skip:
            continue
        role = match.group("role") is not None
        if role and _name_word(text, match.end(), "名字"):  # ``买家名字：张伟``: a field
            named = match.end() + 2
            role = _value_start(text, named, copula=True) == named  # ``用户名字符``: none
        at = _value_start(text, _label_end(text, match, role=role), copula=not role)
        if role and any(c in ":=" for c in text[match.end() : at]):
            role = False  # ``买家：李娜``: a field's label
        called = _called(text, at) if role else 0
        if called:  # ``买家叫张伟说没收到``: a name standing alone or saying something
            role, at = False, _skip(text, at + called)
        alone = called > 0 or (at < len(text) and text[at] in _COMMAS)
        if alone and not called:  # ``收件人，张伟，电话…``
            at = _skip(text, at + 1, _BLANKS | _OPENINGS, 2)
        if _chinese_name(text, at, role=role, alone=alone):
            return True
        if not (role or alone) and _latin_name(text, at, 1):
            return True
    return any(_english_label_name(text, m) for m in _EN_LABEL.finditer(text))


def _called(text: str, at: int) -> int:
    """The length of 叫, 名叫 or 叫做 at ``at`` (after a role word: ``买家叫张伟``), or 0."""
    for word in _CALLED:
        if text.startswith(word, at):
            return len(word)
    return 0


def _label_end(text: str, match: re.Match[str], *, role: bool) -> int:
    """Where a label ends: after a field label, past 名字 or 名称 (``_NAME_WORDS``), and
    past 称 after 户名 (``账户名称``)."""
    end = match.end()
    if role:
        return end
    if match.group() == "户名" and text.startswith("称", end):
        return end + 1
    return end + 2 if _name_word(text, end, *_NAME_WORDS) else end


def _name_word(text: str, at: int, *words: str) -> bool:
    """One of ``words`` at ``at``, not a field's name (``名字段为空``)."""
    return text.startswith(words, at) and not text.startswith("段", at + 2)


def _value_start(text: str, at: int, *, copula: bool) -> int:
    """Where a label's value begins: after a few blanks, a colon, a dash or ``=``, and
    after a field label one of 是 为 叫 (``收件人为张伟``)."""
    at = _skip(text, at)
    if copula and at < len(text) and text[at] in _COPULAS:
        at = _skip(text, at + 1)
    return at


def _skip(
    text: str, at: int, chars: frozenset[str] = _SEPARATORS, most: int = _MAX_SEPARATORS
) -> int:
    """Past at most ``most`` of ``chars`` from ``at``."""
    end = min(len(text), at + most)
    while at < end and text[at] in chars:
        at += 1
    return at


def _chinese_name(text: str, at: int, *, role: bool, alone: bool = False) -> bool:
    """A surname at ``at`` and a given name after it, the surname read as a compound one
    first (``欧阳娜娜``), then as a single one (``欧阳``: 欧 and 阳). A name split by one
    blank (``张 伟``) must stand ``alone``, as one after a comma must."""
    for surname in (text[at : at + 2], text[at : at + 1]):
        if surname not in _COMPOUND_SURNAMES and surname not in _SURNAMES:
            continue
        given = at + len(surname)
        if _given_name(text, given, surname, role=role, alone=alone):
            return True
        if text.startswith(" ", given) and _given_name(
            text, given + 1, surname, role=role, alone=True
        ):
            return True
    return False


def _given_name(text: str, given: int, surname: str, *, role: bool, alone: bool) -> bool:
    """A given name at ``given`` after ``surname``. After a role word it must be followed
    by what the buyer said or asked (``_SAYS``, a blank or two between); one that must
    stand ``alone`` by that or by what ends a name (``_NAME_END``, a digit, the end)."""
    if not _given_char(text, given) or text.startswith(_TITLES, given):
        return False
    if text[given] in _NOT_A_NAME.get(surname, frozenset()):
        return False
    if not (role or alone):
        return True
    for end in (given + 1, given + 2):  # one or two given characters, then a saying
        if text.startswith(_SAYS, _skip(text, end, _BLANKS, 2)):
            return True
        if alone and not role and _name_ends(text, end) and text[end - 1] not in _PLACE_ENDS:
            return True
        if not _given_char(text, end) or surname == text[end] == "边":
            return False  # ``买家边哭边说``: 边…边…, while … while …
    return False


def _name_ends(text: str, at: int) -> bool:
    """Whether a name that stands alone may end at ``at``."""
    if at == len(text) or text[at] in _NAME_END or text[at].isdigit():
        return True
    return text.startswith(_TITLES, at)


def _given_char(text: str, at: int) -> bool:
    return at < len(text) and _han(text[at]) and text[at] not in _NOT_GIVEN


def _han(char: str) -> bool:
    """A CJK unified ideograph (the basic block and extension A)."""
    return "\u4e00" <= char <= "\u9fff" or "\u3400" <= char <= "\u4dbf"


def _english_label_name(text: str, match: re.Match[str]) -> bool:
    """A name after an English label: ``name`` not after another word (``product name``),
    and one capitalised word after ``name`` or a strong label, two after a role word
    unless a colon stands between."""
    start = match.start()
    if match.group("name") is not None and match.start("name") == start:
        before = text[max(0, start - _MAX_SEPARATORS) : start]
        word_end = before.rstrip(" \t_-")[-1:]
        if word_end != before[-1:] and word_end.isascii() and word_end.isalpha():
            return False  # ``product name``, ``"shop_name"``: another word's name
    at = _value_start(text, match.end(), copula=False)
    strong = match.group("name") is not None or match.group("strong") is not None
    words = 1 if strong or ":" in text[match.end() : at] else 2
    return _chinese_name(text, at, role=False) or _latin_name(text, at, words)


def _latin_name(text: str, at: int, words: int) -> bool:
    """``words`` capitalised words or more at ``at`` (``John Smith``), none a word
    that is no name (``_NOT_A_LATIN_NAME``), and none of the first four one that makes
    them a place, a business or a product (``_NOT_A_PERSON``)."""
    for n in range(_MAX_LATIN_WORDS):
        word = _LATIN_WORD.match(text, at)
        if word is None:
            return n >= words
        if n >= words and text.startswith(":", word.end()):
            return True  # the next field's label: ``Name: John Smith City: London``
        first = word.group().split("-")[0].split("'")[0]
        if first in _NOT_A_PERSON or (n < words and first in _NOT_A_LATIN_NAME):
            return False
        at = word.end()
        if at < len(text) and text[at] == " ":
            at += 1
    return True
