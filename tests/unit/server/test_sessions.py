"""Sessions: placement, certificates, ownership, renewal and stop."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncssh
import httpx
import pytest

from offload.core import schemas as s
from offload.core.errors import Conflict, InvalidInput, NoCapacity, NotFound, PermissionDenied
from offload.server.context import ServerContext

from .support import describe_certificate, public_line, session_request


async def test_create_returns_a_certificate_for_the_session(
    make_user, make_runner, client_key, ctx: ServerContext, clock, settings, tmp_path
):
    runner = await make_runner()
    user = make_user()

    info = await user.client.create_session(session_request(client_key))

    assert info.id.startswith("ses_") and len(info.id) == 16
    assert info.state is s.SessionState.STARTING
    assert info.user == user.username and info.org == user.org
    assert info.idle_timeout_s == settings.default_idle_timeout_s
    assert info.runner is not None and info.runner.id == runner.id
    assert info.runner.host_key.startswith("ssh-ed25519 ")
    assert info.certificate is not None
    cert: Any = asyncssh.import_certificate(info.certificate)
    assert cert.principals == [info.id]
    assert cert.key.public_data == client_key.public_data
    ca_key = asyncssh.import_public_key(ctx.ca.public_key_line())
    assert cert.signing_key.public_data == ca_key.public_data
    end = clock() + timedelta(seconds=settings.cert_validity_s)
    assert info.certificate_valid_before == end

    # What OpenSSH reads in it: user certificate, this principal only, 60 s of skew allowed.
    seen = await describe_certificate(info.certificate, tmp_path)
    assert "user certificate" in seen["Type"]
    assert seen["Principals"] == [info.id]
    assert info.id in seen["Key ID"]
    assert ca_key.get_fingerprint("sha256") in seen["Signing CA"]
    start = clock() - timedelta(seconds=60)
    assert seen["Valid"] == f"from {start:%Y-%m-%dT%H:%M:%S} to {end:%Y-%m-%dT%H:%M:%S}"
    assert seen["Extensions"] == ["permit-port-forwarding"]


async def test_no_runner_online_is_a_clear_503(make_user, client_key, http: httpx.AsyncClient):
    user = make_user()
    body = session_request(client_key).model_dump(mode="json")
    response = await http.post(
        "/api/v1/sessions", json=body, headers={"Authorization": f"Bearer {user.token}"}
    )
    assert response.status_code == 503
    error = response.json()
    assert error["code"] == "no_capacity"
    assert "No runner is online" in error["message"]
    assert "offload runner" in error["fix"]


async def test_a_full_runner_is_reported_as_full(make_user, make_runner, client_key):
    await make_runner(capacity=1)
    await make_user().client.create_session(session_request(client_key))
    with pytest.raises(NoCapacity, match="full"):
        await make_user().client.create_session(session_request(client_key))


async def test_gpu_sessions_need_a_gpu_runner(make_user, make_runner, client_key):
    await make_runner()
    with pytest.raises(NoCapacity, match="gpu"):
        await make_user().client.create_session(session_request(client_key, gpu=True))
    gpu_runner = await make_runner(gpus=1, instance_types=[s.InstanceType.GPU])
    info = await make_user().client.create_session(session_request(client_key, gpu=True))
    assert info.runner is not None and info.runner.id == gpu_runner.id
    assert info.instance_type is s.InstanceType.GPU


async def test_a_stale_runner_is_not_chosen(make_user, make_runner, client_key, clock, settings):
    stale = await make_runner(name="a-stale")
    clock.advance(settings.runner_timeout_s + 1)
    fresh = await make_runner(name="b-fresh")  # registering counts as a heartbeat

    info = await make_user().client.create_session(session_request(client_key))
    assert info.runner is not None and info.runner.id == fresh.id

    clock.advance(settings.runner_timeout_s + 1)
    with pytest.raises(NoCapacity, match="No runner is online"):
        await make_user().client.create_session(session_request(client_key))
    await stale.heartbeat()
    info = await make_user().client.create_session(session_request(client_key))
    assert info.runner is not None and info.runner.id == stale.id


async def test_placement_prefers_the_runner_with_fewest_live_sessions(
    make_user, make_runner, client_key
):
    first = await make_runner(name="r-1")
    second = await make_runner(name="r-2")
    placed = [
        (await make_user().client.create_session(session_request(client_key))).runner
        for _ in range(4)
    ]
    ids = [runner.id for runner in placed if runner]
    assert sorted(ids) == sorted([first.id, second.id, first.id, second.id])


async def test_a_second_start_returns_the_live_session_signed_for_the_new_key(
    make_user, make_runner, client_key
):
    await make_runner()
    user = make_user()
    first = await user.client.create_session(session_request(client_key))
    other_key = asyncssh.generate_private_key("ssh-ed25519")

    again = await user.client.create_session(session_request(other_key))

    assert again.id == first.id
    assert again.certificate is not None
    assert asyncssh.import_certificate(again.certificate).key.public_data == other_key.public_data


async def test_an_org_the_user_is_not_in_is_refused_naming_theirs(
    make_user, make_runner, make_org, client_key
):
    await make_runner()
    user = make_user(org="mine")
    make_org("theirs")
    with pytest.raises(PermissionDenied) as refused:
        await user.client.create_session(session_request(client_key, org="theirs"))
    assert "theirs" in refused.value.message
    assert "mine" in refused.value.fix


async def test_explicit_org_and_idle_timeout_are_kept(make_user, make_runner, client_key):
    await make_runner()
    user = make_user(org="team-x")
    info = await user.client.create_session(
        session_request(client_key, org="team-x", idle_timeout_s=45)
    )
    assert (info.org, info.idle_timeout_s) == ("team-x", 45)


async def test_a_malformed_public_key_is_rejected_with_the_fix(make_user, make_runner):
    await make_runner()
    user = make_user()
    with pytest.raises(InvalidInput) as rejected:
        await user.client.create_session(s.SessionCreate(client_public_key="ssh-ed25519 garbage"))
    assert "ssh-keygen -y" in rejected.value.fix
    with pytest.raises(NotFound):
        await user.client.current_session()  # nothing was written


async def test_a_malformed_body_is_a_422_naming_the_field(make_user, http: httpx.AsyncClient):
    user = make_user()
    response = await http.post(
        "/api/v1/sessions",
        json={"idle_timeout_s": 5},
        headers={"Authorization": f"Bearer {user.token}"},
    )
    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "invalid_input"
    assert "body.client_public_key: Field required" in body["message"]
    assert "body.idle_timeout_s" in body["message"]
    assert body["fix"]


async def test_current_session(make_user, make_runner, client_key):
    await make_runner()
    user = make_user()
    with pytest.raises(NotFound) as none:
        await user.client.current_session()
    assert "docker offload start" in none.value.fix
    created = await user.client.create_session(session_request(client_key))
    current = await user.client.current_session()
    assert current.id == created.id
    assert current.certificate is None  # certificates only come from create and renew


async def test_a_user_cannot_see_or_stop_another_users_session(make_user, make_runner, client_key):
    await make_runner()
    owner, stranger = make_user(), make_user()
    session = await owner.client.create_session(session_request(client_key))
    for call in (
        stranger.client.get_session(session.id),
        stranger.client.stop_session(session.id),
        stranger.client.renew_certificate(session.id, public_line(client_key)),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await owner.client.get_session(session.id)).state is s.SessionState.STARTING


async def test_renew_gives_a_fresh_certificate_while_live(
    make_user, make_runner, client_key, clock, settings, tmp_path
):
    await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    later = clock.advance(settings.cert_validity_s - 30)

    renewed = await user.client.renew_certificate(session.id, public_line(client_key))

    assert renewed.certificate is not None
    seen = await describe_certificate(renewed.certificate, tmp_path)
    assert seen["Principals"] == [session.id]
    expected_end = later + timedelta(seconds=settings.cert_validity_s)
    assert seen["Valid"].endswith(f"to {expected_end:%Y-%m-%dT%H:%M:%S}")
    assert renewed.certificate_valid_before == expected_end

    await user.client.stop_session(session.id)
    with pytest.raises(Conflict) as ended:
        await user.client.renew_certificate(session.id, public_line(client_key))
    assert "docker offload start" in ended.value.fix


async def test_stop_terminates_and_is_idempotent(make_user, make_runner, client_key, clock):
    await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    stop_time = clock.advance(10)

    stopped = await user.client.stop_session(session.id)
    assert stopped.state is s.SessionState.TERMINATED
    assert stopped.ended_at == stop_time
    clock.advance(10)
    again = await user.client.stop_session(session.id)
    assert (again.state, again.ended_at) == (s.SessionState.TERMINATED, stop_time)
    with pytest.raises(NotFound):
        await user.client.current_session()
    # The user may start again: a new session, not the old one.
    fresh = await user.client.create_session(session_request(client_key))
    assert fresh.id != session.id


async def test_concurrent_starts_never_exceed_capacity(make_user, make_runner, client_key):
    runner = await make_runner(capacity=3)
    users = [make_user() for _ in range(8)]
    results = await asyncio.gather(
        *(user.client.create_session(session_request(client_key)) for user in users),
        return_exceptions=True,
    )
    placed = [r for r in results if isinstance(r, s.SessionInfo)]
    refused = [r for r in results if isinstance(r, NoCapacity)]
    assert (len(placed), len(refused)) == (3, 5)
    assert sorted(await runner.session_ids()) == sorted(info.id for info in placed)


async def test_concurrent_starts_of_one_user_make_one_session(make_user, make_runner, client_key):
    await make_runner()
    user = make_user()
    results = await asyncio.gather(
        *(user.client.create_session(session_request(client_key)) for _ in range(5))
    )
    assert len({info.id for info in results}) == 1


async def test_only_the_current_key_may_renew(make_user, make_runner, client_key):
    """After a takeover the old machine's key must not win the session back by renewing."""
    await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    other_key = asyncssh.generate_private_key("ssh-ed25519")

    with pytest.raises(Conflict) as refused:
        await user.client.renew_certificate(session.id, public_line(other_key))
    assert "--takeover" in refused.value.fix
    renewed = await user.client.renew_certificate(session.id, public_line(client_key))
    assert renewed.certificate is not None


async def test_a_new_personal_idle_timeout_applies_to_the_live_session(
    make_user, make_runner, client_key
):
    await make_runner()
    user = make_user()
    session = await user.client.create_session(session_request(client_key))
    await user.client.update_my_settings(s.UserSettingsUpdate(idle_timeout_s=900))
    assert (await user.client.get_session(session.id)).idle_timeout_s == 900
