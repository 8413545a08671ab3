"""BuildKit builds through Offload, as a developer runs them: Debian's docker CLI 20.10 (BuildKit
built in, `DOCKER_BUILDKIT=1`) on the laptop, its `/session` and `/grpc` streams through the
tunnel to the session's engine, the build context streamed from the laptop.

What is forwarded from the laptop stays there: `--secret` files are read by the laptop's CLI
when the build asks for them (never written on the runner: searched afterwards), `--ssh` is the
laptop's own ssh-agent (a real `ssh-add -l` inside the build lists the laptop's key), and
`--output` lands in the laptop's directories. Images come from `FROM scratch` plus Debian's
static busybox: no registry is needed here (tests/e2e/test_registries.py builds FROM registry
images).

Not tested: `docker buildx` (no buildx plugin on this machine; it speaks the same /session and
/grpc endpoints, which are spliced as raw streams like the built-in client's).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.core.waiting import wait_until
from tests.e2e.conftest import Deployment, User
from tests.support.images import BUSYBOX
from tests.support.secrets_search import files_containing, processes_showing

pytestmark = pytest.mark.slow

DEBIAN_DOCKER = Path("/usr/bin/docker")  # 20.10, BuildKit built in
BASE = 'FROM scratch AS base\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'


@pytest.fixture
def builder(make_user) -> User:  # type: ignore[no-untyped-def]
    if not DEBIAN_DOCKER.exists():
        pytest.fail(f"{DEBIAN_DOCKER} (Debian's docker.io CLI, BuildKit built in) is missing")
    user = make_user()
    user.docker("offload", "start", "--timeout", "60s")
    return user


def _context(directory: Path, dockerfile: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    (directory / "Dockerfile").write_text(BASE + dockerfile)
    return directory


def _build(
    user: User, context: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
):  # type: ignore[no-untyped-def]
    return user.run(
        str(DEBIAN_DOCKER), "build", "--progress=plain", *args, str(context),
        check=check, timeout=300, env_extra={"DOCKER_BUILDKIT": "1", **(env or {})},
    )  # fmt: skip


def test_context_dockerignore_stages_target_and_build_args(builder: User, tmp_path: Path) -> None:
    context = _context(
        tmp_path / "ctx",
        "ARG GREETING=hello\n"
        "FROM base AS app\nARG GREETING\nCOPY . /ctx\n"
        'RUN echo "$GREETING" > /greeting && ls -A /ctx | sort > /listing\n'
        "FROM app AS tests\nRUN echo tests > /stage\n"
        "FROM app AS release\nRUN echo release > /stage\n",
    )
    (context / "keep.txt").write_text("kept\n")
    (context / "debug.log").write_text("ignored\n")
    (context / "node_modules").mkdir()
    (context / "node_modules" / "big.js").write_text("ignored\n")
    (context / ".dockerignore").write_text("*.log\nnode_modules\n")

    built = _build(builder, context, "-t", "app:tests", "--target", "tests",
                   "--build-arg", "GREETING=hi from the laptop")  # fmt: skip
    # Progress streamed back as BuildKit prints it.
    assert "[internal] load build definition from Dockerfile" in built.stderr
    assert "[internal] load build context" in built.stderr
    assert "naming to docker.io/library/app:tests" in built.stderr
    run = ["run", "--rm", "app:tests", "cat"]
    assert builder.docker(*run, "/stage").stdout == "tests\n"  # --target stopped there
    assert builder.docker(*run, "/greeting").stdout == "hi from the laptop\n"
    listing = builder.docker(*run, "/listing").stdout.split()
    assert listing == sorted([".dockerignore", "Dockerfile", "busybox", "keep.txt"]), listing

    _build(builder, context, "-t", "app:release")  # the last stage, default argument
    assert builder.docker("run", "--rm", "app:release", "cat", "/stage").stdout == "release\n"
    assert builder.docker("run", "--rm", "app:release", "cat", "/greeting").stdout == "hello\n"


def test_cache_mount_keeps_its_content_across_builds(builder: User, tmp_path: Path) -> None:
    context = _context(tmp_path / "ctx", "")
    for run in range(1, 3):
        marker = uuid.uuid4().hex  # a new RUN step each time: no layer cache
        (context / "Dockerfile").write_text(
            BASE + f"RUN --mount=type=cache,id=deps,target=/cache "
            f"sh -c 'echo {marker} >> /cache/runs && wc -l < /cache/runs > /count'\n"
        )
        _build(builder, context, "-t", "cached")
        count = builder.docker("run", "--rm", "cached", "cat", "/count").stdout.strip()
        assert count == str(run)


def test_secret_comes_from_the_laptop_and_stays_off_the_runner(
    builder: User, deployment: Deployment, tmp_path: Path
) -> None:
    secret = f"npm-token-{uuid.uuid4().hex}"
    secret_file = tmp_path / "token.txt"
    secret_file.write_text(secret)
    context = _context(
        tmp_path / "ctx",
        "RUN --mount=type=secret,id=token "
        "sh -c 'wc -c < /run/secrets/token > /token-size; ls /run/secrets > /secrets-seen'\n",
    )
    _build(builder, context, "-t", "with-secret", "--secret", f"id=token,src={secret_file}")
    run = ["run", "--rm", "with-secret", "cat"]
    assert builder.docker(*run, "/token-size").stdout.strip() == str(len(secret))
    image_tar = tmp_path / "image.tar"
    builder.docker("save", "-o", str(image_tar), "with-secret")
    assert secret.encode() not in image_tar.read_bytes()  # in no layer
    assert files_containing([deployment.data_dir, deployment.run_dir], secret) == []
    assert processes_showing(secret) == []

    missing = _build(builder, context, "--secret", f"id=token,src={tmp_path}/absent", check=False)
    assert missing.returncode != 0
    assert "absent" in missing.stderr and "no such file or directory" in missing.stderr
    builder.docker("version")  # the session and its builder are still fine


@pytest.fixture
def laptop_agent(tmp_path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """An ssh-agent of the laptop holding a fresh key; yields its env and the key's listing."""
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "laptop-key", "-f",
                    str(key)], check=True)  # fmt: skip
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        env = {"SSH_AUTH_SOCK": str(sock)}
        wait_until(sock.exists, 10, "the laptop's ssh-agent socket", 0.05)
        subprocess.run(["ssh-add", str(key)], env={**os.environ, **env}, check=True,
                       capture_output=True)  # fmt: skip
        listing = subprocess.run(["ssh-add", "-l"], env={**os.environ, **env}, check=True,
                                 capture_output=True, text=True).stdout  # fmt: skip
        yield env, listing
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def _copy_with_libraries(binary: Path, context: Path) -> None:
    """`binary` and the shared libraries `ldd` names, at their own paths under context/root."""
    out = subprocess.run(["ldd", str(binary)], check=True, capture_output=True, text=True).stdout
    paths = [binary] + [Path(word) for line in out.splitlines() for word in line.split()
                        if word.startswith("/")]  # fmt: skip
    for path in paths:
        target = context / "root" / path.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path.resolve(), target)


def test_ssh_mount_is_the_laptops_agent(
    builder: User, tmp_path: Path, laptop_agent: tuple[dict[str, str], str]
) -> None:
    env, listing = laptop_agent
    context = _context(
        tmp_path / "ctx",
        "COPY root/ /\nRUN --mount=type=ssh ssh-add -l > /agent-keys\n",
    )
    _copy_with_libraries(Path("/usr/bin/ssh-add"), context)
    _build(builder, context, "-t", "with-ssh", "--ssh", "default", env=env)
    keys = builder.docker("run", "--rm", "with-ssh", "cat", "/agent-keys").stdout
    assert keys == listing and "laptop-key (ED25519)" in keys


@pytest.mark.parametrize("kind", ["local", "tar"])
def test_output_lands_on_the_laptop(builder: User, tmp_path: Path, kind: str) -> None:
    marker = uuid.uuid4().hex
    context = _context(
        tmp_path / "ctx",
        f"RUN mkdir -p /out && echo {marker} > /out/artifact.txt\n"
        "FROM scratch\nCOPY --from=base /out/ /\n",
    )
    dest = tmp_path / ("out" if kind == "local" else "out.tar")
    _build(builder, context, "--output", f"type={kind},dest={dest}")
    if kind == "local":
        assert (dest / "artifact.txt").read_text() == marker + "\n"
        assert sorted(os.listdir(dest)) == ["artifact.txt"]
    else:
        with tarfile.open(dest) as tar:
            member = tar.extractfile("artifact.txt")
            assert member is not None and member.read().decode() == marker + "\n"


def test_bad_builds_end_with_a_clear_error_and_leave_the_session_usable(
    builder: User, tmp_path: Path
) -> None:
    missing = _build(builder, tmp_path, "-t", "nothing", check=False)  # no Dockerfile there
    assert missing.returncode != 0
    assert "failed to read dockerfile" in missing.stderr.lower() or (
        "no such file or directory" in missing.stderr
    ), missing.stderr

    # A base image on a registry the sandbox cannot reach (a private address: the runner's
    # egress rules refuse it at once, so nothing leaves this machine).
    context = tmp_path / "unreachable"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM 10.213.99.1:5000/team/base:1\nRUN true\n")
    unreachable = _build(builder, context, check=False)
    assert unreachable.returncode != 0
    assert "10.213.99.1:5000/team/base:1" in unreachable.stderr, unreachable.stderr
    assert "connection refused" in unreachable.stderr, unreachable.stderr

    # The same session builds and runs at once afterwards.
    ok = _context(tmp_path / "ok", 'CMD ["echo", "still building"]\n')
    _build(builder, ok, "-t", "after-errors")
    assert builder.docker("run", "--rm", "after-errors").stdout == "still building\n"
