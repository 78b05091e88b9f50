#!/usr/bin/env bash
# One call on the GPU machine: build, test, benchmark. Writes logs and JSON under $OUT (or ./out).
#   bash benchmarks/gpu_check.sh            # everything that fits an H100 80GB
#   SECTIONS="tests cov" bash benchmarks/gpu_check.sh
#   SECTIONS=70b bash benchmarks/gpu_check.sh   # on an H200 (nvidia-h200): the 70B-shaped edit
# The machine is offline: everything used here is in its image (torch, triton, transformers,
# accelerate, pytest, pytest-benchmark, ninja, compute-sanitizer).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_ext} ZU_FAST_CACHE=/tmp/zu_fast_cache
SECTIONS=${SECTIONS:-"build tests sanitizer cov update closed e2e gd"}
PY=python3
status=0
run() {  # run NAME CMD... : log to $OUT/NAME.log, keep going on failure, remember it
  local name=$1; shift
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "    ok ($((SECONDS - t0)) s)"; else
    echo "    FAILED ($((SECONDS - t0)) s); tail:"; tail -n 25 "$OUT/$name.log"; status=1; fi
}
has() { [[ " $SECTIONS " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -m pip install -q -e . --no-deps --no-build-isolation >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }

has build && run build $PY -c "import json; from zu_fast.ops import cuda_backend as cb; cb.load_extension(); \
print(json.dumps(cb.build_status(), indent=1))"
has build && run info zu-fast info
has tests && run tests $PY -m pytest tests -q -x -ra -p no:cacheprovider
has sanitizer && run memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --leak-check no \
  --error-exitcode 1 $PY -m pytest tests/test_cuda_ext.py -m gpu -q -x -k small
has sanitizer && run racecheck compute-sanitizer --tool racecheck --error-exitcode 1 $PY -m pytest tests/test_cuda_ext.py \
  -q -x -k "small_tiles and (fused and mask and bfloat16 or test_update_vs_float64 and row and bfloat16)"
has cov && run cov_table $PY benchmarks/cov_table.py --reps 5
has cov && run cov_bench $PY -m pytest benchmarks/bench_cov_accumulate.py --benchmark-only -q \
  --benchmark-json "$OUT/cov_bench.json"
has cov && run stats_overhead bash -c "cd benchmarks && $PY stats_overhead.py --shape llama-3.1-8b"
has update && run update_table $PY benchmarks/update_table.py
has closed && run closed_bench $PY -m pytest benchmarks/bench_closed_form.py --benchmark-only -q \
  --benchmark-json "$OUT/closed_bench.json"
has e2e && run e2e_1b $PY benchmarks/e2e_unlearn.py --shape llama-3.2-1b --n 100 --json "$OUT/e2e_1b.json"
has e2e && run e2e_8b $PY benchmarks/e2e_unlearn.py --shape llama-3.1-8b --n 100 --texts 1000 --json "$OUT/e2e_8b.json"
has gd && [ -f benchmarks/gd_speed.py ] && run gd_speed $PY benchmarks/gd_speed.py
has 70b && [ -f benchmarks/edit_70b.py ] && run edit_70b $PY benchmarks/edit_70b.py --json "$OUT/edit_70b.json"

echo
for f in cov_table stats_overhead update_table e2e_1b e2e_8b gd_speed edit_70b; do
  [ -f "$OUT/$f.log" ] && { echo "----- $f"; tail -n 30 "$OUT/$f.log"; }
done
exit $status
