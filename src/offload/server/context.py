"""What every request handler and service shares in one control-plane process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from offload.core.config import ServerSettings
from offload.server.db.engine import Database
from offload.server.services.ca import CertificateAuthority
from offload.server.services.signals import RunnerSignals

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ServerContext:
    settings: ServerSettings
    db: Database
    ca: CertificateAuthority
    signals: RunnerSignals
    clock: Clock = utc_now

    def now(self) -> datetime:
        """The time every service uses; tests drive it through the clock given to create_app."""
        return self.clock()
