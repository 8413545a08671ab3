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

GPUs (`DeviceRequests`, what `--gpus` sends) are the one thing it reads a body for: a session's
engine sees only its own GPUs whatever it is asked (the sandbox has no other device node), and
this rule says so clearly before the engine fails less clearly.  A session without a GPU is
told how to get one; a GPU session may ask for all of its GPUs, a count up to them, or device
ids that are its own (a UUID, or an index as its engine numbers them, from 0).  The create body
is read as dockerd reads it: only its first JSON value, keys matched case-insensitively with
Go's folding, `DeviceRequests` in `HostConfig` and also at the top level (the deprecated flat
shape dockerd still honours when `HostConfig` is absent).  Where a key repeats, Go merges the
occurrences (a repeated object decodes into the same struct, a repeated array into the same
elements), so every occurrence is checked: whatever dockerd ends up with is made of values
checked here.  dockerd sends the plugin a body only for `application/json` under 1 MiB: a
create whose body it withheld is refused, never waved through.

`evaluate()` is the one decision function.  It reads the request URI the way dockerd's router does:
the decoded path (`%2E` is `.`), of an origin-form or absolute-form target
(`http://x/v1.23/containers/create`), cleaned (`//`, `.`, `..`), then an optional `/v<version>`
prefix whose version dockerd compares component by component as integers (`1.9` < `1.24`).
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from offload.core.go_keys import fold_key
from offload.runner.gpus import SandboxGpu

MIN_API_VERSION = "1.24"

# ---- request and decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthzRequest:
    """One API request as dockerd describes it to an authorization plugin."""

    method: str
    uri: str  # raw request URI: may be absolute-form, carry /v1.NN, a query, percent-escapes
    body: bytes | None = None  # the body dockerd sent the plugin (None: it sent none)
    headers: Mapping[str, str] = field(default_factory=dict)
    body_error: str = ""  # set when the call's RequestBody was not base64


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
    The body is kept undecoded: only the GPU rule reads it, and only for a container create.
    """
    method = payload.get("RequestMethod")
    uri = payload.get("RequestUri", payload.get("RequestURI"))
    if not isinstance(method, str) or not method or not isinstance(uri, str) or not uri:
        raise ValueError("the authorization request has no RequestMethod or RequestUri")
    raw = payload.get("RequestHeaders")
    headers = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    body, error = _request_body(payload.get("RequestBody"))
    return AuthzRequest(method=method, uri=uri, body=body, headers=headers, body_error=error)


def _request_body(encoded: Any) -> tuple[bytes | None, str]:
    if encoded is None or encoded == "":
        return None, ""
    if not isinstance(encoded, str):
        return None, "the body is not base64 text"
    try:
        return base64.b64decode(encoded, validate=True) or None, ""
    except (binascii.Error, ValueError):
        return None, "the body is not base64 text"


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


def evaluate(
    request: AuthzRequest, mount_area: Path | None = None, gpus: Sequence[SandboxGpu] = ()
) -> Decision:
    """Allow or deny one API request of a session engine whose GPUs are `gpus`.

    `mount_area` is not used any more: the sandbox, not the policy, confines bind sources.
    """
    version, path = split_uri(request.uri)
    if version and version_less_than(version, MIN_API_VERSION):
        return Decision(False, too_old_message(version), "api-version-too-old")
    if request.method.upper() == "POST" and path == "/containers/create":
        return _check_create(request, gpus)
    return Decision.allowed()


# ---- GPUs: DeviceRequests of a container create ------------------------------------------------


class _Denied(Exception):
    def __init__(self, rule: str, msg: str) -> None:
        super().__init__(rule)
        self.decision = Decision(False, f"Offload policy: {msg}", rule)


NO_GPU_MESSAGE = "this session has no GPU; start one with `docker offload start --gpu`."
# What the toolkit reads from NVIDIA_VISIBLE_DEVICES as "no GPU" or "every GPU it has".
_HARMLESS_IDS = frozenset({"", "all", "none", "void"})


def _check_create(request: AuthzRequest, gpus: Sequence[SandboxGpu]) -> Decision:
    """A container create: the GPUs it asks for (`DeviceRequests`) must be the session's."""
    try:
        body = _create_body(request)
        if body is not None:
            _check_gpus(body, gpus)
    except _Denied as denied:
        return denied.decision
    return Decision.allowed()


def _create_body(request: AuthzRequest) -> GoObject | None:
    """The create body as dockerd will read it; None when there is none to read."""
    if request.body_error:
        raise _Denied("malformed-call", f"the container's configuration {request.body_error}.")
    if request.body is None:
        if _withheld(request.headers):
            raise _Denied(
                "body-unseen",
                "this container's configuration could not be checked (dockerd shows the policy "
                "only JSON bodies under 1 MiB). Send a smaller one, as the docker CLI and SDKs "
                "do.",
            )
        return None
    try:
        value = first_json_value(request.body)
    except (ValueError, RecursionError) as exc:
        raise _Denied(
            "malformed-body",
            f"the container's configuration is not readable JSON ({exc.__class__.__name__}). "
            "Send it as the Docker Engine API describes.",
        ) from None
    return value if isinstance(value, GoObject) else None  # dockerd refuses it in its own words


def _withheld(headers: Mapping[str, str]) -> bool:
    """dockerd had a JSON body for us but did not send it (over 1 MiB)."""
    folded = {k.lower(): v for k, v in headers.items()}
    media = folded.get("content-type", "").split(";", 1)[0].strip().lower()
    return media == "application/json" and folded.get("content-length", "").strip() != "0"


def _check_gpus(body: GoObject, gpus: Sequence[SandboxGpu]) -> None:
    requests = device_requests(body)
    if not requests:
        return
    if not gpus:
        raise _Denied("gpu-none-in-session", NO_GPU_MESSAGE)
    for request in requests:
        for count in request.every("count"):
            if count is not None and (type(count) is not int or abs(count) >= 2**63):
                raise _malformed("DeviceRequests.Count")
            if count is not None and count > len(gpus):
                raise _Denied(
                    "gpu-count",
                    f"{count} GPUs asked for; this session has {_described(gpus)}. "
                    f"Ask with `--gpus all` or `--gpus {len(gpus)}`.",
                )
        for device_id in _strings(request, "deviceids", "DeviceRequests.DeviceIDs"):
            _check_ids(device_id, gpus)
    # The toolkit's hook also reads NVIDIA_VISIBLE_DEVICES from the container's environment.
    for entry in _strings(body, "env", "Env"):
        name, sep, value = entry.partition("=")
        if sep and name == "NVIDIA_VISIBLE_DEVICES":
            _check_ids(value, gpus)


def _check_ids(ids: str, gpus: Sequence[SandboxGpu]) -> None:
    """Each of a comma-separated list of ids (dockerd joins DeviceIDs with commas) is ours."""
    ours = {str(g.index) for g in gpus} | {g.uuid.lower() for g in gpus}
    for device_id in ids.split(","):
        wanted = device_id.strip()
        if wanted.lower() in _HARMLESS_IDS or wanted.lower() in ours:
            continue
        raise _Denied(
            "gpu-not-the-sessions",
            f"GPU {wanted[:80]!r} is not this session's; this session has {_described(gpus)}. "
            "Ask for it with `--gpus all` or `--gpus device=0`.",
        )


def _described(gpus: Sequence[SandboxGpu]) -> str:
    each = ", ".join(f"{g.index}: {g.model} ({g.uuid})" for g in gpus)
    return f"1 GPU ({each})" if len(gpus) == 1 else f"{len(gpus)} GPUs ({each})"


def device_requests(body: GoObject) -> list[GoObject]:
    """Every DeviceRequest dockerd could apply: HostConfig's, and the flat legacy shape's."""
    parents = [body]
    for host in body.every("hostconfig"):
        if host is None:
            continue
        if not isinstance(host, GoObject):
            raise _malformed("HostConfig")
        parents.append(host)
    requests: list[GoObject] = []
    for parent in parents:
        for value in parent.every("devicerequests"):
            if value is None:
                continue
            if not isinstance(value, list):
                raise _malformed("DeviceRequests")
            for item in value:
                if item is None:
                    item = GoObject([])  # Go decodes null into an empty request
                if not isinstance(item, GoObject):
                    raise _malformed("DeviceRequests")
                requests.append(item)
    return requests


def _strings(parent: GoObject, key: str, what: str) -> list[str]:
    found: list[str] = []
    for value in parent.every(key):
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _malformed(what)
        found += value
    return found


def _malformed(what: str) -> _Denied:
    return _Denied(
        "malformed-body",
        f"the container's {what} has an unexpected type, so its GPU request cannot be checked. "
        "Send the fields with the types of the Docker Engine API.",
    )


# ---- reading a body as Go's encoding/json does -------------------------------------------------


class GoObject:
    """A JSON object as Go's decoder matches its keys to struct fields: case-insensitively,
    with every occurrence of a repeated key kept (`every`), in document order."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        self._values: dict[str, list[Any]] = {}
        for key, value in pairs:
            self._values.setdefault(fold_key(key), []).append(value)

    def every(self, key: str) -> list[Any]:
        """The values of every key that Go would decode into field `key` (folded)."""
        return self._values.get(fold_key(key), [])


_GO_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(object_pairs_hook=GoObject)


def first_json_value(raw: bytes) -> Any:
    """The first JSON value of `raw`, keys folded: what dockerd 20.10's json.Decoder.Decode
    reads (it ignores what follows). Raises ValueError when there is none."""
    text = raw.decode("utf-8", "replace")  # Go reads invalid UTF-8 as U+FFFD
    start = _GO_WHITESPACE.match(text)
    value, _ = _DECODER.raw_decode(text, start.end() if start else 0)
    return value
