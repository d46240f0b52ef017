"""kew.aio's grouped acks across a crash: a process consuming through the
asyncio runtime, killed with SIGKILL mid-group (one ack done, the next
group under way, more handed over, one handler running, more fetched):
every delivery whose ack was not done comes back, and no ack was made
before its handler returned.  The async twin of the sync kit's
``test_grouped_acks_crash_redelivers_every_unacked`` (kew.testing._mid_group).

Run as a script (``python tests/test_aio_window_crash.py URL QUEUE``) it is
the consuming process: concurrency 2, window 8 (pinned: acks in groups).
Its consumer's first ack goes through (``COMMITTED <id>``), the later ones
never end (``COMMITTING <id>``).  Each handler prints ``RETURNED <id>`` as
it returns; the second to start waits for the first ack (so that it is done
alone); the seventh, once acks hang, never returns (``STUCK <id>``).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

import kew
import kew.aio
from kew.aio._runtime import Subscription
from kew.qchan.spi import Delivery
from kew.qchan.spi.aio import AsyncConsumer
from kew.testing._crash_check import check_mid_group_crash
from kew.testing.util import port_open, require


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Gated:
    """A real async consumer whose first ack goes through and the next ones hang."""

    def __init__(self, consumer: AsyncConsumer) -> None:
        self.consumer = consumer
        self.acks = 0
        self.first = asyncio.Event()
        self.hanging = asyncio.Event()

    async def fetch(self, max_count: int, timeout: float) -> Sequence[Delivery]:
        return await self.consumer.fetch(max_count, timeout)

    async def ack(self, delivery: Delivery) -> None:
        self.acks += 1
        if self.acks > 1:
            say(f"COMMITTING {delivery.message.id}")
            self.hanging.set()
            await asyncio.Event().wait()  # never done
        await self.consumer.ack(delivery)
        say(f"COMMITTED {delivery.message.id}")
        self.first.set()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.consumer.dead_letter(delivery, reason)

    async def release(self, delivery: Delivery) -> None:
        await self.consumer.release(delivery)

    async def close(self) -> None:
        await self.consumer.close()


async def _consume(url: str, queue: str) -> None:
    conn = kew.aio.connect(url)
    gated = _Gated(await conn.consumer(queue, 8))
    seen = [0]

    async def handle(_: AsyncConsumer, delivery: Delivery) -> bool:
        seen[0] += 1
        nth = seen[0]
        if nth == 2:
            async with asyncio.timeout(20):  # the first ack is done alone
                await gated.first.wait()
        if nth == 7:
            async with asyncio.timeout(20):  # (so that STUCK comes after COMMITTING)
                await gated.hanging.wait()
            say(f"STUCK {delivery.message.id}")
            await asyncio.Event().wait()
        say(f"RETURNED {delivery.message.id}")
        return True  # acked by the subscription, in a group

    async def opened(_: int) -> AsyncConsumer:
        return gated

    sub = Subscription(opened, handle, name=queue, concurrency=2, prefetch=8)
    await sub
    await asyncio.sleep(600)


@pytest.fixture(params=["sqlite", "redis", "rabbitmq"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/crash.sqlite3?lease=1"
    if request.param == "redis":
        require(port_open("127.0.0.1", 6379), "Redis is not running on 127.0.0.1:6379")
        return "redis://127.0.0.1:6379/0?lease=1"
    require(port_open("127.0.0.1", 5672), "RabbitMQ is not running on 127.0.0.1:5672")
    return "amqp://guest:guest@127.0.0.1:5672/"


def test_grouped_acks_crash_redelivers_every_unacked(url: str) -> None:
    connector = kew.connect(url)
    queue = f"aw.crash-{os.urandom(4).hex()}"
    connector.declare(queue)
    try:
        check_mid_group_crash(
            connector,
            queue,
            [sys.executable, __file__, url, queue],
            timeout=30,
            acked_stays=not url.startswith("amqp"),
        )
    finally:
        connector.delete(queue)
        connector.close()


if __name__ == "__main__":
    asyncio.run(_consume(sys.argv[1], sys.argv[2]))
