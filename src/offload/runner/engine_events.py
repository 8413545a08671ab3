"""Each bound environment's engine event stream: the containers created and the images they used.

The heartbeat's container list is a snapshot taken every few seconds, and `docker run --rm`
lives less than one: the usage insights would show nothing for a session that clearly ran
something.  The engine's event stream (`GET /events`, container events only) sees every create.

What it counts, and why the control plane cannot count anything twice:

- `created`: containers created since the environment was bound.  It only grows, and the control
  plane keeps the highest value a heartbeat carried, so a retried or repeated heartbeat (or a
  restarted control plane) never counts a container twice.
- `images`: the `repo:tag` of each created container's image (bare ids skipped, as
  `environment.image_name` does), kept until a heartbeat that carried them is answered
  (`acknowledge`); at most `MAX_IMAGES_REPORTED` wait at once, so memory stays bounded.

Containers the legacy builder creates for its steps (`docker build` without BuildKit) are not
counted: it names their image by full id (`sha256:…`), or by nothing after `FROM scratch`,
whereas clients (the docker CLI, compose, SDKs) send the reference as the user typed it.

Reconnects: dockerd keeps its last 256 events.  Every (re)connection asks for those after the
last event seen (`since`, which is inclusive, so an event seen already is skipped by its
`timeNano`): a dropped stream or a restarted engine loses nothing unless more than 256 events
happened while disconnected.  A fresh environment's first connection replays from its start, so
a container created before the stream was up still counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from offload.core.engine_http import engine_client
from offload.runner.environment import MAX_IMAGES_REPORTED, reference_name

log = logging.getLogger(__name__)

CONTAINER_EVENTS = json.dumps({"type": ["container"]})
# An id as a user may type it (`docker run 3f2a9c1b7e0d`): says nothing in the insights.
_BARE_ID = re.compile(r"[0-9a-f]{12,64}")
RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class EventTally:
    """What the stream saw: `created` since bind (only grows); images not yet acknowledged."""

    created: int = 0
    images: frozenset[str] = frozenset()


class EngineEvents:
    """Follows one engine's container events from `start()` until `stop()` (see module doc)."""

    def __init__(
        self,
        env_id: str,
        socket: Path,
        max_images: int = MAX_IMAGES_REPORTED,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.env_id = env_id
        self.socket = socket
        self.max_images = max_images
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.created = 0
        self.connections = 0  # streams opened so far: a reconnect shows here
        self._images: set[str] = set()
        self._last_ns = 0  # timeNano of the last event taken; 0: replay from the engine's start
        self._task: asyncio.Task[None] | None = None

    # ---- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"engine-events-{self.env_id}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- what the heartbeat reads ------------------------------------------------------------

    def tally(self) -> EventTally:
        return EventTally(self.created, frozenset(self._images))

    def acknowledge(self, images: Iterable[str]) -> None:
        """The control plane answered a heartbeat that carried `images`: they need not wait."""
        self._images.difference_update(images)

    def take(self, event: dict[str, Any]) -> None:
        """One event from the stream; one seen already (a reconnect's replay) changes nothing."""
        stamp = int(event.get("timeNano") or 0)
        if stamp and stamp <= self._last_ns:
            return
        self._last_ns = max(self._last_ns, stamp)
        if (event.get("Action") or event.get("status")) != "create":
            return
        ref = str(((event.get("Actor") or {}).get("Attributes") or {}).get("image") or "")
        if not ref or ref.startswith("sha256:"):
            return  # a legacy builder step (see the module docstring)
        self.created += 1
        name = None if _BARE_ID.fullmatch(ref) else reference_name(ref)
        if name and len(self._images) < self.max_images:
            self._images.add(name)

    # ---- the stream ----------------------------------------------------------------------------

    async def _run(self) -> None:
        delays = _delays(self.retry_initial_s, self.retry_max_s)
        while True:
            try:
                if await self._follow():
                    delays = _delays(self.retry_initial_s, self.retry_max_s)
                reason = "the engine ended the stream"
            except (httpx.HTTPError, OSError) as exc:
                reason = exc.__class__.__name__
            except Exception as exc:  # noqa: BLE001 - the stream must outlive any one failure
                reason = repr(exc)
                log.warning("event stream of %s failed", self.env_id, exc_info=True)
            delay = next(delays)
            # Expected while an engine restarts; the replay on reconnect fills the gap.
            log.info("event stream of %s: %s; again in %.1fs", self.env_id, reason, delay)
            await asyncio.sleep(delay)

    async def _follow(self) -> bool:
        """One connection, until it ends; True if the engine accepted it."""
        # No read timeout: a quiet engine sends nothing for as long as nothing happens.
        timeout = httpx.Timeout(5.0, read=None)
        async with engine_client(self.socket, timeout) as client:
            params = {"since": _since(self._last_ns), "filters": CONTAINER_EVENTS}
            async with client.stream("GET", "/events", params=params) as response:
                if response.status_code != 200:
                    await response.aread()
                    log.warning(
                        "event stream of %s refused: %d %s",
                        self.env_id, response.status_code, response.text[:200],
                    )  # fmt: skip
                    return False
                self.connections += 1
                async for line in response.aiter_lines():
                    self._take_line(line)
        return True

    def _take_line(self, line: str) -> None:
        if not line.strip():
            return
        try:
            event = json.loads(line)
        except ValueError:
            log.debug("event stream of %s: not JSON: %.200s", self.env_id, line)
            return
        if isinstance(event, dict):
            self.take(event)


def _since(last_ns: int) -> str:
    """The engine's `since` (seconds.nanoseconds); inclusive, hence the skip in `take`."""
    seconds, nanos = divmod(last_ns, 1_000_000_000)
    return f"{seconds}.{nanos:09d}"


def _delays(initial_s: float, max_s: float) -> Iterator[float]:
    delay = initial_s
    while True:
        yield delay
        delay = min(delay * 2, max_s)
