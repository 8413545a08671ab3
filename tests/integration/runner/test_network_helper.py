"""The sandbox's network helper: pasta through `pasta_as_slirp4netns.sh`, and the choice of it.

The wrapper is ours (rootlesskit 1.1 has no pasta driver), so its contract with rootlesskit is
tested on the real pasta, as an unprivileged user (pasta refuses to run as root) against a
network namespace of that user's own (`unshare -Urn`): "1" on the ready fd only once the tap
device exists, the same exit for a helper that could not start, and pasta gone as soon as the
wrapper is killed (rootlesskit stops its helper with SIGKILL; Debian 12's pasta would otherwise
outlive the namespace). The environments of the other runner tests use pasta as the default.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from offload.core.config import RunnerSettings
from offload.core.waiting import WaitTimeout, wait_until
from offload.runner import host_checks
from offload.runner.sandbox import pasta_wrapper

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
READY_WAIT_S = 20.0


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    """No process `pid`, or only its zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture
def namespace(tmp_path: Path) -> Iterator[int]:
    """The pid of a process of nobody's in a user and network namespace of its own."""
    proc = subprocess.Popen([*AS_NOBODY, "unshare", "-Urn", "sleep", "300"])
    try:
        own = os.readlink("/proc/self/ns/net")
        wait_until(
            lambda: os.readlink(f"/proc/{proc.pid}/ns/net") != own,
            READY_WAIT_S,
            "unshare's network namespace",
            interval=0.01,
        )
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A directory of nobody's (pytest's tmp_path is not reachable by other users)."""
    path = Path(tempfile.mkdtemp(prefix="offload-pasta-"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_wrapper(target: str, run_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    read_end, write_end = os.pipe()
    wrapper = subprocess.Popen(
        [*AS_NOBODY, str(pasta_wrapper()), "--mtu", "65520", "-r", str(write_end),
         "--disable-host-loopback", target, "tap0"],
        pass_fds=(write_end,), env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(run_dir)},
        stderr=subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    return wrapper, read_end


def _read_ready(fd: int) -> bytes:
    readable, _, _ = select.select([fd], [], [], READY_WAIT_S)
    return os.read(fd, 16) if readable else b"(nothing within the wait)"


def test_ready_only_once_the_tap_exists_and_pasta_dies_with_the_wrapper(
    namespace: int, run_dir: Path
) -> None:
    wrapper, ready = _start_wrapper(str(namespace), run_dir)
    try:
        said = _read_ready(ready)
        if said != b"1\n":
            wrapper.kill()
            pytest.fail(f"ready fd said {said!r}; wrapper: {wrapper.communicate()[1]!r}")
        link = subprocess.run(
            ["nsenter", "-t", str(namespace), "-n", "ip", "-o", "link", "show", "tap0"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert link.returncode == 0, link.stderr  # rootlesskit gives it its address and MTU
        pastas = _children(wrapper.pid)
        assert len(pastas) == 1, f"the wrapper's children: {pastas}"
        assert "pasta" in Path(f"/proc/{pastas[0]}/cmdline").read_text()
        assert os.listdir(run_dir) == [], "the pid file is removed once read"

        wrapper.kill()  # as rootlesskit stops it
        wrapper.wait()
        try:
            wait_until(lambda: _gone(pastas[0]), READY_WAIT_S, "pasta to die with the wrapper")
        except WaitTimeout:
            pytest.fail("pasta outlived the wrapper")
    finally:
        wrapper.kill()
        wrapper.wait()
        os.close(ready)


def test_a_helper_that_cannot_start_exits_non_zero_and_never_says_ready(run_dir: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid with no process: pasta cannot open its namespaces
    wrapper, ready = _start_wrapper(str(gone.pid), run_dir)
    try:
        _, err = wrapper.communicate(timeout=READY_WAIT_S)
        assert wrapper.returncode == 1
        assert b"pasta exited" in err and b"before tap0 was up" in err
        assert os.read(ready, 16) == b"", "nothing was written to the ready fd"
    finally:
        os.close(ready)


def test_rootlesskit_learns_the_options_it_may_pass_from_the_wrappers_help() -> None:
    """rootlesskit 1.1 refuses a helper whose --help lacks --netns-type ("older than v0.4.0")
    and passes --disable-host-loopback only when --help lists it."""
    shown = subprocess.run([str(pasta_wrapper()), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for option in ("--netns-type", "--disable-host-loopback", "--ready-fd", "--mtu"):
        assert option in shown.stdout
    assert "--enable-sandbox" not in shown.stdout, "pasta sandboxes itself; no slirp option"


def test_the_host_check_names_the_helper_that_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    for helper in ("pasta", "slirp4netns"):
        settings = RunnerSettings(network=helper)  # type: ignore[arg-type]
        messages = [p.message for p in host_checks.problems(settings)]
        assert f"`{helper}` was not found on PATH." in messages


def test_an_unknown_helper_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="pasta.*slirp4netns"):
        RunnerSettings(network="vpnkit")  # type: ignore[arg-type]


def test_debian_12s_pasta_is_refused_with_the_build_as_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The check asks dpkg for passt's version when the sandbox's PATH finds the distro's pasta
    (dpkg's answer is given here: this machine's pasta is the build in /usr/local/bin)."""
    asked: list[str] = []

    def dpkg_says(package: str) -> str:
        asked.append(package)
        return host_checks.BAD_PASTA_PACKAGES[0]

    distro, own = tmp_path / "usr-bin", tmp_path / "local-bin"
    for directory in (distro, own):
        directory.mkdir()
        (directory / "pasta").write_text("#!/bin/sh\n")
        (directory / "pasta").chmod(0o755)
    monkeypatch.setattr(host_checks, "_debian_package_version", dpkg_says)
    monkeypatch.setattr(host_checks, "DISTRO_BIN", distro)

    monkeypatch.setattr(host_checks, "SANDBOX_PATH", str(distro))
    problems = host_checks._pasta_problems()
    assert asked == ["passt"]
    assert len(problems) == 1 and "hanging instead of refusing" in problems[0].message
    assert "scripts/build_pasta.sh" in problems[0].fix

    # A build earlier on the sandbox's PATH (as /usr/local/bin is): nothing to say.
    asked.clear()
    monkeypatch.setattr(host_checks, "SANDBOX_PATH", f"{own}:{distro}")
    assert host_checks._pasta_problems() == [] and asked == []


def test_this_runner_host_passes_the_pasta_checks() -> None:
    """scripts/bootstrap.sh built pasta into /usr/local/bin: the real checks find no problem."""
    assert host_checks._pasta_problems() == []
    assert shutil.which("pasta", path=host_checks.SANDBOX_PATH) == "/usr/local/bin/pasta"
