"""nn.Modules: a drop-in for DeepCTR-Torch's AttentionSequencePoolingLayer, and Dice."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import din_attention
from .reference import ACTIVATIONS, din_attention_ref


class Dice(nn.Module):
    """Dice activation (DIN paper): p = sigmoid(BN(x)), f = p*x + (1-p)*alpha*x.

    Same parameters and state-dict keys as DeepCTR-Torch's Dice: ``bn``
    (BatchNorm1d, eps 1e-8) and ``alpha`` ([C] for dim=2, [C, 1] for dim=3).
    Input [N, C] (dim=2) or [N, C, L]... as DeepCTR: dim=3 takes [B, L, C] and
    normalises over B and L.
    """

    def __init__(self, num_features: int, dim: int = 2, eps: float = 1e-8):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        self.dim = dim
        self.bn = nn.BatchNorm1d(num_features, eps=eps)
        self.alpha = nn.Parameter(torch.zeros((num_features,) if dim == 2 else (num_features, 1)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.dim:
            raise ValueError(f"Dice(dim={self.dim}) expects a {self.dim}-D input, got {tuple(x.shape)}")
        if self.dim == 2:
            p = torch.sigmoid(self.bn(x))
            return p * x + (1 - p) * self.alpha * x
        xt = x.transpose(1, 2)
        p = torch.sigmoid(self.bn(xt))
        return (p * xt + (1 - p) * self.alpha * xt).transpose(1, 2)


def _activation_module(name: str, width: int) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU()
    if name == "prelu":
        return nn.PReLU()
    if name == "dice":
        return Dice(width, dim=3)
    raise ValueError(f"att_activation must be one of {ACTIVATIONS}, got {name!r}")


class _DNN(nn.Module):
    # Mirrors deepctr_torch.layers.core.DNN so that state-dict keys match.
    def __init__(self, in_dim: int, hidden_units, activation: str):
        super().__init__()
        dims = [in_dim, *hidden_units]
        self.linears = nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(hidden_units)))
        self.activation_layers = nn.ModuleList(_activation_module(activation, h) for h in hidden_units)


class _LocalActivationUnit(nn.Module):
    # Mirrors deepctr_torch.layers.core.LocalActivationUnit (dnn + dense).
    def __init__(self, hidden_units, embedding_dim: int, activation: str):
        super().__init__()
        self.dnn = _DNN(4 * embedding_dim, hidden_units, activation)
        self.dense = nn.Linear(hidden_units[-1], 1)


class FusedDINAttention(nn.Module):
    """DIN attention pooling, a drop-in for DeepCTR-Torch's AttentionSequencePoolingLayer.

    Same constructor arguments and state-dict keys; ``from_deepctr`` converts a
    layer one to one.  Extras: ``weight_normalization`` may also be "none" /
    "softmax", ``scale`` multiplies the scores before the softmax, and
    ``impl="reference"`` runs the pure-PyTorch oracle with the same parameters.

    forward(query, keys, keys_length, mask=None):
        query [B, 1, E] -> [B, 1, E]   (or [B, E] -> [B, E])
        keys [B, T, E]; keys_length [B] or [B, 1] int (ignored when supports_masking);
        mask [B, T] bool (required when supports_masking, optional otherwise).
        With return_score: [B, 1, T] (or [B, T]) weights, zero at padding.
    """

    def __init__(self, embedding_dim: int = 4, att_hidden_units=(80, 40), att_activation: str = "sigmoid",
                 weight_normalization=False, return_score: bool = False, supports_masking: bool = False,
                 scale: float = 1.0, impl: str = "fused", **kwargs):
        super().__init__()
        hidden = tuple(int(h) for h in att_hidden_units)
        if not 1 <= len(hidden) <= 4 or not all(1 <= h <= 256 for h in hidden):
            raise ValueError(f"att_hidden_units must have 1..4 widths in 1..256, got {att_hidden_units}")
        if isinstance(weight_normalization, str):
            if weight_normalization not in ("none", "softmax"):
                raise ValueError(f"weight_normalization must be a bool, 'none' or 'softmax', "
                                 f"got {weight_normalization!r}")
            self.normalization = weight_normalization
        else:
            self.normalization = "softmax" if weight_normalization else "none"
        if impl not in ("fused", "reference"):
            raise ValueError(f"impl must be 'fused' or 'reference', got {impl!r}")
        self.embedding_dim = int(embedding_dim)
        self.att_hidden_units = hidden
        self.activation = att_activation.lower()
        self.weight_normalization = self.normalization == "softmax"
        self.return_score = return_score
        self.supports_masking = supports_masking
        self.scale = float(scale)
        self.impl = impl
        self.local_att = _LocalActivationUnit(hidden, self.embedding_dim, self.activation)

    @classmethod
    def from_deepctr(cls, layer: nn.Module, **kwargs) -> FusedDINAttention:
        """Build from a deepctr_torch AttentionSequencePoolingLayer with the same
        weights, buffers, mode, device and dtype."""
        dnn = layer.local_att.dnn
        acts = {type(a).__name__.lower() for a in dnn.activation_layers}
        if len(acts) != 1 or not acts <= set(ACTIVATIONS):
            raise ValueError(f"unsupported DeepCTR activation layers: {sorted(acts)}")
        if getattr(dnn, "use_bn", False) or getattr(dnn, "dropout_rate", 0):
            raise ValueError("DeepCTR layers with use_bn or dropout in the attention unit are not supported")
        ref = dnn.linears[0].weight
        mod = cls(embedding_dim=dnn.linears[0].in_features // 4,
                  att_hidden_units=[lin.out_features for lin in dnn.linears],
                  att_activation=acts.pop(), weight_normalization=layer.weight_normalization,
                  return_score=layer.return_score, supports_masking=layer.supports_masking, **kwargs)
        mod.to(device=ref.device, dtype=ref.dtype)
        mod.load_state_dict(layer.state_dict(), strict=True)
        mod.train(layer.training)
        return mod

    def _params(self) -> dict:
        dnn, act = self.local_att.dnn, self.activation
        p = {"weights": [lin.weight for lin in dnn.linears] + [self.local_att.dense.weight],
             "biases": [lin.bias for lin in dnn.linears] + [self.local_att.dense.bias],
             "activation": act}
        if act == "prelu":
            p["alphas"] = [a.weight for a in dnn.activation_layers]
        if act == "dice":
            layers = list(dnn.activation_layers)
            p["alphas"] = [a.alpha for a in layers]
            p["bn_weights"] = [a.bn.weight for a in layers]
            p["bn_biases"] = [a.bn.bias for a in layers]
            p["running_means"] = [a.bn.running_mean for a in layers]
            p["running_vars"] = [a.bn.running_var for a in layers]
            p["eps"] = layers[0].bn.eps
            p["momentum"] = layers[0].bn.momentum
        return p

    def forward(self, query: Tensor, keys: Tensor, keys_length: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        squeeze = query.dim() == 3
        if squeeze:
            if query.shape[1] != 1:
                raise ValueError(f"query must have shape [B, 1, E] or [B, E], got {tuple(query.shape)}")
            query = query[:, 0]
        if keys.dim() == 3 and keys.shape[-1] != self.embedding_dim:
            raise ValueError(f"keys have embedding dim {keys.shape[-1]} but the module was built "
                             f"with embedding_dim={self.embedding_dim}")
        lengths = None
        if self.supports_masking:
            if mask is None:
                raise ValueError("supports_masking=True: forward needs mask [B, T]")
        else:
            if keys_length is None:
                raise ValueError("keys_length [B] or [B, 1] is required unless supports_masking=True")
            if keys_length.dim() == 2 and keys_length.shape[1] == 1:
                keys_length = keys_length[:, 0]
            lengths = keys_length
        if mask is not None and mask.dim() == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]  # DeepCTR passes masks as [B, 1, T] in places
        p = self._params()
        momentum = p.pop("momentum", 0.1)
        eps = p.pop("eps", 1e-8)
        if self.impl == "fused":
            training = self.training and self.activation == "dice"
            out, w = din_attention(query, keys, lengths, mask, normalization=self.normalization,
                                   scale=self.scale, training=training, momentum=momentum, eps=eps,
                                   return_scores=True, **p)
        else:
            out, w = din_attention_ref(query, keys, lengths, mask, normalization=self.normalization,
                                       scale=self.scale, training=self.training, momentum=momentum,
                                       eps=eps, return_scores=True, **p)
        if self.activation == "dice" and self.training:
            for a in self.local_att.dnn.activation_layers:
                a.bn.num_batches_tracked.add_(1)
        res = w if self.return_score else out
        return res[:, None, :] if squeeze else res

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, att_hidden_units={self.att_hidden_units}, "
                f"att_activation={self.activation!r}, normalization={self.normalization!r}, "
                f"scale={self.scale}, impl={self.impl!r}")
