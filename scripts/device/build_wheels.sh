#!/usr/bin/env bash
# On a machine WITH network: fill build/device-wheels with the wheels scripts/device/gpu_check.sh
# installs on a device machine that has none: the project's runtime dependencies (pyproject.toml)
# for CPython 3.11 and 3.12 on manylinux x86_64, plus pip and setuptools (to make a virtualenv
# and build the project there, offline). Pure pip: `pip download --only-binary=:all:`.
#
#   bash scripts/device/build_wheels.sh          # then carry ["build/device-wheels"]
#
# OFFLOAD_DEVICE_PYTHONS="3.12" narrows the Python versions; PYTHON picks the interpreter that
# runs pip here (default: the project's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=build/device-wheels
PYTHONS=${OFFLOAD_DEVICE_PYTHONS:-"3.11 3.12"}
# Wheels for glibc 2.28 and older (the device: Debian 10+, Ubuntu 20.04+, RHEL 8+ all have it).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64
  manylinux1_x86_64)
WARN_MIB=40
CARRY_MIB=64 # the device tool's limit on everything carried

step() { printf '\n== %s\n' "$*"; }
die() {
  printf 'build_wheels.sh: FAILED: %s\n' "$*" >&2
  exit 1
}

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null ||
  die "$PYTHON is not Python 3.11+ (tomllib reads pyproject.toml); set PYTHON=python3.11 or newer."
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip; set PYTHON to one that has."

step "runtime dependencies (pyproject.toml)"
mapfile -t deps < <("$PYTHON" -c '
import tomllib
for dep in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    print(dep)')
[ "${#deps[@]}" -gt 0 ] || die "no dependencies read from pyproject.toml"
printf '  %s\n' "${deps[@]}"
grep -qx 'nvidia-ml-py.*' < <(printf '%s\n' "${deps[@]}") || deps+=("nvidia-ml-py>=12")

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
for version in $PYTHONS; do
  step "wheels for CPython $version, manylinux (glibc <= 2.28) x86_64"
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$WHEELS" \
    --only-binary=:all: --implementation cp --python-version "$version" "${PLATFORMS[@]/#/--platform=}" \
    "${deps[@]}" "setuptools>=77" pip ||
    die "pip could not download the wheels for CPython $version (network? a dependency with no manylinux wheel?)"
done

step "wheelhouse"
count=$(find "$WHEELS" -name '*.whl' | wc -l)
kib=$(du -sk "$WHEELS" | cut -f1)
mib=$(((kib + 1023) / 1024))
echo "$WHEELS: $count wheels, $mib MiB"
[ "$mib" -lt "$CARRY_MIB" ] || die "$mib MiB is over the device tool's $CARRY_MIB MiB carry limit; narrow OFFLOAD_DEVICE_PYTHONS."
[ "$mib" -le "$WARN_MIB" ] || echo "warning: over $WARN_MIB MiB; OFFLOAD_DEVICE_PYTHONS=3.12 (say) halves the compiled part"
echo "Done. Run on the device: carry [\"$WHEELS\"], command \`bash scripts/device/gpu_check.sh\`."
