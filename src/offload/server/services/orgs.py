"""Organisation requests: who may do what, then one call into settings or billing.

Members read settings, billing and usage; only owners change settings and billing (a member gets
PermissionDenied naming the owners to ask); non-members get PermissionDenied naming their own
organisations' command.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session as Db

from offload.core import schemas as s
from offload.server.services import billing, org_settings
from offload.server.services.tokens import AuthUser


def get_settings(db: Db, auth: AuthUser, org_name: str) -> s.OrgSettings:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return org_settings.settings_view(db, org)


def put_settings(
    db: Db, auth: AuthUser, org_name: str, update: s.OrgSettingsUpdate
) -> s.OrgSettings:
    org = org_settings.owned_org(db, auth.id, org_name, "its Offload settings")
    org_settings.update_settings(db, org, update)
    return org_settings.settings_view(db, org)


def get_billing(db: Db, auth: AuthUser, org_name: str, now: datetime) -> s.OrgBilling:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return billing.billing_view(db, org, now)


def put_billing(
    db: Db, auth: AuthUser, org_name: str, update: s.OrgBillingUpdate, now: datetime
) -> s.OrgBilling:
    org = org_settings.owned_org(db, auth.id, org_name, "its billing")
    billing.update_billing(db, org, update)
    return billing.billing_view(db, org, now)


def grant_trial_credit(
    db: Db, auth: AuthUser, org_name: str, grant: s.TrialCreditGrant, now: datetime
) -> s.OrgBilling:
    org = org_settings.owned_org(db, auth.id, org_name, "its billing")
    billing.grant_trial_credit(db, org, grant.amount_cents, now)
    return billing.billing_view(db, org, now)


def get_usage(db: Db, auth: AuthUser, org_name: str, now: datetime) -> s.OrgUsage:
    org, _ = org_settings.member_org(db, auth.id, org_name)
    return billing.usage_view(db, org, now)
