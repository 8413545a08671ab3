"""The policy's rules (`evaluate`): a second wall that refuses only API versions below 1.24."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.runner.policy import AuthzRequest, Decision, evaluate
from offload.runner.policy_rules import (
    MIN_API_VERSION,
    request_from_plugin_call,
    split_uri,
    too_old_message,
    version_less_than,
)

AREA = Path("/nonexistent/mount-area")  # evaluate no longer looks at it

# dockerd 20.10's own words (api/server/middleware/version.go), for a client below its minimum.
DOCKERD_TOO_OLD = (
    "client version {} is too old. Minimum supported API version is 1.24, "
    "please upgrade your client to a newer version"
)


def judge(method: str, uri: str) -> Decision:
    return evaluate(AuthzRequest(method=method, uri=uri), AREA)


def assert_too_old(decision: Decision, version: str) -> None:
    assert not decision.allow
    assert decision.msg == DOCKERD_TOO_OLD.format(version)
    assert decision.rule == "api-version-too-old"


# ---- old versions are refused, however the path is spelled -------------------------------------


@pytest.mark.parametrize(
    ("uri", "version"),
    [
        ("/v1.23/containers/create", "1.23"),
        ("/v1.23/_ping", "1.23"),
        ("/v1.23", "1.23"),
        ("/v1.23/", "1.23"),
        ("/v1.12/containers/abc/start", "1.12"),
        ("/v1.9/containers/json", "1.9"),  # 9 < 24: components compare as integers
        ("/v1.0/version", "1.0"),
        ("/v1/info", "1"),
        ("/v0.99/info", "0.99"),
        ("/v1.23.0/containers/create", "1.23.0"),
        ("/v1.23.99/containers/create", "1.23.99"),
        ("/v01.023/containers/create", "01.023"),  # Atoi("023") is 23
        ("/v1..24/containers/create", "1..24"),  # an empty component is 0
        ("/v./containers/create", "."),
        ("/v1.23/containers/create?name=x&v1.41=1", "1.23"),
        ("/v1%2E23/containers/create", "1.23"),  # the router reads the decoded path
        ("/v1%2e23/containers/create", "1.23"),
        ("/%76%31%2E%32%33/containers/create", "1.23"),
        ("/v1.23%2Fcontainers%2Fcreate", "1.23"),
        ("//v1.23/containers/create", "1.23"),
        ("///v1.23//containers//create", "1.23"),
        ("/./v1.23/containers/create", "1.23"),
        ("/v1.41/../v1.23/containers/create", "1.23"),
        ("/x/../v1.23/containers/create", "1.23"),
        ("http://x/v1.23/containers/create", "1.23"),
        ("HTTP://x/v1.23/containers/create", "1.23"),
        ("http://docker.sock//v1.23/containers/create", "1.23"),
        ("http://x:2375/v1%2E23/containers/create?v=1.41", "1.23"),
        ("unix://x/v1.0/containers/create", "1.0"),
        ("/V1.23/containers/create", "1.23"),  # never routed by dockerd; refused all the same
    ],
)
def test_versions_below_1_24_are_refused_in_any_spelling(uri: str, version: str) -> None:
    for method in ("GET", "POST", "DELETE", "HEAD"):
        assert_too_old(judge(method, uri), version)


@given(
    minor=st.integers(0, 23),
    patch=st.one_of(st.none(), st.integers(0, 10**30)),
    zeros=st.text("0", max_size=3),
    route=st.sampled_from(["/containers/create", "/containers/x/start", "/_ping", "/swarm/init"]),
)
def test_every_1_x_below_24_is_refused(
    minor: int, patch: int | None, zeros: str, route: str
) -> None:
    version = f"1.{zeros}{minor}" + ("" if patch is None else f".{patch}")
    assert_too_old(judge("POST", f"/v{version}{route}"), version)
    encoded = "/" + "".join(f"%{byte:02X}" for byte in f"v{version}".encode())
    assert_too_old(judge("POST", f"{encoded}{route}"), version)
    assert_too_old(judge("POST", f"http://engine{encoded}{route}"), version)


@given(version=st.from_regex(r"\A[0-9.]{1,12}\Z"))
def test_any_dotted_version_is_judged_by_dockers_comparison(version: str) -> None:
    decision = judge("POST", f"/v{version}/containers/create")
    assert decision.allow is not version_less_than(version, MIN_API_VERSION)
    if not decision.allow:
        assert decision.msg == DOCKERD_TOO_OLD.format(version)


def test_a_huge_version_component_is_read_like_go() -> None:
    # strconv.Atoi saturates at MaxInt64 (moby ignores its error): no Python digit limit either.
    huge = "9" * 5000
    assert judge("GET", f"/v1.{huge}/info").allow
    assert judge("GET", f"/v{huge}/info").allow
    assert_too_old(judge("GET", f"/v0.{huge}/info"), f"0.{huge}")


# ---- new versions and unversioned paths pass ---------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "/_ping",
        "/version",
        "/containers/create",
        "/containers/json?all=1",
        "/v1.24/containers/create",
        "/v1.24.0/containers/create",
        "/v1.25/containers/abc/start",
        "/v1.41/containers/create",
        "/v1.99/containers/create",  # too new: dockerd answers that itself
        "/v2/containers/create",
        "/v1.100/info",
        "/v1%2E41/containers/create",
        "http://x/v1.41/containers/create",
        "http://x",
        "http://x?/v1.23/containers/create",  # the query, not the path
        "/containers/json?version=/v1.23/",
        "/v1.41/containers/v1.23/json",  # only a leading prefix is a version
        "/v1.23x/containers/create",  # no route matches this: dockerd's own 404
        "/v/containers/create",
        "/vv1.23/containers/create",
    ],
)
def test_versions_from_1_24_and_unversioned_paths_are_allowed(uri: str) -> None:
    for method in ("GET", "POST", "PUT", "DELETE", "HEAD"):
        decision = judge(method, uri)
        assert decision.allow, (method, uri, decision)
        assert decision.msg == ""


@given(
    version=st.tuples(st.integers(1, 3), st.integers(24, 10**6)).map(lambda v: f"{v[0]}.{v[1]}"),
    route=st.sampled_from(["/containers/create", "/swarm/leave", "/plugins/pull", "/build"]),
)
def test_every_version_from_1_24_is_allowed(version: str, route: str) -> None:
    assert judge("POST", f"/v{version}{route}").allow


# Bodies dockerd serves on a local engine, which the old deny-list refused: the sandbox confines
# them now.  Only a create's GPU request is read (test_policy_gpus.py): without a body, the
# decision is the version's.
@pytest.mark.parametrize(
    ("method", "route"),
    [
        ("POST", "/containers/create"),  # privileged, host namespaces, `-v /:/host`, devices...
        ("POST", "/containers/abc/update"),
        ("POST", "/containers/abc/exec"),  # exec --privileged
        ("POST", "/containers/abc/start"),  # a body here is dockerd's own 400 at >= 1.24
        ("POST", "/volumes/create"),
        ("POST", "/networks/create"),  # macvlan, ipvlan...
        ("POST", "/build?cgroupparent=/x"),
        ("POST", "/swarm/init"),
        ("POST", "/swarm/leave?force=1"),
        ("POST", "/services/create"),
        ("POST", "/secrets/create"),
        ("POST", "/configs/create"),
        ("GET", "/nodes"),
        ("GET", "/tasks"),
        ("POST", "/plugins/pull?remote=x"),
        ("POST", "/plugins/x/enable"),
    ],
)
def test_what_local_docker_allows_passes(method: str, route: str) -> None:
    for prefix in ("", "/v1.24", "/v1.41"):
        assert judge(method, prefix + route).allow
    assert_too_old(judge(method, "/v1.23" + route), "1.23")


def test_plugin_calls_are_read_whatever_body_they_carry() -> None:
    privileged = {
        "RequestMethod": "POST",
        "RequestUri": "/v1.41/containers/create",
        "RequestBody": "eyJIb3N0Q29uZmlnIjp7IlByaXZpbGVnZWQiOnRydWV9fQ==",  # Privileged: true
        "RequestHeaders": {"Content-Type": "application/json"},
    }
    assert evaluate(request_from_plugin_call(privileged), AREA).allow
    # A call whose body is not base64 (dockerd always sends base64) is read; a create that
    # carries one fails closed (its GPU request cannot be checked), anything else passes.
    not_json = {**privileged, "RequestBody": "not base64 at all!"}
    refused = evaluate(request_from_plugin_call(not_json), AREA)
    assert (refused.allow, refused.rule) == (False, "malformed-call")
    assert "is not base64 text" in refused.msg
    volume = {**not_json, "RequestUri": "/v1.41/volumes/create"}
    assert evaluate(request_from_plugin_call(volume), AREA).allow
    old = {**privileged, "RequestUri": "/v1.12/containers/abc/start"}
    assert_too_old(evaluate(request_from_plugin_call(old), AREA), "1.12")
    legacy_key = {"RequestMethod": "GET", "RequestURI": "/v1.0/info"}
    assert_too_old(evaluate(request_from_plugin_call(legacy_key), AREA), "1.0")


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"RequestMethod": "GET"},
        {"RequestUri": "/v1.41/info"},
        {"RequestMethod": "", "RequestUri": "/v1.41/info"},
        {"RequestMethod": "GET", "RequestUri": ""},
        {"RequestMethod": "GET", "RequestUri": 7},
        {"RequestMethod": ["GET"], "RequestUri": "/v1.41/info"},
        {"RequestMethod": "GET", "RequestUri": None},
    ],
)
def test_a_call_without_method_or_uri_is_refused(payload: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="no RequestMethod or RequestUri"):
        request_from_plugin_call(payload)


# ---- the pieces ----------------------------------------------------------------------------------


def test_split_uri_reads_the_version_and_the_path_after_it() -> None:
    assert split_uri("/v1.41/build?t=a") == ("1.41", "/build")
    assert split_uri("/_ping") == ("", "/_ping")
    assert split_uri("/v1.41") == ("1.41", "/")
    assert split_uri("http://x:1/v1%2E41/containers//x/json") == ("1.41", "/containers/x/json")
    assert split_uri("http://x") == ("", "/")


@pytest.mark.parametrize(
    ("a", "b", "less"),
    [
        ("1.23", "1.24", True),
        ("1.9", "1.24", True),
        ("1.24", "1.24", False),
        ("1.24.0", "1.24", False),
        ("1.23.9", "1.24", True),
        ("1.100", "1.24", False),
        ("2", "1.24", False),
        ("", "1.24", True),
        ("1..", "1.24", True),
    ],
)
def test_versions_compare_like_mobys(a: str, b: str, less: bool) -> None:
    assert version_less_than(a, b) is less


def test_the_message_is_dockerds_own() -> None:
    assert too_old_message("1.23") == (
        "client version 1.23 is too old. Minimum supported API version is 1.24, please upgrade "
        "your client to a newer version"
    )


@given(uri=st.text(max_size=200))
def test_any_uri_gets_a_decision_and_never_an_exception(uri: str) -> None:
    decision = judge("GET", uri)
    version = split_uri(uri)[0]
    assert decision.allow is not (bool(version) and version_less_than(version, MIN_API_VERSION))
