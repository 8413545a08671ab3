"""Wake-ups for runners' long-poll heartbeats (in-process).

Each runner has a generation number that grows whenever something it must act on changes (a
session placed on it, made ready, stopped).  A heartbeat answers at once when the runner has not
yet seen the current generation, else waits for the next change or its `wait`.  Everything runs
on the event loop, so checking and waiting cannot race.

With several control-plane replicas on PostgreSQL, `db/wakeups.py` carries each change to the
others over LISTEN/NOTIFY; were a notification lost, the poll still ends after `wait` and the
runner catches up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from offload.core.waiting import wait_event


class RunnerSignals:
    def __init__(self) -> None:
        self.publisher: Callable[[str], None] | None = None
        self._generation: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}
        self._stopping = False

    def notify(self, runner_id: str) -> None:
        """Something changed for this runner: wake its parked heartbeat, if any, here and (with
        a publisher: PostgreSQL's LISTEN/NOTIFY) on the other replicas."""
        self.wake(runner_id)
        if self.publisher is not None:
            self.publisher(runner_id)

    def wake(self, runner_id: str) -> None:
        """Wake this process's parked heartbeat of the runner (a change seen here)."""
        self._generation[runner_id] = self._generation.get(runner_id, 0) + 1
        event = self._events.pop(runner_id, None)
        if event is not None:
            event.set()

    def forget_seen(self, runner_id: str) -> None:
        """The runner (re)started: its next heartbeat must answer at once."""
        self._seen.pop(runner_id, None)

    def generation(self, runner_id: str) -> int:
        return self._generation.get(runner_id, 0)

    def mark_seen(self, runner_id: str, generation: int) -> None:
        self._seen[runner_id] = max(generation, self._seen.get(runner_id, -1))

    def has_unseen_change(self, runner_id: str) -> bool:
        return self._seen.get(runner_id, -1) < self.generation(runner_id)

    @property
    def parked(self) -> int:
        """Heartbeats parked here, waiting for a change (`/metrics`)."""
        return sum(self._waiting.values())

    def release_all(self) -> None:
        """The server is stopping: answer every parked heartbeat now, and any later one at once,
        so that none is still waiting when uvicorn's grace runs out and cancels it (a 500 to the
        runner).  Each answers as usual, with the runner's desired sessions; its next poll
        finds another replica (or this one again, restarted)."""
        self._stopping = True
        events, self._events = self._events, {}
        for event in events.values():
            event.set()

    def is_waiting(self, runner_id: str) -> bool:
        """A heartbeat of this runner is parked (tests use it to know the poll is in place)."""
        return self._waiting.get(runner_id, 0) > 0

    async def wait_for_change(self, runner_id: str, timeout: float) -> bool:
        """Return at once if the runner has an unseen change, else wait up to `timeout`.

        True when a change arrived (or was pending) or the server is stopping, False when the
        wait ran out.
        """
        if self._stopping or self.has_unseen_change(runner_id):
            return True
        # `notify` pops the event it sets, so each wait after a change gets a fresh one.
        event = self._events.setdefault(runner_id, asyncio.Event())
        self._waiting[runner_id] = self._waiting.get(runner_id, 0) + 1
        try:
            return await wait_event(event, timeout)
        finally:
            self._waiting[runner_id] -= 1
            if not self._waiting[runner_id]:
                del self._waiting[runner_id]
