"""Odd requests the fuzzer (tests/fuzz) found answered 5xx or off the document: each now gets a
documented 4xx with ErrorBody and a fix.  One test per finding, on both databases."""

from __future__ import annotations

import httpx
import pytest

from offload.core import schemas as s
from offload.core.schemas import API_PREFIX

from .support import new_host_key_line, public_line


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _error(response: httpx.Response, status: int = 422) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] and body["message"] and body["fix"], body
    return body


async def test_a_405_names_every_method_of_the_path(http, make_user):
    user = make_user()
    response = await http.request("OPTIONS", f"{API_PREFIX}/me/settings", headers=_auth(user.token))
    _error(response, 405)
    assert response.headers["Allow"] == "GET, PUT"  # Starlette's named only the first route's


async def test_a_body_that_is_not_utf8_json_is_invalid_input(http, make_user):
    user = make_user()
    response = await http.post(
        f"{API_PREFIX}/sessions/x/activity",
        content=b'{"api_calls": "\xc3\x28"}',  # not UTF-8: FastAPI's answer was a 400
        headers=_auth(user.token) | {"content-type": "application/json"},
    )
    assert "UTF-8" in _error(response)["message"]


@pytest.mark.parametrize(
    "field, value",
    [("capacity", 2**70), ("gpus", -1), ("capacity", True)],
)
async def test_runner_counts_beyond_a_database_integer_are_refused(http, field, value, make_runner):
    runner = await make_runner()
    registration = {
        "name": "edge-runner",
        "ssh_host": "127.0.0.1",
        "ssh_port": 8422,
        "host_key": new_host_key_line(),
        "capacity": 4,
        field: value,
    }
    response = await http.post(
        f"{API_PREFIX}/runners/register", json=registration, headers=_auth(runner.token)
    )
    assert field in _error(response)["message"]  # 2**70 was a 500 (OverflowError)


@pytest.mark.parametrize(
    "report",
    [
        {"capacity": 2**63, "warm": 0},
        {
            "capacity": 4,
            "warm": 0,
            "environments": [{"env_id": "e", "state": "warm", "containers_total": 2**63}],
        },
    ],
)
async def test_heartbeat_counts_beyond_a_database_integer_are_refused(http, make_runner, report):
    runner = await make_runner()
    response = await http.post(
        f"{API_PREFIX}/runners/{runner.id}/heartbeat", json=report, headers=_auth(runner.token)
    )
    _error(response)


@pytest.mark.parametrize(
    "path, body",
    [
        ("billing", {"committed_minutes_per_month": 2**70}),
        ("billing/trial-credits", {"amount_cents": 2**70}),
    ],
)
async def test_billing_amounts_beyond_a_database_integer_are_refused(http, make_user, path, body):
    owner = make_user(role=s.Role.OWNER)
    method = "POST" if path.endswith("credits") else "PUT"
    response = await http.request(
        method, f"{API_PREFIX}/orgs/{owner.org}/{path}", json=body, headers=_auth(owner.token)
    )
    _error(response)


@pytest.mark.parametrize("rate", ["1e999", "NaN"])
async def test_a_rate_must_be_a_finite_number(http, make_user, rate):
    owner = make_user(role=s.Role.OWNER)
    response = await http.put(
        f"{API_PREFIX}/orgs/{owner.org}/billing",
        content=f'{{"rates_cents_per_minute": {{"gpu": {rate}}}}}',
        headers=_auth(owner.token) | {"content-type": "application/json"},
    )
    _error(response)  # 1e999 was kept as infinity, then answered as `null` (not a number)
    billing = await owner.client.org_billing(owner.org)
    assert billing.rates_cents_per_minute[s.InstanceType.GPU] == 10.0  # the default, unchanged


@pytest.mark.parametrize("body", [{"offload_enabled": 0}, {"idle_timeout_s": True}])
async def test_json_booleans_and_integers_are_not_coerced(http, make_user, body):
    user = make_user()
    response = await http.put(f"{API_PREFIX}/me/settings", json=body, headers=_auth(user.token))
    _error(response)


async def test_an_integral_float_is_still_an_integer(http, make_user):
    user = make_user()
    response = await http.put(
        f"{API_PREFIX}/me/settings", json={"idle_timeout_s": 600.0}, headers=_auth(user.token)
    )
    assert response.status_code == 200, response.text
    assert response.json()["idle_timeout_s"] == 600


async def test_an_audit_cursor_beyond_a_database_integer_is_refused(http, make_user):
    owner = make_user(role=s.Role.OWNER)
    response = await http.get(
        f"{API_PREFIX}/orgs/{owner.org}/audit",
        params={"before": 2**31},
        headers=_auth(owner.token),
    )
    _error(response)  # PostgreSQL: integer out of range, a 500


async def test_a_nul_character_is_invalid_input_on_postgresql(
    http, make_user, make_runner, client_key, database
):
    """PostgreSQL stores no NUL in a text (these were 500s there); SQLite takes it."""
    await make_runner()
    user = make_user()
    session = {"client_public_key": public_line(client_key), "client_name": "a\x00b"}
    sqlite_answers = {"sessions/a%00b": 404, "orgs/a%00b/settings": 403, "sessions": 200}
    for path, sqlite_status in sqlite_answers.items():
        method, body = ("POST", session) if path == "sessions" else ("GET", None)
        response = await http.request(
            method, f"{API_PREFIX}/{path}", json=body, headers=_auth(user.token)
        )
        if database == "postgresql":
            assert "NUL character" in _error(response)["message"]
        else:
            assert response.status_code == sqlite_status, response.text
