"""What `offload status` shows per synced path (the agent writes these into its state file)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel


class SyncState(StrEnum):
    STARTING = "starting"  # connecting, or the initial sync is running
    SYNCED = "synced"  # both sides agree; nothing pending
    PENDING = "pending"  # changes noticed, not yet applied on the other side
    ERROR = "error"  # some paths could not be synced (see `errors`)
    DISCONNECTED = "disconnected"  # the stream dropped: reconnecting


class SyncConflict(BaseModel):
    path: str  # relative to the synced directory
    kept_at: str  # where the runner keeps the version the laptop's overwrote
    at: datetime


class SyncError(BaseModel):
    path: str
    message: str
    at: datetime


class SyncedPathStatus(BaseModel):
    laptop_path: str
    remote_path: str | None = None
    read_only: bool = False
    state: SyncState = SyncState.STARTING
    pending_files: int = 0
    errors: list[SyncError] = []  # most recent last, capped
    conflicts: list[SyncConflict] = []  # most recent last, capped
    last_synced_at: datetime | None = None
    files: int = 0  # entries in the synced tree (after ignore rules)
