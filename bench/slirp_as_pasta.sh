#!/bin/bash
# bench/pasta_probe.py's stand-in for slirp4netns (an experiment, not the runner's): rootlesskit
# 1.1 has no pasta driver, but runs `--slirp4netns-binary` as `slirp4netns [OPTS] PID TAP` and
# waits for "1" on the ready fd (-r). This starts pasta on the same namespace with the addresses
# rootlesskit then configures (10.0.2.100/24, gateway 10.0.2.2, DNS 10.0.2.3), no host loopback
# and no port forwards, and lives as long as pasta. --help goes to the real slirp4netns (rootlesskit
# reads its features there).
case "${1:-}" in --help|-h|--version|-v) exec slirp4netns "$@";; esac
ready= mtu=65520
while [ $# -gt 2 ]; do
  case "$1" in
    -r|--ready-fd) ready=$2; shift 2;;
    --ready-fd=*) ready=${1#*=}; shift;;
    --mtu|-m) mtu=$2; shift 2;;
    --mtu=*) mtu=${1#*=}; shift;;
    -e|--exit-fd|-a|--api-socket|--cidr|--netns-type|--userns-path) shift 2;;
    *) shift;;
  esac
done
pid=$1 tap=$2
pidfile=$(mktemp /tmp/pasta-pid.XXXXXX)
pasta -q --netns "/proc/$pid/ns/net" --userns "/proc/$pid/ns/user" -I "$tap" \
  -a 10.0.2.100 -n 24 -g 10.0.2.2 --dns-forward 10.0.2.3 --no-map-gw -m "$mtu" \
  -t none -u none -T none -U none -P "$pidfile" || exit 1
child=$(cat "$pidfile"); rm -f "$pidfile"
[ -n "$ready" ] && echo 1 >&"$ready"
trap 'kill "$child" 2>/dev/null; exit 0' TERM INT
while kill -0 "$child" 2>/dev/null; do sleep 1 & wait $!; done
