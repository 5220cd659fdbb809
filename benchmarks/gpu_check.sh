#!/usr/bin/env bash
# The GPU check: the engine's exactness on CUDA, then `sol bench` with CUDA events in bf16 at kv_len 1k/8k on
# shape-only models (random weights in the shapes of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B; sol/shapes.py),
# so nothing is downloaded. Run from a checkout on a machine with one CUDA GPU, torch, transformers, pandas and
# seaborn, and no network (≈ 5–8 min):
#
#     bash benchmarks/gpu_check.sh              # writes results/gpu/ (or $OUT): tests.txt, machine.txt, bench_*.csv
#
# The pure-Python packages such a machine lacks (fvcore and its iopath/yacs/tabulate/termcolor/portalocker, pytest)
# travel as wheels in benchmarks/gpu_wheels/ (≈ 2 MB, not in git), built beforehand where a package index is
# reachable:
#
#     bash benchmarks/gpu_check.sh --wheels
#
# Knobs: DEVICE (cuda; cpu runs the same check here), SHAPES, KV, DTYPE (bfloat16), STEPS (20), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=benchmarks/gpu_wheels
PY=${PYTHON:-python}

if [[ "${1:-}" == "--wheels" ]]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # pure-Python wheels only (any Python ≥ 3.10, any platform); fvcore and iopath publish sdists, built here
  "$PY" -m pip wheel -q --no-deps -w "$WHEELS" fvcore==0.1.5.post20221221 iopath==0.1.10
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform any --python-version 3.10 --implementation py \
    -d "$WHEELS" yacs==0.1.8 tabulate==0.10.0 termcolor==3.3.0 portalocker==4.4.2 pytest==9.2.0 pluggy==1.7.0 \
    iniconfig==2.3.1 pygments==2.19.2 exceptiongroup==1.3.0 tomli==2.3.0 typing_extensions==4.15.0
  ls -la "$WHEELS"
  exit 0
fi

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results/gpu}
SHAPES=${SHAPES:-"smollm2-135m llama-3.2-1b llama-3.1-8b"}
KV=${KV:-"1024 8192"}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-20}

missing=$("$PY" -c 'import importlib.util as u; print(" ".join(m for m in ("fvcore", "iopath", "yacs", "tabulate",
"termcolor", "portalocker", "pytest", "pygments") if u.find_spec(m) is None))')
DEPS=$(mktemp -d)
trap 'rm -rf "$DEPS"' EXIT
if [[ -n "$missing" ]]; then
  if ! ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    echo "error: this machine lacks $missing and $WHEELS/ holds no wheels (build them: bash $0 --wheels)" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --target "$DEPS" "$WHEELS"/*.whl
fi
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

tmp="$OUT.partial"  # written whole, then moved into place: no half-written results folder
rm -rf "$tmp" && mkdir -p "$tmp"
"$PY" - > "$tmp/machine.txt" <<EOF
import platform, torch, transformers
dev = "$DEVICE"
name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or platform.machine()
print(f"device {dev} ({name}), torch {torch.__version__}, transformers {transformers.__version__}, "
      f"python {platform.python_version()}, dtype $DTYPE, shapes $SHAPES, kv $KV, steps $STEPS")
EOF
cat "$tmp/machine.txt"

SOL_TEST_DEVICE=$DEVICE "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$tmp/tests.txt"

for s in $SHAPES; do
  counters=--no-counters  # tracing a 1B/8B step at 8k keys takes longer than timing it; SmolLM2's shape is counted
  [[ $s == smollm2-135m ]] && counters=""
  # shellcheck disable=SC2086
  "$PY" -m sol.cli bench --model "shape:$s" --device "$DEVICE" --dtype "$DTYPE" --kv-len $KV --steps "$STEPS" \
    --warmup 3 $counters --out "$tmp/bench_$s.csv"
done
rm -rf "$OUT" && mv "$tmp" "$OUT"
echo "wrote $OUT"
