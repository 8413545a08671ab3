#!/bin/sh
# Runs as root of a fresh user namespace (rootlesskit's child: its own mount, pid, ipc, uts,
# network and cgroup namespaces), before the environment's dockerd. Builds a private root
# filesystem and pivots into it, so that nothing of the runner host is left in view but its
# read-only program files (/usr): not the runner's data, keys or tokens, not the control
# plane's, not other environments. Then execs "$@" (dockerd) with a clean environment.
#
# Inputs (environment, set by offload.runner.sandbox):
#   OFFLOAD_SB_ROOT      empty host directory that becomes / (a tmpfs is mounted on it here)
#   OFFLOAD_SB_DATA      host directory mounted at /var/lib/docker
#   OFFLOAD_SB_AREA      the mount area's path on the runner, which it keeps inside
#   OFFLOAD_SB_AREA_SOURCE  where this script finds it (through run_dir)
#   OFFLOAD_SB_SOCKETS   host directory mounted at /run/offload (the engine socket)
#   OFFLOAD_SB_PLUGINS   host directory with this environment's policy socket, at /run/docker/plugins
#   OFFLOAD_SB_CONFIG    host file copied to /etc/docker/daemon.json
#   OFFLOAD_SB_CGROUPS   what to mount at /sys/fs/cgroup: "name=options ..." (v1), "=cgroup2" (v2)
#   OFFLOAD_SB_HOSTNAME  the environment's host name
#   OFFLOAD_SB_CA_BUNDLE host file that replaces /etc/ssl/certs/ca-certificates.crt ("": the host's)
# GPU environments (offload.runner.gpus; all "" otherwise):
#   OFFLOAD_SB_DEVICES   host directory of device nodes (bind mounts the runner made), each bound
#                        at /dev/<its name>: the environment's GPUs and the control nodes, no others
#   OFFLOAD_SB_GPUS      uuid=/dev/nvidiaN,... in the order NVML inside numbers them: dockerd's
#                        OFFLOAD_GPUS (prestart hooks inherit dockerd's environment)
#   OFFLOAD_SB_GPU_PCI   the GPUs' entries of /proc/driver/nvidia/gpus (0000:3b:00.0 ...): the
#                        others are hidden there (in every environment of a GPU host)
#   OFFLOAD_SB_GPU_HOOKS host directory bound read-only at /opt/offload-gpu-hooks, first on
#                        dockerd's PATH (its nvidia-container-runtime-hook enables `--gpus`)
#   OFFLOAD_SB_NVIDIA_CONFIG  host file copied to /etc/nvidia-container-runtime/config.toml
set -eu
step() { STEP="$1"; }
trap 'rc=$?; [ "$rc" = 0 ] || echo "offload sandbox: failed while: $STEP (exit $rc)" >&2' EXIT

R=$OFFLOAD_SB_ROOT

step "mounting the private root"
mount -t tmpfs -o mode=755 offload-root "$R"
mkdir -p "$R/usr" "$R/etc/docker" "$R/proc" "$R/sys" "$R/dev" "$R/run/offload" \
  "$R/run/docker/plugins" "$R/tmp" "$R/var/lib/docker" "$R/var/tmp" "$R/root"
chmod 1777 "$R/tmp" "$R/var/tmp"
chmod 700 "$R/root"
ln -s /run "$R/var/run"

step "sharing /usr read-only"
mount --rbind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
for d in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$R/$d"; fi
done

step "writing /etc"
# Public system files only: no shadow, no ssh keys, no runner or control-plane configuration.
mkdir -p "$R/etc/ssl"
[ -d /etc/ssl/certs ] && cp -a /etc/ssl/certs "$R/etc/ssl/"
if [ -n "$OFFLOAD_SB_CA_BUNDLE" ]; then  # the system's CAs and the operator's registry CAs
  mkdir -p "$R/etc/ssl/certs"
  rm -f "$R/etc/ssl/certs/ca-certificates.crt"
  cp "$OFFLOAD_SB_CA_BUNDLE" "$R/etc/ssl/certs/ca-certificates.crt"
fi
for f in alternatives nsswitch.conf services protocols ethertypes ld.so.cache ld.so.conf \
  ld.so.conf.d os-release localtime mime.types; do
  if [ -e "/etc/$f" ] || [ -L "/etc/$f" ]; then cp -a "/etc/$f" "$R/etc/"; fi
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n' >"$R/etc/passwd"
printf 'root:x:0:\ndocker:x:0:\nnogroup:x:65534:\n' >"$R/etc/group"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n' \
  "$OFFLOAD_SB_HOSTNAME" >"$R/etc/hosts"
echo "$OFFLOAD_SB_HOSTNAME" >"$R/etc/hostname"
echo "nameserver 10.0.2.3" >"$R/etc/resolv.conf"  # the network helper's DNS forwarder (pasta or slirp4netns)
ln -s /proc/self/mounts "$R/etc/mtab"
cp "$OFFLOAD_SB_CONFIG" "$R/etc/docker/daemon.json"
if [ -n "$OFFLOAD_SB_NVIDIA_CONFIG" ]; then
  mkdir -p "$R/etc/nvidia-container-runtime"
  cp "$OFFLOAD_SB_NVIDIA_CONFIG" "$R/etc/nvidia-container-runtime/config.toml"
fi
hostname "$OFFLOAD_SB_HOSTNAME"

step "mounting /proc and /sys"
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs "$R/sys"

NV_GPUS="$R/proc/driver/nvidia/gpus"
if [ -d "$NV_GPUS" ]; then
  step "hiding other environments' GPUs in /proc/driver/nvidia/gpus"
  mount -t tmpfs -o mode=755,nosuid,nodev,noexec nvidia-gpus "$NV_GPUS"
  for bus in $OFFLOAD_SB_GPU_PCI; do
    if [ -d "/proc/driver/nvidia/gpus/$bus" ]; then
      mkdir "$NV_GPUS/$bus"
      mount --rbind "/proc/driver/nvidia/gpus/$bus" "$NV_GPUS/$bus"
    fi
  done
  mount -o remount,ro,nosuid,nodev,noexec "$NV_GPUS"
fi

step "mounting cgroups ($OFFLOAD_SB_CGROUPS)"
case "$OFFLOAD_SB_CGROUPS" in
  =cgroup2) mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup" ;;
  *)
    mount -t tmpfs -o mode=755,nosuid,nodev,noexec cgroup "$R/sys/fs/cgroup"
    for entry in $OFFLOAD_SB_CGROUPS; do
      name=${entry%%=*}; options=${entry#*=}
      mkdir "$R/sys/fs/cgroup/$name"
      mount -t cgroup -o "nosuid,nodev,noexec,$options" cgroup "$R/sys/fs/cgroup/$name"
    done
    ;;
esac

step "making /dev"
mount -t tmpfs -o mode=755,nosuid offload-dev "$R/dev"
for node in null zero full random urandom tty net/tun; do
  if [ -c "/dev/$node" ]; then
    mkdir -p "$(dirname "$R/dev/$node")"
    touch "$R/dev/$node"
    mount --bind "/dev/$node" "$R/dev/$node"
  fi
done
mkdir "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
mount -t mqueue mqueue "$R/dev/mqueue"
if [ -n "$OFFLOAD_SB_DEVICES" ]; then
  step "binding the environment's GPU device nodes"
  for node in "$OFFLOAD_SB_DEVICES"/*; do
    [ -c "$node" ] || { echo "offload sandbox: $node is not a device node" >&2; exit 96; }
    touch "$R/dev/${node##*/}"
    mount --bind "$node" "$R/dev/${node##*/}"
  done
fi
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"

if [ -n "$OFFLOAD_SB_GPU_HOOKS" ]; then
  step "binding the GPU hook directory"
  mkdir -p "$R/opt/offload-gpu-hooks"
  mount --bind "$OFFLOAD_SB_GPU_HOOKS" "$R/opt/offload-gpu-hooks"
  mount -o remount,bind,ro "$R/opt/offload-gpu-hooks"
fi

step "mounting the environment's own directories"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$R/tmp"
mkdir -p "$R$OFFLOAD_SB_AREA"
mount --bind "$OFFLOAD_SB_DATA" "$R/var/lib/docker"
mount --bind "$OFFLOAD_SB_AREA_SOURCE" "$R$OFFLOAD_SB_AREA"
mount --bind "$OFFLOAD_SB_SOCKETS" "$R/run/offload"
mount --bind "$OFFLOAD_SB_PLUGINS" "$R/run/docker/plugins"

step "pivoting into the private root"
mkdir "$R/.old-root"
cd "$R"
pivot_root . .old-root
cd /
umount -l /.old-root
rmdir /.old-root

step "starting dockerd"
trap - EXIT
P=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
if [ -n "$OFFLOAD_SB_GPU_HOOKS" ]; then P="/opt/offload-gpu-hooks:$P"; fi
if [ -n "$OFFLOAD_SB_GPUS" ]; then
  exec env -i PATH="$P" HOME=/root OFFLOAD_GPUS="$OFFLOAD_SB_GPUS" "$@"
fi
exec env -i PATH="$P" HOME=/root "$@"
