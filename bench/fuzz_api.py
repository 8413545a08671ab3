"""A long fuzzing run of the control plane's REST API against its live OpenAPI document.

The harness of tests/fuzz (a real server on 127.0.0.1 over a SQLite file, real user and runner
tokens, schemathesis's every phase and default check plus ErrorBody's, the named exceptions)
with a larger budget: `--examples` per operation and phase (the CI test sends 10), a random
seed unless `--seed` is given, and optionally `--minutes`, which schemathesis spends in full
(it keeps fuzzing and following links until the time is up).  `--database postgresql` runs the
server on a throw-away PostgreSQL cluster (tests/support/postgres.py) instead of a SQLite file.

Results: bench/results/fuzz_api-<ts>.json (the tally: requests by operation, phase and status;
every finding with its curl) and .txt (the summary); the exit status is 1 when anything was
found.  Run from the repository: `.venv/bin/python bench/fuzz_api.py [--examples 500]`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.fuzz.harness import fuzz, load_schema, operation_labels, schema_config, serve  # noqa: E402
from tests.support.postgres import INSTALL_HINT, PostgresCluster, find_bin_dir  # noqa: E402

RESULTS = REPO / "bench" / "results"
LINES: list[str] = []


def say(text: str = "") -> None:
    LINES.append(text)
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=None, help="default: a random one")
    parser.add_argument("--minutes", type=float, default=None, help="fuzz for this long")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    max_time_s = round(args.minutes * 60) if args.minutes else None

    cluster = None
    if args.database == "postgresql":
        bin_dir = find_bin_dir()
        if bin_dir is None:
            sys.exit(f"fuzz_api: {INSTALL_HINT}")
        cluster = PostgresCluster(bin_dir)
        cluster.start()
    try:
        database_url = cluster.create_database("fuzz") if cluster else None
        with tempfile.TemporaryDirectory(prefix="fuzz-api-") as data_dir:
            with serve(Path(data_dir), database_url) as target:
                live = operation_labels(target.schema_url)
                config = schema_config(
                    target.tokens, max_examples=args.examples, seed=seed, max_time_s=max_time_s
                )
                tally = fuzz(load_schema(target.schema_url, config))
    finally:
        if cluster is not None:
            cluster.stop()

    summary = tally.summary()
    say(f"{args.database}; seed {seed}, {args.examples} examples per operation and phase")
    say(
        f"{tally.requests} requests in {summary['seconds']} s to {len(tally.statuses)} of "
        f"{len(live)} operations; by phase: {summary['by_phase']}"
    )
    say(f"links between operations: {tally.links}; stateful requests: {tally.phases['stateful']}")
    say(f"server errors (5xx): {summary['server_errors']}")
    never = sorted(live - set(tally.statuses))
    if never:
        say(f"never fuzzed: {', '.join(never)}")
    for error in tally.errors:
        say(f"engine error: {error}")
    say(f"findings: {len(tally.findings)}")
    for finding in tally.findings:
        say("- " + finding.describe())

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "database": args.database,
        "seed": seed,
        "examples": args.examples,
        "max_time_s": max_time_s,
        **summary,
    }
    (RESULTS / f"fuzz_api-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / f"fuzz_api-{stamp}.txt").write_text("\n".join(LINES) + "\n")
    return 1 if tally.findings or tally.errors or never else 0


if __name__ == "__main__":
    sys.exit(main())
