#!/usr/bin/env bash
# The GPU check: five sections, each its own command; every section runs under its own time limit
# (under 4.5 minutes), and the limits add up to 8 minutes on one H100/H200 from a cold start (the
# CPU suite is not here: CI runs it). Most important numbers first.
#
#   bash benchmarks/gpu_check.sh 1    # environment + install; CUDA extension build and Triton
#                                     #   precompiles started in the background
#   bash benchmarks/gpu_check.sh 2    # correctness tests of every backend on the GPU (Triton cov,
#                                     #   Triton update, torch default, CUDA extension), no -x,
#                                     #   errors printed; records which backends passed
#   bash benchmarks/gpu_check.sh 3    # cov_accumulate tokens/s at 8B and 70B shapes, every backend
#                                     #   beside the bound and torch.mm(out_dtype=fp32)
#   bash benchmarks/gpu_check.sh 4    # multiplicative_update_ table with real-edit D: torch, Triton, CUDA
#   bash benchmarks/gpu_check.sh 5    # statistics / forward ratio and end-to-end unlearning,
#                                     #   8B shape, random init, 16 requests
#   bash benchmarks/gpu_check.sh      # all five in order, as one command
#   bash benchmarks/gpu_check.sh 3 4  # any subset, in the order given
#   bash benchmarks/gpu_check.sh --budgets   # the table below, computed; runs nothing
#
# Time budgets (seconds). LIMIT_n bounds section n from outside (`timeout`); inside, every step that
# can take long runs through `budget`, which gives it the smaller of its own budget (B*_ below) and
# the time left before the section's deadline, LIMIT_n - 30: a step that overruns is stopped
# (SIGINT, then SIGKILL after KILL s) and the section still ends 30 s inside its limit, writing what
# it has (publish, at most 8 s more). Estimates: H100, derived from operation counts, memory traffic
# and Triton compile counts (~2 s per kernel specialisation) — estimates, not measurements; each
# section prints what it took.
#
#   section  limit  steps  estimate  what the estimate is made of
#   1         58     28     20       nvidia-smi + pip install -e . (~10 s), `zu-fast info` without a
#                                    build (~5 s)
#   2        163    133    110       3 pytest runs in parallel: Triton cov + torch default (~30 kernel
#                                    compiles), Triton update (~35 compiles), CUDA extension (~310
#                                    small tests, after the build started in section 1: ~60-90 s of nvcc)
#   3         83     53     35       cov_table: ~1.7 PFLOP of bf16 GEMM work (4 shapes x 4 impls x 7
#                                    calls) ~5 s, tuning from precompiled kernels ~5 s, startup ~10 s,
#                                    fp32 accuracy rows ~10 s
#   4         83     53     30       update_table: 3 forms x 2 layouts x 3 impls x 6 calls at d 8192 x
#                                    28672 (3.9 TFLOP per product; the fp64 rows dominate) ~8 s, tuning
#                                    ~5 s, startup ~10 s
#   5         93     63     50       random-init 8B build ~15 s, stats/forward ratio on 2,000 texts
#                                    ~5 s, statistics ~2 s, unlearning 16 requests (25 target steps and
#                                    step 3 on 3 layers, 0.1-0.3 s a step) ~25 s
#   total    480           245
# ("steps": the step budgets that run one after another, each with its KILL grace; the parallel
# part of section 2 counts its longest run. `--budgets` prints these from the values below.)
#
# Sections 2-5 run on a fresh machine too (they install first if section 1 has not run there, inside
# their own budget). The build, test records and tables live in $STATE (default
# /tmp/zu_fast_gpu_check), which lasts as long as the machine; every section writes under $OUT (or
# ./out): s<N>.log, results.json (all tables and records so far) and preferences.json (the
# backend-preference rule applied to them: a backend is preferred only where its correctness tests
# passed on this device and it beat torch on every shape). To make the registry use it, check it in:
#   python -m zu_fast.ops.preferences merge preferences.json   # → zu_fast/ops/measured_preferences.json
# The machine is offline: everything used is in its image (torch, triton, transformers, pytest, ninja).
set -uo pipefail

# (Every value can be overridden from the environment, for smoke runs of this script only.)
: "${LIMIT_1:=58}"   "${EST_1:=20}"
: "${LIMIT_2:=163}"  "${EST_2:=110}"
: "${LIMIT_3:=83}"   "${EST_3:=35}"
: "${LIMIT_4:=83}"   "${EST_4:=30}"
: "${LIMIT_5:=93}"   "${EST_5:=50}"
: "${SPARE:=30}"     # seconds each section's steps leave unused before its limit
: "${KILL:=3}"       # grace after SIGINT before SIGKILL, counted in every budgeted step
# step budgets (each also capped by the section's deadline)
: "${B_INSTALL:=15}"      # nvidia-smi and pip install -e . (sections 2-5: only on a fresh machine, out of their time)
: "${B_INFO:=7}"          # zu-fast info (no build)
: "${B2_TESTS:=115}"      # each Triton/torch pytest run (they run in parallel)
: "${B2_WAIT_BUILD:=45}"  # the CUDA run first waits this long at most for the background build (a shell
: "${B2_CUDA_TESTS:=67}"  #   loop: no kill grace), then runs its tests
: "${B2_RECORD:=12}"      # the device's name, and junit → which backends passed
: "${B3_WAIT_BUILD:=3}" "${B3_TABLE:=36}" "${B3_RECORD:=8}"
: "${B4_WAIT_BUILD:=3}" "${B4_TABLE:=36}" "${B4_RECORD:=8}"
: "${B5_E2E:=60}"

# The step budgets that run one after another in each section, each with its KILL grace (waiting
# for the build is a loop that ends itself: no grace); section 2's parallel part counts its longest run.
planned() {
  local par
  case $1 in
    1) echo $((B_INSTALL + KILL + B_INFO + KILL)) ;;
    2) par=$((B2_TESTS > B2_WAIT_BUILD + B2_CUDA_TESTS ? B2_TESTS : B2_WAIT_BUILD + B2_CUDA_TESTS))
       echo $((par + KILL + B2_RECORD + KILL)) ;;
    3) echo $((B3_WAIT_BUILD + B3_TABLE + KILL + B3_RECORD + KILL)) ;;
    4) echo $((B4_WAIT_BUILD + B4_TABLE + KILL + B4_RECORD + KILL)) ;;
    5) echo $((B5_E2E + KILL)) ;;
  esac
}

print_budgets() {
  local n lim est tot_l=0 tot_e=0
  echo "section limit planned estimate"
  for n in 1 2 3 4 5; do
    lim=LIMIT_$n est=EST_$n
    echo "$n ${!lim} $(planned $n) ${!est}"
    tot_l=$((tot_l + ${!lim})) tot_e=$((tot_e + ${!est}))
  done
  echo "total $tot_l - $tot_e"
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/out}
STATE=${ZU_FAST_GPU_STATE:-/tmp/zu_fast_gpu_check}
PY=${PY:-python3}
# Arguments of the benchmark scripts (override only for smoke runs of this script on small shapes,
# or for a longer run when a device has time: E2E_ARGS="--shape llama-3.1-8b --n 100 ...").
COV_ARGS=${COV_ARGS:---reps 5}
UPDATE_ARGS=${UPDATE_ARGS:---reps 3}
E2E_ARGS=${E2E_ARGS:---shape llama-3.1-8b --n 16 --texts 1000 --overhead-texts 2000}
DEADLINE=${DEADLINE:-1000000}  # set per section (seconds of $SECONDS in the section's own shell)

budget() {  # budget SECONDS cmd...: cmd under min(SECONDS, time left before DEADLINE), SIGINT then SIGKILL
  local want=$1 left t
  shift
  left=$((DEADLINE - SECONDS - KILL))
  t=$((want < left ? want : left))
  if [ "$t" -le 0 ]; then
    echo "skipped, no time left in this section's budget: $*"
    return 124
  fi
  timeout -k "$KILL" -s INT "$t" "$@"
}

installed() { [ -f "$STATE/installed" ]; }  # $STATE lives as long as the machine

install() {  # the versions are printed by `zu-fast info` (section 1)
  budget "$B_INSTALL" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
--format=csv,noheader; '$PY' -m pip install -q -e . --no-deps --no-build-isolation --no-compile" || return 1
  touch "$STATE/installed"
}

start_background() {  # the CUDA extension build and the Triton precompiles, in their own sessions
  if [ ! -f "$STATE/build.rc" ] && [ ! -f "$STATE/build.started" ]; then
    touch "$STATE/build.started"
    setsid bash -c "cd '$ROOT' && $PY -c 'import json; from zu_fast.ops import cuda_backend as cb; cb.load_extension(); \
print(json.dumps(cb.build_status()))' >'$STATE/build.log' 2>&1; echo \$? >'$STATE/build.rc'" </dev/null >/dev/null 2>&1 &
  fi
  local k
  for k in cov_accumulate multiplicative_update; do
    if [ ! -f "$STATE/precompile_$k.rc" ] && [ ! -f "$STATE/precompile_$k.started" ]; then
      touch "$STATE/precompile_$k.started"
      setsid bash -c "cd '$ROOT' && $PY -c 'import time; t = time.time(); from zu_fast.kernels.$k import precompile; \
r = precompile(); print(len(r), \"kernels compiled in\", round(time.time() - t, 1), \"s; shared bytes:\", r)' \
>'$STATE/precompile_$k.log' 2>&1; echo \$? >'$STATE/precompile_$k.rc'" </dev/null >/dev/null 2>&1 &
    fi
  done
}

wait_build() {  # up to $1 seconds (and never past the deadline) for the background CUDA build
  local t0=$SECONDS limit=$1
  [ $((DEADLINE - SECONDS - KILL)) -lt "$limit" ] && limit=$((DEADLINE - SECONDS - KILL))
  while [ ! -f "$STATE/build.rc" ] && [ $((SECONDS - t0)) -lt "$limit" ]; do sleep 1; done
  if [ ! -f "$STATE/build.rc" ]; then echo "CUDA extension build still running after $((SECONDS - t0)) s (log: $STATE/build.log)"
  elif [ "$(cat "$STATE/build.rc")" != 0 ]; then echo "CUDA extension build FAILED:"; tail -n 40 "$STATE/build.log"
  else echo "CUDA extension built ($((SECONDS - t0)) s waited): $(tail -n 1 "$STATE/build.log" | cut -c1-300)"; fi
}

publish() {  # results.json (everything in $STATE so far) and preferences.json, under $OUT
  "$PY" - "$STATE" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
state, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {p.stem: json.loads(p.read_text()) for p in sorted(state.glob("*.json"))}
out.write_text(json.dumps(res, indent=1))
EOF
  if [ -f "$STATE/prefs_state.json" ]; then
    "$PY" -m zu_fast.ops.preferences write --state "$STATE/prefs_state.json" --out "$STATE/preferences.json" \
      && cp "$STATE/preferences.json" "$OUT/preferences.json"
  fi
}

run_tests() {  # run_tests NAME BUDGET pytest-args...: one pytest run with its own junit XML and log
  local name=$1 t=$2 rc
  shift 2
  budget "$t" "$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider --junitxml="$STATE/tests_$name.xml" "$@" \
    >"$OUT/tests_$name.log" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    # stopped by its budget: pytest wrote the XML of what ran, but the tests it did not reach might
    # have failed: an incomplete run never counts as passed
    mv -f "$STATE/tests_$name.xml" "$STATE/incomplete_tests_$name.xml" 2>/dev/null
    echo "tests $name: STOPPED at its budget ($t s); not counted for the preference rule" >>"$OUT/tests_$name.log"
  fi
  echo "$rc" >"$STATE/tests_$name.rc"
}

section1() {
  install || { echo "install failed"; return 1; }
  start_background
  budget "$B_INFO" "$PY" -m zu_fast.cli info || true  # builds nothing (only `info --build` would)
  echo "background: CUDA extension build (log $STATE/build.log), Triton precompiles ($STATE/precompile_*.log)"
}

section2() {
  installed || install || return 1
  start_background
  local rc=0 name
  rm -f "$STATE"/tests_*.xml "$STATE"/incomplete_tests_*.xml
  # Three runs in parallel (16 cores; Triton compiles are single-threaded): the Triton cov kernel
  # with the torch defaults, the Triton update kernel, and - once built - the CUDA extension.
  run_tests triton_torch "$B2_TESTS" tests/test_cov_accumulate.py tests/test_multiplicative_update.py \
    -k "not compiled_ and not column_offsets_past" &
  run_tests triton_update "$B2_TESTS" tests/test_triton_update.py -k "not compiled and not column_offsets_past" &
  (wait_build "$B2_WAIT_BUILD"; run_tests cuda "$B2_CUDA_TESTS" tests/test_cuda_ext.py tests/test_tc_numerics.py -m gpu) &
  wait
  for name in triton_torch triton_update cuda; do
    echo "--- tests $name (exit $(cat "$STATE/tests_$name.rc" 2>/dev/null || echo '?')): failures and the summary"
    grep -E "^(FAILED|ERROR)|passed|failed|STOPPED|Error" "$OUT/tests_$name.log" | tail -n 40
    [ "$(cat "$STATE/tests_$name.rc" 2>/dev/null)" = 0 ] || rc=1
  done
  # which (op, backend) passed here: the first half of the preference rule (complete runs only)
  budget "$B2_RECORD" bash -c "dev=\$('$PY' -c 'import torch; print(torch.cuda.get_device_name())') && \
cap=\$('$PY' -c 'import torch; print(\"%d.%d\" % torch.cuda.get_device_capability())') && \
'$PY' -m zu_fast.ops.preferences record-tests --state '$STATE/prefs_state.json' --device \"\$dev\" \
--capability \"\$cap\" --date $(date -u +%F) --junit '$STATE'/tests_*.xml"
  for name in cov_accumulate multiplicative_update; do
    [ -f "$STATE/precompile_$name.rc" ] && echo "triton precompile $name: $(tail -n 1 "$STATE/precompile_$name.log" | cut -c1-200)"
  done
  return $rc
}

section3() {
  installed || install || return 1
  start_background
  wait_build "$B3_WAIT_BUILD"
  budget "$B3_TABLE" "$PY" benchmarks/cov_table.py $COV_ARGS --json "$STATE/cov_table.json" || return 1
  budget "$B3_RECORD" "$PY" -m zu_fast.ops.preferences record-speed --state "$STATE/prefs_state.json" \
    --op cov_accumulate --table "$STATE/cov_table.json"
}

section4() {
  installed || install || return 1
  start_background
  wait_build "$B4_WAIT_BUILD"
  budget "$B4_TABLE" "$PY" benchmarks/update_table.py $UPDATE_ARGS --json "$STATE/update_table.json" || return 1
  budget "$B4_RECORD" "$PY" -m zu_fast.ops.preferences record-speed --state "$STATE/prefs_state.json" \
    --op multiplicative_update_ --table "$STATE/update_table.json"
}

section5() {
  installed || install || return 1
  (cd benchmarks && budget "$B5_E2E" "$PY" e2e_unlearn.py $E2E_ARGS --stats-overhead --json "$STATE/e2e_8b.json")
}

# sourced (tests): the functions and budgets only
[[ "${BASH_SOURCE[0]}" != "$0" ]] && return 0

if [ "${1:-}" = "--budgets" ]; then
  print_budgets
  exit 0
fi
cd "$ROOT" || exit 2
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(1 2 3 4 5)
for s in "${sections[@]}"; do
  case $s in 1|2|3|4|5) ;; *) echo "unknown section $s (sections are 1-5, or --budgets)"; exit 2 ;; esac
done
mkdir -p "$OUT" "$STATE"
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$STATE/torch_ext}
export ZU_FAST_CACHE=$STATE/zu_fast_cache MAX_JOBS=${MAX_JOBS:-16}
status=0
for s in "${sections[@]}"; do
  lim=LIMIT_$s
  limit=${!lim}
  echo "=== section $s ($(date -u +%T)), limit ${limit} s"
  t0=$SECONDS
  # each section in its own shell: its steps end by its deadline (limit - SPARE); the outer timeout
  # (limit - 12 s) is only a safety net; publish takes at most 8 s more
  timeout -k 2 $((limit - 12)) bash -c "$(declare -f budget installed install start_background wait_build \
    run_tests section$s); set -uo pipefail; \
    PY='$PY' STATE='$STATE' ROOT='$ROOT' OUT='$OUT' COV_ARGS='$COV_ARGS' UPDATE_ARGS='$UPDATE_ARGS' \
    E2E_ARGS='$E2E_ARGS' KILL=$KILL DEADLINE=$((limit - SPARE)) $(for v in ${!B_*} ${!B2_*} ${!B3_*} ${!B4_*} \
    ${!B5_*}; do printf '%s=%s ' "$v" "${!v}"; done); cd '$ROOT' && section$s" 2>&1 | tee "$OUT/s$s.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "section $s stopped at its safety limit" | tee -a "$OUT/s$s.log"
  [ "$rc" != 0 ] && status=1
  DEADLINE=$((SECONDS + 8 + KILL)) budget 8 bash -c "$(declare -f publish); PY='$PY' STATE='$STATE' OUT='$OUT' publish" \
    >>"$OUT/s$s.log" 2>&1
  echo "=== section $s: $((SECONDS - t0)) s (limit ${limit} s, estimate $(v=EST_$s; echo "${!v}") s), exit $rc" \
    | tee -a "$OUT/s$s.log"
done
exit $status
