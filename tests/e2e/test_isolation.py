"""The sandbox boundary, attacked end to end: an attacker who owns the laptop speaks the raw
Engine API over the agent's socket and over their own SSH connection (the session's key and
certificate), with legacy and malformed shapes, old API versions and odd key spellings.

Every attempt is named (parametrize ids or one assertion each) with the outcome it must have:
either refused, or confined to the session's sandbox (its private root, devices, processes,
network and cgroups), never touching the runner.  The last test checks the runner is intact.

What the runner holds that a container must never see is written by the test itself (canary
files in /etc, /root, /var/lib, the runner and control-plane data directories, the admin's CLI
directory) or is there by construction (the control plane's data, the runner's /etc/shadow and
/etc/subuid, other environments' directories and sockets); each is first checked to exist on
the runner, so that its absence inside a container means something.
"""

from __future__ import annotations

import itertools
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest

from offload.core.waiting import wait_until
from tests.e2e.conftest import Deployment, User, signed_in_user, started
from tests.e2e.isolation_support import (
    API,
    VIEW_SCRIPT,
    Canaries,
    EnvFacts,
    agent_engine,
    banner_listener,
    engine_via,
    env_facts,
    greeting,
    parse_view,
    passwd_digest,
    proc_cmdlines,
    processes_outside_cgroups,
    request_bytes,
    runner_ipv4_addresses,
    sandbox_problems,
    ssh_connect,
    view_command,
)
from tests.support.engines import environment_id
from tests.support.images import write_build_context

pytestmark = pytest.mark.slow

TOO_OLD = (
    "client version {v} is too old. Minimum supported API version is 1.24, please upgrade your "
    "client to a newer version"
)
CLI_IMAGE = "isolation-docker-cli"
_numbers = itertools.count(1)


# ---- the arena: an attacker's session, a neighbour's session, canaries on the runner ----------


@dataclass
class Arena:
    deployment: Deployment
    attacker: User
    neighbour: User
    own: EnvFacts  # the attacker's environment
    other: EnvFacts  # the neighbour's
    canaries: Canaries
    passwd_digest: str  # of the runner's /etc/passwd at the start

    def runner_only(self) -> list[str]:
        """Paths that exist on the runner and must not exist in any sandbox view."""
        d = self.deployment
        paths = [
            *self.canaries.paths,
            d.data_dir / "server" / "ca_ed25519",  # the control plane's CA key
            d.admin.home / ".offload" / "config.json",  # the admin's API token
            Path("/etc/shadow"),
            Path("/etc/subuid"),
            d.run_dir,
            self.own.home / "identity",  # siblings of the attacker's own mount area
            self.own.home / "dockerd.log",
            self.own.run,
            self.other.home,
            self.other.mount_area,
            self.other.run,
            self.other.engine_socket,
            self.other.policy_socket,
        ]
        missing = [str(p) for p in paths if not p.exists()]
        assert not missing, f"runner paths the checks rely on are missing on the runner: {missing}"
        return [str(p) for p in paths]


def _new_user(deployment: Deployment, tmp: pytest.TempPathFactory) -> User:
    return signed_in_user(deployment, tmp, "iso")


def _env_of(deployment: Deployment, user: User) -> EnvFacts:
    labels = user.docker("info", "--format", "{{json .Labels}}").stdout.strip()
    facts = env_facts(deployment, environment_id(labels))
    assert facts.engine_socket.exists(), f"{facts.env_id}: no engine socket on the runner"
    return facts


@pytest.fixture(scope="module")
def arena(
    deployment: Deployment, tmp_path_factory: pytest.TempPathFactory, hello_context: Path
) -> Iterator[Arena]:
    attacker = started(_new_user(deployment, tmp_path_factory), hello_context)
    neighbour = started(_new_user(deployment, tmp_path_factory), hello_context)
    cli_context = write_build_context(
        tmp_path_factory.mktemp("cli-context"),
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", '
        '"/bin"]\nCOPY docker /bin/docker\n',
    )
    shutil.copy("/usr/local/bin/docker", cli_context / "docker")  # statically linked
    attacker.docker("build", "-q", "-t", CLI_IMAGE, str(cli_context), timeout=300)
    canaries = Canaries.plant(
        [
            Path("/etc"),
            Path("/root"),
            Path("/var/lib"),
            deployment.data_dir / "runner",
            deployment.data_dir / "server",
            deployment.admin.home / ".offload",
        ]
    )
    try:
        yield Arena(
            deployment,
            attacker,
            neighbour,
            _env_of(deployment, attacker),
            _env_of(deployment, neighbour),
            canaries,
            passwd_digest(),
        )
    finally:
        for user in (attacker, neighbour):
            user.offload("stop", "--force", check=False, timeout=60)
        canaries.remove()


def _assert_sandbox(output: str, arena: Arena, what: str) -> None:
    problems = sandbox_problems(parse_view(output), arena.own, arena.runner_only())
    assert not problems, f"{what}: not the sandbox's root: {problems}\n{output}"


# ---- 1 and 3: `/` bound in every shape reaches the sandbox's root, never the runner's ---------


def _view_body(arena: Arena, shape: dict[str, Any]) -> dict[str, Any]:
    return {"Image": "hello", "Cmd": view_command("/host", arena.runner_only()), **shape}


BIND_ROOT = ["/:/host"]
ROOT_MOUNT = [{"Type": "bind", "Source": "/", "Target": "/host"}]
# (shape id, body keys, what the agent does with it: "sandbox" = passes it on unchanged).
ROOT_SHAPES = [
    ("top-level Binds, no HostConfig", {"Binds": BIND_ROOT}, "sandbox"),
    ("top-level Binds, HostConfig null", {"Binds": BIND_ROOT, "HostConfig": None}, "sandbox"),
    ("top-level BINDS upper-case", {"BINDS": BIND_ROOT}, "sandbox"),
    ("lower-case hostconfig.Binds", {"hostconfig": {"Binds": BIND_ROOT}}, "agent refuses"),
    ("HostConfig.Mounts bind /", {"HostConfig": {"Mounts": ROOT_MOUNT}}, "agent refuses"),
    ("top-level Mounts bind /", {"Mounts": ROOT_MOUNT}, "sandbox"),
]


@pytest.mark.parametrize("transport", ["agent", "ssh"])
@pytest.mark.parametrize(
    ("shape", "expected_via_agent"),
    [(body, agent) for _, body, agent in ROOT_SHAPES],
    ids=[name for name, _, _ in ROOT_SHAPES],
)
async def test_root_bind_in_any_shape_shows_the_sandbox(
    arena: Arena, transport: str, shape: dict[str, Any], expected_via_agent: str
) -> None:
    async with engine_via(transport, arena.deployment, arena.attacker) as engine:
        if transport == "agent" and expected_via_agent == "agent refuses":
            # The agent would have to sync the laptop's `/`: it says so, and nothing is created.
            created = await engine.create(_view_body(arena, shape))
            assert created.status == 400, created
            assert "Offload: cannot bind-mount /" in created.text, created.text
            return
        ran = await engine.run(_view_body(arena, shape))
    assert ran.exit_code == 0, ran.output
    _assert_sandbox(ran.output, arena, f"{transport}: {shape}")


@pytest.mark.parametrize("transport", ["agent", "ssh"])
async def test_local_volume_binding_root_shows_the_sandbox(arena: Arena, transport: str) -> None:
    name = f"rootvol-{uuid.uuid4().hex[:6]}"
    async with engine_via(transport, arena.deployment, arena.attacker) as engine:
        opts = {"type": "none", "o": "bind", "device": "/"}
        made = await engine.call(
            "POST", f"{API}/volumes/create", {"Name": name, "Driver": "local", "DriverOpts": opts}
        )
        assert made.status == 201, made
        try:
            ran = await engine.run(_view_body(arena, {"HostConfig": {"Binds": [f"{name}:/host"]}}))
        finally:
            await engine.call("DELETE", f"{API}/volumes/{name}?force=1")
    assert ran.exit_code == 0, ran.output
    _assert_sandbox(ran.output, arena, f"{transport}: local volume type=none,o=bind,device=/")


async def test_runner_paths_bound_over_ssh_are_the_sandboxs(arena: Arena) -> None:
    """Without the agent nothing is synced: a runner path as a bind source is the sandbox's
    path of that name (dockerd makes an empty directory there), never the runner's."""
    control_plane = arena.deployment.data_dir / "server"
    etc_canary = next(p for p in arena.canaries.paths if p.parent == Path("/etc"))
    body = {
        "Image": "hello",
        "Cmd": [
            "sh",
            "-c",
            'echo "cp [$(ls -A /cp)]"; echo "passwd $(wc -l < /e/passwd)"; '
            f"[ -e /e/{etc_canary.name} ] && echo canary-present || echo canary-absent",
        ],
        "HostConfig": {"Binds": [f"{control_plane}:/cp", "/etc:/e"]},
    }
    async with engine_via("ssh", arena.deployment, arena.attacker) as engine:
        ran = await engine.run(body)
    assert any(control_plane.iterdir()), "the control plane's data dir is empty on the runner"
    assert "cp []" in ran.output, f"the control plane's files are visible: {ran.output}"
    lines = set(ran.output.splitlines())
    assert "passwd 2" in lines, f"not the sandbox's /etc: {ran.output}"
    assert "canary-absent" in lines, f"the runner's /etc canary is visible: {ran.output}"


# ---- 2: old API versions, in every spelling of the path ----------------------------------------

# (attempt id, request target, expected status, expected version in dockerd's wording or None).
OLD_VERSION_CREATES = [
    ("v1.12 create, legacy top-level Binds", "/v1.12/containers/create", 403, "1.12"),
    ("v1.23 create", "/v1.23/containers/create", 403, "1.23"),
    ("v1.9 create", "/v1.9/containers/create", 403, "1.9"),
    ("percent-encoded dot v1%2E23", "/v1%2E23/containers/create", 403, "1.23"),
    ("absolute-form target", "http://docker/v1.23/containers/create", 403, "1.23"),
    ("three components v1.23.0", "/v1.23.0/containers/create", 403, "1.23.0"),
    ("leading zero v01.23", "/v01.23/containers/create", 403, "01.23"),
    # dockerd's router answers these itself (a redirect to the clean path, or no route):
    ("double slash //v1.23", "//v1.23/containers/create", 301, None),
    ("dot segment /./v1.23", "/./v1.23/containers/create", 301, None),
    ("dot-dot segment /x/../v1.23", "/x/../v1.23/containers/create", 301, None),
    ("upper-case V1.23", "/V1.23/containers/create", 404, None),
]


@pytest.mark.parametrize("transport", ["agent", "ssh"])
@pytest.mark.parametrize(
    ("target", "status", "version"),
    [a[1:] for a in OLD_VERSION_CREATES],
    ids=[a[0] for a in OLD_VERSION_CREATES],
)
async def test_old_api_version_creates_are_refused(
    arena: Arena, transport: str, target: str, status: int, version: str | None
) -> None:
    name = f"old-{uuid.uuid4().hex[:8]}"
    # Top-level Binds only: the agent passes them on (a HostConfig bind of `/` it refuses itself).
    body = {"Image": "hello", "Binds": BIND_ROOT}
    async with engine_via(transport, arena.deployment, arena.attacker) as engine:
        answer = await engine.call("POST", f"{target}?name={name}", body)
        assert answer.status == status, (answer.status, answer.text)
        if version is not None:
            assert TOO_OLD.format(v=version) in answer.text, answer.text
        assert not await engine.exists(name), f"{target} created a container"


@pytest.mark.parametrize("transport", ["agent", "ssh"])
async def test_v1_23_start_with_host_config_is_refused(arena: Arena, transport: str) -> None:
    name = f"start-{uuid.uuid4().hex[:8]}"
    async with engine_via(transport, arena.deployment, arena.attacker) as engine:
        created = await engine.create({"Image": "hello", "Cmd": ["sleep", "30"]}, name=name)
        assert created.status == 201, created
        try:
            answer = await engine.call(
                "POST",
                f"/v1.23/containers/{name}/start",
                {"Binds": BIND_ROOT, "Privileged": True},
            )
            assert answer.status == 403, answer
            assert TOO_OLD.format(v="1.23") in answer.text, answer.text
            inspect = (await engine.call("GET", f"{API}/containers/{name}/json")).json()
            assert inspect["State"]["Running"] is False, "the container started"
            assert inspect["Mounts"] == [], inspect["Mounts"]
        finally:
            await engine.call("DELETE", f"{API}/containers/{name}?force=1")


@pytest.mark.parametrize("transport", ["agent", "ssh"])
@pytest.mark.parametrize("attempt", ["pipelined behind a ping", "smuggled in a chunked body"])
async def test_malformed_streams_reach_no_old_code_path(
    arena: Arena, transport: str, attempt: str
) -> None:
    name = f"raw-{uuid.uuid4().hex[:8]}"
    hidden = request_bytes(
        "POST", f"/v1.23/containers/create?name={name}", {"Image": "hello", "Binds": BIND_ROOT}
    )
    if attempt == "pipelined behind a ping":
        raw = b"GET /_ping HTTP/1.1\r\nHost: docker\r\n\r\n" + hidden
    else:
        # Content-Length and chunked together: a proxy that reads the length would see one
        # request, one that reads the chunks sees the old-version create after it.
        chunk = b"0\r\n\r\n"
        raw = (
            b"POST /v1.41/containers/prune HTTP/1.1\r\nHost: docker\r\n"
            b"Content-Length: " + str(len(chunk) + len(hidden)).encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunk + hidden
        )
    async with engine_via(transport, arena.deployment, arena.attacker) as engine:
        try:
            responses = await engine.send(raw, timeout=30)
        except (AssertionError, ValueError):
            responses = []  # a peer that closed mid-way: nothing was created, checked below
        refused_old = [r for r in responses if TOO_OLD.format(v="1.23") in r.text]
        created = [r for r in responses if r.status == 201]
        assert not created, f"{attempt}: {created}"
        assert not await engine.exists(name), f"{attempt}: the hidden create went through"
        if attempt == "pipelined behind a ping":
            assert refused_old, f"the pipelined create was not refused: {responses}"


# ---- 4: the engine socket inside a container ---------------------------------------------------


def test_engine_socket_in_a_container_gives_only_the_sandbox(arena: Arena) -> None:
    user = arena.attacker
    inner = VIEW_SCRIPT + "\necho ps-start; ps; echo ps-end\n"
    result = user.docker(
        "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock", CLI_IMAGE,
        "docker", "run", "--rm", "--privileged", "--pid=host", "-v", "/:/host", "hello",
        "sh", "-c", inner, "sh", "/host", *arena.runner_only(),
        timeout=180,
    )  # fmt: skip
    _assert_sandbox(result.stdout, arena, "privileged -v /:/host --pid=host from inside")
    ps = result.stdout.split("ps-start", 1)[1].split("ps-end", 1)[0]
    assert "dockerd" in ps, ps  # the sandbox's own engine is there...
    runner_side = [c for c in proc_cmdlines().values() if "offload.cli.main" in c]
    assert any("runner" in c for c in runner_side) and any("server" in c for c in runner_side)
    for marker in ("offload.cli.main", "sshd", "python", "-m pytest"):  # ...none of the runner's
        assert marker not in ps, f"runner process {marker!r} visible with --pid=host:\n{ps}"

    old = user.docker(
        "run", "--rm", "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-e", "DOCKER_API_VERSION=1.23", CLI_IMAGE, "docker", "ps", check=False,
    )  # fmt: skip
    assert old.returncode != 0
    assert TOO_OLD.format(v="1.23") in old.stderr, old.stderr


# ---- 5: the network: nothing of the runner's is reachable --------------------------------------

PROBE_SCRIPT = r"""
mkdir -p /tmp
nc -l -p 9000 -e echo inside-ok &
i=0; ok=""
while [ $i -lt 100 ] && [ -z "$ok" ]; do ok=$(nc -w 2 127.0.0.1 9000 </dev/null); i=$((i+1)); done
echo "RESULT own-listener [$ok]"
while [ $# -gt 0 ]; do
  out=$(printf "$4" | nc -w 3 "$2" "$3" 2>&1 | head -c 64)
  echo "RESULT $1 [$out]"
  shift 4
done
echo probes-done
"""


@pytest.mark.parametrize("network", ["host", "bridge"])
def test_network_reaches_nothing_of_the_runner(arena: Arena, network: str) -> None:
    d = arena.deployment
    server_port = int(d.server_url.rsplit(":", 1)[1])
    healthz = "GET /healthz HTTP/1.0\\r\\n\\r\\n"
    with banner_listener(b"runner-canary\n") as port:
        # From the runner itself, every target answers: the probes below can tell.
        addresses = runner_ipv4_addresses()
        assert addresses, "the runner has no non-loopback IPv4 address"
        for host in ["127.0.0.1", *addresses]:
            assert greeting(host, port) == b"runner-canary\n", host
        assert greeting("127.0.0.1", d.ssh_port).startswith(b"SSH-2.0-")
        assert b" 200 " in greeting("127.0.0.1", server_port, b"GET /healthz HTTP/1.0\r\n\r\n")
        targets = [
            ("canary-via-10.0.2.2", "10.0.2.2", port, ""),
            ("control-plane-via-10.0.2.2", "10.0.2.2", server_port, healthz),
            ("ssh-endpoint-via-10.0.2.2", "10.0.2.2", d.ssh_port, ""),
            ("canary-via-127.0.0.1", "127.0.0.1", port, ""),
            ("control-plane-via-127.0.0.1", "127.0.0.1", server_port, healthz),
            ("ssh-endpoint-via-127.0.0.1", "127.0.0.1", d.ssh_port, ""),
            *[(f"canary-via-runner-address-{a}", a, port, "") for a in addresses],
        ]
        args = [str(v) for t in targets for v in t]
        result = arena.attacker.docker(
            "run", "--rm", "--network", network, "hello", "sh", "-c", PROBE_SCRIPT, "sh", *args,
            timeout=180,
        )  # fmt: skip
    assert "probes-done" in result.stdout, result.stdout
    results = dict(
        line.removeprefix("RESULT ").split(" ", 1)
        for line in result.stdout.splitlines()
        if line.startswith("RESULT ")
    )
    assert results["own-listener"] == "[inside-ok]", f"the probe cannot see a connection: {results}"
    for name, *_ in targets:
        answer = results[name]
        for sign in ("runner-canary", "HTTP/", "SSH-"):
            assert sign not in answer, f"{network}: {name} reached the runner: {answer}"


async def test_other_environments_sockets_are_out_of_reach(arena: Arena) -> None:
    """Over the user's own SSH connection: only `/docker.sock`; by real runner paths, nothing."""
    conn = await ssh_connect(arena.deployment, arena.attacker)
    async with conn:
        for path in (
            arena.other.engine_socket,
            arena.other.policy_socket,
            arena.own.engine_socket,
            arena.own.policy_socket,
            arena.other.mount_area / ".docker.sock",
        ):
            assert path.exists(), path
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_unix_connection(str(path))
    # Inside the sandbox the plugin directory holds this environment's policy socket only.
    ran = await agent_engine(arena.attacker).run(_view_body(arena, {"Binds": BIND_ROOT}))
    plugins = parse_view(ran.output).facts["plugins"].split()
    assert plugins == [arena.own.policy_socket.name], plugins


# ---- 6: devices, /proc/1/root and the environment's own cgroup ---------------------------------


def _runner_disks() -> list[tuple[str, str, str]]:
    rows = [line.split() for line in Path("/proc/partitions").read_text().splitlines()[2:]]
    disks = [
        (r[3], r[0], r[1]) for r in rows if len(r) == 4 and not r[3].startswith(("loop", "ram"))
    ]
    assert disks, "the runner lists no disk in /proc/partitions"
    return disks


def test_devices_proc_and_cgroups_stay_the_sandboxs(arena: Arena) -> None:
    name, major, minor = _runner_disks()[0]
    env_cgroup = Path("/sys/fs/cgroup/memory") / arena.deployment.cgroup_parent / arena.own.env_id
    limit_before = (env_cgroup / "memory.limit_in_bytes").read_text()
    agent_before = Path("/sys/fs/cgroup/memory/release_agent").read_text()
    script = f"""
mkdir -p /tmp /mnt /cg
[ -e /dev/{name} ] && echo "dev present" || echo "dev absent"
mount /dev/{name} /mnt 2>&1; echo "mount-dev rc=$?"
mknod /tmp/disk b {major} {minor} 2>&1; echo "mknod rc=$?"
mount -t ext4 /tmp/disk /mnt 2>&1; echo "mount-node rc=$?"
echo "pid1-passwd $(wc -l < /proc/1/root/etc/passwd)"
echo "pid1-hostname $(cat /proc/1/root/etc/hostname)"
mount -t cgroup -o memory cgroup /cg 2>&1; echo "cgroup-mount rc=$?"
echo 1 > /cg/memory.limit_in_bytes; echo "env-limit-write rc=$?"
[ -e /cg/release_agent ] && echo "release-agent present" || echo "release-agent absent"
echo /bin/true > /cg/release_agent; echo "release-agent-write rc=$?"
"""
    result = arena.attacker.docker(
        "run", "--rm", "--privileged", "--pid=host", "hello", "sh", "-c", script, check=False
    )  # fmt: skip
    out = result.stdout + result.stderr
    lines = set(out.splitlines())
    assert "dev absent" in lines, f"the runner's disk /dev/{name} is in the sandbox:\n{out}"
    assert "mount-dev rc=0" not in lines, out
    assert "mknod rc=1" in lines and "Operation not permitted" in out, f"mknod:\n{out}"
    assert "mount-node rc=0" not in lines, out
    assert "pid1-passwd 2" in lines, f"/proc/1/root is not the sandbox's root:\n{out}"
    assert f"pid1-hostname {arena.own.hostname}" in lines, out
    assert "cgroup-mount rc=0" in lines, out  # the sandbox's own view of its cgroups...
    assert "env-limit-write rc=1" in lines, f"the environment's own limit was writable:\n{out}"
    assert "release-agent absent" in lines, out  # ...rooted at the environment's cgroup
    assert "release-agent-write rc=1" in lines, out
    assert (env_cgroup / "memory.limit_in_bytes").read_text() == limit_before
    assert Path("/sys/fs/cgroup/memory/release_agent").read_text() == agent_before


# ---- 7: a symlink swap in the mount area while the laptop syncs into it -----------------------


def test_symlink_swap_in_the_mount_area_leaves_the_runners_etc_alone(
    arena: Arena, tmp_path: Path
) -> None:
    user = arena.attacker
    etc_canary = next(p for p in arena.canaries.paths if p.parent == Path("/etc"))
    probe = f"offload-isolation-probe-{uuid.uuid4().hex[:8]}"
    passwd_before = passwd_digest()
    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "sub" / "seed.txt").write_text("seed\n")
    name = f"swap-{uuid.uuid4().hex[:6]}"
    try:
        user.docker("run", "-d", "--name", name, "-v", f"{project}:/data", "hello", "sleep", "600")
        # The container turns `sub` into a symlink to /etc (absolute: on the runner host, the
        # runner's /etc), and the swap comes back to the laptop as a symlink.
        swapped = user.docker(
            "exec", name, "sh", "-c", "mv /data/sub /data/sub.moved && ln -s /etc /data/sub && "
            "readlink /data/sub",
        )  # fmt: skip
        assert swapped.stdout.strip() == "/etc"
        wait_until(lambda: (project / "sub").is_symlink(), 60, "the swap to reach the laptop")
        # The laptop makes `sub` a directory again and writes into it, so the runner must apply
        # `sub/<name>` where its mount area holds `sub -> /etc`. The laptop writes through a
        # descriptor of its new directory, never by a path a synced symlink could redirect
        # (laptop and runner are one machine here); unlink removes the link, not /etc.
        os.unlink(project / "sub")
        (project / "sub").mkdir()
        sub_fd = os.open(project / "sub", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            for file_name in (etc_canary.name, probe):
                fd = os.open(
                    file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644,
                    dir_fd=sub_fd,
                )  # fmt: skip
                with os.fdopen(fd, "w") as out:
                    out.write("written by the laptop into sub/\n")
        finally:
            os.close(sub_fd)
        # A create binding the directory waits for what the laptop has pending to be synced.
        seen = user.docker(
            "run", "--rm", "-v", f"{project}:/data", "hello", "ls", "-la", "/data", "/data/sub/"
        )  # fmt: skip
    finally:
        user.docker("rm", "-f", name, check=False)
    where = f"the container sees:\n{seen.stdout}"
    assert not Path("/etc", probe).exists(), (
        f"the laptop's file landed in the runner's /etc; {where}"
    )
    assert arena.canaries.changed() == [], f"a runner canary changed; {where}"
    assert passwd_digest() == passwd_before == arena.passwd_digest


# ---- 8: a fork bomb and a memory bomb ----------------------------------------------------------


def _cg(kind: str, deployment: Deployment, env: EnvFacts, file: str) -> Path:
    return Path("/sys/fs/cgroup") / kind / deployment.cgroup_parent / env.env_id / file


def test_fork_and_memory_bombs_stay_in_the_environment(
    deployment: Deployment, make_user, hello_context: Path
) -> None:
    user = started(make_user(), hello_context)
    env = _env_of(deployment, user)
    pids_max = int(_cg("pids", deployment, env, "pids.max").read_text())
    assert int(_cg("pids", deployment, env, "pids.peak").read_text()) < pids_max < 5000

    bomb = user.docker(
        "run", "--rm", "hello", "sh", "-c",
        "for i in $(seq 5000); do sleep 120 & done; echo all-forked",
        check=False, timeout=300,
    )  # fmt: skip
    assert bomb.returncode != 0 and "all-forked" not in bomb.stdout, bomb
    assert "can't fork: Resource temporarily unavailable" in bomb.stderr, bomb.stderr
    assert int(_cg("pids", deployment, env, "pids.peak").read_text()) == pids_max
    # The bomb went with its container; the engine and the runner answer.
    assert user.docker("ps", "-aq").stdout.strip() == ""
    wait_until(
        lambda: int(_cg("pids", deployment, env, "pids.current").read_text()) < 200,
        60,
        "the fork bomb's processes to be gone",
    )

    # The memory bomb: the environment's limit lowered on the runner (root, as a smaller
    # instance type would set it: the embedded deployment has no setting for instance specs)
    # so that going beyond it costs this 2-core machine little.
    limit_file = _cg("memory", deployment, env, "memory.limit_in_bytes")
    original = limit_file.read_text().strip()
    small = 768 * 1024**2
    assert int(_cg("memory", deployment, env, "memory.usage_in_bytes").read_text()) < small
    limit_file.write_text(str(small))
    try:
        failures_before = int(_cg("memory", deployment, env, "memory.failcnt").read_text())
        hog = user.docker(
            "run", "--rm", "hello", "sh", "-c",
            'head -c 2147483648 /dev/zero | tail; echo "tail-exit=$?"',
            check=False, timeout=300,
        )  # fmt: skip
        assert "tail-exit=137" in hog.stdout, hog  # SIGKILLed by the OOM killer
        # The peak is charged in batches of pages: it may pass the limit by one batch per CPU.
        slack = 64 * 4096 * os.cpu_count()
        peak = int(_cg("memory", deployment, env, "memory.max_usage_in_bytes").read_text())
        assert peak <= small + slack, (peak, small)
        assert int(_cg("memory", deployment, env, "memory.failcnt").read_text()) > failures_before
    finally:
        limit_file.write_text(original)

    assert httpx.get(f"{deployment.server_url}/healthz", timeout=10).status_code == 200
    assert user.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"


# ---- after everything: the runner is intact ----------------------------------------------------


def test_the_runner_is_intact_afterwards(
    arena: Arena, deployment: Deployment, make_user, hello_context: Path
) -> None:
    assert arena.canaries.changed() == [], "a runner canary changed"
    assert passwd_digest() == arena.passwd_digest
    envs = [p for p in (deployment.data_dir / "runner" / "envs").iterdir() if p.is_dir()]
    assert len(envs) >= 2, envs  # the arena's two at least
    for home in envs:
        env = env_facts(deployment, home.name)
        outside = processes_outside_cgroups(
            env.identity_uid, f"/{deployment.cgroup_parent}/{env.env_id}"
        )
        assert outside == [], f"{env.env_id}: processes outside its cgroups: {outside}"
    fresh = started(make_user(), hello_context)
    assert fresh.docker("run", "--rm", "hello").stdout.strip() == "hello from offload"
    assert httpx.get(f"{deployment.server_url}/healthz", timeout=10).status_code == 200
