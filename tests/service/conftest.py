"""A real riskd server on a free port, and a channel to it."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from riskd.config import Config, load_config
from riskd.service.gen.riskd.v1 import scoring_pb2_grpc
from riskd.service.server import RunningServer, create_server
from tests.features.features_support import delete_prefix

SHARED_REDIS = "redis://127.0.0.1:6379/0"
RULES = Path(__file__).parent / "testdata" / "rules"


def make_config(data_dir: Path, **overrides: Any) -> Config:
    """A config for a server on a free port with data under ``data_dir``."""
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_port": 0,
        "rules_dir": str(RULES),
        "data_dir": str(data_dir),
        "reload_interval_s": 0.2,
        "deadline_ms": 500,
    }
    values.update(overrides)
    return load_config(env={}, **values)


def copy_rules(target: Path) -> Path:
    """A private, editable copy of the test rules."""
    shutil.copytree(RULES, target)
    return target


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """The server, with in-process features or with the shared Redis (own key prefix)."""
    prefix = f"riskd-test-service-{uuid.uuid4().hex}:"
    redis_url = SHARED_REDIS if request.param == "redis" else ""
    config = make_config(tmp_path_factory.mktemp("riskd"), redis_url=redis_url, redis_prefix=prefix)
    running = create_server(config)
    yield running
    running.stop(1)
    if redis_url:
        client = redis.Redis.from_url(redis_url)
        delete_prefix(client, prefix)
        client.close()


@pytest.fixture(scope="module")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> scoring_pb2_grpc.ScoringServiceStub:
    return scoring_pb2_grpc.ScoringServiceStub(channel)
