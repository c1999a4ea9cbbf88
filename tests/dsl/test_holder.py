"""Hot reload: broken files keep the running program; good ones swap in atomically."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest

from riskd.domain.order import Amounts, Buyer, Order
from riskd.domain.shop import ShopState
from riskd.dsl import holder as holder_module
from riskd.dsl.holder import SETTLE_S, ProgramHolder, RulesState, fingerprint
from riskd.dsl.program import RuleStatus
from riskd.errors import RuleCompileError

NOW = 1_767_225_600.0
ORDER = Order("o-1", Buyer("b-1"), "s-1", "m-1", amounts=Amounts(items=700, total=700))


def rules_text(prefix: str, threshold: int, n: int = 3, *, scenario: bool = True) -> str:
    out = ['scenario s = "S"\n'] if scenario else []
    for i in range(n):
        out.append(
            f'rule {prefix}{i} {{\n  description = "d"\n  owner = "o"\n  scenarios = [s]\n'
            f"  mode = active\n  action = review\n  score = 1\n  reason = R\n"
            f"  when = order.amounts.total > {threshold + i}\n}}\n"
        )
    return "\n".join(out)


def wait_for(cond: object, timeout: float = 5.0) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    (tmp_path / "main.rules").write_text(rules_text("a", 100), encoding="utf-8")
    return tmp_path


def test_holder_loads_at_start(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    assert [r.id for r in holder.current.rules] == ["a0", "a1", "a2"]
    assert holder.last_diagnostics.ok


def test_holder_refuses_to_start_on_broken_rules(tmp_path: Path) -> None:
    (tmp_path / "x.rules").write_text("rule broken {", encoding="utf-8")
    with pytest.raises(RuleCompileError, match="riskd_unterminated"):
        ProgramHolder(tmp_path)


def test_holder_broken_change_keeps_running_program(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    before = holder.current
    (rules_dir / "main.rules").write_text(rules_text("a", 100) + "\nrule bad { when = 1 +", "utf-8")
    (rules_dir / "other.rules").write_text("rule b {\n  mode = loud\n}\n", "utf-8")
    diags = holder.reload()
    assert not diags.ok
    assert {d.file for d in diags} == {
        str(rules_dir / "main.rules"),
        str(rules_dir / "other.rules"),
    }
    assert holder.current is before
    assert holder.last_diagnostics == diags


def test_holder_good_change_swaps(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    old = holder.current
    (rules_dir / "main.rules").write_text(rules_text("b", 1000), encoding="utf-8")
    assert holder.reload().ok
    new = holder.current
    assert new.version != old.version
    assert [r.id for r in new.rules] == ["b0", "b1", "b2"]
    # the old program is untouched: a request still holding it finishes with the old rules
    assert [r.status for r in old.evaluate(ORDER, ShopState("s-1"), {}, NOW)] == [
        RuleStatus.HIT
    ] * 3


def test_holder_unchanged_reload_keeps_the_same_object(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    before = holder.current
    assert holder.reload().ok
    assert holder.current is before


def test_holder_concurrent_readers_never_see_a_mixed_program(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    sets = {"a": ({"a0", "a1", "a2"}, RuleStatus.HIT), "b": ({"b0", "b1", "b2"}, RuleStatus.NO_HIT)}
    stop = threading.Event()
    problems: list[str] = []
    seen: set[str] = set()

    def reader() -> None:
        while not stop.is_set():
            program = holder.current
            results = program.evaluate(ORDER, ShopState("s-1"), {}, NOW)
            ids = {r.rule_id for r in results}
            prefix = next(iter(ids))[0]
            want_ids, want_status = sets[prefix]
            seen.add(prefix)
            if ids != want_ids or any(r.status is not want_status for r in results):
                problems.append(f"mixed program: {sorted(ids)}")

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            prefix, threshold = ("b", 1000) if i % 2 == 0 else ("a", 100)
            (rules_dir / "main.rules").write_text(rules_text(prefix, threshold), encoding="utf-8")
            assert holder.reload().ok
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not problems
    assert seen == {"a", "b"}


def test_holder_watcher_picks_up_edits_and_logs_each_outcome(
    rules_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="riskd.dsl.rules")
    holder = ProgramHolder(rules_dir)
    holder.start_watching(0.02)
    try:
        (rules_dir / "extra.rules").write_text(
            rules_text("c", 5, n=1, scenario=False), encoding="utf-8"
        )
        assert wait_for(lambda: holder.current.rule("c0") is not None)
        assert wait_for(lambda: len(caplog.records) == 1)
        assert caplog.records[0].getMessage().startswith("rules reloaded: ")
        (rules_dir / "extra.rules").write_text("rule c0 { mode = ", encoding="utf-8")
        assert wait_for(lambda: not holder.last_diagnostics.ok)
        assert holder.current.rule("c0") is not None  # the broken edit left the program alone
        assert wait_for(lambda: len(caplog.records) == 2)
        failed = caplog.records[1].getMessage()
        assert failed.startswith("rules reload failed; keeping version ")
        assert "extra.rules:1:" in failed
    finally:
        holder.stop()
    # a reload called directly (the daemon's wiring, which logs it with its metrics)
    caplog.clear()
    holder.reload()
    assert caplog.records == []


def test_holder_request_reload_wakes_the_watcher(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    holder.start_watching(3600.0)  # polling alone would never notice in time
    holder.start_watching(3600.0)  # already watching: no second thread
    try:
        assert [t.name for t in threading.enumerate()].count("riskd-rules-watch") == 1
        (rules_dir / "main.rules").write_text(rules_text("d", 1), encoding="utf-8")
        holder.request_reload()
        assert wait_for(lambda: holder.current.rule("d0") is not None)
    finally:
        holder.stop()
    holder.stop()  # idempotent


def test_a_same_size_edit_that_keeps_the_files_time_is_seen(rules_dir: Path) -> None:
    """Review: ``cp -p``, ``rsync -a`` or a tar deploy renames a new text of the same size
    into place with the old modification time; the watcher never saw it."""
    holder = ProgramHolder(rules_dir)
    main = rules_dir / "main.rules"
    st = main.stat()
    new = rules_dir / ".main.rules.tmp"
    new.write_text(rules_text("b", 100), encoding="utf-8")  # a0..a2 -> b0..b2: same size
    assert new.stat().st_size == st.st_size
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    new.replace(main)
    assert holder.changed()
    assert not holder.reload() and holder.current.rule("b0") is not None
    assert not holder.changed()
    time.sleep(0.02)  # past a coarse ctime tick (kernels before 6.13: 4 ms at HZ=250)
    st = main.stat()  # and written in place, its time set back after
    main.write_text(rules_text("c", 100), encoding="utf-8")
    os.utime(main, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert holder.changed()
    assert not holder.reload() and holder.current.rule("c0") is not None


def test_holder_emptied_directory_keeps_the_rules(rules_dir: Path) -> None:
    holder = ProgramHolder(rules_dir)
    before = holder.current
    (rules_dir / "main.rules").unlink()
    diags = holder.reload()
    assert [(d.code, d.message) for d in diags] == [
        ("riskd_no_rules", "no *.rules files in the rules directory")
    ]
    assert holder.current is before
    with pytest.raises(RuleCompileError, match="riskd_no_rules"):
        ProgramHolder(rules_dir)


def test_holder_emptied_files_keep_the_rules(rules_dir: Path) -> None:
    """Review: a directory whose rule files were all emptied compiled to no rules at all."""
    holder = ProgramHolder(rules_dir)
    before = holder.current
    (rules_dir / "main.rules").write_text("", encoding="utf-8")
    assert [d.code for d in holder.reload()] == ["riskd_no_rules"]
    assert holder.current is before


def test_a_file_written_in_place_is_reloaded_only_once_it_stays_the_same(
    rules_dir: Path,
) -> None:
    """Review: a file written in two pieces was reloaded after the first (it compiled: a
    cut at a rule's end) and that part of the rules was served until the rest came."""
    holder = ProgramHolder(rules_dir)
    holder.start_watching(0.02)
    seen: set[tuple[str, ...]] = set()
    try:
        path = rules_dir / "main.rules"
        whole = rules_text("e", 1, n=3)
        cut = whole.index("rule e1")
        with path.open("w", encoding="utf-8") as f:
            f.write(whole[:cut])  # rule e0 alone: compiles
            f.flush()
            until = time.monotonic() + SETTLE_S / 2  # the writer pauses, then writes the rest
            while time.monotonic() < until:
                seen.add(tuple(r.id for r in holder.current.rules))
                time.sleep(0.005)
            f.write(whole[cut:])
        assert wait_for(lambda: holder.current.rule("e2") is not None)
    finally:
        holder.stop()
    assert ("e0",) not in seen, seen
    assert [r.id for r in holder.current.rules] == ["e0", "e1", "e2"]


def test_a_reload_that_reads_files_being_written_keeps_the_old_rules(
    rules_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = ProgramHolder(rules_dir)
    before = holder.current
    compile_now = holder_module.compile_directory

    def written_meanwhile(directory: Path) -> object:
        out = compile_now(directory)
        (directory / "main.rules").write_text(rules_text("f", 7, n=4), encoding="utf-8")
        return out

    monkeypatch.setattr(holder_module, "compile_directory", written_meanwhile)
    (rules_dir / "main.rules").write_text(rules_text("f", 7, n=2), encoding="utf-8")
    assert [d.code for d in holder.reload()] == ["riskd_rules_changing"]
    assert holder.current is before
    assert holder.changed()  # the next round reads them again
    monkeypatch.setattr(holder_module, "compile_directory", compile_now)
    assert holder.reload().ok and holder.current.rule("f3") is not None


def test_a_holder_started_from_anothers_state_has_its_program_whatever_the_files_say(
    rules_dir: Path,
) -> None:
    """A scoring worker starts on its server process's rules: with an edit on disk that
    does not compile (refused there), it gets the program still served, and the edit
    after that is a change to both."""
    first = ProgramHolder(rules_dir)
    (rules_dir / "main.rules").write_text("rule broken {", encoding="utf-8")
    assert not first.reload().ok
    second = ProgramHolder(rules_dir, first.state())
    assert second.current.version == first.current.version
    assert not second.changed()  # the refused edit is not read again
    (rules_dir / "main.rules").write_text(rules_text("g", 3), encoding="utf-8")
    assert first.changed() and second.changed()
    assert second.reload().ok and first.reload().ok
    assert second.current.version == first.current.version
    assert second.current.rule("g2") is not None


def test_holder_an_unreadable_file_keeps_the_rules(rules_dir: Path) -> None:
    """A file that cannot be read is an error of the whole reload, never a rule set
    without that file's rules."""
    holder = ProgramHolder(rules_dir)
    before = holder.current
    (rules_dir / "other.rules").write_bytes(b"\xff\xfe rule")
    diags = holder.reload()
    assert [(d.code, d.file) for d in diags] == [
        ("riskd_unreadable_file", str(rules_dir / "other.rules"))
    ]
    assert holder.current is before


def test_holder_a_rule_file_whose_link_target_is_deleted_keeps_the_rules(
    rules_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A rule file kept elsewhere and linked in: deleted there, the reload fails naming
    the link, and the rules served stay whole (they lost its rules, silently)."""
    elsewhere = tmp_path_factory.mktemp("team") / "team.rules"
    elsewhere.write_text(rules_text("t", 1, scenario=False), encoding="utf-8")
    (rules_dir / "team.rules").symlink_to(elsewhere)
    holder = ProgramHolder(rules_dir)
    before = holder.current
    assert before.rule("t0") is not None
    elsewhere.unlink()
    assert holder.changed()
    diags = holder.reload()
    assert [(d.code, d.file) for d in diags] == [
        ("riskd_unreadable_file", str(rules_dir / "team.rules"))
    ]
    assert holder.current is before
    (rules_dir / "team.rules").unlink()  # the link removed too (a ConfigMap item dropped)
    assert holder.changed() and holder.reload().ok
    assert holder.current.rule("t0") is None and holder.current.rule("a0") is not None


def test_request_reload_reads_the_files_even_when_they_look_unchanged(rules_dir: Path) -> None:
    """SIGHUP reloads at once, whatever the fingerprint says: here a holder started from
    a state whose texts are not the files' (another process's program)."""
    served = RulesState("v", {str(rules_dir / "main.rules"): rules_text("s", 1)}, ())
    holder = ProgramHolder(rules_dir, served._replace(fingerprint=fingerprint(rules_dir)))
    assert holder.current.rule("s0") is not None and not holder.changed()
    holder.start_watching(3600.0)
    try:
        holder.request_reload()
        assert wait_for(lambda: holder.current.rule("a0") is not None)
    finally:
        holder.stop()


def test_the_watcher_survives_a_reload_that_crashes(
    rules_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    holder = ProgramHolder(rules_dir)
    compile_now = holder_module.compile_directory
    calls: list[Path] = []

    def crash_once(directory: Path) -> object:
        calls.append(directory)
        if len(calls) == 1:
            raise OSError("the mount went away")
        return compile_now(directory)

    monkeypatch.setattr(holder_module, "compile_directory", crash_once)
    (rules_dir / "main.rules").write_text(rules_text("k", 1), encoding="utf-8")
    holder.start_watching(3600.0)
    try:
        holder.request_reload()
        assert wait_for(lambda: len(calls) == 1)
        holder.request_reload()  # the next request is still served
        assert wait_for(lambda: holder.current.rule("k0") is not None)
    finally:
        holder.stop()
    assert "rules reload crashed; will retry on the next change" in caplog.text


def test_a_change_is_settled_only_once_it_stops_changing(rules_dir: Path) -> None:
    """``settled_change``: nothing changed is no change; a file that changes again while
    the holder waits is not settled yet (the watcher asks again at its next poll)."""
    holder = ProgramHolder(rules_dir)
    assert not holder.settled_change(threading.Event(), 0.0)
    path = rules_dir / "main.rules"
    whole = rules_text("e", 1, n=3)
    path.write_text(whole[: whole.index("rule e1")], encoding="utf-8")

    class WriterGoesOn(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            path.write_text(whole, encoding="utf-8")  # the rest, written meanwhile
            return False

    assert not holder.settled_change(WriterGoesOn(), 0.0)
    assert holder.settled_change(threading.Event(), 0.0)
    stopping = threading.Event()
    stopping.set()
    assert not holder.settled_change(stopping, 0.0)


def test_a_holder_adopts_anothers_program_and_its_view_of_the_files(rules_dir: Path) -> None:
    """A scoring worker takes its server's program after each reload there (``state`` ->
    ``adopt``): the same program, the same files as read, and a refused state changes
    nothing."""
    server, worker = ProgramHolder(rules_dir), ProgramHolder(rules_dir)
    (rules_dir / "main.rules").write_text(rules_text("h", 5), encoding="utf-8")
    assert server.reload().ok and worker.changed()
    assert worker.adopt(server.state()).ok
    assert worker.current.version == server.current.version
    assert worker.current.rule("h0") is not None
    assert not worker.changed()  # the files the server read: no change to read again
    adopted = worker.current
    broken = RulesState("x", {str(rules_dir / "main.rules"): "rule broken {"}, ())
    diags = worker.adopt(broken)
    assert [d.code for d in diags] == ["riskd_unterminated"]
    assert worker.current is adopted and worker.last_diagnostics == diags
    assert not worker.changed()
    # an edit the server has not read yet is a change to a holder started from its state
    (rules_dir / "main.rules").write_text(rules_text("i", 5), encoding="utf-8")
    assert ProgramHolder(rules_dir, server.state()).changed()
