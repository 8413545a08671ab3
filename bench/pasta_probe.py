"""The sandbox's download with each network helper, pasta (the default) and slirp4netns,
alternating in one run: `RootlessDriver` with `OFFLOAD_RUNNER_NETWORK` set either way, egress
rules installed, busybox `wget` of 256 MB from the test web server (bench/sandbox.py's) in the
default bridge network and with `--network host`, against the same download on the host.

Run as root from the repository: `.venv/bin/python bench/pasta_probe.py [--rounds N]`.
Results: bench/results/pasta_probe-<ts>.json and .txt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import sandbox as sb  # noqa: E402

from offload.core.config import NetworkHelper  # noqa: E402

HELPERS: tuple[NetworkHelper, ...] = ("pasta", "slirp4netns")
lines: list[str] = []


def say(text: str) -> None:
    lines.append(text)
    print(text, flush=True)


async def one(work: Path, hello: Path, url: str, helper: NetworkHelper) -> dict[str, float]:
    driver = sb.Driver(sb.driver_settings(work, network=helper))
    try:
        env, _ = await driver.create()
        out = {}
        for network, name in ((None, "dl"), ("host", "dlh")):
            await sb.prepare_container(env.engine_socket, hello, network, name)
            speeds = await sb.container_downloads(env.engine_socket, name, url, 5)
            out[network or "bridge"] = statistics.median(speeds)
        await driver.destroy(env)
        return out
    finally:
        await driver.close()


async def run(work: Path, url: str, rounds: int) -> dict[str, Any]:
    hello = sb.write_build_context(work / "hello-drv")
    egress = sb.egress_firewall(sb.driver_settings(work))
    await egress.install()
    try:
        host = (await asyncio.to_thread(sb.host_downloads, url, 5))["busybox_wget_median_mb_s"]
        say(f"host busybox wget {host:.1f} MB/s")
        results: dict[str, list[dict[str, float]]] = {helper: [] for helper in HELPERS}
        for round_ in range(1, rounds + 1):
            for helper in HELPERS:
                got = await one(work, hello, url, helper)
                results[helper].append(got)
                say(f"  round {round_} {helper:12} bridge {got['bridge']:7.1f} MB/s "
                    f"{got['bridge'] / host:.2f}x host; --network host {got['host']:7.1f} MB/s "
                    f"{got['host'] / host:.2f}x")  # fmt: skip
        for helper in HELPERS:
            bridge = statistics.median(r["bridge"] for r in results[helper])
            say(f"median {helper:12} bridge {bridge / host:.2f}x host")
        return {"host_wget_mb_s": host, "variants": results}
    finally:
        await egress.uninstall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="alternations (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="opp-") as tmp:
        work = Path(tmp)
        with sb.test_server(work) as url:
            result = asyncio.run(run(work, url, args.rounds))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "results" / f"pasta_probe-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .txt")


if __name__ == "__main__":
    main()
