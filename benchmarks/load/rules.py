"""Generate a rule set of N rules for load tests: velocity, amounts, distinct counts, lists.

Thresholds are set so that few rules hit, as in production (about one rule per
order on average); every rule still runs on every order. The load generator draws
shops, live rooms and creators from a few hundred values each, so after a run's
first tens of thousands of orders every one of them carries hundreds of orders a
day: thresholds on those keys are scaled (``SCALE``) as a real shop's would be,
or every order would hit dozens of rules and the run would measure explanations.

    python benchmarks/load/rules.py 200 /tmp/rules200
"""

from __future__ import annotations

import sys
from pathlib import Path

KEYS = ("buyer", "device", "ip", "address", "shop", "live_room", "creator")
WINDOWS = ("1m", "1h", "24h")

HEADER = """scenario checkout = "Any checkout"

list watched_categories = ["small_appliances", "electronics"]
"""

RULE = """
rule bench_{i} {{
  description = "Generated load-test rule {i}"
  owner       = "bench"
  scenarios   = [checkout]
  mode        = {mode}
  action      = {action}
  score       = {score}
  reason      = BENCH_{i}
  when        = {when}
}}
"""


# Threshold factor per key: the load generator's pools are 20,000 buyers and devices,
# 65,536 IPs, 5,000 addresses, 500 shops and 300 live rooms and creators.
SCALE = {"buyer": 1, "device": 1, "ip": 1, "address": 4, "shop": 400, "live_room": 400,
         "creator": 400}  # fmt: skip


def condition(i: int) -> str:
    key, window = KEYS[i % len(KEYS)], WINDOWS[(i // len(KEYS)) % len(WINDOWS)]
    of = KEYS[(i + 3) % len(KEYS)]
    scale = SCALE[key]
    kind = i % 5
    if kind == 0:
        return f'orders("{key}", "{window}") > {(50 + i) * scale}'
    if kind == 1:
        return f'amount("{key}", "{window}") > {(5_000_000 + i * 1000) * scale}'
    if kind == 2:
        return f'distinct("{key}", "{of}", "{window}") > {(20 + i % 30) * scale}'
    if kind == 3:
        return (  # the rules that do hit: big orders from young accounts
            f"order.amounts.total > {150_000 + i * 500} "
            f"&& order.buyer.account_age_days < {200 + i % 7 * 100}"
        )
    return (
        f"order.items.exists(it, it.category in watched_categories) "
        f"&& order.amounts.discount > {100_000 + i}"
    )


def rules_text(n: int) -> str:
    parts = [HEADER]
    for i in range(n):
        parts.append(
            RULE.format(
                i=i,
                mode="shadow" if i % 10 == 9 else "active",
                action=("review", "block")[i % 2],
                score=10 + i % 50,
                when=condition(i),
            )
        )
    return "".join(parts)


def write_rules(n: int, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.rules").write_text(rules_text(n))
    return directory


if __name__ == "__main__":
    write_rules(int(sys.argv[1]), Path(sys.argv[2]))
