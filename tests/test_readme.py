"""README.md stays true: what operators and callers read there is checked against the code.

The API table names every method the server serves with the roles
``riskd/service/policy.py`` allows; the command-line table names every ``riskd``
subcommand and flag; the "Trying it" commands, run as written against a daemon on the
embedded defaults, print what the README says (the configuration, metrics and
label tables are checked in tests/test_config.py and tests/service/test_metrics_help.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from riskd.cli import build_parser
from riskd.config import Config, load_config
from riskd.service.healthcheck import HealthServicer
from riskd.service.policy import POLICY, PUBLIC, ROLES
from riskd.service.server import RunningServer, create_server

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "riskd.v1"
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def readme_section(title: str) -> str:
    """The text of the README's ``## title`` section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme[readme.index(f"\n## {title}\n") :].split("\n## ", 2)[1]


# -------------------------------------------------------------------------- API


def readme_table() -> dict[str, frozenset[str]]:
    """Full method name → roles, from the rows of the table under ``## API``."""
    section = readme_section("API")
    table: dict[str, frozenset[str]] = {}
    service = ""
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| service"):
            continue
        name, methods, who = (cell.strip() for cell in line.split("|")[1:4])
        service = name.strip("`") if name else service  # an empty cell: the row above's
        full = service if "." in service else f"{PACKAGE}.{service}"
        roles = {role for role in ROLES if re.search(rf"\b{role}\b", who)}
        allowed = frozenset({PUBLIC} if who == "anyone" else roles)
        for method in re.findall(r"`([A-Z]\w*)`", methods):  # RPCs are CamelCase
            table[f"/{full}/{method}"] = allowed
    return table


def proto_methods() -> set[str]:
    """Every RPC the ``.proto`` files declare, as a full method name."""
    found = set()
    for proto in sorted((ROOT / "protos" / "riskd" / "v1").glob("*.proto")):
        text = re.sub(r"//.*", "", proto.read_text(encoding="utf-8"))
        for service, body in re.findall(r"\bservice\s+(\w+)\s*\{(.*?)\n\}", text, re.S):
            found |= {f"/{PACKAGE}.{service}/{m}" for m in re.findall(r"\brpc\s+(\w+)", body)}
    return found


def served_methods() -> set[str]:
    """The riskd RPCs and the standard services the server adds (``create_server``): health,
    whose ``List`` grpcio answers UNIMPLEMENTED unless riskd's servicer defines it, and
    reflection."""
    extra = set()
    for module, name in (
        (health_pb2, health.SERVICE_NAME),
        (reflection_pb2, reflection.SERVICE_NAME),
    ):
        short = name.rsplit(".", 1)[1]
        extra |= {f"/{name}/{m.name}" for m in module.DESCRIPTOR.services_by_name[short].methods}
    if HealthServicer.List is health_pb2_grpc.HealthServicer.List:
        extra.discard(f"/{health.SERVICE_NAME}/List")
    return proto_methods() | extra


def test_the_readme_api_table_names_every_served_method_with_the_roles_allowed() -> None:
    """A role the table gives but the policy denies is a caller refused in production; an RPC
    missing from the table is one nobody knows to call or to grant."""
    documented = readme_table()
    actual = {method: POLICY.get(method, frozenset()) for method in served_methods()}
    assert sorted(set(documented) - set(actual)) == []  # named in the README, not served
    assert sorted(set(actual) - set(documented)) == []  # served, not in the README
    assert {m: (documented[m], r) for m, r in actual.items() if documented[m] != r} == {}
    assert all(actual.values())  # a served method the policy denies to everyone: a bug


def test_the_readme_api_table_states_the_batch_limit_the_server_has() -> None:
    """Checkout services size their batches by the README: one too big is refused whole."""
    section = readme_section("API")
    row = next(line for line in section.splitlines() if line.startswith("| `ScoringService`"))
    limit = re.search(r"`ScoreBatch` \(≤ (\d+) orders\)", row)
    assert limit is not None and int(limit[1]) == Config().max_batch


# -------------------------------------------------------------------------- command line


def leaves(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Each runnable command (``("rules", "fmt")``) and its parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    found = {}
    for name, child in subs[0].choices.items():
        found |= leaves(child, (*path, name))
    return found


def options(parser: argparse.ArgumentParser) -> list[tuple[str, ...]]:
    """Each option's spellings (``("-q", "--quiet")``), ``--help`` left out."""
    return [
        tuple(a.option_strings)
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]


def readme_rows() -> list[tuple[list[str], str]]:
    """Each row of the table: its ``riskd ...`` synopses, and its description cell."""
    section = readme_section("Command line")
    rows = []
    for line in section.splitlines():
        cells = [c.replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 2 and cells[0].strip().startswith("`riskd"):
            rows.append((re.findall(r"`(riskd [^`]*)`", cells[0]), cells[1]))
    return rows


def synopsis_commands(synopsis: str, tree: dict[tuple[str, ...], object]) -> list[tuple[str, ...]]:
    """``riskd rules check|test [DIR]`` → ``[("rules", "check"), ("rules", "test")]``."""
    words = synopsis.split()
    if (words[1],) in tree:
        return [(words[1],)]
    return [(words[1], sub) for sub in words[2].split("|")]


def test_the_readme_names_every_subcommand_and_no_other() -> None:
    """A command the table lacks is one nobody finds; one riskd lacks is a usage error."""
    tree = leaves(build_parser())
    documented = [
        c for synopses, _ in readme_rows() for s in synopses for c in synopsis_commands(s, tree)
    ]
    assert sorted(set(documented) - set(tree)) == []  # in the README, refused by riskd
    assert sorted(set(tree) - set(documented)) == []  # in riskd, not in the README


def test_each_synopsis_names_every_flag_its_command_takes_and_no_other() -> None:
    """A row that names flags names them all (a missing one is a feature nobody finds, an
    extra one a usage error); a row with none leaves them to the docs it links, which must
    then name each."""
    tree = leaves(build_parser())
    wrong = {}
    for synopses, description in readme_rows():
        named = any(OPTION.search(s) for s in synopses)
        docs = "".join(
            (ROOT / d).read_text(encoding="utf-8")
            for d in re.findall(r"`(docs/\w+\.md)`", description)
        )
        for synopsis in synopses:
            said = set(OPTION.findall(synopsis))
            for command in synopsis_commands(synopsis, tree):
                spellings = options(tree[command])
                if named:
                    missing = [o[-1] for o in spellings if not said & set(o)]
                    extra = sorted(said - {s for o in spellings for s in o})
                else:
                    missing = [
                        o[-1] for o in spellings if not any(re.search(rf"{s}\b", docs) for s in o)
                    ]
                    extra = []
                if missing or extra:
                    wrong[" ".join(command)] = (missing, extra)
    assert wrong == {}


# -------------------------------------------------------------------------- trying it


def commands() -> list[tuple[list[str], str]]:
    """Each ``riskd`` command of the section's shell block (``riskd`` dropped), and what its
    comment says it prints."""
    block = readme_section("Trying it").split("```sh\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    return [
        (shlex.split(line, comments=True)[1:], line.rsplit("# ", 1)[1].strip())
        for line in block.splitlines()
        if line.strip()
    ]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """``riskd serve`` on the embedded defaults, with its own port and data folder."""
    data = tmp_path_factory.mktemp("riskd")
    rules = str(ROOT / "rules")  # the README's `rules`, run from the checkout
    config = load_config(
        env={}, listen="127.0.0.1:0", metrics_port=-1, data_dir=str(data), rules_dir=rules
    )
    running = create_server(config)
    yield running
    running.stop(1)


def run(argv: list[str], daemon: RunningServer, capsys: pytest.CaptureFixture[str]) -> str:
    if argv[0] in ("score", "health"):
        argv = [*argv, "--target", f"127.0.0.1:{daemon.port}"]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_the_trying_it_commands_print_what_the_readme_says(
    daemon: RunningServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the README runs them in the checkout
    printed = {}
    for argv, said in commands():
        out = run(argv, daemon, capsys)
        printed[argv[-1]] = out
        if argv[0] == "score":
            outcome = re.search(r"\b(allow|review|block)\b", said)
            assert outcome is not None, said
            assert json.loads(out)["outcome"] == f"OUTCOME_{outcome[1].upper()}"
        else:
            assert out.strip() == said
    shown = json.loads(readme_section("Trying it").split("```json\n", 1)[1].split("```", 1)[0])
    got = json.loads(printed["examples/order-new-account-high-value.json"])
    # the explanations read as the README shows them ("→"), not \u-escaped
    assert "→ true" in printed["examples/order-new-account-high-value.json"]
    assert sorted(got) == sorted(shown)  # the same fields, none missing or extra
    varying = {"rules_version", "elapsed_us", "decided_at", "reasons"}  # per run, per rule edit
    assert {k: got[k] for k in shown if k not in varying} == {
        k: v for k, v in shown.items() if k not in varying
    }
    assert len(got["reasons"]) == len(shown["reasons"])
    for reason, sample in zip(got["reasons"], shown["reasons"], strict=True):
        if sample["explanation"] == ["…"]:  # elided in the README
            sample["explanation"] = reason["explanation"]
        assert reason == sample
