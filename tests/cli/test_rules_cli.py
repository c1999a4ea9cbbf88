"""``riskd rules check|test|fmt|eval``: in-process through ``riskd.cli.main``, once as a process."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from riskd.cli import main

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"
BROKEN = ROOT / "tests" / "dsl" / "testdata" / "rulefiles" / "expressions"


def test_rules_check_starter_set_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(RULES)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: ") and "version " in out


def test_rules_test_starter_set_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "test", str(RULES)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert out.count("PASS ") >= 50
    assert " 0 failed, " in out.splitlines()[-1]


def test_rules_check_prints_every_diagnostic_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(BROKEN)]) == 1
    err = capsys.readouterr().err
    assert err.count("riskd_") == 6
    assert "e.rules:12:30: riskd_type_error: cannot compare int with string" in err
    assert '  |       && order.amounts.total > "500"\n  |                              ^' in err
    assert err.rstrip().endswith("6 error(s) in " + str(BROKEN))


def test_rules_check_empty_directory_fails(tmp_path: Path) -> None:
    assert main(["rules", "check", str(tmp_path)]) == 1


def test_rules_test_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(RULES / "scenarios.rules", tmp_path)
    text = (RULES / "merchant.rules").read_text(encoding="utf-8")
    broken = text.replace(
        "  shop   = {frozen: true}\n  expect = [frozen_shop]", "  expect = [frozen_shop]"
    )
    assert broken != text
    (tmp_path / "merchant.rules").write_text(broken, encoding="utf-8")
    assert main(["rules", "test", str(tmp_path), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL " in out and "an order from a frozen shop" in out
    assert "expected to fire but did not: frozen_shop" in out
    assert "why frozen_shop:" in out and "shop.frozen" in out
    assert "PASS" not in out  # --quiet prints failures only
    assert " 1 failed, " in out


def test_rules_fmt_check_and_rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    messy = tmp_path / "m.rules"
    messy.write_text('scenario s="S"\nlist   l = [ "a" ,"b", ]\n', encoding="utf-8")
    assert main(["rules", "fmt", "--check", str(tmp_path)]) == 1
    assert "would reformat" in capsys.readouterr().out
    assert messy.read_text(encoding="utf-8") == 'scenario s="S"\nlist   l = [ "a" ,"b", ]\n'
    assert main(["rules", "fmt", str(messy)]) == 0
    assert messy.read_text(encoding="utf-8") == 'scenario s = "S"\n\nlist l = ["a", "b"]\n'
    assert main(["rules", "fmt", "--check", str(messy)]) == 0


def test_rules_fmt_rewrites_a_file_with_the_longest_name(tmp_path: Path) -> None:
    """Review: a rule file named with over 240 bytes could not be formatted."""
    messy = tmp_path / ("m" * 249 + ".rules")
    messy.write_text('scenario s="S"\n', encoding="utf-8")
    assert main(["rules", "fmt", str(messy)]) == 0
    assert messy.read_text(encoding="utf-8") == 'scenario s = "S"\n'
    assert [p.name for p in tmp_path.iterdir()] == [messy.name]


def test_rules_fmt_starter_set_is_canonical() -> None:
    assert main(["rules", "fmt", "--check", str(RULES)]) == 0


def test_rules_fmt_refuses_unparseable_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.rules"
    bad.write_text("rule r {\n", encoding="utf-8")
    assert main(["rules", "fmt", str(bad)]) == 1
    assert "riskd_unterminated" in capsys.readouterr().err
    assert bad.read_text(encoding="utf-8") == "rule r {\n"


def test_rules_fmt_names_a_file_it_cannot_read_and_formats_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: a path that was not there, or not text, ended in a traceback."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder", encoding="utf-8")
    latin = tmp_path / "latin.rules"
    latin.write_bytes(b"# caf\xe9\n")
    messy = tmp_path / "m.rules"
    messy.write_text('scenario s="S"\n', encoding="utf-8")
    missing = [tmp_path / "gone.rules", blocker / "x.rules"]
    assert main(["rules", "fmt", *map(str, [*missing, latin, messy])]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        *(f"{p}:1:1: riskd_unreadable_file: rule file cannot be read" for p in missing),
        f"{latin}:1:1: riskd_unreadable_file: rule file not UTF-8 text",
    ]
    assert out == f"reformatted {messy}\n"
    assert latin.read_bytes() == b"# caf\xe9\n"


def test_rules_fmt_names_a_file_it_cannot_write_leaves_it_whole_and_formats_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Review: a failed write ended in a traceback, the file cut short where the write
    stopped. A file size limit (as a full disk) stops the long file's write halfway."""
    long_messy = 'scenario s="S"\nlist   l = [ "a" ,"b", ]\n' + "# a comment line\n" * 8
    long = tmp_path / "long.rules"
    long.write_text(long_messy, encoding="utf-8")
    short = tmp_path / "short.rules"
    short.write_text('scenario t="T"\n', encoding="utf-8")
    limit = 64  # past the short file's canonical form, short of the long one's
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        rc = main(["rules", "fmt", str(long), str(short)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert rc == 1
    out, err = capsys.readouterr()
    assert err == f"{long}:1:1: riskd_unwritable_file: rule file cannot be written\n"
    assert out == f"reformatted {short}\n"
    assert long.read_text(encoding="utf-8") == long_messy  # whole, as it was
    assert short.read_text(encoding="utf-8") == 'scenario t = "T"\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.rules", "short.rules"]


def test_rules_fmt_keeps_a_file_s_mode_and_a_symbolic_link(tmp_path: Path) -> None:
    """fmt writes beside the file and renames: the file keeps its mode, a link its target."""
    target = tmp_path / "shared" / "m.rules"
    target.parent.mkdir()
    target.write_text('scenario s="S"\n', encoding="utf-8")
    target.chmod(0o640)
    link = tmp_path / "m.rules"
    link.symlink_to(target)
    assert main(["rules", "fmt", str(link)]) == 0
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text(encoding="utf-8") == 'scenario s = "S"\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in target.parent.iterdir()] == ["m.rules"]


def test_rules_fmt_syncs_the_folder_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename is durable once fmt says "reformatted": the folder is synced after it."""
    messy = tmp_path / "m.rules"
    messy.write_text('scenario s="S"\n', encoding="utf-8")
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(["rules", "fmt", str(messy)]) == 0
    assert synced == [tmp_path.stat().st_ino]


MESSY = 'scenario s="S"\nlist   l = [ "a" ,"b", ]\n'
TIDY = 'scenario s = "S"\n\nlist l = ["a", "b"]\n'


def test_rules_fmt_keeps_hard_links_in_step(tmp_path: Path) -> None:
    """A rename would part the links, the other name keeping the old text: the file is
    rewritten in place."""
    one = tmp_path / "one.rules"
    one.write_text(MESSY, encoding="utf-8")
    one.chmod(0o640)
    other = tmp_path / "other.rules"
    other.hardlink_to(one)
    assert main(["rules", "fmt", str(one)]) == 0
    assert one.read_text(encoding="utf-8") == other.read_text(encoding="utf-8") == TIDY
    assert one.stat().st_ino == other.stat().st_ino and one.stat().st_nlink == 2
    assert stat.S_IMODE(one.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.rules", "other.rules"]


@pytest.mark.parametrize(
    "refusal",
    [
        pytest.param(
            "mode",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders"),
        ),
        "create",  # what such a folder answers a user, refused by hand (root too)
    ],
)
def test_rules_fmt_formats_a_writable_file_in_a_read_only_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    refusal: str,
) -> None:
    """The folder refuses the part file, the file itself is writable: rewritten in place."""
    folder = tmp_path / "ro"
    folder.mkdir()
    messy = folder / "m.rules"
    messy.write_text(MESSY, encoding="utf-8")

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    if refusal == "create":
        monkeypatch.setattr(tempfile, "mkstemp", refused)
    folder.chmod(0o500)
    try:
        assert main(["rules", "fmt", str(messy)]) == 0
    finally:
        folder.chmod(0o700)
    assert capsys.readouterr().out == f"reformatted {messy}\n"
    assert messy.read_text(encoding="utf-8") == TIDY
    assert [p.name for p in folder.iterdir()] == ["m.rules"]


@pytest.mark.parametrize("failing", ["write", "ftruncate"])
def test_rules_fmt_in_place_write_that_fails_leaves_the_file_as_it_was(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A full disk halfway through the new text (or at its truncation): the old bytes go
    back, and the refusal is said as a rename's is."""
    messy = tmp_path / "m.rules"
    # longer than its form (the truncation shrinks it), or shorter (the write grows it)
    text = MESSY + "#  a comment\n" if failing == "ftruncate" else 'scenario s="S"\n'
    messy.write_text(text, encoding="utf-8")
    (tmp_path / "link.rules").hardlink_to(messy)
    before = messy.read_bytes()
    real = getattr(os, failing)
    calls: list[int] = []

    def full_disk(fd: int, arg: Any) -> Any:
        calls.append(fd)
        if failing == "write" and len(calls) == 1:
            return real(fd, bytes(arg)[:5])  # a short write: the new text's start
        if len(calls) == (2 if failing == "write" else 1):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, arg)  # the old bytes written back

    monkeypatch.setattr(os, failing, full_disk)
    assert main(["rules", "fmt", str(messy)]) == 1
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert len(calls) >= 2  # the failure, then the old bytes written back
    assert err == f"{messy}:1:1: riskd_unwritable_file: rule file cannot be written\n"
    assert out == ""
    assert messy.read_bytes() == (tmp_path / "link.rules").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.rules", "m.rules"]


def test_rules_eval_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([
        "rules", "eval", "order.items.map(i, i.price * i.qty)",
        "--var", 'order={"items": [{"price": 5, "qty": 2}, {"price": 7, "qty": 1}]}',
    ])  # fmt: skip
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == [10, 7]
    assert main(["rules", "eval", 'timestamp("2026-01-01T00:00:00Z") + duration("1h")']) == 0
    assert json.loads(capsys.readouterr().out) == "2026-01-01T01:00:00Z"


def test_rules_eval_errors_are_diagnostics(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "eval", 'order.amount > "5"', "--var", 'order={"amount": 5}']) == 1
    err = capsys.readouterr().err
    assert "<expr>:1:14: riskd_type_error" in err and "^" in err
    assert main(["rules", "eval", "x / 0", "--var", "x=1"]) == 1
    assert "riskd_eval_error: division by zero" in capsys.readouterr().err
    assert main(["rules", "eval", "1", "--var", "x={"]) == 2
    assert "--var x: not valid JSON" in capsys.readouterr().err


def test_rules_commands_run_as_a_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "riskd", "rules", "check", str(BROKEN)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "riskd_unknown_field" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "riskd", "rules", "eval", "size(x) > 1", "--var", "x=[1,2]"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout.strip()) == (0, "true")


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_rules_test_without_rule_files_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    folder = tmp_path / where
    if where == "empty":
        folder.mkdir()
    assert main(["rules", "test", str(folder)]) == 1
    captured = capsys.readouterr()
    assert f"{folder}: no .rules files" in captured.err and "passed" not in captured.out


@pytest.mark.parametrize("command", ["check", "test"])
def test_rules_check_and_test_refuse_files_that_hold_no_rules_as_the_daemon_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Review: comments only passed ``check`` ("ok: ... 0 rules") and ``test`` ("0 passed"),
    then the daemon refused to start on them (the Dockerfile runs both at build)."""
    (tmp_path / "a.rules").write_text("# rules come later\n")
    assert main(["rules", command, str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "riskd_no_rules" in captured.err and "passed" not in captured.out


def _one_rule(when: str) -> str:
    return (
        'scenario s = "a scenario"\n\nrule x {\n  description = "d"\n  owner = "o"\n'
        "  scenarios = [s]\n  mode = active\n  action = review\n  score = 10\n  reason = X\n"
        f"  when = {when}\n}}\n"
    )


@pytest.mark.parametrize("now", ["1e20", "-99999999999999"])
def test_rules_test_out_of_range_now_is_a_diagnostic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], now: str
) -> None:
    text = (
        _one_rule("order.amounts.total > 100")
        + f'\ntest "t" {{\n  now = {now}\n  expect = []\n}}\n'
    )
    (tmp_path / "a.rules").write_text(text, encoding="utf-8")
    assert main(["rules", "test", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "a.rules:15:9: riskd_bad_test_input: now is out of range" in err
    assert "Traceback" not in err


def test_rules_test_explains_a_failing_case_whose_rule_fails_only_when_explained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    when = (
        'duration(order.coupon_code + "' + "1" * 4400 + 'h") > duration("1s")'
        " || order.amounts.total > 50"
    )
    text = _one_rule(when) + '\ntest "t" {\n  order = {amounts: {total: 100}}\n  expect = []\n}\n'
    (tmp_path / "a.rules").write_text(text, encoding="utf-8")
    assert main(["rules", "test", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "fired but not expected: x" in out and "why x:" in out
    assert "→ error: duration out of range" in out


def test_output_into_a_reader_that_goes_away_ends_quietly() -> None:
    # `riskd rules test | head -1` with head gone: the pipe is closed before the command
    # writes; it stops with 128 + SIGPIPE as the shell tools do, with nothing on stderr.
    assert into_a_closed_pipe(["rules", "test", str(RULES)], os.environ) == (141, "")


def into_a_closed_pipe(args: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    """``riskd ARGS`` with its stdout closed before it writes: exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "riskd", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(60), err


def test_rules_check_says_why_a_folder_without_rule_files_fails_and_counts_active_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 alone does not say what is wrong: the folder is named on stderr; and the
    summary counts the active rules apart from the shadow ones (the starter set has both)."""
    assert main(["rules", "check", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"{tmp_path}: no .rules files\n" and captured.out == ""
    assert main(["rules", "check", str(RULES)]) == 0
    out = capsys.readouterr().out
    modes = [
        line.split("=", 1)[1].strip()
        for f in sorted(RULES.glob("*.rules"))
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("mode") and "=" in line
    ]
    assert "shadow" in modes  # else the count below tells nothing
    assert f"{len(modes)} rules ({modes.count('active')} active)" in out


@pytest.mark.parametrize("text", [MESSY, TIDY])
def test_rules_fmt_drops_a_byte_order_mark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """A file an editor saved with a BOM is formatted (``check`` reads past the BOM), and
    the BOM is dropped even where the rest is canonical already."""
    path = tmp_path / "m.rules"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert main(["rules", "fmt", "--check", str(path)]) == 1
    assert capsys.readouterr().out == f"would reformat {path}\n"
    assert main(["rules", "fmt", str(path)]) == 0
    assert capsys.readouterr().out == f"reformatted {path}\n"
    assert path.read_bytes() == TIDY.encode("utf-8")


def test_rules_eval_usage_errors_and_json_forms(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed ``--var`` is a usage error (2), not a failed evaluation (1); an unsigned
    value prints as a JSON number and text prints as written, not \\u-escaped."""
    for spec in ("x", "1x=1", "=1"):
        assert main(["rules", "eval", "1", "--var", spec]) == 2
        assert "expected NAME=JSON" in capsys.readouterr().err
    assert main(["rules", "eval", "uint(x)", "--var", "x=7"]) == 0
    assert capsys.readouterr().out == "7\n"
    assert main(["rules", "eval", '"王小明" + s', "--var", 's="路"']) == 0
    assert capsys.readouterr().out == '"王小明路"\n'
    # values inside a map are JSON too, and bytes print as text (not a TypeError traceback)
    assert main(["rules", "eval", '{"d": duration("90s"), "b": b"ab"}']) == 0
    assert json.loads(capsys.readouterr().out) == {"d": "90s", "b": "ab"}


def test_small_output_into_a_reader_that_goes_away_ends_quietly() -> None:
    """As above, for output small enough to sit in stdout's buffer until the end: the
    failure then shows at the last flush, not in a print. Buffered as a user's shell has
    it (PYTHONUNBUFFERED, set in some CI images, would hide the last flush)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    assert into_a_closed_pipe(["rules", "eval", "1 + 1"], env) == (141, "")


def test_rules_fmt_leaves_a_read_only_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file its owner made read-only, in a folder that lets a rename through: fmt
    names it and leaves it as it was (a rename would pass over the file's own mode)."""
    messy = tmp_path / "m.rules"
    messy.write_text(MESSY, encoding="utf-8")
    messy.chmod(0o444)
    try:
        messy.open("a").close()
    except PermissionError:
        pass
    else:
        pytest.skip("this user writes to read-only files (root with CAP_DAC_OVERRIDE)")
    assert main(["rules", "fmt", str(messy)]) == 1
    out, err = capsys.readouterr()
    assert err == f"{messy}:1:1: riskd_unwritable_file: rule file cannot be written\n"
    assert out == ""
    assert messy.read_text(encoding="utf-8") == MESSY
    assert stat.S_IMODE(messy.stat().st_mode) == 0o444


def test_rules_commands_default_to_the_rules_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``riskd rules check|test|fmt`` with no path work on ./rules (README, --help)."""
    shutil.copytree(RULES, tmp_path / "rules")
    # a rule file outside ./rules (a test corpus, a draft) is not among the daemon's
    (tmp_path / "drafts").mkdir()
    (tmp_path / "drafts" / "broken.rules").write_text("rule (\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["rules", "check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    assert main(["rules", "test"]) == 0
    assert " 0 failed, " in capsys.readouterr().out
    messy = tmp_path / "rules" / "zz_messy.rules"
    messy.write_text('scenario zz_messy="S"\n', encoding="utf-8")
    assert main(["rules", "fmt"]) == 0
    assert capsys.readouterr().out == "reformatted rules/zz_messy.rules\n"
    assert messy.read_text(encoding="utf-8") == 'scenario zz_messy = "S"\n'


def test_rules_fmt_and_check_refuse_half_a_surrogate_pair_with_its_place(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # "\ud800" is no text: fmt crashed writing it back, and check passed a reason no reply can carry
    bad = tmp_path / "bad.rules"
    bad.write_text('list odd = ["\\ud800"]\n', encoding="utf-8")
    pair = tmp_path / "pair.rules"
    pair.write_text('list  ok = ["\\ud83d\\ude00"]\n', encoding="utf-8")
    assert main(["rules", "fmt", str(bad), str(pair)]) == 1
    captured = capsys.readouterr()
    assert f"{bad}:1:13: riskd_bad_string:" in captured.err
    assert pair.read_text(encoding="utf-8") == 'list ok = ["😀"]\n'
    assert main(["rules", "check", str(tmp_path)]) == 1
    assert f"{bad}:1:13: riskd_bad_string:" in capsys.readouterr().err
