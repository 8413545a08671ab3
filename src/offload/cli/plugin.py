"""`docker-offload`: the Docker CLI plugin, so that `docker offload start` works.

The Docker CLI runs a plugin as `docker-offload docker-cli-plugin-metadata` to learn about it, and
as `docker-offload offload ARGS…` for `docker offload ARGS…`.
"""

from __future__ import annotations

import json
import sys

from offload import __version__

METADATA = {
    "SchemaVersion": "0.1.0",
    "Vendor": "Offload",
    "Version": __version__,
    "ShortDescription": "Run containers and builds on a remote, isolated engine",
    "URL": "https://github.com/offload-dev/offload",
}


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["docker-cli-plugin-metadata"]:
        print(json.dumps(METADATA))
        return
    if args[:1] == ["offload"]:
        args = args[1:]
    from offload.cli.entry import run

    run(args, "docker offload")


if __name__ == "__main__":
    main()
