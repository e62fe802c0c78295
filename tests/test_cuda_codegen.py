"""What nvcc makes of the CUDA sources, checked without a GPU (where nvcc is installed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA sources are not compiled here")
def test_tensor_core_fragment_loads_address_shared_memory(tmp_path):
    # Every A/B fragment load of the tensor-core kernels reads shared memory.  nvcc emitted the
    # bf16 ones with a generic address: four generic 32-bit loads per fragment (LD.E), where the
    # fp16 ones, with the shared state space, became one ldmatrix (LDSM) each (csrc/din_cuda_tc.cu,
    # frag_load).  The PTX names the state space: no fragment load of either type may lack it.
    ptx = tmp_path / "tc.ptx"
    cmd = [_nvcc(), "-O3", "-arch=sm_80", "-std=c++17", "-ptx", f"-I{ROOT / 'csrc'}",
           str(ROOT / "csrc" / "din_cuda_tc.cu"), "-o", str(ptx)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loads = re.findall(r"wmma\.load\.[ab]\.[\w.]+", ptx.read_text())
    by_type = {t: [x for x in loads if x.endswith("." + t)] for t in ("bf16", "f16")}
    assert by_type["bf16"] and by_type["f16"], sorted(set(loads))
    generic = sorted({x for x in loads if ".shared." not in x})
    assert not generic, generic
    # The two types load in the same places (one instantiation each).
    assert sorted(x.removesuffix("bf16") for x in by_type["bf16"]) == \
        sorted(x.removesuffix("f16") for x in by_type["f16"])
