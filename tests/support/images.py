"""Test images built locally: no registry is reachable, so images come from Debian's busybox-static."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
TEST_IMAGE = "offload-test/busybox:latest"

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["/bin/echo", "hello from offload"]
"""


def write_build_context(directory: Path, dockerfile: str = DOCKERFILE) -> Path:
    """A `FROM scratch` build context holding a static busybox."""
    if not BUSYBOX.exists():
        raise RuntimeError("/bin/busybox missing: apt-get install busybox-static")
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    (directory / "Dockerfile").write_text(dockerfile)
    return directory


def build_test_image(docker_host: str, tag: str = TEST_IMAGE) -> str:
    """Build the busybox test image on the engine at `docker_host` (e.g. unix:///path)."""
    with tempfile.TemporaryDirectory() as tmp:
        context = write_build_context(Path(tmp))
        subprocess.run(
            ["docker", "-H", docker_host, "build", "-q", "-t", tag, str(context)],
            check=True,
            capture_output=True,
            text=True,
        )
    return tag
