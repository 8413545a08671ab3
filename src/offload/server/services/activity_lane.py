"""The activity lane: the common activity report, answered in a short transaction of plain
columns, together with the reports that arrived at the same time.

Activity reports are most of what a control plane serves (bench/load.py: three requests in
four), and nearly all of them find the session active with nothing due: they only restart its
quiet clock.  For these the lane reads the token, the session and what its answer shows in one
statement, the users' day in a second, stamps in a third and reads the billed time in a fourth,
on a plain connection in one row-locked transaction, where the full path (api/sessions.py) runs
nine over two transactions with ORM objects (docs/operations.md has the costs).  The reports
that arrive while one batch is in the database go together in the next (db/batches.py): the
four statements and the transaction are shared by the whole batch, so a busy replica does less
work per report, not more.

Whatever is not that common case gets None, and the request takes the full path, which answers
it, errors included, exactly as before: a token that is not a live user token or not the
session owner's, an idle or ended session, a transition or prompt that is due, a quiet prompt
to clear, a GPU session (its devices come from the runner's report), a metered organisation
(its allowance needs its month of ledger), a body that is not a valid report, a session row
another transaction holds, a second report for one session in a batch.  The lane repeats no
rule: its facts go through `lifecycle.evaluate` and its answer is built by `sessions.info_view`,
as on the full path.  tests/unit/server/test_activity_lane.py holds the two to the same answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from typing import Any

import sqlalchemy.exc
from pydantic import ValidationError
from sqlalchemy import Connection, Row, and_, bindparam, select

from offload.core import schemas as s
from offload.core.schemas import PromptReason
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.batches import Batches
from offload.server.db.models import (
    ApiToken,
    OffloadSession,
    Organization,
    OrgBillingRow,
    OrgSettingsRow,
    Runner,
    User,
)
from offload.server.services import ledger, lifecycle, sessions, tokens
from offload.server.services.lifecycle import Rules

log = logging.getLogger(__name__)

_LaneRow = Row[*tuple[Any, ...]]
_LANE_STATES = frozenset({S.ACTIVE.value, S.STARTING.value})
# What the database may refuse here and the full path answers (503, 422) with the fix.
_GIVE_BACK_ON = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.TimeoutError,
    sqlalchemy.exc.DataError,
)

# Built once (services/ledger.py says why).  The token is joined on the session's owner, so a
# row comes back only for the owner's live token.  The rows are locked as the full path's stamp
# locks its session (sessions._activity_stamp_tx), in the order of their ids; one that another
# transaction holds is skipped, and its report takes the full path, which waits its turn there
# instead of holding up the whole batch.
_LANE_ROWS = (
    select(
        ApiToken.id.label("token_id"),
        ApiToken.token_hash,
        ApiToken.last_used_at.label("token_used_at"),
        OffloadSession.id,
        OffloadSession.user_id,
        OffloadSession.instance_type,
        OffloadSession.gpu,
        OffloadSession.gpu_uuid,
        OffloadSession.client_name,
        OffloadSession.created_at,
        OffloadSession.ended_at,
        OffloadSession.end_reason,
        *lifecycle.LIFECYCLE_COLUMNS,
        User.username,
        Organization.name.label("org_name"),
        Runner.id.label("runner_id"),
        Runner.name.label("runner_name"),
        Runner.ssh_host.label("runner_ssh_host"),
        Runner.ssh_port.label("runner_ssh_port"),
        Runner.host_key.label("runner_host_key"),
        OrgSettingsRow.fair_use_policy,
        OrgBillingRow.committed_minutes_per_month,
    )
    .join(
        ApiToken,
        and_(
            ApiToken.user_id == OffloadSession.user_id,
            ApiToken.token_hash.in_(bindparam("token_hashes", expanding=True)),
            ApiToken.revoked_at.is_(None),
        ),
    )
    .join(User, User.id == OffloadSession.user_id)
    .join(Organization, Organization.id == OffloadSession.org_id)
    .outerjoin(Runner, Runner.id == OffloadSession.runner_id)
    .outerjoin(OrgSettingsRow, OrgSettingsRow.org_id == OffloadSession.org_id)
    .outerjoin(OrgBillingRow, OrgBillingRow.org_id == OffloadSession.org_id)
    .where(OffloadSession.id.in_(bindparam("session_ids", expanding=True)))
    .order_by(OffloadSession.id)
    .with_for_update(of=OffloadSession, skip_locked=True)
)


@dataclass(frozen=True)
class LaneReport:
    """An activity report as the request brought it: its bearer token, its path's session."""

    token: str
    session_id: str
    report: s.ActivityReport


@dataclass(frozen=True)
class LaneAnswer:
    info: s.SessionInfo
    touch_token_id: str | None  # the token's last use is due to be written (tokens.py)


def parse_report(body: bytes) -> s.ActivityReport | None:
    """The body as FastAPI reads it (JSON text, then the model); None if it is not a report."""
    try:
        return s.ActivityReport.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # json's errors are ValueErrors
        return None


def _in_lane(row: _LaneRow) -> bool:
    return (
        row.state in _LANE_STATES
        and row.prompt_reason != PromptReason.QUIET.value
        and row.gpu_uuid is None
        and row.committed_minutes_per_month is None
    )


def _runner(row: _LaneRow) -> s.RunnerEndpoint | None:
    if row.runner_id is None:
        return None
    return s.RunnerEndpoint(
        id=row.runner_id,
        name=row.runner_name,
        ssh_host=row.runner_ssh_host,
        ssh_port=row.runner_ssh_port,
        host_key=row.runner_host_key,
    )


def _claimed_rows(conn: Connection, reports: Sequence[LaneReport]) -> dict[int, _LaneRow]:
    """The locked row of each report the lane takes, by the report's place in the batch: its
    token is a live user token of the session's owner, and the session is in the lane's states.
    A second report for a session in one batch takes the full path (an agent sends one at a
    time, so it is a retry)."""
    hashes = {
        index: tokens.hash_token(report.token)
        for index, report in enumerate(reports)
        if report.token.startswith(tokens.USER_TOKEN_PREFIX)
    }
    if not hashes:
        return {}
    params = {
        "session_ids": sorted({reports[index].session_id for index in hashes}),
        "token_hashes": sorted(set(hashes.values())),
    }
    rows = {(row.id, row.token_hash): row for row in conn.execute(_LANE_ROWS, params)}
    claimed: dict[int, _LaneRow] = {}
    taken: set[str] = set()
    for index, token_hash in hashes.items():
        row = rows.get((reports[index].session_id, token_hash))
        if row is not None and _in_lane(row) and row.id not in taken:
            taken.add(row.id)
            claimed[index] = row
    return claimed


def reports_tx(
    conn: Connection, reports: Sequence[LaneReport], now: datetime, rules: Rules
) -> list[LaneAnswer | None]:
    """Each report's answer in the lane, or None (nothing written for it) for the full path:
    one statement per step for the whole batch."""
    claimed = _claimed_rows(conn, reports)
    users = {row.user_id for row in claimed.values()}
    used_today = ledger.day_seconds_by_user(conn, now, users) if users else {}
    facts_of: dict[int, lifecycle.Facts] = {}
    stamped: list[str] = []
    for index, row in claimed.items():
        policy = s.FairUsePolicy(row.fair_use_policy or s.FairUsePolicy.PROMPT)
        used = used_today.get(row.user_id, 0.0)
        facts = lifecycle.facts_from(row, used, policy, allowance_left_s=None, org=row.org_name)
        if lifecycle.evaluate(facts, now, rules):
            continue
        if lifecycle.is_activity(reports[index].report):
            stamped.append(row.id)
            facts = replace(facts, last_activity_at=lifecycle.stamp_time(row.last_activity_at, now))
        facts_of[index] = facts
    lifecycle.stamp_activities_at(conn, stamped, now)
    answered = [claimed[index].id for index in facts_of]
    billed = ledger.sessions_seconds(conn, answered, now) if answered else {}
    answers: list[LaneAnswer | None] = [None] * len(reports)
    for index, facts in facts_of.items():
        row = claimed[index]
        info = sessions.info_view(
            row,
            facts,
            now,
            rules,
            user=row.username,
            runner=_runner(row),
            billed_s=billed.get(row.id, 0.0),
            gpus=[],
        )
        touch_due = tokens.touch_due(row.token_used_at, now)
        answers[index] = LaneAnswer(info, row.token_id if touch_due else None)
    return answers


def answer_batch(ctx: ServerContext, reports: Sequence[LaneReport]) -> list[LaneAnswer | None]:
    """The batch in one row-locked transaction (on a worker thread: `Batches` runs it); all None
    when the database refused it, and the full path answers each report, with the fix."""
    ctx.lane_counts.batches += 1  # one batch at a time: no other thread writes it
    try:
        with ctx.db.row_locked_connection() as conn:
            return reports_tx(conn, reports, ctx.now(), Rules.from_settings(ctx.settings))
    except _GIVE_BACK_ON as exc:
        log.debug("activity lane gave back a batch of %d: %s", len(reports), exc)
        return [None] * len(reports)


def lane_batches(ctx: ServerContext) -> Batches[LaneReport, LaneAnswer | None]:
    """The process's batches of lane reports (api/activity_lane.py holds one)."""
    return Batches(partial(answer_batch, ctx))


async def try_report(
    ctx: ServerContext,
    batches: Batches[LaneReport, LaneAnswer | None],
    token: str,
    session_id: str,
    body: bytes,
) -> s.SessionInfo | None:
    """The answer to an activity report from the lane, or None: the full path answers it."""
    report = parse_report(body)
    if report is None:
        return None
    answer = await batches.submit(LaneReport(token, session_id, report))
    if answer is None:
        return None
    if answer.touch_token_id is not None:  # as auth.authenticate_user does: a rare write
        try:
            await ctx.db.run_row_locked(tokens.touch_api_token, answer.touch_token_id, ctx.now())
        except _GIVE_BACK_ON as exc:  # the report is answered; the touch is due again next time
            log.debug("activity lane left a token's last use unwritten: %s", exc)
    return answer.info
