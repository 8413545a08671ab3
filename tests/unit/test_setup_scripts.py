"""The set-up scripts fail loudly: the real scripts/bootstrap.sh, run against an unreachable
package index and fake interpreters, stops non-zero and says which step failed and what to do.

No network: pip is pointed at 127.0.0.1:9 (the discard port: refused at once) with no retries and
no machine-wide pip configuration, the virtualenv is a scratch one under tmp_path (never the
project's .venv), and OFFLOAD_SKIP_APT=1 keeps apt-get out of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
TIMEOUT_S = 120


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "OFFLOAD_"))}
    env.update(
        PIP_CONFIG_FILE=os.devnull,  # no index, find-links or constraints of the machine's
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_TIMEOUT="1",
        OFFLOAD_VENV=str(tmp_path / "venv"),
        OFFLOAD_SKIP_APT="1",
        TMPDIR=str(tmp_path),
        PYTHON=sys.executable,
    )
    env.update(extra)
    return env


def run_bash(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", *args], env=env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT
    )


def fake_python(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "fake-python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_a_failed_pip_install_stops_bootstrap_naming_the_step(tmp_path: Path) -> None:
    # A virtualenv left without pip (as `python3 -m venv` leaves one where ensurepip is missing)
    # is made again, not trusted.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "venv"], check=True)

    result = run_bash([str(BOOTSTRAP), "[test]"], script_env(tmp_path))

    assert result.returncode != 0, result.stdout + result.stderr
    assert f"==> create the virtualenv {tmp_path / 'venv'}" in result.stdout
    # `pip install --upgrade pip` keeps the pip it has when no index answers; the project's own
    # install cannot (its build needs setuptools from the index).
    failed = re.search(r"step '(pip install [^']*)' failed \(exit (\d+)\)", result.stderr)
    assert failed, result.stderr
    assert failed.group(1) in ("pip install -e .[test]", "pip install --upgrade pip")
    assert int(failed.group(2)) != 0
    assert "package index" in result.stderr  # what to do
    assert "127.0.0.1:9" in result.stderr  # pip's own output, shown because it failed
    log = re.search(r"all of it: (\S+)\)", result.stderr)
    assert log and Path(log.group(1)).is_file()
    # It stopped there: no check ran after the failed install.
    assert "==> import offload" not in result.stdout
    assert "==> pip check" not in result.stdout


def test_step_is_quiet_on_success_and_stops_with_the_commands_status(tmp_path: Path) -> None:
    script = (
        f". {BOOTSTRAP}\n"
        'step "say hello" "never shown" echo hello-from-the-step\n'
        'step "fail with three" "Do the thing, then rerun." '
        'sh -c "echo some-output; echo some-error >&2; exit 3"\n'
        "echo not-reached\n"
    )
    result = run_bash(["-c", script], script_env(tmp_path))

    assert result.returncode == 3
    assert result.stdout.splitlines() == ["==> say hello", "==> fail with three"]
    assert "some-output" in result.stderr and "some-error" in result.stderr
    assert "step 'fail with three' failed (exit 3); see the output above." in result.stderr
    assert "Do the thing, then rerun." in result.stderr
    assert "never shown" not in result.stderr


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('echo "Python 3.9.18"\n', "is Python 3.9; Offload needs Python 3.11 or newer"),
        ('echo "not a python"\n', "printed 'not a python', not a Python version"),
        # --version answers 3.11, but `import ensurepip` fails: Debian's python3 without
        # python3-venv, in a place apt cannot fix.
        (
            '[ "$1" = --version ] && { echo "Python 3.11.9"; exit 0; }\nexit 1\n',
            "cannot create virtualenvs: its ensurepip module is missing",
        ),
    ],
    ids=["python-3.9", "not-python", "no-ensurepip"],
)
def test_an_unusable_python_stops_bootstrap_saying_what_to_do(
    tmp_path: Path, body: str, expected: str
) -> None:
    python = fake_python(tmp_path, body)
    result = run_bash([str(BOOTSTRAP)], script_env(tmp_path, PYTHON=str(python)))

    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert "PYTHON" in result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_missing_interpreter_stops_bootstrap_saying_what_to_do(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-python3.11"
    result = run_bash([str(BOOTSTRAP)], script_env(tmp_path, PYTHON=str(missing)))

    assert result.returncode != 0
    assert f"PYTHON={missing} is not an executable" in result.stderr
    assert "Install python3 (3.11 or newer) from your distribution" in result.stderr


# ---- scripts/device/gpu_check.sh: its early stops (no GPU, no wheelhouse), each its own status --

GPU_CHECK = ROOT / "scripts" / "device" / "gpu_check.sh"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def gpu_check(tmp_path: Path, bin_dir: Path | None = None, **extra: str) -> tuple[int, str]:
    env = script_env(tmp_path, OUT=str(tmp_path / "out"), **extra)
    env["PATH"] = f"{bin_dir}:{SYSTEM_PATH}" if bin_dir else SYSTEM_PATH
    result = run_bash([str(GPU_CHECK)], env)
    assert "Traceback" not in result.stdout + result.stderr
    assert (tmp_path / "out" / "gpu_check.log").read_text().strip()  # the log is kept
    return result.returncode, result.stdout + result.stderr


def fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.skipif(
    any(Path(d, "nvidia-smi").exists() for d in SYSTEM_PATH.split(":")), reason="a GPU host"
)
def test_gpu_check_without_nvidia_smi_says_there_is_no_gpu(tmp_path: Path) -> None:
    status, output = gpu_check(tmp_path)

    assert status == 3, output
    assert "== step machine" in output and "nvidia-smi                         MISSING" in output
    assert "FAILED at step machine: no NVIDIA GPU here: nvidia-smi is not installed" in output
    assert "== step python" not in output


def test_gpu_check_stops_when_nvidia_smi_lists_no_gpu(tmp_path: Path) -> None:
    fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA-SMI has failed: no driver"; exit 9\n')

    status, output = gpu_check(tmp_path, tmp_path / "bin")

    assert status == 3, output
    assert "`nvidia-smi -L` fails: NVIDIA-SMI has failed: no driver" in output


def test_gpu_check_without_the_wheelhouse_says_how_to_make_it(tmp_path: Path) -> None:
    fake_tool(
        tmp_path / "bin",
        "nvidia-smi",
        '[ "$1" = -L ] && { echo "GPU 0: Fake (UUID: GPU-1)"; exit 0; }\n'
        'echo "0, GPU-1, Fake, 1024, 550.1"\n',
    )

    status, output = gpu_check(
        tmp_path, tmp_path / "bin", GPU_CHECK_WHEELS=str(tmp_path / "no-wheels")
    )

    assert status == 4, output
    assert "driver: 550.1" in output
    assert "FAILED at step python: no wheelhouse" in output
    assert "scripts/device/build_wheels.sh" in output
