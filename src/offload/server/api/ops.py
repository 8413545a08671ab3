"""Operator routes outside the API prefix: liveness and Prometheus metrics (no auth)."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from offload.server.api.deps import Context
from offload.server.context import LaneCounts
from offload.server.services import stats

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, bool]:
    return {"ok": True}


class _SnapshotCollector(Collector):
    """Exposes one snapshot, read from the database for this scrape."""

    def __init__(self, snapshot: stats.Snapshot, lane: LaneCounts, parked_polls: int) -> None:
        self._snapshot = snapshot
        self._lane = lane
        self._parked_polls = parked_polls

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        sessions = GaugeMetricFamily(
            "offload_sessions", "Sessions by state (ended ones included)", labels=["state"]
        )
        for state, count in sorted(self._snapshot.sessions_by_state.items()):
            sessions.add_metric([state], count)
        yield sessions
        yield GaugeMetricFamily(
            "offload_runners_online",
            "Runners whose last heartbeat is within the runner timeout",
            value=self._snapshot.runners_online,
        )
        yield GaugeMetricFamily(
            "offload_runners_registered",
            "Runners ever registered",
            value=self._snapshot.runners_registered,
        )
        yield GaugeMetricFamily(
            "offload_warm_environments",
            "Warm environments reported by online runners",
            value=self._snapshot.warm_environments,
        )
        yield GaugeMetricFamily(
            "offload_runner_polls_parked",
            "Runner heartbeats parked on this replica, waiting for a change (long polls)",
            value=self._parked_polls,
        )
        lane = CounterMetricFamily(
            "offload_activity_lane_reports",
            "Activity reports this replica answered in the activity lane, and those it left "
            "to the full path",
            labels=["outcome"],
        )
        lane.add_metric(["answered"], self._lane.answered)
        lane.add_metric(["full_path"], self._lane.left)
        yield lane
        yield CounterMetricFamily(
            "offload_activity_lane_batches",
            "Transactions the activity lane ran, each for the reports that arrived together",
            value=self._lane.batches,
        )


@router.get("/metrics", response_class=Response)
async def metrics(ctx: Context) -> Response:
    snapshot = await ctx.db.read(stats.snapshot, ctx.now(), ctx.settings.runner_timeout_s)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, ctx.lane_counts, ctx.signals.parked))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
