"""Group commit (db/batches.py): calls that arrive while a batch is being done go together into
the next one, in order, and each caller gets its own answer or its batch's error.

The batch function runs on a worker thread; each test holds it on a `threading.Event` to decide
what arrives while a batch is in progress, so no timing decides what goes together.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from offload.core.waiting import async_wait_until
from offload.server.db.batches import Batches

BOUND_S = 10.0  # a bound on waits for the worker thread, never a duration that decides a result


class HeldBatches:
    """Records each batch; the first one waits for `release` (set it to let everything run)."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.seen: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, items: Sequence[str]) -> list[str]:
        self.seen.append(list(items))
        self.entered.set()
        assert self.release.wait(BOUND_S), "the test never released the batch"
        if self.fail_on in items:
            raise ValueError(f"refused {self.fail_on}")
        return [item.upper() for item in items]


async def _entered(held: HeldBatches) -> None:
    assert await asyncio.to_thread(held.entered.wait, BOUND_S)


async def _queued(batches: Batches[str, str], count: int) -> None:
    async def queued() -> bool:
        return batches.queued == count

    await async_wait_until(queued, BOUND_S, f"{count} queued calls")


async def _behind_a_held_batch(
    held: HeldBatches, batches: Batches[str, str], items: str
) -> tuple[asyncio.Task[str], list[asyncio.Task[str]]]:
    """ "a" in a batch held in the database, and `items` queued behind it (still held)."""
    first = asyncio.create_task(batches.submit("a"))
    await _entered(held)
    later = [asyncio.create_task(batches.submit(item)) for item in items]
    await _queued(batches, len(items))
    return first, later


async def test_a_lone_call_is_a_batch_of_one() -> None:
    held = HeldBatches()
    held.release.set()
    batches = Batches(held)
    assert await batches.submit("a") == "A"
    assert await batches.submit("b") == "B"
    assert held.seen == [["a"], ["b"]]


async def test_calls_arriving_during_a_batch_go_together_into_the_next_in_order() -> None:
    held = HeldBatches()
    batches = Batches(held)
    first, later = await _behind_a_held_batch(held, batches, "bcde")
    held.release.set()
    assert await first == "A"
    assert await asyncio.gather(*later) == ["B", "C", "D", "E"]
    assert held.seen == [["a"], ["b", "c", "d", "e"]]


async def test_a_batch_holds_at_most_max_items() -> None:
    held = HeldBatches()
    batches = Batches(held, max_items=2)
    first, later = await _behind_a_held_batch(held, batches, "bcdef")
    held.release.set()
    assert [await first, *await asyncio.gather(*later)] == list("ABCDEF")
    assert held.seen == [["a"], ["b", "c"], ["d", "e"], ["f"]]


async def test_an_error_reaches_every_caller_of_its_batch_and_no_other() -> None:
    held = HeldBatches(fail_on="c")
    batches = Batches(held)
    first, later = await _behind_a_held_batch(held, batches, "bc")
    held.release.set()
    assert await first == "A"
    for task in later:
        with pytest.raises(ValueError, match="refused c"):
            await task
    assert await batches.submit("d") == "D"  # the next batch runs as usual


async def test_a_caller_that_goes_away_leaves_the_others_answered() -> None:
    held = HeldBatches()
    batches = Batches(held)
    first, (gone, kept) = await _behind_a_held_batch(held, batches, "bc")
    gone.cancel()
    held.release.set()
    assert await first == "A" and await kept == "C"
    assert held.seen == [["a"], ["b", "c"]]  # its work was done all the same
    assert gone.cancelled()


async def test_a_wrong_number_of_answers_is_an_error_not_a_shifted_answer() -> None:
    batches: Batches[str, str] = Batches(lambda items: ["only one"] * (len(items) - 1))
    with pytest.raises(RuntimeError, match="0 answers to a batch of 1"):
        await batches.submit("a")


def test_max_items_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_items must be at least 1, not 0"):
        Batches(lambda items: list(items), max_items=0)
