"""Bridge networks get the sandbox's MTU unless the client chose one; all else goes on as sent."""

from __future__ import annotations

import json

import pytest

from offload.agent.networks import MTU_OPTION, with_sandbox_mtu
from offload.core.defaults import SANDBOX_MTU

MTU = str(SANDBOX_MTU)


def _sent(spec: object) -> object:
    return json.loads(with_sandbox_mtu(json.dumps(spec).encode()))


@pytest.mark.parametrize(
    "spec",
    [
        {"Name": "n"},  # the CLI's `docker network create n` omits nothing it needs
        {"Name": "n", "Driver": "bridge"},
        {"Name": "n", "Driver": "", "Options": None},
        {"Name": "n", "Driver": None, "Options": {}},
    ],
)
def test_a_bridge_network_without_an_mtu_gets_the_sandboxs(spec: dict[str, object]) -> None:
    sent = _sent(spec)
    assert isinstance(sent, dict)
    assert sent["Options"] == {MTU_OPTION: MTU}
    assert {k: v for k, v in sent.items() if k != "Options"} == {
        k: v for k, v in spec.items() if k != "Options"
    }


def test_the_clients_other_options_are_kept() -> None:
    spec = {"Name": "n", "Options": {"com.docker.network.bridge.name": "br-app"}}
    assert _sent(spec) == {
        "Name": "n",
        "Options": {"com.docker.network.bridge.name": "br-app", MTU_OPTION: MTU},
    }


def test_odd_key_spellings_are_written_where_dockerd_reads_them() -> None:
    """dockerd matches keys case-insensitively, the last one winning: a second spelling added
    by the agent would replace the client's options."""
    spec = {"name": "n", "driver": "bridge", "options": {"a": "1"}}
    assert _sent(spec) == {"name": "n", "driver": "bridge", "options": {"a": "1", MTU_OPTION: MTU}}
    # Two spellings: dockerd reads the last; so does the agent, and leaves the first alone.
    raw = b'{"Name":"n","Options":{"x":"1"},"OPTIONS":{"y":"2"}}'
    sent = with_sandbox_mtu(raw)
    assert sent.count(b'"Options"') == 1 and sent.count(b'"OPTIONS"') == 1
    assert json.loads(sent)["OPTIONS"] == {"y": "2", MTU_OPTION: MTU}
    # A driver spelled twice: dockerd reads the last ("macvlan"): not a bridge.
    raw = b'{"Name":"n","Driver":"bridge","driver":"macvlan"}'
    assert with_sandbox_mtu(raw) == raw


@pytest.mark.parametrize(
    "raw",
    [
        b'{"Name":"n","Options":{"com.docker.network.driver.mtu":"1400"}}',  # the client's MTU
        b'{"Name":"n","Driver":"macvlan"}',
        b'{"Name":"n","Driver":"overlay","Attachable":true}',
        b'{"Name":"n","Options":"mtu=9000"}',  # not an object: the engine's own error
        b'["not", "an", "object"]',
        b"{not json",
        b"",
    ],
)
def test_everything_else_goes_on_byte_for_byte(raw: bytes) -> None:
    assert with_sandbox_mtu(raw) is raw
