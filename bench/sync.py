"""File sync benchmark: Offload's sync against `rsync -a` over OpenSSH and `unison`, same run.

Measures, on a tree of 10,000 files / 100 MB (mostly small files, a few large ones):
  initial   time to copy the whole tree into an empty directory "on the runner" (here: another
            directory, reached over SSH on loopback); the runner side runs in its own process
  latency   change-to-visible for a single edit on the laptop, p50 and p95 over 200 edits
            (Offload's continuous sync; rsync and unison have no continuous mode to compare)

Prints ratios (peer time / Offload time: above 1 means Offload is faster) and writes
bench/results/sync-<timestamp>.json. Needs Debian's `rsync`, `unison` and `openssh-server`.

Run as root from the repository: `.venv/bin/python bench/sync.py [--files 10000] [--mb 100]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"

from offload.core.waiting import wait_until  # noqa: E402
from tests.support.net import free_port  # noqa: E402


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def make_tree(root: Path, files: int, megabytes: int) -> None:
    """`files` files in 100 directories; 10 large files carry half of the bytes."""
    large = 10
    large_size = megabytes * 1024 * 1024 // 2 // large
    small_size = megabytes * 1024 * 1024 // 2 // (files - large)
    for d in range(100):
        (root / f"d{d:02}" / "sub").mkdir(parents=True)
    for i in range(files - large):
        sub = "sub/" if i % 3 == 0 else ""
        (root / f"d{i % 100:02}" / f"{sub}f{i}.txt").write_bytes(os.urandom(small_size))
    for i in range(large):
        with (root / f"d{i:02}" / f"large{i}.bin").open("wb") as fh:
            fh.write(os.urandom(large_size))
    subprocess.run(["sync"], check=True)


def drop_dest(path: Path) -> None:
    """An empty destination, with the previous run's writes flushed so they do not stall this one."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.sync()


# ---- peers ----------------------------------------------------------------------------------


@contextmanager
def openssh(work: Path) -> Iterator[Path]:
    """A local sshd; yields an ssh config file with Host `bench`."""
    d = work / "openssh"
    d.mkdir()
    port = free_port()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", d / name], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nUsePAM no\nStrictModes no\n"
        f"PidFile {d / 'sshd.pid'}\nCiphers aes128-gcm@openssh.com,chacha20-poly1305@openssh.com\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", d / "sshd_config"], stderr=subprocess.DEVNULL
    )
    config = d / "ssh_config"
    config.write_text(
        f"Host bench\n  HostName 127.0.0.1\n  Port {port}\n  User root\n  IdentityFile {d / 'client'}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
        "  Ciphers aes128-gcm@openssh.com\n"
    )
    try:
        wait_until(lambda: port_open(port), 10, "sshd")
        yield config
    finally:
        sshd.terminate()
        sshd.wait()


def time_rsync(src: Path, dest: Path, config: Path) -> float:
    drop_dest(dest)
    started = time.perf_counter()
    subprocess.run(
        ["rsync", "-a", "-e", f"ssh -F {config}", f"{src}/", f"bench:{dest}/"], check=True
    )
    return time.perf_counter() - started


def time_unison(src: Path, dest: Path, config: Path, work: Path) -> float:
    drop_dest(dest)
    unison_dir = work / "unison-home"  # archives of both ends, so nothing lands in ~/.unison
    shutil.rmtree(unison_dir, ignore_errors=True)
    unison_dir.mkdir()
    env = {**os.environ, "UNISON": str(unison_dir)}
    started = time.perf_counter()
    subprocess.run(
        ["unison", str(src), f"ssh://bench/{dest}", "-batch", "-auto", "-times", "-silent",
         "-ignorearchives", "-sshargs", f"-F {config}", "-ui", "text",
         "-servercmd", f"env UNISON={unison_dir} /usr/bin/unison"],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return time.perf_counter() - started


# ---- offload --------------------------------------------------------------------------------


def serve(port_file: Path, area: Path) -> None:
    """The runner side, in its own process: an SSH server whose /sync runs the endpoint."""
    import asyncssh  # noqa: PLC0415

    from offload.sync.remote import RemoteEndpoint  # noqa: PLC0415
    from tests.integration.sync.support import _Server  # noqa: PLC0415

    async def main() -> None:
        endpoint = RemoteEndpoint(area)
        acceptor = await asyncssh.create_server(
            lambda: _Server(endpoint, set()), "127.0.0.1", 0,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], config=[],
            encryption_algs=["aes128-gcm@openssh.com"], compression_algs=None,
            window=16 * 1024 * 1024, max_pktsize=256 * 1024,
        )  # fmt: skip
        port_file.write_text(str(acceptor.get_port()))
        await asyncio.Event().wait()

    asyncio.run(main())


async def offload_run(src: Path, area: Path, work: Path, edits: int) -> dict[str, float]:
    import asyncssh  # noqa: PLC0415

    from offload.sync.laptop import LaptopSync  # noqa: PLC0415

    drop_dest(area)
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port_file), str(area)])
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text(), 20, "the sync server")
        conn = await asyncssh.connect(
            "127.0.0.1", int(port_file.read_text()), username="bench", known_hosts=None,
            config=[], client_keys=None, agent_path=None,
            encryption_algs=["aes128-gcm@openssh.com"], compression_algs=None,
            window=16 * 1024 * 1024, max_pktsize=256 * 1024,
        )  # fmt: skip

        async def open_stream():  # type: ignore[no-untyped-def]
            return await conn.open_unix_connection(
                "/sync", encoding=None, window=16 * 1024 * 1024, max_pktsize=256 * 1024
            )

        sync = LaptopSync(src, "bbench", open_stream)
        started = time.perf_counter()
        await sync.start()
        initial = time.perf_counter() - started
        latencies = await edit_latencies(
            src / "d00" / "edited.txt", area / "bbench" / "d00" / "edited.txt", edits
        )
        await sync.close()
        conn.close()
        return {"initial_s": initial, **latencies}
    finally:
        server.terminate()
        server.wait()


async def edit_latencies(laptop_file: Path, remote_file: Path, edits: int) -> dict[str, float]:
    samples: list[float] = []
    for i in range(edits):
        content = f"edit {i} {time.time_ns()}\n".encode()
        started = time.perf_counter()
        laptop_file.write_bytes(content)
        deadline = started + 10
        while True:
            try:
                if remote_file.read_bytes() == content:
                    break
            except FileNotFoundError:
                pass
            if time.perf_counter() > deadline:
                raise TimeoutError(f"edit {i} never became visible")
            await asyncio.sleep(0.001)
        samples.append(time.perf_counter() - started)
    samples.sort()
    return {
        "edit_p50_ms": statistics.median(samples) * 1000,
        "edit_p95_ms": samples[int(len(samples) * 0.95) - 1] * 1000,
        "edit_max_ms": samples[-1] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--edits", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5, help="initial syncs per tool (median kept)")
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]))
        return
    with tempfile.TemporaryDirectory(prefix="obench-sync-") as tmp:
        work = Path(tmp)
        src = work / "laptop"
        src.mkdir()
        make_tree(src, args.files, args.mb)
        results: dict[str, object] = {
            "files": args.files,
            "megabytes": args.mb,
            "cpus": os.cpu_count(),
        }
        # Interleaved (offload, rsync, unison) x runs: background load hits every tool alike.
        samples: dict[str, list[float]] = {"offload": [], "rsync": [], "unison": []}
        with openssh(work) as config:
            for i in range(args.runs):
                run = asyncio.run(
                    offload_run(src, work / "area", work, args.edits if i == 0 else 1)
                )
                if i == 0:
                    results["offload"] = run
                samples["offload"].append(run["initial_s"])
                samples["rsync"].append(time_rsync(src, work / "rsync-dest", config))
                samples["unison"].append(time_unison(src, work / "unison-dest", config, work))
                print(f"run {i + 1}:", {k: round(v[-1], 2) for k, v in samples.items()}, flush=True)
        results["samples_s"] = samples
        # Medians: this machine is shared, so single runs swing with other work.
        results["offload"]["initial_s"] = statistics.median(samples["offload"])  # type: ignore[index]
        results["rsync_initial_s"] = statistics.median(samples["rsync"])
        results["unison_initial_s"] = statistics.median(samples["unison"])
    off = results["offload"]["initial_s"]  # type: ignore[index]
    results["ratio_rsync_over_offload"] = results["rsync_initial_s"] / off  # type: ignore[operator]
    results["ratio_unison_over_offload"] = results["unison_initial_s"] / off  # type: ignore[operator]
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"sync-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    o = results["offload"]
    print(f"initial sync of {args.files} files / {args.mb} MB (median of {args.runs}):")
    print(f"  offload {off:.2f}s   rsync -a over OpenSSH {results['rsync_initial_s']:.2f}s "
          f"(x{results['ratio_rsync_over_offload']:.2f})   unison {results['unison_initial_s']:.2f}s "
          f"(x{results['ratio_unison_over_offload']:.2f})")  # fmt: skip
    print(
        f"change-to-visible over {args.edits} edits: p50 {o['edit_p50_ms']:.1f} ms, "  # type: ignore[index]
        f"p95 {o['edit_p95_ms']:.1f} ms, max {o['edit_max_ms']:.1f} ms"
    )  # type: ignore[index]
    print(f"written to {out}")


if __name__ == "__main__":
    main()
