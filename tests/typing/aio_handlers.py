"""Checked by tests/test_aio_typing.py with mypy --strict: each line marked
``# expect: <code>`` must be an error of that code, and no other line may be.
(Never run; not collected by pytest.)"""

from __future__ import annotations

import kew
import kew.aio


async def render(n: int) -> None: ...


async def render_text(s: str) -> None: ...


def render_sync(n: int) -> None: ...


class AsyncRenderer:
    async def __call__(self, n: int) -> None: ...


async def main(q: kew.aio.Queue[int], sync_q: kew.Queue[int]) -> None:
    # what is right
    async with q.sink(render, concurrency=4):
        await q.send(1)
    q.consume(AsyncRenderer())
    sync_q.sink(render_sync)
    async with q.deliveries() as stream:
        async for d in stream:
            n: int = d.value
            await d.ack()
            print(n)
    # a plain function where kew.aio awaits the handler
    q.sink(render_sync)  # expect: arg-type
    q.consume(render_sync)  # expect: arg-type
    # an async handler of another type
    q.sink(render_text)  # expect: arg-type
    # a value of another type
    await q.send("1")  # expect: arg-type
    # an async handler where the sync API calls it (its coroutine never awaited)
    sync_q.sink(render)  # expect: arg-type
    sync_q.sink(AsyncRenderer())  # expect: arg-type
    # forgetting the await of a send
    q.send(2)  # expect: unused-coroutine
