"""Fixtures for the engine tests: real rules, real stores, a real SQLite decision log."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from riskd.domain.clock import FakeClock
from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order
from riskd.dsl.holder import ProgramHolder
from riskd.engine.fallback import FallbackPolicy
from riskd.engine.scorer import Scorer, ShopDirectory
from riskd.evidence.log import DecisionLog
from riskd.features.memory import InProcessFeatureStore
from riskd.features.store import FeatureStore
from riskd.pii import BlindIndexer, Keyring
from riskd.sql import Database

TESTDATA = Path(__file__).parent / "testdata"

PHONE = "13987654321"
DEVICE = "A1B2C3D4-0000-4BA4-AE5B-76104861E7DC"
IP = "198.51.100.23"
STREET = "滨江区江南大道3588号"


def make_order(
    order_id: str,
    *,
    total: int = 12_900,
    buyer_id: str = "b-1",
    age_days: int = 30,
    shop_id: str = "s-1",
    channel: Channel = Channel.LIVE_ROOM,
) -> Order:
    return Order(
        order_id=order_id,
        buyer=Buyer(
            buyer_id=buyer_id,
            account_age_days=age_days,
            phone=PHONE,
            name="赵六",
            id_number="330106199001011234",
            address=Address("浙江省", "杭州市", "滨江区", STREET),
        ),
        shop_id=shop_id,
        merchant_id="m-1",
        items=(Item("sku-1", "beauty", total, 1),),
        amounts=Amounts(items=total, total=total),
        channel=channel,
        live_room_id="lr-1",
        creator_id="c-1",
        device_id=DEVICE,
        ip=IP,
    )


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    shutil.copytree(TESTDATA / "rules", target)
    return target


@pytest.fixture
def holder(rules_dir: Path) -> ProgramHolder:
    return ProgramHolder(rules_dir)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_790_000_000.0)


@pytest.fixture
def indexer() -> BlindIndexer:
    return BlindIndexer(Keyring.generate())


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "evidence.db")
    yield database
    database.close()


@dataclass
class Rig:
    """A scorer and everything under it, for assertions on each part."""

    scorer: Scorer
    log: DecisionLog
    features: FeatureStore
    db: Database
    closers: list[Callable[[], None]] = field(default_factory=list)


@pytest.fixture
def make_rig(
    holder: ProgramHolder, clock: FakeClock, indexer: BlindIndexer, db: Database
) -> Iterator[Callable[..., Rig]]:
    rigs: list[Rig] = []

    def build(
        features: FeatureStore | None = None,
        *,
        database: Database | None = None,
        shops: ShopDirectory | None = None,
        fallback: FallbackPolicy | None = None,
        log_options: dict[str, Any] | None = None,
        **kwargs: object,
    ) -> Rig:
        database = database or db
        store = features or InProcessFeatureStore(clock)
        log = DecisionLog(database, indexer=indexer, **(log_options or {}))
        scorer = Scorer(
            holder,
            store,
            log,
            indexer,
            shops=shops,
            clock=kwargs.pop("scorer_clock", clock),  # type: ignore[arg-type]
            fallback=fallback or FallbackPolicy.default(),
            **kwargs,  # type: ignore[arg-type]
        )
        rig = Rig(scorer, log, store, database)
        rigs.append(rig)
        return rig

    yield build
    for rig in rigs:
        rig.scorer.close()
        rig.log.close()
