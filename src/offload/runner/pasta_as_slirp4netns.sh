#!/bin/bash
# pasta (Debian `passt`) as a sandbox's network helper, in slirp4netns's place.
#
# rootlesskit 1.1 (Debian 12's) has no pasta driver, but runs `--slirp4netns-binary` as
# `slirp4netns [OPTIONS] PID TAPNAME` in the runner's network namespace, as the sandbox's
# identity, and waits for "1" on the ready fd. This starts pasta on PID's namespaces with the
# addresses rootlesskit then gives TAPNAME (10.0.2.100/24, gateway 10.0.2.2, DNS forwarder
# 10.0.2.3), IPv4 only (as slirp4netns ran), and nothing mapped to the runner: no gateway to
# host loopback (--no-map-gw), no port forwards either way (-t/-u/-T/-U none). pasta moves
# TCP with the kernel's sockets (splice-free, no user-space TCP stack): about twice slirp's
# download speed (bench/pasta_probe.py).
#
# Lifetime: pasta runs in the foreground as this script's child with a parent-death signal,
# so it dies with the script, which dies with rootlesskit (Debian 12's pasta does not quit when
# a namespace given as /proc/PID/... goes away). It writes its pid file once TAPNAME exists:
# that is when the ready fd is written.
set -u

HELP='Usage: pasta_as_slirp4netns.sh [OPTION]... PID TAPNAME
pasta in slirp4netns'"'"'s place for rootlesskit (see the comment at the top of this file).
  -r, --ready-fd=FD        write "1" to FD once TAPNAME is up
  -e, --exit-fd=FD         accepted, ignored (rootlesskit kills this process to stop it)
  -m, --mtu=MTU            MTU of TAPNAME (default 65520)
  --disable-host-loopback  always on: pasta runs with --no-map-gw
  --netns-type=TYPE        accepted, ignored: PID names a process'

case "${1:-}" in
  --help | -h) echo "$HELP"; exit 0 ;;
  --version | -v) echo "pasta_as_slirp4netns (pasta from Debian passt)"; exit 0 ;;
esac

ready='' mtu=65520
while [ $# -gt 2 ]; do
  case "$1" in
    -r | --ready-fd) ready=$2; shift 2 ;;
    --ready-fd=*) ready=${1#*=}; shift ;;
    -m | --mtu) mtu=$2; shift 2 ;;
    --mtu=*) mtu=${1#*=}; shift ;;
    -e | --exit-fd | --netns-type) shift 2 ;;
    *) shift ;;
  esac
done
if [ $# -ne 2 ]; then
  echo "pasta_as_slirp4netns.sh: expected PID TAPNAME after the options" >&2
  exit 2
fi
pid=$1 tap=$2

pidfile="${XDG_RUNTIME_DIR:-/tmp}/pasta.$$.pid"
rm -f "$pidfile"
setpriv --pdeathsig KILL -- pasta --foreground --quiet --ipv4-only \
  --netns "/proc/$pid/ns/net" --userns "/proc/$pid/ns/user" --ns-ifname "$tap" \
  --address 10.0.2.100 --netmask 24 --gateway 10.0.2.2 --dns-forward 10.0.2.3 --no-map-gw \
  --mtu "$mtu" --tcp-ports none --udp-ports none --tcp-ns none --udp-ns none \
  --pid "$pidfile" &
pasta=$!
until [ -s "$pidfile" ]; do
  if ! kill -0 "$pasta" 2>/dev/null; then
    wait "$pasta"
    echo "pasta_as_slirp4netns.sh: pasta exited ($?) before $tap was up" >&2
    exit 1
  fi
  sleep 0.01
done
rm -f "$pidfile"
if [ -n "$ready" ]; then echo 1 >&"$ready"; fi
wait "$pasta"
