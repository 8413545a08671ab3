"""Published-port benchmark: HTTP through Offload's port forward against the peers.

One session engine (a dockerd in its own network namespace) runs busybox httpd published with
`-p PORT:80`. Every peer reaches that same published port (the same docker-proxy, the same
container):

  direct    a client socket created inside the session's namespace, to 127.0.0.1:PORT there
  openssh   an OpenSSH `ssh -L` forward: ssh client and sshd both in the session's namespace,
            on its loopback, forwarding to 127.0.0.1:PORT (the classic way to reach a remote port)
  offload   the agent's `PortForwarder` listening on PORT in this host's own namespace (the
            "laptop"), over one asyncssh connection (with `offload.core.ssh_fastpath`, as the
            agent and the runner install it) to the runner-side wiring (port gate, socket made
            in the namespace, protocol-level splice), taking standby channels as the agent
            does: agent and runner are two processes, as ssh and sshd are

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
from offload.core.waiting import wait_until  # noqa: E402
from offload.runner.netns_connect import socket_in_netns  # noqa: E402
from offload.runner.port_gate import PortGate  # noqa: E402
from tests.integration.ports.support import (  # noqa: E402
    SSHPair,
    connect_ports_client,
    environment_for,
    start_ports_server,
)
from tests.integration.tunnel.support import start_dockerd, stop_dockerd  # noqa: E402
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


def docker(host: str, *args: str) -> str:
    return subprocess.run(
        ["docker", "-H", host, *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def serves(make: MakeSocket, port: int, expected: int) -> bool:
    try:
        return get(make, port, SMALL, bytearray(4096))[1] >= expected
    except OSError:
        return False


@contextmanager
def web_container(host: str, image: str, port: int, mb: int) -> Iterator[None]:
    script = (
        f"mkdir -p /www && head -c 100 /dev/zero | tr '\\0' x > /www/{SMALL} && "
        f"head -c {mb * 1024 * 1024} /dev/zero > /www/{BIG} && exec httpd -f -p 80 -h /www"
    )
    docker(host, "run", "-d", "--name", "bench-web", "-p", f"{port}:80", image, "sh", "-c", script)
    try:
        yield
    finally:
        subprocess.run(["docker", "-H", host, "rm", "-f", "bench-web"], capture_output=True)


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
def offload_forward(work: Path, netns: str, engine: Path) -> Iterator[None]:
    """The runner side and the agent side of Offload, each in its own process."""
    keys = work / "keys"
    keys.mkdir()
    for name in ("host", "client"):
        asyncssh.generate_private_key("ssh-ed25519").write_private_key(keys / name)
    me = [sys.executable, __file__, "--keys", str(keys)]
    runner = subprocess.Popen(
        [*me, "--role", "runner", "--netns", netns, "--engine", str(engine)],
        stdout=subprocess.PIPE,
        text=True,
    )
    agent = None
    try:
        assert runner.stdout is not None
        ssh_port = int(runner.stdout.readline().split()[1])
        agent = subprocess.Popen([*me, "--role", "agent", "--ssh-port", str(ssh_port)])
        yield
    finally:
        for proc in (agent, runner):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)


# ---- the two Offload roles (subprocesses) -----------------------------------------------------


def _keys(directory: Path) -> tuple[asyncssh.SSHKey, asyncssh.SSHKey]:
    return (
        asyncssh.read_private_key(directory / "host"),
        asyncssh.read_private_key(directory / "client"),
    )


async def run_runner(keys: Path, netns: str, engine: Path) -> None:
    host_key, client_key = _keys(keys)
    server = await start_ports_server(
        environment_for(engine, netns), PortGate(), host_key, client_key
    )
    print(f"PORT {server.get_port()}", flush=True)
    await _until_terminated()
    server.close()


async def run_agent(keys: Path, ssh_port: int) -> None:
    host_key, client_key = _keys(keys)
    client = await connect_ports_client(ssh_port, host_key, client_key)
    pair = SSHPair(server=None, client=client)  # type: ignore[arg-type]
    forwarder = PortForwarder(
        pair.open_tcp, pair.open_udp, pair.open_engine, take_tcp=pair.take_tcp
    )
    await forwarder.start()
    await _until_terminated()
    await forwarder.close()
    if pair.standby is not None:
        pair.standby.close()
    client.close()


async def _until_terminated() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--role", choices=("runner", "agent"), help=argparse.SUPPRESS)
    parser.add_argument("--keys", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--netns", help=argparse.SUPPRESS)
    parser.add_argument("--engine", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ssh-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "runner":
        asyncio.run(run_runner(args.keys, args.netns, args.engine))
        return
    if args.role == "agent":
        asyncio.run(run_agent(args.keys, args.ssh_port))
        return

    results: dict[str, object] = {
        "when": datetime.now(UTC).isoformat(),
        "host_cpus": os.cpu_count(),
    }
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="obench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        print("setting up: a session engine in its own netns, httpd published …", flush=True)
        dockerd = start_dockerd()
        stack.callback(stop_dockerd, dockerd)
        image = build_test_image(dockerd.host)
        stack.enter_context(web_container(dockerd.host, image, port, args.mb))
        inside = netns_socket(dockerd.netns)
        wait_until(lambda: serves(inside, port, 100), 30, "httpd in the namespace")
        stack.enter_context(openssh_forward(work, dockerd.netns, port))
        stack.enter_context(offload_forward(work, dockerd.netns, dockerd.socket))
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


if __name__ == "__main__":
    main()
