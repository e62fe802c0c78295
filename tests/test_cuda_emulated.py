"""The CUDA kernels' logic, checked without a GPU.

tests/cuda_emu/build.sh compiles csrc/*.cu as plain C++ against a small CUDA
emulation (one CPU thread per CUDA thread, barriers for __syncthreads and the
warp intrinsics), and din_fused.ops is patched so that CPU tensors take the
CUDA code path of that module.  Numerics are the kernels' own (fp32/fp64
accumulation, half/bfloat16 storage), so these are real checks of indexing,
tiling, online softmax, the backward and the deterministic reductions; not of
timing, occupancy or memory-model races (compute-sanitizer covers those on a
GPU, see bench/gpu_check.sh).

Skipped when no C++20 compiler is found.  Set DIN_TEST_CUDA_EMU=0 to skip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jagged_cases import LAYOUTS, check_jagged
from kernel_cases import check_case, check_row_seq, fwd_bwd, make_problem

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"
pytestmark = pytest.mark.slow


def _cxx20_ok(cxx: str) -> bool:
    code = ("#include <barrier>\n"
            "int main(){std::barrier<> b(1); b.arrive_and_wait(); _Float16 h = 1; return (int)h - 1;}\n")
    try:
        r = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-", "-o", os.devnull, "-pthread"], input=code,
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.fixture(scope="module")
def emu_module():
    if os.environ.get("DIN_TEST_CUDA_EMU", "1") == "0":
        pytest.skip("DIN_TEST_CUDA_EMU=0")
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx) or not _cxx20_ok(cxx):
        pytest.skip(f"no C++20 compiler with <barrier> and _Float16 ({cxx})")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 is needed to build the emulated module")
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "csrc").iterdir(), *(EMU / "include").iterdir(), EMU / "build.sh"]):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    out = ROOT / "build" / "cuda_emu" / h.hexdigest()[:16]
    built = list(out.glob("_C*.so")) if out.exists() else []
    if not built:
        r = subprocess.run(["bash", str(EMU / "build.sh"), str(out), sys.executable], capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"emulated build failed:\n{r.stdout}\n{r.stderr}"
        built = list(out.glob("_C*.so"))
    sys.path.insert(0, str(EMU))
    try:
        import emu
    finally:
        sys.path.remove(str(EMU))
    undo = emu.install(str(built[0]))
    yield emu
    undo()


ACTS = ["sigmoid", "relu", "prelu", "dice", "dice-train"]


@pytest.mark.parametrize("validity", ["lengths", "mask", "both"])
@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("act", ACTS)
def test_float64_all_modes(emu_module, act, norm, validity):
    check_case(7, 13, 37, (12, 7, 5), act, norm, validity, True, torch.float64, "cpu", seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_low_precision(emu_module, act, dtype):
    check_case(6, 9, 8, (16, 8), act, "softmax", "both", True, dtype, "cpu", seed=2)
    check_case(5, 7, 37, (12, 7, 5), act, "none", "lengths", False, dtype, "cpu", seed=3)


@pytest.mark.parametrize("shape", [
    (10, 1, 3, (5,)),                # T = 1
    (3, 5, 1, (1,)),                 # D = 1, width 1
    (3, 6, 5, (4, 1, 3, 2)),         # four layers, a width-1 layer
    (3, 150, 6, (8, 4)),             # several tiles, ballot windows, masked gaps
    (3, 9, 100, (256,)),             # unfolded first layer (M does not fit next to the tiles)
    (3, 7, 4, (256, 256, 256, 256)),  # widest
], ids=str)
@pytest.mark.parametrize("act", ["sigmoid", "dice-train"])
def test_shapes(emu_module, shape, act):
    B, T, D, hidden = shape
    validity = "both" if T > 1 else "mask"  # dice-train needs >= 2 valid positions
    check_case(B, T, D, hidden, act, "softmax", validity, True, torch.float64, "cpu", seed=4)
    check_case(B, T, D, hidden, act, "none", "lengths", False, torch.float64, "cpu", seed=5)


_LOWP_SHAPES = [
    (10, 1, 3, (5,)),
    (3, 5, 1, (1,)),
    (3, 6, 5, (4, 1, 3, 2)),
    (3, 150, 6, (8, 4)),              # several tensor-core tiles per row
    (70, 3, 7, (9, 5)),               # many rows per chunk: tiles span rows
    (3, 7, 4, (256, 256)),            # wide: smaller tensor-core tiles / FFMA backward
    (3, 7, 4, (256, 256, 256, 256)),  # too wide for the tensor-core tiles: FFMA fallback
]
# The four-layer 256-wide FFMA fallback is slow under emulation, so it runs in
# fp16 only (bf16 takes the same fallback code).
_LOWP_CASES = [(s, dt) for s in _LOWP_SHAPES for dt in (torch.bfloat16, torch.float16)
               if not (len(s[3]) == 4 and s[3][0] == 256 and dt == torch.bfloat16)]


@pytest.mark.parametrize("shape,dtype", _LOWP_CASES, ids=str)
def test_low_precision_shapes(emu_module, shape, dtype):
    B, T, D, hidden = shape
    validity = "both" if T > 1 else "mask"
    for act in ("prelu", "dice-train"):
        check_case(B, T, D, hidden, act, "softmax", validity, True, dtype, "cpu", seed=9)
        check_case(B, T, D, hidden, act, "none", "lengths", False, dtype, "cpu", seed=10)


@pytest.mark.parametrize("norm", ["none", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_rows_sharing_sequences(emu_module, dtype, norm):
    from din_fused import ops
    check_row_seq(ops._C, "cpu", dtype, norm=norm)


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice-train"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_jagged_and_shared_layouts(emu_module, layout, act):
    check_jagged(layout, act, "softmax", torch.float64, "cpu")
    check_jagged(layout, act, "none", torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["jagged", "shared-mixed"])
def test_jagged_low_precision(emu_module, layout, dtype):
    check_jagged(layout, "dice-train", "softmax", dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic(emu_module, dtype):
    q, k, lengths, mask, p, _, _ = make_problem(9, 20, 7, (10, 6), "dice", "both", "cpu", seed=6)
    pp = {**p, "weights": [w.float() for w in p["weights"]]}
    a = fwd_bwd(q.to(dtype), k.to(dtype), lengths, mask, pp)
    b = fwd_bwd(q.to(dtype), k.to(dtype), lengths, mask, pp)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_workspace_checked(emu_module):
    from din_fused import ops
    q, k, lengths, mask, p, _, _ = make_problem(2, 3, 4, (5,), "sigmoid", "lengths", "cpu", seed=7)
    prep = ops._Prepared(q, k, lengths, None, p["weights"], p["biases"], [], [], [], "sigmoid", "none", 1.0)
    out = torch.empty(2, 4, dtype=torch.float64)
    sc = torch.empty(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="workspace"):
        ops._C.forward({**prep.cfg, "out": out.data_ptr(), "ldo": 4, "scores": sc.data_ptr(), "ld_scores": 3})
