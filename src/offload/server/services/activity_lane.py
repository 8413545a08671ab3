"""The activity lane: the common activity report, answered in one short transaction of plain
columns.

Activity reports are most of what a control plane serves (bench/load.py: three requests in
four), and nearly all of them find the session active with nothing due: they only restart its
quiet clock.  For these the lane reads the token, the session and what its answer shows in one
statement, the user's day in a second, stamps and reads the billed time: four statements on a
plain connection in one row-locked transaction, where the full path (api/sessions.py) runs nine
over two transactions with ORM objects (docs/operations.md has the costs).

Whatever is not that common case gets None, and the request takes the full path, which answers
it, errors included, exactly as before: a token that is not a live user token or not the
session owner's, an idle or ended session, a transition or prompt that is due, a quiet prompt
to clear, a GPU session (its devices come from the runner's report), a metered organisation
(its allowance needs its month of ledger), a body that is not a valid report.  The lane
repeats no rule: its facts go through `lifecycle.evaluate` and its answer is built by
`sessions.info_view`, as on the full path.  tests/unit/server/test_activity_lane.py holds the
two to the same answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, Row, and_, bindparam, select

from offload.core import schemas as s
from offload.core.schemas import PromptReason
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
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

_LaneRow = Row[*tuple[Any, ...]]
_LANE_STATES = frozenset({S.ACTIVE.value, S.STARTING.value})

# Built once (services/ledger.py says why).  The token is joined on the session's owner, so a
# row comes back only for the owner's live token; the row lock is the session's, as on the
# full path's stamp (sessions._activity_stamp_tx).
_LANE_ROW = (
    select(
        ApiToken.id.label("token_id"),
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
            ApiToken.token_hash == bindparam("token_hash"),
            ApiToken.revoked_at.is_(None),
        ),
    )
    .join(User, User.id == OffloadSession.user_id)
    .join(Organization, Organization.id == OffloadSession.org_id)
    .outerjoin(Runner, Runner.id == OffloadSession.runner_id)
    .outerjoin(OrgSettingsRow, OrgSettingsRow.org_id == OffloadSession.org_id)
    .outerjoin(OrgBillingRow, OrgBillingRow.org_id == OffloadSession.org_id)
    .where(OffloadSession.id == bindparam("session_id"))
    .with_for_update(of=OffloadSession)
)


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


def report_tx(
    conn: Connection,
    token: str,
    session_id: str,
    report: s.ActivityReport,
    now: datetime,
    rules: Rules,
) -> LaneAnswer | None:
    """The report in the lane, or None (nothing written) for the full path."""
    if not token.startswith(tokens.USER_TOKEN_PREFIX):
        return None
    params = {"session_id": session_id, "token_hash": tokens.hash_token(token)}
    row = conn.execute(_LANE_ROW, params).first()
    if row is None or not _in_lane(row):
        return None
    policy = s.FairUsePolicy(row.fair_use_policy or s.FairUsePolicy.PROMPT)
    used = ledger.user_day_seconds(conn, row.user_id, now)
    facts = lifecycle.facts_from(row, used, policy, allowance_left_s=None, org=row.org_name)
    if lifecycle.evaluate(facts, now, rules):
        return None
    if lifecycle.is_activity(report):
        at = lifecycle.stamp_time(row.last_activity_at, now)
        lifecycle.stamp_activity_at(conn, row.id, at)
        facts = replace(facts, last_activity_at=at)
    info = sessions.info_view(
        row,
        facts,
        now,
        rules,
        user=row.username,
        runner=_runner(row),
        billed_s=ledger.session_seconds(conn, row.id, now),
        gpus=[],
    )
    touch_due = tokens.touch_due(row.token_used_at, now)
    return LaneAnswer(info, row.token_id if touch_due else None)


async def try_report(
    ctx: ServerContext, token: str, session_id: str, body: bytes
) -> s.SessionInfo | None:
    """The answer to an activity report from the lane, or None: the full path answers it."""
    report = parse_report(body)
    if report is None:
        return None
    now, rules = ctx.now(), Rules.from_settings(ctx.settings)
    answer = await ctx.db.run_row_locked_columns(report_tx, token, session_id, report, now, rules)
    if answer is None:
        return None
    if answer.touch_token_id is not None:  # as auth.authenticate_user does: a rare write
        await ctx.db.run_row_locked(tokens.touch_api_token, answer.touch_token_id, ctx.now())
    return answer.info
