"""`BindSources`: runner paths the agent put into create bodies shown as the laptop's in the
engine's inspect and list answers (engine-shaped JSON), everything else left byte for byte."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from offload.agent.bind_sources import MAX_SOURCES, BindSources, ResponseKind
from offload.agent.binds import PathKind, RemoteSource, rewrite_create_body, stable_id

AREA = "/var/lib/offload/areas/env-1f2e/mounts"
APP = "/home/me/app"
APP_ID = stable_id(APP)
CONF_ID = stable_id("/home/me/conf/app.toml")


def probe(path: str) -> tuple[PathKind, str]:
    return ("file" if path.endswith(".toml") else "dir"), path


def learned(path: Path | None = None) -> BindSources:
    """What the agent remembers after creating the container of `inspect_doc()`."""
    body = json.dumps(
        {
            "Image": "busybox",
            "HostConfig": {
                "Binds": [f"{APP}/:/app:ro,rslave", "/var/run/docker.sock:/var/run/docker.sock"],
                "Mounts": [
                    {"Type": "bind", "Source": "/home/me/conf/app.toml", "Target": "/etc/app.toml"}
                ],
            },
        }
    ).encode()
    rewrite = rewrite_create_body(body, AREA, probe=probe)
    sources = BindSources(path)
    sources.learn(AREA, rewrite.sources)
    return sources


def inspect_doc() -> dict[str, Any]:
    """`GET /containers/{id}/json` of that container, as dockerd answers it."""
    return {
        "Id": "4fa6e0f0c6786287e131c3852c58a2e01cc697a68231826813597e4994f1d6e2",
        "Created": "2024-05-02T09:14:11.105276231Z",
        "Path": "sleep",
        "Args": ["3600"],
        "State": {"Status": "running", "Running": True, "Pid": 4242, "ExitCode": 0},
        "Image": "sha256:ba5dc23f65d4cc4a4535bce55cf9e63b068eb02946e3422d3587e8ce803b6aab",
        "Name": "/web",
        "HostConfig": {
            "Binds": [
                f"{AREA}/{APP_ID}:/app:ro,rslave",
                f"{AREA}/.docker.sock:/var/run/docker.sock",
                "cache:/cache",
                "/srv/shared:/shared",
            ],
            "NetworkMode": "bridge",
            "Mounts": [
                {
                    "Type": "bind",
                    "Source": f"{AREA}/{CONF_ID}/app.toml",
                    "Target": "/etc/app.toml",
                }
            ],
        },
        "Mounts": [
            {
                "Type": "bind",
                "Source": f"{AREA}/{APP_ID}",
                "Destination": "/app",
                "Mode": "ro,rslave",
                "RW": False,
                "Propagation": "rslave",
            },
            {
                "Type": "bind",
                "Source": f"{AREA}/.docker.sock",
                "Destination": "/var/run/docker.sock",
                "Mode": "",
                "RW": True,
                "Propagation": "rprivate",
            },
            {
                "Type": "volume",
                "Name": "cache",
                "Source": "/var/lib/docker/volumes/cache/_data",
                "Destination": "/cache",
                "Driver": "local",
                "Mode": "z",
                "RW": True,
                "Propagation": "",
            },
            {
                "Type": "bind",
                "Source": "/srv/shared",
                "Destination": "/shared",
                "Mode": "",
                "RW": True,
                "Propagation": "rprivate",
            },
            {
                "Type": "bind",
                "Source": f"{AREA}/{CONF_ID}/app.toml",
                "Destination": "/etc/app.toml",
                "Mode": "",
                "RW": True,
                "Propagation": "rprivate",
            },
        ],
        "Config": {"Hostname": "4fa6e0f0c678", "Labels": {"note": "<a&b>"}},
    }


def go_json(doc: Any) -> bytes:
    """What dockerd's `json.NewEncoder` writes."""
    text = json.dumps(doc, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n").encode()  # fmt: skip


def test_inspect_shows_the_laptop_paths_the_client_asked_for() -> None:
    restored = json.loads(learned().restore(ResponseKind.INSPECT, go_json(inspect_doc())))
    assert [m["Source"] for m in restored["Mounts"]] == [
        APP,  # normalized, as a local engine shows it (the client sent `/home/me/app/`)
        "/var/run/docker.sock",
        "/var/lib/docker/volumes/cache/_data",
        "/srv/shared",
        "/home/me/conf/app.toml",
    ]
    assert restored["HostConfig"]["Binds"] == [
        f"{APP}:/app:ro,rslave",
        "/var/run/docker.sock:/var/run/docker.sock",
        "cache:/cache",
        "/srv/shared:/shared",
    ]
    assert restored["HostConfig"]["Mounts"][0]["Source"] == "/home/me/conf/app.toml"
    # Nothing else moved: the same document but for the sources, in the engine's key order.
    expected = inspect_doc()
    expected["Mounts"][0]["Source"] = APP
    expected["Mounts"][1]["Source"] = "/var/run/docker.sock"
    expected["Mounts"][4]["Source"] = "/home/me/conf/app.toml"
    expected["HostConfig"]["Binds"][:2] = restored["HostConfig"]["Binds"][:2]
    expected["HostConfig"]["Mounts"][0]["Source"] = "/home/me/conf/app.toml"
    assert learned().restore(ResponseKind.INSPECT, go_json(inspect_doc())) == go_json(expected)


def test_a_list_shows_the_laptop_paths_of_every_container() -> None:
    other = {"Id": "9a", "Names": ["/db"], "Mounts": [{"Type": "volume", "Source": "/v/db"}]}
    web = {
        "Id": "4f",
        "Names": ["/web"],
        "Mounts": inspect_doc()["Mounts"],
        "HostConfig": {"NetworkMode": "bridge"},
    }
    restored = json.loads(learned().restore(ResponseKind.LIST, go_json([other, web])))
    assert restored[0] == other
    assert restored[1]["Mounts"][0]["Source"] == APP
    assert restored[1]["Mounts"][3]["Source"] == "/srv/shared"


def test_what_names_no_source_the_agent_made_is_the_same_bytes() -> None:
    sources = learned()
    untouched = inspect_doc()
    untouched["Mounts"] = untouched["Mounts"][2:4]
    untouched["HostConfig"] = {"Binds": ["cache:/cache", f"{AREA}/b000000000000000000000000:/x"]}
    untouched["Mounts"].append({"Type": "bind", "Source": f"/elsewhere/{APP_ID}"})
    for body in (
        go_json(untouched),
        go_json([untouched]),
        b'{"message":"No such container: web"}\n',
        b"not json",
        b"",
        b"[1, 2]",
    ):
        assert sources.restore(ResponseKind.INSPECT, body) is body
        assert sources.restore(ResponseKind.LIST, body) is body


def test_nothing_learned_means_nothing_touched() -> None:
    body = go_json(inspect_doc())
    assert BindSources().restore(ResponseKind.INSPECT, body) is body


def test_a_new_agent_remembers_what_the_last_one_learned(tmp_path: Path) -> None:
    file = tmp_path / "run" / "bind-sources.json"
    learned(file)
    again = BindSources(file)
    assert again.mount_area == AREA
    assert again.laptop_source(f"{AREA}/{APP_ID}") == APP
    assert again.laptop_source(f"/other/area/{APP_ID}") is None
    assert file.stat().st_mode & 0o777 == 0o600


def test_a_broken_file_is_ignored(tmp_path: Path) -> None:
    file = tmp_path / "bind-sources.json"
    file.write_text("{not json")
    sources = BindSources(file)
    assert sources.laptop_source(f"{AREA}/{APP_ID}") is None
    sources.learn(AREA, [RemoteSource(f"{AREA}/{APP_ID}", APP)])
    assert BindSources(file).laptop_source(f"{AREA}/{APP_ID}") == APP


def test_a_new_mount_area_replaces_the_old_and_old_entries_are_dropped() -> None:
    sources = learned()
    sources.learn("/new/area", [])
    assert sources.laptop_source(f"/new/area/{APP_ID}") == APP  # an id is the same path anywhere
    assert sources.laptop_source(f"{AREA}/{APP_ID}") is None
    sources.learn(
        "/new/area",
        [RemoteSource(f"/new/area/b{i:024x}", f"/p/{i}") for i in range(MAX_SOURCES + 5)],
    )
    assert sources.laptop_source(f"/new/area/{APP_ID}") is None  # the oldest went
    assert sources.laptop_source(f"/new/area/b{MAX_SOURCES + 4:024x}") == f"/p/{MAX_SOURCES + 4}"
