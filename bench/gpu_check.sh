#!/usr/bin/env bash
# The one prepared GPU check of issue 3.  Run from anywhere on a machine with one
# NVIDIA GPU (no internet needed):
#
#     bash bench/gpu_check.sh
#
# Stages (each with a timeout; a failing stage is recorded, the next still runs;
# the whole script stays under ~8 minutes):
#   1. build + install for the native arch: pip install --no-build-isolation --no-deps .
#   2. the CUDA tests: pytest tests/test_cuda.py (against the installed package)
#   3. timings: bench/gpu_bench.py (fused vs eager reference vs torch.compile,
#      copy bandwidth, GB/s, TFLOP/s)
#   4. compute-sanitizer memcheck and racecheck on a small forward+backward
#      (bench/sanitize_case.py), when compute-sanitizer is found
# It writes a markdown report named <date>_<gpu>.md to bench/results/ and, when
# $OUT is set, to $OUT too, with the GPU name, the pytest summary line, the
# sanitizer summaries and the timing table; the table is printed last.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
START=$(date +%s)
TOTAL_BUDGET="${GPU_CHECK_BUDGET:-460}"   # seconds for all stages together
WORK="$(mktemp -d /tmp/din_gpu_check.XXXXXX)"
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
[ -n "$GPU" ] || GPU="$($PY -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null || echo unknown-gpu)"
STAMP="$(date +%Y-%m-%d_%H%M)"
SAFE_GPU="$(echo "$GPU" | tr -c 'A-Za-z0-9._-' '_' | sed 's/_*$//')"
NAME="${STAMP}_${SAFE_GPU}.md"
mkdir -p bench/results
declare -a SUMMARY=()

remaining() { echo $(( TOTAL_BUDGET - ($(date +%s) - START) )); }

# run_stage NAME LIMIT_SECONDS LOGFILE CMD...   -> records "NAME: ok|failed (rc)|timed out" in SUMMARY
run_stage() {
  local name="$1" limit="$2" logf="$3"; shift 3
  local left; left=$(remaining)
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$name: skipped (time budget spent)"); echo "== $name: skipped (time budget)"; return 99
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$logf" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then SUMMARY+=("$name: ok (${dt}s)")
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then SUMMARY+=("$name: TIMED OUT after ${limit}s")
  else SUMMARY+=("$name: FAILED (exit $rc, ${dt}s)"); fi
  echo "   -> ${SUMMARY[-1]}"
  return $rc
}

# ---- 1. build -----------------------------------------------------------------
export DIN_FUSED_CUDA=1
export DIN_FUSED_BUILD_DIR="$WORK/cmake"
export CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)"
run_stage "build (pip install --no-build-isolation, native arch)" 240 "$WORK/build.log" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-input --force-reinstall -v .
BUILD_RC=$?
# Tests and benchmarks import the installed package, never the source tree.
RUNDIR="$WORK/run"; mkdir -p "$RUNDIR"
BUILD_INFO="$(cd "$RUNDIR" && "$PY" -c 'import din_fused, json; i = din_fused.build_info(); i["file"] = din_fused.__file__; print(json.dumps(i))' 2>&1 | tail -n1)"
echo "   build info: $BUILD_INFO"

# ---- 2. CUDA tests --------------------------------------------------------------
PYTEST_LINE="not run"
if [ $BUILD_RC -eq 0 ]; then
  run_stage "pytest tests/test_cuda.py" 150 "$WORK/pytest.log" \
    bash -c "cd '$RUNDIR' && '$PY' -m pytest '$ROOT/tests/test_cuda.py' -c '$ROOT/pyproject.toml' --rootdir '$ROOT' -q -p no:cacheprovider"
  PYTEST_LINE="$(grep -E '([0-9]+ (passed|failed|errors?|skipped)|no tests ran).* in [0-9.]+s' "$WORK/pytest.log" | tail -n1 | sed 's/^=* *//; s/ *=*$//')"
  [ -n "$PYTEST_LINE" ] || PYTEST_LINE="$(tail -n1 "$WORK/pytest.log")"
fi

# ---- 3. timings (before the sanitizers: the table survives a slow sanitizer) ---
TABLE="not run"
if [ $BUILD_RC -eq 0 ]; then
  # leave ~3 minutes for the two sanitizer runs
  left=$(( $(remaining) - 180 )); [ $left -lt 60 ] && left=60
  budget=$(( left - 45 )); [ $budget -lt 30 ] && budget=30
  run_stage "benchmark (bench/gpu_bench.py)" "$left" "$WORK/bench.log" \
    bash -c "cd '$RUNDIR' && '$PY' '$ROOT/bench/gpu_bench.py' --budget $budget --out-md '$WORK/table.md' --out-json '$WORK/bench.json' --log '$WORK/bench_detail.log'"
  if [ -s "$WORK/table.md" ]; then TABLE="$(cat "$WORK/table.md")"; else TABLE="benchmark produced no table; see its log below"; fi
fi

# ---- 4. compute-sanitizer --------------------------------------------------------
SAN="$(command -v compute-sanitizer || true)"
for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  [ -z "$SAN" ] && [ -x "$c" ] && SAN="$c"
done
declare -a SAN_LINES=()
if [ -z "$SAN" ]; then
  SAN_LINES+=("compute-sanitizer not found: skipped")
elif [ $BUILD_RC -ne 0 ]; then
  SAN_LINES+=("skipped: build failed")
else
  FILTER=()
  if "$SAN" --help 2>&1 | grep -q -- "--kernel-name"; then FILTER=(--kernel-name kns=din_); fi
  for tool in memcheck racecheck; do
    run_stage "compute-sanitizer $tool" 90 "$WORK/san_$tool.log" \
      bash -c "cd '$RUNDIR' && '$SAN' --tool $tool ${FILTER[*]:-} --error-exitcode 3 '$PY' '$ROOT/bench/sanitize_case.py'"
    rc=$?
    line="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|LEAK SUMMARY' "$WORK/san_$tool.log" | tr '\n' ' ')"
    ok="$(grep -c 'sanitize_case: ok' "$WORK/san_$tool.log")"
    SAN_LINES+=("$tool: exit $rc; ${line:-no summary line}; case finished: $([ "$ok" -gt 0 ] && echo yes || echo no)")
  done
fi

# ---- report -----------------------------------------------------------------------
REPORT="$WORK/$NAME"
{
  echo "# din_fused GPU check: $GPU"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  # A copy of the tree can carry an older .git (the device tool's does): the sources' own
  # hash says which kernels ran.  Here: cat csrc/* | sha256sum | cut -c1-12
  echo "- sources: csrc sha256 $(cat "$ROOT"/csrc/* | sha256sum | cut -c1-12)"
  echo "- torch: $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null); nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo '?')"
  echo "- build info: \`$BUILD_INFO\`"
  echo "- total time: $(( $(date +%s) - START )) s"
  echo
  echo "## Stages"
  for s in "${SUMMARY[@]}"; do echo "- $s"; done
  echo
  echo "## pytest (tests/test_cuda.py)"
  echo
  echo "\`$PYTEST_LINE\`"
  if [ -f "$WORK/pytest.log" ] && grep -qE '^(FAILED|ERROR)' "$WORK/pytest.log"; then
    echo; echo '```'; grep -E '^(FAILED|ERROR)' "$WORK/pytest.log" | head -n 40; echo '```'
  fi
  echo
  echo "## compute-sanitizer"
  for s in "${SAN_LINES[@]}"; do echo "- $s"; done
  echo
  echo "## Timings"
  echo
  echo "$TABLE"
  echo
  echo "<details><summary>log tails</summary>"
  echo
  for f in build pytest san_memcheck san_racecheck bench bench_detail; do
    if [ -f "$WORK/$f.log" ]; then echo "### $f.log"; echo '```'; tail -n 30 "$WORK/$f.log"; echo '```'; fi
  done
  echo "</details>"
} >"$REPORT"
cp "$REPORT" "bench/results/$NAME"
[ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "bench/results/${NAME%.md}.json"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$REPORT" "$OUT/$NAME"
  [ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT/${NAME%.md}.json"
  for f in "$WORK"/*.log; do cp "$f" "$OUT/" 2>/dev/null; done
fi
echo
echo "report: bench/results/$NAME${OUT:+ and $OUT/$NAME}"
printf '%s\n' "${SUMMARY[@]}"
echo "pytest: $PYTEST_LINE"
printf '%s\n' "${SAN_LINES[@]}"
echo
echo "$TABLE"
