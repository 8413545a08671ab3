"""The `offload` command's entry point (and the Docker CLI plugin's, through `plugin`).

Light on purpose: for `start`, the agent is forked before the CLI's imports (see
`agent_launcher`); every other command goes straight to `main`.
"""

from __future__ import annotations

import sys
from typing import NoReturn


def main() -> NoReturn:
    run(sys.argv[1:], "offload")


def run(args: list[str], prog_name: str) -> NoReturn:
    if args[:1] == ["start"]:
        # What both sides use (pydantic, the schemas, httpx) is imported once, before the fork.
        from offload.cli import agent_launcher, session_ops  # noqa: F401

        agent_launcher.fork_for_start()
    from offload.cli.main import run_and_exit

    run_and_exit(args=args, prog_name=prog_name)


if __name__ == "__main__":
    main()
