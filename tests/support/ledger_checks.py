"""The ledger's invariants, checked on the database after the fact (after a fault, a restart,
replicas racing): what the property tests prove for the pure functions must hold in the rows."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session as Db

from offload.core.schemas import SessionState as S
from offload.server.db.models import LedgerInterval, OffloadSession
from offload.server.services import ledger


def ledger_violations(db: Db) -> list[str]:
    """Every broken rule, one line each; empty when the ledger is sound.

    Per session: intervals sorted, non-overlapping, only the last one open (nothing billed
    twice); none before the session started; an ended session has its end time and reason and
    no open interval, and nothing billed after its end."""
    problems = []
    for row in db.scalars(select(OffloadSession).order_by(OffloadSession.id)):
        intervals = ledger.session_intervals(db, row.id)
        if not ledger.is_well_formed(intervals):
            problems.append(f"{row.id}: overlapping or unordered intervals {intervals}")
        if intervals and (row.started_at is None or intervals[0].start < row.started_at):
            problems.append(f"{row.id}: billed from {intervals[0].start}, started {row.started_at}")
        if S(row.state).live:
            continue
        if row.ended_at is None or not row.end_reason:
            problems.append(f"{row.id}: {row.state} without end time or reason")
        if intervals and intervals[-1].is_open:
            problems.append(f"{row.id}: {row.state} with an open interval")
        if row.ended_at is not None and any(
            i.end is not None and i.end > row.ended_at for i in intervals
        ):
            problems.append(f"{row.id}: billed after its end {row.ended_at}")
    orphans = db.scalars(
        select(LedgerInterval.id).where(LedgerInterval.session_id.not_in(select(OffloadSession.id)))
    ).all()
    if orphans:
        problems.append(f"intervals of no session: {orphans}")
    return problems
