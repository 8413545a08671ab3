"""Durations as people type them: `90`, `10s`, `5m`, `1h`, `1h30m`."""

from __future__ import annotations

import re

from offload.core.errors import InvalidInput

_PART = re.compile(r"(\d+(?:\.\d+)?)([hms]?)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_duration(text: str, option: str) -> float:
    """Seconds in `text`; InvalidInput naming `option` and the accepted forms otherwise."""
    cleaned = text.strip().lower().replace(" ", "")
    position, total = 0, 0.0
    while position < len(cleaned):
        match = _PART.match(cleaned, position)
        if match is None:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
        if match.group(2) == "":
            break
    if not cleaned or position != len(cleaned):
        raise InvalidInput(
            f"{option}: '{text}' is not a duration.",
            "Use a number of seconds or units h/m/s, e.g. 90, 30s, 5m, 1h30m.",
        )
    return total


def parse_bounded_duration(text: str, option: str, low: float, high: float) -> float:
    seconds = parse_duration(text, option)
    if not low <= seconds <= high:
        raise InvalidInput(
            f"{option}: {text} is out of range.",
            f"Choose between {format_duration(low)} and {format_duration(high)}.",
        )
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{secs}s" if secs else "",
    ]
    return "".join(parts) or "0s"
