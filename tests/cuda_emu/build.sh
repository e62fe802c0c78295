#!/usr/bin/env bash
# Build din_fused._C with the CUDA sources compiled as C++ against the CPU
# emulation in include/ (see include/cuda_runtime.h).  Usage:
#   tests/cuda_emu/build.sh OUT_DIR [python]
# writes OUT_DIR/_C<ext suffix>; tests/test_cuda_emulated.py loads it.  The
# module holds the CPU kernels too (csrc/*.cpp), so it can also stand in for
# din_fused._C.  DIN_EMU_CXXFLAGS adds compile and link flags (tests/sanitize.sh:
# -fsanitize=...).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:?usage: build.sh OUT_DIR [python]}"
py="${2:-python3}"
mkdir -p "$out"
suffix="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
inc="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
pyb="$("$py" -c 'import pybind11; print(pybind11.get_include())')"
CXX="${CXX:-g++}"
flags=(-std=c++20 -O1 -g -fPIC -fopenmp -pthread -Wall -Wno-unused-function -Wno-unknown-pragmas
       -DDIN_WITH_CUDA '-DDIN_CUDA_ARCHS="emulated"' '-DDIN_NVCC_VERSION="emulated"'
       '-DDIN_CXX_COMPILER="emulated"' -I"$here/include" -I"$root/csrc" -isystem "$inc" -isystem "$pyb")
read -r -a extra <<< "${DIN_EMU_CXXFLAGS:-}"
flags+=("${extra[@]}")
objs=()
for src in "$root"/csrc/*.cpp "$root"/csrc/*.cu; do
  obj="$out/$(basename "$src").o"
  lang=c++
  "$CXX" "${flags[@]}" -x "$lang" -c "$src" -o "$obj" &
  objs+=("$obj")
done
wait
"$CXX" -shared -fopenmp -pthread "${extra[@]}" "${objs[@]}" -o "$out/_C$suffix"
echo "$out/_C$suffix"
