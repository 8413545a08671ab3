"""Pure parts of the port forwards: the UDP framing, the channel path, reading the engine's port
list, and how laptop sockets are bound (no engine needed)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.agent.ports import bind_socket, wanted_ports
from offload.agent.udp_relay import (
    DatagramDecoder,
    frame_datagram,
    parse_udp_channel_path,
    read_datagram,
    udp_channel_path,
)
from offload.runner.port_gate import published_from_containers

from .support import free_ports

CONTAINERS = [
    {
        "Id": "a" * 64,
        "Names": ["/web"],
        "Ports": [
            {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
            {"IP": "::", "PrivatePort": 80, "PublicPort": 18080, "Type": "tcp"},
            {"PrivatePort": 443, "Type": "tcp"},  # exposed, not published
        ],
    },
    {
        "Id": "b" * 64,
        "Names": ["/proj_dns_1"],
        "Ports": [
            {"IP": "127.0.0.1", "PrivatePort": 53, "PublicPort": 15353, "Type": "udp"},
            {"IP": "", "PrivatePort": 8125, "PublicPort": 18125, "Type": "udp"},
            {"IP": "0.0.0.0", "PrivatePort": 9, "PublicPort": 19, "Type": "sctp"},
        ],
    },
    {"Id": "c" * 64, "Names": ["/quiet"], "Ports": None},
]


@given(st.lists(st.binary(max_size=3000), max_size=20), st.data())
def test_framing_survives_any_split_of_the_stream(
    datagrams: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frame_datagram(d) for d in datagrams)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = DatagramDecoder()
    decoded: list[bytes] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += decoder.feed(stream[start:end])
    assert decoded == datagrams


async def test_read_datagram_ends_cleanly_at_end_of_stream() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(frame_datagram(b"one") + frame_datagram(b"") + frame_datagram(b"x" * 65535))
    reader.feed_data(frame_datagram(b"cut")[:3])
    reader.feed_eof()
    assert [await read_datagram(reader) for _ in range(4)] == [b"one", b"", b"x" * 65535, None]


def test_udp_channel_paths() -> None:
    assert parse_udp_channel_path(udp_channel_path(5353)) == 5353
    for path in ("/docker.sock", "/udp/", "/udp/0", "/udp/65536", "/udp/53/x", "/udp/-1", "udp/53"):
        assert parse_udp_channel_path(path) is None


def test_wanted_ports_mirror_what_docker_binds() -> None:
    wanted = wanted_ports(CONTAINERS)
    assert sorted(wanted) == [
        ("tcp", "0.0.0.0", 18080),
        ("tcp", "::", 18080),
        ("udp", "0.0.0.0", 18125),  # an empty IP (older engines) means all addresses
        ("udp", "127.0.0.1", 15353),
    ]
    dns = wanted[("udp", "127.0.0.1", 15353)]
    assert (dns.container_name, dns.private_port) == ("proj_dns_1", 53)
    assert published_from_containers(CONTAINERS) == {
        ("tcp", 18080),
        ("udp", 15353),
        ("udp", 18125),
    }


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_a_port_in_use_is_never_shared(proto: str) -> None:
    (port,) = free_ports(1)
    first = bind_socket(proto, "0.0.0.0", port)
    try:
        with pytest.raises(OSError) as caught:
            bind_socket(proto, "0.0.0.0", port)
        assert caught.value.errno == 98  # EADDRINUSE: reported as a conflict
    finally:
        first.close()


def test_v4_and_v6_listeners_are_separate_like_docker_proxy() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    (port,) = free_ports(1)
    v4 = bind_socket("tcp", "0.0.0.0", port)
    try:
        v6 = bind_socket("tcp", "::", port)  # v6-only, so both fit
        v6.close()
    finally:
        v4.close()
