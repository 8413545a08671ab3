"""Pulls through the runner's pull-through cache against pulls over an internet-like link.

One run, one deployment (`offload up`, the runner's pull cache fronting a test hub): a real
registry (Debian's `docker-registry`, TLS + htpasswd) in a network namespace whose link is
shaped like the internet, a `MB`-sized image of incompressible data pushed to it (unshaped), then
three pulls, each by a fresh session of another organisation (an empty engine):

- direct: `docker pull HUB/library/big:1` (a registry name, so no mirror): the shaped link;
- cold:   `docker pull big:1` (docker.io, so the runner's cache, which fetches it through the
          shaped link and keeps it);
- warm:   `docker pull big:1` again: served by the runner's cache.

Target: direct / warm >= 5x. Shaping: `tc netem rate 100mbit delay 10ms` on both ends of the
hub's veth (20 ms round trip) where the kernel has netem; this machine's kernel has no netem
(CONFIG_NET_SCH_NETEM is not set), so then `tbf rate 100mbit` (the rate only) on both ends, and
the result says which was applied.  Results: bench/results/registry-<ts>.json and .txt.

Run as root from the repository: `.venv/bin/python bench/registry.py [--mb 200]`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
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

from tests.e2e.conftest import User, embedded_deployment, signed_in_user  # noqa: E402
from tests.support.images import BUSYBOX  # noqa: E402
from tests.support.internet import Netns, internet_hosts  # noqa: E402
from tests.support.pki import CertificateAuthority  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

RESULTS = REPO / "bench" / "results"
RATE = "100mbit"
HALF_RTT = "10ms"
PULL_TIMEOUT_S = 900
LINES: list[str] = []


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


class _Dirs:
    """What signed_in_user needs of pytest's tmp_path_factory: fresh directories."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=name, dir=self.root))
        return path


def shape(ns: Netns) -> str:
    """Shape both ends of the hub's veth; returns the qdisc applied."""
    inner = ns.host_if[:-1] + "n"
    ends = [["tc", "qdisc", "replace", "dev", ns.host_if, "root"],
            ["ip", "netns", "exec", ns.name, "tc", "qdisc", "replace", "dev", inner, "root"]]  # fmt: skip
    netem = ["netem", "rate", RATE, "delay", HALF_RTT, "limit", "10000"]
    if all(subprocess.run(end + netem, capture_output=True).returncode == 0 for end in ends):
        return f"netem rate {RATE} delay {HALF_RTT} each way"
    tbf = ["tbf", "rate", RATE, "burst", "256kb", "latency", "50ms"]
    for end in ends:
        subprocess.run(end + tbf, check=True, capture_output=True)
    return f"tbf rate {RATE} (no netem in this kernel: no added delay)"


def timed_pull(user: User, image: str, hub: str, password: str) -> float:
    """A fresh session (an empty engine), signed in to the hub from the laptop, pulls `image`."""
    user.offload("stop", "--force", check=False, timeout=120)
    user.docker("offload", "start", "--timeout", "600s", timeout=120)
    user.docker("login", hub, "-u", "pub", "--password-stdin", input=password + "\n")
    started = time.monotonic()
    user.docker("pull", "-q", image, timeout=PULL_TIMEOUT_S)
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the image's data layer")
    args = parser.parse_args()
    results: dict[str, Any] = {"mb": args.mb, "started": datetime.now(UTC).isoformat()}
    with tempfile.TemporaryDirectory(prefix="offload-bench-registry-") as tmp:
        work = Path(tmp)
        dirs = _Dirs(work)
        ca = CertificateAuthority(work / "ca")
        passwords = {"cache": uuid.uuid4().hex, "pub": uuid.uuid4().hex}
        with internet_hosts(1) as (hub_ns,):
            hub = start_registry(hub_ns, hub_ns.address, 5000, work / "hub", ca, passwords)
            (work / "cache-pw").write_text(passwords["cache"])
            runner_env = {
                "OFFLOAD_RUNNER_REGISTRY_CA": str(ca.cert_file),
                "OFFLOAD_RUNNER_PULL_CACHE": "true",
                "OFFLOAD_RUNNER_PULL_CACHE_UPSTREAM": hub.url,
                "OFFLOAD_RUNNER_PULL_CACHE_USERNAME": "cache",
                "OFFLOAD_RUNNER_PULL_CACHE_PASSWORD_FILE": str(work / "cache-pw"),
            }
            with embedded_deployment(dirs.mktemp("admin"), "bench-rg", runner_env) as deployment:
                publisher = signed_in_user(deployment, dirs, "pub", "publishers")  # type: ignore[arg-type]
                publisher.docker("offload", "start", "--timeout", "600s", timeout=120)
                context = dirs.mktemp("ctx")
                shutil.copy(BUSYBOX, context / "busybox")
                (context / "Dockerfile").write_text(
                    "FROM scratch\nCOPY busybox /bin/busybox\n"
                    f'RUN ["/bin/busybox", "sh", "-c", "/bin/busybox head -c {args.mb}m '
                    '/dev/urandom > /data"]\n'
                )
                image = f"{hub.host}/library/big:1"
                publisher.docker("build", "-q", "-t", image, str(context), timeout=600)
                publisher.docker("login", hub.host, "-u", "pub", "--password-stdin",
                                 input=passwords["pub"] + "\n")  # fmt: skip
                publisher.docker("push", image, timeout=PULL_TIMEOUT_S)
                publisher.offload("stop", "--force", check=False, timeout=120)
                results["shaping"] = shape(hub_ns)
                say(f"link to the hub: {results['shaping']}; image: {args.mb} MB of random data")
                pulls = {}
                for name, ref in (("direct", image), ("cold", "big:1"), ("warm", "big:1")):
                    user = signed_in_user(deployment, dirs, name, f"org-{name}")  # type: ignore[arg-type]
                    pulls[name] = timed_pull(user, ref, hub.host, passwords["pub"])
                    say(f"  {name:6} pull of {ref}: {pulls[name]:.2f} s")
                    user.offload("stop", "--force", check=False, timeout=120)
                results["pull_s"] = pulls
    ratio = pulls["direct"] / pulls["warm"]
    results["direct_over_warm"] = ratio
    results["cold_over_warm"] = pulls["cold"] / pulls["warm"]
    say(f"\ndirect / warm cache: {ratio:.2f}x (target >= 5x: {'met' if ratio >= 5 else 'MISSED'})")
    say(f"cold cache / warm cache: {results['cold_over_warm']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"registry-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".txt").write_text("\n".join(LINES) + "\n")
    say(f"wrote {stem}.json")


if __name__ == "__main__":
    main()
