"""Sandboxed engines benchmark: what the rootless sandbox (`RootlessDriver`) costs.

Four measurements, each printed as a ratio against its target or its earlier figure:

1. start -> first `docker run` output with a warm pool, through a real deployment (`offload up`,
   `docker offload start`, the agent): (a) start + the busybox test image provisioned into the
   empty session engine (`docker load` of a saved copy, or `docker build`) + `docker run --rm
   IMAGE echo hi`; (b) start + the engine answering (`docker version`) + the run of an image
   already in the engine: (b) is the figure for the 1.5 s target (the image provisioning in (a)
   is the user's own pull or build).  Plus the driver's own create time of an environment
   (`RootlessDriver.create`, its "environment ... ready in X s" log line), median of several.
2. per-command overhead and `docker import` throughput: bench/core_path.py run again, every
   figure divided by the same figure of the latest earlier result (target: no regression
   beyond 10%).
3. a container's download throughput (busybox `wget -O /dev/null`, 256 MB from tmpfs) from a
   web server in a network namespace of our own on a TEST-NET address (veth to the host),
   against the same download on the runner host itself (target >= 0.5x); in the default bridge
   network, with `--network host` (the sandbox's own namespace), and with other user-mode
   network settings: the other helper (`OFFLOAD_RUNNER_NETWORK=slirp4netns`, also with its
   seccomp / sandbox off), dockerd's `mtu` (`OFFLOAD_RUNNER_DOCKERD_CONFIG`) on a user-defined
   network (at 1500, and with the MTU the agent gives it), and, outside rootlesskit,
   slirp4netns on a bare user+network namespace.
4. memory of an idle environment: RSS and PSS (/proc/PID/smaps_rollup) of each of its processes
   and the cgroup's memory usage; again with one idle running container.

Parts 1-2 use a deployment; parts 3-4 drive `RootlessDriver` directly (in this process: the
authorization plugin is served by this process's event loop).  Everything is bounded (counts,
timeouts, an overall deadline) and cleaned up on the way out, failure included.  Traffic stays
on loopback and namespaces this benchmark creates.  Results: bench/results/sandbox-<ts>.json
and .txt (core_path's run writes its own core_path-<ts>.json and .txt).

Run as root from the repository: `.venv/bin/python bench/sandbox.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"
BASELINE = RESULTS / "core_path-20261123T045605Z.json"

import core_path  # noqa: E402  (bench/core_path.py: its deployment helper and its run)

from offload.core.config import NetworkHelper, RunnerSettings  # noqa: E402
from offload.core.defaults import SANDBOX_MTU  # noqa: E402
from offload.core.schemas import InstanceSpec  # noqa: E402
from offload.core.waiting import wait_until  # noqa: E402
from offload.runner import cgroups, identities  # noqa: E402
from offload.runner.daemon import egress_firewall  # noqa: E402
from offload.runner.environment import ENV_LABEL, RootlessDriver, teardown  # noqa: E402
from offload.runner.sandbox import SandboxSpec  # noqa: E402
from tests.support.images import write_build_context  # noqa: E402

# Identity ranges of our own (uids, and /etc/subuid ranges): a runner wipes every process of
# its range at start, so never share one with another runner on this host.
DRIVER_UID_BASE, DRIVER_SUBID_BASE = 1_970_000, 50_000_000
DEPLOY_UID_BASE, DEPLOY_SUBID_BASE = 1_980_000, 52_000_000
NOBODY = 65534
TEST_NETS = ("198.51.100.0/24", "203.0.113.0/24")  # TEST-NET-2, -3 (192.0.2/24 is often used)
BLOB_MB = 256
IMAGE = "hello"
DOWNLOAD_TIMEOUT_S = 120
CMD_TIMEOUT_S = 120

LINES: list[str] = []


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


class Deadline(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Deadline(f"stopped by signal {signal.Signals(signum).name}")


def run(
    argv: list[str], timeout: float = CMD_TIMEOUT_S, check: bool = True, **kw: Any
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ---- part 2: core_path again, against the earlier result ------------------------------------


def core_path_again(quick: bool) -> dict[str, Any]:
    args = ["--runs", "10", "--mb", "100", "--starts", "1"] if quick else []
    say(f"== 2. bench/core_path.py {' '.join(args)} (load {load_average()})")
    proc = subprocess.run(
        [sys.executable, str(HERE / "core_path.py"), *args],
        capture_output=True, text=True, timeout=900 if not quick else 450,
    )  # fmt: skip
    for line in proc.stdout.splitlines():
        say("   | " + line)
    if proc.returncode != 0:
        say("   core_path.py failed:\n" + proc.stderr[-3000:])
        raise RuntimeError("bench/core_path.py failed")
    written = re.search(r"wrote (\S+\.json)", proc.stdout)
    assert written, "core_path.py did not say where it wrote"
    new_path = Path(written.group(1))
    new_path.with_suffix(".txt").write_text(proc.stdout)
    new = json.loads(new_path.read_text())
    old = json.loads(BASELINE.read_text())
    rows: list[dict[str, Any]] = []

    def row(name: str, n: float, o: float, better: str) -> None:
        ratio = n / o if o else float("nan")
        ok = ratio <= 1.10 if better == "lower" else ratio >= 0.90
        rows.append({"figure": name, "new": n, "old": o, "new_over_old": ratio,
                     "better": better, "within_10pct": ok})  # fmt: skip

    for cmd, peers in new["latency"].items():
        for peer, fig in peers.items():
            row(f"docker {cmd} {peer} median ms", fig["median_ms"],
                old["latency"][cmd][peer]["median_ms"], "lower")  # fmt: skip
        for peer in ("offload", "openssh"):
            row(f"docker {cmd} {peer} overhead over direct ms",
                peers[peer]["median_ms"] - peers["direct"]["median_ms"],
                old["latency"][cmd][peer]["median_ms"] - old["latency"][cmd]["direct"]["median_ms"],
                "lower")  # fmt: skip
        row(f"docker {cmd} offload / direct (x)",
            peers["offload"]["median_ms"] / peers["direct"]["median_ms"],
            old["latency"][cmd]["offload"]["median_ms"] / old["latency"][cmd]["direct"]["median_ms"],
            "lower")  # fmt: skip
    for peer, fig in new["throughput"].items():
        row(f"docker import {peer} MB/s", fig["mb_per_s"],
            old["throughput"][peer]["mb_per_s"], "higher")  # fmt: skip
    for ref in ("openssh", "direct"):
        row(f"docker import offload / {ref} (x)",
            new["throughput"]["offload"]["mb_per_s"] / new["throughput"][ref]["mb_per_s"],
            old["throughput"]["offload"]["mb_per_s"] / old["throughput"][ref]["mb_per_s"],
            "higher")  # fmt: skip
    for key, value in new["start_to_first_output"].items():
        row(f"start->first output {key}", value, old["start_to_first_output"][key], "lower")
    say(f"\n   new/old against {BASELINE.name} (new: {new_path.name})")
    for r in rows:
        mark = "ok" if r["within_10pct"] else "REGRESSED >10%"
        say(f"   {r['figure']:46} new {r['new']:9.2f} old {r['old']:9.2f} "
            f"new/old {r['new_over_old']:6.2f}  {mark}")  # fmt: skip
    return {"new_result": new_path.name, "baseline": BASELINE.name, "args": args, "rows": rows}


# ---- part 1: start -> first run output through a deployment --------------------------------


class Deployment:
    def __init__(self, work: Path, stack: ExitStack) -> None:
        work.mkdir()
        self.bench = core_path.Bench(work)
        self.bench.env.update(
            OFFLOAD_RUNNER_IDENTITY_UID_BASE=str(DEPLOY_UID_BASE),
            OFFLOAD_RUNNER_SUBID_BASE=str(DEPLOY_SUBID_BASE),
        )
        self.hello = write_build_context(work / "hello")
        self.runner_log = self.bench.home / ".offload" / "embedded" / "logs" / "runner.log"
        stack.enter_context(self.bench.deployment())

    def docker(self, *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
        return run(["docker", *args], env=self.bench.env, timeout=timeout).stdout

    def session_env_id(self) -> str:
        labels = json.loads(self.docker("info", "--format", "{{json .Labels}}"))
        return next(x for x in labels if x.startswith(ENV_LABEL + "=")).partition("=")[2]

    def ready_lines(self) -> dict[str, float]:
        text = self.runner_log.read_text(errors="replace") if self.runner_log.exists() else ""
        return {
            m[1]: float(m[2]) for m in re.finditer(r"environment (\S+) ready in ([\d.]+)s", text)
        }

    def warm_ready(self, old: str) -> bool:
        """A fresh environment announced ready, with its socket, and the old one gone."""
        run_dir = self.bench.run_dir
        fresh = [
            e
            for e in self.ready_lines()
            if e != old and (run_dir / e / "sock" / "docker.sock").exists()
        ]
        return bool(fresh) and not (run_dir / old).exists()

    def runner_events(self, offset: int, wall0: float) -> dict[str, float]:
        """When the runner bound the session (s after `start` began), from its log."""
        with open(self.runner_log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        events: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            if not m:
                continue
            when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
            if re.search(r"session \S+ bound to environment", line):
                events.setdefault("runner_bound_at_s", when - wall0)
            elif "SSH connection for session" in line:
                events.setdefault("runner_ssh_bound_at_s", when - wall0)
        return events

    def cycle(self, mode: str, saved: Path) -> dict[str, float]:
        old = self.session_env_id()
        self.docker("offload", "stop", "--force", timeout=120)
        wait_until(lambda: self.warm_ready(old), 180, "a warm environment", interval=0.1)
        time.sleep(1.0)  # the pool marks it warm after the engine answers; let the CPUs settle
        log_offset = self.runner_log.stat().st_size
        wall0 = time.time()
        t0 = time.perf_counter()
        self.docker("offload", "start", "--timeout", "60s", timeout=120)
        t1 = time.perf_counter()
        self.docker("version", "--format", "{{.Server.Version}}")
        t2 = time.perf_counter()
        if mode == "load":
            self.docker("load", "-q", "-i", str(saved))
        else:
            self.docker("build", "-q", "-t", IMAGE, str(self.hello))
        t3 = time.perf_counter()
        proc = subprocess.Popen(
            ["docker", "run", "--rm", IMAGE, "echo", "hi"],
            env=self.bench.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline().strip()
            t4 = time.perf_counter()
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if first != "hi":
            raise RuntimeError(f"docker run printed {first!r}: {proc.stderr.read()[-500:]}")  # type: ignore[union-attr]
        return {
            **self.runner_events(log_offset, wall0),
            "start_s": t1 - t0,
            "engine_answer_s": t2 - t1,
            "image_s": t3 - t2,
            "run_to_output_s": t4 - t3,
            "b_start_answer_run_s": (t2 - t0) + (t4 - t3),
            "a_total_s": t4 - t0,
        }


def start_to_first_output(work: Path, stack: ExitStack, starts: int) -> dict[str, Any]:
    say(f"\n== 1. start -> first `docker run` output, warm pool (load {load_average()})")
    dep = Deployment(work, stack)
    dep.docker("offload", "start", "--timeout", "60s", timeout=120)
    engine_sock = dep.bench.session_engine()  # core_path's lookup, with the new layout
    say(f"   session engine {engine_sock}")
    saved = dep.bench.save_hello(dep.hello)
    cycles: dict[str, list[dict[str, float]]] = {"load": [], "build": []}
    for i in range(starts):
        for mode in ("load", "build"):
            c = dep.cycle(mode, saved)
            cycles[mode].append(c)
            say(f"   {mode:5} #{i + 1}: start {c['start_s']:.2f} + answer {c['engine_answer_s']:.3f}"
                f" + image {c['image_s']:.2f} + run {c['run_to_output_s']:.2f} s"
                f" -> (a) {c['a_total_s']:.2f} s, (b) {c['b_start_answer_run_s']:.2f} s"
                f"  (runner bound the session at {c.get('runner_bound_at_s', float('nan')):.2f} s)")  # fmt: skip
    summary = {
        mode: {k: statistics.median(c[k] for c in cs) for k in cs[0] if all(k in c for c in cs)}
        for mode, cs in cycles.items()
    }
    both = cycles["load"] + cycles["build"]
    pool_creates = list(dep.ready_lines().values())
    return {
        "cycles": cycles,
        "median": summary,
        "b_median_s": statistics.median(c["b_start_answer_run_s"] for c in both),
        "pool_create_s": pool_creates,
        "pool_create_median_s": median(pool_creates),
    }


# ---- the test web server ---------------------------------------------------------------------

SERVER = r"""
import http.server, os, sys
root = sys.argv[3]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        try:
            f = open(os.path.join(root, os.path.basename(self.path)), "rb")
        except OSError:
            self.send_error(404)
            return
        with f:
            self.send_response(200)
            self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(f)
        self.close_connection = True
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


@contextmanager
def test_server(work: Path) -> Iterator[str]:
    """A sendfile HTTP server in a network namespace of ours, veth to the host; yields its URL."""
    used = run(["ip", "-4", "route", "show"]).stdout + run(["ip", "-4", "-br", "addr"]).stdout
    net = next(
        (ipaddress.ip_network(n) for n in TEST_NETS if n.rsplit(".", 1)[0] not in used), None
    )
    if net is None:
        raise RuntimeError(f"every TEST-NET range {TEST_NETS} is in use on this host")
    host_ip, srv_ip = str(net.network_address + 1), str(net.network_address + 10)
    tag = str(os.getpid())
    ns, h, n = f"osbsrv-{tag}", f"osbh{tag}", f"osbn{tag}"
    blob_dir = work / "srv"
    blob_dir.mkdir()
    with ExitStack() as stack:
        run(["mount", "-t", "tmpfs", "-o", f"size={BLOB_MB + 16}m", "osb-blob", str(blob_dir)])
        stack.callback(lambda: run(["umount", "-l", str(blob_dir)], check=False))
        run(["ip", "netns", "add", ns])
        stack.callback(lambda: run(["ip", "netns", "del", ns], check=False))
        run(["ip", "link", "add", h, "type", "veth", "peer", "name", n])
        stack.callback(lambda: run(["ip", "link", "del", h], check=False))
        for argv in (
            ["ip", "link", "set", n, "netns", ns],
            ["ip", "addr", "add", f"{host_ip}/{net.prefixlen}", "dev", h],
            ["ip", "link", "set", h, "up"],
            ["ip", "-n", ns, "addr", "add", f"{srv_ip}/{net.prefixlen}", "dev", n],
            ["ip", "-n", ns, "link", "set", n, "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ):
            run(argv)
        with open(blob_dir / "blob", "wb") as fh:
            for _ in range(BLOB_MB):
                fh.write(os.urandom(1 << 20))
        script = work / "server.py"
        script.write_text(SERVER)
        port = 8080
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(script), srv_ip, str(port), str(blob_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def stop_server() -> None:
            server.kill()  # `ip netns exec` execs python: this is the server itself
            server.wait(timeout=10)

        stack.callback(stop_server)
        wait_until(lambda: _connects(srv_ip, port), 30, "the test web server", interval=0.1)
        say(f"   test server http://{srv_ip}:{port}/blob ({BLOB_MB} MB on tmpfs) in netns {ns}")
        yield f"http://{srv_ip}:{port}/blob"


def _connects(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


def mb_per_s(seconds: float) -> float:
    return BLOB_MB * (1 << 20) / 1e6 / seconds


def timed(argv: list[str], **kw: Any) -> float:
    began = time.perf_counter()
    run(argv, timeout=DOWNLOAD_TIMEOUT_S, **kw)
    return time.perf_counter() - began


def host_downloads(url: str, n: int) -> dict[str, Any]:
    wget = [timed(["busybox", "wget", "-q", "-O", "/dev/null", url]) for _ in range(n)]
    curl = []
    for _ in range(n):
        out = run(["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", url],
                  timeout=DOWNLOAD_TIMEOUT_S).stdout  # fmt: skip
        curl.append(float(out))
    return {
        "busybox_wget_mb_s": [mb_per_s(s) for s in wget],
        "curl_mb_s": [mb_per_s(s) for s in curl],
        "busybox_wget_median_mb_s": mb_per_s(statistics.median(wget)),
        "curl_median_mb_s": mb_per_s(statistics.median(curl)),
    }


_REAL = re.compile(r"real\s+(?:(\d+)m\s*)?([\d.]+)s")


async def container_downloads(sock: Path, container: str, url: str, n: int) -> list[float]:
    """MB/s of `wget -O /dev/null` in a running container, timed inside (busybox `time`)."""
    speeds = []
    for _ in range(n):
        out = await arun(
            ["docker", "-H", f"unix://{sock}", "exec", container,
             "time", "wget", "-q", "-O", "/dev/null", url],
            timeout=DOWNLOAD_TIMEOUT_S,
        )  # fmt: skip
        m = _REAL.search(out.stderr)
        if not m:
            raise RuntimeError(f"no timing from busybox time: {out.stderr[-300:]}")
        speeds.append(mb_per_s(int(m[1] or 0) * 60 + float(m[2])))
    return speeds


async def arun(
    argv: list[str], timeout: float = CMD_TIMEOUT_S, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """`run` off the event loop: the environment's authorization plugin is served by this loop."""
    return await asyncio.to_thread(run, argv, timeout, **kw)


# ---- parts 3-4: the driver itself ------------------------------------------------------------


class ReadyLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ready: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"environment (\S+) ready in ([\d.]+)s", record.getMessage())
        if m:
            self.ready[m[1]] = float(m[2])


def driver_settings(
    work: Path, dockerd_config: str = "{}", network: NetworkHelper = "pasta"
) -> RunnerSettings:
    return RunnerSettings(
        network=network,
        data_dir=work / "drv",
        run_dir=Path(f"/run/osbd-{os.getpid()}"),
        cgroup_parent=f"osb-drv-{os.getpid()}",
        identity_uid_base=DRIVER_UID_BASE,
        subid_base=DRIVER_SUBID_BASE,
        capacity=4,
        pool_size=0,
        dockerd_config=dockerd_config,
        dockerd_start_timeout_s=60,
    )


@contextmanager
def rootlesskit_options(replace: dict[str, str]) -> Iterator[None]:
    """Run the sandbox with some rootlesskit options changed (the benchmark's own patch)."""
    original = SandboxSpec._rootlesskit

    def patched(self: SandboxSpec) -> list[str]:
        return [replace.get(a, a) for a in original(self)]

    SandboxSpec._rootlesskit = patched  # type: ignore[method-assign]
    try:
        yield
    finally:
        SandboxSpec._rootlesskit = original  # type: ignore[method-assign]


def proc_memory(pid: int) -> dict[str, Any] | None:
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        status = Path(f"/proc/{pid}/status").read_text()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None

    def kb(text: str, key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(m[1]) if m else 0

    return {"pid": pid, "comm": comm, "rss_kb": kb(status, "VmRSS"), "pss_kb": kb(rollup, "Pss")}


def env_memory(
    settings: RunnerSettings, env_id: str, identity: identities.Identity
) -> dict[str, Any]:
    group = cgroups.env_cgroups(settings.cgroup_parent, env_id, settings.cgroup_root)
    pids = sorted(set(group.pids()) | set(identities.processes_of([identity])))
    procs = [p for p in (proc_memory(pid) for pid in pids) if p]
    out: dict[str, Any] = {
        "processes": procs,
        "rss_total_mb": sum(p["rss_kb"] for p in procs) / 1024,
        "pss_total_mb": sum(p["pss_kb"] for p in procs) / 1024,
    }
    if group.mode == "v1":
        mem = group.path("memory")
        usage = mem / "memory.usage_in_bytes"
        stat_file = mem / "memory.stat"
    else:
        mem = group.path()
        usage = mem / "memory.current"
        stat_file = mem / "memory.stat"
    if usage.exists():
        out["cgroup"] = str(mem)
        out["cgroup_usage_mb"] = int(usage.read_text()) / (1 << 20)
        stat = dict(line.split() for line in stat_file.read_text().splitlines())
        for key in ("total_rss", "total_cache", "anon", "file"):
            if key in stat:
                out[f"cgroup_{key}_mb"] = int(stat[key]) / (1 << 20)
    return out


def say_memory(title: str, mem: dict[str, Any]) -> None:
    say(f"   {title}: RSS {mem['rss_total_mb']:.1f} MB, PSS {mem['pss_total_mb']:.1f} MB, "
        f"cgroup usage {mem.get('cgroup_usage_mb', float('nan')):.1f} MB "
        f"(rss {mem.get('cgroup_total_rss_mb', mem.get('cgroup_anon_mb', float('nan'))):.1f}, "
        f"cache {mem.get('cgroup_total_cache_mb', mem.get('cgroup_file_mb', float('nan'))):.1f})")  # fmt: skip
    for p in mem["processes"]:
        say(f"      {p['comm']:18} pid {p['pid']:7}  RSS {p['rss_kb'] / 1024:6.1f} MB  "
            f"PSS {p['pss_kb'] / 1024:6.1f} MB")  # fmt: skip


class Driver:
    """One RootlessDriver and what it made; `close` wipes it all (idempotent)."""

    def __init__(self, settings: RunnerSettings) -> None:
        self.settings = settings
        self.driver = RootlessDriver(settings)
        self.made: list[str] = []

    async def create(self) -> tuple[Any, float]:
        began = time.monotonic()
        env = await self.driver.create(InstanceSpec(cpus=2.0, memory_bytes=4 << 30))
        self.made.append(env.id)
        return env, time.monotonic() - began

    async def destroy(self, env: Any) -> None:
        await self.driver.destroy(env)

    async def close(self) -> None:
        for env_id in self.made:
            with contextlib.suppress(Exception):
                await self.driver.destroy_id(env_id)
        await asyncio.to_thread(
            cgroups.remove_parent, self.settings.cgroup_parent, self.settings.cgroup_root
        )


async def prepare_container(sock: Path, hello: Path, network: str | None, name: str) -> str:
    host = ["docker", "-H", f"unix://{sock}"]
    await arun([*host, "build", "-q", "-t", IMAGE, str(hello)], timeout=300)
    net = ["--network", network] if network else []
    await arun([*host, "run", "-d", "--name", name, *net, IMAGE, "sleep", "3600"])
    mtu = (
        await arun(
            [
                *host,
                "exec",
                name,
                "cat",
                "/sys/class/net/" + ("tap0" if network == "host" else "eth0") + "/mtu",
            ],
            check=False,
        )
    ).stdout
    return mtu.strip()


def helper_args(identity: identities.Identity) -> str:
    """The command line of the sandbox's network helper (pasta or slirp4netns)."""
    for pid in identities.processes_of([identity]):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith((b"slirp4netns", b"pasta")):
                return " ".join(a.decode() for a in argv if a)
    return "?"


async def driver_parts(work: Path, url: str, quick: bool, creates: int) -> dict[str, Any]:
    n = 2 if quick else 5
    settle = 3.0 if quick else 10.0
    hello = write_build_context(work / "hello-drv")
    ready = ReadyLog()
    logging.getLogger("offload.runner.environment").addHandler(ready)
    logging.getLogger("offload.runner.environment").setLevel(logging.INFO)
    settings = driver_settings(work)
    egress = egress_firewall(settings)
    await egress.install()
    drivers: list[Driver] = []
    out: dict[str, Any] = {}
    try:
        # ---- 1 (driver): create time, 4: memory, 3: downloads in the default sandbox
        say(f"\n== 1'. RootlessDriver.create, {creates} environments (load {load_average()})")
        d = Driver(settings)
        drivers.append(d)
        env, wall = await d.create()
        rt = d.driver._runtimes[env.id]
        assert rt.identity is not None
        create_s = [ready.ready.get(env.id, wall)]
        say(f"   {env.id} ready in {create_s[-1]:.2f} s (log line; wall {wall:.2f} s)")
        for _ in range(creates - 1):
            other, wall = await d.create()
            create_s.append(ready.ready.get(other.id, wall))
            say(f"   {other.id} ready in {create_s[-1]:.2f} s (log line; wall {wall:.2f} s)")
            await d.destroy(other)
        out["create_s"] = create_s
        out["create_median_s"] = statistics.median(create_s)
        say(f"   median {out['create_median_s']:.2f} s")

        say(f"\n== 4. memory of one environment (after {settle:.0f} s idle)")
        await asyncio.sleep(settle)
        idle = await asyncio.to_thread(env_memory, settings, env.id, rt.identity)
        say_memory("idle environment", idle)
        sock = env.engine_socket
        mtu_bridge = await prepare_container(sock, hello, None, "dl")
        await asyncio.sleep(settle)
        with_container = await asyncio.to_thread(env_memory, settings, env.id, rt.identity)
        say_memory("with one idle container (busybox sleep)", with_container)
        out["memory"] = {"idle_env": idle, "with_idle_container": with_container}

        say(f"\n== 3. download {BLOB_MB} MB: host vs container (load {load_average()})")
        host = await asyncio.to_thread(host_downloads, url, max(5, 3 * n))  # ~0.1 s each
        say(f"   host busybox wget  {host['busybox_wget_median_mb_s']:8.1f} MB/s  "
            f"curl {host['curl_median_mb_s']:8.1f} MB/s")  # fmt: skip
        ref = host["busybox_wget_median_mb_s"]
        variants: dict[str, Any] = {}

        async def measure(label: str, sock: Path, name: str, mtu: str, slirp: str) -> None:
            speeds = await container_downloads(sock, name, url, n)
            med = statistics.median(speeds)
            variants[label] = {"mb_s": speeds, "median_mb_s": med, "container_mtu": mtu,
                               "over_host_wget": med / ref,
                               "over_host_curl": med / host["curl_median_mb_s"],
                               "network_helper": slirp}  # fmt: skip
            say(f"   {label:44} {med:8.1f} MB/s  {med / ref:5.2f}x host wget  "
                f"{med / host['curl_median_mb_s']:5.2f}x curl  (mtu {mtu})")  # fmt: skip

        slirp = helper_args(rt.identity)
        say(f"   sandbox's network helper: {slirp}")
        await measure("sandbox, bridge network (as shipped: pasta)", sock, "dl", mtu_bridge, slirp)
        mtu_host = await prepare_container(sock, hello, "host", "dlh")
        await measure("sandbox, --network host", sock, "dlh", mtu_host, slirp)
        await d.destroy(env)

        # ---- 3: other settings, one fresh environment each
        tries: list[tuple[str, dict[str, str], str, NetworkHelper]] = [
            ("OFFLOAD_RUNNER_NETWORK=slirp4netns", {}, "{}", "slirp4netns"),
            ("slirp4netns, rootlesskit --slirp4netns-sandbox=false, -seccomp=false",
             {"--slirp4netns-seccomp=auto": "--slirp4netns-seccomp=false",
              "--slirp4netns-sandbox=auto": "--slirp4netns-sandbox=false"}, "{}", "slirp4netns"),
            ('pasta, dockerd_config {"mtu": 65520}', {}, '{"mtu": 65520}', "pasta"),
        ]  # fmt: skip
        for label, replace, config, network in tries:
            dv = Driver(driver_settings(work, config, network))
            drivers.append(dv)
            with rootlesskit_options(replace):
                e, _ = await dv.create()
            r = dv.driver._runtimes[e.id]
            assert r.identity is not None
            mtu = await prepare_container(e.engine_socket, hello, None, "dl")
            slirp = helper_args(r.identity)
            await measure(label + ", bridge", e.engine_socket, "dl", mtu, slirp)
            if config != "{}":
                # dockerd's `mtu` is the default bridge's: a user-defined network (compose's)
                # keeps 1500 unless it says otherwise, as it does when created through the agent
                # (offload.agent.networks adds the sandbox's MTU; this talks to the engine)
                docker = ["docker", "-H", f"unix://{e.engine_socket}"]
                await arun([*docker, "network", "create", "usernet"])
                mtu = await prepare_container(e.engine_socket, hello, "usernet", "dlu")
                await measure(label + ", user-defined network at 1500", e.engine_socket, "dlu",
                              mtu, slirp)  # fmt: skip
                await arun([*docker, "network", "create", "-o",
                            f"com.docker.network.driver.mtu={SANDBOX_MTU}", "agentnet"])  # fmt: skip
                mtu = await prepare_container(e.engine_socket, hello, "agentnet", "dla")
                await measure(label + ", user-defined network as the agent creates it",
                              e.engine_socket, "dla", mtu, slirp)  # fmt: skip
            await dv.destroy(e)
        out["download"] = {"host": host, "container": variants}
    finally:
        for drv in drivers:
            await drv.close()
        with contextlib.suppress(Exception):
            await egress.uninstall()
        logging.getLogger("offload.runner.environment").removeHandler(ready)
    return out


# ---- 3 (raw): slirp4netns alone, outside rootlesskit ---------------------------------


def raw_usermode(url: str, n: int) -> dict[str, Any]:
    """busybox wget in a bare user+network namespace of `nobody`, through slirp4netns (flags as
    rootlesskit passes them, and fewer): the user-mode stack alone, no bridge (pasta, the
    default helper, is measured in the sandbox in part 3 and by bench/pasta_probe.py)."""
    say("\n== 3'. raw user-mode networking (nobody's user+net namespace, host busybox wget)")
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    holder = subprocess.Popen(
        [
            *as_nobody,
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "--fork",
            "--kill-child",
            "sleep",
            "600",
        ],
        stdin=subprocess.DEVNULL,
    )
    results: dict[str, Any] = {}
    try:

        def child() -> int | None:
            kids = Path(f"/proc/{holder.pid}/task/{holder.pid}/children").read_text().split()
            return int(kids[0]) if kids else None

        wait_until(lambda: child() is not None, 10, "the namespace holder", interval=0.05)
        pid = child()
        assert pid is not None
        enter = ["nsenter", "-t", str(pid), "-U", "-n", "--preserve-credentials"]
        slirp = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback"]
        tries = {
            "slirp4netns --enable-sandbox --enable-seccomp (rootlesskit's)":
                [*slirp, "--enable-sandbox", "--enable-seccomp", str(pid), "tap0"],
            "slirp4netns --enable-sandbox": [*slirp, "--enable-sandbox", str(pid), "tap0"],
            "slirp4netns (no sandbox, no seccomp)": [*slirp, str(pid), "tap0"],
        }  # fmt: skip
        for label, argv in tries.items():
            proc = subprocess.Popen(
                [*as_nobody, *argv],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            try:

                def up(proc: subprocess.Popen[bytes] = proc) -> bool:
                    routes = run([*enter, "ip", "route"], check=False).stdout
                    return "default" in routes or proc.poll() is not None

                wait_until(up, 15, label, interval=0.1)
                if proc.poll() is not None:
                    err = proc.stderr.read().decode(errors="replace")[-300:]  # type: ignore[union-attr]
                    results[label] = {"error": err}
                    say(f"   {label:58} failed: {err.strip()}")
                    continue
                secs = [
                    timed([*enter, "busybox", "wget", "-q", "-O", "/dev/null", url])
                    for _ in range(n)
                ]
                speeds = [mb_per_s(s) for s in secs]
                results[label] = {"mb_s": speeds, "median_mb_s": statistics.median(speeds)}
                say(f"   {label:58} {statistics.median(speeds):8.1f} MB/s")
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                for link in ("tap0", "eth0"):
                    run([*enter, "ip", "link", "del", link], check=False)
    finally:
        kids = Path(f"/proc/{holder.pid}/task/{holder.pid}/children")
        with contextlib.suppress(OSError, ValueError):
            for kid in kids.read_text().split():
                os.kill(int(kid), signal.SIGKILL)
        holder.kill()
        holder.wait(timeout=10)
    return results


# ---- main -------------------------------------------------------------------------------------


def cleanup_driver_leftovers(work: Path) -> None:
    """After an abort in the middle: wipe whatever the driver part left (our ranges only)."""
    settings = driver_settings(work)
    found: set[str] = set()
    for directory in (settings.data_dir / "envs", settings.run_dir):
        if directory.is_dir():
            found.update(p.name for p in directory.iterdir() if p.name.startswith("env-"))
    for env_id in found:
        with contextlib.suppress(Exception):
            asyncio.run(teardown(settings, env_id))
    with contextlib.suppress(Exception):
        cgroups.remove_parent(settings.cgroup_parent, settings.cgroup_root)
    with contextlib.suppress(Exception):
        asyncio.run(egress_firewall(settings).uninstall())
    with contextlib.suppress(OSError):
        settings.run_dir.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs, smaller core_path run")
    parser.add_argument("--parts", default="core,start,net,raw",
                        help="comma-separated subset of core,start,net,raw")  # fmt: skip
    parser.add_argument("--deadline", type=int, default=0, help="overall limit in s")
    parser.add_argument("--starts", type=int, default=0,
                        help="start cycles of each kind in part 1 (default 3, 1 with --quick)")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (namespaces, cgroups, identities)")
    parts = set(args.parts.split(","))
    deadline = args.deadline or (900 if args.quick else 2400)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.alarm(deadline)
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(),
        "host_cpus": os.cpu_count(),
        "quick": args.quick,
        "load_average_at_start": load_average(),
    }
    started = time.monotonic()
    say(f"sandbox benchmark ({'quick' if args.quick else 'full'}), load {load_average()}")
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="osb-") as tmp:
        work = Path(tmp)
        try:
            if "core" in parts:
                results["core_path"] = core_path_again(args.quick)
            if "start" in parts:
                with ExitStack() as stack:
                    results["start"] = start_to_first_output(
                        work / "dep", stack, args.starts or (1 if args.quick else 3)
                    )
            if parts & {"net", "raw"}:
                say(f"\n== 3. test web server (load {load_average()})")
                with test_server(work) as url:
                    if "net" in parts:
                        results["driver"] = asyncio.run(
                            driver_parts(work, url, args.quick, 2 if args.quick else 5)
                        )
                    if "raw" in parts:
                        results["raw_usermode"] = raw_usermode(url, 2 if args.quick else 5)
        except (Exception, Deadline) as exc:  # noqa: BLE001 - reported, then cleaned up
            error = f"{exc.__class__.__name__}: {exc}"
            say(f"\nFAILED: {error}")
        finally:
            signal.alarm(0)
            cleanup_driver_leftovers(work)
    results["seconds"] = time.monotonic() - started
    results["load_average_at_end"] = load_average()
    if error:
        results["error"] = error
    results["summary"] = summary = summarize(results)
    say("\nSummary")
    for key, value in summary.items():
        say(f"  {key:78} {value}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"sandbox-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    say(f"\nwrote {stem}.json")
    stem.with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    if error:
        sys.exit(1)


def summarize(r: dict[str, Any]) -> dict[str, str]:
    s: dict[str, str] = {}

    def fmt(v: float, unit: str, ok: bool | None = None) -> str:
        return f"{v:.2f} {unit}" + ("" if ok is None else ("  met" if ok else "  MISSED"))

    if "start" in r:
        st = r["start"]
        s["1(b) start + engine answers + first run output (s, target <= 1.5)"] = fmt(
            st["b_median_s"], "s", st["b_median_s"] <= 1.5
        )
        s["1(a) ... + docker load of the 2 MB image (s)"] = fmt(
            st["median"]["load"]["a_total_s"], "s"
        )
        s["1(a) ... + docker build of the 2 MB image (s)"] = fmt(
            st["median"]["build"]["a_total_s"], "s"
        )
        if st["pool_create_median_s"] is not None:
            s["1 warm-pool environment create in the deployment (median, s)"] = fmt(
                st["pool_create_median_s"], "s"
            )
    if "driver" in r:
        dr = r["driver"]
        s["1 RootlessDriver.create (median, s)"] = fmt(dr["create_median_s"], "s")
    if "core_path" in r:
        rows = r["core_path"]["rows"]
        bad = [x["figure"] for x in rows if not x["within_10pct"]]
        s["2 core_path figures within 10% of " + r["core_path"]["baseline"]] = (
            f"{len(rows) - len(bad)}/{len(rows)}" + (f"; beyond: {'; '.join(bad)}" if bad else "")
        )
    if "driver" in r and "download" in r["driver"]:
        for label, v in r["driver"]["download"]["container"].items():
            s[f"3 {label} / host wget (target >= 0.5)"] = fmt(
                v["over_host_wget"], "x", v["over_host_wget"] >= 0.5
            )
    if "driver" in r and "memory" in r["driver"]:
        for label, m in r["driver"]["memory"].items():
            s[f"4 {label}: RSS / PSS / cgroup usage (MB)"] = (
                f"{m['rss_total_mb']:.1f} / {m['pss_total_mb']:.1f} / "
                f"{m.get('cgroup_usage_mb', float('nan')):.1f}"
            )
    if "raw_usermode" in r:
        for label, v in r["raw_usermode"].items():
            if "median_mb_s" in v:
                s[f"3' raw {label} (MB/s)"] = f"{v['median_mb_s']:.1f}"
    return s  # fmt: skip


if __name__ == "__main__":
    main()
