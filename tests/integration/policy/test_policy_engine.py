"""The policy in front of a real dockerd, driven with raw HTTP and the real docker CLI.

The policy is a second wall now: it refuses API versions below 1.24, and GPU requests in a session
without a GPU (this engine's).  What it lets through gets dockerd's own answer, compared byte for
byte with a plain engine's (`plain_engine`).
Privileged and other sandbox-confined containers are only created here, never started: this test
engine is a root dockerd on the test machine, not a session sandbox.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from offload.core.waiting import wait_until
from offload.runner.policy import PolicyPlugin

from .conftest import Engine, LoopThread

pytestmark = pytest.mark.slow

TOO_OLD = (
    "client version {} is too old. Minimum supported API version is 1.24, "
    "please upgrade your client to a newer version"
)


def denied_by_policy(plugin: PolicyPlugin, version: str) -> str:
    return f"authorization denied by plugin {plugin.name}: {TOO_OLD.format(version)}"


def post(engine: Engine, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    with engine.http() as http:
        if body is None:
            return http.post(path)
        return http.post(path, json=body)


def remove_container(engine: Engine, ident: str) -> None:
    with engine.http() as http:
        response = http.delete(f"/v1.41/containers/{ident}", params={"force": "1", "v": "1"})
    assert response.status_code == 204, response.text


# ---- the wall: old API versions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "version"),
    [
        ("/v1.23/containers/create", "1.23"),
        ("/v1%2E23/containers/create", "1.23"),  # dockerd's router reads the decoded path
        ("/v1.12/containers/create", "1.12"),
        ("/v1.9/containers/create", "1.9"),
    ],
)
def test_old_api_versions_are_refused_with_dockerds_words(
    engine: Engine, plugin: PolicyPlugin, path: str, version: str
) -> None:
    body = {"Image": "offload-test/busybox:latest", "HostConfig": {"Binds": ["/:/host"]}}
    response = post(engine, path, body)
    assert response.status_code == 403, response.text
    # dockerd writes errors of requests this old as plain text (`http.Error`), not JSON.
    assert response.text == denied_by_policy(plugin, version) + "\n"


@pytest.mark.parametrize("version", ["1.23", "1.12"])
def test_why_the_wall_exists_dockerd_alone_serves_old_versions(
    plain_engine: Engine, version: str
) -> None:
    with plain_engine.http() as http:
        served = http.get(f"/v{version}/version")
    assert served.status_code == 200, served.text


def test_the_cli_at_an_old_version_prints_dockerds_words(
    engine: Engine, plugin: PolicyPlugin
) -> None:
    result = engine.docker("info", env={"DOCKER_API_VERSION": "1.23"})
    assert result.returncode != 0
    assert f"Error response from daemon: {denied_by_policy(plugin, '1.23')}" in result.stderr


def test_unversioned_and_current_requests_pass(engine: Engine) -> None:
    with engine.http() as http:
        for path in ("/_ping", "/v1.24/_ping", "/v1.41/_ping", "/v1%2E41/_ping"):
            response = http.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.text == "OK"
        assert http.get("/info").status_code == 200


# ---- dockerd's own refusals reach the user unchanged -----------------------------------------


def assert_same_answer(a: httpx.Response, b: httpx.Response) -> None:
    assert (a.status_code, a.headers.get("content-type"), a.content) == (
        b.status_code,
        b.headers.get("content-type"),
        b.content,
    )


def test_swarm_leave_outside_a_swarm_gets_dockerds_own_error(
    engine: Engine, plain_engine: Engine
) -> None:
    ours, plain = post(engine, "/v1.41/swarm/leave"), post(plain_engine, "/v1.41/swarm/leave")
    assert plain.status_code >= 400, plain.text  # the reference really is an error
    assert "authorization" not in ours.text
    assert_same_answer(ours, plain)
    cli, cli_plain = engine.docker("swarm", "leave"), plain_engine.docker("swarm", "leave")
    assert cli.returncode == cli_plain.returncode != 0
    assert cli.stderr == cli_plain.stderr


def test_an_unknown_log_driver_gets_dockerds_own_error(
    engine: Engine, plain_engine: Engine, image: str, plain_image: str
) -> None:
    assert image == plain_image
    body = {"Image": image, "Cmd": ["true"], "HostConfig": {"LogConfig": {"Type": "nosuch"}}}
    ours = post(engine, "/v1.41/containers/create", body)
    plain = post(plain_engine, "/v1.41/containers/create", body)
    assert plain.status_code >= 400, plain.text
    assert "nosuch" in plain.json()["message"]
    assert_same_answer(ours, plain)
    args = ("create", "--log-driver", "nosuch", image, "true")
    cli, cli_plain = engine.docker(*args), plain_engine.docker(*args)
    assert cli.returncode == cli_plain.returncode != 0
    assert cli.stderr == cli_plain.stderr


def test_a_body_on_start_gets_dockerds_own_error(
    engine: Engine, plain_engine: Engine, image: str, plain_image: str
) -> None:
    # API >= 1.24 refuses host config on start: dockerd says so itself, through the policy too.
    answers = []
    for target in (engine, plain_engine):
        created = post(target, "/v1.41/containers/create", {"Image": image, "Cmd": ["true"]})
        assert created.status_code == 201, created.text
        ident = created.json()["Id"]
        try:
            answer = post(target, f"/v1.41/containers/{ident}/start", {"Privileged": True})
            answers.append((answer.status_code, answer.text.replace(ident, "<id>")))
        finally:
            remove_container(target, ident)
    assert answers[0] == answers[1]
    assert answers[0][0] == 400, answers


# ---- what local Docker allows passes (created only, never started here) ------------------------


def test_a_privileged_create_is_allowed(engine: Engine, image: str) -> None:
    body = {
        "Image": image,
        "Cmd": ["true"],
        "HostConfig": {
            "Privileged": True,
            "PidMode": "host",
            "IpcMode": "host",
            "UTSMode": "host",
            "CapAdd": ["ALL"],
            "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
            "Binds": ["/:/host"],
            "Devices": [
                {"PathOnHost": "/dev/null", "PathInContainer": "/dev/x", "CgroupPermissions": "rwm"}
            ],
            "DeviceCgroupRules": ["c 1:3 rwm"],
        },
    }
    created = post(engine, "/v1.41/containers/create", body)
    assert created.status_code == 201, created.text
    ident = created.json()["Id"]
    try:
        with engine.http() as http:
            inspected = http.get(f"/v1.41/containers/{ident}/json").json()
        assert inspected["HostConfig"]["Privileged"] is True
        assert inspected["HostConfig"]["Binds"] == ["/:/host"]
    finally:
        remove_container(engine, ident)


@pytest.mark.parametrize(
    "flags",
    [
        ["--privileged"],
        ["--pid", "host"],
        ["--ipc", "host"],
        ["--uts", "host"],
        ["--userns", "host"],
        ["--cgroupns", "host"],
        ["--device", "/dev/null"],
        ["--device-cgroup-rule", "c 1:3 rwm"],
        ["--cap-add", "ALL"],
        ["--security-opt", "seccomp=unconfined"],
        ["--security-opt", "apparmor=unconfined"],
        ["--security-opt", "systempaths=unconfined"],
        ["-v", "/:/host"],
        ["--mount", "type=bind,src=/etc,dst=/x"],
        ["--cgroup-parent", "/elsewhere"],
        ["--log-driver", "none"],
    ],
)
def test_what_local_docker_allows_is_created(engine: Engine, image: str, flags: list[str]) -> None:
    result = engine.docker("create", *flags, image, "true")
    assert result.returncode == 0, result.stderr
    assert engine.docker("rm", "-f", result.stdout.strip()).returncode == 0


def test_a_volume_bound_to_a_host_path_is_created(engine: Engine) -> None:
    args = ("--opt", "type=none", "--opt", "o=bind", "--opt", "device=/etc")
    result = engine.docker("volume", "create", *args, "policy-v")
    assert result.returncode == 0, result.stderr
    assert engine.docker("volume", "rm", "policy-v").returncode == 0


def test_privileged_exec_create_is_allowed(engine: Engine, image: str) -> None:
    name = "policy-exec"
    started = engine.docker("run", "-d", "--name", name, image, "sleep", "300")
    assert started.returncode == 0, started.stderr
    try:
        exec_body = {"Cmd": ["true"], "Privileged": True}
        created = post(engine, f"/v1.41/containers/{name}/exec", exec_body)
        assert created.status_code == 201, created.text  # created, never started
        plain = engine.docker("exec", name, "echo", "fine")
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.strip() == "fine"
    finally:
        engine.docker("rm", "-f", name)


def test_a_plain_container_runs(engine: Engine, image: str) -> None:
    result = engine.docker("run", "--rm", image, "echo", "ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_bind_mount_from_the_mount_area_works(
    engine: Engine, image: str, mount_area: Path
) -> None:
    (mount_area / "sub" / "hello.txt").write_text("from the laptop\n")
    result = engine.docker(
        "run", "--rm", "-v", f"{mount_area}/sub:/x", image, "cat", "/x/hello.txt"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "from the laptop\n"


def test_the_host_network_is_the_sessions_own(engine: Engine, image: str) -> None:
    result = engine.docker("run", "--rm", "--network", "host", image, "true")
    assert result.returncode == 0, result.stderr


# ---- GPUs: this engine's session has none ------------------------------------------------------


def test_gpus_all_in_a_session_without_a_gpu_says_how_to_get_one(
    engine: Engine, plain_engine: Engine, plugin: PolicyPlugin, image: str, plain_image: str
) -> None:
    result = engine.docker("run", "--rm", "--gpus", "all", image, "true")
    assert result.returncode != 0
    assert (
        f"authorization denied by plugin {plugin.name}: Offload policy: this session has no "
        "GPU; start one with `docker offload start --gpu`." in result.stderr
    ), result.stderr
    # The plain engine fails less clearly (no NVIDIA hook on this host).
    plain = plain_engine.docker("run", "--rm", "--gpus", "all", plain_image, "true")
    assert plain.returncode != 0
    assert "could not select device driver" in plain.stderr, plain.stderr


@pytest.mark.parametrize(
    "body",
    [
        {"hostconfig": {"devicerequests": [{"count": -1, "capabilities": [["gpu"]]}]}},
        {"DeviceRequests": [{"Driver": "nvidia", "Count": 1}]},  # the flat legacy shape
        {"HostConfig": {"DeviceRequests": [None]}},
    ],
)
def test_raw_gpu_requests_in_odd_shapes_are_refused(
    engine: Engine, image: str, body: dict[str, Any]
) -> None:
    answer = post(engine, "/v1.41/containers/create", {"Image": image, **body})
    assert answer.status_code == 403, answer.text
    assert "this session has no GPU" in answer.json()["message"]


# ---- failing closed ------------------------------------------------------------------------------


def test_the_engine_fails_closed_without_its_plugin(
    engine: Engine, plugin: PolicyPlugin, loop_thread: LoopThread
) -> None:
    loop_thread.run(plugin.stop())
    try:
        # A fixed API version spares the CLI's version probe: one request, one retry window
        # (dockerd retries an unreachable plugin for about 15 s before it gives up).
        result = engine.docker("ps", env={"DOCKER_API_VERSION": "1.41"})
        assert result.returncode != 0
        assert f"plugin {plugin.name} failed with error" in result.stderr, result.stderr
        assert "AuthZPlugin.AuthZReq" in result.stderr
    finally:
        loop_thread.run(plugin.start())
    # Back in service without restarting the engine.
    wait_until(lambda: engine.docker("ps").returncode == 0, 30, "the engine to serve again")
