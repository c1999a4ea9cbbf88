"""The baseline: a bare grpcio server answering ``ScoringService/Score`` with a constant.

It parses nothing beyond what grpcio must and returns one prebuilt reply, so its
calls per second are grpcio's own ceiling on this machine. Same thread pool
size and SO_REUSEPORT as riskd.

    python benchmarks/load/bare_server.py --listen 127.0.0.1:50060
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

from riskd.service.gen.riskd.v1 import scoring_pb2, scoring_pb2_grpc

REPLY = scoring_pb2.ScoreResponse(
    decision=scoring_pb2.Decision(order_id="constant", outcome=scoring_pb2.OUTCOME_ALLOW)
)
BATCH_REPLY = scoring_pb2.ScoreBatchResponse()


class Constant(scoring_pb2_grpc.ScoringServiceServicer):
    def Score(self, request: object, context: object) -> scoring_pb2.ScoreResponse:
        return REPLY


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:50060")
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    server = grpc.server(
        futures.ThreadPoolExecutor(args.workers), options=[("grpc.so_reuseport", 1)]
    )
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(Constant(), server)
    port = server.add_insecure_port(args.listen)
    server.start()
    print(f"bare serving on {port}", file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(0.5):
        pass
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
