"""The activation-unit parameters as one bundle, the Python mirror of the
parameter block of ``csrc/din_params.h``.

Every entry point (functional, modules, the padded and the jagged op wrappers)
builds one ``MLPParams`` and validates it with ``check_params``; the custom ops
themselves take the flat lists (``op_args``), because torch.library schemas
hold tensors and lists, not Python objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .reference import ACTIVATIONS

MAX_LAYERS = 4
MAX_WIDTH = 256
# The per-layer lists beyond weights and biases, in the ops' argument order, and those each
# activation uses (the others it ignores, and the ops take them empty).
OPTIONAL_LISTS = ("alphas", "bn_weights", "bn_biases", "running_means", "running_vars")
USED_LISTS = {"sigmoid": (), "relu": (), "prelu": OPTIONAL_LISTS[:1], "dice": OPTIONAL_LISTS}


def _as_list(seq) -> list:
    return [] if seq is None else list(seq)


@dataclass
class MLPParams:
    """The L hidden nn.Linear layers and the output layer of the activation unit.

    weights[0] [H1, 4D] over [q, k, q-k, q*k], weights[l] [H_{l+1}, H_l],
    weights[L] [1, H_L]; biases likewise ([H_l], [1]).  activation "sigmoid" |
    "relu" | "prelu" (alphas[l]: 1 or H_l values) | "dice" (alphas, bn_weights,
    bn_biases, running_means, running_vars: H_l values per layer; momentum and eps
    of its BatchNorm, momentum None meaning a cumulative average as in
    nn.BatchNorm1d, which training then refuses: the caller who counts batches passes
    1/num_batches).  Lists an activation does not use are ignored.
    """

    weights: list[Tensor]
    biases: list[Tensor]
    activation: str = "sigmoid"
    alphas: list[Tensor] | None = None
    bn_weights: list[Tensor] | None = None
    bn_biases: list[Tensor] | None = None
    running_means: list[Tensor] | None = None
    running_vars: list[Tensor] | None = None
    momentum: float | None = 0.1
    eps: float = 1e-8

    @property
    def num_layers(self) -> int:
        return len(self.weights) - 1

    @property
    def hidden(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    def op_args(self) -> tuple:
        """(weights, biases, alphas, bn_weights, bn_biases, running_means, running_vars) as
        the lists the custom ops take: empty for what the activation does not use."""
        used = USED_LISTS.get(self.activation, ())
        return (list(self.weights), list(self.biases),
                *(_as_list(getattr(self, name)) if name in used else [] for name in OPTIONAL_LISTS))

    def update_running_stats(self, stats: Tensor) -> None:
        """Training-mode Dice: fold the batch statistics of the op ([L, 3, Hmax]: mean,
        invstd, unbiased var) into running_means/running_vars in place."""
        factor = float(self.momentum)
        with torch.no_grad():
            for l, (rm, rv) in enumerate(zip(self.running_means, self.running_vars)):
                h = rm.numel()
                rm.mul_(1 - factor).add_(stats[l, 0, :h].reshape(rm.shape).to(rm.dtype), alpha=factor)
                rv.mul_(1 - factor).add_(stats[l, 2, :h].reshape(rv.shape).to(rv.dtype), alpha=factor)


def check_params(p: MLPParams, dim: int, device: torch.device, *, running_stats: bool = True) -> None:
    """Shapes, dtypes and devices of a parameter bundle for inputs of width ``dim`` on
    ``device``; raises ValueError/TypeError naming the argument.  running_stats=False: the
    caller takes no running statistics (the backward ops), so Dice's are not checked."""
    if p.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {p.activation!r}")
    weights, biases = p.weights, p.biases
    if not isinstance(weights, Sequence) or not isinstance(biases, Sequence):
        raise TypeError("weights and biases must be sequences of tensors")
    L = len(weights) - 1
    if not 1 <= L <= MAX_LAYERS:
        raise ValueError(f"weights must hold 1..{MAX_LAYERS} hidden layers plus the output layer, "
                         f"got {len(weights)} matrices")
    if len(biases) != L + 1:
        raise ValueError(f"biases must have {L + 1} entries (one per Linear), got {len(biases)}")
    fan_in = 4 * dim
    on_cpu = device.type == "cpu"  # t.is_cpu is much cheaper than building t.device
    for l, (w, b) in enumerate(zip(weights, biases)):
        # Argument names are formatted only for an error: this runs on every call.
        for kind, t in (("weights", w), ("biases", b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{kind}[{l}] must be a torch.Tensor, got {type(t).__name__}")
        wshape = w.shape
        out = 1 if l == L else (wshape[0] if len(wshape) == 2 else -1)
        if l < L and not 1 <= out <= MAX_WIDTH:
            raise ValueError(f"hidden layer {l} width must be in 1..{MAX_WIDTH}, got weights[{l}] "
                             f"of shape {tuple(wshape)}")
        if wshape != (out, fan_in):
            raise ValueError(f"weights[{l}] must have shape [{out}, {fan_in}], got {tuple(wshape)}")
        if b.shape != (out,):
            raise ValueError(f"biases[{l}] must have shape [{out}], got {tuple(b.shape)}")
        for kind, t in (("weights", w), ("biases", b)):
            if not t.is_floating_point():
                raise TypeError(f"{kind}[{l}] must be floating point, got {t.dtype}")
            if not (t.is_cpu if on_cpu else t.device == device):
                raise ValueError(f"{kind}[{l}] is on {t.device} but the inputs are on {device}")
        fan_in = out
    hidden = p.hidden
    if p.activation == "dice" and p.momentum is not None and not isinstance(p.momentum, (int, float)):
        raise TypeError(f"momentum must be a float or None, got {type(p.momentum).__name__}")
    per_layer = [(name, getattr(p, name)) for name in USED_LISTS[p.activation]
                 if running_stats or not name.startswith("running_")]
    for name, seq in per_layer:
        if seq is None or len(seq) != L:
            got = "None" if seq is None else f"{len(seq)} entries"
            raise ValueError(f"{p.activation} needs {name} with one tensor per hidden layer ({L}), got {got}")
        for l, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{l}] must be a torch.Tensor, got {type(t).__name__}")
            n = t.numel()
            ok = n == hidden[l] or (name == "alphas" and p.activation == "prelu" and n == 1)
            if not ok or not t.is_floating_point():
                raise ValueError(f"{name}[{l}] must be a float tensor with {hidden[l]} elements"
                                 f"{' (or 1 for prelu)' if name == 'alphas' else ''}, "
                                 f"got shape {tuple(t.shape)} dtype {t.dtype}")
            if not (t.is_cpu if on_cpu else t.device == device):
                raise ValueError(f"{name}[{l}] is on {t.device} but the inputs are on {device}")
