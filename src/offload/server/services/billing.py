"""Billing per organisation: committed minutes, trial credit, on-demand spend, and what is left.

Terms (owners set them): committed minutes per UTC month, on-demand usage on/off with an optional
monthly spend limit, a rate per instance type (cents per minute), trial credits that expire 90
days after their grant.  An organisation without terms (`committed_minutes_per_month` None) is
unmetered: the self-hosted default, where no limit applies.

Usage comes from the ledger and is priced in time order: each month's committed minutes first,
then trial credit (the credit expiring first is spent first; usage counts against a credit when
it happens before the credit expires), then on-demand spend.  Everything is derived from the
ledger on demand, so a restart can neither lose nor double-count spend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.core.errors import InvalidInput, PermissionDenied
from offload.server.db.models import Organization, OrgBillingRow, TrialCreditRow
from offload.server.services import ledger

TRIAL_VALIDITY = timedelta(days=90)
DEFAULT_RATES_CENTS_PER_MINUTE: dict[str, float] = {
    s.InstanceType.STANDARD.value: 1.0,
    s.InstanceType.GPU.value: 10.0,
}
# A running session is warned this long before its organisation's allowance runs out.
WARN_BEFORE_S = 600.0


# ---- pure ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credit:
    amount_cents: float
    granted_at: datetime

    @property
    def expires_at(self) -> datetime:
        return self.granted_at + TRIAL_VALIDITY

    def valid_at(self, at: datetime) -> bool:
        return self.granted_at <= at < self.expires_at


@dataclass(frozen=True)
class Terms:
    committed_minutes_per_month: int | None = None  # None: unmetered
    on_demand_enabled: bool = False
    on_demand_limit_cents: int | None = None  # None: no limit
    rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES_CENTS_PER_MINUTE))
    credits: tuple[Credit, ...] = ()

    @property
    def metered(self) -> bool:
        return self.committed_minutes_per_month is not None

    def rate(self, instance_type: str) -> float:
        return self.rates.get(instance_type, DEFAULT_RATES_CENTS_PER_MINUTE.get(instance_type, 0))

    def history_start(self, now: datetime) -> datetime:
        """How far back usage matters at `now`: this month, or the grant of a credit that was
        still valid when this month began."""
        month_start, _ = ledger.utc_month(now)
        grants = [c.granted_at for c in self.credits if c.expires_at > month_start]
        return min([month_start, *grants])


@dataclass(frozen=True)
class Standing:
    """An organisation's allowance at one instant, in its current UTC month."""

    metered: bool
    month_start: datetime
    used_minutes: float = 0.0
    committed_minutes: int | None = None
    committed_left_minutes: float = 0.0
    credit_left_cents: tuple[float, ...] = ()  # per credit of `Terms.credits`, valid now
    on_demand_enabled: bool = False
    on_demand_spent_cents: float = 0.0
    on_demand_limit_cents: int | None = None

    @property
    def trial_left_cents(self) -> float:
        return sum(self.credit_left_cents)

    @property
    def on_demand_left_cents(self) -> float | None:
        """None: no limit."""
        if not self.on_demand_enabled:
            return 0.0
        if self.on_demand_limit_cents is None:
            return None
        return max(0.0, self.on_demand_limit_cents - self.on_demand_spent_cents)

    def minutes_left(self, rate_cents_per_minute: float) -> float | None:
        """Minutes of use left at this rate; None: unlimited."""
        if not self.metered:
            return None
        on_demand = self.on_demand_left_cents
        if on_demand is None:
            return None
        paid = self.trial_left_cents + on_demand
        if rate_cents_per_minute <= 0:
            return None if paid > 0 else self.committed_left_minutes
        return self.committed_left_minutes + paid / rate_cents_per_minute


def _month_chunks(
    interval: ledger.Interval, lo: datetime, now: datetime
) -> list[tuple[datetime, datetime]]:
    """The interval clipped to [lo, now], cut at UTC month boundaries."""
    start, end = max(interval.start, lo), min(interval.end_or(now), now)
    chunks = []
    while start < end:
        _, month_end = ledger.utc_month(start)
        chunks.append((start, min(end, month_end)))
        start = min(end, month_end)
    return chunks


def standing(terms: Terms, pieces: list[ledger.Piece], now: datetime) -> Standing:
    """Price `pieces` (the org's ledger since `terms.history_start(now)`) in time order."""
    month_start, _ = ledger.utc_month(now)
    if not terms.metered:
        return Standing(metered=False, month_start=month_start)
    committed = float(terms.committed_minutes_per_month or 0)
    committed_left: dict[datetime, float] = {}
    credit_left = [float(c.amount_cents) for c in terms.credits]
    order = sorted(range(len(terms.credits)), key=lambda i: terms.credits[i].expires_at)
    used = spent = 0.0
    lo = terms.history_start(now)
    for piece in sorted(pieces, key=lambda p: p.interval.start):
        for start, end in _month_chunks(piece.interval, lo, now):
            month, _ = ledger.utc_month(start)
            minutes = (end - start).total_seconds() / 60
            left = committed_left.get(month, committed)
            covered = min(minutes, left)
            committed_left[month] = left - covered
            cost = (minutes - covered) * terms.rate(piece.instance_type)
            for i in order:
                if cost <= 0:
                    break
                if terms.credits[i].valid_at(start):
                    take = min(cost, credit_left[i])
                    credit_left[i] -= take
                    cost -= take
            if month == month_start:
                used += minutes
                spent += cost
    return Standing(
        metered=True,
        month_start=month_start,
        used_minutes=used,
        committed_minutes=terms.committed_minutes_per_month,
        committed_left_minutes=committed_left.get(month_start, committed),
        credit_left_cents=tuple(
            left if c.valid_at(now) else 0.0
            for c, left in zip(terms.credits, credit_left, strict=True)
        ),
        on_demand_enabled=terms.on_demand_enabled,
        on_demand_spent_cents=spent,
        on_demand_limit_cents=terms.on_demand_limit_cents,
    )


# ---- database -----------------------------------------------------------------------------------


# Built once (services/ledger.py says why): every activity report reads it.
_BILLING_ROW = select(OrgBillingRow).where(OrgBillingRow.org_id == bindparam("org_id"))


def _row(db: Db, org: Organization) -> OrgBillingRow | None:
    return db.scalars(_BILLING_ROW, {"org_id": org.id}).one_or_none()


def _credit_rows(db: Db, org: Organization) -> list[TrialCreditRow]:
    return list(
        db.scalars(
            select(TrialCreditRow)
            .where(TrialCreditRow.org_id == org.id)
            .order_by(TrialCreditRow.granted_at, TrialCreditRow.id)
        )
    )


def terms_of(db: Db, org: Organization) -> Terms:
    row = _row(db, org)
    credits = tuple(Credit(c.amount_cents, c.granted_at) for c in _credit_rows(db, org))
    if row is None:
        return Terms(credits=credits)
    return Terms(
        committed_minutes_per_month=row.committed_minutes_per_month,
        on_demand_enabled=row.on_demand_enabled,
        on_demand_limit_cents=row.on_demand_limit_cents,
        rates={**DEFAULT_RATES_CENTS_PER_MINUTE, **row.rates_cents_per_minute},
        credits=credits,
    )


def org_standing(db: Db, org: Organization, now: datetime) -> tuple[Terms, Standing]:
    terms = terms_of(db, org)
    if not terms.metered:
        return terms, standing(terms, [], now)
    pieces = ledger.org_pieces(db, org.id, terms.history_start(now), now + timedelta(seconds=1))
    return terms, standing(terms, pieces, now)


def minutes_left(db: Db, org: Organization, instance_type: str, now: datetime) -> float | None:
    row = _row(db, org)
    if row is None or row.committed_minutes_per_month is None:
        return None  # unmetered (the self-hosted default): no limit, no credits to read
    terms, current = org_standing(db, org, now)
    return current.minutes_left(terms.rate(instance_type))


def billing_view(db: Db, org: Organization, now: datetime) -> s.OrgBilling:
    terms, current = org_standing(db, org, now)
    # Unmetered organisations spend nothing: a credit valid now is whole.
    lefts = current.credit_left_cents or tuple(
        c.amount_cents if c.valid_at(now) else 0.0 for c in terms.credits
    )
    credits = [
        s.TrialCredit(
            amount_cents=int(c.amount_cents),
            granted_at=c.granted_at,
            expires_at=c.expires_at,
            remaining_cents=round(left, 2),
        )
        for c, left in zip(terms.credits, lefts, strict=True)
    ]
    return s.OrgBilling(
        org=org.name,
        committed_minutes_per_month=terms.committed_minutes_per_month,
        on_demand_enabled=terms.on_demand_enabled,
        on_demand_limit_cents=terms.on_demand_limit_cents,
        rates_cents_per_minute={s.InstanceType(k): v for k, v in terms.rates.items()},
        trial_credits=credits,
    )


def usage_view(db: Db, org: Organization, now: datetime) -> s.OrgUsage:
    terms, current = org_standing(db, org, now)
    if not terms.metered:
        lo, hi = ledger.utc_month(now)
        pieces = ledger.org_pieces(db, org.id, lo, hi)
        used = ledger.seconds_within((p.interval for p in pieces), lo, hi, now) / 60
        return s.OrgUsage(org=org.name, month_start=lo, used_minutes=used, metered=False)
    left = current.minutes_left(terms.rate(s.InstanceType.STANDARD.value))
    return s.OrgUsage(
        org=org.name,
        month_start=current.month_start,
        used_minutes=round(current.used_minutes, 2),
        metered=True,
        committed_minutes=current.committed_minutes,
        committed_left_minutes=round(current.committed_left_minutes, 2),
        trial_left_cents=round(current.trial_left_cents, 2),
        on_demand_enabled=current.on_demand_enabled,
        on_demand_spent_cents=round(current.on_demand_spent_cents, 2),
        on_demand_left_cents=current.on_demand_left_cents,
        standard_minutes_left=None if left is None else round(left, 2),
    )


def update_billing(db: Db, org: Organization, update: s.OrgBillingUpdate) -> None:
    row = _row(db, org)
    if row is None:
        row = OrgBillingRow(org_id=org.id, on_demand_enabled=False, rates_cents_per_minute={})
        db.add(row)
    sent = update.model_fields_set
    if "committed_minutes_per_month" in sent:
        row.committed_minutes_per_month = update.committed_minutes_per_month
    if "on_demand_enabled" in sent and update.on_demand_enabled is not None:
        row.on_demand_enabled = update.on_demand_enabled
    if "on_demand_limit_cents" in sent:
        row.on_demand_limit_cents = update.on_demand_limit_cents
    if update.rates_cents_per_minute is not None:
        for instance_type, rate in update.rates_cents_per_minute.items():
            if not math.isfinite(rate) or rate < 0:  # JSON's 1e999 reads as infinity
                raise_invalid_rate(instance_type)
        row.rates_cents_per_minute = {
            **row.rates_cents_per_minute,
            **{k.value: float(v) for k, v in update.rates_cents_per_minute.items()},
        }
    db.flush()


def raise_invalid_rate(instance_type: s.InstanceType) -> None:
    raise InvalidInput(
        f"The rate for {instance_type.value} is negative or not a finite number.",
        "Give rates in cents per minute, 0 or more.",
    )


def grant_trial_credit(db: Db, org: Organization, amount_cents: int, now: datetime) -> None:
    db.add(TrialCreditRow(org_id=org.id, amount_cents=amount_cents, granted_at=now))
    db.flush()


def exhausted_error(org: Organization, owners: list[str], current: Standing) -> PermissionDenied:
    """Why a new session is refused, naming the organisation and what its owners can do."""
    what = []
    if current.committed_minutes:
        what.append(f"its {current.committed_minutes} committed minutes this month are used")
    elif current.committed_minutes == 0:
        what.append("it has no committed minutes")
    if current.on_demand_enabled:
        what.append("its on-demand spend reached the monthly limit")
    else:
        what.append("on-demand usage is off")
    return PermissionDenied(
        f"Organisation {org.name} has no Offload allowance left: " + " and ".join(what) + ".",
        f"Ask an owner of {org.name} ({', '.join(owners) or 'none'}) to enable on-demand usage "
        "or raise its monthly limit in the organisation's billing settings, or start with "
        "another organisation: `docker offload start --account ORG`.",
    )
