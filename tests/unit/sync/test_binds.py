"""The container-create rewrite: laptop bind sources move into the mount area, nothing else."""

from __future__ import annotations

import json

import pytest

from offload.agent.binds import rewrite_create_body, stable_id
from offload.core.errors import InvalidInput
from offload.core.schemas import ENGINE_SOCKET_IN_MOUNT_AREA

AREA = "/var/lib/offload/env-1/mounts"
KINDS = {"/home/me/app": "dir", "/home/me/app.yml": "file", "/home/me/data": "dir"}


def probe(path: str):  # type: ignore[no-untyped-def]
    return KINDS.get(path, "missing"), path


def create(host_config: dict) -> bytes:  # type: ignore[type-arg]
    return json.dumps({"Image": "busybox", "HostConfig": host_config}).encode()


def test_binds_are_rewritten_with_their_options() -> None:
    body = create(
        {"Binds": ["/home/me/app:/app", "/home/me/data:/data:ro,Z", "named:/v", "cache:/c:ro"]}
    )
    result = rewrite_create_body(body, AREA, probe=probe)
    binds = json.loads(result.body)["HostConfig"]["Binds"]
    app, data = stable_id("/home/me/app"), stable_id("/home/me/data")
    assert binds == [f"{AREA}/{app}:/app", f"{AREA}/{data}:/data:ro,Z", "named:/v", "cache:/c:ro"]
    by_path = {s.laptop_path: s for s in result.syncs}
    assert set(by_path) == {"/home/me/app", "/home/me/data"}
    assert not by_path["/home/me/app"].read_only and by_path["/home/me/data"].read_only
    assert by_path["/home/me/app"].remote_source == f"{AREA}/{app}"


def test_mounts_of_type_bind_only() -> None:
    mounts = [
        {"Type": "bind", "Source": "/home/me/app", "Target": "/app", "ReadOnly": True},
        {"Type": "volume", "Source": "named", "Target": "/v"},
        {"Type": "tmpfs", "Target": "/tmp"},
    ]
    body = create({"Mounts": mounts, "Tmpfs": {"/run": ""}})
    result = rewrite_create_body(body, AREA, probe=probe)
    doc = json.loads(result.body)["HostConfig"]
    assert doc["Mounts"][0]["Source"] == f"{AREA}/{stable_id('/home/me/app')}"
    assert doc["Mounts"][1:] == mounts[1:]
    assert doc["Tmpfs"] == {"/run": ""}
    assert [s.read_only for s in result.syncs] == [True]


def test_nothing_to_rewrite_leaves_the_body_byte_for_byte() -> None:
    body = create({"Binds": ["vol:/v"], "Mounts": [{"Type": "tmpfs", "Target": "/t"}]})
    result = rewrite_create_body(body, AREA, probe=probe)
    assert result.body == body and not result.changed
    assert rewrite_create_body(b'{"Image":"x"}', AREA, probe=probe).syncs == []


def test_a_file_bind_syncs_its_directory_for_that_name() -> None:
    result = rewrite_create_body(
        create({"Binds": ["/home/me/app.yml:/etc/app.yml:ro"]}), AREA, probe=probe
    )
    [sync] = result.syncs
    assert (sync.laptop_path, sync.only, sync.read_only) == ("/home/me", "app.yml", True)
    assert json.loads(result.body)["HostConfig"]["Binds"] == [
        f"{sync.remote_source}:/etc/app.yml:ro"
    ]
    assert sync.remote_source == f"{AREA}/{stable_id('/home/me/app.yml')}/app.yml"


def test_same_directory_twice_is_one_sync_writable_if_any_bind_is() -> None:
    body = create({"Binds": ["/home/me/app:/a:ro", "/home/me/app/:/b"]})
    [sync] = rewrite_create_body(body, AREA, probe=probe).syncs
    assert not sync.read_only


def test_missing_sources() -> None:
    # -v creates a missing directory (Docker does too); --mount refuses it like Docker.
    [sync] = rewrite_create_body(create({"Binds": ["/home/me/new:/n"]}), AREA, probe=probe).syncs
    assert sync.laptop_path == "/home/me/new"
    with pytest.raises(InvalidInput, match="does not exist"):
        rewrite_create_body(
            create({"Mounts": [{"Type": "bind", "Source": "/nope", "Target": "/n"}]}),
            AREA,
            probe=probe,
        )


def test_keys_are_matched_like_dockerd_case_insensitively() -> None:
    body = json.dumps(
        {
            "hostconfig": {
                "binds": ["/home/me/app:/app"],
                "mounts": [{"type": "BIND", "source": "/home/me/data", "target": "/d"}],
            }
        }
    ).encode()
    doc = json.loads(rewrite_create_body(body, AREA, probe=probe).body)["hostconfig"]
    assert doc["binds"][0].startswith(AREA + "/")
    assert doc["mounts"][0]["source"].startswith(AREA + "/")


def test_sources_already_in_the_mount_area_and_bad_bodies() -> None:
    body = create({"Binds": [f"{AREA}/x:/x"]})
    assert not rewrite_create_body(body, AREA, probe=probe).changed
    with pytest.raises(InvalidInput):
        rewrite_create_body(b"[1]", AREA, probe=probe)
    with pytest.raises(InvalidInput):
        rewrite_create_body(b"{nope", AREA, probe=probe)


def test_stable_id_is_a_plain_stable_name() -> None:
    assert stable_id("/home/me/app") == stable_id("/home/me/app/") == stable_id("/home/me//app")
    assert stable_id("/home/me/app") != stable_id("/home/me/app2")
    assert stable_id("/x").isalnum()


@pytest.mark.parametrize("source", ["/", "/proc", "/sys/fs/cgroup", "/dev/shm"])
def test_the_laptops_root_and_kernel_file_systems_are_refused(source: str) -> None:
    body = json.dumps({"HostConfig": {"Binds": [f"{source}:/x"]}}).encode()
    with pytest.raises(InvalidInput, match="cannot bind-mount"):
        rewrite_create_body(body, "/area", probe=lambda p: ("dir", p))


def test_the_docker_socket_becomes_the_session_engines_and_syncs_nothing() -> None:
    body = create(
        {
            "Binds": ["/var/run/docker.sock:/var/run/docker.sock"],
            "Mounts": [{"Type": "bind", "Source": "/run/docker.sock", "Target": "/d.sock"}],
        }
    )
    # The laptop has no such socket (the probe says missing): --mount must not refuse it.
    result = rewrite_create_body(body, AREA, probe=lambda p: ("missing", p))
    doc = json.loads(result.body)["HostConfig"]
    engine = f"{AREA}/{ENGINE_SOCKET_IN_MOUNT_AREA}"
    assert doc["Binds"] == [f"{engine}:/var/run/docker.sock"]
    assert doc["Mounts"][0]["Source"] == engine
    assert result.changed and result.syncs == []
