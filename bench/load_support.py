"""The real parts bench/load.py drives and watches: replicas, nginx, the database, /proc.

- `seed`: users (one organisation, an API token each) and runner tokens written straight into
  the database before any replica starts (one argon2 hash shared by every user: logins are not
  measured, and 1,000 hashes would take a minute).
- `Replica`: one `offload server` process (`.venv/bin/offload server --host --port`, with
  OFFLOAD_DATA_DIR and OFFLOAD_DATABASE_URL); its log goes to a file in the run's directory.
- `Nginx`: Debian's nginx with a config of its own in a temp dir, on 127.0.0.1 and a free port,
  upstream = the replicas (installed with apt-get if missing, saying so).
- `Proc`: CPU seconds, RSS and open SQLite connections of a process, from /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import asyncssh
import httpx

from offload.core import schemas as s
from offload.core.config import ServerSettings
from offload.core.schemas import Role
from offload.core.waiting import wait_until
from offload.server.app import open_database
from offload.server.db.models import User
from offload.server.services import accounts, tokens
from tests.support.net import free_port
from tests.support.replicas import NGINX_CONF

REPO = Path(__file__).resolve().parents[1]
OFFLOAD = Path(sys.executable).parent / "offload"
NGINX = Path("/usr/sbin/nginx")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ORG = "bench"
START_TIMEOUT_S = 60.0


# ---- /proc ---------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, …] (field 3 onwards)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU of `pid` (all its threads); with `children`, of its waited-for children
    too (PostgreSQL backends that already exited)."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def child_pids(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == parent:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process and its live children (and of the children it reaped)."""
    return cpu_seconds(root, children=True) + sum(cpu_seconds(pid) for pid in child_pids(root))


def rss_bytes(pid: int) -> int:
    try:
        resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return resident * PAGE


def open_files_named(pid: int, path: Path) -> int:
    """How many descriptors of `pid` point at `path`: one per open SQLite connection."""
    target = str(path)
    count = 0
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, PermissionError):
        return 0
    for entry in entries:
        try:
            if os.readlink(entry) == target:
                count += 1
        except OSError:
            continue
    return count


def machine_busy_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall-clock-equivalent total) from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return (total - idle) / CLK_TCK, total / CLK_TCK


def self_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# ---- the database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    user_tokens: list[str]
    runner_tokens: list[str]
    seconds: float


def seed(settings: ServerSettings, users: int, runners: int) -> Seeded:
    """Migrate the database, then add `users` members of organisation `bench` with an API token
    each and `runners` runner tokens, in one transaction."""
    started = time.monotonic()
    db = open_database(settings)
    try:
        shared_hash = tokens.hash_password(tokens.generate_password())
        now = datetime.now(UTC)
        with db.transaction() as session:
            org = accounts.get_or_create_org(session, ORG, now)
            rows = [
                User(username=f"user{i:05d}", password_hash=shared_hash, created_at=now)
                for i in range(users)
            ]
            session.add_all(rows)
            session.flush()
            user_tokens = []
            for user in rows:
                accounts.add_member(session, user, org, Role.MEMBER, now)
                user_tokens.append(tokens.issue_api_token(session, user.id, "bench", now))
            runner_tokens = [
                tokens.issue_runner_token(session, f"bench-runner-{i:03d}", now)
                for i in range(runners)
            ]
    finally:
        db.dispose()
    return Seeded(user_tokens, runner_tokens, time.monotonic() - started)


# ---- processes -----------------------------------------------------------------------------------


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, what: str) -> None:
    def up() -> bool:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{what} exited at start (status {process.returncode}):\n{tail}")
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, timeout=START_TIMEOUT_S, what=f"{what} to answer /healthz", interval=0.1)


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Replica:
    """One `offload server` process with the default settings (lifecycle tick every 1 s)."""

    index: int
    data_dir: Path
    database_url: str | None
    log_dir: Path
    command: list[str] = field(default_factory=lambda: [str(OFFLOAD)])
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.log_dir / f"replica-{self.index}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("OFFLOAD_") or k == "OFFLOAD_HOME"
        }
        env["OFFLOAD_DATA_DIR"] = str(self.data_dir)
        if self.database_url:
            env["OFFLOAD_DATABASE_URL"] = self.database_url
        argv = [*self.command, "server", "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir
            )

    def wait_healthy(self) -> None:
        assert self.process is not None
        _wait_healthy(self.url, self.process, self.log, f"replica {self.index}")

    def stop(self) -> None:
        _stop(self.process)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def server_errors(self) -> list[str]:
        """Tracebacks, errors and 5xx answers in the log (the first 40 lines of them)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        wanted = ("Traceback", "ERROR", '" 500', '" 502', '" 503', "Exception")
        return [line for line in text.splitlines() if any(w in line for w in wanted)][:40]


def ensure_nginx() -> None:
    """Debian's nginx, installed now (loudly) if it is missing."""
    if NGINX.is_file():
        return
    print(
        "!! nginx is missing: running `apt-get install -y nginx` (scripts/test.sh installs it)",
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300"]
    subprocess.run([*apt, "update"], check=True, env=env)
    subprocess.run([*apt, "install", "-y", "nginx"], check=True, env=env)
    if not NGINX.is_file():
        raise RuntimeError("apt-get installed nginx but /usr/sbin/nginx is still missing")


@dataclass
class Nginx:
    upstreams: list[str]  # host:port
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="offload-nginx-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def config(self) -> str:
        # The replica tests' balancer (tests/support/replicas.py), round robin.
        servers = "\n".join(f"    server {upstream};" for upstream in self.upstreams)
        return NGINX_CONF.format(root=self.root, servers=servers, port=self.port)

    def start(self) -> None:
        ensure_nginx()
        conf = self.root / "nginx.conf"
        conf.write_text(self.config())
        log = self.root / "stdout.log"
        argv = [str(NGINX), "-p", str(self.root), "-e", str(self.root / "error.log"),
                "-c", str(conf)]  # fmt: skip
        test = subprocess.run([*argv, "-t"], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected its config:\n{test.stderr}")
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _wait_healthy(self.url, self.process, self.root / "error.log", "nginx")

    def stop(self) -> None:
        _stop(self.process)
        shutil.rmtree(self.root, ignore_errors=True)


def processes_cpu(pids: Iterable[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def describe_machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    load = Path("/proc/loadavg").read_text().split()[:3]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "loadavg_at_start": [float(x) for x in load],
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
        "nginx": _nginx_version(),
    }


def _nginx_version() -> str | None:
    if not NGINX.is_file():
        return None
    out = subprocess.run([str(NGINX), "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def registration(name: str, capacity: int) -> dict[str, object]:
    """A runner's `POST /runners/register` body, with a fresh ssh-ed25519 host key."""
    host_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    return s.RunnerRegister(
        name=name, ssh_host="127.0.0.1", ssh_port=8422, host_key=host_key.strip(),
        capacity=capacity,
    ).model_dump(mode="json")  # fmt: skip


def write_result(kind: str, label: str, report: object) -> Path:
    """bench/results/<kind>-<UTC stamp>[-<label>].json, printed as written."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = REPO / "bench" / "results" / f"{kind}-{stamp}{'-' + label if label else ''}.json"
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out.relative_to(REPO)}")
    return out
