"""The runner-side policy's rules: the second wall in front of a session engine.

Isolation comes from the sandbox each session engine runs in (its own user namespace, private root
filesystem and other namespaces), so everything local Docker allows passes: privileged containers,
host namespaces, devices, any capability or security profile, any bind source (`-v /:/host` shows
the sandbox's root), any driver, plugins and swarm.  Where dockerd itself refuses a request (an
unknown log driver, `swarm leave` outside a swarm), the policy lets it through so that the user gets
dockerd's own error, exactly as from a local engine.

The wall refuses only what could still reach the runner through dockerd's legacy code paths: a
request whose path names an API version below `MIN_API_VERSION`.  dockerd 20.10 still serves
versions down to 1.12 with their old behaviours (a body on `POST /containers/ID/start` carrying
host config, and other shapes no current client sends); 1.24 is the minimum of current engines.

`evaluate()` is the one decision function.  It reads the request URI the way dockerd's router does:
the decoded path (`%2E` is `.`), of an origin-form or absolute-form target
(`http://x/v1.23/containers/create`), cleaned (`//`, `.`, `..`), then an optional `/v<version>`
prefix whose version dockerd compares component by component as integers (`1.9` < `1.24`).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

MIN_API_VERSION = "1.24"

# ---- request and decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthzRequest:
    """One API request as dockerd describes it to an authorization plugin."""

    method: str
    uri: str  # raw request URI: may be absolute-form, carry /v1.NN, a query, percent-escapes


@dataclass(frozen=True)
class Decision:
    allow: bool
    msg: str = ""
    rule: str = ""  # short rule id for logs; never request content

    @classmethod
    def allowed(cls) -> Decision:
        return cls(True)


def request_from_plugin_call(payload: Mapping[str, Any]) -> AuthzRequest:
    """Build an `AuthzRequest` from the JSON dockerd posts to /AuthZPlugin.AuthZReq.

    Raises ValueError when the call lacks the method or URI: dockerd re-sends an emptied body when
    it retries a call, and such a call must fail rather than be judged as an empty request.
    The request body is not read: no rule needs it.
    """
    method = payload.get("RequestMethod")
    uri = payload.get("RequestUri", payload.get("RequestURI"))
    if not isinstance(method, str) or not method or not isinstance(uri, str) or not uri:
        raise ValueError("the authorization request has no RequestMethod or RequestUri")
    return AuthzRequest(method=method, uri=uri)


# ---- reading the URI as dockerd's router does ----------------------------------------------------

# Go's url.ParseRequestURI: a scheme is a letter, then letters, digits, `+`, `-` or `.`.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
# moby's router: `/v{version:[0-9.]+}` before every route.  `V` is read too: such a path never
# routes, so refusing it costs nothing.
_VERSION_PREFIX = re.compile(r"^/[vV]([0-9.]+)(?=/|$)")


def _raw_path(uri: str) -> str:
    """The still-encoded path of a request target, split as Go's net/http splits it."""
    rest = uri.partition("?")[0]  # Go splits the query off first, at the first `?`
    if rest.startswith("/"):
        return rest  # origin form; `//x/...` is a path here, not an authority
    scheme = _SCHEME.match(rest)
    if scheme is None:
        # Go refuses such a target with 400 before any routing; read it as a path all the same.
        return "/" + rest
    rest = rest[scheme.end() :]
    if rest.startswith("//"):  # absolute form: the authority runs to the next `/`
        slash = rest.find("/", 2)
        return rest[slash:] if slash >= 0 else "/"
    # Go takes `http:v1.23/...` for an opaque URL with an empty path (it never routes): read the
    # rest as a path, so that nothing version-like escapes the check.
    return "/" + rest


def split_uri(uri: str) -> tuple[str, str]:
    """(API version or "", path after it) of a request URI, as dockerd's router reads it."""
    path = posixpath.normpath("/" + unquote(_raw_path(uri)).lstrip("/"))
    match = _VERSION_PREFIX.match(path)
    if match is None:
        return "", path
    return match.group(1), path[match.end() :] or "/"


# ---- comparing versions as moby's api/types/versions does ----------------------------------------

_GO_MAX_INT = 2**63 - 1
_INT_DIGITS = len(str(_GO_MAX_INT))


def _go_atoi(text: str) -> int:
    # strconv.Atoi as moby calls it (errors ignored): "" gives 0, out of range gives MaxInt64.
    digits = text.lstrip("0")
    if not digits:
        return 0
    if len(digits) > _INT_DIGITS:
        return _GO_MAX_INT  # also keeps Python's int() digit limit out of the way
    return min(int(digits), _GO_MAX_INT)


def version_less_than(version: str, other: str) -> bool:
    """moby's versions.LessThan: dot-separated integer components, missing ones read as 0."""
    ours, theirs = version.split("."), other.split(".")
    for i in range(max(len(ours), len(theirs))):
        a = _go_atoi(ours[i]) if i < len(ours) else 0
        b = _go_atoi(theirs[i]) if i < len(theirs) else 0
        if a != b:
            return a < b
    return False


# ---- the rule ----------------------------------------------------------------------------------


def too_old_message(version: str) -> str:
    """dockerd's own words for a client below its minimum API version."""
    return (
        f"client version {version} is too old. Minimum supported API version is "
        f"{MIN_API_VERSION}, please upgrade your client to a newer version"
    )


def evaluate(request: AuthzRequest, mount_area: Path | None = None) -> Decision:
    """Allow or deny one API request of a session engine.

    `mount_area` is not used any more: the sandbox, not the policy, confines bind sources.
    """
    version, _ = split_uri(request.uri)
    if version and version_less_than(version, MIN_API_VERSION):
        return Decision(False, too_old_message(version), "api-version-too-old")
    return Decision.allowed()
