"""Build din_fused._C with CMake.

Environment switches:
  DIN_FUSED_CUDA=auto|0|1   compile the CUDA kernels: auto (default) when nvcc is found,
                            1 requires nvcc, 0 never.
  DIN_FUSED_CUDA_ARCHS      CMake CUDA architectures; default "native" when a GPU is
                            visible, else "80-real;90" (SASS for sm_80/sm_90 plus PTX).
  DIN_FUSED_BUILD_DIR       CMake build folder (default build/cmake).

A build also leaves a copy of _C in the checkout's din_fused/ (as `build_ext
--inplace` would), so that `python -m din_fused.train` run from the repository
root, where the source folder shadows the installed package, finds it too.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def gpu_visible():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def cuda_args():
    mode = os.environ.get("DIN_FUSED_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"DIN_FUSED_CUDA must be auto, 0 or 1, got {mode!r}")
    nvcc = find_nvcc() if mode != "0" else None
    if mode == "1" and not nvcc:
        sys.exit("DIN_FUSED_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if not nvcc:
        return ["-DDIN_FUSED_WITH_CUDA=OFF"]
    archs = os.environ.get("DIN_FUSED_CUDA_ARCHS") or ("native" if gpu_visible() else "80-real;90")
    print(f"din_fused: building CUDA kernels with {nvcc} for {archs}")
    return ["-DDIN_FUSED_WITH_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}"]


def fresh_build_dir(build_dir: Path, configure: list) -> None:
    """Empty build_dir when it was configured differently.

    An isolated `pip install .` configures with a cmake, ninja and pybind11 from a
    temporary environment that pip deletes afterwards; a cache that points at
    them (or at the other CUDA setting) would break every later build.
    """
    stamp = build_dir / "din_fused_configure.json"
    tools = [shutil.which("cmake"), shutil.which("ninja")]
    sig = json.dumps({"configure": configure, "tools": tools}, sort_keys=True)
    if stamp.is_file() and stamp.read_text() == sig:
        return
    if build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True)
    stamp.write_text(sig)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("DIN_FUSED_BUILD_DIR", ROOT / "build" / "cmake"))
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [*generator, f"-DPython_EXECUTABLE={sys.executable}",
                     f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", *cuda_args()]
        fresh_build_dir(build_dir, configure)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *configure,
                               f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}"])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 2)])
        self.copy_to_checkout(Path(self.get_ext_fullpath(ext.name)))

    def copy_to_checkout(self, built: Path) -> None:
        # The source folder din_fused/ shadows the installed package whenever
        # Python runs from the repository root; give it the same extension.
        dest = ROOT / "din_fused" / built.name
        if built.resolve() != dest.resolve() and os.access(dest.parent, os.W_OK):
            shutil.copy2(built, dest)


setup(ext_modules=[Extension("din_fused._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
