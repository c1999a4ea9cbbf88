"""Sample orders shared by the service tests."""

from __future__ import annotations

from riskd.domain.order import Address, Amounts, Buyer, Channel, Item, Order, PaymentMethod


def full_order(order_id: str = "o-1", device_id: str = "dev-1") -> Order:
    """A valid live-room order with every field set (PII included)."""
    return Order(
        order_id=order_id,
        buyer=Buyer(
            "b-1",
            30,
            "13812345678",
            "张三",
            "110101199003071234",
            Address("浙江省", "杭州市", "西湖区", "文三路 1 号"),
        ),
        shop_id="s-1",
        merchant_id="m-1",
        items=(Item("sku-1", "beauty", 1999, 2), Item("sku-2", "food", 500, 1)),
        amounts=Amounts(items=4498, discount=100, coupon=500, shipping=800, total=4698),
        channel=Channel.LIVE_ROOM,
        live_room_id="lr-1",
        video_id="v-1",
        creator_id="c-1",
        coupon_code="SAVE5",
        device_id=device_id,
        ip="10.0.0.1",
        payment_method=PaymentMethod.WALLET,
        client_time=1_700_000_000.5,
    )
