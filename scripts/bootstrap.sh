#!/usr/bin/env bash
# Installs what Offload needs on a fresh Debian/Ubuntu machine: system packages and a virtualenv.
# Idempotent; used by quickstart.sh and test.sh. Run as root (the embedded runner needs it).
set -euo pipefail
cd "$(dirname "$0")/.."

EXTRA_PIP=${1:-}   # e.g. "[test]"

need_apt=()
# The runner's sandboxes are built from Docker's rootless parts: rootlesskit, slirp4netns,
# newuidmap/newgidmap (uidmap); egress rules need iptables; the pull cache is docker-registry.
for pair in dockerd:docker.io nsenter:util-linux setpriv:util-linux ip:iproute2 \
  rootlesskit:rootlesskit slirp4netns:slirp4netns newuidmap:uidmap iptables:iptables \
  docker-registry:docker-registry \
  busybox:busybox-static ssh:openssh-client sshd:openssh-server; do
  cmd=${pair%%:*}; pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need_apt+=("$pkg")
done
[ -x /bin/busybox ] || need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "==> Installing system packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> Creating the virtualenv .venv"
  "$PY" -m venv .venv
fi
echo "==> Installing Offload into .venv"
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
.venv/bin/pip install -q --disable-pip-version-check -e ".${EXTRA_PIP}" 2>&1 | grep -vi "warning" || true
.venv/bin/python -c "import offload" >/dev/null
