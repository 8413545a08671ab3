"""Published-port benchmark: HTTP through Offload's port forward against the peers.

One session engine, a real environment of the runner's own driver (`RootlessDriver`: a rootless
dockerd sandboxed under an identity of its own, in a network namespace of its own, with its policy
plugin; tests/integration/tunnel/support.py `start_environment`, runner settings apart from every
other runner's from tests/support/sandboxes.py), runs busybox httpd published with `-p PORT:80`
(docker-proxy inside the sandbox's user namespace). Every peer reaches that same published port
(the same docker-proxy, the same container):

  direct    a client socket created inside the session's namespace, to 127.0.0.1:PORT there
  openssh   an OpenSSH `ssh -L` forward: ssh client and sshd both in the session's namespace,
            on its loopback, forwarding to 127.0.0.1:PORT (the classic way to reach a remote port)
  offload   the agent's `PortForwarder` listening on PORT in this host's own namespace (the
            "laptop"), over one asyncssh connection (with `offload.core.ssh_fastpath`, tuned as
            the agent's tunnel) to the runner's real `SSHEndpoint` (signed in with a session
            certificate; its port gate, socket made in the namespace, protocol-level splice),
            taking standby channels as the agent does: agent and runner are two processes, as
            ssh and sshd are

The environment is created on a loop thread of this process, which serves its policy plugin while
the blocking benchmark client runs in the main thread; the runner process gets the session's
environment record (as the runner binds it) and its own `PortGate`. Everything is bounded (an
overall deadline, `--deadline`) and cleaned up on the way out, failure included: the environment is
destroyed and its runner's leftovers swept (`stop_environment`). Traffic stays on loopback and in
the environment's namespace.

OpenSSH's latency here (about 43 ms per request on the hosts tried) is its own behaviour with
`ssh -N -L`, a delayed-ACK-sized stall; the latency target compares Offload with the direct
connection, not with OpenSSH.

Peers take turns (rounds of requests, one large GET each), so that load from elsewhere on the host
hits them alike; the host's load average is recorded with the results. Measures, per peer: request latency (HTTP/1.0 GET of a 100-byte file, a new TCP connection per
request as curl or a browser without keep-alive makes it; p50 and p99) and throughput (GET of a
large file). Prints ratios and writes bench/results/ports-<timestamp>.json.

Run as root from the repository: `.venv/bin/python bench/ports.py [--requests 500] [--mb 256]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

import asyncssh  # noqa: E402

from offload.agent.ports import PortForwarder  # noqa: E402
from offload.core import ssh_fastpath  # noqa: E402
from offload.core.schemas import InstanceSpec  # noqa: E402
from offload.core.waiting import wait_until  # noqa: E402
from offload.runner.driver import Environment, EnvState  # noqa: E402
from offload.runner.netns_connect import socket_in_netns  # noqa: E402
from offload.runner.port_gate import PortGate  # noqa: E402
from offload.runner.ssh_endpoint import (  # noqa: E402
    CHANNEL_MAX_PKTSIZE,
    CHANNEL_WINDOW,
    ENCRYPTION_ALGS,
)
from tests.integration.ports.support import SSHPair  # noqa: E402
from tests.integration.tunnel.support import (  # noqa: E402
    CertificateAuthority,
    Dockerd,
    LoopThread,
    Runner,
    docker_env,
    start_environment,
    stop_environment,
)
from tests.support.images import build_test_image  # noqa: E402
from tests.support.net import free_port  # noqa: E402

SMALL = "small.html"
BIG = "big.bin"
SSHD_PORT = 2222  # inside the session's namespace, which has nothing else
OPENSSH_LOCAL_PORT = 2223


# ---- the client: blocking sockets, the same code for every peer --------------------------------

MakeSocket = Callable[[], socket.socket]


def root_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM)


def netns_socket(netns: str) -> MakeSocket:
    def make() -> socket.socket:
        sock = socket_in_netns(netns)
        sock.setblocking(True)
        return sock

    return make


def get(make: MakeSocket, port: int, path: str, buffer: bytearray) -> tuple[float, int]:
    """One HTTP/1.0 GET on a new connection: (seconds from connect to the answer's end, bytes).

    The socket is made before the clock starts: creating it inside a namespace is the benchmark
    client's own cost, not the peer's.
    """
    sock = make()
    try:
        began = time.perf_counter()
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET /{path} HTTP/1.0\r\nHost: bench\r\n\r\n".encode())
        view = memoryview(buffer)
        total = 0
        while n := sock.recv_into(view):
            total += n
        return time.perf_counter() - began, total
    finally:
        sock.close()


Peers = dict[str, tuple[MakeSocket, int]]
ROUNDS = 10  # peers take turns, so that load from elsewhere on the host hits them all alike


def latency(peers: Peers, requests: int) -> dict[str, dict[str, float]]:
    buffer = bytearray(64 * 1024)
    samples: dict[str, list[float]] = {peer: [] for peer in peers}
    for make, port in peers.values():
        for _ in range(20):  # warm-up: caches, the gate's cache, connection set-up paths
            get(make, port, SMALL, buffer)
    for _ in range(ROUNDS):
        for peer, (make, port) in peers.items():
            samples[peer] += [
                get(make, port, SMALL, buffer)[0] * 1000 for _ in range(requests // ROUNDS)
            ]
    return {peer: _percentiles(sorted(values)) for peer, values in samples.items()}


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(values),
        "p99_ms": values[min(len(values) - 1, int(0.99 * len(values)))],
        "mean_ms": statistics.fmean(values),
        "requests": len(values),
    }


def throughput(peers: Peers, runs: int) -> dict[str, dict[str, float]]:
    buffer = bytearray(1024 * 1024)
    rates: dict[str, list[float]] = {peer: [] for peer in peers}
    size = 0
    for make, port in peers.values():
        get(make, port, BIG, buffer)  # warm-up
    for _ in range(runs):
        for peer, (make, port) in peers.items():
            seconds, size = get(make, port, BIG, buffer)
            rates[peer].append(size / seconds / 1e6)
    return {
        peer: {"mb_per_s": statistics.median(r), "best_mb_per_s": max(r), "mb": size / 1e6}
        for peer, r in rates.items()
    }


# ---- set-up -----------------------------------------------------------------------------------


def docker(d: Dockerd, *args: str, check: bool = True) -> str:
    """The docker CLI against the session engine (no user config, contexts or DOCKER_HOST)."""
    return subprocess.run(
        ["docker", "-H", d.host, *args],
        check=check,
        capture_output=True,
        text=True,
        timeout=120,
        env=docker_env(d.cli_home),
    ).stdout.strip()


def serves(make: MakeSocket, port: int, expected: int) -> bool:
    try:
        return get(make, port, SMALL, bytearray(4096))[1] >= expected
    except OSError:
        return False


@contextmanager
def web_container(d: Dockerd, image: str, port: int, mb: int) -> Iterator[None]:
    script = (
        f"mkdir -p /www && head -c 100 /dev/zero | tr '\\0' x > /www/{SMALL} && "
        f"head -c {mb * 1024 * 1024} /dev/zero > /www/{BIG} && exec httpd -f -p 80 -h /www"
    )
    docker(d, "run", "-d", "--name", "bench-web", "-p", f"{port}:80", image, "sh", "-c", script)
    try:
        yield
    finally:
        docker(d, "rm", "-f", "bench-web", check=False)


@contextmanager
def openssh_forward(work: Path, netns: str, port: int) -> Iterator[None]:
    """sshd and `ssh -N -L` inside the session's namespace, forwarding to the published port."""
    d = work / "openssh"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    (d / "sshd_config").write_text(
        f"Port {SSHD_PORT}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nUsePAM no\nStrictModes no\nAllowTcpForwarding yes\n"
        f"PidFile {d / 'sshd.pid'}\nCiphers aes128-gcm@openssh.com\n"
    )
    (d / "ssh_config").write_text(
        f"Host bench\n  HostName 127.0.0.1\n  Port {SSHD_PORT}\n  User root\n"
        f"  IdentityFile {d / 'client'}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  Ciphers aes128-gcm@openssh.com\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    enter = ["nsenter", f"--net=/var/run/netns/{netns}"]
    sshd = subprocess.Popen(
        [*enter, "/usr/sbin/sshd", "-D", "-e", "-f", d / "sshd_config"], stderr=subprocess.DEVNULL
    )
    forward = f"127.0.0.1:{OPENSSH_LOCAL_PORT}:127.0.0.1:{port}"
    ssh = None
    try:
        wait_until(lambda: _connects(netns_socket(netns), SSHD_PORT), 10, "sshd")
        ssh = subprocess.Popen(
            [*enter, "ssh", "-F", d / "ssh_config", "-N", "-L", forward, "bench"]
        )
        wait_until(lambda: _connects(netns_socket(netns), OPENSSH_LOCAL_PORT), 10, "ssh -L")
        yield
    finally:
        for proc in (ssh, sshd):
            if proc is not None:
                proc.terminate()
                proc.wait()


def _connects(make: MakeSocket, port: int) -> bool:
    sock = make()
    try:
        sock.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


@contextmanager
def offload_forward(work: Path, d: Dockerd) -> Iterator[None]:
    """The runner side and the agent side of Offload, each in its own process.

    The runner process serves one session bound to `d`'s environment through the real
    `SSHEndpoint`; the agent process signs in with that session's certificate."""
    keys = work / "keys"
    keys.mkdir()
    session_id = f"ses-bench-{os.getpid()}"
    ca = CertificateAuthority()
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    ca.key.write_private_key(keys / "ca")
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(keys / "host")
    client_key.write_private_key(keys / "client")
    (keys / "client-cert.pub").write_text(ca.sign(client_key, [session_id]))
    (keys / "environment.json").write_text(json.dumps(_dump_environment(d.session(session_id))))
    for name in ("ca", "host", "client"):
        os.chmod(keys / name, 0o600)
    me = [sys.executable, __file__, "--keys", str(keys)]
    runner = subprocess.Popen([*me, "--role", "runner"], stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        assert runner.stdout is not None
        ssh_port = int(runner.stdout.readline().split()[1])
        agent = subprocess.Popen(
            [*me, "--role", "agent", "--ssh-port", str(ssh_port), "--session", session_id]
        )
        yield
    finally:
        for proc in (agent, runner):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


def _dump_environment(env: Environment) -> dict[str, object]:
    return {
        "id": env.id,
        "engine_socket": str(env.engine_socket),
        "mount_area": str(env.mount_area),
        "netns": env.netns,
        "spec": env.spec.model_dump(),
        "state": env.state.value,
        "session_id": env.session_id,
        "area_owner": list(env.area_owner) if env.area_owner is not None else None,
        "isolation": env.isolation,
    }


def _load_environment(data: dict) -> Environment:
    owner = data["area_owner"]
    return Environment(
        id=data["id"],
        engine_socket=Path(data["engine_socket"]),
        mount_area=Path(data["mount_area"]),
        netns=data["netns"],
        spec=InstanceSpec(**data["spec"]),
        state=EnvState(data["state"]),
        session_id=data["session_id"],
        area_owner=(owner[0], owner[1]) if owner is not None else None,
        isolation=data["isolation"],
    )


# ---- the two Offload roles (subprocesses) -----------------------------------------------------


async def run_runner(keys: Path) -> None:
    """The runner's real endpoint with one session, bound to the benchmark's environment."""
    env = _load_environment(json.loads((keys / "environment.json").read_text()))
    assert env.session_id is not None
    ca = CertificateAuthority()
    ca.key = asyncssh.read_private_key(keys / "ca")
    runner = Runner(host_key=asyncssh.read_private_key(keys / "host"), ca=ca)
    runner.sessions[env.session_id] = env
    endpoint = await runner.start(port_gate=PortGate())
    print(f"PORT {endpoint.port}", flush=True)
    await _until_terminated()
    await endpoint.stop()


async def run_agent(keys: Path, ssh_port: int, session_id: str) -> None:
    """A client tuned as the agent's tunnel (as `ssh_pair` connects), and the agent's forwarder."""
    ssh_fastpath.install()
    key = asyncssh.read_private_key(keys / "client")
    certificate = asyncssh.import_certificate((keys / "client-cert.pub").read_text())
    host_key = asyncssh.read_private_key(keys / "host").convert_to_public()
    client = await asyncssh.connect(
        "127.0.0.1",
        ssh_port,
        username=session_id,
        known_hosts=([host_key], [], []),
        client_keys=[(key, certificate)],
        agent_path=None,
        config=[],
        encryption_algs=ENCRYPTION_ALGS,
        compression_algs=None,
        window=CHANNEL_WINDOW,
        max_pktsize=CHANNEL_MAX_PKTSIZE,
    )
    pair = SSHPair(runner=None, client=client)  # type: ignore[arg-type]  # the runner is apart
    forwarder = PortForwarder(
        pair.open_tcp, pair.open_udp, pair.open_engine, take_tcp=pair.take_tcp
    )
    await forwarder.start()
    await _until_terminated()
    await forwarder.close()
    if pair.standby is not None:
        pair.standby.close()
    client.close()
    await client.wait_closed()


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# ---- main -------------------------------------------------------------------------------------


def set_up_and_measure(
    stack: ExitStack, work: Path, args: argparse.Namespace, port: int, results: dict[str, object]
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Set everything up (unwound by `stack`), then the latency and throughput rounds."""
    print("setting up: a session environment (RootlessDriver), httpd published …", flush=True)
    loop_thread = LoopThread()  # serves the environment's policy plugin; never blocked
    stack.callback(loop_thread.close)
    (work / "runner").mkdir()
    dockerd = start_environment(loop_thread, work / "runner")
    stack.callback(stop_environment, loop_thread, dockerd)
    results["environment"] = {"id": dockerd.env.id, "isolation": dockerd.env.isolation}
    image = build_test_image(dockerd.host)
    stack.enter_context(web_container(dockerd, image, port, args.mb))
    inside = netns_socket(dockerd.netns)
    wait_until(lambda: serves(inside, port, 100), 30, "httpd in the namespace")
    stack.enter_context(openssh_forward(work, dockerd.netns, port))
    stack.enter_context(offload_forward(work, dockerd))
    wait_until(lambda: serves(root_socket, port, 100), 30, "the Offload forward")

    results["load_average_before"] = os.getloadavg()
    peers: Peers = {
        "direct": (inside, port),
        "openssh": (inside, OPENSSH_LOCAL_PORT),
        "offload": (root_socket, port),
    }
    lat = latency(peers, args.requests)
    for peer, values in lat.items():
        print(
            f"latency    {peer:8} p50 {values['p50_ms']:6.3f} ms  p99 {values['p99_ms']:6.3f} ms",
            flush=True,
        )
    thr = throughput(peers, args.runs)
    for peer, values in thr.items():
        print(f"throughput {peer:8} {values['mb_per_s']:8.1f} MB/s", flush=True)
    results["load_average_after"] = os.getloadavg()
    return lat, thr


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--deadline", type=int, default=900, help="seconds for the whole run (set-up included)"
    )
    parser.add_argument("--role", choices=("runner", "agent"), help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ssh-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--session", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "runner":
        asyncio.run(run_runner(args.keys))
        return
    if args.role == "agent":
        asyncio.run(run_agent(args.keys, args.ssh_port, args.session))
        return
    _bounded(args.deadline)

    results: dict[str, object] = {
        "when": datetime.now(UTC).isoformat(),
        "host_cpus": os.cpu_count(),
    }
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="obench-") as tmp, ExitStack() as stack:
        try:
            lat, thr = set_up_and_measure(stack, Path(tmp), args, port, results)
        finally:
            signal.alarm(0)  # the clean-up (bounded step by step) is never cut short
    results["latency"] = lat
    results["throughput"] = thr
    ratios = {
        "p50 overhead offload - direct (ms, target < 1)": lat["offload"]["p50_ms"]
        - lat["direct"]["p50_ms"],
        "p50 overhead openssh - direct (ms)": lat["openssh"]["p50_ms"] - lat["direct"]["p50_ms"],
        "p99 overhead offload - direct (ms)": lat["offload"]["p99_ms"] - lat["direct"]["p99_ms"],
        "p99 overhead openssh - direct (ms)": lat["openssh"]["p99_ms"] - lat["direct"]["p99_ms"],
        "throughput offload / openssh (target >= 0.70)": thr["offload"]["mb_per_s"]
        / thr["openssh"]["mb_per_s"],
        "throughput offload / direct": thr["offload"]["mb_per_s"] / thr["direct"]["mb_per_s"],
    }
    results["ratios"] = ratios
    print("\nRatios")
    for key, value in ratios.items():
        print(f"  {key:50} {value:8.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ports-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")


def _bounded(seconds: int) -> None:
    """An overall deadline, and SIGTERM as an error: either way the set-up is unwound."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"bench/ports.py ran past its deadline ({seconds} s)")

    def terminated(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGALRM, expired)
    signal.signal(signal.SIGTERM, terminated)
    signal.alarm(seconds)


if __name__ == "__main__":
    main()
