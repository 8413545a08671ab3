"""What tests/e2e/test_isolation.py attacks with: the raw Engine API over the agent's socket and
over the user's own SSH connection, and the runner-side facts the attacks are checked against.

The attacker owns the laptop, so nothing here goes through the docker CLI's or SDKs' idea of a
well-formed request: requests are bytes written to a stream (the agent's unix socket, or a
`direct-streamlocal` channel to `/docker.sock` on the runner's SSH endpoint opened with the
session's own key and certificate), and responses are read back as bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncssh

from offload.agent.state import SessionFile, read_model
from offload.core.schemas import ENGINE_CHANNEL_PATH
from offload.core.waiting import within
from tests.e2e.conftest import Deployment, User

API = "/v1.41"  # what dockerd 20.10 serves by default
REQUEST_TIMEOUT_S = 120.0
RESULT = "/offload-isolation-result.txt"  # where a container run by `RawEngine.run` writes

Streams = tuple[Any, Any]  # (reader, writer): asyncio streams or asyncssh's
Opener = Callable[[], Awaitable[Streams]]


# ---- raw HTTP over any stream -----------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


def request_bytes(
    method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> bytes:
    """One HTTP/1.1 request, `Connection: close`; a dict/list body is sent as JSON."""
    payload = (
        b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    )
    head = [f"{method} {target} HTTP/1.1", "Host: docker", "Connection: close"]
    if body is not None:
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def parse_responses(data: bytes) -> list[Response]:
    """Every HTTP/1.1 response in `data` (pipelined ones too), bodies de-chunked."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"not an HTTP response: {data[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body, data = _dechunk(rest)
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        else:
            body, data = rest, b""
        out.append(Response(status, headers, body))
    return out


def _dechunk(data: bytes) -> tuple[bytes, bytes]:
    body = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            _, _, data = data.partition(b"\r\n")  # trailers end with an empty line
            return body, data
        body, data = body + data[:size], data[size + 2 :]


class RawEngine:
    """The session's engine as an attacker reaches it: one stream per request."""

    def __init__(self, name: str, opener: Opener) -> None:
        self.name = name  # "agent" or "ssh": which way the bytes went
        self._open = opener

    async def send(
        self, raw: bytes, timeout: float = REQUEST_TIMEOUT_S, half_close: bool = False
    ) -> list[Response]:
        """Write `raw` as it is and read every response until the engine closes (requests say
        `Connection: close`). No half-close unless asked: dockerd cancels a request whose client
        half-closed (a volume create then fails with "context canceled")."""

        return parse_responses(await within(self.exchange(raw, half_close), timeout))

    async def exchange(self, raw: bytes, half_close: bool = False) -> bytes:
        """Write `raw` on a new stream; every byte that comes back until it ends, unparsed."""
        reader, writer = await self._open()
        try:
            writer.write(raw)
            if half_close:
                writer.write_eof()
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            writer.close()

    async def call(
        self,
        method: str,
        target: str,
        body: Any = None,
        timeout: float = REQUEST_TIMEOUT_S,
        headers: dict[str, str] | None = None,
    ) -> Response:
        responses = await self.send(request_bytes(method, target, body, headers), timeout)
        assert len(responses) == 1, f"{method} {target}: {len(responses)} responses"
        return responses[0]

    # ---- containers, the way a client would drive them --------------------------------------

    async def create(
        self, body: dict[str, Any], name: str | None = None, api: str = API
    ) -> Response:
        query = f"?name={quote(name)}" if name else ""
        return await self.call("POST", f"{api}/containers/create{query}", body)

    async def exists(self, name: str) -> bool:
        response = await self.call("GET", f"{API}/containers/{quote(name)}/json")
        assert response.status in (200, 404), response
        return response.status == 200

    async def run(self, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> Ran:
        """Create, start, wait for, read the output of and remove one container.

        The output is read from a file in the container (`docker cp`'s archive endpoint) once it
        has exited: dockerd's log copier can still be behind when `wait` answers."""
        wrapped = {**body, "Cmd": ["sh", "-c", f'"$@" >{RESULT} 2>&1', "wrap", *body["Cmd"]]}
        created = await self.create(wrapped)
        assert created.status == 201, (
            f"{self.name}: create answered {created.status} {created.text}"
        )
        cid = created.json()["Id"]
        try:
            started = await self.call("POST", f"{API}/containers/{cid}/start")
            assert started.status == 204, f"{self.name}: start {started.status} {started.text}"
            waited = await self.call("POST", f"{API}/containers/{cid}/wait", timeout=timeout)
            archive = await self.call("GET", f"{API}/containers/{cid}/archive?path={RESULT}")
            assert archive.status == 200, archive
            with tarfile.open(fileobj=io.BytesIO(archive.body)) as tar:
                member = tar.extractfile(tar.getmembers()[0])
                assert member is not None
                output = member.read().decode(errors="replace")
            return Ran(int(waited.json()["StatusCode"]), output)
        finally:
            await self.call("DELETE", f"{API}/containers/{cid}?force=1&v=1")

    async def labels(self) -> list[str]:
        return list((await self.call("GET", f"{API}/info")).json().get("Labels") or [])


@dataclass
class Ran:
    exit_code: int
    output: str


def agent_engine(user: User) -> RawEngine:
    async def opener() -> Streams:
        return await asyncio.open_unix_connection(str(user.agent_socket))

    return RawEngine("agent", opener)


# ---- the user's own SSH connection ------------------------------------------------------------


def session_of(user: User) -> SessionFile:
    session = read_model(user.offload_home / "session.json", SessionFile)
    assert session is not None, f"{user.name} has no session file"
    return session


async def ssh_connect(deployment: Deployment, user: User) -> asyncssh.SSHClientConnection:
    """The connection the agent makes, made by hand: the session's key and certificate."""
    session = session_of(user)
    assert session.session.runner is not None and session.session.certificate
    key = asyncssh.read_private_key(session.private_key_path)
    cert = asyncssh.import_certificate(session.session.certificate)
    known = asyncssh.import_known_hosts(
        f"[127.0.0.1]:{deployment.ssh_port} {session.session.runner.host_key}\n"
    )
    return await asyncssh.connect(
        "127.0.0.1",
        deployment.ssh_port,
        username=session.session.id,
        client_keys=[(key, cert)],
        known_hosts=known,
        agent_path=None,
        config=None,
    )


@contextlib.asynccontextmanager
async def ssh_engine(deployment: Deployment, user: User) -> AsyncIterator[RawEngine]:
    conn = await ssh_connect(deployment, user)
    try:

        async def opener() -> Streams:
            return await conn.open_unix_connection(ENGINE_CHANNEL_PATH, encoding=None)

        yield RawEngine("ssh", opener)
    finally:
        conn.close()
        await conn.wait_closed()


@contextlib.asynccontextmanager
async def engine_via(
    transport: str, deployment: Deployment, user: User
) -> AsyncIterator[RawEngine]:
    if transport == "agent":
        yield agent_engine(user)
    else:
        async with ssh_engine(deployment, user) as engine:
            yield engine


# ---- what the runner holds, and what a container must not see of it ---------------------------


@dataclass(frozen=True)
class EnvFacts:
    """One environment as the runner lays it out (offload.runner.environment.EnvPaths)."""

    env_id: str
    home: Path  # data_dir/runner/envs/<id>
    run: Path  # run_dir/<id>

    @property
    def mount_area(self) -> Path:
        return self.home / "mounts"

    @property
    def engine_socket(self) -> Path:
        return self.run / "sock" / "docker.sock"

    @property
    def policy_socket(self) -> Path:
        return self.run / "plugins" / f"offload-policy-{self.env_id}.sock"

    @property
    def hostname(self) -> str:
        return "offload-" + self.env_id.removeprefix("env-")[:8]

    @property
    def identity_uid(self) -> int:
        return self.mount_area.stat().st_uid  # the mount area belongs to the sandbox's root


def env_facts(deployment: Deployment, env_id: str) -> EnvFacts:
    return EnvFacts(
        env_id, deployment.data_dir / "runner" / "envs" / env_id, deployment.run_dir / env_id
    )


@dataclass
class Canaries:
    """Files the test writes on the runner where no container may ever see or change them."""

    paths: list[Path]
    digests: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def plant(cls, where: list[Path]) -> Canaries:
        token = uuid.uuid4().hex[:10]
        canaries = cls([d / f"offload-isolation-canary-{token}" for d in where])
        for path in canaries.paths:
            path.write_text(f"runner canary {token}\n")
            canaries.digests[path] = digest(path)
        return canaries

    def changed(self) -> list[str]:
        return [str(p) for p in self.paths if not p.is_file() or digest(p) != self.digests[p]]

    def remove(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def passwd_digest() -> str:
    """The runner's /etc/passwd but for the `offload-*` accounts runners add for their
    sandboxes' identities (any runner on this machine may add one at any time)."""
    lines = Path("/etc/passwd").read_text().splitlines(keepends=True)
    kept = "".join(line for line in lines if not line.startswith("offload-"))
    return hashlib.sha256(kept.encode()).hexdigest()


# A shell script run in busybox: for each path argument under $B, whether anything is there;
# then what identifies the root filesystem seen at $B.
VIEW_SCRIPT = r"""
B=$1; shift
for p in "$@"; do
  if [ -e "$B$p" ] || [ -L "$B$p" ]; then echo "present $p"; else echo "absent $p"; fi
done
echo "passwd-lines $(wc -l < "$B/etc/passwd")"
echo "hostname $(cat "$B/etc/hostname")"
if [ -d "$B/var/lib/docker" ]; then echo "docker-dir yes"; else echo "docker-dir no"; fi
echo "plugins $(ls "$B/run/docker/plugins" 2>/dev/null | tr '\n' ' ')"
echo "view-done"
"""


def view_command(base: str, paths: list[str]) -> list[str]:
    return ["sh", "-c", VIEW_SCRIPT, "sh", base, *paths]


@dataclass
class View:
    present: set[str]
    absent: set[str]
    facts: dict[str, str]


def parse_view(output: str) -> View:
    assert "view-done" in output, f"the view script did not finish:\n{output}"
    present, absent, facts = set(), set(), {}
    for line in output.splitlines():
        key, _, value = line.partition(" ")
        if key == "present":
            present.add(value)
        elif key == "absent":
            absent.add(value)
        elif key in ("passwd-lines", "hostname", "docker-dir", "plugins"):
            facts[key] = value.strip()
    return View(present, absent, facts)


def sandbox_problems(view: View, env: EnvFacts, runner_only: list[str]) -> list[str]:
    """What in `view` is not the sandbox's root of `env`, or is the runner's."""
    problems = [f"runner path visible: {p}" for p in sorted(view.present & set(runner_only))]
    missing = set(runner_only) - view.present - view.absent
    problems += [f"path not checked: {p}" for p in sorted(missing)]
    if view.facts.get("passwd-lines") != "2":
        problems.append(
            f"/etc/passwd has {view.facts.get('passwd-lines')} lines, not the sandbox's 2"
        )
    if view.facts.get("hostname") != env.hostname:
        problems.append(f"/etc/hostname is {view.facts.get('hostname')!r}, not {env.hostname!r}")
    if view.facts.get("docker-dir") != "yes":
        problems.append("no /var/lib/docker: not the sandbox's root")
    return problems


# ---- runner-side listeners and addresses ------------------------------------------------------


@contextlib.contextmanager
def banner_listener(banner: bytes) -> Iterator[int]:
    """A TCP listener on every runner address (0.0.0.0) that greets and closes."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen(64)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                with contextlib.suppress(OSError):
                    conn.sendall(banner)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


def greeting(host: str, port: int, send: bytes = b"", timeout: float = 5) -> bytes:
    """What a TCP server at host:port says first (from the runner itself)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        if send:
            conn.sendall(send)
        conn.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
            if len(data) > 64:
                break
        return data


def runner_ipv4_addresses() -> list[str]:
    """The runner host's own IPv4 addresses other than loopback (`ip -4 -o addr`)."""
    import subprocess

    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    found = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    return [a for a in found if not a.startswith("127.")]


# ---- processes and cgroups --------------------------------------------------------------------


def proc_cmdlines() -> dict[int, str]:
    found = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                raw = Path(entry.path, "cmdline").read_bytes()
                found[int(entry.name)] = raw.replace(b"\0", b" ").decode(errors="replace")
    return found


def subid_range(account: str) -> range:
    for line in Path("/etc/subuid").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == account:
            start, count = (int(v) for v in rest.split(":"))
            return range(start, start + count)
    raise AssertionError(f"{account} has no /etc/subuid entry")


def processes_outside_cgroups(
    identity_uid: int, cgroup_prefix: str, controllers: tuple[str, ...] = ("cpu", "memory", "pids")
) -> list[str]:
    """Live processes of this identity (its uid or subordinate ids) whose v1 cgroup in one of
    `controllers` is not `cgroup_prefix` or below it."""
    ids = subid_range(f"offload-{identity_uid}")
    outside = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
            cgroup_lines = Path(entry.path, "cgroup").read_text().splitlines()
        except OSError:
            continue  # exited meanwhile
        uids = next(
            [int(v) for v in line.split()[1:4]]
            for line in status.splitlines()
            if line.startswith("Uid:")
        )
        if not any(u == identity_uid or u in ids for u in uids):
            continue
        state = next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))
        if state in ("Z", "X"):
            # Dead, not yet reaped (the sandbox of a session that just ended): the kernel moves
            # an exiting task to the root cgroup, and it runs nothing any more.
            continue
        for line in cgroup_lines:
            _, names, path = line.split(":", 2)
            if set(names.split(",")) & set(controllers) and not (
                path == cgroup_prefix or path.startswith(cgroup_prefix + "/")
            ):
                cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                ppid = next(
                    line.split()[1] for line in status.splitlines() if line.startswith("PPid:")
                )
                outside.append(
                    f"pid {entry.name} (ppid {ppid}) uids {uids} in {names}:{path}: {cmd!r}"
                )
    return outside
