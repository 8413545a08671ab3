"""Group commit: many small calls that arrive together, done as one call on a worker thread.

`Batches(run).submit(item)` waits for `run(items)`, a function of a list that answers each item
in order (one database transaction for all of them).  A call that arrives while a batch is being
done joins the next batch, and that one starts as soon as the first is done: nothing waits for a
batch to fill, so a lone call costs one hop to a thread, as before, and under load the batches
grow with the queue, which is what makes each item cheaper (one transaction's fixed cost, one
statement per step instead of one per item, one thread hop): a database's group commit, done
one level up.

One batch runs at a time per `Batches`: the items queue in order, and at most `max_items` go in
one call, so that a batch stays a short transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")

MAX_ITEMS = 64


class Batches(Generic[Item, Answer]):
    def __init__(
        self, run: Callable[[Sequence[Item]], Sequence[Answer]], max_items: int = MAX_ITEMS
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {max_items}")
        self._run = run
        self.max_items = max_items
        self._queue: list[tuple[Item, asyncio.Future[Answer]]] = []
        self._draining: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Calls waiting for the next batch."""
        return len(self._queue)

    async def submit(self, item: Item) -> Answer:
        """`item`'s answer from the batch it joins; `run`'s exception if that batch failed."""
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_items]
                del self._queue[: self.max_items]
                await self._answer(batch)
        finally:
            self._draining = None
            for _, waiting in self._queue:  # only when cancelled (the loop is closing)
                waiting.cancel()
            self._queue.clear()

    async def _answer(self, batch: list[tuple[Item, asyncio.Future[Answer]]]) -> None:
        try:
            answers = await asyncio.to_thread(self._run, [item for item, _ in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"{len(answers)} answers to a batch of {len(batch)}")
        except Exception as exc:  # every caller in the batch gets it, as a lone call would
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), answer in zip(batch, answers, strict=True):
            if not future.done():  # its caller went away: the work is done all the same
                future.set_result(answer)
