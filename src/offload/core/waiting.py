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
