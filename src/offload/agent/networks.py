"""Bridge networks a client creates get the sandbox's MTU, as the default bridge has.

The session's engine is Debian's dockerd 20.10, whose daemon-wide `mtu` applies to the default
bridge only (`default-network-opts` came with 24.0): a user-defined network, compose's included,
gets 1500, at which a container downloads at about a tenth of the default bridge's speed
through the sandbox's network helper. So the agent adds `com.docker.network.driver.mtu` to a
`POST /networks/create` for the bridge driver that names no MTU of its own; `docker network
inspect` then shows that option, as it shows the default bridge's. Anything else (another
driver, an MTU of the client's, a body that is not a JSON object) goes on unchanged, and the
engine answers it as it would.
"""

from __future__ import annotations

import json
import re
from typing import Any

from offload.core.defaults import SANDBOX_MTU
from offload.core.go_keys import fold_key

MTU_OPTION = "com.docker.network.driver.mtu"
NETWORK_CREATE = re.compile(rb"(?:/v[0-9][0-9.]*)?/networks/create(?:\?.*)?")


def with_sandbox_mtu(body: bytes, mtu: int = SANDBOX_MTU) -> bytes:
    """The create body to send instead (`body` itself when nothing changes)."""
    try:
        spec = json.loads(body)
    except ValueError:
        return body
    if not isinstance(spec, dict):
        return body
    # dockerd decodes the body's keys case-insensitively (Go's encoding/json, `fold_key`), the
    # last match winning: read and write the key the client spelled, never add a second one.
    driver_key = _key(spec, "Driver")
    if driver_key is not None and spec[driver_key] not in (None, "", "bridge"):
        return body
    options_key = _key(spec, "Options") or "Options"
    options = spec.get(options_key)
    if options is None:
        options = {}
    if not isinstance(options, dict) or MTU_OPTION in options:
        return body
    spec[options_key] = {**options, MTU_OPTION: str(mtu)}
    return json.dumps(spec).encode()


def _key(spec: dict[str, Any], name: str) -> str | None:
    """The last key of `spec` that dockerd would read as `name`."""
    wanted, found = fold_key(name), None
    for key in spec:
        if fold_key(key) == wanted:
            found = key
    return found
