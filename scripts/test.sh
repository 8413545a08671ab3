#!/usr/bin/env bash
# Every test: installs what the suite needs, runs ruff and mypy, starts the machine's default
# dockerd if none runs (tests prove containers do NOT land there), then runs pytest. Extra args go
# to pytest. OFFLOAD_SKIP_LINT=1 skips ruff and mypy for a quick local run (CI never does).
# Each install or check is a `step` of bootstrap.sh: a failure stops here, naming the step.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bootstrap.sh
. scripts/bootstrap.sh
[ "$(id -u)" = 0 ] ||
  die "run as root: \`sudo scripts/test.sh\`, or \`scripts/test.sh\` as root (tests create network namespaces, cgroups and engines)."

bootstrap "[test]"

# The dashboard tests drive Debian's Chromium with Playwright (never a downloaded browser). The
# server tests also run on PostgreSQL: throw-away clusters of their own from Debian's binaries
# (/usr/lib/postgresql/*/bin), so the package must not create and start a cluster of its own.
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
# Replica tests and bench/load.py put control-plane processes behind Debian's nginx, each run
# with a config of its own in a temp dir (never the package's service).
[ -x /usr/sbin/nginx ] || need+=(nginx)
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  # shellcheck disable=SC1091
  if (. /etc/os-release && [ "${ID:-}" = debian ] && [ "${VERSION_ID:-}" = 12 ]); then
    need+=(postgresql-15)
  else
    need+=(postgresql)
  fi
  if [ "${OFFLOAD_SKIP_APT:-}" != 1 ]; then
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false  # scripts/test.sh: tests start their own clusters" \
      >/etc/postgresql-common/createcluster.d/offload-tests.conf
  fi
fi
apt_install ${need[@]+"${need[@]}"}
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null ||
  die "no /usr/lib/postgresql/*/bin/initdb: install PostgreSQL's server package (Debian 12: \`apt-get install postgresql-15\`)."

# docker-compose 1.29 (a real client of the e2e tests) pins docker<6 and PyYAML<6, so it lives in
# its own venv. PyYAML 5.4.1 has no wheel for Python 3.11 and fails to build with Cython 3;
# docker-py 5 breaks with requests>=2.32 ("Not supported URL scheme http+docker") and urllib3 2.
COMPOSE_VENV=$OFFLOAD_ROOT/.venv-compose
if [ ! -x "$COMPOSE_VENV/bin/docker-compose" ]; then
  ensure_venv "$COMPOSE_VENV"
  pip_step "$COMPOSE_VENV" "cython<3" wheel
  pip_step "$COMPOSE_VENV" --no-build-isolation "pyyaml==5.4.1"
  pip_step "$COMPOSE_VENV" "docker-compose==1.29.2" "docker[ssh]<6" "requests<2.32" "urllib3<2"
fi
step "docker-compose version" "$COMPOSE_VENV is broken: remove it and rerun scripts/test.sh." \
  "$COMPOSE_VENV/bin/docker-compose" version

if [ "${OFFLOAD_SKIP_LINT:-}" = 1 ]; then
  echo "==> ruff and mypy skipped (OFFLOAD_SKIP_LINT=1; CI runs them)"
else
  lint_dirs=()
  for dir in src tests bench scripts; do
    if [ -n "$(find "$dir" -name '*.py' -print -quit 2>/dev/null)" ]; then
      lint_dirs+=("$dir")
    fi
  done
  hint="Fix the findings above (\`$VENV/bin/ruff check --fix\`, \`$VENV/bin/ruff format\`); for a quick local run only, OFFLOAD_SKIP_LINT=1 skips this."
  step "ruff check ${lint_dirs[*]}" "$hint" "$VENV/bin/ruff" check "${lint_dirs[@]}"
  step "ruff format --check ${lint_dirs[*]}" "$hint" "$VENV/bin/ruff" format --check "${lint_dirs[@]}"
  step "mypy src" "Fix the type errors above; for a quick local run only, OFFLOAD_SKIP_LINT=1 skips this." \
    "$VENV/bin/mypy" src
fi

if ! docker -H unix:///var/run/docker.sock version >/dev/null 2>&1; then
  echo "==> Starting the machine's default dockerd"
  (dockerd >/var/log/offload-test-default-dockerd.log 2>&1 &)
  for _ in $(seq 1 100); do
    docker -H unix:///var/run/docker.sock version >/dev/null 2>&1 && break
    sleep 0.2
  done
  docker -H unix:///var/run/docker.sock version >/dev/null 2>&1 ||
    die "the default dockerd did not start within 20 s: see /var/log/offload-test-default-dockerd.log."
fi

echo "==> pytest"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
