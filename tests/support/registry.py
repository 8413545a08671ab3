"""A real image registry for tests: Debian's `docker-registry` (CNCF distribution 2.x).

Plain HTTP without auth, or TLS (a certificate of the test's CA, `tests.support.pki`) with
htpasswd auth (bcrypt, the only hash distribution accepts); filesystem storage under a directory
of the test's own. Started inside a network namespace (`tests.support.internet`), so the
sandboxes reach it through their network helper and the runner's egress rules, like a public registry.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from offload.core.waiting import wait_until
from tests.support.internet import Netns
from tests.support.pki import CertificateAuthority, ServerCert

REGISTRY_BINARY = Path("/usr/bin/docker-registry")
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)

CONFIG = """\
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: {address}:{port}
  secret: offload-test-registry
"""
TLS = """\
  tls:
    certificate: {cert}
    key: {key}
"""
HTPASSWD = """\
auth:
  htpasswd:
    realm: {realm}
    path: {path}
"""


@dataclass(frozen=True)
class Registry:
    address: str
    port: int
    log: Path
    ca_file: Path | None = None  # TLS when set
    users: dict[str, str] = field(default_factory=dict)  # htpasswd auth when set
    storage: Path | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def host(self) -> str:
        """What image references start with: `198.51.100.10:5000`."""
        return f"{self.address}:{self.port}"

    def get(
        self, path: str, accept: str | None = None, user: str | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """GET on the registry's HTTP API from the host namespace (status, headers, body), as
        `user` (default: the first user, if the registry has any)."""
        request = urllib.request.Request(self.url + path)
        if accept:
            request.add_header("Accept", accept)
        user = user or next(iter(self.users), None)
        if user:
            token = base64.b64encode(f"{user}:{self.users[user]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as answer:
                return answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def tags(self, repository: str) -> list[str]:
        status, _, body = self.get(f"/v2/{repository}/tags/list")
        if status == 404:
            return []
        assert status == 200, (status, body)
        return list(json.loads(body).get("tags") or [])

    def manifest_digest(self, repository: str, tag: str) -> str | None:
        status, headers, _ = self.get(f"/v2/{repository}/manifests/{tag}", MANIFEST_TYPES)
        if status != 200:
            return None
        return headers.get("Docker-Content-Digest")

    def access_log(self, method: str, path: str) -> list[str]:
        """The registry's access-log lines (combined format) for `method path`."""
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if f'"{method} {path} HTTP/' in line]


def start_registry(
    ns: Netns,
    address: str,
    port: int,
    workdir: Path,
    ca: CertificateAuthority | None = None,
    users: dict[str, str] | None = None,
) -> Registry:
    """`docker-registry serve` in `ns` on address:port; returns once /v2/ answers.

    With `ca`: TLS with a certificate of that CA for `address`. With `users` (name: password):
    htpasswd auth, so anonymous requests get distribution's own 401."""
    if not REGISTRY_BINARY.exists():
        raise RuntimeError(
            f"{REGISTRY_BINARY} is missing: apt-get install docker-registry (scripts/test.sh does)"
        )
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    text = CONFIG.format(storage=storage, address=address, port=port)
    if ca is not None:
        server: ServerCert = ca.issue(f"registry-{address}-{port}", address)
        text += TLS.format(cert=server.cert, key=server.key)
    if users:
        htpasswd = workdir / "htpasswd"
        htpasswd.write_text(
            "".join(
                f"{name}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                for name, password in users.items()
            )
        )
        text += HTPASSWD.format(realm=f"registry {address}:{port}", path=htpasswd)
    config.write_text(text)
    log = workdir / "registry.log"
    process = ns.spawn([str(REGISTRY_BINARY), "serve", str(config)], log)
    registry = Registry(
        address, port, log, ca.cert_file if ca else None, dict(users or {}), storage
    )

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited {process.returncode}: {log.read_text()}")
        try:
            return registry.get("/v2/")[0] == 200
        except OSError:
            return False

    wait_until(up, 30, f"docker-registry on {registry.host}", 0.1)
    return registry
