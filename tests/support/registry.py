"""A real image registry for tests: Debian's `docker-registry` (CNCF distribution 2.x).

Plain HTTP, no auth (TLS and credentials are the next issue's), filesystem storage under a
directory of the test's own. Started inside a network namespace (`tests.support.internet`), so
the sandboxes reach it through slirp4netns and the runner's egress rules, like a public registry.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from offload.core.waiting import wait_until
from tests.support.internet import Netns

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


@dataclass(frozen=True)
class Registry:
    address: str
    port: int
    log: Path

    @property
    def host(self) -> str:
        """What image references start with: `198.51.100.10:5000`."""
        return f"{self.address}:{self.port}"

    def get(self, path: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET on the registry's HTTP API from the host namespace (status, headers, body)."""
        request = urllib.request.Request(f"http://{self.host}{path}")
        if accept:
            request.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
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


def start_registry(ns: Netns, address: str, port: int, workdir: Path) -> Registry:
    """`docker-registry serve` in `ns` on address:port; returns once /v2/ answers."""
    if not REGISTRY_BINARY.exists():
        raise RuntimeError(
            f"{REGISTRY_BINARY} is missing: apt-get install docker-registry (scripts/test.sh does)"
        )
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(CONFIG.format(storage=storage, address=address, port=port))
    log = workdir / "registry.log"
    process = ns.spawn([str(REGISTRY_BINARY), "serve", str(config)], log)
    registry = Registry(address, port, log)

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"docker-registry exited {process.returncode}: {log.read_text()}")
        try:
            return registry.get("/v2/")[0] == 200
        except OSError:
            return False

    wait_until(up, 30, f"docker-registry on {registry.host}", 0.1)
    return registry
