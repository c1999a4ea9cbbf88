"""Rule programs: compile facade, evaluation (hit, no hit, error isolation, modes, explain)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from riskd.domain.decision import Outcome
from riskd.domain.features import Agg, FeatureQuery
from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order
from riskd.domain.shop import ShopState
from riskd.dsl.diagnostics import Diagnostics
from riskd.dsl.program import (
    Mode,
    Program,
    RuleStatus,
    check_rules,
    compile_rules,
    content_version,
    load_rules,
    rule_files,
)
from riskd.errors import RuleCompileError

HEADER = 'scenario s = "a scenario"\nlist vip = ["b-vip"]\n'
NOW = 1_767_225_600.0
DEVICE_1H = FeatureQuery(Agg.COUNT, "device", "1h")


def rule(rid: str, when: str, *, mode: str = "active", action: str = "review") -> str:
    return (
        f'rule {rid} {{\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n'
        f"  mode = {mode}\n  action = {action}\n  score = 10\n  reason = R_{rid.upper()}\n"
        f"  when = {when}\n}}\n"
    )


def program_of(tmp_path: Path, *rules: str) -> Program:
    path = tmp_path / "p.rules"
    path.write_text(HEADER + "\n".join(rules), encoding="utf-8")
    return compile_rules(path)


def an_order(**kw: object) -> Order:
    base: dict[str, object] = {
        "order_id": "o-1",
        "buyer": Buyer(
            "b-1",
            account_age_days=3,
            phone="13812345678",
            address=Address("浙江省", "杭州市", "西湖区", "文三路 1 号"),
        ),
        "shop_id": "shop-1",
        "merchant_id": "m-1",
        "items": (Item("sku-1", "beauty", 30000, 2),),
        "amounts": Amounts(items=60000, total=60000),
        "device_id": "dev-1",
    }
    base.update(kw)
    return Order(**base)  # type: ignore[arg-type]


def by_id(results: tuple) -> dict:  # type: ignore[type-arg]
    return {r.rule_id: r for r in results}


def test_program_hit_and_no_hit(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("big", "order.amounts.total > 50000"),
        rule("small", "order.amounts.total < 100"),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW))
    assert res["big"].status is RuleStatus.HIT
    assert res["big"].action is Outcome.REVIEW and res["big"].reason_code == "R_BIG"
    assert res["small"].status is RuleStatus.NO_HIT


def test_program_one_rule_error_does_not_fail_the_others(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("divides", "order.amounts.total / order.amounts.coupon > 1"),
        rule("velocity", 'orders("device", "1h") > 3'),
        rule("fine", "order.amounts.total > 0"),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW))
    assert res["divides"].status is RuleStatus.ERROR and "division by zero" in res["divides"].error
    assert res["velocity"].status is RuleStatus.ERROR
    assert "count_per_device_1h" in res["velocity"].error
    assert res["fine"].status is RuleStatus.HIT


def test_program_error_messages_never_carry_pii(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("phone_int", "int(order.buyer.phone) > 0"),
        rule("phone_key", '{"x": 1}[order.buyer.phone] > 0'),
    )
    order = an_order(buyer=Buyer("b-1", phone="1381234567x"))
    for r in p.evaluate(order, ShopState("shop-1"), {}, NOW):
        assert r.status is RuleStatus.ERROR
        assert "1381234567x" not in r.error


@pytest.mark.parametrize("explain", [False, True])
def test_a_rule_reading_a_missing_velocity_value_is_an_error_whatever_its_operands_order(
    tmp_path: Path, explain: bool
) -> None:
    """docs/dsl.md: a missing velocity value makes the whole rule an error, not absorbed by
    ``||`` (review: ERROR with the velocity operand first, a hit with it last or divided;
    the fallback policy answers for such rules in degraded mode)."""
    p = program_of(
        tmp_path,
        rule("first", 'orders("device", "1h") > 20 || order.amounts.total > 500'),
        rule("last", 'order.amounts.total > 500 || orders("device", "1h") > 20'),
        rule("divided", 'orders("device", "1h") / 1 > 20 || order.amounts.total > 500'),
        rule("guarded", 'order.amounts.total < 0 && orders("device", "1h") > 20'),
        rule("fine", "order.amounts.total > 500"),
        # two missing values, neither met: the error names the first by name, every time
        rule(
            "two",
            'order.amounts.total > 500 || orders("ip", "1h") > 1 || orders("device", "1h") > 1',
        ),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW, explain=explain))
    for rid in ("first", "last", "divided", "guarded", "two"):
        assert res[rid].status is RuleStatus.ERROR
        assert res[rid].error == "missing feature count_per_device_1h"
    assert res["fine"].status is RuleStatus.HIT
    q = FeatureQuery(Agg.COUNT, "device", "1h")
    ip = FeatureQuery(Agg.COUNT, "ip", "1h")
    full = by_id(p.evaluate(an_order(), ShopState("shop-1"), {q: 0, ip: 0}, NOW, explain=explain))
    assert [r.status for r in full.values()] == [RuleStatus.HIT] * 3 + [RuleStatus.NO_HIT] * 1 + [
        RuleStatus.HIT
    ] * 2


def test_program_shadow_is_evaluated_and_disabled_is_skipped(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("shadowed", "true", mode="shadow"),
        rule("off", "true", mode="disabled"),
        rule("off_velocity", 'orders("ip", "24h") > 1', mode="disabled"),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW))
    assert set(res) == {"shadowed"}
    assert res["shadowed"].status is RuleStatus.HIT and res["shadowed"].mode is Mode.SHADOW
    assert [r.id for r in p.rules] == ["shadowed", "off", "off_velocity"]
    assert p.feature_queries == frozenset()  # disabled rules ask the store for nothing


def test_program_feature_queries_and_snapshot(tmp_path: Path) -> None:
    p = program_of(tmp_path, rule("burst", 'order.device_id != "" && orders("device", "1h") > 3'))
    assert p.feature_queries == {DEVICE_1H}
    hot = p.evaluate(an_order(), ShopState("shop-1"), {DEVICE_1H: 4}, NOW)
    cold = p.evaluate(an_order(), ShopState("shop-1"), {DEVICE_1H: 3}, NOW)
    assert hot[0].status is RuleStatus.HIT and cold[0].status is RuleStatus.NO_HIT


def test_program_a_velocity_rule_before_a_plain_one_reads_its_feature(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("burst", 'orders("device", "1h") > 3'),
        rule("big", "order.amounts.total > 1"),
    )
    res = p.evaluate(an_order(), ShopState("shop-1"), {DEVICE_1H: 4}, NOW)
    assert [r.status for r in res] == [RuleStatus.HIT, RuleStatus.HIT], res


def test_program_sees_lists_shop_now_and_enum_names(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("vip", "order.buyer.buyer_id in vip"),
        rule("frozen", "shop.frozen"),
        rule("live", "order.channel == Channel.LIVE_ROOM"),
        rule("year", "now.getFullYear() == 2026"),
    )
    order = an_order(buyer=Buyer("b-vip"), channel=Channel.LIVE_ROOM)
    res = by_id(p.evaluate(order, ShopState("shop-1", frozen=True), {}, NOW))
    assert {k for k, r in res.items() if r.status is RuleStatus.HIT} == {
        "vip",
        "frozen",
        "live",
        "year",
    }
    assert p.lists["vip"] == ("b-vip",)


def test_program_enum_namespaces_have_no_unspecified_member(tmp_path: Path) -> None:
    with pytest.raises(RuleCompileError) as refused:
        program_of(tmp_path, rule("unset", "order.channel == Channel.UNSPECIFIED"))
    assert "riskd_unknown_field: Channel has no field 'UNSPECIFIED'" in str(refused.value)


def test_program_an_empty_list_is_a_list_of_strings(tmp_path: Path) -> None:
    (tmp_path / "l.rules").write_text(
        'scenario s = "S"\nlist none = []\n' + rule("listed", "order.device_id in none"),
        encoding="utf-8",
    )
    p = compile_rules(tmp_path / "l.rules")
    res = p.evaluate(an_order(), ShopState("shop-1"), {}, NOW)
    assert [r.status for r in res] == [RuleStatus.NO_HIT]


def test_program_lists_behave_as_cel_lists(tmp_path: Path) -> None:
    (tmp_path / "l.rules").write_text(
        'scenario s = "S"\nlist nums = [3, 1, 2]\n'
        + rule("indexed", "nums[0] == 3 && size(nums) == 3 && 2 in nums && !(7 in nums)")
        + rule("macro", "nums.all(n, n > 0) && nums.map(n, n * 2)[2] == 4"),
        encoding="utf-8",
    )
    p = compile_rules(tmp_path / "l.rules")
    res = p.evaluate(an_order(), ShopState("shop-1"), {}, NOW)
    assert [r.status for r in res] == [RuleStatus.HIT, RuleStatus.HIT], res


def test_program_a_list_of_ints_and_doubles_holds_doubles(tmp_path: Path) -> None:
    """A list mixing ints and doubles is a ``list(double)``: its ints are doubles at run time."""
    (tmp_path / "l.rules").write_text(
        'scenario s = "S"\nlist limits = [1, 2.5]\n'
        + rule("typed", "type(limits[0]) == double && type(dyn(limits[0])) == double"),
        encoding="utf-8",
    )
    p = compile_rules(tmp_path / "l.rules")
    res = p.evaluate(an_order(), ShopState("shop-1"), {}, NOW)
    assert [r.status for r in res] == [RuleStatus.HIT], res
    assert [type(v) for v in p.lists["limits"]] == [float, float]


def test_program_explain_fills_hits_only(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule("new_big", "order.buyer.account_age_days < 7 && order.amounts.total > 50000"),
        rule("never", "order.amounts.total < 0"),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW, explain=True))
    text = "\n".join(res["new_big"].explanation)
    assert "order.amounts.total > 50000" in text and "60000" in text
    assert res["never"].explanation == ()
    plain = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW))
    assert plain["new_big"].explanation == ()


def test_program_version_is_a_content_hash(tmp_path: Path) -> None:
    a = program_of(tmp_path, rule("r", "true"))
    b = program_of(tmp_path, rule("r", "true"))
    c = program_of(tmp_path, rule("r", "false"))
    assert a.version == b.version != c.version
    assert len(a.version) == 16


def test_program_version_is_the_same_wherever_the_files_are_mounted(tmp_path: Path) -> None:
    """Replicas with their rule files under other folders, or listed in another order,
    record one rules version; a renamed file is another version."""
    texts = {"a.rules": HEADER + rule("a", "true"), "b.rules": rule("b", "false")}
    versions = set()
    for where in ("one", "two/deeper"):
        folder = tmp_path / where
        folder.mkdir(parents=True)
        for name, text in texts.items():
            (folder / name).write_text(text, encoding="utf-8")
        versions.add(load_rules(folder).version)
    assert len(versions) == 1
    swapped = {name: texts[name] for name in reversed(list(texts))}
    assert content_version(swapped) == content_version(texts) in versions
    assert (
        content_version({"c.rules": texts["a.rules"], "b.rules": texts["b.rules"]}) not in versions
    )


def test_compile_rules_raises_with_every_diagnostic(tmp_path: Path) -> None:
    (tmp_path / "a.rules").write_text(HEADER + rule("a", "order.nope > 1"), encoding="utf-8")
    (tmp_path / "b.rules").write_text(rule("b", "true", mode="loud"), encoding="utf-8")
    with pytest.raises(RuleCompileError) as info:
        load_rules(tmp_path)
    diags = info.value.diagnostics
    assert isinstance(diags, Diagnostics)
    assert {d.code for d in diags} == {"riskd_unknown_field", "riskd_unknown_mode"}
    assert "a.rules:" in str(info.value) and "b.rules:" in str(info.value)


def test_compile_rules_reports_unreadable_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rules"
    bad.write_bytes(b"\xff\xfe rule")
    with pytest.raises(RuleCompileError, match="riskd_unreadable_file"):
        compile_rules(bad)
    gone = tmp_path / "gone.rules"
    with pytest.raises(RuleCompileError) as info:
        compile_rules(bad, gone)
    diags = info.value.diagnostics
    assert isinstance(diags, Diagnostics)
    assert [(d.code, d.message, d.file) for d in diags] == [
        ("riskd_unreadable_file", "rule file not UTF-8 text", str(bad)),
        ("riskd_unreadable_file", "rule file cannot be read", str(gone)),
    ]


def test_program_is_immutable_and_shared_by_threads(tmp_path: Path) -> None:
    p = program_of(tmp_path, rule("big", "order.amounts.total > 50000"))
    with pytest.raises(AttributeError):
        p.version = "x"  # type: ignore[misc]
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(200):
                assert p.evaluate(an_order(), ShopState("s"), {}, NOW)[0].status is RuleStatus.HIT
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_starter_rules_compile_and_cover_every_scenario() -> None:
    program = load_rules(Path(__file__).resolve().parents[2] / "rules")
    covered = {s for r in program.rules if r.mode is Mode.ACTIVE for s in r.scenarios}
    assert covered == set(program.scenarios)
    assert len(program.rules) >= 25
    for r in program.rules:
        ids = [t for t in program.tests if r.id in t.expect]
        assert ids, f"rule {r.id} has no test case that expects it to fire"


def test_program_fused_and_rule_by_rule_paths_agree_on_every_starter_case() -> None:
    from riskd.dsl.ruletest import features_for

    program = load_rules(Path(__file__).resolve().parents[2] / "rules")
    assert program._fused is not None, "the starter rules should evaluate as one fused function"
    for t in program.tests:
        feats = features_for(program, t)
        fused = program.evaluate(t.order, t.shop, feats, t.now)
        act = program.activation(t.order, t.shop, feats, t.now)
        assert fused == program._evaluate_each(act, t.order), t.name
    # and with a feature missing, both report the same per-rule errors
    t = program.tests[0]
    fused = program.evaluate(t.order, t.shop, {}, t.now)
    each = program._evaluate_each(program.activation(t.order, t.shop, {}, t.now), t.order)
    assert fused == program._missing(each, {})
    assert any(r.status is RuleStatus.ERROR for r in fused)
    assert any(r.status is not RuleStatus.ERROR for r in fused)


def test_program_explanations_never_quote_pii(tmp_path: Path) -> None:
    p = program_of(
        tmp_path,
        rule(
            "pii",
            'order.buyer.phone.startsWith("138") && order.buyer.address.detail != ""'
            ' && order.device_id == "dev-1" && size(order.buyer.phone) == 11',
        ),
    )
    res = by_id(p.evaluate(an_order(), ShopState("shop-1"), {}, NOW, explain=True))
    text = "\n".join(res["pii"].explanation)
    assert res["pii"].status is RuleStatus.HIT
    assert "order.buyer.phone" in text
    for secret in ("13812345678", "1381234", "文三路", "dev-1"):
        assert secret not in text


def test_rule_files_of_a_configmap_mount_and_hidden_temp_files(tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``..<timestamp>/`` files behind ``..data`` and
    top-level symlinks; an atomic writer leaves ``.tmp…`` files. Each rule counts once."""
    root = tmp_path / "rules"
    real = root / "..2026_11_26_10_00_00.123"
    real.mkdir(parents=True)
    (real / "p.rules").write_text(HEADER + rule("big", "order.amounts.total > 50000"))
    (root / "..data").symlink_to(real.name)
    (root / "p.rules").symlink_to("..data/p.rules")
    (root / ".p.rules.tmp1234.rules").write_text("rule half-written {")
    files = rule_files(root)
    assert files == (root / "p.rules",)
    assert [r.id for r in compile_rules(*files).rules] == ["big"]


def test_rule_files_in_a_subfolder_of_a_configmap_mount(tmp_path: Path) -> None:
    """Review: an item at ``team_a/p.rules`` is mounted as ``team_a -> ..data/team_a``, a
    folder symlink ``Path.rglob`` does not follow: its rules were never loaded. A link
    back up to the rules folder is read once, not forever."""
    root = tmp_path / "rules"
    real = root / "..2026_11_27_10_00_00.123"
    (real / "team_a").mkdir(parents=True)
    (real / "p.rules").write_text(HEADER + rule("big", "order.amounts.total > 50000"))
    (real / "team_a" / "q.rules").write_text(rule("small", "order.amounts.total < 10"))
    (real / "team_a" / "up").symlink_to("../..")  # a cycle: ..data/team_a/up -> rules
    (root / "..data").symlink_to(real.name)
    (root / "p.rules").symlink_to("..data/p.rules")
    (root / "team_a").symlink_to("..data/team_a")
    # links that lead out of the rules folder are not followed, as before (review)
    (tmp_path / "rules.prev").mkdir()
    (tmp_path / "rules.prev" / "old.rules").write_text(rule("big", "true"))
    (root / "prev").symlink_to("../rules.prev")
    (root / "parent").symlink_to("..")
    files = rule_files(root)
    assert files == (root / "p.rules", root / "team_a" / "q.rules")
    assert sorted(r.id for r in compile_rules(*files).rules) == ["big", "small"]


def test_rule_files_are_files(tmp_path: Path) -> None:
    """A folder named like a rule file is searched, not read as one; a pipe is never
    opened (reading it would hang the reload)."""
    (tmp_path / "p.rules").write_text(HEADER + rule("big", "order.amounts.total > 50000"))
    (tmp_path / "archive.rules").mkdir()
    (tmp_path / "archive.rules" / "q.rules").write_text(rule("small", "false"))
    os.mkfifo(tmp_path / "pipe.rules")
    files = rule_files(tmp_path)
    assert files == (tmp_path / "archive.rules" / "q.rules", tmp_path / "p.rules")
    assert sorted(r.id for r in load_rules(tmp_path).rules) == ["big", "small"]


def test_a_rule_file_link_to_nothing_fails_the_load_naming_it(tmp_path: Path) -> None:
    """A ``*.rules`` link whose target was deleted is an error of the whole load (the
    daemon keeps the rules it serves), never a rule set without that file's rules."""
    (tmp_path / "p.rules").write_text(HEADER + rule("big", "order.amounts.total > 50000"))
    (tmp_path / "q.rules").symlink_to("gone/q.rules")
    (tmp_path / "loop.rules").symlink_to("loop.rules")
    assert rule_files(tmp_path) == tuple(tmp_path / n for n in ("loop.rules", "p.rules", "q.rules"))
    _, diags = check_rules(*rule_files(tmp_path))
    assert [(d.code, Path(d.file).name) for d in diags] == [
        ("riskd_unreadable_file", "loop.rules"),
        ("riskd_unreadable_file", "q.rules"),
    ]


def test_program_rule_by_rule_path_agrees_on_hits_errors_and_non_bool_results(
    tmp_path: Path,
) -> None:
    """The path taken when a program cannot be fused gives each rule the result the fused
    one does: a ``when`` whose dyn value is not a bool (even a truthy one) is an ERROR."""
    p = program_of(
        tmp_path,
        rule("big", "order.amounts.total > 50000"),
        rule("small", "order.amounts.total < 100"),
        rule("divides", "order.amounts.total / order.amounts.coupon > 1"),
        rule("truthy", "dyn(order.amounts.total)"),
        rule("text", 'dyn(order.buyer.phone == "" ? true : "x")'),
        rule("one", "dyn(size(order.items))"),  # 1 == True in Python: still no bool
    )
    order, shop = an_order(), ShopState("shop-1")
    fused = p.evaluate(order, shop, {}, NOW)
    assert p._fused is not None
    assert fused == p._evaluate_each(p.activation(order, shop, {}, NOW), order)
    res = by_id(fused)
    assert [res[r].status for r in ("big", "small", "divides")] == [
        RuleStatus.HIT,
        RuleStatus.NO_HIT,
        RuleStatus.ERROR,
    ]
    for rid in ("truthy", "text", "one"):
        assert (res[rid].status, res[rid].error) == (
            RuleStatus.ERROR,
            "'when' did not produce a bool",
        )
