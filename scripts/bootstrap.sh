#!/usr/bin/env bash
# Installs what Offload needs on a fresh Debian/Ubuntu machine: the system packages, a Python 3.11+
# that can make virtualenvs, and a virtualenv (.venv) with Offload in it. Idempotent. Run it as
# root (`sudo scripts/bootstrap.sh`, or `scripts/bootstrap.sh` as root): quickstart.sh and test.sh
# run it for you. Argument: pip extras, e.g. "[test]".
#
# Every install step goes through `step`: quiet when it works; when it fails the script stops
# non-zero, shows the end of that step's output and says what to do. test.sh and quickstart.sh
# source this file for `step`, `die`, `apt_install`, `ensure_venv`, `pip_step` and `bootstrap`.
#
# Environment: PYTHON (the interpreter; default python3), OFFLOAD_VENV (default .venv),
# OFFLOAD_SKIP_APT=1 (never run apt-get: you provide the system packages yourself).
set -euo pipefail

OFFLOAD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${OFFLOAD_VENV:-$OFFLOAD_ROOT/.venv}
PROG=${0##*/}
PY=${PYTHON:-python3}

HINT_APT="Check the network and the apt sources (/etc/apt/sources.list*), then rerun."
HINT_PIP="Check the network and the package index (\`pip config list\`, PIP_INDEX_URL), then rerun."
HINT_PYTHON="Install python3 (3.11 or newer) from your distribution (Debian 12: \`apt-get install \
python3 python3-venv\`; Ubuntu 22.04: \`apt-get install python3.11 python3.11-venv\`), or point \
PYTHON at one: \`PYTHON=/path/to/python3.11 scripts/$PROG\` (with sudo: \`sudo PYTHON=... scripts/$PROG\`)."

die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 1
}

# step NAME HINT CMD...: runs CMD with its output kept in a log. Quiet when CMD succeeds; when it
# fails, prints the log's last lines and stops with CMD's exit status, naming the step and saying
# what to do (HINT). CMD is one command, not a shell function (errexit would not apply inside it).
step() {
  local name=$1 hint=$2 log rc=0
  shift 2
  echo "==> $name"
  log=$(mktemp "${TMPDIR:-/tmp}/offload-step.XXXXXX.log")
  "$@" >"$log" 2>&1 </dev/null || rc=$?
  if [ "$rc" = 0 ]; then
    rm -f "$log"
    return 0
  fi
  {
    echo "---- the last lines of its output (all of it: $log)"
    tail -n "${OFFLOAD_STEP_TAIL:-60}" "$log"
    echo "----"
    echo "$PROG: step '$name' failed (exit $rc); see the output above."
    echo "$PROG: $hint"
  } >&2
  exit "$rc"
}

APT_UPDATED=
# apt_install PKG...: installs the packages (none: nothing to do), after one `apt-get update`.
apt_install() {
  [ $# -gt 0 ] || return 0
  if [ "${OFFLOAD_SKIP_APT:-}" = 1 ]; then
    echo "==> not installing $* (OFFLOAD_SKIP_APT=1)" >&2
    return 0
  fi
  command -v apt-get >/dev/null 2>&1 ||
    die "missing: $*, and there is no apt-get here. Install them with your distribution's package manager, then rerun with OFFLOAD_SKIP_APT=1."
  [ "$(id -u)" = 0 ] ||
    die "installing $* needs root: run \`sudo scripts/$PROG\`, or \`scripts/$PROG\` as root."
  export DEBIAN_FRONTEND=noninteractive
  local apt=(apt-get -o DPkg::Lock::Timeout=300)  # wait for unattended-upgrades on a fresh machine
  if [ -z "$APT_UPDATED" ]; then
    step "apt-get update" "$HINT_APT" "${apt[@]}" update
    APT_UPDATED=1
  fi
  step "apt-get install $*" "$HINT_APT" "${apt[@]}" install -y "$@"
}

system_packages() {
  local need=() pair cmd pkg
  # The runner's sandboxes are built from Docker's rootless parts: rootlesskit, slirp4netns (the
  # alternative network helper; pasta is built below), newuidmap/newgidmap (uidmap); egress
  # rules need iptables; the pull cache is docker-registry; gcc, make, curl, xz build pasta.
  for pair in dockerd:docker.io nsenter:util-linux setpriv:util-linux ip:iproute2 \
    rootlesskit:rootlesskit slirp4netns:slirp4netns newuidmap:uidmap iptables:iptables \
    docker-registry:docker-registry \
    busybox:busybox-static ssh:openssh-client sshd:openssh-server \
    cc:gcc make:make curl:curl xz:xz-utils; do
    cmd=${pair%%:*}
    pkg=${pair##*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
      need+=("$pkg")
    fi
  done
  [ -x /bin/busybox ] || need+=(busybox-static)
  [ -e /usr/include/stdio.h ] || need+=(libc6-dev)  # build_pasta.sh compiles against it
  apt_install ${need[@]+"${need[@]}"}
  pasta_build
}

# pasta_build: the sandboxes' network helper, built from Debian 13's source (scripts/build_pasta.sh
# says why Debian 12's will not do). Needs root to write /usr/local/bin.
pasta_build() {
  if [ "$(id -u)" != 0 ]; then
    echo "==> not building pasta (not root): a runner on this machine needs scripts/build_pasta.sh" >&2
    return 0
  fi
  step "build pasta (scripts/build_pasta.sh)" \
    "Check that deb.debian.org is reachable (or set PASST_URL to a mirror of the tarball), and that gcc and make work, then rerun; or run runners with OFFLOAD_RUNNER_NETWORK=slirp4netns." \
    "$OFFLOAD_ROOT/scripts/build_pasta.sh"
}

# find_python: PY is a Python 3.11+ (a stock Debian/Ubuntu image without any python3 gets one).
find_python() {
  if ! command -v "$PY" >/dev/null 2>&1; then
    [ -z "${PYTHON:-}" ] || die "PYTHON=$PYTHON is not an executable. $HINT_PYTHON"
    apt_install python3 python3-venv
    command -v "$PY" >/dev/null 2>&1 || die "no python3 found. $HINT_PYTHON"
  fi
  local out
  out=$("$PY" --version 2>&1) || die "\`$PY --version\` failed: $out. $HINT_PYTHON"
  [[ $out =~ ^Python\ ([0-9]+)\.([0-9]+) ]] ||
    die "\`$PY --version\` printed '$out', not a Python version. $HINT_PYTHON"
  local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]}
  if [ "$major" -lt 3 ] || { [ "$major" = 3 ] && [ "$minor" -lt 11 ]; }; then
    die "$PY is Python $major.$minor; Offload needs Python 3.11 or newer. $HINT_PYTHON"
  fi
  PY_VERSION=$major.$minor
}

# venv_module: PY can create virtualenvs with pip in them. Debian/Ubuntu ship the venv module
# without ensurepip (`python3 -m venv` fails) until python3-venv is installed.
venv_module() {
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 && return 0
  local real pkg
  real=$(readlink -f "$(command -v "$PY")")
  case $real in
    /usr/bin/python3*)
      if [ "$real" = "$(readlink -f /usr/bin/python3 2>/dev/null)" ]; then
        pkg=python3-venv
      else
        pkg=python$PY_VERSION-venv
      fi
      echo "==> $PY has no ensurepip module: installing $pkg"
      apt_install "$pkg"
      ;;
  esac
  "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1 ||
    die "$PY$([ "$real" = "$PY" ] || echo " ($real)") cannot create virtualenvs: its ensurepip module is missing. On Debian/Ubuntu \
install python3-venv (for python3.X: python3.X-venv); else set PYTHON to a Python 3.11+ that has it."
}

# ensure_venv DIR: DIR is a virtualenv of PY with pip (one left broken by a failed run is remade).
ensure_venv() {
  local dir=$1
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c 'import pip' >/dev/null 2>&1; then
    return 0
  fi
  [ -n "${PY_VERSION:-}" ] || find_python
  venv_module
  step "create the virtualenv $dir" \
    "$PY could not create $dir: see its message; remove $dir and rerun, or set PYTHON to another Python 3.11+." \
    "$PY" -m venv --clear "$dir"
}

# pip_step VENV ARGS...: `pip install ARGS` in VENV, as a step.
pip_step() {
  local venv=$1 name
  shift
  name="pip install $*"
  [ "$venv" = "$VENV" ] || name+=" into $venv"
  step "$name" "$HINT_PIP" "$venv/bin/python" -m pip install --disable-pip-version-check \
    --progress-bar off "$@"
}

# bootstrap [EXTRAS]: everything above, then checks that the install really works.
bootstrap() {
  local extras=${1:-}
  cd "$OFFLOAD_ROOT"
  system_packages
  find_python
  ensure_venv "$VENV"
  pip_step "$VENV" --upgrade pip
  pip_step "$VENV" -e ".$extras"
  # An editable install compiles nothing, and where PYTHONDONTWRITEBYTECODE is set Python never
  # writes the caches itself: every `docker offload` command would compile Offload's sources
  # again (tens of ms of each start). Python still checks each cache against its source.
  step "compile Offload's bytecode" \
    "Python could not compile src/offload: run '$VENV/bin/python -m compileall src/offload'." \
    "$VENV/bin/python" -m compileall -q src/offload
  step "import offload.cli.main, offload.server.app, offload.runner.daemon" \
    "The install in $VENV is incomplete: remove $VENV and rerun scripts/$PROG." \
    "$VENV/bin/python" -c "import offload.cli.main, offload.server.app, offload.runner.daemon"
  step "pip check" \
    "Conflicting packages in $VENV: remove $VENV and rerun scripts/$PROG; if it persists, a dependency range in pyproject.toml needs fixing." \
    "$VENV/bin/python" -m pip check
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  bootstrap "$@"
fi
