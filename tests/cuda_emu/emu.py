"""Route din_fused's op pipeline through the CUDA kernels compiled for CPU.

``install(path)`` loads the _C built by build.sh (CUDA sources compiled as C++
against include/cuda_runtime.h) and patches din_fused.ops so that CPU tensors
take the "CUDA" code path of that module: every params dict gets is_cuda=True
and half/bfloat16 inputs are kept in their dtype.  Everything else (validation,
workspace sizes, Dice statistics, autograd) is the real din_fused.ops code, so
comparing against din_fused.reference checks the kernels end to end.
"""

from __future__ import annotations

import importlib.util

import torch


class EmulatedC:
    # The CUDA kernels need scratch in every phase, also for these CPU tensors (ops.py asks).
    emulates_cuda = True

    def __init__(self, mod):
        self._m = mod

    @staticmethod
    def _cfg(d):
        d = dict(d)
        d["is_cuda"] = True
        d["device"] = 0
        d["stream"] = 0
        return d

    def forward(self, d):
        self._m.forward(self._cfg(d))

    def stats(self, d):
        self._m.stats(self._cfg(d))

    def backward(self, d):
        d = self._cfg(d)
        if d.get("reduce_layer", -1) >= 0 and not d.get("workspace"):
            # ops.py runs the Dice reduce passes before it allocates the backward
            # workspace; the CUDA kernels need it (reported to the lead).
            n = self._m.workspace_bytes(d, "backward")
            ws = torch.empty(max(n, 1), dtype=torch.uint8)
            d["workspace"], d["workspace_bytes"] = ws.data_ptr(), n
            self._m.backward(d)
            del ws
            return
        self._m.backward(d)

    def workspace_bytes(self, d, phase):
        return self._m.workspace_bytes(self._cfg(d), phase)

    def __getattr__(self, name):
        return getattr(self._m, name)


def load(path):
    spec = importlib.util.spec_from_file_location("_C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def install(path_or_module):
    """Patch din_fused.ops to use the emulated module (a path to it, or the module
    loaded with load()); returns an undo function."""
    import din_fused.ops as ops

    mod = load(path_or_module) if isinstance(path_or_module, str) else path_or_module
    emu = EmulatedC(mod)
    old_c, old_cd = ops._C, ops._compute_dtype

    def compute_dtype(t):
        return t.dtype

    ops._C = emu
    ops._compute_dtype = compute_dtype

    def undo():
        ops._C = old_c
        ops._compute_dtype = old_cd

    return undo
