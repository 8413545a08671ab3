"""Probe, not a product path: a container's download through the sandbox with slirp4netns (as
shipped) against pasta (Debian's `passt`), in the same run.

Debian 12's rootlesskit 1.1 has no pasta driver; `bench/slirp_as_pasta.sh` stands in for the
slirp4netns binary (`--slirp4netns-binary`) and starts pasta on the sandbox's namespace. The
sandbox is otherwise the runner's own (`RootlessDriver`, egress rules installed). Each variant
runs twice, alternating; busybox `wget` of 256 MB from the test web server (bench/sandbox.py's),
in the default bridge network and with `--network host`, against the same download on the host.

Run as root from the repository, with `passt` installed: `.venv/bin/python bench/pasta_probe.py`.
Results: bench/results/pasta_probe-<ts>.json and .txt.
"""

from __future__ import annotations

import asyncio
import json
import shutil
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

WRAPPER = HERE / "slirp_as_pasta.sh"
VARIANTS = {
    "slirp4netns (as shipped)": {},
    "pasta (bench/slirp_as_pasta.sh)": {"--slirp4netns-sandbox=auto": f"--slirp4netns-binary={WRAPPER}"},
}  # fmt: skip
lines: list[str] = []


def say(text: str) -> None:
    lines.append(text)
    print(text, flush=True)


async def one(settings: Any, hello: Path, url: str, replace: dict[str, str]) -> dict[str, float]:
    driver = sb.Driver(settings)
    try:
        with sb.rootlesskit_options(replace):
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


async def run(work: Path, url: str) -> dict[str, Any]:
    hello = sb.write_build_context(work / "hello-drv")
    settings = sb.driver_settings(work)
    egress = sb.egress_firewall(settings)
    await egress.install()
    try:
        host = (await asyncio.to_thread(sb.host_downloads, url, 5))["busybox_wget_median_mb_s"]
        say(f"host busybox wget {host:.1f} MB/s")
        results: dict[str, list[dict[str, float]]] = {label: [] for label in VARIANTS}
        for round_ in (1, 2):
            for label, replace in VARIANTS.items():
                got = await one(settings, hello, url, replace)
                results[label].append(got)
                say(f"  round {round_} {label:32} bridge {got['bridge']:7.1f} MB/s "
                    f"{got['bridge'] / host:.2f}x host; --network host {got['host']:7.1f} MB/s "
                    f"{got['host'] / host:.2f}x")  # fmt: skip
        return {"host_wget_mb_s": host, "variants": results}
    finally:
        await egress.uninstall()


def main() -> None:
    if shutil.which("pasta") is None:
        sys.exit("pasta not found: apt-get install passt")
    with tempfile.TemporaryDirectory(prefix="opp-") as tmp:
        work = Path(tmp)
        with sb.test_server(work) as url:
            result = asyncio.run(run(work, url))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "results" / f"pasta_probe-{stamp}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .txt")


if __name__ == "__main__":
    main()
