"""ThreadSanitizer can be trusted on the CUDA emulation (issue 14).

tests/sanitize.sh runs the emulated CUDA kernels under TSan in place of
compute-sanitizer's racecheck.  That is only meaningful if TSan sees the
emulator's __syncthreads/__syncwarp as synchronisation (no false reports on
correct code) and still reports a shared-memory race between two barriers.
tests/cuda_emu/race_toy.cpp is a toy kernel with both variants, block-wide and
warp-wide; this test compiles it with -fsanitize=thread and checks each.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

EMU = Path(__file__).resolve().parent / "cuda_emu"


@pytest.fixture(scope="module")
def race_toy(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if not shutil.which(cxx):
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path_factory.mktemp("tsan") / "race_toy"
    cmd = [cxx, "-std=c++20", "-g", "-O1", "-fsanitize=thread", "-pthread", f"-I{EMU / 'include'}",
           str(EMU / "race_toy.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("tsan" in r.stderr or "sanitize" in r.stderr) and "error:" not in r.stderr:
        pytest.skip(f"{cxx} cannot link ThreadSanitizer here: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr
    return exe


def _run(exe, mode):
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}
    env.pop("LD_PRELOAD", None)
    return subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("mode", ["sync", "warp-sync"])
def test_barriers_are_synchronisation_for_tsan(race_toy, mode):
    r = _run(race_toy, mode)
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stderr[-3000:]
    assert r.stdout.strip() == "sum 4096.0"  # every thread read its neighbour's write


@pytest.mark.parametrize("mode", ["racy", "warp-racy"])
def test_shared_memory_race_between_barriers_is_reported(race_toy, mode):
    r = _run(race_toy, mode)
    assert r.returncode == 66, (r.returncode, r.stderr[-3000:])
    assert "WARNING: ThreadSanitizer: data race" in r.stderr
    assert "neighbour_kernel" in r.stderr  # the report points into the kernel
