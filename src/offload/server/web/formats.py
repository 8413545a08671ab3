"""How the dashboard writes durations, moments and money (Jinja filters)."""

from __future__ import annotations

from datetime import UTC, date, datetime


def duration(seconds: float | None) -> str:
    """'2 h 05 min', '7 min 30 s', '45 s'."""
    if seconds is None:
        return "—"
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def clock_duration(seconds: float | None) -> str:
    """'1:02:03' (what the live estimate ticks in; the JavaScript writes the same form)."""
    total = max(0, int(seconds or 0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def day(value: date) -> str:
    return value.strftime("%a %d %b")


def money(cents: float | None) -> str:
    if cents is None:
        return "no limit"
    return f"${cents / 100:,.2f}"


def seconds_choice(seconds: int | None) -> str:
    """A setting in seconds for a form field; empty when unset."""
    return "" if seconds is None else str(seconds)
