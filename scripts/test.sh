#!/usr/bin/env bash
# Every test: installs what the suite needs, starts the machine's default dockerd if none runs
# (tests prove containers do NOT land there), then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "Run as root: tests create network namespaces, cgroups and engines." >&2; exit 1; }

scripts/bootstrap.sh "[test]"

# The dashboard tests drive Debian's Chromium with Playwright (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  echo "==> Installing chromium for the dashboard tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

if ! docker -H unix:///var/run/docker.sock version >/dev/null 2>&1; then
  echo "==> Starting the machine's default dockerd"
  (dockerd >/var/log/offload-test-default-dockerd.log 2>&1 &)
  for _ in $(seq 1 100); do
    docker -H unix:///var/run/docker.sock version >/dev/null 2>&1 && break
    sleep 0.2
  done
fi

echo "==> pytest"
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
