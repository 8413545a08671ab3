"""HTTP clients for a Docker Engine's unix socket.

The socket speaks plain HTTP, so the transport never needs TLS. httpx builds a TLS context for
every transport unless told otherwise, and loading the CA bundle takes about 20 ms of event-loop
time: on the runner, each port-gate refresh stalled every session's forwards that long
(bench/ports.py p99).
"""

from __future__ import annotations

from pathlib import Path

import httpx


def engine_client(
    socket: Path | str, timeout: float | httpx.Timeout, base_url: str = "http://docker"
) -> httpx.AsyncClient:
    """An httpx client for the engine listening on unix socket `socket`."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket), verify=False),
        base_url=base_url,
        timeout=timeout,
    )
