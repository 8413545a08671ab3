"""Which environment an engine is: its `offload.environment` label (`docker info`)."""

from __future__ import annotations

import json
from typing import Any

from offload.runner.environment import ENV_LABEL

LABELS_FORMAT = "{{json .Labels}}"


def environment_id(labels: str | list[Any] | None) -> str:
    """The environment id in an engine's labels (the JSON `docker info -f` prints, or the list
    from `GET /info`)."""
    listed = json.loads(labels) if isinstance(labels, str) else (labels or [])
    for label in listed:
        key, _, value = str(label).partition("=")
        if key == ENV_LABEL:
            return value
    raise AssertionError(f"the engine has no {ENV_LABEL} label: {listed}")
