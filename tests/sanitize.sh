#!/usr/bin/env bash
# Sanitizer runs of the kernels (issue 14): the CPU kernels and the CUDA kernels
# (compiled for CPU through tests/cuda_emu, one thread per CUDA thread, real
# barriers) under AddressSanitizer + UndefinedBehaviorSanitizer, and the
# emulated CUDA kernels under ThreadSanitizer, which then plays the part of
# compute-sanitizer's racecheck (tests/test_sanitizers.py proves that it sees
# the emulator's barriers as synchronisation and still flags a shared-memory
# race between two of them).
#
#   tests/sanitize.sh [asan|tsan|all] [quick|full]      (default: all full)
#
# asan: builds tests/cuda_emu/build.sh with -fsanitize=address,undefined (that
#       module holds the CPU kernels too), installs it as din_fused._C in a copy
#       of the tracked tree, and runs the op/input tests, the emulated-CUDA tests
#       and a slice of the fuzz profile with the ASan runtime preloaded.
# tsan: builds the emulated module with -fsanitize=thread and runs the emulated
#       tests and a slice of the emulated fuzz profile with libtsan preloaded.
# quick: fewer tests and fuzz examples (what CI runs).  Exit status 0 only when
# every test passed and the sanitizers wrote no report (reports go to
# $DIN_SAN_DIR/<mode>/logs, default build/sanitize).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
mode="${1:-all}"
depth="${2:-full}"
py="${PYTHON:-python3}"
out="${DIN_SAN_DIR:-$root/build/sanitize}"
CXX="${CXX:-g++}"
case "$mode" in asan|tsan|all) ;; *) echo "usage: $0 [asan|tsan|all] [quick|full]" >&2; exit 2 ;; esac
case "$depth" in quick|full) ;; *) echo "usage: $0 [asan|tsan|all] [quick|full]" >&2; exit 2 ;; esac

if [ "$depth" = quick ]; then
  fuzz_scale=0.03
  emu_k="float64_all_modes and (sigmoid or prelu) and softmax or low_precision_shapes and (150 or 70) or rows_sharing or nan_prop or dim_beyond or workspace"
  cpu_tests=(tests/test_op.py)
else
  fuzz_scale=0.15
  emu_k=""
  cpu_tests=(tests/test_op.py tests/test_inputs.py tests/test_module.py)
fi

status=0

check_logs() {  # $1: log dir; fails when any sanitizer report was written
  local n
  n=$(find "$1" -type f -size +0 | wc -l)
  if [ "$n" -ne 0 ]; then
    echo "sanitize: $n report file(s) in $1:" >&2
    find "$1" -type f -size +0 -exec sh -c 'echo "== $1"; head -60 "$1"' _ {} \; >&2
    return 1
  fi
  echo "sanitize: no reports in $1"
}

run_asan() {
  local dir="$out/asan" libasan
  rm -rf "$dir/logs" "$dir/tree"
  mkdir -p "$dir/logs" "$dir/tree"
  DIN_EMU_CXXFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer" \
    bash "$root/tests/cuda_emu/build.sh" "$dir/lib" "$py" > "$dir/build.log" 2>&1 || {
    tail -30 "$dir/build.log" >&2; return 1; }
  (cd "$root" && git ls-files -z | xargs -0 cp --parents -t "$dir/tree")
  rm -f "$dir"/tree/din_fused/_C*.so
  cp "$dir"/lib/_C*.so "$dir/tree/din_fused/"
  libasan="$("$CXX" -print-file-name=libasan.so)"
  local k=()
  [ -n "$emu_k" ] && k=(-k "$emu_k")
  (
    cd "$dir/tree"
    # libstdc++ too: python does not link it, and ASan's __cxa_throw interceptor
    # must find the real one at start-up (else "CHECK failed ... real___cxa_throw")
    export LD_PRELOAD="$libasan $("$CXX" -print-file-name=libstdc++.so.6)"
    export ASAN_OPTIONS="detect_leaks=0:log_path=$dir/logs/asan:halt_on_error=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0"
    export UBSAN_OPTIONS="print_stacktrace=1:log_path=$dir/logs/ubsan"
    export DIN_TEST_CUDA_EMU_SO="$(ls "$dir"/lib/_C*.so)"
    export DIN_FUZZ_SCALE="$fuzz_scale"
    rc=0  # (errexit is off inside a "|| ..." subshell: collect every step's status)
    "$py" -m pytest -q -p no:cacheprovider "${cpu_tests[@]}" || rc=1
    "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py "${k[@]}" || rc=1
    "$py" -m pytest -q -p no:cacheprovider tests/test_fuzz.py || rc=1
    exit "$rc"
  ) || status=1
  check_logs "$dir/logs" || status=1
}

run_tsan() {
  local dir="$out/tsan" libtsan
  rm -rf "$dir/logs"
  mkdir -p "$dir/logs"
  DIN_EMU_CXXFLAGS="-fsanitize=thread" \
    bash "$root/tests/cuda_emu/build.sh" "$dir/lib" "$py" > "$dir/build.log" 2>&1 || {
    tail -30 "$dir/build.log" >&2; return 1; }
  libtsan="$("$CXX" -print-file-name=libtsan.so)"
  local k=()
  [ -n "$emu_k" ] && k=(-k "$emu_k")
  (
    cd "$root"
    export LD_PRELOAD="$libtsan"
    export TSAN_OPTIONS="log_path=$dir/logs/tsan:halt_on_error=0:report_signal_unsafe=0:suppressions=$root/tests/tsan.supp"
    export DIN_TEST_CUDA_EMU_SO="$(ls "$dir"/lib/_C*.so)"
    export DIN_FUZZ_SCALE="$fuzz_scale"
    # CPU kernels on their own pool, whose synchronisation TSan sees (not libgomp's).
    export DIN_FUSED_CPU_THREADS=pool
    rc=0
    "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_emulated.py "${k[@]}" || rc=1
    "$py" -m pytest -q -p no:cacheprovider tests/test_fuzz.py -k emulated || rc=1
    exit "$rc"
  ) || status=1
  check_logs "$dir/logs" || status=1
}

if [ "$mode" = asan ] || [ "$mode" = all ]; then run_asan; fi
if [ "$mode" = tsan ] || [ "$mode" = all ]; then run_tsan; fi
exit "$status"
