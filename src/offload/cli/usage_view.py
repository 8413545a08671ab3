"""Rich tables of `offload usage` and `offload org billing` (the JSON forms are the models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import RenderableType
from rich.table import Table

from offload.cli.durations import format_duration
from offload.core import schemas as s


def _when(value: datetime | None) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M") if value else "-"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        table.add_column(column)
    return table


def _sessions(title: str, rows: list[s.SessionSummary]) -> Table:
    table = _table(
        title, "Session", "Org", "Type", "State", "Started", "Billed", "Builds", "Containers",
        "Ended",
    )  # fmt: skip
    for row in rows:
        table.add_row(
            row.id,
            row.org,
            row.gpu_model or row.instance_type.value,
            row.state.value,
            _when(row.started_at or row.created_at),
            format_duration(row.billed_s),
            format_duration(row.build_s) if row.build_s else "-",
            str(row.containers),
            row.end_reason or "",
        )
    return table


def _minutes(value: float | None) -> str:
    return "unlimited" if value is None else f"{value:,.0f} min"


def _org_month(orgs: list[s.OrgUsage]) -> Table:
    table = _table("This month by organisation", "Org", "Used", "Allowance left", "Metered")
    for org in orgs:
        table.add_row(
            org.org,
            f"{org.used_minutes:,.0f} min",
            _minutes(org.standard_minutes_left),
            "yes" if org.metered else "no",
        )
    return table


def render(report: s.UsageReport) -> list[RenderableType]:
    summary = Table(show_header=False, box=None, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("User", report.user)
    summary.add_row("Total time", format_duration(report.total_billed_s))
    summary.add_row("Today (UTC)", format_duration(report.today_billed_s))
    summary.add_row(
        "Fair use left today",
        f"{format_duration(report.fair_use_remaining_s)} of "
        f"{format_duration(report.fair_use_limit_s)}",
    )
    images = _table("Top images", "Image", "Sessions")
    for image in report.top_images:
        images.add_row(image.image, str(image.sessions))
    activity = _table("Recent activity", "Session", "Start", "Duration", "Containers")
    for entry in report.recent_activity:
        activity.add_row(
            entry.session_id,
            _when(entry.start),
            format_duration(entry.duration_s),
            str(entry.containers),
        )
    return [
        summary,
        _sessions("Active sessions", report.active_sessions),
        _sessions("Recent sessions", report.recent_sessions),
        images,
        activity,
        _org_month(report.orgs),
    ]


def billing_rows(billing: s.OrgBilling, month: s.OrgUsage) -> list[tuple[str, Any]]:
    rates = ", ".join(
        f"{kind.value} {rate:g}¢/min" for kind, rate in billing.rates_cents_per_minute.items()
    )
    committed = billing.committed_minutes_per_month
    limit = billing.on_demand_limit_cents
    credits = sum(credit.remaining_cents or 0 for credit in billing.trial_credits)
    return [
        ("Organisation", billing.org),
        ("Committed", f"{committed:,} min/month" if committed is not None else "unmetered"),
        ("On-demand", "on" if billing.on_demand_enabled else "off"),
        ("On-demand limit", f"{limit / 100:,.2f} per month" if limit is not None else "none"),
        ("Rates", rates or "-"),
        ("Trial credit left", f"{credits / 100:,.2f}" if billing.trial_credits else "-"),
        ("Used this month", f"{month.used_minutes:,.0f} min"),
        ("Allowance left", _minutes(month.standard_minutes_left) if month.metered else "unmetered"),
    ]
