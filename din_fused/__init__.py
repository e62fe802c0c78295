"""din_fused: fused Deep Interest Network attention pooling for PyTorch."""

from . import _C
from .functional import din_attention, din_attention_jagged
from .modules import Dice, FusedDINAttention
from .params import MLPParams
from .reference import din_attention_ref

__version__ = "0.1.0"


def build_info() -> dict:
    """How the extension was built: {"cuda": bool, "cuda_archs", "nvcc_version",
    "cxx_compiler", "threading", ...} plus the CUDA device count seen by _C."""
    info = dict(_C.build_info())
    info["cuda_devices"] = _C.cuda_device_count() if info["cuda"] else 0
    return info


__all__ = ["din_attention", "din_attention_jagged", "MLPParams", "din_attention_ref", "FusedDINAttention",
           "Dice", "build_info"]
