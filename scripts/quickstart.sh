#!/usr/bin/env bash
# The main job on the embedded default: installs everything, starts a control plane and a local
# runner on this machine, starts a session and runs real containers through the SSH tunnel.
# Leaves you with a running session: `docker offload status`, `docker offload stop`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "Run as root (sudo): the local runner creates sandboxes, cgroups and egress rules." >&2; exit 1; }

scripts/bootstrap.sh
ln -sf "$PWD/.venv/bin/offload" /usr/local/bin/offload
ln -sf "$PWD/.venv/bin/docker-offload" /usr/local/bin/docker-offload
if ! command -v docker >/dev/null; then
  echo "docker CLI not found; docker.io provides one at /usr/bin/docker" >&2; exit 1
fi

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
