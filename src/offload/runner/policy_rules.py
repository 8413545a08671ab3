"""The runner-side policy's rules: which Docker API requests a session engine may serve.

`evaluate()` is the one decision function: it sees what dockerd hands an authorization plugin
(method, request URI, JSON body when dockerd sends one) and answers allow or deny with a message
that reaches the user as `Error response from daemon: authorization denied by plugin …: <msg>`.

Reading the body the way dockerd does matters more than any single rule:

- Go's `encoding/json` matches struct fields case-insensitively (with Unicode simple folding, so
  `ſecurityOpt` is `SecurityOpt`) and the last of several matching keys wins.  `parse_body` folds
  keys the same way, so `{"hostconfig": {"privileged": true}}` is seen as privileged.
- The router matches the decoded path (`%63ontainers` is `containers`), accepts an absolute-form
  request target (`http://x/v1.41/containers/create`) and an optional `/v1.NN` prefix.
- dockerd sends the body only for `Content-Type: application/json` under 1 MiB with a known length,
  yet parses create bodies without that header too: a body-carrying request whose body we did not
  see is denied, never waved through.

Bind sources are checked against the session's mount area with `realpath` (symlinks resolved) as
well as lexically; this touches the filesystem but changes nothing.  What this file cannot see: a
symlink planted inside the mount area after a container is created and before it (re)starts.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

# ---- request and decision -----------------------------------------------------------------------


@dataclass(frozen=True)
class AuthzRequest:
    """One API request as dockerd describes it to an authorization plugin."""

    method: str
    uri: str  # raw request URI: may carry /v1.NN, a query, percent-escapes
    body: dict[str, Any] | None = None  # the JSON object dockerd sent; None when it sent none
    headers: Mapping[str, str] = field(default_factory=dict)
    # Set when dockerd sent a body that is not a JSON object: why it could not be read.
    body_error: str = ""


@dataclass(frozen=True)
class Decision:
    allow: bool
    msg: str = ""
    rule: str = ""  # short rule id for logs; never request content

    @classmethod
    def allowed(cls) -> Decision:
        return cls(True)


class _Denied(Exception):
    """Raised by a rule; `evaluate` turns it into a deny decision."""

    def __init__(self, rule: str, what: str, why: str, fix: str) -> None:
        super().__init__(rule)
        self.decision = Decision(
            False, f"Offload policy: {what} is not allowed ({why}). {fix}", rule
        )


# ---- reading the body as dockerd does ----------------------------------------------------------


def _fold_char(ch: str) -> str:
    if ch.isascii():
        return ch.lower()
    # Go's EqualFold uses simple (one rune to one rune) folding: U+212A KELVIN SIGN is "k",
    # U+017F LONG S is "s".  Multi-character folds (ß -> ss) do not match in Go, so keep those.
    folded = ch.casefold()
    return folded if len(folded) == 1 else ch


def fold_key(key: str) -> str:
    return "".join(_fold_char(ch) for ch in key)


def _folded_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # In document order, so the last key that dockerd would map to a field wins, as in Go.
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[fold_key(key)] = value
    return out


def _refold(value: Any) -> Any:
    """Fold a body built in Python (tests, callers) the same way `parse_body` does."""
    if isinstance(value, dict):
        return _folded_object([(k, _refold(v)) for k, v in value.items()])
    if isinstance(value, list):
        return [_refold(v) for v in value]
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as dockerd will read it: a JSON object with case-folded keys.

    Raises ValueError when it is not a JSON object.
    """
    value = json.loads(raw.decode("utf-8"), object_pairs_hook=_folded_object)
    if not isinstance(value, dict):
        raise ValueError("the body is not a JSON object")
    return value


def request_from_plugin_call(payload: Mapping[str, Any]) -> AuthzRequest:
    """Build an `AuthzRequest` from the JSON dockerd posts to /AuthZPlugin.AuthZReq.

    Raises ValueError when the call lacks the method or URI: dockerd re-sends an emptied body when
    it retries a call, and such a call must fail rather than be judged as an empty request.
    """
    method = payload.get("RequestMethod")
    uri = payload.get("RequestUri", payload.get("RequestURI"))
    if not isinstance(method, str) or not method or not isinstance(uri, str) or not uri:
        raise ValueError("the authorization request has no RequestMethod or RequestUri")
    headers = payload.get("RequestHeaders") or {}
    if not isinstance(headers, dict):
        headers = {}
    body, error = _decode_request_body(payload.get("RequestBody"))
    return AuthzRequest(method=method, uri=uri, body=body, headers=headers, body_error=error)


def _decode_request_body(encoded: Any) -> tuple[dict[str, Any] | None, str]:
    if not encoded:
        return None, ""
    if not isinstance(encoded, str):
        return None, "the body is not base64 text"
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return None, "the body is not base64 text"
    if not raw.strip():
        return None, ""
    try:
        return parse_body(raw), ""
    except (ValueError, UnicodeDecodeError):
        return None, "the body is not a JSON object"
    except RecursionError:
        return None, "the body is nested too deeply"


# ---- reading the URI as dockerd's router does ----------------------------------------------------

_VERSION_PREFIX = re.compile(r"^/v[0-9.]+(?=/|$)")


def split_uri(uri: str) -> tuple[str, dict[str, list[str]]]:
    """(normalised path without the /v1.NN prefix, query) of a request URI."""
    if uri.startswith("/"):
        # Origin form: split by hand; urlsplit would take `//x/...` for a host.
        raw_path, _, query = uri.partition("?")
    else:
        parts = urlsplit(uri)  # absolute form: http://host/v1.41/...
        raw_path, query = parts.path, parts.query
    path = posixpath.normpath("/" + unquote(raw_path).lstrip("/"))
    path = _VERSION_PREFIX.sub("", path) or "/"
    return path.lower(), parse_qs(query, keep_blank_values=True)


# ---- typed access to the folded body -----------------------------------------------------------


def _malformed(what: str) -> _Denied:
    return _Denied(
        "malformed-body",
        f"a request whose {what} has an unexpected type",
        "the policy cannot check it",
        "Send the fields with the types of the Docker Engine API.",
    )


def _obj(parent: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _malformed(key)
    return value


def _list(parent: Mapping[str, Any], key: str) -> list[Any]:
    value = parent.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _malformed(key)
    return value


def _str(parent: Mapping[str, Any], key: str) -> str:
    value = parent.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _malformed(key)
    return value


def _strings(parent: Mapping[str, Any], key: str) -> list[str]:
    items = _list(parent, key)
    if not all(isinstance(item, str) for item in items):
        raise _malformed(key)
    return items


# ---- paths and the mount area ------------------------------------------------------------------


def _inside(path: str, area: str) -> bool:
    return path == area or path.startswith(area.rstrip("/") + "/")


def path_in_mount_area(source: str, mount_area: Path) -> bool:
    """Whether a host path stays inside the mount area, both as written and with symlinks resolved.

    Lexical normalisation catches `..` escapes through paths that do not exist yet (dockerd creates
    missing bind sources); `realpath` catches a symlink inside the area that points out of it.
    """
    if not source.startswith("/"):
        return False
    try:
        area_real = os.path.realpath(mount_area)
        real = os.path.realpath(source)
    except (OSError, ValueError):  # a symlink loop, a NUL byte: not something to mount
        return False
    lexical = posixpath.normpath(source)
    return _inside(lexical, posixpath.normpath(str(mount_area))) and _inside(real, area_real)


def _check_bind_source(source: str, mount_area: Path, how: str) -> None:
    if path_in_mount_area(source, mount_area):
        return
    raise _Denied(
        "bind-outside-mount-area",
        f"{how} of {source!r}",
        "only paths inside the session's mount area can be mounted, and symlinks or `..` "
        "may not lead out of it",
        "Bind-mount a directory of your project (it is synced to the session), or use a volume.",
    )


# ---- container create and update ---------------------------------------------------------------

_HOST_NAMESPACE_FLAGS = {
    "pidmode": "--pid host",
    "ipcmode": "--ipc host",
    "utsmode": "--uts host",
    "usernsmode": "--userns host",
    "cgroupnsmode": "--cgroupns host",
}

# Capabilities that reach past the container: kernel modules, raw I/O, the host's clock, audit and
# logs, security modules, BPF/perf, open_by_handle_at escapes, ptrace (seccomp bypass on old
# kernels), suspend and accounting.  NET_ADMIN is here as well: in a container on the host network
# (allowed, see below) it would control the session's network namespace — its routes and the
# firewall the runner keeps there — and the request alone cannot tell whether a container ends up
# on that namespace (a network named by ID, `--network container:…`), so it is refused everywhere.
DANGEROUS_CAPABILITIES = frozenset(
    {
        "ALL",
        "AUDIT_CONTROL",
        "AUDIT_READ",
        "BLOCK_SUSPEND",
        "BPF",
        "DAC_READ_SEARCH",
        "LINUX_IMMUTABLE",
        "MAC_ADMIN",
        "MAC_OVERRIDE",
        "NET_ADMIN",
        "PERFMON",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_MODULE",
        "SYS_PACCT",
        "SYS_PTRACE",
        "SYS_RAWIO",
        "SYS_TIME",
        "SYSLOG",
        "WAKE_ALARM",
    }
)

# Log drivers that keep logs inside the engine (`docker logs` works with them).  The others write
# from dockerd on the runner host: into its journal, or to any unix socket path there.
_ALLOWED_LOG_DRIVERS = frozenset({"", "json-file", "local", "none"})

_ALLOWED_MOUNT_TYPES = frozenset({"bind", "volume", "tmpfs"})


def _normalise_capability(name: str) -> str:
    upper = name.strip().upper()
    return upper.removeprefix("CAP_")


def _check_privileged(host_config: Mapping[str, Any]) -> None:
    if host_config.get("privileged"):
        raise _Denied(
            "privileged",
            "--privileged",
            "it gives the container every device and capability of the runner host",
            "Drop --privileged; add only the capabilities you need with --cap-add.",
        )


def _check_host_namespaces(host_config: Mapping[str, Any]) -> None:
    for key, flag in _HOST_NAMESPACE_FLAGS.items():
        if _str(host_config, key).strip().lower() == "host":
            raise _Denied(
                f"host-namespace-{key.removesuffix('mode')}",
                flag,
                "the host's namespaces belong to the runner, not to your session",
                f"Drop {flag}; `container:<name>` shares a namespace with another container.",
            )
    # NetworkMode "host" is allowed on purpose: this engine runs in the session's own network
    # namespace, so "host" joins that namespace (the engine's bridge and the session's uplink), not
    # the runner's.  It exposes nothing a published port does not, and NET_ADMIN is refused, so
    # such a container cannot change the namespace's routes or firewall.


def _check_devices(host_config: Mapping[str, Any]) -> None:
    if _list(host_config, "devicerequests"):
        raise _Denied(
            "device-requests",
            "--gpus or a device request",
            "this session has no GPU or other device assigned; GPU sessions come in a later "
            "release of Offload",
            "Run without --gpus.",
        )
    if _list(host_config, "devices"):
        raise _Denied(
            "devices",
            "--device",
            "the runner's devices are not assigned to sessions",
            "Run without --device.",
        )
    if _list(host_config, "devicecgrouprules"):
        raise _Denied(
            "device-cgroup-rules",
            "--device-cgroup-rule",
            "it would open the runner's devices to the container",
            "Run without --device-cgroup-rule.",
        )


def _check_cgroup_parent(host_config: Mapping[str, Any]) -> None:
    if _str(host_config, "cgroupparent"):
        raise _Denied(
            "cgroup-parent",
            "--cgroup-parent",
            "containers stay in the session's cgroup, which carries its CPU and memory limits",
            "Run without --cgroup-parent.",
        )


def _check_capabilities(host_config: Mapping[str, Any]) -> None:
    # `Capabilities` (API 1.40+) replaces the default set, so it is checked like CapAdd.
    for key in ("capadd", "capabilities"):
        for name in _strings(host_config, key):
            cap = _normalise_capability(name)
            if cap in DANGEROUS_CAPABILITIES:
                raise _Denied(
                    f"capability-{cap.lower()}",
                    f"the capability {cap}",
                    "it reaches past the container into the runner host or the session's network",
                    "Drop it from --cap-add; the default capabilities cover most workloads.",
                )


def _security_opt_parts(option: str) -> tuple[str, str]:
    # dockerd accepts `key=value` and the legacy `key:value`.
    if "=" in option:
        key, _, value = option.partition("=")
    else:
        key, _, value = option.partition(":")
    return key.strip().lower(), value.strip()


def _deny_security_opt(option: str, why: str) -> _Denied:
    shown = option if len(option) <= 60 else option[:57] + "..."
    return _Denied(
        "security-opt",
        f"--security-opt {shown}",
        why,
        "Run with the default security profiles.",
    )


def _check_security_opts(host_config: Mapping[str, Any]) -> None:
    for option in _strings(host_config, "securityopt"):
        key, value = _security_opt_parts(option)
        lowered = value.lower()
        if key == "seccomp" and lowered != "builtin":
            # A custom profile can allow every system call: it is `unconfined` in other words.
            raise _deny_security_opt(
                option if lowered == "unconfined" else "seccomp=<custom profile>",
                "the default seccomp profile keeps the runner's kernel surface small",
            )
        if key == "apparmor" and lowered == "unconfined":
            raise _deny_security_opt(option, "containers keep the default AppArmor profile")
        if key == "label" and (lowered == "disable" or lowered.startswith("type:")):
            raise _deny_security_opt(option, "containers keep their SELinux confinement")
        if key == "systempaths" and lowered == "unconfined":
            raise _deny_security_opt(option, "/proc and /sys stay masked and read-only")
    # The docker CLI turns `--security-opt systempaths=unconfined` into empty MaskedPaths and
    # ReadonlyPaths (null means the engine's defaults): any explicit list is refused.
    for key in ("maskedpaths", "readonlypaths"):
        if host_config.get(key) is not None:
            raise _deny_security_opt(
                "systempaths=unconfined",
                "/proc and /sys stay masked and read-only: a writable /proc/sys reaches the "
                "runner's kernel",
            )


def _check_volume_driver(driver: str, how: str) -> None:
    if driver and driver != "local":
        raise _Denied(
            "volume-driver",
            f"{how} {driver!r}",
            "sessions offer only the engine's local volumes",
            "Use the default local driver.",
        )


def _check_binds(host_config: Mapping[str, Any], mount_area: Path) -> None:
    for spec in _strings(host_config, "binds"):
        parts = spec.split(":")
        if len(parts) < 2:
            continue  # a destination alone: an anonymous volume
        source = parts[0]
        if source.startswith("/"):
            _check_bind_source(source, mount_area, "-v bind mount")
        elif "/" in source or source.startswith((".", "~")):
            _check_bind_source(source, mount_area, "-v bind mount (relative path)")


def _check_mounts(host_config: Mapping[str, Any], mount_area: Path) -> None:
    for mount in _list(host_config, "mounts"):
        if not isinstance(mount, dict):
            raise _malformed("Mounts")
        kind = _str(mount, "type").lower()
        if kind not in _ALLOWED_MOUNT_TYPES:
            raise _Denied(
                "mount-type",
                f"--mount type={kind or '<none>'}",
                "sessions offer bind mounts of the mount area, volumes and tmpfs",
                "Use type=bind, type=volume or type=tmpfs.",
            )
        if kind == "bind":
            _check_bind_source(_str(mount, "source"), mount_area, "--mount type=bind")
        elif kind == "volume":
            driver_config = _obj(_obj(mount, "volumeoptions"), "driverconfig")
            _check_volume_driver(_str(driver_config, "name"), "--mount volume-driver")
            _check_local_volume_options(_obj(driver_config, "options"), mount_area)


def _check_log_driver(host_config: Mapping[str, Any]) -> None:
    driver = _str(_obj(host_config, "logconfig"), "type").strip().lower()
    if driver not in _ALLOWED_LOG_DRIVERS:
        raise _Denied(
            "log-driver",
            f"--log-driver {driver}",
            "this driver would write from the runner host, outside the session",
            "Use the default json-file or local driver; `docker logs` reads them.",
        )


def _check_container_create(body: Mapping[str, Any], mount_area: Path) -> None:
    host_config = _obj(body, "hostconfig")
    _check_privileged(host_config)
    _check_host_namespaces(host_config)
    _check_devices(host_config)
    _check_capabilities(host_config)
    _check_security_opts(host_config)
    _check_cgroup_parent(host_config)
    _check_volume_driver(_str(host_config, "volumedriver"), "--volume-driver")
    _check_binds(host_config, mount_area)
    _check_mounts(host_config, mount_area)
    _check_log_driver(host_config)


def _check_container_update(body: Mapping[str, Any], mount_area: Path) -> None:
    # The update body is Resources + RestartPolicy; the engine ignores devices and the cgroup
    # parent there today, but they are refused so that a later engine cannot grow a hole.
    _check_devices(body)
    _check_cgroup_parent(body)


# ---- exec, volumes, networks, build ------------------------------------------------------------


def _check_exec_create(body: Mapping[str, Any], mount_area: Path) -> None:
    if body.get("privileged"):
        raise _Denied(
            "exec-privileged",
            "docker exec --privileged",
            "it gives the process every device and capability of the runner host",
            "Run docker exec without --privileged.",
        )


def _check_local_volume_options(options: Mapping[str, Any], mount_area: Path) -> None:
    """The local driver mounts `device` with `type` and `o`: allow tmpfs and mount-area binds."""
    if not options:
        return
    fs_type = str(options.get("type") or "").strip().lower()
    mount_opts = [o.strip().lower() for o in str(options.get("o") or "").split(",")]
    device = str(options.get("device") or "")
    is_bind = "bind" in mount_opts or "rbind" in mount_opts
    if fs_type == "tmpfs" and not is_bind:
        return
    if is_bind or (fs_type in ("", "none") and device):
        _check_bind_source(device, mount_area, "a volume bound to the host path")
        return
    if fs_type or device:
        raise _Denied(
            "volume-filesystem",
            f"a local volume of type {fs_type or '<none>'!r}",
            "it would mount a device or filesystem of the runner host",
            "Use a plain volume, type=tmpfs, or bind a directory of the mount area.",
        )


def _check_volume_create(body: Mapping[str, Any], mount_area: Path) -> None:
    _check_volume_driver(_str(body, "driver"), "the volume driver")
    _check_local_volume_options(_obj(body, "driveropts"), mount_area)


# The engine's own bridge networks stay inside the session's namespace; macvlan/ipvlan would put
# containers on the session's uplink, and any other driver is a plugin the runner does not offer.
_ALLOWED_NETWORK_DRIVERS = frozenset({"", "bridge"})


def _check_network_create(body: Mapping[str, Any], mount_area: Path) -> None:
    driver = _str(body, "driver").strip().lower()
    if driver not in _ALLOWED_NETWORK_DRIVERS:
        raise _Denied(
            "network-driver",
            f"the network driver {driver!r}",
            "sessions offer the engine's bridge networks",
            "Create the network without --driver (bridge).",
        )
    ipam_driver = _str(_obj(body, "ipam"), "driver").strip().lower()
    if ipam_driver not in ("", "default"):
        raise _Denied(
            "ipam-driver",
            f"the IPAM driver {ipam_driver!r}",
            "sessions offer the engine's default address management",
            "Create the network without --ipam-driver.",
        )


def _check_build_query(query: Mapping[str, list[str]]) -> None:
    if any(value for value in query.get("cgroupparent", [])):
        raise _Denied(
            "build-cgroup-parent",
            "docker build --cgroup-parent",
            "builds stay in the session's cgroup, which carries its CPU and memory limits",
            "Build without --cgroup-parent.",
        )


# ---- routing -----------------------------------------------------------------------------------

_SWARM_ROOTS = frozenset({"swarm", "services", "nodes", "secrets", "configs", "tasks"})

BodyRule = Callable[[Mapping[str, Any], Path], None]

# (method, path pattern, what the body is for, rule): requests whose body must be seen.
_BODY_RULES: tuple[tuple[str, re.Pattern[str], str, BodyRule], ...] = (
    ("POST", re.compile(r"^/containers/create$"), "container create", _check_container_create),
    (
        "POST",
        re.compile(r"^/containers/[^/]+/update$"),
        "container update",
        _check_container_update,
    ),
    ("POST", re.compile(r"^/containers/[^/]+/exec$"), "exec create", _check_exec_create),
    ("POST", re.compile(r"^/volumes/create$"), "volume create", _check_volume_create),
    ("POST", re.compile(r"^/networks/create$"), "network create", _check_network_create),
)


def _check_not_offered(method: str, segments: list[str]) -> None:
    root = segments[0] if segments else ""
    if root in _SWARM_ROOTS:
        raise _Denied(
            "swarm",
            "swarm mode (services, nodes, secrets, configs, tasks)",
            "it is not offered on Offload: each session is one engine",
            "Use `docker run` or `docker compose`.",
        )
    if root == "plugins" and method != "GET":
        raise _Denied(
            "plugins",
            "installing or changing engine plugins",
            "they are not offered on Offload",
            "Use the engine's built-in drivers.",
        )


def _missing_body(what: str, error: str) -> _Denied:
    why = error or "the engine did not pass its body to the policy"
    return _Denied(
        "missing-body",
        f"a {what} request whose body the policy cannot read",
        why,
        "Send it as `Content-Type: application/json` with a Content-Length under 1 MiB "
        "(the docker CLI and SDKs do).",
    )


def _judge(request: AuthzRequest, mount_area: Path) -> None:
    method = request.method.strip().upper()
    try:
        path, query = split_uri(request.uri)
    except ValueError:
        raise _Denied(
            "malformed-uri",
            "a request whose URI cannot be read",
            "the policy cannot check it",
            "Send a well-formed request URI.",
        ) from None
    segments = [s for s in path.split("/") if s]
    _check_not_offered(method, segments)
    if method == "POST" and path == "/build":
        _check_build_query(query)
    for rule_method, pattern, what, rule in _BODY_RULES:
        if method == rule_method and pattern.match(path):
            if request.body is None:
                raise _missing_body(what, request.body_error)
            rule(_refold(request.body), mount_area)


def evaluate(request: AuthzRequest, mount_area: Path) -> Decision:
    """Allow or deny one API request of a session engine whose bind sources live in `mount_area`."""
    try:
        _judge(request, mount_area)
    except _Denied as denied:
        return denied.decision
    return Decision.allowed()
