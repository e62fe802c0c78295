import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tests" / "cuda_emu"


def pytest_addoption(parser):
    parser.addoption("--fuzz-full", action="store_true", default=False,
                     help="run the full property-fuzzing profile (20,000 examples; same as DIN_FUZZ_FULL=1)")


def pytest_configure(config):
    if config.getoption("--fuzz-full"):
        os.environ["DIN_FUZZ_FULL"] = "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cxx20_ok(cxx: str) -> bool:
    code = ("#include <barrier>\n"
            "int main(){std::barrier<> b(1); b.arrive_and_wait(); _Float16 h = 1; return (int)h - 1;}\n")
    try:
        r = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-", "-o", os.devnull, "-pthread"], input=code,
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def build_emulated(extra_flags: str = "") -> Path:
    """The emulated _C for this source tree (cached under build/cuda_emu by content and flags)."""
    h = hashlib.sha256(extra_flags.encode())
    for f in sorted([*(ROOT / "csrc").iterdir(), *(EMU / "include").iterdir(), EMU / "build.sh"]):
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    out = ROOT / "build" / "cuda_emu" / h.hexdigest()[:16]
    built = list(out.glob("_C*.so")) if out.exists() else []
    if not built:
        env = {**os.environ, "DIN_EMU_CXXFLAGS": extra_flags}
        r = subprocess.run(["bash", str(EMU / "build.sh"), str(out), sys.executable], capture_output=True,
                           text=True, timeout=1800, env=env)
        assert r.returncode == 0, f"emulated build failed:\n{r.stdout}\n{r.stderr}"
        built = list(out.glob("_C*.so"))
    return built[0]


def require_cxx20():
    """Skip unless the emulation can be compiled here."""
    if os.environ.get("DIN_TEST_CUDA_EMU", "1") == "0":
        pytest.skip("DIN_TEST_CUDA_EMU=0")
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx) or not _cxx20_ok(cxx):
        pytest.skip(f"no C++20 compiler with <barrier> and _Float16 ({cxx})")
    try:
        import pybind11  # noqa: F401
    except ImportError:
        pytest.skip("pybind11 is needed to build the emulated module")


@pytest.fixture(scope="session")
def emu_c():
    """(emu helper module, the CUDA kernels compiled for CPU): see tests/cuda_emu/emu.py.
    DIN_TEST_CUDA_EMU_SO points at a prebuilt one (tests/sanitize.sh: a sanitizer build)."""
    require_cxx20()
    prebuilt = os.environ.get("DIN_TEST_CUDA_EMU_SO")
    path = Path(prebuilt) if prebuilt else build_emulated()
    sys.path.insert(0, str(EMU))
    try:
        import emu
    finally:
        sys.path.remove(str(EMU))
    return emu, emu.load(str(path))
