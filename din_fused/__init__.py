"""din_fused: fused Deep Interest Network attention pooling for PyTorch."""

try:
    from . import _C
except ImportError as e:
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent
    _how = (f"from {_root} run `pip install .` (it also places _C in the checkout) or "
            "`python setup.py build_ext --inplace`" if (_root / "setup.py").is_file()
            else "reinstall din_fused")
    raise ImportError(f"din_fused's compiled extension _C is missing or does not load ({e}); {_how}") from e
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
