"""The activity lane (services/activity_lane.py, api/activity_lane.py) answers the common report
exactly as the full path does, and leaves everything else to the full path untouched.

"As the full path does" is checked against the full path itself: the same report sent to the
service the route calls (`sessions.report_activity`), at the same instant of the clock, must give
the same answer field for field.  The lane's own counters (/metrics) say which of the two
answered each request, so a test cannot pass by the lane silently giving everything back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from offload.core import schemas as s
from offload.core.waiting import wait_until
from offload.server.api.activity_lane import MAX_BODY
from offload.server.context import ServerContext
from offload.server.db.models import ApiToken, OffloadSession
from offload.server.services import activity_lane, sessions
from offload.server.services.activity_lane import LaneAnswer, LaneReport
from offload.server.services.lifecycle import Rules
from offload.server.services.tokens import AuthUser
from tests.web.support import LiveServer

from .support import keep_busy, session_request

S = s.SessionState


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _path(session_id: str) -> str:
    return f"/api/v1/sessions/{session_id}/activity"


def _counts(ctx: ServerContext) -> tuple[int, int]:
    return ctx.lane_counts.answered, ctx.lane_counts.left


async def _through_lane(
    http: httpx.AsyncClient, ctx: ServerContext, user: Any, session_id: str, body: Any
) -> dict[str, Any]:
    """The report over HTTP, answered by the lane (asserted)."""
    answered, left = _counts(ctx)
    response = await http.post(_path(session_id), json=body, headers=_bearer(user.token))
    assert response.status_code == 200, response.text
    assert _counts(ctx) == (answered + 1, left), "the lane left a report it should answer"
    answer: dict[str, Any] = response.json()
    return answer


async def _full_path(ctx: ServerContext, user: Any, session_id: str, body: Any) -> dict[str, Any]:
    """The same report through the service the route calls, at the same instant."""
    report = s.ActivityReport.model_validate(body)
    info = await sessions.report_activity(ctx, AuthUser(user.id, user.username), session_id, report)
    answer: dict[str, Any] = info.model_dump(mode="json")
    return answer


async def _same_answers(http, ctx, user, session_id: str, body: Any) -> s.SessionInfo:
    lane = await _through_lane(http, ctx, user, session_id, body)
    assert lane == await _full_path(ctx, user, session_id, body)
    return s.SessionInfo.model_validate(lane)


# ---- what the lane answers ----------------------------------------------------------------------


async def test_an_active_session_is_stamped_and_answered_as_the_full_path_does(
    start_active, ctx, http, clock
):
    user, _, info = await start_active()
    clock.advance(42)
    answer = await _same_answers(http, ctx, user, info.id, {"api_calls": 3, "open_streams": 1})
    assert answer.state is S.ACTIVE and answer.last_activity_at == clock()
    assert answer.time_until_idle_s == info.idle_timeout_s
    assert answer.billed_s == 42 and answer.runner == info.runner
    stored = await user.client.get_session(info.id)  # written, not only answered
    assert stored.last_activity_at == clock()


async def test_a_report_of_nothing_leaves_the_quiet_clock_where_it_was(
    start_active, ctx, http, clock
):
    user, _, info = await start_active()
    clock.advance(30)
    for body in ({}, {"API_CALLS": 5, "Api_Calls": 5}):  # unknown keys are ignored, as there
        answer = await _same_answers(http, ctx, user, info.id, body)
        assert answer.last_activity_at == info.last_activity_at
        assert answer.time_until_idle_s == info.idle_timeout_s - 30


async def test_a_starting_session_is_answered_as_the_full_path_does(
    make_user, make_runner, ctx, http, client_key
):
    user, _ = make_user(), await make_runner()
    created = await user.client.create_session(session_request(client_key))
    answer = await _same_answers(http, ctx, user, created.id, {"building": True})
    assert answer.state is S.STARTING and answer.billed_s == 0


async def test_an_open_long_session_prompt_is_shown_and_stays_open(
    start_active, ctx, http, clock, tick
):
    user, _, info = await start_active(idle_timeout_s=3600)
    asked = await keep_busy(user, info.id, clock, tick, 3 * 3600, answer_prompts=False)
    assert asked.prompt is not None and asked.prompt.reason is s.PromptReason.LONG_SESSION
    clock.advance(5)
    answer = await _same_answers(http, ctx, user, info.id, {"api_calls": 1})
    assert answer.prompt == asked.prompt  # activity does not answer it


@pytest.mark.parametrize("policy", list(s.FairUsePolicy))
async def test_fair_use_figures_and_warnings_are_those_of_the_full_path(
    make_user, start_active, ctx, http, clock, tick, policy
):
    owner = make_user(role=s.Role.OWNER)
    await owner.client.update_org_settings(owner.org, s.OrgSettingsUpdate(fair_use_policy=policy))
    user = make_user(org=owner.org)
    _, _, info = await start_active(user=user, idle_timeout_s=3600)
    await keep_busy(user, info.id, clock, tick, 7 * 3600 + 55 * 60, step=1500)
    answer = await _same_answers(http, ctx, user, info.id, {"api_calls": 1})
    assert answer.fair_use_policy is policy and answer.fair_use_remaining_s == 5 * 60
    assert bool(answer.warnings) is (policy is s.FairUsePolicy.STOP)


# ---- what the lane leaves to the full path ------------------------------------------------------


async def _left(http, ctx, session_id: str, **request: Any) -> httpx.Response:
    """A request the lane must leave (asserted); the full path's response."""
    answered, left = _counts(ctx)
    response = await http.post(_path(session_id), **request)
    assert _counts(ctx) == (answered, left + 1), "the lane answered what it must leave"
    return response


async def test_an_idle_session_resumes_on_the_full_path(start_active, ctx, http, clock, tick):
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(61)
    await tick()
    assert (await user.client.get_session(info.id)).state is S.IDLE
    response = await _left(http, ctx, info.id, json={"api_calls": 1}, headers=_bearer(user.token))
    assert response.status_code == 200 and response.json()["state"] == "active"


async def test_a_due_idle_moment_is_applied_on_the_full_path(start_active, ctx, http, clock):
    user, _, info = await start_active(idle_timeout_s=60)
    clock.advance(90)  # no tick ran: the report finds the idle moment passed
    response = await _left(http, ctx, info.id, json={}, headers=_bearer(user.token))
    assert response.json()["state"] == "idle"
    idle_since = s.SessionInfo.model_validate(response.json()).idle_since
    assert idle_since == info.started_at + timedelta(seconds=60)


async def test_a_quiet_prompt_is_cleared_on_the_full_path(start_active, ctx, http, clock, tick):
    user, _, info = await start_active()
    clock.advance(180)
    await tick()
    assert (await user.client.get_session(info.id)).prompt is not None
    response = await _left(http, ctx, info.id, json={"api_calls": 1}, headers=_bearer(user.token))
    assert response.status_code == 200 and response.json()["prompt"] is None


async def test_an_ended_session_is_answered_as_it_is_on_the_full_path(start_active, ctx, http):
    user, _, info = await start_active()
    await user.client.stop_session(info.id)
    response = await _left(http, ctx, info.id, json={"api_calls": 1}, headers=_bearer(user.token))
    assert response.status_code == 200 and response.json()["state"] == "terminated"


async def test_a_gpu_session_and_a_metered_organisation_take_the_full_path(
    make_user, make_runner, start_active, ctx, http
):
    runner = await make_runner(gpus=1, instance_types=[s.InstanceType.GPU])
    user, _, info = await start_active(runner=runner, gpu=True)
    response = await _left(http, ctx, info.id, json={"api_calls": 1}, headers=_bearer(user.token))
    assert response.json()["gpu_devices"][0]["uuid"] == info.gpu_devices[0].uuid

    owner = make_user(role=s.Role.OWNER)
    terms = s.OrgBillingUpdate(committed_minutes_per_month=600, on_demand_enabled=False)
    await owner.client.update_org_billing(owner.org, terms)
    member, _, metered = await start_active(user=make_user(org=owner.org))
    response = await _left(
        http, ctx, metered.id, json={"api_calls": 1}, headers=_bearer(member.token)
    )
    assert response.status_code == 200 and response.json()["state"] == "active"


async def test_refusals_are_the_full_paths_in_its_order(make_user, start_active, ctx, http, clock):
    user, runner, info = await start_active()
    other = make_user()
    good = {"api_calls": 1}
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("unknown token", {"json": good, "headers": _bearer("off_u_nope")}, 401, "not valid"),
        ("runner token", {"json": good, "headers": _bearer(runner.token)}, 401, "runner token"),
        ("another's session", {"json": good, "headers": _bearer(other.token)}, 404, "no session"),
        (
            "bad body, bad token",
            {"json": {"api_calls": -1}, "headers": _bearer("off_u_x")},
            401,
            "",
        ),
        ("bad body", {"json": {"api_calls": -1}, "headers": _bearer(user.token)}, 422, "api_calls"),
        ("not JSON", {"content": b"{", "headers": _json(user.token)}, 422, "Invalid request"),
        ("no body", {"headers": _json(user.token)}, 422, "Field required"),
    ]
    for name, request, status, words in cases:
        response = await _left(http, ctx, info.id, **request)
        assert response.status_code == status, (name, response.text)
        assert words in response.text, name
    unknown = await _left(http, ctx, "ses_000000000000", json=good, headers=_bearer(user.token))
    assert unknown.status_code == 404

    with ctx.db.transaction() as db:
        db.query(ApiToken).filter_by(user_id=user.id).one().revoked_at = clock()
    revoked = await _left(http, ctx, info.id, json=good, headers=_bearer(user.token))
    assert revoked.status_code == 401 and "revoked" in revoked.json()["message"]


def _json(token: str) -> dict[str, str]:
    return {**_bearer(token), "Content-Type": "application/json"}


async def test_requests_the_lane_does_not_take_reach_the_route_as_sent(start_active, ctx, http):
    """Not counted at all: no bearer token, another content type; counted and left: a body
    over MAX_BODY (the route still accepts it: JSON may carry any whitespace)."""
    user, _, info = await start_active()
    before = _counts(ctx)
    missing = await http.post(_path(info.id), json={"api_calls": 1})
    assert missing.status_code == 401 and "No API token" in missing.json()["message"]
    basic = await http.post(
        _path(info.id), json={"api_calls": 1}, headers={"Authorization": "Basic dTpw"}
    )
    assert basic.status_code == 401
    text = await http.post(
        _path(info.id),
        content=b'{"api_calls": 1}',
        headers={**_bearer(user.token), "Content-Type": "text/plain"},
    )
    assert text.status_code == 422  # FastAPI reads JSON only from a JSON content type
    assert _counts(ctx) == before

    padded = b'{"api_calls": 1' + b" " * MAX_BODY + b"}"
    response = await _left(http, ctx, info.id, content=padded, headers=_json(user.token))
    assert response.status_code == 200 and response.json()["state"] == "active"


async def test_a_body_sent_in_pieces_is_read_whole(start_active, ctx, http, clock):
    user, _, info = await start_active()
    clock.advance(7)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b'{"api_', b'calls"', b": 2}"):
            yield piece

    answered, left = _counts(ctx)
    response = await http.post(_path(info.id), content=pieces(), headers=_json(user.token))
    assert response.status_code == 200 and _counts(ctx) == (answered + 1, left)
    assert s.SessionInfo.model_validate(response.json()).last_activity_at == clock()


async def test_the_scheme_is_read_as_fastapi_reads_it(start_active, ctx, http, clock):
    user, _, info = await start_active()
    for header in (f"bearer {user.token}", f"BEARER  {user.token} "):
        answered, left = _counts(ctx)
        response = await http.post(
            _path(info.id), json={"api_calls": 1}, headers={"Authorization": header}
        )
        assert response.status_code == 200 and _counts(ctx) == (answered + 1, left), header


# ---- reports that arrive together (one batch, db/batches.py) ---------------------------------


def _batch(ctx: ServerContext, *reports: tuple[str, str, Any]) -> list[LaneAnswer | None]:
    """`reports` (token, session id, body) as one batch: one transaction, committed."""
    batch = [
        LaneReport(token, sid, s.ActivityReport.model_validate(body))
        for token, sid, body in reports
    ]
    rules = Rules.from_settings(ctx.settings)
    with ctx.db.row_locked_connection() as conn:
        return activity_lane.reports_tx(conn, batch, ctx.now(), rules)


async def test_reports_in_one_batch_are_answered_as_each_alone(make_user, start_active, ctx, clock):
    owner = make_user(role=s.Role.OWNER)
    alice, bob, carol = (make_user(org=owner.org) for _ in range(3))
    _, _, a = await start_active(user=alice)
    _, _, b = await start_active(user=bob)
    _, _, c = await start_active(user=carol)
    clock.advance(25)
    answers = _batch(
        ctx,
        (alice.token, a.id, {"api_calls": 3}),
        (bob.token, b.id, {}),  # nothing happened: answered, not stamped
        (carol.token, c.id, {"building": True}),
        (alice.token, a.id, {"api_calls": 1}),  # a second report for a session: full path
        (bob.token, c.id, {"api_calls": 1}),  # another user's session: full path
        ("off_u_" + "0" * 40, a.id, {"api_calls": 1}),  # no such token: full path
        (alice.token, "ses_000000000000", {"api_calls": 1}),  # no such session: full path
    )
    assert answers[3:] == [None] * 4
    for (user, info, body), answer in zip(
        ((alice, a, {"api_calls": 3}), (bob, b, {}), (carol, c, {"building": True})),
        answers,
        strict=False,
    ):
        assert answer is not None and answer.touch_token_id is None
        lane = answer.info.model_dump(mode="json")
        assert lane == await _full_path(ctx, user, info.id, body), user.username
        assert answer.info.billed_s == 25
    stored = {
        info.id: await user.client.get_session(info.id)
        for user, info in ((alice, a), (bob, b), (carol, c))
    }
    assert stored[a.id].last_activity_at == clock() and stored[c.id].last_activity_at == clock()
    assert stored[b.id].last_activity_at == b.last_activity_at


async def test_a_batch_leaves_a_session_due_a_transition_and_answers_the_rest(
    start_active, ctx, clock
):
    quick_user, _, quick = await start_active(idle_timeout_s=60)
    slow_user, _, slow = await start_active(idle_timeout_s=3600)
    clock.advance(61)  # the quick one is due to go idle; the tick has not run
    answers = _batch(
        ctx,
        (quick_user.token, quick.id, {"api_calls": 1}),
        (slow_user.token, slow.id, {"api_calls": 1}),
    )
    assert answers[0] is None
    assert answers[1] is not None
    assert answers[1].info.model_dump(mode="json") == await _full_path(
        ctx, slow_user, slow.id, {"api_calls": 1}
    )
    assert (
        await quick_user.client.get_session(quick.id)
    ).last_activity_at == quick.last_activity_at


async def test_a_session_row_another_transaction_holds_is_left_not_waited_for(
    database, start_active, ctx, clock
):
    if database == "sqlite":
        pytest.skip("SQLite has no row locks: its writers take turns, whole transactions")
    held_user, _, held = await start_active()
    free_user, _, free = await start_active()
    clock.advance(10)
    with ctx.db.engine.connect() as other:  # as a heartbeat holds its sessions' rows
        other.execute(
            select(OffloadSession.id).where(OffloadSession.id == held.id).with_for_update()
        )
        answers = _batch(
            ctx,
            (held_user.token, held.id, {"api_calls": 1}),
            (free_user.token, free.id, {"api_calls": 1}),
        )
        other.rollback()
    assert answers[0] is None and answers[1] is not None
    assert answers[1].info.last_activity_at == clock()


async def test_reports_sent_at_once_are_each_answered_by_the_lane_as_the_full_path_does(
    start_active, ctx, http, clock
):
    started = [await start_active() for _ in range(6)]
    clock.advance(20)
    answered, left = _counts(ctx)
    batches = ctx.lane_counts.batches
    responses = await asyncio.gather(
        *(
            http.post(_path(info.id), json={"api_calls": 1}, headers=_bearer(user.token))
            for user, _, info in started
        )
    )
    assert _counts(ctx) == (answered + 6, left)
    assert batches < ctx.lane_counts.batches <= batches + 6
    for (user, _, info), response in zip(started, responses, strict=True):
        assert response.status_code == 200, response.text
        assert response.json() == await _full_path(ctx, user, info.id, {"api_calls": 1})


async def test_metrics_count_both_outcomes(start_active, ctx, http):
    user, _, info = await start_active()
    await http.post(_path(info.id), json={"api_calls": 1}, headers=_bearer(user.token))
    await http.post(_path(info.id), json={"api_calls": -1}, headers=_bearer(user.token))
    text = (await http.get("/metrics")).text
    answered, left = _counts(ctx)
    assert (answered, left) == (1, 1)
    assert 'offload_activity_lane_reports_total{outcome="answered"} 1.0' in text
    assert 'offload_activity_lane_reports_total{outcome="full_path"} 1.0' in text
    assert "offload_activity_lane_batches_total 1.0" in text  # the bad body never reached one


# ---- real HTTP framing (uvicorn on a socket) ----------------------------------------------------


async def _exchange(port: int, raw: bytes, responses: int) -> list[tuple[int, bytes]]:
    """Send `raw` as it is and read `responses` answers (status, body) off the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        answers = []
        for _ in range(responses):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            answers.append((status, await reader.readexactly(length)))
        return answers
    finally:
        writer.close()


def _head(session_id: str, token: str, framing: str) -> bytes:
    return (
        f"POST {_path(session_id)} HTTP/1.1\r\nHost: offload.test\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n{framing}\r\n"
    ).encode()


async def test_real_http_framing_chunked_pipelined_and_cut_short(app, start_active, ctx, clock):
    user, _, info = await start_active()
    server = LiveServer(app).start()
    try:
        clock.advance(3)
        answered, left = _counts(ctx)
        chunked = _head(info.id, user.token, "Transfer-Encoding: chunked\r\n")
        chunked += b'6\r\n{"api_\r\n9\r\ncalls": 4\r\n1\r\n}\r\n0\r\n\r\n'
        bad = b'{"api_calls": -4}'
        pipelined = _head(info.id, user.token, f"Content-Length: {len(bad)}\r\n") + bad
        (first, second) = await _exchange(server.port, chunked + pipelined, 2)
        assert first[0] == 200 and second[0] == 422, (first, second)
        stamped = s.SessionInfo.model_validate_json(first[1]).last_activity_at
        assert stamped == clock() and _counts(ctx) == (answered + 1, left + 1)

        clock.advance(3)  # a body cut short: the client goes away after 10 of 100 bytes
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_head(info.id, user.token, "Content-Length: 100\r\n") + b'{"api_call')
        await writer.drain()
        writer.close()
        await reader.read()  # the server closed its side too
        wait_until(lambda: _counts(ctx) == (answered + 1, left + 2), 10, "the cut body to end")
        after = await user.client.get_session(info.id)
        assert after.last_activity_at == stamped  # nothing was written for it
    finally:
        server.stop()
