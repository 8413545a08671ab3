"""Builds on the organisation's shared builder: a teammate's rebuild in a fresh session against a
cold build, and the bytes a one-line change moves into the session's engine.

One run, one deployment (`offload up`). "The internet" is a network namespace with a web server
whose link is shaped (`tc netem rate 100mbit delay 10ms` each way where the kernel has netem;
this machine's has none, so `tbf rate 100mbit`, and the result says which). The Dockerfile has a
dependency step that downloads `--deps-mb` from it (tens of seconds over the shaped link), a
cache-mount step, and a `COPY src/` of ~1 MB of source:

1. cold: a fresh organisation's first build (empty builder), in a fresh session;
2. shared: a teammate's fresh session builds the same context (the builder's cache);
   target cold / shared >= 5x;
3. one-line change: the teammate edits one line of one source file and builds again: bytes
   moved into the session's engine (the runner's "Offload: moved ..." step) against the size of
   the changed layer (`docker history` of the new image); target <= 1.1x.

Results: bench/results/builds-<ts>.json and .txt.
Run as root from the repository: `.venv/bin/python bench/builds.py [--deps-mb 200]`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from bench.registry import RESULTS, _Dirs, shape  # noqa: E402
from tests.e2e.conftest import User, embedded_deployment, signed_in_user  # noqa: E402
from tests.support.images import BUSYBOX  # noqa: E402
from tests.support.internet import http_server, internet_hosts  # noqa: E402

DEBIAN_DOCKER = "/usr/bin/docker"
PORT = 8080
LINES: list[str] = []
MOVED = re.compile(
    r"Offload: moved (\d+) of (\d+) layers into the session's engine \(([\d.]+) (KiB|MiB) sent"
)


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


def context(directory: Path, url: str, marker: str) -> Path:
    directory.mkdir(parents=True)
    shutil.copy(BUSYBOX, directory / "busybox")
    src = directory / "src"
    src.mkdir()
    for n in range(50):  # ~1 MB of "source"
        (src / f"module{n}.py").write_text("".join(f"line_{n}_{i} = {i}\n" for i in range(1600)))
    (directory / "Dockerfile").write_text(
        "FROM scratch\nCOPY busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        f"RUN wget -q -O /deps.bin {url} && echo {marker} > /deps.txt\n"
        "RUN --mount=type=cache,target=/cache sh -c 'cp /deps.bin /cache/ && md5sum /cache/deps.bin > /deps.md5'\n"
        "COPY src/ /src/\n"
    )
    return directory


def timed_build(user: User, ctx: Path, tag: str) -> tuple[float, str]:
    started = time.monotonic()
    built = user.run(DEBIAN_DOCKER, "build", "--progress=plain", "-t", tag, str(ctx),
                     timeout=1800, env_extra={"DOCKER_BUILDKIT": "1"})  # fmt: skip
    return time.monotonic() - started, built.stdout + built.stderr


def fresh_session(user: User) -> None:
    user.offload("stop", "--force", check=False, timeout=120)
    user.docker("offload", "start", "--timeout", "1800s", timeout=120)
    user.docker("version")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deps-mb", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, Any] = {"deps_mb": args.deps_mb, "started": datetime.now(UTC).isoformat()}
    with tempfile.TemporaryDirectory(prefix="offload-bench-builds-") as tmp:
        work = Path(tmp)
        dirs = _Dirs(work)
        site = work / "site"
        site.mkdir()
        with (site / "deps.bin").open("wb") as out:
            out.write(Path("/dev/urandom").open("rb").read(args.deps_mb * 1024 * 1024))
        with internet_hosts(1) as (net,):
            http_server(net, net.address, PORT, site, work / "site.log")
            results["shaping"] = shape(net)
            url = f"http://{net.address}:{PORT}/deps.bin"
            with embedded_deployment(dirs.mktemp("admin"), "bench-b", {}) as deployment:
                org = f"bench-{uuid.uuid4().hex[:6]}"
                alice = signed_in_user(deployment, dirs, "alice", org)  # type: ignore[arg-type]
                bob = signed_in_user(deployment, dirs, "bob", org)  # type: ignore[arg-type]
                ctx = context(work / "ctx", url, uuid.uuid4().hex)
                fresh_session(alice)
                cold, _ = timed_build(alice, ctx, "app:1")
                say(f"link: {results['shaping']}; dependency download {args.deps_mb} MB")
                say(f"  cold build (empty builder), fresh session: {cold:.2f} s")
                fresh_session(bob)
                shared, out = timed_build(bob, ctx, "app:1")
                say(f"  teammate's fresh session, shared cache:    {shared:.2f} s")
                cached = len(re.findall(r"^#\d+ CACHED$", out, re.M))
                (ctx / "src" / "module7.py").write_text(
                    (ctx / "src" / "module7.py").read_text().replace("line_7_3 = 3", "line_7_3 = 4")
                )
                _, changed = timed_build(bob, ctx, "app:2")
                moved = MOVED.search(changed)
                assert moved, changed
                factor = 1024 if moved.group(4) == "KiB" else 1024 * 1024
                sent = float(moved.group(3)) * factor
                history = bob.docker(
                    "history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", "app:2"
                )
                layer = _first_layer_bytes(bob, "app:2")
                say(f"  one-line change: moved {moved.group(1)} of {moved.group(2)} layers, "
                    f"{sent / 1024:.1f} KiB sent; the changed layer is {layer / 1024:.1f} KiB")  # fmt: skip
                results.update(
                    cold_s=cold, shared_s=shared, cached_steps=cached,
                    one_line={"layers_sent": int(moved.group(1)), "layers": int(moved.group(2)),
                              "bytes_sent": sent, "changed_layer_bytes": layer,
                              "history": history.stdout},
                )  # fmt: skip
                for user in (alice, bob):
                    user.offload("stop", "--force", check=False, timeout=120)
                log = deployment.data_dir / "logs" / "runner.log"
                moves = [line.split(" INFO ", 1)[-1] for line in log.read_text().splitlines()
                         if "Offload: moved" in line]  # fmt: skip
                results["moves_logged"] = moves
                for line in moves:
                    say(f"  runner: {line}")
    speedup = results["cold_s"] / results["shared_s"]
    ratio = results["one_line"]["bytes_sent"] / results["one_line"]["changed_layer_bytes"]
    results["cold_over_shared"], results["sent_over_changed_layer"] = speedup, ratio
    say(
        f"\ncold / shared-cache rebuild: {speedup:.2f}x (target >= 5x: {'met' if speedup >= 5 else 'MISSED'})"
    )
    say(
        f"bytes moved / changed layer: {ratio:.3f}x (target <= 1.1x: {'met' if ratio <= 1.1 else 'MISSED'})"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"builds-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    say(f"wrote {stem}.json")


def _first_layer_bytes(user: User, image: str) -> int:
    """The uncompressed size of the image's top layer (`docker image inspect` sizes differ by
    layer only through `docker history`, whose newest row is the top layer)."""
    rows = user.docker("history", "--no-trunc", "--human=false", "--format", "{{.Size}}", image)
    return int(rows.stdout.split()[0])


if __name__ == "__main__":
    main()
