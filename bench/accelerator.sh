#!/usr/bin/env bash
# One accelerator check, end to end in under 8 minutes: find the GPU or TPU,
# make sure JAX can use it (install the jax extra at the version pyproject.toml
# pins, unless a JAX with that backend is already importable), then run
# bench/accelerator.py: the parity tests that matter, the LoRA train step of
# SmolLM2 and of a 1B-class synthetic LLaMA (tokens/s, MFU, peak memory) and
# generation, into DIR/accelerator.json and DIR/accelerator.md.
#
#   bench/accelerator.sh [--out DIR] [--wheels DIR] [--no-install] [--allow-cpu]
#                        [--budget SECONDS] [-- ARGS for bench/accelerator.py]
#
#   --out DIR      where the JSON and the table go (default bench/out/accelerator)
#   --wheels DIR   install from wheels in DIR only (pip --no-index): for machines
#                  without internet
#   --no-install   never install; fail if JAX cannot see the accelerator
#   --allow-cpu    with no GPU or TPU, run every phase on CPU at a toy size
#                  instead of failing (checks the script, not the speed)
#   --budget S     seconds for the whole script, install included (default 470)
#
# Python: $PYTHON, else python3 (the one that has, or gets, JAX). Exit status:
# 0 every phase ran and the parity tests passed; 1 a phase failed or ran out of
# time (the JSON says which); 2 bad arguments; 3 no GPU or TPU found; 4 JAX
# could not be made to see the accelerator.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
OUT=bench/out/accelerator
WHEELS=""
INSTALL=1
ALLOW_CPU=0
BUDGET=470
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --wheels) WHEELS=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --budget) BUDGET=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
cd "$ROOT" || exit 2
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # the probes below must not hold the memory
unset XLA_FLAGS

# --------------------------------------------------------------------- detect
KIND=none
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
  KIND=gpu
  echo "found: $(nvidia-smi -L | head -1) ($(nvidia-smi -L | grep -c '^GPU') GPU(s))"
elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null \
    || [ -n "${TPU_ACCELERATOR_TYPE:-}${TPU_NAME:-}${TPU_WORKER_ID:-}" ]; then
  KIND=tpu
  echo "found: a TPU (${TPU_ACCELERATOR_TYPE:-/dev/accel* or /dev/vfio})"
fi
if [ "$KIND" = none ]; then
  WHY="nvidia-smi $(command -v nvidia-smi >/dev/null 2>&1 && echo 'lists no GPU' || echo 'is not installed'), no /dev/accel* or /dev/vfio device and no TPU_* variable"
  if [ "$ALLOW_CPU" = 0 ]; then
    echo "error: no GPU or TPU found: $WHY. Run this on a GPU or TPU machine, or pass" \
         "--allow-cpu to run the phases on CPU at a toy size" >&2
    exit 3
  fi
  echo "no GPU or TPU found ($WHY): --allow-cpu, running the tiny CPU path"
fi

# --------------------------------------------------------------------- install
# The version: the upper bound of pyproject.toml's jax requirement (the one tested).
PIN=$(sed -nE 's/^ *"jax>=[^"]*<=([0-9][0-9.]*)".*/\1/p' pyproject.toml | head -1)
if [ -z "$PIN" ]; then echo "error: no jax<=X pin found in pyproject.toml" >&2; exit 4; fi
has_backend() {  # whether $PY's JAX sees a device of platform $1
  "$PY" - "$1" <<'EOF' 2>/dev/null
import sys
import jax
sys.exit(0 if jax.devices(sys.argv[1]) else 1)
EOF
}
jax_version() { "$PY" -c 'import jax, jaxlib; print(f"jax {jax.__version__}, jaxlib {jaxlib.__version__}")' 2>/dev/null || echo "no jax"; }
if [ "$KIND" = none ]; then
  INSTALLED="none (CPU path, --allow-cpu; $(jax_version))"
else
  EXTRA_NAME=$([ "$KIND" = gpu ] && echo cuda12 || echo tpu)
  SPEC="jax[$EXTRA_NAME]==$PIN"
  if has_backend "$KIND"; then
    INSTALLED="skipped: $(jax_version) already sees the $KIND ($SPEC not installed)"
    case "$(jax_version)" in "jax $PIN,"*) ;; *)
      INSTALLED="$INSTALLED; note: outside the tested version $PIN" ;; esac
  elif [ "$INSTALL" = 0 ]; then
    echo "error: JAX cannot see the $KIND ($(jax_version)) and --no-install was given;" \
         "install $SPEC" >&2
    exit 4
  else
    PIP=("$PY" -m pip install -q "$SPEC")
    [ -n "$WHEELS" ] && PIP=("$PY" -m pip install -q --no-index --find-links "$WHEELS" "$SPEC")
    echo "installing: ${PIP[*]}"
    if ! "${PIP[@]}"; then
      echo "error: could not install $SPEC (no network? this machine may have none: put" \
           "the wheels in a directory and pass --wheels DIR)" >&2
      exit 4
    fi
    has_backend "$KIND" || { echo "error: $SPEC installed but JAX still sees no $KIND" \
                                  "($(jax_version))" >&2; exit 4; }
    INSTALLED="installed $SPEC${WHEELS:+ from $WHEELS} ($(jax_version))"
  fi
fi
echo "install: $INSTALLED"

# --------------------------------------------------------------------- measure
LEFT=$(( BUDGET - ($(date +%s) - START) - 15 ))  # 15 s for the parent's own start and end
ARGS=(--out "$OUT" --budget "$LEFT" --install "$INSTALLED")
[ "$KIND" = none ] && ARGS+=(--allow-cpu --tiny)
timeout --signal=TERM --kill-after=5 $(( LEFT + 10 )) "$PY" -m bench.accelerator "${ARGS[@]}" \
  ${EXTRA[@]+"${EXTRA[@]}"}
RC=$?
echo "bench/accelerator.sh: $(( $(date +%s) - START )) s, exit status $RC"
exit $RC
