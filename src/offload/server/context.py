"""What every request handler and service shares in one control-plane process."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

from offload.core.config import ServerSettings
from offload.server.db.engine import Database
from offload.server.services.ca import CertificateAuthority
from offload.server.services.signals import RunnerSignals

Clock = Callable[[], datetime]

# The address of the client a request came from (after trusted proxy headers), for abuse
# limits and the audit log.  Set per request by `ClientAddressMiddleware`; the worker threads of
# `Database.run` see it too (asyncio.to_thread copies the context).
CLIENT_ADDRESS: ContextVar[str | None] = ContextVar("offload_client_address", default=None)


def client_address() -> str | None:
    return CLIENT_ADDRESS.get()


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class LaneCounts:
    """Activity reports the lane (api/activity_lane.py) answered, those it left to the full
    path, and the transactions it ran for them, in this process (/metrics)."""

    answered: int = 0
    left: int = 0
    batches: int = 0

    def count(self, answered: bool) -> None:
        if answered:
            self.answered += 1
        else:
            self.left += 1


@dataclass
class ServerContext:
    settings: ServerSettings
    db: Database
    ca: CertificateAuthority
    signals: RunnerSignals
    clock: Clock = utc_now
    lane_counts: LaneCounts = field(default_factory=LaneCounts)

    def now(self) -> datetime:
        """The time every service uses; tests drive it through the clock given to create_app."""
        return self.clock()
