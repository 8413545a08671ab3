"""The session state machine: every allowed transition in one table, applied in one function.

    idle-disconnected ─► starting ─► active ◄─► idle
            │               │          │         │
            └───────────────┴──────────┴─────────┴──► terminated | failed

Idle and the grace period arrive with the activity work; the table already holds their edges.
"""

from __future__ import annotations

from datetime import datetime

from offload.core.errors import Conflict
from offload.core.schemas import SessionState as S
from offload.server.db.models import OffloadSession

_ENDED = frozenset({S.TERMINATED, S.FAILED})

TRANSITIONS: dict[S, frozenset[S]] = {
    S.IDLE_DISCONNECTED: frozenset({S.STARTING}) | _ENDED,
    S.STARTING: frozenset({S.ACTIVE}) | _ENDED,
    S.ACTIVE: frozenset({S.IDLE}) | _ENDED,
    S.IDLE: frozenset({S.ACTIVE}) | _ENDED,
    S.TERMINATED: frozenset(),
    S.FAILED: frozenset(),
}

LIVE_STATES: tuple[str, ...] = tuple(state.value for state in S if state.live)


def can_transition(current: S, target: S) -> bool:
    return target in TRANSITIONS[current]


def transition(
    session: OffloadSession, target: S, now: datetime, reason: str | None = None
) -> None:
    """Move `session` to `target`, stamping started_at / ended_at; Conflict if not allowed."""
    current = S(session.state)
    if not can_transition(current, target):
        raise Conflict(
            f"Session {session.id} is {current.value} and cannot become {target.value}.",
            "Check its state with `offload status`; start a new session with "
            "`docker offload start` if it has ended.",
        )
    session.state = target.value
    if target is S.ACTIVE and session.started_at is None:
        session.started_at = now
    if target in _ENDED:
        session.ended_at = now
        session.end_reason = reason
