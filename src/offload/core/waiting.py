"""Bounded waits on a condition: the one place that polls, so nothing else sleeps blindly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    pass


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `condition` until it returns a truthy value (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"gave up after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


async def async_wait_until(
    condition: Callable[[], Awaitable[T]], timeout: float, what: str, interval: float = 0.05
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"gave up after {timeout:.1f}s waiting for {what}")
        await asyncio.sleep(interval)


async def within(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`awaitable`'s result, or TimeoutError after `timeout` seconds (None: no limit).

    Use this, not `asyncio.wait_for`: on Python 3.11 that swallows a cancellation that arrives
    just as the awaited thing completes, and a loop around it then runs on as if never
    cancelled. That was an agent that now and then would not stop (its activity reporter and
    port follower kept waiting). `asyncio.timeout` delivers the cancellation.
    """
    async with asyncio.timeout(timeout):
        return await awaitable


async def wait_event(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether `event` is set within `timeout` seconds (None: no limit); see `within`."""
    try:
        await within(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
