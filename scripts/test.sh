#!/usr/bin/env bash
# Every test: installs what the suite needs, starts the machine's default dockerd if none runs
# (tests prove containers do NOT land there), then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "Run as root: tests create network namespaces, cgroups and engines." >&2; exit 1; }

scripts/bootstrap.sh "[test]"

# docker-compose 1.29 (a real client of the e2e tests) pins docker<6 and PyYAML<6, so it lives in
# its own venv. PyYAML 5.4.1 has no wheel for Python 3.11 and fails to build with Cython 3;
# docker-py 5 breaks with requests>=2.32 ("Not supported URL scheme http+docker") and urllib3 2.
if [ ! -x .venv-compose/bin/docker-compose ]; then
  echo "==> Installing docker-compose 1.29 into .venv-compose"
  "${PYTHON:-python3}" -m venv .venv-compose
  pipq=(.venv-compose/bin/pip install -q --disable-pip-version-check)
  "${pipq[@]}" "cython<3" wheel
  "${pipq[@]}" --no-build-isolation "pyyaml==5.4.1"
  "${pipq[@]}" "docker-compose==1.29.2" "docker[ssh]<6" "requests<2.32" "urllib3<2"
fi
.venv-compose/bin/docker-compose version >/dev/null

# The dashboard tests drive Debian's Chromium with Playwright (never a downloaded browser).
if [ ! -x /usr/bin/chromium ]; then
  echo "==> Installing chromium for the dashboard tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

# The egress e2e tests push and pull through a real registry: Debian's docker-registry
# (CNCF distribution), run in a network namespace of the tests' own.
if [ ! -x /usr/bin/docker-registry ]; then
  echo "==> Installing docker-registry for the registry e2e tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker-registry >/dev/null
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
