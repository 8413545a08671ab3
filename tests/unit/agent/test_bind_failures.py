"""What `offload status` says when a published port cannot be bound on the laptop."""

from __future__ import annotations

import errno

from offload.agent.ports import _bind_failure


def test_a_privileged_port_names_both_ways_out() -> None:
    message = _bind_failure(OSError(errno.EACCES, "Permission denied"), 80)
    assert "-p 8080:" in message
    assert "net.ipv4.ip_unprivileged_port_start=80" in message


def test_a_taken_port_and_a_missing_address_say_so() -> None:
    assert "already in use" in _bind_failure(OSError(errno.EADDRINUSE, "in use"), 8080)
    assert "no such address" in _bind_failure(OSError(errno.EADDRNOTAVAIL, "n/a"), 8080)
