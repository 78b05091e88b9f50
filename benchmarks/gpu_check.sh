#!/usr/bin/env bash
# The GPU check: five sections, each meant as its own command of under 5 minutes; all five in at
# most 8 minutes on one H100/H200 from a cold start (the CPU suite is not here: CI runs it).
#
#   bash benchmarks/gpu_check.sh 1    # environment + install; CUDA extension build and Triton
#                                     #   precompile started in the background           (~0.5 min)
#   bash benchmarks/gpu_check.sh 2    # correctness tests of every backend on the GPU, no -x,
#                                     #   errors printed; records which backends passed     (~2.5 min)
#   bash benchmarks/gpu_check.sh 3    # cov_accumulate tokens/s at 8B and 70B shapes, every backend
#                                     #   beside the bound and torch.mm(out_dtype=fp32)     (~1.5 min)
#   bash benchmarks/gpu_check.sh 4    # multiplicative_update_ table with real-edit D      (~1 min)
#   bash benchmarks/gpu_check.sh 5    # statistics / forward ratio and end-to-end unlearning,
#                                     #   8B shape, random init, 100 requests              (~2 min)
#   bash benchmarks/gpu_check.sh      # all five in order, as one command
#   bash benchmarks/gpu_check.sh 3 4  # any subset, in the order given
# (The times are estimates from the operation counts; each section prints what it took.)
#
# Sections 2-5 run on a fresh machine too (they install first if section 1 has not run there).
# The build, test records and tables live in $STATE (default /tmp/zu_fast_gpu_check), which lasts
# as long as the machine; every section writes under $OUT (or ./out): s<N>.log, results.json (all
# tables and records so far) and preferences.json (the backend-preference rule applied to them:
# a backend is preferred only where its correctness tests passed on this device and it beat torch
# on every shape). To make the registry use it, check it in:
#   python -m zu_fast.ops.preferences merge preferences.json   # → zu_fast/ops/measured_preferences.json
# The machine is offline: everything used is in its image (torch, triton, transformers, pytest, ninja).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/out}
STATE=${ZU_FAST_GPU_STATE:-/tmp/zu_fast_gpu_check}
mkdir -p "$OUT" "$STATE"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$STATE/torch_ext}
export ZU_FAST_CACHE=$STATE/zu_fast_cache MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
SECTION_LIMIT=${SECTION_LIMIT:-285}  # seconds: each section stays under 5 minutes
# Arguments of the benchmark scripts (override only for smoke runs of this script on small shapes).
COV_ARGS=${COV_ARGS:---reps 5}
UPDATE_ARGS=${UPDATE_ARGS:---reps 3}
E2E_ARGS=${E2E_ARGS:---shape llama-3.1-8b --n 100 --texts 1000 --overhead-texts 2000}

installed() { [ -f "$STATE/installed" ] && $PY -c "import zu_fast.kernels" 2>/dev/null; }

install() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  $PY -c "import torch, triton, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  $PY -m pip install -q -e . --no-deps --no-build-isolation --no-compile || return 1
  touch "$STATE/installed"
}

start_background() {  # the CUDA extension build and the Triton precompile, in their own sessions
  if [ ! -f "$STATE/build.rc" ] && [ ! -f "$STATE/build.started" ]; then
    touch "$STATE/build.started"
    setsid bash -c "cd '$ROOT' && $PY -c 'import json; from zu_fast.ops import cuda_backend as cb; cb.load_extension(); \
print(json.dumps(cb.build_status()))' >'$STATE/build.log' 2>&1; echo \$? >'$STATE/build.rc'" </dev/null >/dev/null 2>&1 &
  fi
  if [ ! -f "$STATE/precompile.rc" ] && [ ! -f "$STATE/precompile.started" ]; then
    touch "$STATE/precompile.started"
    setsid bash -c "cd '$ROOT' && $PY -c 'import time; t = time.time(); from zu_fast.kernels.cov_accumulate import precompile; \
r = precompile(); print(len(r), \"kernels compiled in\", round(time.time() - t, 1), \"s; shared bytes:\", r)' \
>'$STATE/precompile.log' 2>&1; echo \$? >'$STATE/precompile.rc'" </dev/null >/dev/null 2>&1 &
  fi
}

wait_build() {  # up to $1 seconds for the background CUDA build; report how it ended
  local t0=$SECONDS
  while [ ! -f "$STATE/build.rc" ] && [ $((SECONDS - t0)) -lt "$1" ]; do sleep 2; done
  if [ ! -f "$STATE/build.rc" ]; then echo "CUDA extension build still running after $1 s (log: $STATE/build.log)"
  elif [ "$(cat "$STATE/build.rc")" != 0 ]; then echo "CUDA extension build FAILED:"; tail -n 40 "$STATE/build.log"
  else echo "CUDA extension built ($((SECONDS - t0)) s waited): $(tail -n 1 "$STATE/build.log" | cut -c1-300)"; fi
}

publish() {  # results.json (everything in $STATE so far) and preferences.json, under $OUT
  $PY - "$STATE" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
state, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {p.stem: json.loads(p.read_text()) for p in sorted(state.glob("*.json"))}
out.write_text(json.dumps(res, indent=1))
EOF
  if [ -f "$STATE/prefs_state.json" ]; then
    $PY -m zu_fast.ops.preferences write --state "$STATE/prefs_state.json" --out "$STATE/preferences.json" \
      && cp "$STATE/preferences.json" "$OUT/preferences.json"
  fi
}

section1() {
  install || { echo "install failed"; return 1; }
  start_background
  $PY -m zu_fast.cli info || true
  echo "background: CUDA extension build (log $STATE/build.log), Triton precompile (log $STATE/precompile.log)"
}

section2() {
  installed || install || return 1
  start_background
  local dev cap rc=0
  dev=$($PY -c "import torch; print(torch.cuda.get_device_name())")
  cap=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  # Triton and torch-default tests first (no extension needed), then the extension's own tests.
  timeout 170 $PY -m pytest -q -rfE --tb=short -p no:cacheprovider --junitxml="$STATE/tests_triton_torch.xml" \
    tests/test_cov_accumulate.py tests/test_multiplicative_update.py -k "not compiled_ and not column_offsets_past" \
    || rc=1
  wait_build 60
  timeout 110 $PY -m pytest -q -rfE --tb=short -p no:cacheprovider --junitxml="$STATE/tests_cuda.xml" \
    tests/test_cuda_ext.py tests/test_tc_numerics.py -m gpu || rc=1
  # which (op, backend) passed here: the first half of the preference rule
  $PY -m zu_fast.ops.preferences record-tests --state "$STATE/prefs_state.json" --device "$dev" --capability "$cap" \
    --date "$(date -u +%F)" --junit "$STATE"/tests_*.xml
  [ -f "$STATE/precompile.rc" ] && echo "triton precompile: $(tail -n 1 "$STATE/precompile.log" | cut -c1-200)"
  return $rc
}

section3() {
  installed || install || return 1
  start_background
  wait_build 150
  $PY benchmarks/cov_table.py $COV_ARGS --json "$STATE/cov_table.json" || return 1
  $PY -m zu_fast.ops.preferences record-speed --state "$STATE/prefs_state.json" --op cov_accumulate \
    --table "$STATE/cov_table.json"
}

section4() {
  installed || install || return 1
  start_background
  wait_build 150
  $PY benchmarks/update_table.py $UPDATE_ARGS --json "$STATE/update_table.json" || return 1
  $PY -m zu_fast.ops.preferences record-speed --state "$STATE/prefs_state.json" --op multiplicative_update_ \
    --table "$STATE/update_table.json"
}

section5() {
  installed || install || return 1
  (cd benchmarks && $PY e2e_unlearn.py $E2E_ARGS --stats-overhead --json "$STATE/e2e_8b.json")
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(1 2 3 4 5)
for s in "${sections[@]}"; do
  case $s in 1|2|3|4|5) ;; *) echo "unknown section $s (sections are 1-5)"; exit 2 ;; esac
done
status=0
for s in "${sections[@]}"; do
  echo "=== section $s ($(date -u +%T))"
  t0=$SECONDS
  # each section in a subshell under its limit, its output both on the terminal and in $OUT/s<N>.log
  timeout "$SECTION_LIMIT" bash -c "$(declare -f installed install start_background wait_build publish section$s); \
    PY='$PY' STATE='$STATE' ROOT='$ROOT' OUT='$OUT' COV_ARGS='$COV_ARGS' UPDATE_ARGS='$UPDATE_ARGS' \
    E2E_ARGS='$E2E_ARGS'; section$s" 2>&1 | tee "$OUT/s$s.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "section $s stopped at its ${SECTION_LIMIT} s limit" | tee -a "$OUT/s$s.log"
  [ "$rc" != 0 ] && status=1
  publish >>"$OUT/s$s.log" 2>&1
  echo "=== section $s: $((SECONDS - t0)) s, exit $rc" | tee -a "$OUT/s$s.log"
done
[ -f "$OUT/preferences.json" ] && $PY -m zu_fast.ops.preferences write --state "$STATE/prefs_state.json" \
  --out "$OUT/preferences.json" | tail -n 20
exit $status
