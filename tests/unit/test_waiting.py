"""`within` and `wait_event`: waits with a timeout that never lose a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from offload.core.waiting import wait_event, within


async def next_iteration() -> None:
    """Let every task scheduled so far take one step."""
    loop = asyncio.get_running_loop()
    step = loop.create_future()
    loop.call_soon(step.set_result, None)
    await step


async def test_a_cancel_that_meets_the_event_is_delivered() -> None:
    # The event is set and the waiter cancelled in the same step: `asyncio.wait_for` on Python
    # 3.11 returns normally here, and a loop around it never ends.
    event = asyncio.Event()
    waiter = asyncio.create_task(wait_event(event, 10))
    await next_iteration()
    event.set()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_set_and_timeout() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0) is False
    event.set()
    assert await wait_event(event, None) is True


async def test_within_delivers_a_cancel_that_meets_the_result() -> None:
    loop = asyncio.get_running_loop()
    result = loop.create_future()
    waiter = asyncio.create_task(within(result, 10))
    await next_iteration()
    result.set_result("done")
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_within_times_out() -> None:
    with pytest.raises(TimeoutError):
        await within(asyncio.get_running_loop().create_future(), 0)
