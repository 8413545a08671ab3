#!/usr/bin/env bash
# On a machine with a real NVIDIA GPU and no network (the `device` tool's): checks that the
# runner's GPU discovery sees what nvidia-smi sees, that the registration it would send is valid
# for the control plane, and how far the container path (`docker run --gpus`) can go there.
# See scripts/device/README.md. Needs build/device-wheels (scripts/device/build_wheels.sh).
#
# Steps: machine, python, nvml, registration, containers. Exit status: 0 passed; 3 no NVIDIA
# GPU; 4 no usable Python or wheelhouse; 5 discovery differs from nvidia-smi; 6 the registration
# is refused by the control plane's schema; 1 anything else (the failed step is named).
# Output also goes to $OUT/gpu_check.log when $OUT is set. Bounded: under 8 minutes in all.
#
# GPU_CHECK_STANDIN=<stand-in file> is a DRY RUN of this script on a machine without a GPU
# (tests, with a fake nvidia-smi on PATH): GPUs come from offload.runner.gpu_standin, and the
# result says so. It checks the script, never a GPU.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/build/device-wheels}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/offload-gpu-check.XXXXXX")
VENV=$WORK/venv
DEADLINE=$((SECONDS + 470)) # 7 min 50 s: every timed command below stops by then
STEP=start

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

step() {
  STEP=$1
  printf '\n== step %s: %s  (%ds)\n' "$1" "$2" "$SECONDS"
}
REPORTED=
fail() { # fail CODE MESSAGE
  printf '\ngpu_check.sh: FAILED at step %s: %s\n' "$STEP" "$2"
  REPORTED=1
  exit "$1"
}
finish() {
  local status=$?
  rm -rf "$WORK"
  if [ "$status" -ne 0 ] && [ -z "$REPORTED" ]; then
    printf '\ngpu_check.sh: FAILED at step %s (exit %d, see above)\n' "$STEP" "$status"
  fi
}
trap finish EXIT
# bounded CMD...: run with what is left of the 8 minutes (at most $LIMIT seconds).
bounded() {
  local left=$((DEADLINE - SECONDS))
  [ "$left" -gt 5 ] || fail 1 "out of time (the check is bounded to 8 minutes)"
  timeout -k 5 "$((LIMIT < left ? LIMIT : left))" "$@"
}
have() { command -v "$1" >/dev/null 2>&1; }
where() { if have "$1"; then printf '%-34s %s\n' "$1" "$(command -v "$1")"; else printf '%-34s MISSING\n' "$1"; fi; }

DRY_RUN=
if [ -n "${GPU_CHECK_STANDIN:-}" ]; then
  DRY_RUN=1
  export OFFLOAD_RUNNER_GPU_STANDIN=$GPU_CHECK_STANDIN
  echo "DRY RUN: GPUs come from the stand-in $GPU_CHECK_STANDIN, not the NVIDIA driver;"
  echo "this checks the script only, never a GPU."
else
  unset OFFLOAD_RUNNER_GPU_STANDIN
fi
export OFFLOAD_RUNNER_GPUS=all
unset OFFLOAD_RUNNER_GPU_HOOK_DIR

# ---- 1 ----------------------------------------------------------------------------------------
step machine "what this machine has"
echo "kernel: $(uname -srm)"
# shellcheck disable=SC1091
[ -r /etc/os-release ] && echo "os: $(. /etc/os-release && echo "${PRETTY_NAME:-?}")"
echo "glibc: $(getconf GNU_LIBC_VERSION 2>/dev/null || echo unknown)"
for tool in python3 python3.12 python3.11 nvidia-smi nvidia-container-runtime-hook \
  nvidia-container-cli nvidia-ctk nvidia-container-runtime docker dockerd rootlesskit; do
  where "$tool"
done
if have dpkg-query; then
  echo "nvidia-container-toolkit package: $(dpkg-query -W -f '${Version}' nvidia-container-toolkit 2>/dev/null || echo 'not installed')"
fi
echo "device nodes: $(compgen -G '/dev/nvidia*' | tr '\n' ' ' || echo none)"
have nvidia-smi || fail 3 "no NVIDIA GPU here: nvidia-smi is not installed (no NVIDIA driver). Run this on a machine with an NVIDIA GPU (the device tool's)."
LIMIT=30
gpu_list=$(bounded nvidia-smi -L 2>&1) || fail 3 "no NVIDIA GPU here: \`nvidia-smi -L\` fails: $gpu_list"
echo "$gpu_list"
grep -q '^GPU ' <<<"$gpu_list" || fail 3 "no NVIDIA GPU here: \`nvidia-smi -L\` lists none."
bounded nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version \
  --format=csv,noheader,nounits >"$WORK/smi.csv" || fail 3 "nvidia-smi --query-gpu fails"
echo "driver: $(head -n1 "$WORK/smi.csv" | awk -F', ' '{print $5}')"

# ---- 2 ----------------------------------------------------------------------------------------
step python "a Python environment from $WHEELS, offline"
compgen -G "$WHEELS/*.whl" >/dev/null ||
  fail 4 "no wheelhouse at $WHEELS: run \`bash scripts/device/build_wheels.sh\` on a networked machine and carry [\"build/device-wheels\"]."
echo "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1)"
PY=
for candidate in python3.12 python3.11 python3; do
  have "$candidate" || continue
  tag=$("$candidate" -c 'import sys; v = sys.version_info; v >= (3, 11) and print(f"{v[0]}{v[1]}")' 2>/dev/null) || continue
  [ -n "$tag" ] || continue
  if compgen -G "$WHEELS/pydantic_core-*-cp$tag-*.whl" >/dev/null; then
    PY=$(command -v "$candidate")
    break
  fi
  echo "$candidate (cp$tag): no wheels for it in the wheelhouse"
done
[ -n "$PY" ] ||
  fail 4 "no Python 3.11+ here that the wheelhouse has wheels for: OFFLOAD_DEVICE_PYTHONS=<its X.Y> bash scripts/device/build_wheels.sh"
echo "python: $PY ($("$PY" --version 2>&1))"
LIMIT=60
if ! bounded "$PY" -m venv "$VENV" >"$WORK/venv.log" 2>&1; then
  # No ensurepip (Debian's python3 without python3-venv): pip from its own wheel.
  rm -rf "$VENV"
  bounded "$PY" -m venv --without-pip "$VENV" || fail 4 "cannot make a virtualenv: $(cat "$WORK/venv.log")"
  pip_wheel=$(compgen -G "$WHEELS/pip-*.whl" | head -n1) || fail 4 "no pip wheel in $WHEELS"
  PIP_CONFIG_FILE=/dev/null bounded "$VENV/bin/python" "$pip_wheel/pip" install --quiet \
    --no-index --find-links "$WHEELS" pip || fail 4 "cannot install pip from $pip_wheel"
fi
LIMIT=240
# The project itself, from a copy of this working tree's sources (pip builds in the tree it is
# given: a copy leaves no build/ behind; setuptools comes from the wheelhouse too).
mkdir -p "$WORK/project"
cp -r "$ROOT/pyproject.toml" "$ROOT/src" "$WORK/project/"
PIP_CONFIG_FILE=/dev/null bounded "$VENV/bin/python" -m pip install --quiet \
  --disable-pip-version-check --no-index --find-links "$WHEELS" "$WORK/project" ||
  fail 4 "pip cannot install the project from $WHEELS (a wheel missing? run build_wheels.sh again)"
OFFLOAD=$VENV/bin/offload
"$VENV/bin/python" -c 'from importlib.metadata import version as v; print("offload", v("offload"), "| nvidia-ml-py", v("nvidia-ml-py"))'

# ---- 3 ----------------------------------------------------------------------------------------
step nvml "\`offload runner gpus\` against NVML, compared with nvidia-smi"
LIMIT=60
COLUMNS=200 bounded "$OFFLOAD" runner gpus >"$WORK/gpus.txt" 2>&1 ||
  fail 5 "\`offload runner gpus\` fails: $(cat "$WORK/gpus.txt")"
cat "$WORK/gpus.txt"
bounded "$OFFLOAD" runner gpus --json >"$WORK/gpus.json" || fail 5 "\`offload runner gpus --json\` fails"
cat "$WORK/gpus.json"
"$VENV/bin/python" - "$WORK/gpus.json" "$WORK/smi.csv" "$DRY_RUN" <<'PY' || fail 5 "the runner's GPUs differ from nvidia-smi's (above)"
import csv, json, sys
from offload.core.schemas import MAX_GPUS_PER_RUNNER

found = json.load(open(sys.argv[1]))
dry_run = bool(sys.argv[3])
rows = [[c.strip() for c in row] for row in csv.reader(open(sys.argv[2])) if row]
smi = {r[1]: {"index": int(r[0]), "name": r[2], "mib": int(float(r[3])), "driver": r[4]} for r in rows}
ours = {d["uuid"]: d for d in found["gpu_devices"]}
problems = []
if (found["standin"] is not None) != dry_run:
    problems.append(f"stand-in in use: {found['standin']}")
expected = sorted(smi, key=lambda u: smi[u]["index"])[:MAX_GPUS_PER_RUNNER]
for uuid in expected:
    want, got = smi[uuid], ours.get(uuid)
    if got is None:
        problems.append(f"{uuid} ({want['name']}): listed by nvidia-smi, not offered by the runner")
        continue
    for what, mine, theirs in (
        ("index", got["index"], want["index"]),
        ("name", got["model"], want["name"]),
        ("driver", got["driver_version"], want["driver"]),
    ):
        if mine != theirs:
            problems.append(f"{uuid}: {what} {mine!r} (runner) vs {theirs!r} (nvidia-smi)")
    mib = got["memory_bytes"] // 2**20
    if abs(mib - want["mib"]) > 1:
        problems.append(f"{uuid}: memory {mib} MiB (runner) vs {want['mib']} MiB (nvidia-smi)")
for uuid in set(ours) - set(smi):
    problems.append(f"{uuid}: offered by the runner, unknown to nvidia-smi")
for note in found["notes"]:
    print("discovery said:", note)
if problems:
    print("MISMATCH:\n  " + "\n  ".join(problems))
    sys.exit(1)
print(f"OK: {len(expected)} GPU(s), same UUID, index, name, memory and driver as nvidia-smi")
PY

# ---- 4 ----------------------------------------------------------------------------------------
step registration "the registration body, as the runner builds it, through the control plane's schema"
bounded "$VENV/bin/python" - "$WORK/gpus.json" <<'PY' || fail 6 "the registration is not what the control plane takes (above)"
import json, sys

import asyncssh

from offload.core.config import RunnerSettings
from offload.core.schemas import InstanceType, RunnerRegister
from offload.runner.daemon import Runner
from offload.runner.gpus import load_gpus
from offload.server.services.runners import _gpu_devices  # what registration stores

settings = RunnerSettings()
inventory = load_gpus(settings)  # as run_runner does at start
try:
    devices = inventory.devices()  # as Runner.gpu_devices: no GPU is warm at start
finally:
    inventory.close()
runner = Runner(settings, None, None, asyncssh.generate_private_key("ssh-ed25519"))
body = runner.registration(devices).model_dump_json()
request = RunnerRegister.model_validate_json(body)  # the API's body model
stored = _gpu_devices(request.gpu_devices)
listed = [d["uuid"] for d in json.load(open(sys.argv[1]))["gpu_devices"]]
assert [d.uuid for d in request.gpu_devices] == listed, "registration and `runner gpus` differ"
assert InstanceType.GPU in request.instance_types, "no gpu instance type"
assert request.gpus == len(stored) == len(listed)
shown = json.loads(body)
shown["host_key"] = shown["host_key"][:24] + "…"
print(json.dumps(shown, indent=2))
print(f"OK: valid RunnerRegister, {len(stored)} GPU device(s), instance types "
      f"{[t.value for t in request.instance_types]}")
PY

# ---- 5 ----------------------------------------------------------------------------------------
step containers "the container path (\`docker run --gpus\`)"
LIMIT=30
bounded "$VENV/bin/python" - <<'PY' || echo "(toolkit look-up failed: see above)"
from offload.runner.gpus import TOOLKIT_CONFIG, find_toolkit
toolkit = find_toolkit(None)
print("runner's view:", toolkit.describe())
if toolkit.available:
    print(f"config.toml a GPU sandbox gets (from {TOOLKIT_CONFIG}):")
    print(toolkit.config)
PY
missing=()
have dockerd || missing+=("dockerd (Debian's docker.io 20.10: the sandboxed engine)")
have rootlesskit || missing+=("rootlesskit (Debian's rootlesskit)")
hook=$(command -v nvidia-container-runtime-hook || true)
case "$hook" in
  /usr/*) ;;
  "") missing+=("nvidia-container-runtime-hook (apt-get install nvidia-container-toolkit)") ;;
  *) missing+=("nvidia-container-runtime-hook under /usr (found $hook; GPU sandboxes see only /usr, or set OFFLOAD_RUNNER_GPU_HOOK_DIR)") ;;
esac
have nvidia-container-cli || missing+=("nvidia-container-cli (libnvidia-container-tools: the hook runs it)")
CONTAINERS="sandbox prerequisites missing"
if [ "${#missing[@]}" -eq 0 ]; then
  CONTAINERS="sandbox prerequisites present (not run)"
  echo "dockerd, rootlesskit and the toolkit's hook are here. A full GPU session (a sandboxed"
  echo "engine holding this GPU) needs the control plane and a runner: \`offload up\` as root, then"
  echo "\`docker offload start --gpu\`; this script does not start them."
else
  echo "A GPU session's sandbox cannot run here; missing:"
  printf '  - %s\n' "${missing[@]}"
fi
if have docker && LIMIT=15 bounded docker info >/dev/null 2>&1; then
  image=$(LIMIT=15 bounded docker images --format '{{.Repository}}:{{.Tag}}' | grep -v '<none>' | head -n1 || true)
  if [ -z "$image" ]; then
    echo "the machine's own docker has no local image (and no network to pull one): no \`docker run --gpus\` tried"
  else
    echo "the machine's own docker: docker run --rm --gpus all $image nvidia-smi -L"
    if LIMIT=90 bounded docker run --rm --gpus all "$image" nvidia-smi -L; then
      CONTAINERS="$CONTAINERS; the machine's docker runs --gpus"
    else
      echo "WARNING: \`docker run --gpus all\` fails on the machine's own docker (its set-up, not Offload's)"
      CONTAINERS="$CONTAINERS; the machine's docker fails --gpus"
    fi
  fi
else
  echo "no docker engine answers here: no \`docker run --gpus\` tried"
fi

# ---- summary ----------------------------------------------------------------------------------
STEP=summary
count=$("$VENV/bin/python" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["gpu_devices"]))' "$WORK/gpus.json")
printf '\nRESULT: %sPASSED in %ds: %s GPU(s) discovered as nvidia-smi lists them; registration valid; containers: %s\n' \
  "${DRY_RUN:+DRY RUN (stand-in GPUs, no real GPU checked) }" "$SECONDS" "$count" "$CONTAINERS"
