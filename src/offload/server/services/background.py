"""What the control plane does on its own, once per tick: the lifecycle rules (idle, grace,
prompts, limits) and runners that went silent.  Every replica ticks; each step claims its rows
so that a change happens exactly once (see lifecycle.tick and runner_liveness)."""

from __future__ import annotations

from datetime import datetime

from offload.server.context import ServerContext
from offload.server.services import lifecycle, runner_liveness


async def tick(ctx: ServerContext, now: datetime | None = None) -> int:
    """One tick at `now` (the context's clock by default); returns how many sessions changed."""
    now = now or ctx.now()
    failed = await runner_liveness.tick(ctx, now)
    return failed + await lifecycle.tick(ctx, now)
