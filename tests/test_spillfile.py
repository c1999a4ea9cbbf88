"""A spill file (``riskd.spillfile``) is read back as written, section by section, or not
at all: one cut short, or not one of its kind, is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from riskd import spillfile


def test_a_spill_file_is_read_back_by_section_and_named_by_its_prefix_and_process(
    tmp_path: Path,
) -> None:
    path = spillfile.write(tmp_path, "kind-", {"one": [[1, "a"]], "two": [{"b": 2}, 3]})
    assert path.name.startswith("kind-") and path.name.endswith(f"-{os.getpid()}.jsonl")
    assert path.stat().st_mode & 0o777 == 0o600
    assert spillfile.files(tmp_path, "kind-") == [path]
    assert spillfile.files(tmp_path, "other-") == []
    assert spillfile.read(path, ("one", "two")) == {"one": [[1, "a"]], "two": [{"b": 2}, 3]}
    spillfile.remove(path)
    spillfile.remove(path)  # gone already: another process took it
    assert spillfile.files(tmp_path, "kind-") == []


@pytest.mark.parametrize(
    "text",
    [
        '{"riskd_spill": 1, "one": 2}\n[1]\n',  # cut short
        '{"riskd_spill": 1, "one": -1}\n',
        '[{"riskd_spill": 1, "one": 0}]\n',  # a head that is no object
        '{"riskd_spill": 2, "one": 0}\n',
        '{"riskd_spill": 1}\n',  # no count for the section
        "",
        "\xff",
    ],
)
def test_a_file_that_is_not_a_whole_spill_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "kind-1.jsonl"
    path.write_text(text, "latin-1")
    with pytest.raises(spillfile.SpillFileError):
        spillfile.read(path, ("one",))


def test_a_spill_file_is_held_by_one_taker_at_a_time_and_not_once_removed(tmp_path: Path) -> None:
    path = spillfile.write(tmp_path, "kind-", {"one": [1]})
    with spillfile.held(path) as mine:
        assert mine
        with spillfile.held(path) as other:  # another process (or open file) meanwhile
            assert not other
        spillfile.remove(path)
    with spillfile.held(path) as late:  # gone: taken already
        assert not late
