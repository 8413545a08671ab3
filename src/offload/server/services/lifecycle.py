"""The session state machine: the transition table, the rules of idle, grace, prompts and limits,
and the clock that applies them.

    idle-disconnected ─► starting ─► active ◄─► idle
            │               │          │         │
            └───────────────┴──────────┴─────────┴──► terminated | failed

Three layers, one file:

- `TRANSITIONS` and `move`: the only way a session changes state; `move` keeps the ledger in step
  (billing opens on active, closes on idle or end, reopens on a resume within grace) inside the
  caller's transaction, so a restart can never see one without the other.
- `evaluate(facts, now, rules)`: pure.  What is due for one session at `now` (go idle, end, ask a
  prompt), each action stamped with the instant it was due, so a late clock (a restarted control
  plane) bills exactly what a punctual one would have.
- `tick(ctx)`: loads live sessions, evaluates them, and applies the due actions one session per
  short transaction, re-evaluating under the row lock (the guard: a concurrent change wins).
  The app runs it every `tick_interval_s`; tests call it with their own clock.

The rules, precisely (docs/activity.md says the same to users):

- An active session with no activity for its idle timeout goes idle at last activity + timeout.
- A quiet prompt is asked once the session has been quiet for 3 minutes *and* is within the
  answer time of its idle moment (so a 1 h idle timeout is honoured); it expires at the idle
  moment.  Answers: keep (the quiet clock restarts), idle (idle now).  Activity clears it.
- A long-session prompt is asked every 3 hours of session (since start or the previous one), every
  hour once the user has 8 compute hours in the UTC day and the organisation's fair-use policy is
  `prompt`.  Unanswered after `prompt_answer_timeout_s`: idle.  Only an answer clears it.
- An idle session whose activity returns within 5 minutes resumes, the gap billed; after 5
  minutes it is terminated (the runner wipes its environment).
- Out of allowance (organisation) or past 8 compute hours with policy `stop` (user): terminated
  at once, after warnings in `SessionInfo.warnings` during the last 10 minutes.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, cast

from sqlalchemy import Row, Table, and_, bindparam, delete, func, inspect, not_, or_, select, update
from sqlalchemy.orm import Session as Db
from sqlalchemy.orm.attributes import set_committed_value

from offload.core.config import ServerSettings
from offload.core.errors import Conflict
from offload.core.schemas import ActivityReport, FairUsePolicy, PromptReason
from offload.core.schemas import SessionState as S
from offload.server.context import ServerContext
from offload.server.db.engine import Columns, execute_columns
from offload.server.db.models import (
    GpuClaim,
    OffloadSession,
    Organization,
    OrgBillingRow,
    OrgSettingsRow,
)
from offload.server.services import billing, ledger, org_settings

log = logging.getLogger(__name__)

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

END_IDLE_EXPIRED = "idle for 5 minutes: environment wiped"
END_FAIR_USE = "fair use: 8 compute hours used today (UTC)"
IDLE_NO_ACTIVITY = "no activity"
IDLE_PROMPT_UNANSWERED = "prompt unanswered"
IDLE_BY_USER = "idle now (by user)"


def end_allowance(org: str) -> str:
    return f"organisation {org} ran out of Offload allowance"


@dataclass(frozen=True)
class Rules:
    """The constants users pay by (docs/activity.md); the answer time is a server setting."""

    grace_s: float = 300.0
    quiet_prompt_after_s: float = 180.0
    long_session_prompt_every_s: float = 3 * 3600.0
    fair_use_prompt_every_s: float = 3600.0
    fair_use_day_s: float = 8 * 3600.0
    prompt_answer_s: float = 120.0
    warn_before_s: float = billing.WARN_BEFORE_S

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Rules:
        return cls(prompt_answer_s=float(settings.prompt_answer_timeout_s))


# ---- the table ----------------------------------------------------------------------------------


def can_transition(current: S, target: S) -> bool:
    return target in TRANSITIONS[current]


def transition(
    session: OffloadSession, target: S, now: datetime, reason: str | None = None
) -> None:
    """Move `session` to `target`, stamping started_at / ended_at; Conflict if not allowed.

    State only: callers with a database use `move`, which keeps the ledger in step."""
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


def _clear_prompt(row: OffloadSession) -> None:
    row.prompt_id = row.prompt_reason = None
    row.prompt_asked_at = row.prompt_expires_at = None


def move(db: Db, row: OffloadSession, target: S, at: datetime, reason: str | None = None) -> None:
    """State and ledger together (one transaction): the only way sessions change state."""
    current = S(row.state)
    transition(row, target, at, reason)
    if target is S.ACTIVE and current is S.IDLE:
        ledger.resume_billing(db, row)  # within grace: the gap is billed
        row.idle_since = None
        row.last_activity_at = at
    elif target is S.ACTIVE:
        ledger.start_billing(db, row, at)
        row.last_activity_at = at
    elif target is S.IDLE:
        ledger.stop_billing(db, row, at)
        row.idle_since = at
        _clear_prompt(row)
    elif target in _ENDED:
        ledger.stop_billing(db, row, at)
        _clear_prompt(row)
        if row.gpu_uuid is not None:  # the GPU is free for the next session
            db.execute(delete(GpuClaim).where(GpuClaim.session_id == row.id))
    log.info("session %s: %s -> %s (%s)", row.id, current.value, target.value, reason or "")


# ---- pure decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenPrompt:
    id: str
    reason: PromptReason
    asked_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class Facts:
    """What the rules need to know about one session at one instant (plain data)."""

    state: S
    idle_timeout_s: int
    started_at: datetime | None = None
    last_activity_at: datetime | None = None
    idle_since: datetime | None = None
    prompt: OpenPrompt | None = None
    last_long_prompt_at: datetime | None = None
    used_today_s: float = 0.0  # the user's billed seconds this UTC day, all sessions, up to now
    fair_use_policy: FairUsePolicy = FairUsePolicy.PROMPT
    allowance_left_s: float | None = None  # the organisation's; None: unlimited
    org: str = ""

    @property
    def quiet_since(self) -> datetime | None:
        return self.last_activity_at or self.started_at

    def idle_at(self) -> datetime | None:
        """When an active session goes idle if nothing happens (the prompt may bring it closer)."""
        if self.state is not S.ACTIVE or self.quiet_since is None:
            return None
        deadline = self.quiet_since + timedelta(seconds=self.idle_timeout_s)
        if self.prompt is not None:
            deadline = min(deadline, self.prompt.expires_at)
        return deadline

    def grace_ends_at(self, rules: Rules) -> datetime | None:
        if self.state is not S.IDLE or self.idle_since is None:
            return None
        return self.idle_since + timedelta(seconds=rules.grace_s)

    def past_fair_use(self, rules: Rules) -> bool:
        return self.used_today_s >= rules.fair_use_day_s


class ActionKind(StrEnum):
    GO_IDLE = "go_idle"
    TERMINATE = "terminate"
    ASK = "ask"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    at: datetime  # when it was due (a late tick still stamps the right instant)
    reason: str = ""
    prompt_reason: PromptReason | None = None
    expires_at: datetime | None = None
    prompt_id: str = field(default_factory=lambda: "prm_" + secrets.token_hex(6))


def _next_action(facts: Facts, now: datetime, rules: Rules) -> Action | None:
    if facts.state is S.IDLE:
        grace_end = facts.grace_ends_at(rules)
        if grace_end is not None and now >= grace_end:
            return Action(ActionKind.TERMINATE, grace_end, END_IDLE_EXPIRED)
        return None
    if facts.state is not S.ACTIVE:
        return None
    idle_at = facts.idle_at()
    if idle_at is not None and now >= idle_at:
        prompt_ran_out = facts.prompt is not None and idle_at == facts.prompt.expires_at
        return Action(
            ActionKind.GO_IDLE,
            idle_at,
            IDLE_PROMPT_UNANSWERED if prompt_ran_out else IDLE_NO_ACTIVITY,
        )
    if facts.allowance_left_s is not None and facts.allowance_left_s <= 0:
        return Action(ActionKind.TERMINATE, now, end_allowance(facts.org))
    if facts.fair_use_policy is FairUsePolicy.STOP and facts.past_fair_use(rules):
        return Action(ActionKind.TERMINATE, now, END_FAIR_USE)
    if facts.prompt is None:
        return _prompt_due(facts, now, rules)
    return None


def _prompt_due(facts: Facts, now: datetime, rules: Rules) -> Action | None:
    hourly = facts.fair_use_policy is FairUsePolicy.PROMPT and facts.past_fair_use(rules)
    every = rules.fair_use_prompt_every_s if hourly else rules.long_session_prompt_every_s
    anchor = facts.last_long_prompt_at or facts.started_at
    if anchor is not None and now >= anchor + timedelta(seconds=every):
        reason = PromptReason.FAIR_USE if hourly else PromptReason.LONG_SESSION
        expires = now + timedelta(seconds=rules.prompt_answer_s)
        return Action(ActionKind.ASK, now, prompt_reason=reason, expires_at=expires)
    quiet_since, idle_at = facts.quiet_since, facts.idle_at()
    if quiet_since is None or idle_at is None or facts.idle_timeout_s <= rules.quiet_prompt_after_s:
        return None
    lead = max(rules.quiet_prompt_after_s, facts.idle_timeout_s - rules.prompt_answer_s)
    if now >= quiet_since + timedelta(seconds=lead):
        return Action(ActionKind.ASK, now, prompt_reason=PromptReason.QUIET, expires_at=idle_at)
    return None


def after(facts: Facts, action: Action) -> Facts:
    """The facts once `action` is applied (pure: `evaluate` chains actions with it)."""
    if action.kind is ActionKind.GO_IDLE:
        return replace(facts, state=S.IDLE, idle_since=action.at, prompt=None)
    if action.kind is ActionKind.TERMINATE:
        return replace(facts, state=S.TERMINATED, prompt=None)
    assert action.prompt_reason is not None and action.expires_at is not None
    prompt = OpenPrompt(action.prompt_id, action.prompt_reason, action.at, action.expires_at)
    if action.prompt_reason is PromptReason.QUIET:
        return replace(facts, prompt=prompt)
    return replace(facts, prompt=prompt, last_long_prompt_at=action.at)


def evaluate(facts: Facts, now: datetime, rules: Rules) -> list[Action]:
    """Every action due for this session at `now`, in order (going idle long ago, for instance,
    may be followed by the end of its grace)."""
    actions: list[Action] = []
    for _ in range(4):  # idle, then end: the longest chain; the bound guards against a loop
        action = _next_action(facts, now, rules)
        if action is None:
            break
        actions.append(action)
        facts = after(facts, action)
    return actions


def warnings(facts: Facts, now: datetime, rules: Rules) -> list[str]:
    """What the user should know before a limit acts (SessionInfo.warnings)."""
    found: list[str] = []
    if facts.state not in (S.ACTIVE, S.IDLE, S.STARTING):
        return found
    left = facts.allowance_left_s
    if left is not None and left <= rules.warn_before_s:
        found.append(
            f"Organisation {facts.org} has about {max(0, round(left / 60))} min of Offload "
            "allowance left; this session stops when it runs out. An owner can enable on-demand "
            "usage or raise its limit."
        )
    remaining = rules.fair_use_day_s - facts.used_today_s
    until_reset = (ledger.utc_day(now)[1] - now).total_seconds()
    reset = f"resets at 00:00 UTC, in {describe_duration(until_reset)}"
    if facts.fair_use_policy is FairUsePolicy.STOP and 0 < remaining <= rules.warn_before_s:
        found.append(
            f"{describe_duration(remaining)} left of today's 8 fair-use compute hours ({reset}); "
            "this session stops then."
        )
    elif remaining <= 0 and facts.fair_use_policy is FairUsePolicy.WARN:
        found.append(
            f"You are past today's 8 fair-use compute hours ({reset}); your organisation's "
            "owners see this usage."
        )
    elif remaining <= 0 and facts.fair_use_policy is FairUsePolicy.PROMPT:
        found.append(
            f"You are past today's 8 fair-use compute hours ({reset}); you will be asked every "
            "hour whether to keep the session."
        )
    return found


def describe_duration(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


# ---- facts from the database --------------------------------------------------------------------


@dataclass
class FactCache:
    """Per-tick memo of the per-user and per-organisation figures shared by many sessions."""

    used_today: dict[str, float] = field(default_factory=dict)
    policies: dict[str, org_settings.OrgPolicy] = field(default_factory=dict)
    allowance: dict[tuple[str, str], float | None] = field(default_factory=dict)


class LifecycleColumns(Protocol):
    """A session's columns the rules read: an ORM row, or a row of a plain select (the activity
    lane, services/activity_lane.py)."""

    @property
    def state(self) -> str: ...
    @property
    def idle_timeout_s(self) -> int: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def last_activity_at(self) -> datetime | None: ...
    @property
    def idle_since(self) -> datetime | None: ...
    @property
    def prompt_id(self) -> str | None: ...
    @property
    def prompt_reason(self) -> str | None: ...
    @property
    def prompt_asked_at(self) -> datetime | None: ...
    @property
    def prompt_expires_at(self) -> datetime | None: ...
    @property
    def last_long_prompt_at(self) -> datetime | None: ...


# The columns `LifecycleColumns` names, for the selects that read sessions as plain columns.
LIFECYCLE_COLUMNS = (
    OffloadSession.state,
    OffloadSession.idle_timeout_s,
    OffloadSession.started_at,
    OffloadSession.last_activity_at,
    OffloadSession.idle_since,
    OffloadSession.prompt_id,
    OffloadSession.prompt_reason,
    OffloadSession.prompt_asked_at,
    OffloadSession.prompt_expires_at,
    OffloadSession.last_long_prompt_at,
)


def facts_from(
    row: LifecycleColumns,
    used_today_s: float,
    fair_use_policy: FairUsePolicy,
    allowance_left_s: float | None,
    org: str,
) -> Facts:
    """The facts of a session's columns and its user's and organisation's figures (pure)."""
    prompt = None
    if row.prompt_id and row.prompt_reason and row.prompt_asked_at and row.prompt_expires_at:
        prompt = OpenPrompt(
            row.prompt_id,
            PromptReason(row.prompt_reason),
            row.prompt_asked_at,
            row.prompt_expires_at,
        )
    return Facts(
        state=S(row.state),
        idle_timeout_s=row.idle_timeout_s,
        started_at=row.started_at,
        last_activity_at=row.last_activity_at,
        idle_since=row.idle_since,
        prompt=prompt,
        last_long_prompt_at=row.last_long_prompt_at,
        used_today_s=used_today_s,
        fair_use_policy=fair_use_policy,
        allowance_left_s=allowance_left_s,
        org=org,
    )


class SessionFactColumns(LifecycleColumns, Protocol):
    """The columns `facts_of` reads besides the rules' own: whose figures apply."""

    @property
    def user_id(self) -> str: ...
    @property
    def org_id(self) -> str: ...
    @property
    def instance_type(self) -> str: ...


def facts_of(db: Db, row: OffloadSession, now: datetime, cache: FactCache | None = None) -> Facts:
    return facts_with(db, row, row.org, now, cache)


def facts_with(
    db: Db,
    row: SessionFactColumns,
    org: Organization,
    now: datetime,
    cache: FactCache | None = None,
) -> Facts:
    """The facts of a session at `now`, given its organisation (`row` may be plain columns)."""
    cache = cache or FactCache()
    if row.user_id not in cache.used_today:
        cache.used_today[row.user_id] = ledger.user_day_seconds(db, row.user_id, now)
    if row.org_id not in cache.policies:
        cache.policies[row.org_id] = org_settings.policy_of(db, org)
    key = (row.org_id, row.instance_type)
    if key not in cache.allowance:
        minutes = billing.minutes_left(db, org, row.instance_type, now)
        cache.allowance[key] = None if minutes is None else minutes * 60
    return facts_from(
        row,
        used_today_s=cache.used_today[row.user_id],
        fair_use_policy=cache.policies[row.org_id].fair_use_policy,
        allowance_left_s=cache.allowance[key],
        org=org.name,
    )


def apply(db: Db, row: OffloadSession, action: Action) -> None:
    if action.kind is ActionKind.GO_IDLE:
        move(db, row, S.IDLE, action.at, action.reason)
    elif action.kind is ActionKind.TERMINATE:
        move(db, row, S.TERMINATED, action.at, action.reason)
    else:
        assert action.prompt_reason is not None
        row.prompt_id = action.prompt_id
        row.prompt_reason = action.prompt_reason.value
        row.prompt_asked_at = action.at
        row.prompt_expires_at = action.expires_at
        if action.prompt_reason is not PromptReason.QUIET:
            row.last_long_prompt_at = action.at
        log.info("session %s: prompt %s asked", row.id, action.prompt_reason.value)


def advance(
    db: Db, row: OffloadSession, now: datetime, rules: Rules, cache: FactCache | None = None
) -> bool:
    """Apply whatever is due for `row` at `now`; True if its state changed. A `cache` shared
    with a later `facts_of` at the same `now` in the same transaction saves its queries: what
    it holds (the user's day, the organisation's policy and allowance) is what a transition at
    `now` leaves as it was (a closed interval ends at `now`, a new one starts there)."""
    before = row.state
    for action in evaluate(facts_of(db, row, now, cache), now, rules):
        apply(db, row, action)
    return row.state != before


# ---- events -------------------------------------------------------------------------------------


def is_activity(report: ActivityReport) -> bool:
    """Whether a report restarts the quiet clock (an empty one only asks how the session is)."""
    return bool(report.api_calls or report.open_streams or report.building)


def stamp_time(last_activity_at: datetime | None, now: datetime) -> datetime:
    """The quiet clock's new start: `now`, never earlier than the stamp already there."""
    return max(now, last_activity_at or now)


def note_activity(db: Db, row: OffloadSession, now: datetime) -> None:
    """Something happened in the session at `now`: restart the quiet clock, resume if idle.

    Call `advance` first: a session whose grace already ran out must not come back."""
    if S(row.state) is S.IDLE:
        move(db, row, S.ACTIVE, now, "activity within grace")
    else:
        stamp_activity(db, [row], now)


# Built once, run as a plain UPDATE (no unit of work): every activity report and every heartbeat
# stamps it, and flushing one dirty row cost more than all the rest of an activity report's SQL
# (bench/serve_costs.py).  The condition keeps it monotonic in the database itself: an activity
# report stamps without the write lock (sessions.py), so a heartbeat that read the row before
# that report committed must not write its older time over the report's.  Every session gets
# the same `now` (a stamp is never earlier than the one there, and the condition writes nothing
# where that one is later), so a runner's busy sessions take one statement, not one each.
_SESSIONS = cast(Table, OffloadSession.__table__)
_STAMP_ACTIVITY = (
    update(_SESSIONS)
    .where(
        _SESSIONS.c.id.in_(bindparam("stamp_ids", expanding=True)),
        or_(
            _SESSIONS.c.last_activity_at.is_(None),
            _SESSIONS.c.last_activity_at < bindparam("stamp_at"),
        ),
    )
    .values(last_activity_at=bindparam("stamp_at"))
)


def stamp_activity(db: Db, rows: Sequence[OffloadSession], now: datetime) -> None:
    """Restart the quiet clock of these active or starting sessions at `now` (one statement for
    all of them); activity clears a quiet prompt.  The loaded rows show the new stamp."""
    stamped: list[str] = []
    for row in rows:
        if S(row.state) not in (S.ACTIVE, S.STARTING):
            continue
        at = stamp_time(row.last_activity_at, now)
        if at != row.last_activity_at and inspect(row).persistent:
            stamped.append(row.id)
            set_committed_value(row, "last_activity_at", at)  # written here, not by a flush
        elif at != row.last_activity_at:  # not in the database yet: its INSERT carries it
            row.last_activity_at = at
        if row.prompt_reason == PromptReason.QUIET.value:
            _clear_prompt(row)
    stamp_activities_at(db, stamped, now)


def stamp_activities_at(db: Columns, session_ids: Collection[str], now: datetime) -> None:
    """Stamp these sessions at `now` in one statement (`stamp_activity`, and the activity lane
    for sessions known only by their columns), where none is later already: the caller checked
    that each is active or starting without a quiet prompt."""
    if session_ids:
        params = {"stamp_ids": sorted(session_ids), "stamp_at": now}
        execute_columns(db, _STAMP_ACTIVITY, params)


def keep(row: OffloadSession, now: datetime) -> None:
    """The user answered "keep" to the open prompt."""
    if row.prompt_reason == PromptReason.QUIET.value:
        row.last_activity_at = now
    _clear_prompt(row)


# ---- the clock ----------------------------------------------------------------------------------


_QUIET_SINCE = func.coalesce(OffloadSession.last_activity_at, OffloadSession.started_at)
_PROMPT_ANCHOR = func.coalesce(OffloadSession.last_long_prompt_at, OffloadSession.started_at)
_STAMP_TYPE = OffloadSession.last_activity_at.type
# A live session for which `evaluate` provably finds nothing due at `now` (the cut-offs come
# from `_settled_params`): active, no prompt open, quiet for less than the quiet prompt's wait
# and an idle timeout at least as long (so neither its idle moment nor its quiet prompt is due),
# its last long-session prompt (or its start) less than the shortest prompt cadence ago, and an
# organisation that neither stops at fair use nor meters an allowance (those hang on the
# user's day and the organisation's month, which the tick reads from the ledger).  Every
# comparison is guarded against NULL, so that NOT(settled) is never NULL: a row the test cannot
# prove settled is read, as every row was before.
_SETTLED = and_(
    OffloadSession.state == S.ACTIVE.value,
    OffloadSession.prompt_id.is_(None),
    OffloadSession.idle_timeout_s >= bindparam("quiet_wait_s"),
    _QUIET_SINCE.is_not(None),
    _QUIET_SINCE > bindparam("quiet_cutoff", type_=_STAMP_TYPE),
    _PROMPT_ANCHOR.is_not(None),
    _PROMPT_ANCHOR > bindparam("prompt_cutoff", type_=_STAMP_TYPE),
    or_(
        OrgSettingsRow.fair_use_policy.is_(None),
        OrgSettingsRow.fair_use_policy != FairUsePolicy.STOP.value,
    ),
    OrgBillingRow.committed_minutes_per_month.is_(None),
)

# Built once (services/ledger.py says why).  The tick runs every second on the leading replica:
# reading and evaluating every live session was O(live sessions) each second (47 ms for 1,000,
# most of a replica's background CPU under bench/load.py), while the sessions anything can be
# due for are few: the idle, the quiet, the prompted, the long-running, and those of metered or
# fair-use-stop organisations.  Only those are read; `_SETTLED` says why the rest can wait.
_DUE_CANDIDATES = (
    select(
        OffloadSession.id,
        OffloadSession.user_id,
        OffloadSession.org_id,
        OffloadSession.instance_type,
        *LIFECYCLE_COLUMNS,
    )
    .outerjoin(OrgSettingsRow, OrgSettingsRow.org_id == OffloadSession.org_id)
    .outerjoin(OrgBillingRow, OrgBillingRow.org_id == OffloadSession.org_id)
    .where(OffloadSession.state.in_((S.ACTIVE.value, S.IDLE.value)), not_(_SETTLED))
)


def _settled_params(now: datetime, rules: Rules) -> dict[str, object]:
    prompt_every_s = min(rules.long_session_prompt_every_s, rules.fair_use_prompt_every_s)
    return {
        "quiet_wait_s": rules.quiet_prompt_after_s,
        "quiet_cutoff": now - timedelta(seconds=rules.quiet_prompt_after_s),
        "prompt_cutoff": now - timedelta(seconds=prompt_every_s),
    }


def due_candidates(db: Columns, now: datetime, rules: Rules) -> Sequence[Row[Any]]:
    """The live sessions the tick evaluates at `now`: all but the provably settled."""
    return execute_columns(db, _DUE_CANDIDATES, _settled_params(now, rules)).all()


def due_session_ids(db: Db, now: datetime, rules: Rules) -> list[str]:
    """The sessions something is due for at `now` (the tick applies it, each under its lock)."""
    rows = due_candidates(db, now, rules)
    if not rows:
        return []
    org_ids = {row.org_id for row in rows}
    orgs = {
        org.id: org for org in db.scalars(select(Organization).where(Organization.id.in_(org_ids)))
    }
    # The candidates' users' days at once: a query per session was most of a tick's cost.
    used = ledger.day_seconds_by_user(db, now, {row.user_id for row in rows})
    cache = FactCache(used_today={row.user_id: used.get(row.user_id, 0.0) for row in rows})
    return [
        row.id
        for row in rows
        if evaluate(facts_with(db, row, orgs[row.org_id], now, cache), now, rules)
    ]


def _advance_tx(db: Db, session_id: str, now: datetime, rules: Rules) -> str | None:
    """Re-read under the row lock and re-evaluate (the guard); the runner to wake, if any.

    A row another replica holds is skipped (SKIP LOCKED): that replica applies what is due, and
    whatever it leaves is due again on the next tick."""
    row = db.scalars(
        select(OffloadSession)
        .where(OffloadSession.id == session_id)
        .with_for_update(skip_locked=True)
    ).one_or_none()
    if row is None or not S(row.state).live:
        return None
    changed = advance(db, row, now, rules)
    return row.runner_id if changed else None


async def tick(ctx: ServerContext, now: datetime | None = None) -> int:
    """Apply every due action to every live session; returns how many sessions changed.

    One read to find the due sessions, then one short write transaction per session: no
    transaction is held across another's work, and a change racing in between is re-checked."""
    now = now or ctx.now()
    rules = Rules.from_settings(ctx.settings)
    due = await ctx.db.read(due_session_ids, now, rules)
    for session_id in due:
        runner_id = await ctx.db.run(_advance_tx, session_id, now, rules)
        if runner_id:
            ctx.signals.notify(runner_id)
    return len(due)
