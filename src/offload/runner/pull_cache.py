"""The runner host's pull-through cache: Debian's `docker-registry` (CNCF distribution) in proxy
mode, the registry mirror of every sandboxed engine on this host.

A second session pulling an image another session pulled is served from the runner's disk, not
the internet. dockerd uses a mirror for Docker Hub names only (`docker.io/...`), and falls back to
the upstream itself when the mirror fails (moby's pull endpoints), so the cache can only ever
speed a pull up.

Organisations never see each other's private images through it, by construction: the cache
never asks clients for credentials (no `auth:` section, so dockerd never sends it a user's), and
it authenticates upstream only as the operator's account (`OFFLOAD_RUNNER_PULL_CACHE_USERNAME`),
or anonymously. distribution 2.8's proxy speaks only token auth upstream (Docker Hub's; it keys
the account by the token realm), so for an upstream that challenges with Basic (a registry
behind htpasswd) the account goes into the upstream URL, which Go's HTTP client sends as basic
auth on every request; the start probes the upstream's challenge to tell which. It holds only what that account may read: give it an account that sees public
images only. A user's private Hub image is fetched by their engine from the Hub itself, with the
user's credentials, and lands in that session's engine alone. Pushes to it are refused by the
registry (proxy mode is read-only).

Sandboxes reach it at a local address of the runner (`addrtype LOCAL`, which the egress rules
otherwise refuse): `offload.runner.egress` opens exactly that address and port. Plain HTTP, as
the traffic never leaves this host. Its storage (`data_dir/pull-cache`) outlives runner
restarts; distribution's proxy expires what it cached after a week.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from offload.core.config import RunnerSettings
from offload.core.errors import EnvironmentError_
from offload.runner.environment import log_tail

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Nothing is sent: `ip route get` only asks the kernel which source address it would use.
ROUTE_PROBE = "192.0.2.255"


@dataclass(frozen=True)
class CacheFiles:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yml"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def log(self) -> Path:
        return self.root / "registry.log"

    @property
    def ca_bundle(self) -> Path:
        return self.root / "ca-certificates.crt"


def render_config(
    address: str,
    port: int,
    storage: Path,
    upstream: str,
    username: str,
    password: str,
    basic_upstream: bool = False,
) -> str:
    """distribution's config.yml (JSON is YAML): proxy mode, access log on, no client auth."""
    proxy: dict[str, str] = {"remoteurl": upstream}
    if username and basic_upstream:
        scheme, _, rest = upstream.partition("://")
        account = f"{quote(username, safe='')}:{quote(password, safe='')}"
        proxy = {"remoteurl": f"{scheme}://{account}@{rest}"}
    elif username:
        proxy |= {"username": username, "password": password}
    config = {
        "version": 0.1,
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},  # the proxy's expiry deletes what it cached
        },
        "http": {"addr": f"{_host(address)}:{port}", "secret": os.urandom(16).hex()},
        "proxy": proxy,
    }
    return json.dumps(config, indent=2) + "\n"


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


async def primary_address() -> str:
    """The address this host's traffic leaves from (its default route's source)."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "-j", "route", "get", ROUTE_PROBE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    try:
        routes = json.loads(out or b"[]")
        source = str(routes[0]["prefsrc"])
        ipaddress.ip_address(source)
    except (ValueError, LookupError, TypeError):
        raise EnvironmentError_(
            "Could not find this host's primary address for the pull cache (no default route).",
            "Set OFFLOAD_RUNNER_PULL_CACHE_ADDRESS to a local, non-loopback address, or "
            "OFFLOAD_RUNNER_PULL_CACHE=false.",
        ) from None
    return source


def check_address(address: str) -> None:
    parsed = ipaddress.ip_address(address)
    if parsed.is_loopback or parsed.is_unspecified:
        raise EnvironmentError_(
            f"OFFLOAD_RUNNER_PULL_CACHE_ADDRESS={address}: sandboxes cannot reach the runner's "
            "loopback, nor a wildcard address.",
            "Give one of this host's own non-loopback addresses (`ip -br addr`).",
        )


def free_port(address: str) -> int:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            raise EnvironmentError_(
                f"The pull cache cannot listen on {address}: {exc.strerror or exc}.",
                "Set OFFLOAD_RUNNER_PULL_CACHE_ADDRESS to one of this host's own addresses "
                "(`ip -br addr`).",
            ) from None
        return int(probe.getsockname()[1])


class PullCache:
    """One `docker-registry serve` in proxy mode, started and stopped with the runner."""

    def __init__(self, settings: RunnerSettings, ca_bundle: bytes | None = None) -> None:
        self.settings = settings
        self.ca_bundle = ca_bundle  # the engines' (`registry_trust.engine_bundle`)
        self.files = CacheFiles(settings.data_dir / "pull-cache")
        self.address = ""
        self.port = 0
        self._process: asyncio.subprocess.Process | None = None

    @property
    def mirror_url(self) -> str:
        return f"http://{_host(self.address)}:{self.port}"

    async def start(self) -> None:
        settings = self.settings
        password = await asyncio.to_thread(_read_password, settings.pull_cache_password_file)
        bundle = self.ca_bundle
        scheme = await upstream_challenge(settings.pull_cache_upstream, bundle)
        self.address = settings.pull_cache_address or await primary_address()
        check_address(self.address)
        self.port = settings.pull_cache_port or free_port(self.address)
        await asyncio.to_thread(self._write_files, password, bundle, scheme == "basic")
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        if self.files.ca_bundle.exists():
            env["SSL_CERT_FILE"] = str(self.files.ca_bundle)
        with self.files.log.open("ab") as log_file:
            try:
                self._process = await asyncio.create_subprocess_exec(
                    settings.docker_registry, "serve", str(self.files.config),
                    stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    env=env, start_new_session=True,
                )  # fmt: skip
            except FileNotFoundError:
                raise EnvironmentError_(
                    f"`{settings.docker_registry}` is not installed: the runner's pull cache "
                    "needs it.",
                    "Install it (`apt-get install docker-registry`), or set "
                    "OFFLOAD_RUNNER_PULL_CACHE=false.",
                ) from None
        await self._wait_until_serving()
        log.info("pull cache of %s serving at %s", settings.pull_cache_upstream, self.mirror_url)

    def _write_files(self, password: str, bundle: bytes | None, basic_upstream: bool) -> None:
        self.files.storage.mkdir(parents=True, exist_ok=True, mode=0o700)
        config = render_config(
            self.address, self.port, self.files.storage, self.settings.pull_cache_upstream,
            self.settings.pull_cache_username, password, basic_upstream,
        )  # fmt: skip
        self.files.config.touch(mode=0o600)
        self.files.config.write_text(config)
        if bundle is not None:
            self.files.ca_bundle.write_bytes(bundle)
        else:
            self.files.ca_bundle.unlink(missing_ok=True)

    async def _wait_until_serving(self) -> None:
        assert self._process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        async with httpx.AsyncClient(timeout=2.0) as client:
            while loop.time() < deadline:
                if self._process.returncode is not None:
                    break
                try:
                    if (await client.get(self.mirror_url + "/v2/")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
        lines = (await asyncio.to_thread(log_tail, self.files.log, 8)).splitlines()
        tail = " | ".join(lines) or "(empty log)"
        await self.stop()
        raise EnvironmentError_(
            f"The pull cache did not come up on {self.mirror_url}: {tail}",
            "Check the address and port (OFFLOAD_RUNNER_PULL_CACHE_ADDRESS/_PORT) and "
            f"{self.files.log}; or set OFFLOAD_RUNNER_PULL_CACHE=false.",
        )

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def upstream_challenge(upstream: str, ca_bundle: bytes | None) -> str | None:
    """The auth scheme the upstream's `/v2/` challenges with ("basic", "bearer"), or None.

    Raises EnvironmentError_ when it does not answer: distribution's proxy would exit at start
    (it pings the upstream), so the runner goes on without a cache and says why."""
    verify: ssl.SSLContext | bool = True
    if ca_bundle is not None:
        verify = ssl.create_default_context(cadata=ca_bundle.decode())
    try:
        async with httpx.AsyncClient(verify=verify, timeout=10.0) as client:
            answer = await client.get(upstream + "/v2/")
    except httpx.HTTPError as exc:
        raise EnvironmentError_(
            f"The pull cache's upstream {upstream} does not answer: {exc}",
            "Check the runner's network and OFFLOAD_RUNNER_PULL_CACHE_UPSTREAM; until then "
            "engines pull from registries directly.",
        ) from None
    challenge = answer.headers.get("www-authenticate", "")
    return challenge.split(" ", 1)[0].lower() or None


def _read_password(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise EnvironmentError_(
            f"OFFLOAD_RUNNER_PULL_CACHE_PASSWORD_FILE={path} cannot be read: "
            f"{exc.strerror or exc}.",
            "Point it at a file holding the upstream account's password (or token).",
        ) from None
