"""The policy's rules (`evaluate`), request by request, as dockerd hands them to the plugin."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from offload.runner.policy import AuthzRequest, Decision, evaluate
from offload.runner.policy_rules import (
    DANGEROUS_CAPABILITIES,
    parse_body,
    path_in_mount_area,
    request_from_plugin_call,
    split_uri,
)


@pytest.fixture
def area(tmp_path: Path) -> Path:
    mount_area = tmp_path / "area"
    (mount_area / "project").mkdir(parents=True)
    return mount_area


def judge(area: Path, method: str, uri: str, body: dict[str, Any] | None = None) -> Decision:
    return evaluate(AuthzRequest(method=method, uri=uri, body=body), area)


def create(area: Path, uri: str = "/v1.41/containers/create", /, **host_config: Any) -> Decision:
    return judge(area, "POST", uri, {"Image": "busybox", "HostConfig": host_config})


def assert_denied(decision: Decision, *words: str) -> None:
    assert not decision.allow
    assert decision.msg.startswith("Offload policy: ")
    assert " is not allowed (" in decision.msg
    for word in words:
        assert word in decision.msg
    assert decision.rule


# ---- what stays allowed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "uri"),
    [
        ("GET", "/_ping"),
        ("HEAD", "/_ping"),
        ("GET", "/v1.41/version"),
        ("GET", "/v1.41/containers/json?all=1"),
        ("POST", "/v1.41/containers/abc/start"),
        ("POST", "/v1.41/containers/abc/attach?stream=1&stdout=1"),
        ("DELETE", "/v1.41/containers/abc?force=1"),
        ("POST", "/v1.41/build?t=x&networkmode=host"),
        ("POST", "/v1.41/images/create?fromImage=busybox&tag=latest"),
        ("GET", "/v1.41/plugins"),
        ("GET", "/v1.41/info"),
    ],
)
def test_requests_without_rules_are_allowed(area: Path, method: str, uri: str) -> None:
    assert judge(area, method, uri).allow


def test_plain_container_create_is_allowed(area: Path) -> None:
    body = {
        "Image": "busybox",
        "Cmd": ["echo", "ok"],
        "HostConfig": {
            "Binds": None,
            "NetworkMode": "default",
            "PidMode": "",
            "IpcMode": "private",
            "CapAdd": None,
            "SecurityOpt": None,
            "MaskedPaths": None,
            "ReadonlyPaths": None,
            "LogConfig": {"Type": "", "Config": {}},
            "Privileged": False,
        },
    }
    assert judge(area, "POST", "/v1.41/containers/create?name=web", body).allow


def test_create_without_host_config_is_allowed(area: Path) -> None:
    assert judge(area, "POST", "/containers/create", {"Image": "busybox"}).allow


@pytest.mark.parametrize(
    "modes",
    [
        {"PidMode": "container:db", "IpcMode": "container:db", "NetworkMode": "container:db"},
        {"IpcMode": "shareable", "UTSMode": "", "UsernsMode": "", "CgroupnsMode": "private"},
        {"PidMode": "", "IpcMode": "none"},
    ],
)
def test_namespace_modes_other_than_host_are_allowed(area: Path, modes: dict[str, str]) -> None:
    assert create(area, **modes).allow


def test_host_network_is_allowed(area: Path) -> None:
    # The engine lives in the session's own network namespace: "host" is that namespace.
    assert create(area, NetworkMode="host").allow


@pytest.mark.parametrize("cap", ["CHOWN", "NET_RAW", "cap_net_bind_service", "SYS_NICE"])
def test_harmless_capabilities_are_allowed(area: Path, cap: str) -> None:
    assert create(area, CapAdd=[cap]).allow


@pytest.mark.parametrize(
    "option", ["no-new-privileges", "no-new-privileges:true", "apparmor=docker-default"]
)
def test_harmless_security_options_are_allowed(area: Path, option: str) -> None:
    assert create(area, SecurityOpt=[option]).allow


# ---- privileged, namespaces, devices, capabilities ---------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "/containers/create",
        "/v1.41/containers/create",
        "/v1.24/containers/create?name=x&platform=linux",
        "/v1.41/containers/create/",
        "//v1.41//containers/create",
        "/v1.41/%63ontainers/create",
        "/v1.41/containers%2Fcreate",
        "http://docker/v1.41/containers/create",
        "/v1.41/x/../containers/create",
    ],
)
def test_privileged_is_denied_whatever_the_uri_spelling(area: Path, uri: str) -> None:
    assert_denied(create(area, uri, Privileged=True), "--privileged")


def test_keys_are_read_case_insensitively_like_go(area: Path) -> None:
    body = {"image": "busybox", "hostconfig": {"privileged": True}}
    assert_denied(judge(area, "POST", "/containers/create", body), "--privileged")


def test_unicode_folded_keys_are_read_like_go() -> None:
    # Go folds U+017F LONG S to "s" and U+212A KELVIN SIGN to "k" when matching struct fields.
    body = parse_body('{"HostConfig": {"\u017fecurityOpt": ["seccomp=unconfined"]}}'.encode())
    assert body["hostconfig"]["securityopt"] == ["seccomp=unconfined"]


def test_the_last_of_duplicate_keys_wins_like_go(area: Path) -> None:
    raw = b'{"HostConfig": {"Privileged": false, "privileged": true}}'
    request = AuthzRequest("POST", "/containers/create", parse_body(raw))
    assert_denied(evaluate(request, area), "--privileged")
    raw = b'{"HostConfig": {"privileged": true, "Privileged": false}}'
    assert evaluate(AuthzRequest("POST", "/containers/create", parse_body(raw)), area).allow


@pytest.mark.parametrize(
    ("key", "flag"),
    [
        ("PidMode", "--pid host"),
        ("IpcMode", "--ipc host"),
        ("UTSMode", "--uts host"),
        ("UsernsMode", "--userns host"),
        ("CgroupnsMode", "--cgroupns host"),
    ],
)
def test_host_namespaces_are_denied(area: Path, key: str, flag: str) -> None:
    assert_denied(create(area, **{key: "host"}), flag)
    assert_denied(create(area, **{key: "HOST"}), flag)


def test_devices_are_denied(area: Path) -> None:
    device = {"PathOnHost": "/dev/null", "PathInContainer": "/dev/null", "CgroupPermissions": "rwm"}
    assert_denied(create(area, Devices=[device]), "--device")


def test_gpu_requests_are_denied_with_a_word_on_gpus(area: Path) -> None:
    request = {"Driver": "", "Count": -1, "Capabilities": [["gpu"]]}
    assert_denied(create(area, DeviceRequests=[request]), "--gpus", "later release")


def test_device_cgroup_rules_are_denied(area: Path) -> None:
    assert_denied(create(area, DeviceCgroupRules=["c 1:3 mr"]), "--device-cgroup-rule")


@pytest.mark.parametrize("cap", sorted(DANGEROUS_CAPABILITIES))
def test_dangerous_capabilities_are_denied(area: Path, cap: str) -> None:
    assert_denied(create(area, CapAdd=[cap]), cap)


@pytest.mark.parametrize("spelling", ["sys_admin", "CAP_SYS_ADMIN", "cap_sys_admin", " Sys_Admin"])
def test_capabilities_are_matched_in_any_spelling(area: Path, spelling: str) -> None:
    assert_denied(create(area, CapAdd=["CHOWN", spelling]), "SYS_ADMIN")


def test_capabilities_field_that_replaces_the_defaults_is_checked(area: Path) -> None:
    assert_denied(create(area, Capabilities=["CAP_SYS_ADMIN"]), "SYS_ADMIN")


def test_net_admin_is_denied_even_off_the_host_network(area: Path) -> None:
    assert_denied(create(area, NetworkMode="bridge", CapAdd=["NET_ADMIN"]), "NET_ADMIN")


# ---- security options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        "seccomp=unconfined",
        "seccomp:unconfined",
        "SECCOMP=Unconfined",
        'seccomp={"defaultAction": "SCMP_ACT_ALLOW"}',
        "apparmor=unconfined",
        "apparmor:unconfined",
        "label=disable",
        "label:disable",
        "label=type:spc_t",
        "systempaths=unconfined",
    ],
)
def test_unconfined_security_options_are_denied(area: Path, option: str) -> None:
    assert_denied(create(area, SecurityOpt=[option]), "--security-opt")


def test_custom_seccomp_profiles_are_not_echoed_whole(area: Path) -> None:
    profile = "seccomp=" + json.dumps({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []})
    decision = create(area, SecurityOpt=[profile])
    assert_denied(decision, "seccomp=<custom profile>")
    assert "SCMP_ACT_ALLOW" not in decision.msg


@pytest.mark.parametrize("key", ["MaskedPaths", "ReadonlyPaths"])
def test_unmasked_system_paths_are_denied(area: Path, key: str) -> None:
    # What the docker CLI sends for --security-opt systempaths=unconfined.
    assert_denied(create(area, **{key: []}), "systempaths=unconfined")


def test_cgroup_parent_is_denied(area: Path) -> None:
    assert_denied(create(area, CgroupParent="/elsewhere"), "--cgroup-parent")


@pytest.mark.parametrize("driver", ["journald", "syslog", "fluentd", "gelf"])
def test_log_drivers_writing_from_the_host_are_denied(area: Path, driver: str) -> None:
    assert_denied(create(area, LogConfig={"Type": driver, "Config": {}}), driver)


@pytest.mark.parametrize("driver", ["json-file", "local", "none"])
def test_log_drivers_inside_the_engine_are_allowed(area: Path, driver: str) -> None:
    assert create(area, LogConfig={"Type": driver}).allow


# ---- bind mounts and the mount area ------------------------------------------------------------


def test_binds_inside_the_mount_area_are_allowed(area: Path) -> None:
    binds = [
        f"{area}/project:/src",
        f"{area}/project:/ro:ro",
        f"{area}/not-yet-there:/new:rw,z",
        f"{area}:/all",
        "named-volume:/data",
        "/anonymous",
    ]
    assert create(area, Binds=binds).allow


@pytest.mark.parametrize(
    "source",
    [
        "/etc",
        "/",
        "/var/run/docker.sock",
        "{area}/../x",
        "{area}/project/../../x",
        "{area}/missing/../../x",
        "{area}-sibling/x",
        "{area}x",
        "relative/path",
        "./rel",
        "~/x",
    ],
)
def test_binds_outside_the_mount_area_are_denied(area: Path, source: str) -> None:
    source = source.format(area=area)
    assert_denied(create(area, Binds=[f"{source}:/x"]), "bind mount", "mount area")


def test_a_symlink_out_of_the_mount_area_is_denied(area: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (area / "escape").symlink_to(outside)
    (area / "project" / "up").symlink_to("../..")
    assert_denied(create(area, Binds=[f"{area}/escape:/x"]), "mount area")
    assert_denied(create(area, Binds=[f"{area}/escape/sub:/x"]), "mount area")
    assert_denied(create(area, Binds=[f"{area}/project/up:/x"]), "mount area")
    mount = {"Type": "bind", "Source": f"{area}/escape", "Target": "/x"}
    assert_denied(create(area, Mounts=[mount]), "mount area")


def test_a_symlink_that_stays_in_the_mount_area_is_allowed(area: Path) -> None:
    (area / "alias").symlink_to(area / "project")
    assert create(area, Binds=[f"{area}/alias:/x"]).allow


def test_a_mount_area_reached_through_a_symlink_still_works(tmp_path: Path) -> None:
    real = tmp_path / "real-area"
    (real / "p").mkdir(parents=True)
    link = tmp_path / "link-area"
    link.symlink_to(real)
    assert path_in_mount_area(f"{link}/p", link)
    assert not path_in_mount_area(f"{link}/../x", link)


def test_mounts_of_type_bind_are_checked(area: Path) -> None:
    inside = {"Type": "bind", "Source": f"{area}/project", "Target": "/src"}
    outside = {"Type": "bind", "Source": "/etc", "Target": "/x"}
    assert create(area, Mounts=[inside]).allow
    assert_denied(create(area, Mounts=[inside, outside]), "--mount type=bind", "'/etc'")
    assert_denied(create(area, Mounts=[{"type": "BIND", "source": "/etc", "target": "/x"}]))


def test_mounts_of_tmpfs_and_plain_volumes_are_allowed(area: Path) -> None:
    mounts = [
        {"Type": "tmpfs", "Target": "/tmp"},
        {"Type": "volume", "Source": "data", "Target": "/data"},
        {"Type": "volume", "Target": "/anon", "VolumeOptions": {"NoCopy": True}},
        {
            "Type": "volume",
            "Source": "cache",
            "Target": "/c",
            "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": {"type": "tmpfs"}}},
        },
    ]
    assert create(area, Mounts=mounts).allow


@pytest.mark.parametrize("kind", ["npipe", "cluster", "", "image"])
def test_other_mount_types_are_denied(area: Path, kind: str) -> None:
    assert_denied(create(area, Mounts=[{"Type": kind, "Target": "/x"}]), "--mount type=")


def _volume_mount(options: dict[str, str], driver: str = "local") -> dict[str, Any]:
    return {
        "Type": "volume",
        "Source": "v",
        "Target": "/x",
        "VolumeOptions": {"DriverConfig": {"Name": driver, "Options": options}},
    }


def test_volume_mounts_binding_outside_the_mount_area_are_denied(area: Path) -> None:
    options = {"type": "none", "o": "bind", "device": "/etc"}
    assert_denied(create(area, Mounts=[_volume_mount(options)]), "'/etc'")
    inside = {"type": "none", "o": "bind", "device": f"{area}/project"}
    assert create(area, Mounts=[_volume_mount(inside)]).allow


def test_volume_mounts_with_another_driver_are_denied(area: Path) -> None:
    assert_denied(create(area, Mounts=[_volume_mount({}, driver="sshfs")]), "'sshfs'")


def test_volume_driver_is_denied_unless_local(area: Path) -> None:
    assert create(area, VolumeDriver="local").allow
    assert_denied(create(area, VolumeDriver="rexray"), "--volume-driver", "'rexray'")


# ---- exec, volumes, networks, build ------------------------------------------------------------


def test_privileged_exec_is_denied(area: Path) -> None:
    body = {"Cmd": ["sh"], "Privileged": True, "AttachStdout": True}
    assert_denied(judge(area, "POST", "/v1.41/containers/web/exec", body), "exec --privileged")
    body["Privileged"] = False
    assert judge(area, "POST", "/v1.41/containers/web/exec", body).allow


def test_plain_volume_create_is_allowed(area: Path) -> None:
    body = {"Name": "data", "Driver": "local", "DriverOpts": {}, "Labels": {}}
    assert judge(area, "POST", "/v1.41/volumes/create", body).allow
    tmpfs = {"Name": "t", "DriverOpts": {"type": "tmpfs", "device": "tmpfs", "o": "size=64m"}}
    assert judge(area, "POST", "/volumes/create", tmpfs).allow


@pytest.mark.parametrize(
    "options",
    [
        {"type": "none", "o": "bind", "device": "/etc"},
        {"type": "none", "o": "rbind,ro", "device": "/"},
        {"o": "bind", "device": "/etc"},
        {"type": "none", "device": "/etc"},
        {"type": "tmpfs", "o": "bind", "device": "/etc"},
        {"type": "none", "o": "bind", "device": "{area}/../etc"},
    ],
)
def test_volume_create_binding_outside_the_mount_area_is_denied(
    area: Path, options: dict[str, str]
) -> None:
    options = {k: v.format(area=area) for k, v in options.items()}
    body = {"Name": "v", "Driver": "local", "DriverOpts": options}
    assert_denied(judge(area, "POST", "/v1.41/volumes/create", body), "mount area")


def test_volume_create_binding_inside_the_mount_area_is_allowed(area: Path) -> None:
    body = {"Name": "v", "DriverOpts": {"type": "none", "o": "bind", "device": f"{area}/project"}}
    assert judge(area, "POST", "/v1.41/volumes/create", body).allow


@pytest.mark.parametrize(
    "options",
    [
        {"type": "ext4", "device": "/dev/sda1"},
        {"type": "overlay", "o": "lowerdir=/etc,upperdir=/tmp/u,workdir=/tmp/w"},
        {"type": "nfs", "o": "addr=10.0.0.1", "device": ":/export"},
    ],
)
def test_volume_create_mounting_host_filesystems_is_denied(
    area: Path, options: dict[str, str]
) -> None:
    body = {"Name": "v", "DriverOpts": options}
    assert_denied(judge(area, "POST", "/volumes/create", body), "a local volume of type")


def test_volume_create_with_another_driver_is_denied(area: Path) -> None:
    body = {"Name": "v", "Driver": "convoy"}
    assert_denied(judge(area, "POST", "/volumes/create", body), "'convoy'")


def test_network_create_allows_bridges_only(area: Path) -> None:
    assert judge(area, "POST", "/v1.41/networks/create", {"Name": "n"}).allow
    assert judge(area, "POST", "/networks/create", {"Name": "n", "Driver": "bridge"}).allow
    macvlan = {"Name": "n", "Driver": "macvlan", "Options": {"parent": "eth0"}}
    assert_denied(judge(area, "POST", "/networks/create", macvlan), "'macvlan'")
    ipam = {"Name": "n", "IPAM": {"Driver": "custom"}}
    assert_denied(judge(area, "POST", "/networks/create", ipam), "IPAM")


def test_container_update_refuses_devices(area: Path) -> None:
    assert judge(area, "POST", "/containers/web/update", {"Memory": 1 << 28}).allow
    body = {"Devices": [{"PathOnHost": "/dev/sda"}]}
    assert_denied(judge(area, "POST", "/v1.41/containers/web/update", body), "--device")


def test_build_with_a_cgroup_parent_is_denied(area: Path) -> None:
    decision = judge(area, "POST", "/v1.41/build?t=app&cgroupparent=%2Fother")
    assert_denied(decision, "--cgroup-parent")
    assert judge(area, "POST", "/v1.41/build?t=app&cgroupparent=").allow


# ---- what Offload does not offer ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "uri"),
    [
        ("POST", "/v1.41/swarm/init"),
        ("GET", "/v1.41/swarm"),
        ("GET", "/v1.41/services"),
        ("POST", "/v1.41/services/create"),
        ("GET", "/v1.41/nodes"),
        ("GET", "/v1.41/secrets"),
        ("POST", "/configs/create"),
        ("GET", "/v1.41/tasks?filters=%7B%7D"),
        ("GET", "/v1.41/%73warm"),
    ],
)
def test_swarm_is_denied_reads_and_writes(area: Path, method: str, uri: str) -> None:
    assert_denied(judge(area, method, uri), "swarm")


@pytest.mark.parametrize(
    "uri",
    [
        "/v1.41/plugins/pull?remote=vieux/sshfs",
        "/v1.41/plugins/create?name=x",
        "/v1.41/plugins/vieux/sshfs/enable",
        "/v1.41/plugins/vieux/sshfs/upgrade?remote=x",
        "/v1.41/plugins/vieux/sshfs/set",
    ],
)
def test_plugin_changes_are_denied(area: Path, uri: str) -> None:
    assert_denied(judge(area, "POST", uri), "plugins")


# ---- bodies the policy cannot read -------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "/v1.41/containers/create",
        "/v1.41/containers/web/exec",
        "/v1.41/volumes/create",
        "/v1.41/networks/create",
        "/v1.41/containers/web/update",
    ],
)
def test_body_carrying_requests_without_a_body_are_denied(area: Path, uri: str) -> None:
    assert_denied(judge(area, "POST", uri, None), "body", "Content-Type: application/json")


@pytest.mark.parametrize(
    "host_config",
    [
        {"Binds": "/etc:/x"},
        {"CapAdd": "SYS_ADMIN"},
        {"SecurityOpt": [1]},
        {"Mounts": ["/etc:/x"]},
        {"PidMode": ["host"]},
    ],
)
def test_fields_of_unexpected_types_are_denied(area: Path, host_config: dict[str, Any]) -> None:
    assert_denied(create(area, **host_config), "unexpected type")
    assert_denied(judge(area, "POST", "/containers/create", {"HostConfig": "x"}))


# ---- decoding what dockerd posts ---------------------------------------------------------------


def _call(body: bytes | None, **extra: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "User": "",
        "RequestMethod": "POST",
        "RequestUri": "/v1.41/containers/create",
        "RequestHeaders": {"Content-Type": "application/json"},
    }
    if body is not None:
        payload["RequestBody"] = base64.b64encode(body).decode()
    payload.update(extra)
    return payload


def test_plugin_call_body_is_decoded_and_folded(area: Path) -> None:
    request = request_from_plugin_call(_call(b'{"HostConfig": {"Privileged": true}}'))
    assert request.body == {"hostconfig": {"privileged": True}}
    assert_denied(evaluate(request, area), "--privileged")


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_unreadable_bodies_are_denied_with_the_reason(area: Path, raw: bytes) -> None:
    request = request_from_plugin_call(_call(raw))
    assert request.body is None
    assert_denied(evaluate(request, area), "not a JSON object")


def test_a_call_without_method_or_uri_is_refused() -> None:
    # dockerd re-sends an emptied body when it retries a call: that must never read as "allow".
    with pytest.raises(ValueError):
        request_from_plugin_call({})
    with pytest.raises(ValueError):
        request_from_plugin_call(_call(None, RequestUri=""))


def test_split_uri_strips_the_version_and_keeps_the_query() -> None:
    assert split_uri("/v1.41/build?t=a&cgroupparent=x") == (
        "/build",
        {"t": ["a"], "cgroupparent": ["x"]},
    )
    assert split_uri("/_ping")[0] == "/_ping"
    assert split_uri("/v1.41")[0] == "/"


def test_deeply_nested_bodies_are_denied(area: Path) -> None:
    raw = b'{"HostConfig": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    request = request_from_plugin_call(_call(raw))
    assert_denied(evaluate(request, area), "nested too deeply")


def test_unreadable_uris_are_denied(area: Path) -> None:
    assert_denied(judge(area, "GET", "http://[broken/v1.41/info"), "URI")
