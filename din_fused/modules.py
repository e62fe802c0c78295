"""nn.Modules: a drop-in for DeepCTR-Torch's AttentionSequencePoolingLayer, and Dice."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as _fwAD

from . import ops
from .functional import din_attention_jagged_p, din_attention_p
from .params import MLPParams
from .reference import ACTIVATIONS, din_attention_ref, tile_jagged


def _ref_kwargs(p: MLPParams) -> dict:
    """The bundle as din_attention_ref's keyword arguments."""
    return dict(weights=p.weights, biases=p.biases, activation=p.activation, alphas=p.alphas,
                bn_weights=p.bn_weights, bn_biases=p.bn_biases, running_means=p.running_means,
                running_vars=p.running_vars, momentum=p.momentum, eps=p.eps)


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


# Bumped whenever any nn.Module registers a parameter, buffer or submodule: the
# modules' cached parameter bundles are then rebuilt (FusedDINAttention._params).
_GENERATION = [0]


def _bump_generation(*_args):
    _GENERATION[0] += 1


for _hook in ("register_module_parameter_registration_hook", "register_module_buffer_registration_hook",
              "register_module_module_registration_hook"):
    getattr(torch.nn.modules.module, _hook)(_bump_generation)


def _is_torchrec_jagged(x) -> bool:
    # By name, so that din_fused never imports torchrec (an optional extra).
    t = type(x)
    return t.__name__ == "JaggedTensor" and t.__module__.startswith("torchrec")


class FusedDINAttention(nn.Module):
    """DIN attention pooling, a drop-in for DeepCTR-Torch's AttentionSequencePoolingLayer.

    Same constructor arguments and state-dict keys; ``from_deepctr`` converts a
    layer one to one.  Extras: ``weight_normalization`` may also be "none" /
    "softmax", ``scale`` multiplies the scores before the softmax, and
    ``impl="reference"`` runs the pure-PyTorch oracle with the same parameters.

    forward(query, keys, keys_length, mask=None):
        query [B, 1, E] -> [B, 1, E]   (or [B, E] -> [B, E])
        keys [B, T, E]; keys_length [B] or [B, 1] int, or float holding whole numbers, values
        above T meaning T as in DeepCTR (ignored when supports_masking);
        mask [B, T] bool (required when supports_masking, optional otherwise).
        With return_score: [B, 1, T] (or [B, T]) weights, zero at padding.
    forward(query, keys) with keys a torch.nested jagged tensor [B, j, E], and
    forward(query, values, offsets=..., row_seq=...) for jagged/shared histories: see forward.
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
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
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
        """Build from a deepctr_torch AttentionSequencePoolingLayer, sharing its Parameter
        objects, buffers and BatchNorm modules (so momentum and eps carry over, and an
        optimizer built on the DeepCTR model, e.g. by ``model.compile``, trains the new
        module); mode, device and dtype are the layer's."""
        dnn = layer.local_att.dnn
        acts = {type(a).__name__.lower() for a in dnn.activation_layers}
        if len(acts) != 1 or not acts <= set(ACTIVATIONS):
            raise ValueError(f"unsupported DeepCTR activation layers: {sorted(acts)}")
        if getattr(dnn, "use_bn", False) or getattr(dnn, "dropout_rate", 0):
            raise ValueError("DeepCTR layers with use_bn or dropout in the attention unit are not supported")
        act = acts.pop()
        mod = cls(embedding_dim=dnn.linears[0].in_features // 4,
                  att_hidden_units=[lin.out_features for lin in dnn.linears],
                  att_activation=act, weight_normalization=layer.weight_normalization,
                  return_score=layer.return_score, supports_masking=layer.supports_masking, **kwargs)
        ours = mod.local_att
        ours.dnn.linears = dnn.linears
        ours.dense = layer.local_att.dense
        if act == "prelu":
            ours.dnn.activation_layers = dnn.activation_layers
        elif act == "dice":
            for mine, theirs in zip(ours.dnn.activation_layers, dnn.activation_layers):
                if theirs.alpha.shape != mine.alpha.shape:
                    raise ValueError(f"DeepCTR Dice alpha of shape {tuple(theirs.alpha.shape)} is not the "
                                     f"attention unit's [{mine.alpha.shape[0]}, 1] (dice_dim=3)")
                mine.bn = theirs.bn
                mine.alpha = theirs.alpha
        missing = set(layer.state_dict()) ^ set(mod.state_dict())
        if missing:
            raise ValueError(f"DeepCTR layer and FusedDINAttention state dicts differ: {sorted(missing)}")
        mod.train(layer.training)
        return mod

    def _params(self) -> MLPParams:
        """The parameters as one bundle.  Training-mode Dice with BatchNorm momentum None
        (a cumulative average, as nn.BatchNorm1d) uses 1/num_batches_tracked, so call it
        after counting the batch.

        The bundle holds the Parameter and buffer objects themselves, so in-place updates,
        optimizer steps and ``.to()`` (which swaps ``.data``) show through it; it is rebuilt
        after any module anywhere registers a parameter, buffer or submodule (assignment,
        ``load_state_dict(assign=True)``, swapping a layer), which bumps _GENERATION, and
        whenever a slot no longer holds its tensor (torch.func.functional_call and non-strict
        torch.export swap ``_parameters`` entries without registering)."""
        cached = self.__dict__.get("_bundle")
        if torch.compiler.is_compiling():
            # Traced once, so nothing to cache (and torch 2.4's dynamo cannot trace the write).
            cached = (None, self._build_params(), None, self._dice_bns())
        elif cached is None or cached[0] != _GENERATION[0] or any(d.get(n) is not t for d, n, t in cached[2]):
            slots = self._param_slots()
            # (the BatchNorms too: replacing one registers a module, which bumps _GENERATION)
            cached = (_GENERATION[0], self._build_params(), slots, self._dice_bns())
            self.__dict__["_bundle"] = cached
        p, bns = cached[1], cached[3]
        if p.activation == "dice":
            bn = bns[0]
            for layer, other in enumerate(bns[1:], 1):
                if other.eps != bn.eps or other.momentum != bn.momentum:
                    raise ValueError(
                        f"Dice layers must share one BatchNorm eps and momentum (the fused op takes one "
                        f"of each): layer 0 has eps={bn.eps}, momentum={bn.momentum}, layer {layer} has "
                        f"eps={other.eps}, momentum={other.momentum}")
            p.eps = bn.eps
            p.momentum = bn.momentum
            if bn.momentum is None:
                p.momentum = 1.0 / max(int(bn.num_batches_tracked), 1)
        return p

    def _dice_bns(self) -> list:
        """Dice: every layer's BatchNorm; the bundle carries the eps and momentum they share."""
        if self.activation != "dice":
            return []
        return [a.bn for a in self.local_att.dnn.activation_layers]

    def _param_slots(self) -> list:
        """(owner's _parameters or _buffers dict, name, tensor) for every tensor of the bundle."""
        dnn = self.local_att.dnn
        mods = [(lin, n) for lin in [*dnn.linears, self.local_att.dense] for n in ("weight", "bias")]
        if self.activation == "prelu":
            mods += [(a, "weight") for a in dnn.activation_layers]
        if self.activation == "dice":
            for a in dnn.activation_layers:
                mods += [(a, "alpha")]
                mods += [(a.bn, n) for n in ("weight", "bias", "running_mean", "running_var")]
        return [(m._parameters if n in m._parameters else m._buffers, n, getattr(m, n)) for m, n in mods]

    def _build_params(self) -> MLPParams:
        dnn, act = self.local_att.dnn, self.activation
        p = MLPParams([lin.weight for lin in dnn.linears] + [self.local_att.dense.weight],
                      [lin.bias for lin in dnn.linears] + [self.local_att.dense.bias], act)
        if act == "prelu":
            p.alphas = [a.weight for a in dnn.activation_layers]
        if act == "dice":
            layers = list(dnn.activation_layers)
            p.alphas = [a.alpha for a in layers]
            p.bn_weights = [a.bn.weight for a in layers]
            p.bn_biases = [a.bn.bias for a in layers]
            p.running_means = [a.bn.running_mean for a in layers]
            p.running_vars = [a.bn.running_var for a in layers]
        return p

    def _lengths(self, keys_length, T: int) -> Tensor:
        # DeepCTR-Torch compatibility: keys_length [B] or [B, 1], integer or float holding
        # whole numbers; values above T mean "all T positions" (DeepCTR's mask
        # arange(T) < length), so they are clamped to T.
        if not isinstance(keys_length, Tensor):
            raise TypeError(f"keys_length must be a torch.Tensor of shape [B] or [B, 1], "
                            f"got {type(keys_length).__name__}")
        if keys_length.dim() == 2 and keys_length.shape[1] == 1:
            keys_length = keys_length.squeeze(1)
        if keys_length.is_floating_point():
            if not torch.compiler.is_compiling():
                # NaN fails both tests; -inf is whole but negative, and +inf means all T positions
                bad = ~(keys_length >= 0) | (keys_length != keys_length.round())
                if bool(bad.any()):
                    v = keys_length[bad][0].item()
                    if v == float("-inf") or (math.isfinite(v) and v == int(v)):
                        raise ValueError(f"keys_length must be >= 0, got {v}")
                    raise TypeError(f"keys_length is a float tensor with a value that is not a whole "
                                    f"number ({v}); lengths must be whole numbers")
            else:  # a traced graph cannot branch on values: it asserts them when it runs
                torch._assert_async(((keys_length >= 0) & (keys_length == keys_length.round())).all(),
                                    "keys_length must hold whole numbers >= 0")
            # Clamped before the cast, which would wrap 1e30 or inf to a negative int64.
            keys_length = keys_length.clamp(max=T).to(torch.int64)
        elif keys_length.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"keys_length must be an integer tensor (or float holding whole numbers), "
                            f"got {keys_length.dtype}")
        return keys_length.clamp(max=T)

    def forward(self, query: Tensor, keys: Tensor, keys_length: Tensor | None = None,
                mask: Tensor | None = None, *, offsets: Tensor | None = None,
                row_seq: Tensor | None = None):
        """Padded: query [B, 1, E] (or [B, E]), keys [B, T, E], keys_length [B] / [B, 1] or
        mask [B, T] -> [B, 1, E] (or [B, E]); with return_score the weights [B, 1, T] (or [B, T]).

        Jagged: keys a torch.nested tensor with layout=torch.jagged of shape [B, j, E]
        (keys_length and mask not given) -> the same output as for its padded form; with
        return_score the weights as a nested jagged tensor [B, j].

        TorchRec: keys a torchrec.JaggedTensor (values [N, E], one sequence per row, or S
        sequences with row_seq) is the explicit call with its values() and offsets().

        Explicit jagged/shared: keys = values [N, E], offsets [S+1], row_seq [R] or None
        (see din_attention_jagged), query [R, 1, E] (or [R, E]) -> [R, 1, E] (or [R, E]);
        with return_score (w, row_offsets): w [row_offsets[R]], row r's weights at
        w[row_offsets[r]:row_offsets[r+1]].
        """
        if mask is None and (keys_length is None) != (offsets is None):
            fast = self._small_inference(query, keys, keys_length, offsets, row_seq)
            if fast is not None:
                return fast
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor of shape [B, 1, E] or [B, E], got "
                            f"{type(query).__name__}")
        squeeze = query.dim() == 3
        if squeeze and query.shape[1] != 1:
            raise ValueError(f"query must have shape [B, 1, E] or [B, E], got {tuple(query.shape)}")
        if _is_torchrec_jagged(keys):
            if offsets is not None:
                raise ValueError("a torchrec JaggedTensor carries its offsets: do not pass offsets")
            keys, offsets = keys.values(), keys.offsets()
        elif not isinstance(keys, Tensor):
            extra = " (a KeyedJaggedTensor holds several features: pass one, kjt[key])" \
                if type(keys).__name__ == "KeyedJaggedTensor" else ""
            raise TypeError(f"keys must be a torch.Tensor ([B, T, E], values [N, E] with offsets, or a "
                            f"jagged nested tensor) or a torchrec JaggedTensor, got {type(keys).__name__}"
                            f"{extra}")
        if keys.is_nested and keys.layout != torch.jagged:  # (a strided one has no shape to read)
            raise ValueError("nested keys must have layout=torch.jagged, got a torch.strided nested tensor")
        if keys.shape[-1] != self.embedding_dim:
            raise ValueError(f"keys have embedding dim {keys.shape[-1]} but the module was built "
                             f"with embedding_dim={self.embedding_dim}")
        nested = keys.is_nested
        if nested or offsets is not None:
            return self._forward_jagged(query, keys, offsets, row_seq, keys_length, mask, nested)
        if row_seq is not None:
            raise ValueError("row_seq needs offsets (and keys given as values [N, E])")
        lengths = None
        if self.supports_masking:
            if mask is None:
                raise ValueError("supports_masking=True: forward needs mask [B, T]")
        else:
            if keys_length is None:
                raise ValueError("keys_length [B] or [B, 1] is required unless supports_masking=True")
            lengths = self._lengths(keys_length, keys.shape[1] if keys.dim() == 3 else 0)
            if self.impl != "fused" and keys.dim() == 3 and not torch.compiler.is_compiling():
                # The fused op refuses negative lengths (in its kernel); so does its twin here, which
                # would otherwise pool them to zero.
                ops._check_lengths_values(lengths, keys.shape[1])
        if mask is not None and mask.dim() == 3 and mask.shape[1] == 1:
            mask = mask[:, 0]  # DeepCTR passes masks as [B, 1, T] in places
        p = self._count_batch_and_params()
        if self.impl == "fused":  # both take the query as it is ([B, 1, E] included), out alike
            out, w = din_attention_p(query, keys, lengths, mask, params=p, normalization=self.normalization,
                                     scale=self.scale, training=self._dice_training(), return_scores=True)
        else:
            out, w = din_attention_ref(query, keys, lengths, mask, normalization=self.normalization,
                                       scale=self.scale, training=self.training, return_scores=True,
                                       **_ref_kwargs(p))
        if self.return_score:
            return w.unsqueeze(1) if squeeze else w
        return out

    def _small_inference(self, query, keys, keys_length, offsets, row_seq):
        """The forward of an eager inference call (no_grad, eval, CPU, plain contiguous tensors,
        int64 lengths/offsets/row_seq), padded (keys [B, T, E], keys_length) or
        jagged (keys = values [N, E], offsets, row_seq), through a cached ops.InferencePlan: the
        same kernel call with the parameter checks and the static params dict built once, for
        serving-sized calls whose Python would otherwise cost more than the kernel.  None when
        any of that does not hold: the general path then runs, with every check and its errors."""
        # (no_grad does not turn forward-mode AD off: a dual level goes the general way, which
        # refuses dual inputs instead of dropping their tangents.)
        if torch.is_grad_enabled() or self.training or self.impl != "fused" or self.supports_masking \
                or getattr(ops._C, "emulates_cuda", False) or _fwAD._current_level >= 0:
            return None
        jagged = offsets is not None
        if not jagged and row_seq is not None:
            return None
        idx = [offsets] + ([] if row_seq is None else [row_seq]) if jagged else [keys_length]
        if type(query) is not Tensor or type(keys) is not Tensor or any(type(t) is not Tensor for t in idx) \
                or not ops.plain_eager():
            return None
        qd = query.dim()
        if keys.dim() != (2 if jagged else 3) or not (qd == 2 or (qd == 3 and query.shape[1] == 1)):
            return None
        R, D = query.shape[0], keys.shape[-1]
        if D != self.embedding_dim or query.shape[-1] != D or (jagged and self.return_score):
            return None
        if jagged:
            shapes_ok = offsets.dim() == 1 and offsets.shape[0] >= 1
            if shapes_ok and row_seq is None:
                shapes_ok = offsets.shape[0] - 1 == R
            elif shapes_ok:
                shapes_ok = row_seq.dim() == 1 and row_seq.shape[0] == R
        else:
            shapes_ok = keys.shape[0] == R and R > 0 and keys.shape[1] > 0 and keys_length.numel() == R \
                and (keys_length.dim() == 1 or (keys_length.dim() == 2 and keys_length.shape[1] == 1))
        dtype = keys.dtype
        if not shapes_ok or dtype not in (torch.float32, torch.float64) or query.dtype != dtype \
                or any(t.dtype != torch.int64 for t in idx) \
                or not all(t.is_cpu and t.is_contiguous() and not t.is_neg() for t in (query, keys, *idx)):
            return None
        params = self._params()
        plan = self.__dict__.get("_plan")
        key = (D, dtype, self.normalization, self.scale)
        if plan is None or plan[0] is not params or plan[1].key != key or not plan[1].valid():
            plan = (params, ops.InferencePlan(params, D, dtype, self.normalization, self.scale))
            self.__dict__["_plan"] = plan
        if not plan[1].ok:
            return None
        if jagged:
            return plan[1].forward_jagged(query, keys, offsets, row_seq)
        out, w = plan[1].forward(query, keys, keys_length)
        if self.return_score:
            return w.unsqueeze(1) if qd == 3 else w
        return out

    def _forward_jagged(self, query, keys, offsets, row_seq, keys_length, mask, nested):
        if keys_length is not None or mask is not None:
            raise ValueError("jagged keys carry their lengths: do not pass keys_length or mask")
        if nested:
            if keys.layout != torch.jagged or offsets is not None or row_seq is not None:
                raise ValueError("nested keys must have layout=torch.jagged, without offsets/row_seq")
            values, offsets = keys.values(), keys.offsets()
            if keys.lengths() is not None:
                # A view with holes (torch.nested.narrow): row i is values[offsets[i] + [0, lengths[i])),
                # not values[offsets[i]:offsets[i+1]].  Its rows are gathered back to back (a gather
                # rather than keys.contiguous(), whose backward torch cannot take for such a view).
                lengths = keys.lengths().to(offsets.dtype)
                packed = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                shift = torch.repeat_interleave(offsets[:-1] - packed[:-1], lengths)
                values = values.index_select(0, torch.arange(shift.shape[0], device=shift.device) + shift)
                offsets = packed
        else:
            values = keys
        p = self._count_batch_and_params()
        if self.impl == "fused":
            # The weights only when returned: their row offsets (a cumsum of the lengths) would
            # make torch.export guard the row and sequence counts against 1 (din_fused.serving).
            # The query goes in as it is ([R, 1, E] included) and out comes back alike, as in the
            # reference below.
            res = din_attention_jagged_p(
                query, values, offsets, row_seq, params=p, normalization=self.normalization, scale=self.scale,
                training=self._dice_training(), return_scores=self.return_score)
            if not self.return_score:
                return res
            out, w, row_offsets = res
        else:
            kp, lengths = tile_jagged(values, offsets, row_seq)
            out, wp = din_attention_ref(query, kp, lengths, normalization=self.normalization,
                                        scale=self.scale, training=self.training, return_scores=True,
                                        **_ref_kwargs(p))
            w = wp[torch.arange(kp.shape[1], device=kp.device)[None, :] < lengths[:, None]]
            row_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        if not self.return_score:
            return out
        if nested:
            return torch.nested.nested_tensor_from_jagged(w, row_offsets)
        return w, row_offsets

    def _dice_training(self) -> bool:
        return self.training and self.activation == "dice"

    def _count_batch_and_params(self) -> MLPParams:
        # nn.BatchNorm1d counts the batch before it uses the count (momentum None).
        if self._dice_training():
            for a in self.local_att.dnn.activation_layers:
                a.bn.num_batches_tracked.add_(1)
        return self._params()

    def extra_repr(self) -> str:
        return (f"embedding_dim={self.embedding_dim}, att_hidden_units={self.att_hidden_units}, "
                f"att_activation={self.activation!r}, normalization={self.normalization!r}, "
                f"scale={self.scale}, impl={self.impl!r}")
