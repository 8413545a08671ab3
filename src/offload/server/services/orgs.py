"""Organisation requests: who may do what, then one call into settings or billing.

Members read settings, billing and usage; only owners change settings and billing (a member gets
PermissionDenied naming the owners to ask); non-members get PermissionDenied naming their own
organisations' command.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel
from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.services import audit, billing, org_settings
from offload.server.services.tokens import AuthUser


def get_settings(db: Db, auth: AuthUser, org_name: str) -> s.OrgSettings:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return org_settings.settings_view(db, org)


def _sent(update: BaseModel) -> dict[str, s.AuditDetail]:
    """The fields an update set, as the audit log shows them (no setting is secret)."""
    shown: dict[str, s.AuditDetail] = {}
    for name, value in update.model_dump(mode="json", exclude_unset=True).items():
        shown[name] = value if isinstance(value, str | int | float | bool | None) else str(value)
    return shown


def put_settings(
    db: Db, auth: AuthUser, org_name: str, update: s.OrgSettingsUpdate, now: datetime
) -> s.OrgSettings:
    org = org_settings.owned_org(db, auth.id, org_name, "its Offload settings")
    org_settings.update_settings(db, org, update)
    audit.record(db, now, s.AuditAction.SETTINGS_CHANGED, auth, org=org, details=_sent(update))
    return org_settings.settings_view(db, org)


def get_billing(db: Db, auth: AuthUser, org_name: str, now: datetime) -> s.OrgBilling:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return billing.billing_view(db, org, now)


def put_billing(
    db: Db, auth: AuthUser, org_name: str, update: s.OrgBillingUpdate, now: datetime
) -> s.OrgBilling:
    org = org_settings.owned_org(db, auth.id, org_name, "its billing")
    billing.update_billing(db, org, update)
    audit.record(db, now, s.AuditAction.BILLING_CHANGED, auth, org=org, details=_sent(update))
    return billing.billing_view(db, org, now)


def grant_trial_credit(
    db: Db, auth: AuthUser, org_name: str, grant: s.TrialCreditGrant, now: datetime
) -> s.OrgBilling:
    org = org_settings.owned_org(db, auth.id, org_name, "its billing")
    billing.grant_trial_credit(db, org, grant.amount_cents, now)
    details: dict[str, s.AuditDetail] = {"amount_cents": grant.amount_cents}
    audit.record(db, now, s.AuditAction.TRIAL_CREDIT_GRANTED, auth, org=org, details=details)
    return billing.billing_view(db, org, now)


def get_usage(db: Db, auth: AuthUser, org_name: str, now: datetime) -> s.OrgUsage:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return billing.usage_view(db, org, now)
