#!/usr/bin/env bash
# The main job on the embedded default: installs everything, starts a control plane and a local
# runner on this machine, starts a session and runs real containers through the SSH tunnel.
# Leaves you with a running session: `docker offload status`, `docker offload stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bootstrap.sh
. scripts/bootstrap.sh
[ "$(id -u)" = 0 ] ||
  die "run as root: \`sudo scripts/quickstart.sh\`, or \`scripts/quickstart.sh\` as root (the local runner creates sandboxes, cgroups and egress rules)."

bootstrap
step "link offload and docker-offload into /usr/local/bin" "Check that /usr/local/bin exists and is writable." \
  ln -sf "$VENV/bin/offload" "$VENV/bin/docker-offload" /usr/local/bin/
command -v docker >/dev/null ||
  die "docker CLI not found; Debian's docker.io provides one at /usr/bin/docker (\`apt-get install docker.io\`)."

echo "==> offload up (control plane + local runner)"
offload up
echo "==> docker offload start"
offload start            # also installs the `docker offload` CLI plugin
docker offload status

echo "==> docker build (FROM scratch + static busybox) on the remote engine"
ctx=$(mktemp -d)
cp /bin/busybox "$ctx/busybox"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["/bin/sh", "-c", "echo Hello from $(hostname), a container on your Offload engine"]
DOCKERFILE
docker build -q -t hello "$ctx"
rm -rf "$ctx"
echo "==> docker run --rm hello"
docker run --rm hello
echo "==> the sandbox: a privileged container given the engine's / sees the session's own root, not the runner's"
# (-v /:/host would name the laptop's /, which Offload does not sync; a local volume binds the engine's.)
docker volume create --opt type=none --opt o=bind --opt device=/ engine-root >/dev/null
docker run --rm --privileged -v engine-root:/host hello ls /host /host/etc
docker volume rm engine-root >/dev/null
echo
echo "Done. The session keeps running: try \`docker run -it --rm hello sh\`,"
echo "\`docker offload status\`, and \`docker offload stop\` to end it (\`offload down\` stops everything)."
