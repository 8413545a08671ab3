"""The policy's GPU rule: what `--gpus` sends (`DeviceRequests`), in the shapes the docker CLI
sends and in the odd ones a raw API client can send, read the way dockerd's Go decoder reads
them."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.runner.gpus import SandboxGpu
from offload.runner.policy_rules import (
    NO_GPU_MESSAGE,
    AuthzRequest,
    Decision,
    evaluate,
    request_from_plugin_call,
)

GPU = SandboxGpu(0, "GPU-5d1c7e2a-0000-4000-8000-00000000a0a0", "NVIDIA H200", "/dev/nvidia3")
OTHER = "GPU-99999999-0000-4000-8000-00000000b0b0"
ALL = {"Driver": "", "Count": -1, "DeviceIDs": None, "Capabilities": [["gpu"]]}


def create(
    body: Any, gpus: tuple[SandboxGpu, ...] = (GPU,), uri: str = "/v1.41/containers/create"
) -> Decision:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    call = {
        "RequestMethod": "POST",
        "RequestUri": uri,
        "RequestHeaders": {"Content-Type": "application/json", "Content-Length": str(len(raw))},
        "RequestBody": base64.b64encode(raw).decode(),
    }
    return evaluate(request_from_plugin_call(call), None, gpus)


def with_requests(*requests: Any, **extra: Any) -> dict[str, Any]:
    return {"Image": "x", "HostConfig": {"DeviceRequests": list(requests)}, **extra}


def assert_denied(decision: Decision, rule: str, *words: str) -> None:
    assert not decision.allow, decision
    assert decision.rule == rule
    assert decision.msg.startswith("Offload policy: ")
    for word in words:
        assert word in decision.msg, (word, decision.msg)


# ---- a session without a GPU -----------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        with_requests(ALL),  # docker run --gpus all
        with_requests({"Count": 1, "Capabilities": [["gpu"]]}),
        with_requests({"DeviceIDs": ["0"], "Capabilities": [["gpu"]]}),
        with_requests({"Driver": "nvidia"}),
        with_requests(None),  # Go decodes null into an empty request
        {"hostconfig": {"devicerequests": [ALL]}},  # Go matches keys case-insensitively
        {"HOSTCONFIG": {"DEVICEREQUESTS": [ALL]}},
        {"HostConfig": {"DeviceReque\u017fts": [ALL]}},  # U+017F LONG S folds to "s"
        {"Image": "x", "DeviceRequests": [ALL]},  # the flat legacy shape, no HostConfig
        {"Image": "x", "HostConfig": None, "DeviceRequests": [ALL]},
        # Repeated keys: Go decodes both into the same struct; each is checked.
        {"HostConfig": {"DeviceRequests": [ALL]}, "hostconfig": {"Privileged": True}},
        {"HostConfig": {"DeviceRequests": [ALL], "devicerequests": []}},
    ],
)
def test_a_session_without_a_gpu_is_told_how_to_get_one(body: Any) -> None:
    assert_denied(create(body, gpus=()), "gpu-none-in-session", NO_GPU_MESSAGE)
    assert "docker offload start --gpu" in NO_GPU_MESSAGE


def test_the_first_json_value_is_what_counts_as_for_dockerds_decoder() -> None:
    first = json.dumps(with_requests(ALL)).encode()
    assert_denied(create(first + b' {"Image": "x"}', gpus=()), "gpu-none-in-session")
    assert_denied(create(b" \n\t" + first + b"trailing", gpus=()), "gpu-none-in-session")
    # The trailing value is never decoded by dockerd: nothing to refuse there.
    plain = json.dumps({"Image": "x"}).encode()
    assert create(plain + b" " + first, gpus=()).allow


@pytest.mark.parametrize(
    "body",
    [
        {"Image": "x"},
        {"Image": "x", "HostConfig": {"DeviceRequests": []}},
        {"Image": "x", "HostConfig": {"DeviceRequests": None}},
        {"Image": "x", "HostConfig": {"Devices": [{"PathOnHost": "/dev/nvidia0"}]}},
        [1, 2],  # not an object: dockerd's own error
        None,
    ],
)
def test_creates_without_a_gpu_request_pass(body: Any) -> None:
    assert create(body, gpus=()).allow


# ---- a GPU session ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        ALL,
        {"Count": 1, "Capabilities": [["gpu"]]},  # --gpus 1
        {"Count": 0},
        {"Count": -7},  # dockerd reads any negative count as "all"
        {"DeviceIDs": ["0"], "Capabilities": [["gpu"]]},  # --gpus device=0
        {"DeviceIDs": [GPU.uuid]},
        {"DeviceIDs": [GPU.uuid.lower()]},
        {"DeviceIDs": ["0", GPU.uuid]},
        {"DeviceIDs": ["all"]},
        {"deviceids": ["0"], "count": 1},  # both: dockerd's own error, nothing foreign asked
    ],
)
def test_a_gpu_session_may_ask_for_its_gpus(request_: dict[str, Any]) -> None:
    assert create(with_requests(request_)).allow


@pytest.mark.parametrize(
    ("body", "asked"),
    [
        (with_requests({"DeviceIDs": ["1"]}), "'1'"),  # --gpus device=1
        (with_requests({"DeviceIDs": [OTHER]}), repr(OTHER)),
        (with_requests({"DeviceIDs": ["0,1"]}), "'1'"),  # dockerd joins ids with commas
        (with_requests({"DeviceIDs": ["0", "3"]}), "'3'"),
        (with_requests({"DeviceIDs": ["0:0"]}), "'0:0'"),  # a MIG device
        (with_requests({"DeviceIDs": ["00"]}), "'00'"),
        (with_requests(ALL, Env=[f"NVIDIA_VISIBLE_DEVICES={OTHER}"]), repr(OTHER)),
        ({"Image": "x", "DeviceRequests": [{"DeviceIDs": ["2"]}]}, "'2'"),
        (
            {
                "HostConfig": {"DeviceRequests": [{"DeviceIDs": ["0"]}]},
                "hostconfig": {"DeviceRequests": [{"DeviceIDs": ["5"]}]},
            },
            "'5'",
        ),  # fmt: skip
    ],
)
def test_another_gpu_is_refused_naming_the_sessions_own(body: Any, asked: str) -> None:
    assert_denied(
        create(body),
        "gpu-not-the-sessions",
        f"GPU {asked} is not this session's",
        "NVIDIA H200",
        GPU.uuid,
        "`--gpus all`",
        "`--gpus device=0`",
    )


def test_more_gpus_than_the_session_has_are_refused() -> None:
    assert_denied(
        create(with_requests({"Count": 2})), "gpu-count", "2 GPUs asked for", "`--gpus 1`"
    )
    two = (GPU, SandboxGpu(1, OTHER, "NVIDIA H200", "/dev/nvidia5"))
    assert create(with_requests({"Count": 2}), gpus=two).allow
    assert create(with_requests({"DeviceIDs": ["1", OTHER]}), gpus=two).allow
    assert_denied(create(with_requests({"Count": 3}), gpus=two), "gpu-count", "2 GPUs (0: ")


@pytest.mark.parametrize(
    "body",
    [
        with_requests({"Count": "1"}),
        with_requests({"Count": True}),
        with_requests({"Count": 1.0}),
        with_requests({"Count": 2**63}),
        with_requests({"DeviceIDs": "0"}),
        with_requests({"DeviceIDs": [0]}),
        with_requests("all"),
        {"HostConfig": {"DeviceRequests": {"Count": -1}}},
        {"HostConfig": [ALL]},
        with_requests(ALL, Env="NVIDIA_VISIBLE_DEVICES=1"),
    ],
)
def test_odd_types_fail_closed(body: Any) -> None:
    assert_denied(create(body), "malformed-body", "unexpected type")


def test_an_unreadable_body_fails_closed() -> None:
    assert_denied(create(b'{"HostConfig": {"DeviceRequests": [', gpus=()), "malformed-body")
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000  # Go reads 10,000 levels; Python far fewer
    assert_denied(create(deep, gpus=()), "malformed-body", "not readable JSON")


def test_a_body_dockerd_withheld_is_refused() -> None:
    """Over 1 MiB (chunked or not): dockerd shows the plugin no body."""
    for headers in (
        {"Content-Type": "application/json", "Content-Length": str(2 * 1024**2)},
        {"Content-Type": "application/json; charset=utf-8"},  # chunked, over 1 MiB
        {"content-type": "Application/JSON"},
    ):
        call = {"RequestMethod": "POST", "RequestUri": "/containers/create",
                "RequestHeaders": headers}  # fmt: skip
        assert_denied(evaluate(request_from_plugin_call(call)), "body-unseen", "1 MiB")
    for headers in ({}, {"Content-Type": "application/json", "Content-Length": "0"},
                    {"Content-Type": "text/plain", "Content-Length": "10"}):  # fmt: skip
        call = {"RequestMethod": "POST", "RequestUri": "/containers/create",
                "RequestHeaders": headers}  # fmt: skip
        assert evaluate(request_from_plugin_call(call)).allow  # dockerd's own answer


def test_only_creates_are_read_and_old_versions_stay_refused() -> None:
    body = with_requests({"DeviceIDs": ["1"]})
    for uri in ("/v1.41/containers/abc/update", "/v1.41/services/create", "/v1.41/build"):
        assert create(body, uri=uri).allow
    for uri in ("/containers/create", "/v1.24/containers//create", "/v1%2E41/containers/create",
                "http://x/v1.41/containers/create?name=a"):  # fmt: skip
        assert not create(body, uri=uri).allow, uri
    assert create(body, uri="/v1.23/containers/create").rule == "api-version-too-old"
    assert not evaluate(AuthzRequest("post", "/containers/create",
                                     json.dumps(body).encode()), None, (GPU,)).allow  # fmt: skip


@given(ids=st.lists(st.text(max_size=12), max_size=4), count=st.integers(-5, 5))
def test_any_gpu_request_is_decided_by_its_ids_and_count(ids: list[str], count: int) -> None:
    decision = create(with_requests({"DeviceIDs": ids, "Count": count}))
    pieces = [p.strip().lower() for i in ids for p in i.split(",")]
    ours = {"0", GPU.uuid.lower(), "", "all", "none", "void"}
    assert decision.allow is (count <= 1 and all(p in ours for p in pieces))
