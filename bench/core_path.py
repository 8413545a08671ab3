"""Core path benchmark: Offload's tunnel against the peers, all on the same session engine.

Peers, measured in the same run:
  direct    the session engine's own unix socket on the runner (no tunnel at all)
  openssh   an OpenSSH `ssh -L local.sock:engine.sock` forward through a local sshd
  ssh://    docker's own `DOCKER_HOST=ssh://` transport (ssh + `docker system dial-stdio`)
  offload   the Offload agent socket (asyncssh, one multiplexed connection)

Measures per-command latency (`docker version`, `docker ps`), bulk throughput (`docker import`
of a 300 MB tarball) and the time from `docker offload start` to the first `docker run` output
with a warm pool. Prints ratios and writes bench/results/core_path-<timestamp>.json.

Run as root from the repository: `.venv/bin/python bench/core_path.py [--runs 30] [--mb 300]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
BIN = Path(sys.executable).parent
RESULTS = REPO / "bench" / "results"

from offload.core.waiting import wait_until  # noqa: E402
from offload.runner.environment import ENV_LABEL  # noqa: E402
from tests.support.images import write_build_context  # noqa: E402
from tests.support.net import free_port  # noqa: E402


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "home"
        self.home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "OFFLOAD_"))}
        self.env = {**env, "HOME": str(self.home), "PATH": f"{BIN}:{env['PATH']}"}
        self.run_dir = Path(f"/run/obench-{os.getpid()}")
        self.ssh_port = free_port()

    def run(
        self, *args: str, env: dict[str, str] | None = None, **kw
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args), env=env or self.env, capture_output=True, text=True, check=True, **kw
        )

    # ---- set-up ---------------------------------------------------------------------------

    @contextmanager
    def deployment(self) -> Iterator[None]:
        self.run(
            str(BIN / "offload"),
            "up",
            "--port",
            str(free_port()),
            "--ssh-port",
            str(self.ssh_port),
            "--run-dir",
            str(self.run_dir),
            "--cgroup-parent",
            f"offload-bench-{os.getpid()}",
            "--pool-size",
            "1",
            timeout=300,
        )
        try:
            yield
        finally:
            subprocess.run([str(BIN / "offload"), "down"], env=self.env, capture_output=True)
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def warm_pool_ready(self) -> bool:
        """One more environment than sessions: the warm one is waiting."""
        return len(list(self.run_dir.glob("env-*/sock/docker.sock"))) >= 1 + self.sessions_running()

    def sessions_running(self) -> int:
        return 1 if (self.home / ".offload" / "session.json").exists() else 0

    def start_session(self) -> None:
        self.run("docker", "offload", "start", "--timeout", "60s")

    def session_engine(self) -> Path:
        labels = self.run("docker", "info", "--format", "{{json .Labels}}").stdout.strip()
        engine_id = next(x for x in json.loads(labels) if x.startswith(ENV_LABEL + "="))
        env_id = engine_id.partition("=")[2]
        sock = self.run_dir / env_id / "sock" / "docker.sock"
        if sock.exists():
            return sock
        raise RuntimeError("session engine not found")

    @contextmanager
    def openssh(self, engine: Path) -> Iterator[tuple[Path, str]]:
        """A local sshd; yields (ssh -L forwarded socket, ssh:// DOCKER_HOST)."""
        d = self.work / "openssh"
        d.mkdir()
        port = free_port()
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "host"], check=True
        )
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / "client"], check=True
        )
        shutil.copy(d / "client.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nUsePAM no\nStrictModes no\nAllowStreamLocalForwarding yes\n"
            f"PidFile {d / 'sshd.pid'}\nSetEnv DOCKER_HOST=unix://{engine}\n"
            "Ciphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com\n"
        )
        os.makedirs("/run/sshd", exist_ok=True)
        sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", d / "sshd_config"], stderr=subprocess.DEVNULL
        )
        ssh_dir = self.home / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "config").write_text(
            f"Host bench\n  HostName 127.0.0.1\n  Port {port}\n  User root\n"
            f"  IdentityFile {d / 'client'}\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
            "  Ciphers aes128-gcm@openssh.com\n"
        )
        # OpenSSH reads ~/.ssh from the passwd entry, not $HOME: docker's ssh:// transport finds
        # this config through an `ssh` wrapper first on the benchmark's PATH.
        wrapper_dir = d / "bin"
        wrapper_dir.mkdir()
        wrapper = wrapper_dir / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {ssh_dir / "config"} "$@"\n')
        wrapper.chmod(0o755)
        self.env["PATH"] = f"{wrapper_dir}:{self.env['PATH']}"
        forwarded = d / "fwd.sock"
        wait_until(lambda: _port_open(port), 10, "sshd")
        tunnel = subprocess.Popen(
            [
                "ssh",
                "-F",
                ssh_dir / "config",
                "-N",
                "-o",
                "StreamLocalBindUnlink=yes",
                "-L",
                f"{forwarded}:{engine}",
                "bench",
            ],
            env=self.env,
        )
        try:
            wait_until(forwarded.exists, 10, "the OpenSSH forward")
            yield forwarded, "ssh://bench"
        finally:
            tunnel.terminate()
            sshd.terminate()
            tunnel.wait()
            sshd.wait()

    # ---- measurements ---------------------------------------------------------------------

    def latency(self, host: str, argv: list[str], runs: int) -> dict[str, float]:
        env = {**self.env, "DOCKER_HOST": host}
        subprocess.run(["docker", *argv], env=env, capture_output=True, check=True)  # warm-up
        samples = []
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run(["docker", *argv], env=env, capture_output=True, check=True)
            samples.append((time.perf_counter() - began) * 1000)
        samples.sort()
        return {
            "median_ms": statistics.median(samples),
            "p90_ms": samples[int(0.9 * (len(samples) - 1))],
            "runs": runs,
        }

    def import_throughput(self, host: str, tarball: Path, tag: str) -> dict[str, float]:
        env = {**self.env, "DOCKER_HOST": host}
        began = time.perf_counter()
        subprocess.run(
            ["docker", "import", str(tarball), tag], env=env, capture_output=True, check=True
        )
        seconds = time.perf_counter() - began
        subprocess.run(["docker", "rmi", tag], env=env, capture_output=True)
        mb = tarball.stat().st_size / 1e6
        return {"seconds": seconds, "mb_per_s": mb / seconds, "mb": mb}

    def save_hello(self, hello: Path) -> Path:
        """Build the tiny test image once and save it: a new session's engine starts empty."""
        self.run("docker", "build", "-q", "-t", "hello", str(hello))
        saved = self.work / "hello.tar"
        self.run("docker", "save", "-o", str(saved), "hello")
        return saved

    def start_to_first_output(self, saved_image: Path) -> dict[str, float]:
        """`docker offload stop`, wait for a warm pool, then time start -> first run output.

        The new engine is empty, so the timed path loads the 2 MB test image between start and
        run (reported separately: a real user pulls their own image there).
        """
        self.run("docker", "offload", "stop", "--force")
        wait_until(self.warm_pool_ready, 120, "a warm environment", interval=0.1)
        began = time.perf_counter()
        self.start_session()
        started = time.perf_counter()
        self.run("docker", "load", "-q", "-i", str(saved_image))
        loaded = time.perf_counter()
        proc = subprocess.Popen(
            ["docker", "run", "--rm", "hello"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.readline()
        done = time.perf_counter()
        proc.wait()
        return {
            "start_s": started - began,
            "image_load_s": loaded - started,
            "run_to_output_s": done - loaded,
            "start_plus_run_s": (started - began) + (done - loaded),
            "total_s": done - began,
        }


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def make_tarball(path: Path, megabytes: int) -> Path:
    payload = path.parent / "payload.bin"
    with open(payload, "wb") as fh:
        for _ in range(megabytes):
            fh.write(os.urandom(1024 * 1024))
    with tarfile.open(path, "w") as tar:
        tar.add(payload, arcname="payload.bin")
    payload.unlink()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, object] = {
        "when": datetime.now(UTC).isoformat(),
        "host_cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="obench-") as tmp, ExitStack() as stack:
        bench = Bench(Path(tmp))
        hello = write_build_context(Path(tmp) / "hello")
        print("setting up: offload up + a session …", flush=True)
        stack.enter_context(bench.deployment())
        bench.start_session()
        engine = bench.session_engine()
        forwarded, ssh_url = stack.enter_context(bench.openssh(engine))
        agent = f"unix://{bench.home / '.offload' / 'run' / 'docker.sock'}"
        hosts = {
            "direct": f"unix://{engine}",
            "openssh": f"unix://{forwarded}",
            "ssh://": ssh_url,
            "offload": agent,
        }
        latency: dict[str, dict[str, dict[str, float]]] = {}
        for command in (["version"], ["ps"]):
            name = " ".join(command)
            latency[name] = {}
            for peer, host in hosts.items():
                runs = max(5, args.runs // 3) if peer == "ssh://" else args.runs
                latency[name][peer] = bench.latency(host, command, runs)
                print(
                    f"docker {name:8} {peer:8} median {latency[name][peer]['median_ms']:7.1f} ms",
                    flush=True,
                )
        results["latency"] = latency

        tarball = make_tarball(Path(tmp) / "bulk.tar", args.mb)
        throughput = {
            peer: bench.import_throughput(hosts[peer], tarball, f"bulk-{i}")
            for i, peer in enumerate(("openssh", "offload", "direct"))
        }
        for peer, t in throughput.items():
            print(f"docker import {t['mb']:.0f} MB {peer:8} {t['mb_per_s']:7.1f} MB/s", flush=True)
        results["throughput"] = throughput

        saved = bench.save_hello(hello)
        starts = [bench.start_to_first_output(saved) for _ in range(args.starts)]
        results["start_to_first_output"] = {
            key: statistics.median(s[key] for s in starts) for key in starts[0]
        }
        print(f"start -> first output: {results['start_to_first_output']}", flush=True)

    ratios = {}
    for name, peers in latency.items():
        direct = peers["direct"]["median_ms"]
        ratios[f"{name}: offload overhead over direct (ms)"] = (
            peers["offload"]["median_ms"] - direct
        )
        ratios[f"{name}: openssh -L overhead over direct (ms)"] = (
            peers["openssh"]["median_ms"] - direct
        )
        ratios[f"{name}: offload minus openssh overhead (ms, target <= 3)"] = (
            peers["offload"]["median_ms"] - peers["openssh"]["median_ms"]
        )
        ratios[f"{name}: ssh:// / offload (x, target >= 10)"] = (
            peers["ssh://"]["median_ms"] / peers["offload"]["median_ms"]
        )
    ratios["import throughput offload / openssh (target >= 0.70)"] = (
        throughput["offload"]["mb_per_s"] / throughput["openssh"]["mb_per_s"]
    )
    first = results["start_to_first_output"]
    ratios["start + first run output, warm pool (s, target <= 1.5)"] = first["start_plus_run_s"]  # type: ignore[index]
    ratios["  ... including the 2 MB image load (s)"] = first["total_s"]  # type: ignore[index]
    results["ratios"] = ratios
    print("\nRatios")
    for key, value in ratios.items():
        print(f"  {key:62} {value:8.2f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"core_path-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
