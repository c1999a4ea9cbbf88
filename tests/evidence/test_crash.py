"""What a crash can lose: only records appended since the last commit, never more than the queue.

A child process appends decisions as fast as it can and dies with ``os._exit``
(no flush, no close, no atexit). What survives must be a prefix of what it
appended, with a valid chain, missing at most ``queue_size`` records.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from riskd.evidence.log import DecisionLog
from riskd.sql import Database

CHILD = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from evidence.conftest import make_record
    from riskd.evidence.log import DecisionLog
    from riskd.sql import Database

    log = DecisionLog(Database({path!r}), max_batch=16, queue_size=64, put_timeout_s=30)
    for i in range({n}):
        log.append(make_record(f"o-{{i}}"))
    print(log.backlog, flush=True)
    os._exit(0)
    """
)


def test_crash_loses_at_most_the_unflushed_queue(tmp_path: Path) -> None:
    path, n = tmp_path / "evidence.db", 2000
    tests_dir = str(Path(__file__).resolve().parent.parent)
    code = CHILD.format(tests=tests_dir, path=str(path), n=n)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    backlog_at_death = int(proc.stdout.strip())
    db = Database(path)
    ids = [r[0] for r in db.query("SELECT order_id FROM decision_log ORDER BY seq")]
    assert ids == [f"o-{i}" for i in range(len(ids))]  # a prefix, in append order
    assert n - len(ids) <= 64  # the crash-loss bound: queue_size
    assert n - len(ids) <= backlog_at_death  # only what was still waiting for a commit
    log = DecisionLog(db)
    assert log.verify().ok
    log.close()
    db.close()
