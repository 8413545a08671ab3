"""Builds on the organisation's persistent builder: the cache outlives sessions, teammates share
it, other organisations never see it, only changed layers move into the session's engine.

Real parts throughout: Debian's docker CLI 20.10 with BuildKit on each laptop, the agent sending
builds over the builder channel, the runner's builder proxy, a rootless builder engine per
organisation, `offload builder status|prune` and `offload org settings` as users run them.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from pathlib import Path

import pytest

from offload.core.waiting import wait_until
from tests.e2e.conftest import Deployment, User
from tests.support.images import BUSYBOX

pytestmark = pytest.mark.slow

DEBIAN_DOCKER = Path("/usr/bin/docker")  # 20.10, BuildKit built in
BASE = 'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
WAIT = 120.0


def _started(user: User) -> User:
    if not DEBIAN_DOCKER.exists():
        pytest.fail(f"{DEBIAN_DOCKER} (Debian's docker.io CLI, BuildKit built in) is missing")
    user.docker("offload", "start", "--timeout", "300s")
    return user


def _context(directory: Path, marker: str, app: str = "v1\n") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    (directory / "app.txt").write_text(app)
    (directory / "Dockerfile").write_text(
        BASE + f"RUN --mount=type=cache,target=/cache sh -c 'echo {marker} > /deps && "
        "head -c 3000000 /dev/urandom > /deps.bin'\n"
        "COPY app.txt /app.txt\n"
        'CMD ["cat", "/app.txt"]\n'
    )
    return directory


def _build(user: User, context: Path, tag: str) -> str:
    built = user.run(
        str(DEBIAN_DOCKER), "build", "--progress=plain", "-t", tag, str(context),
        timeout=300, env_extra={"DOCKER_BUILDKIT": "1"},
    )  # fmt: skip
    return built.stdout + built.stderr


def _deps_step_cached(output: str, marker: str) -> bool:
    """BuildKit's plain progress: `#7 [3/4] RUN … marker …` then `#7 CACHED` for a cache hit."""
    found = re.search(r"^#(\d+) \[[^\]]*\] RUN [^\n]*" + re.escape(marker), output, re.M)
    assert found, output
    return re.search(rf"^#{found.group(1)} CACHED$", output, re.M) is not None


def test_a_teammates_fresh_session_reuses_the_cache_and_another_org_does_not(
    make_user, tmp_path: Path
) -> None:
    org = f"acme-{uuid.uuid4().hex[:6]}"
    alice, bob = _started(make_user(org)), _started(make_user(org))
    eve = _started(make_user(f"globex-{uuid.uuid4().hex[:6]}"))
    marker = uuid.uuid4().hex
    context = _context(tmp_path / "ctx", marker)

    first = _build(alice, context, "app")
    assert not _deps_step_cached(first, marker), first
    assert alice.docker("run", "--rm", "app").stdout == "v1\n"  # in her engine at once
    alice.offload("stop", "--force", timeout=120)  # her session and engine are gone

    second = _build(bob, context, "app")
    assert _deps_step_cached(second, marker), second  # the builder outlived alice's session
    # The same image into bob's fresh engine: loaded from the archive kept at alice's move.
    assert "from the runner's copy of the build" in second, second
    assert bob.docker("run", "--rm", "app").stdout == "v1\n"

    other = _build(eve, context, "app")
    assert not _deps_step_cached(other, marker), other  # another organisation: its own cache

    # The builder's time reaches the usage of the session whose build kept it busy (billed to
    # the organisation beside the session's own time).
    def build_seconds(user: User) -> float:
        report = json.loads(user.offload("usage", "--json").stdout)
        return float(sum(item["build_s"] for item in report["active_sessions"]))

    wait_until(lambda: build_seconds(eve) > 0, WAIT, "eve's builder time in her usage")


def _moved(output: str) -> tuple[int, int]:
    found = re.search(r"Offload: moved (\d+) of (\d+) layers", output)
    assert found, output
    return int(found.group(1)), int(found.group(2))


def test_only_the_changed_layer_moves_into_the_session(make_user, tmp_path: Path) -> None:
    user = _started(make_user(f"solo-{uuid.uuid4().hex[:6]}"))
    marker = uuid.uuid4().hex
    context = _context(tmp_path / "ctx", marker)
    sent, total = _moved(_build(user, context, "app:1"))
    assert sent == total  # an empty engine: every layer
    (context / "app.txt").write_text("v2\n")
    sent, total = _moved(_build(user, context, "app:2"))
    assert (sent, total) == (1, 4), "only the COPY app.txt layer"
    assert user.docker("run", "--rm", "app:2").stdout == "v2\n"
    assert user.docker("run", "--rm", "app:1").stdout == "v1\n"
    # Rebuilding what the engine has moves nothing.
    assert "the session's engine has this image already" in _build(user, context, "app:again")


def test_status_for_members_prune_for_owners_and_gc_to_the_limit(
    make_user, deployment: Deployment, tmp_path: Path
) -> None:
    from offload.core.schemas import Role
    from offload.runner.builders import builder_id

    org = f"gc-{uuid.uuid4().hex[:6]}"
    owner = _started(make_user(org, Role.OWNER))
    member = _started(make_user(org))
    for n in range(3):  # three builds of 3 MB each: about 9 MB of cache
        _build(member, _context(tmp_path / f"ctx{n}", uuid.uuid4().hex), f"img{n}")

    status = json.loads(member.offload("builder", "status", "--json").stdout)
    assert status["org"] == org and status["running"] is True
    assert status["size_bytes"] > 3_000_000 and status["records"] > 0, status

    refused = member.offload("builder", "prune", check=False)
    assert refused.returncode == 3, refused.stderr
    assert f"only an owner of {org} can prune its build cache" in refused.stderr

    # The owner lowers the limit: BuildKit's GC brings the cache under it after the next build.
    owner.offload("org", "settings", org, "--builder-cache-limit", "10MB")
    for n in range(3, 6):
        _build(member, _context(tmp_path / f"ctx{n}", uuid.uuid4().hex), f"img{n}")

    def under_limit() -> bool:
        usage = json.loads(member.offload("builder", "status", "--json").stdout)
        return usage["keep_storage"] == "10000000B" and usage["size_bytes"] <= 10_000_000

    wait_until(under_limit, WAIT, "the build cache under its 10 MB limit", 1.0)

    exports = deployment.data_dir / "runner" / "exports" / builder_id(org)
    assert any(exports.glob("*.tar"))  # the archives of the images moved
    pruned = json.loads(owner.offload("builder", "prune", "--json").stdout)
    assert pruned["SpaceReclaimed"] > 0, pruned
    assert not exports.exists()  # the prune frees them too
    after = json.loads(owner.offload("builder", "status", "--json").stdout)
    assert after["size_bytes"] < status["size_bytes"], after
    # The builder still builds after the prune.
    _build(member, _context(tmp_path / "after", uuid.uuid4().hex), "after")
    assert member.docker("run", "--rm", "after").stdout == "v1\n"


def test_a_prune_in_the_middle_of_a_build_leaves_it_and_the_builder_working(
    make_user, tmp_path: Path
) -> None:
    """BuildKit keeps the records a running build uses: the owner's prune frees the rest, the
    build finishes, and the builder builds again."""
    import subprocess
    import threading

    from offload.core.schemas import Role

    org = f"mid-{uuid.uuid4().hex[:6]}"
    owner = _started(make_user(org, Role.OWNER))
    member = _started(make_user(org))
    _build(member, _context(tmp_path / "old", uuid.uuid4().hex), "old")  # something to prune
    marker = uuid.uuid4().hex
    context = tmp_path / "slow"
    context.mkdir()
    shutil.copy(BUSYBOX, context / "busybox")
    (context / "Dockerfile").write_text(
        BASE + f"RUN sh -c 'echo started-{marker}; sleep 6; echo finished > /result'\n"
    )
    build = subprocess.Popen(
        [str(DEBIAN_DOCKER), "build", "--progress=plain", "-t", "slow", str(context)],
        env={**member.env, "DOCKER_BUILDKIT": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stderr or []), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(f"started-{marker}" in line for line in lines), WAIT,
                   "the slow build's RUN step to start", 0.1)  # fmt: skip
        pruned = json.loads(owner.offload("builder", "prune", "--json").stdout)
        assert pruned["SpaceReclaimed"] > 0, pruned  # the old build's cache went
        assert build.wait(timeout=300) == 0, "".join(lines)
    finally:
        if build.poll() is None:
            build.kill()
        reader.join(timeout=10)
    assert member.docker("run", "--rm", "slow", "cat", "/result").stdout == "finished\n"
    _build(member, _context(tmp_path / "after", uuid.uuid4().hex), "after")
    assert member.docker("run", "--rm", "after").stdout == "v1\n"


def test_a_full_builder_disk_fails_the_build_clearly_and_a_prune_makes_it_build_again(
    make_user, deployment: Deployment, tmp_path: Path
) -> None:
    """The organisation's builder on a disk of its own, 96 MB (a real ext4 on a loop device, holding its home):
    a build that writes more ends with BuildKit's error and Offload's fix, and after the owner's
    prune the same builder builds again."""
    import subprocess

    from offload.core.schemas import Role
    from offload.runner.builders import builder_id

    org = f"full-{uuid.uuid4().hex[:6]}"
    # The builder's whole home (the sandbox reaches it through one bind mount, without submounts).
    data_root = deployment.data_dir / "runner" / "builders" / builder_id(org)
    data_root.mkdir(parents=True)
    image = tmp_path / "builder-disk.img"
    subprocess.run(["truncate", "-s", "96M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(data_root)], check=True)
    try:
        owner = _started(make_user(org, Role.OWNER))
        member = _started(make_user(org))
        big = tmp_path / "big"
        big.mkdir()
        shutil.copy(BUSYBOX, big / "busybox")
        (big / "Dockerfile").write_text(BASE + "RUN head -c 150000000 /dev/zero > /big\n")
        failed = member.run(
            str(DEBIAN_DOCKER), "build", "--progress=plain", "-t", "big", str(big),
            timeout=300, check=False, env_extra={"DOCKER_BUILDKIT": "1"},
        )  # fmt: skip
        said = failed.stdout + failed.stderr
        assert failed.returncode != 0, said
        # busybox's head says only "I/O error" (exit code 1); the full disk says the rest.
        assert "build cache filled its builder's disk" in said, said
        assert "offload builder prune" in said, said

        owner.offload("builder", "prune", "--json")
        _build(member, _context(tmp_path / "after", uuid.uuid4().hex), "after")
        assert member.docker("run", "--rm", "after").stdout == "v1\n"
    finally:
        subprocess.run(["umount", "-l", str(data_root)], check=False)
