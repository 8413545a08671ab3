"""The hottest routes (activity reports, certificate renewals, runner heartbeats), whose answers
are serialised once (api/responses.py) and whose queries are prebuilt statements, refuse exactly
what every other route refuses, in the same order (a revoked token at once, 401 before 422), and
record the token's last use the same way."""

from __future__ import annotations

import httpx
import pytest

from offload.server.context import ServerContext
from offload.server.db.models import ApiToken, OffloadSession, RunnerToken
from offload.server.services.tokens import LAST_USED_RESOLUTION, hash_token


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _user_routes(session_id: str, public_key: str) -> list[tuple[str, dict[str, object]]]:
    return [
        (f"/api/v1/sessions/{session_id}/activity", {"api_calls": 1}),
        (f"/api/v1/sessions/{session_id}/certificate", {"client_public_key": public_key}),
    ]


async def _public_key(ctx: ServerContext, session_id: str) -> str:
    with ctx.db.transaction(read_only=True) as db:
        row = db.get(OffloadSession, session_id)
        assert row is not None
        return row.client_public_key


async def test_a_token_revoked_between_two_requests_is_refused_at_once(
    start_active, ctx: ServerContext, http: httpx.AsyncClient, clock
):
    user, runner, session = await start_active()
    key = await _public_key(ctx, session.id)
    routes = _user_routes(session.id, key)
    for path, body in routes:
        assert (await http.post(path, json=body, headers=_bearer(user.token))).status_code == 200
    heartbeat = f"/api/v1/runners/{runner.id}/heartbeat"
    beat = {"capacity": 4, "warm": 1}
    assert (await http.post(heartbeat, json=beat, headers=_bearer(runner.token))).is_success

    with ctx.db.transaction() as db:
        db.query(ApiToken).filter_by(user_id=user.id).one().revoked_at = clock()
        db.query(RunnerToken).filter_by(
            token_hash=hash_token(runner.token)
        ).one().revoked_at = clock()

    for path, body in routes:
        refused = await http.post(path, json=body, headers=_bearer(user.token))
        assert refused.status_code == 401, path
        assert "revoked" in refused.json()["message"]
    refused = await http.post(heartbeat, json=beat, headers=_bearer(runner.token))
    assert refused.status_code == 401
    assert "revoked" in refused.json()["message"]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "No API token was sent"),
        ("off_u_not-a-real-token", "not valid or was revoked"),
        ("off_r_runner-token", "runner token was sent"),
    ],
)
async def test_a_bad_token_is_answered_401_before_a_bad_body(
    start_active, ctx: ServerContext, http: httpx.AsyncClient, token, expected
):
    _user, _runner, session = await start_active()
    headers = _bearer(token) if token else {}
    for path, _body in _user_routes(session.id, "unused"):
        response = await http.post(
            path, json={"api_calls": "many", "client_public_key": 7}, headers=headers
        )
        assert response.status_code == 401, path
        assert expected in response.json()["message"]


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, "No runner token was sent"),
        ("off_r_not-a-real-token", "not valid or was revoked"),
        ("off_u_user-token", "need a runner token"),
    ],
)
async def test_a_bad_runner_token_is_answered_401_before_a_bad_body(
    make_runner, http: httpx.AsyncClient, token, expected
):
    runner = await make_runner()
    headers = _bearer(token) if token else {}
    path = f"/api/v1/runners/{runner.id}/heartbeat"
    for params in ({}, {"wait": "soon"}):  # a bad body, then a bad query parameter
        response = await http.post(path, json={"capacity": -1}, params=params, headers=headers)
        assert response.status_code == 401
        assert expected in response.json()["message"]


async def test_a_good_token_with_a_bad_body_is_answered_422(
    start_active, make_runner, http: httpx.AsyncClient
):
    user, runner, session = await start_active()
    for path, _body in _user_routes(session.id, "unused"):
        response = await http.post(path, json={"api_calls": "many"}, headers=_bearer(user.token))
        assert response.status_code == 422, path
    response = await http.post(
        f"/api/v1/runners/{runner.id}/heartbeat",
        json={"capacity": -1},
        headers=_bearer(runner.token),
    )
    assert response.status_code == 422


def _last_used(ctx: ServerContext, user_id: str):  # type: ignore[no-untyped-def]
    with ctx.db.transaction(read_only=True) as db:
        return db.query(ApiToken).filter_by(user_id=user_id).one().last_used_at


async def test_the_hot_routes_record_the_tokens_last_use(
    start_active, make_user, ctx: ServerContext, http: httpx.AsyncClient, clock
):
    user, _runner, session = await start_active()
    key = await _public_key(ctx, session.id)
    (activity, report), (certificate, renewal) = _user_routes(session.id, key)
    step = LAST_USED_RESOLUTION.total_seconds()

    clock.advance(step)  # an activity report: a write, the last use written with it
    assert (await http.post(activity, json=report, headers=_bearer(user.token))).is_success
    reported = clock()
    assert _last_used(ctx, user.id) == reported

    clock.advance(step / 2)  # within the resolution: not written again
    assert (await http.post(activity, json=report, headers=_bearer(user.token))).is_success
    assert _last_used(ctx, user.id) == reported

    clock.advance(step)  # a renewal only reads: its own write after it
    assert (await http.post(certificate, json=renewal, headers=_bearer(user.token))).is_success
    assert _last_used(ctx, user.id) == clock()

    other = make_user()  # a refused report took its write back: written on its own
    response = await http.post(activity, json=report, headers=_bearer(other.token))
    assert response.status_code == 404
    assert _last_used(ctx, other.id) == clock()
