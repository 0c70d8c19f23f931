#!/usr/bin/env bash
# One command for the day a GPU is lent (no internet there): install, then run
# benchmarks/accelerator_check.py (tests on the device, DPO step MFU, sampling roofline, cuDNN vs
# XLA attention) and write a Markdown table. About 6 minutes on one H100/H200.
#
#   bash benchmarks/accelerator_check.sh              # on the GPU machine
#   bash benchmarks/accelerator_check.sh --dry-run    # tiny shapes on a CPU, under 2 minutes
#
# Output: $ACCELERATOR_RESULTS, else $OUT/accelerator_results.md, else
# benchmarks/accelerator_results.md.
#
# The GPU machine has jax[cuda], flax, optax, orbax, chex, transformers, peft and torch, but not
# datasets, qwix or pytest (pytest-xdist is optional: 4 test workers). Carry their wheels in
# benchmarks/wheels/ (not committed), made beforehand on a machine with internet and the GPU
# machine's Python version, e.g.:
#
#   pip download datasets qwix pytest pytest-xdist -d benchmarks/wheels \
#     --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64
#
# Only what is missing is installed, from that folder alone (--no-index).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
WHEELS="${WHEELS:-benchmarks/wheels}"

# The dry run leaves the Python environment alone (it may be a shared development venv): it only
# checks that the imports resolve (run it with PYTHONPATH at the checkout).
if [[ " $* " != *" --dry-run "* ]]; then
  if ! "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e .; then
    echo "accelerator_check: 'pip install --no-deps -e .' failed; using PYTHONPATH=$PWD" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

missing=()
for module in datasets qwix pytest safetensors jinja2 matplotlib; do
  "$PYTHON" -c "import $module" 2>/dev/null || missing+=("$module")
done
if ((${#missing[@]})); then
  if [[ " $* " == *" --dry-run "* ]]; then
    echo "accelerator_check: missing Python packages: ${missing[*]} (dry run: not installing)" >&2
    exit 2
  fi
  if [[ ! -d "$WHEELS" ]]; then
    echo "accelerator_check: missing Python packages: ${missing[*]}; no wheel folder $WHEELS." >&2
    echo "  Make it beforehand with internet: pip download ${missing[*]} -d $WHEELS" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" \
    || { echo "accelerator_check: installing ${missing[*]} from $WHEELS failed" >&2; exit 2; }
fi

if [[ -d "$WHEELS" ]] && ! "$PYTHON" -c "import xdist" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" pytest-xdist 2>/dev/null || true
fi

exec "$PYTHON" benchmarks/accelerator_check.py "$@"
