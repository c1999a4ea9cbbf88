"""What reading a large request's bytes before its parse costs and saves (CPU ms per request).

For each shape of ``ScoreBatch`` request over 64 KiB, in the same run: grpcio's parse
alone (what the server did before ``riskd.service.wire``: the whole request built, then
refused), and the deserializer the server installs now (``interceptors._lenient`` with the
server's ``element_limits`` and the default 4 MiB ``max_message_bytes``), parsed as after
admission. Medians of ``--rounds``, alternating. For scale, the CPU to convert the valid
batches' orders to domain orders (a part of what scoring them costs the server).

    .venv/bin/python benchmarks/load/screen_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT)]

from riskd.config import Config  # noqa: E402
from riskd.service import convert, interceptors, validate, wire  # noqa: E402
from riskd.service.gen.riskd.v1 import order_pb2, scoring_pb2  # noqa: E402
from riskd.service.server import element_limits  # noqa: E402
from tests.service.sample import full_order  # noqa: E402

BATCH = scoring_pb2.ScoreBatchRequest


def _length_delimited(number: int, payload: bytes) -> bytes:
    size, head = len(payload), b""
    while size >= 0x80:
        head, size = head + bytes([size & 0x7F | 0x80]), size >> 7
    return bytes([number << 3 | 2]) + head + bytes([size]) + payload


def shapes(max_batch: int, limit: int) -> dict[str, bytes]:
    checkout = [convert.order_to_proto(full_order(f"o-{i}")) for i in range(max_batch)]
    many_items = []
    for i in range(max_batch):
        order = convert.order_to_proto(full_order(f"o-{i}"))
        del order.items[:]
        for j in range(validate.MAX_ITEMS):
            order.items.add(sku=f"sku-{j}", category="c", unit_price=1, quantity=1)
        many_items.append(order)
    return {
        f"valid: {max_batch} checkout orders": BATCH(orders=checkout).SerializeToString(),
        f"valid: {max_batch} orders of {validate.MAX_ITEMS} items": BATCH(
            orders=many_items
        ).SerializeToString(),
        "valid: 1 order + 20,000 unknown fields": BATCH(orders=checkout[:1]).SerializeToString()
        + (b"\xa0\x06" + b"\xff" * 9 + b"\x01") * wire.OTHER_FIELDS,  # the slowest to read
        "refused: 4 MiB of empty orders": b"\x0a\x00" * (limit // 2 - 8),
        "refused: 16 MiB of empty orders": b"\x0a\x00" * (2 * limit),
        "refused: one order of 2M empty items": _length_delimited(
            1, b"\x2a\x00" * (limit // 2 - 8)
        ),
        "refused: one order of 1.4M order ids": _length_delimited(
            1, order_pb2.Order(order_id="o").SerializeToString() * ((limit - 16) // 3)
        ),
    }


def cpu_ms(fn: Callable[[], Any]) -> float:
    start = time.process_time()
    fn()
    return (time.process_time() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    config = Config()
    screened = interceptors._lenient(
        BATCH.FromString, config.max_message_bytes, element_limits(config.max_batch)
    )
    assert screened is not None
    print(f"{'request':42} {'MB':>6} {'parse alone':>12} {'screened':>9}  answer")
    for name, data in shapes(config.max_batch, config.max_message_bytes).items():
        alone, now = [], []
        result: Any = None
        for _ in range(args.rounds):
            alone.append(cpu_ms(lambda: BATCH.FromString(data)))  # noqa: B023
            now.append(cpu_ms(lambda: interceptors.parsed(screened(data))))  # noqa: B023
        result = interceptors.parsed(screened(data))
        answer = str(result.error()) if isinstance(result, interceptors.Refused) else "parsed"
        mb = len(data) / 1e6
        print(
            f"{name:42} {mb:6.2f} {statistics.median(alone):9.1f} ms "
            f"{statistics.median(now):6.1f} ms  {answer}"
        )
        if isinstance(result, BATCH):
            converted = [
                cpu_ms(lambda: [convert.order_from_proto(o) for o in result.orders])  # noqa: B023
                for _ in range(args.rounds)
            ]
            print(f"{'':42} {'':6} converting its orders: {statistics.median(converted):.1f} ms")


if __name__ == "__main__":
    main()
