"""The fused ops: torch.library custom ops with fake implementations and registered
backwards, over the raw-pointer kernels in ``din_fused._C``.

Python owns allocation, validation and autograd; ``_C`` only sees pointers,
sizes and the current CUDA stream.  The ops are opaque to torch.compile, so the
data-dependent checks (length ranges, offsets) live here, in the real implementations.

Op signatures (all tensors are on one device; the parameter lists are MLPParams.op_args()):
    din_fused::din_fwd(query [B,D], keys [B,T,D], lengths int64 [B], mask bool [B,T]?,
                       weights[L+1], biases[L+1], alphas[], bn_weights[], bn_biases[],
                       running_means[], running_vars[], activation, normalization, scale,
                       training, eps)
      -> out [B,D] (query dtype), scores [B,T] (accumulation dtype), stats [L,3,Hmax]
    din_fused::din_jagged_fwd(query [R,D], values [N,D], offsets [S+1] int, row_seq [R] int?,
                       <the same parameters and attributes>)
      -> out [R,D], weights [sum_r len(row r)] (accumulation dtype, row by row), stats
    stats rows: mean, 1/sqrt(var+eps), unbiased var of the Dice BatchNorm statistics in
    use (batch statistics in training, running ones in eval; zeros for other
    activations).
"""

from __future__ import annotations

import inspect
import numbers
import os
import threading
import typing
import weakref

import torch
import torch._C._functorch as _functorch
from torch import Tensor

from . import _C
from .params import OPTIONAL_LISTS, USED_LISTS, MLPParams, check_params
from .reference import ACTIVATIONS, NORMALIZATIONS

_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
_NORM_CODE = {name: i for i, name in enumerate(NORMALIZATIONS)}
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# --------------------------------------------------------------------------------------
# Validation: written once, called by every public entry point (padded and jagged).
# --------------------------------------------------------------------------------------
def _check_float_inputs(query: Tensor, keys: Tensor, keys_name: str, keys_shape: str,
                        query_3d: bool = False) -> None:
    """query [R, D] (or [R, 1, D] with query_3d) and the keys tensor (keys [B, T, D] or
    values [N, D]): float, one dtype, one device, the same D."""
    for name, t in (("query", query), (keys_name, keys)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if keys.dim() != len(keys_shape.split(",")):
        raise ValueError(f"{keys_name} must have shape [{keys_shape}], got {tuple(keys.shape)}")
    D = keys.shape[-1]
    if D == 0:
        raise ValueError(f"{keys_name} must have shape [{keys_shape}] with D >= 1, got {tuple(keys.shape)}")
    if query.dim() != 2 and not (query_3d and query.dim() == 3 and query.shape[1] == 1):
        raise ValueError(f"query must have shape [R, D]{' or [R, 1, D]' if query_3d else ''} with D = {D}, "
                         f"got {tuple(query.shape)}")
    if query.shape[-1] != D:
        raise ValueError(f"query has dim {query.shape[-1]} but {keys_name} has dim {D}")
    if query.dtype != keys.dtype:
        raise TypeError(f"query ({query.dtype}) and {keys_name} ({keys.dtype}) must have the same dtype")
    if query.device != keys.device:
        raise ValueError(f"query is on {query.device} but {keys_name} is on {keys.device}")


def _check_index(name: str, t, shape: tuple, device) -> None:
    """An int32/int64 index tensor (lengths, offsets, row_seq) of the given shape
    (None in shape: any size) on ``device``."""
    def want() -> str:  # built only for an error message
        return "[" + ", ".join("N" if n is None else str(n) for n in shape) + "]"

    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be an int32/int64 torch.Tensor of shape {want()}, "
                        f"got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != len(shape) or any(n is not None and n != m for n, m in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {want()}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {device}")


def _check_options(normalization, scale) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if isinstance(scale, Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a one-element tensor, got shape "
                             f"{tuple(scale.shape)}")
        if scale.requires_grad:
            raise TypeError("scale is a tensor that requires grad, but the fused op takes scale as a "
                            "constant and has no gradient for it; pass a float (or scale.detach()), or "
                            "use din_attention_ref to learn the temperature")
    elif not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or a one-element tensor, got {type(scale).__name__}")


def check_inputs(query, keys, lengths, mask, params: MLPParams, normalization, scale=1.0, *,
                 running_stats: bool = True, query_3d: bool = False) -> None:
    """Padded layout: query [B, D] (or [B, 1, D] with query_3d), keys [B, T, D], lengths [B]
    int, mask [B, T] bool."""
    _check_float_inputs(query, keys, "keys", "B, T, D", query_3d)
    B, T, D = keys.shape
    if query.shape[0] != B:
        raise ValueError(f"query has batch {query.shape[0]} but keys has batch {B}")
    dev = keys.device
    if lengths is not None:
        _check_index("lengths", lengths, (B,), dev)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (B, T):
            raise ValueError(f"mask must have shape [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
        if mask.device != dev:
            raise ValueError(f"mask is on {mask.device} but keys is on {dev}")
    _check_options(normalization, scale)
    check_params(params, D, dev, running_stats=running_stats)


def check_jagged_inputs(query, values, offsets, row_seq, params: MLPParams, normalization, scale=1.0, *,
                        running_stats: bool = True, query_3d: bool = False) -> None:
    """Jagged layout: query [R, D] (or [R, 1, D] with query_3d), values [N, D], offsets [S+1]
    int, row_seq [R] int or None (then S == R).  The data-dependent checks are in
    _jagged_layout."""
    _check_float_inputs(query, values, "values", "N, D", query_3d)
    R, dev = query.shape[0], values.device
    _check_jagged_index(offsets, row_seq, R, dev)
    if row_seq is None and offsets.shape[0] - 1 != R:
        raise ValueError(f"without row_seq, offsets must have shape [R+1] = [{R + 1}] (row r uses "
                         f"sequence r), got {tuple(offsets.shape)}")
    _check_options(normalization, scale)
    check_params(params, values.shape[1], dev, running_stats=running_stats)


def _check_jagged_index(offsets, row_seq, R: int | None, device) -> None:
    """offsets [S+1] (S >= 0) and row_seq [R] (R None: any length) or None, int, on device."""
    _check_index("offsets", offsets, (None,), device)
    if offsets.shape[0] < 1:
        raise ValueError("offsets must have shape [S+1] with S >= 0 (at least the leading 0), got shape (0,)")
    if row_seq is not None:
        _check_index("row_seq", row_seq, (R,), device)


def _data_checks_off(t: Tensor) -> bool:
    # Data-dependent checks synchronise on CUDA, so they are skipped while a CUDA
    # graph is being captured (the kernels clamp lengths to [0, T] anyway).
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_lengths_values(lengths: Tensor, T: int) -> None:
    if lengths.numel() == 0 or _data_checks_off(lengths):
        return
    lo, hi = torch.aminmax(lengths)
    if int(lo) < 0 or int(hi) > T:
        raise ValueError(f"lengths must lie in [0, T] = [0, {T}], got values in [{int(lo)}, {int(hi)}]")


# --------------------------------------------------------------------------------------
# Building the params dict for _C
# --------------------------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(t: Tensor) -> torch.dtype:
    # CPU kernels compute in fp32/fp64; CUDA kernels read fp16/bf16 natively.
    if t.dtype == torch.float64:
        return torch.float64
    if t.is_cuda:
        return t.dtype
    return torch.float32


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, contiguous: t itself when it already is (the common case costs two
    attribute reads, not the views and copies of detach().to().contiguous())."""
    if t.dtype == dtype and t.is_contiguous() and not t.is_neg():
        return t
    # A negative view (torch._neg_view, x.conj().imag) shares x's memory with a flag that says
    # "negate": the kernels read memory, so it is materialised (contiguous() keeps the flag).
    return t.detach().to(dtype).resolve_neg().contiguous()


def _to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _split_params(flat, sizes) -> list[list]:
    """Flat weights, biases, alphas, bn_weights, bn_biases (or their gradients) back into
    the five lists; sizes = (n weights, n alphas, n bn layers), as _setup_context keeps."""
    nw, na, nb = sizes
    out, i = [], 0
    for n in (nw, nw, na, nb, nb):
        out.append(list(flat[i:i + n]))
        i += n
    return out


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _ptrs(ts) -> list:
    return [t.data_ptr() for t in ts]


def _model_cfg(D, hidden, activation, normalization, scale, dtype, weights, biases, alphas, gammas=(),
               betas=()) -> dict:
    """The part of the kernels' params dict that describes the activation unit (the parameters
    in the kernels' layout: contiguous, accumulation dtype, alphas per channel)."""
    return {"dim": D, "hidden": hidden, "act": _ACT_CODE[activation], "norm": _NORM_CODE[normalization],
            "scale": float(scale), "dtype": _DTYPE_CODE[dtype], "W": _ptrs(weights), "b": _ptrs(biases),
            "alpha": _ptrs(alphas), "bn_gamma": _ptrs(gammas), "bn_beta": _ptrs(betas)}


# CUDA, rows sharing a sequence: the largest per-row key-gradient scratch used by default
# (see _Prepared.shared_dk_rows).
SHARED_DK_ROWS_MAX_BYTES = 1 << 30
# CPU, training-mode Dice: the largest pre-activation cache (see _Prepared.zcache).
ZCACHE_MAX_BYTES = 256 << 20


class _ThreadScratch(threading.local):
    buf: Tensor | None = None
    # Whose pre-activations buf holds, all layers of them: the _Ident of the call that
    # wrote them last, or None.  Whoever takes the buffer to write clears it.
    holds: _Ident | None = None


_scratch = _ThreadScratch()


def _cpu_scratch(nbytes: int) -> Tensor:
    """A CPU buffer of at least nbytes, kept per thread from call to call, for the caller
    to write.  A fresh tensor of tens of MB is new pages from the OS on every call (glibc
    maps them above 32 MB and unmaps them on free), and touching them cost as much as the
    cache saves; the buffer is only ever grown, to at most ZCACHE_MAX_BYTES.
    release_scratch() gives it back."""
    _scratch.holds = None
    buf = _scratch.buf
    if buf is None or buf.numel() < nbytes:
        _scratch.buf = None  # free the old one before the new one is allocated
        _scratch.buf = buf = torch.empty(nbytes, dtype=torch.uint8)
    return buf


def release_scratch() -> None:
    """Free this thread's kept CPU scratch (the training-mode Dice pre-activation cache)."""
    _scratch.buf = None
    _scratch.holds = None


class _Ident:
    """Who a filled pre-activation cache belongs to: the op arguments its contents depend
    on (tensors by object and version, held weakly: nothing is kept alive for it), the
    options, and the Dice statistics the forward computed.  A backward whose arguments
    match, on the same thread, with no din_fused call having taken the buffer since, finds
    the forward's pre-activations there, bitwise those it would recompute (the same
    kernels on the same inputs): the first reduction pass then skips every layer's GEMM.
    Any doubt (a tensor freed, modified in place or given other memory through .data,
    another ISA, the stats not the forward's) and it recomputes, as every backward did
    before.  Writes that bump no version counter (through .data, numpy, DLPack) cannot
    be seen, as autograd's own saved tensors cannot see them."""

    def __init__(self, tensors: list, options: tuple):
        self.refs = [None if t is None else (weakref.ref(t), self._where(t)) for t in tensors]
        self.options = (*options, os.environ.get("DIN_FUSED_CPU_ISA"))

    @staticmethod
    def _where(t: Tensor) -> tuple:
        return t._version, t.data_ptr(), t.shape, t.stride(), t.storage_offset()

    def matches(self, other: _Ident) -> bool:
        if self.options != other.options or len(self.refs) != len(other.refs):
            return False
        for a, b in zip(self.refs, other.refs):
            if (a is None) != (b is None):
                return False
            if a is not None and (a[1] != b[1] or a[0]() is None or a[0]() is not b[0]()):
                return False
        return True


def _ident_args(layout: str, query, keys, index, extra, weights, biases, alphas, bn_weights, bn_biases,
                activation, normalization, scale, training) -> tuple | None:
    """What an op call's _Ident is made of, but for the statistics (added by the caller):
    query, keys or values, lengths or offsets, mask or row_seq, the parameter lists, the
    options.  None unless the call is a CPU training-mode Dice one, the only kind with a cache."""
    if not (training and activation == "dice" and keys.is_cpu):
        return None
    return ([query, keys, index, extra, *weights, *biases, *alphas, *bn_weights, *bn_biases],
            (layout, activation, normalization, float(scale), len(weights)))


class _Prepared:
    """Inputs converted to the kernels' layouts, plus the common cfg dict.

    Padded: keys [B, T, D], lengths [B] (row b uses keys[b]).  Jagged (seq_start given):
    keys is values [N, D], lengths the sequence lengths [S], seq_start their element
    offsets into values [S], row_seq [R] or None, max_len the widest row's length.
    """

    def __init__(self, query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                 activation, normalization, scale, *, seq_start=None, row_seq=None, max_len=None,
                 rows_cover_keys=True):
        R, D = query.shape[0], query.shape[-1]  # query [R, D], or [R, 1, D] (call_forward)
        T = keys.shape[1] if seq_start is None else max_len
        self.B, self.T, self.D, self.L = R, T, D, len(weights) - 1
        cdt = _compute_dtype(keys)
        self.acc = acc = _acc_dtype(cdt)
        self.q = _as(query, cdt)
        self.k = _as(keys, cdt)
        self.lengths = _as(lengths, torch.int64)
        # The CUDA kernels run (a CUDA tensor, or their CPU emulation in the tests).
        self.cuda_kernels = keys.is_cuda or getattr(_C, "emulates_cuda", False)
        self.row_seq = None if row_seq is None else _as(row_seq, torch.int64)
        self.mask = None if mask is None else mask.contiguous()
        self.weights = [_as(w, acc) for w in weights]
        self.biases = [_as(b, acc) for b in biases]
        hidden = [w.shape[0] for w in weights[:-1]]
        self.hidden = hidden
        # PReLU's single alpha is broadcast per channel; the backward sums it back.
        self.alphas = [_as(a.detach().reshape(-1).expand(h), acc) if a.numel() != h else _as(a, acc)
                       for a, h in zip(alphas, hidden)]
        self.gammas = [_as(g, acc) for g in bn_weights]
        self.betas = [_as(b, acc) for b in bn_biases]
        self.seq_start = None if seq_start is None else seq_start.contiguous()  # None: row r at r*T*D
        self.score_start = None
        # Each row has its own sequence and together they cover keys (padded; jagged without a
        # row_seq; not a gathered row_seq, which may leave sequences out): the CPU backward then
        # writes all of dk (DinParams::dk_assign).
        self.rows_cover_keys = rows_cover_keys and row_seq is None
        self.cfg = _model_cfg(D, hidden, activation, normalization, scale, cdt, self.weights, self.biases,
                              self.alphas, self.gammas, self.betas)
        self.cfg.update({
            "rows": R, "max_len": T, "num_threads": torch.get_num_threads(),
            "q": self.q.data_ptr(), "ldq": D, "k": self.k.data_ptr(), "ldk": D,
            "seq_start": _ptr(self.seq_start), "seq_stride": T * D, "seq_len": self.lengths.data_ptr(),
            "row_seq": _ptr(self.row_seq), "mask": _ptr(self.mask), "ld_mask": T, "is_cuda": keys.is_cuda,
        })
        if keys.is_cuda:
            self.cfg["device"] = keys.device.index
            self.cfg["stream"] = torch.cuda.current_stream(keys.device).cuda_stream

    @property
    def empty(self) -> bool:
        # No row has a key to read (T == 0 or no rows): the kernels are not called
        # (an empty tensor's data_ptr is 0, which _C rejects as a missing pointer).
        return self.B == 0 or self.T == 0 or self.k.numel() == 0

    def shared_dk_rows(self) -> None:
        """CUDA, rows sharing a sequence: scratch for each row's share of dk, and the rows
        grouped by sequence, so that the kernels sum a shared sequence's key gradient in a
        fixed order (bitwise reproducible) instead of with atomics.  The scratch is the
        sum of row lengths x D (the size of the tiled input's gradient, which the shared
        layout otherwise never holds): above SHARED_DK_ROWS_MAX_BYTES the kernels fall back
        to atomics, unless torch.use_deterministic_algorithms(True) asks for reproducible
        results at any size.  The CPU kernels keep per-thread partials instead."""
        if self.row_seq is None or not self.cuda_kernels or self.score_start is None:
            return
        nbytes = self.n_scores * self.D * torch.finfo(self.acc).bits // 8
        if nbytes > SHARED_DK_ROWS_MAX_BYTES and not torch.are_deterministic_algorithms_enabled():
            return
        S, dev = self.lengths.numel(), self.k.device
        seqs, self._seq_rows = torch.sort(self.row_seq, stable=True)
        self._seq_rows_start = torch.searchsorted(seqs, torch.arange(S + 1, device=dev))  # no host sync
        self._dk_rows = torch.empty(max(self.n_scores, 1), self.D, dtype=self.acc, device=dev)
        self.cfg.update({"dk_rows": self._dk_rows.data_ptr(), "seq_rows": self._seq_rows.data_ptr(),
                         "seq_rows_start": self._seq_rows_start.data_ptr(), "num_seqs": S})

    ident_args: tuple | None = None  # _ident_args of the op call, set by the op
    _ident_memo: tuple | None = None  # (stats, its _Ident) of this call

    def _ident(self, stats: Tensor) -> _Ident | None:
        """The cache identity of this call with these statistics, built once per call (~20-30 us:
        weakrefs and storage facts of ~17 tensors): the kernel passes between the backward's two
        asks leave every input as it was."""
        if self.ident_args is None:
            return None
        if self._ident_memo is not None and self._ident_memo[0] is stats:
            return self._ident_memo[1]
        tensors = [*self.ident_args[0], stats]
        # Inference tensors have no version counter, and no backward will look.
        ident = None if any(t is not None and t.is_inference() for t in tensors) \
            else _Ident(tensors, self.ident_args[1])
        self._ident_memo = (stats, ident)
        return ident

    def zcache(self, stats: Tensor | None = None) -> None:
        """CPU, training-mode Dice: scratch for the hidden pre-activations of every valid
        position (the sum of row lengths x the hidden widths, padded to 64 bytes), which
        the statistics passes and the forward, or the reductions and the backward, share
        instead of each recomputing the layers below: every layer's GEMM then runs once per
        call instead of once per pass, with bitwise the same results.  The buffer is
        _cpu_scratch's, kept per thread.  Nothing is kept for the backward, but the buffer
        outlives the call, and a backward that finds its forward's pre-activations still
        there (stats given: the backward's; see _Ident) reads them instead of recomputing
        them.  Above ZCACHE_MAX_BYTES the passes recompute.  zcache_have names the layers an
        earlier pass has written (bit l: layer l; zcache_holds)."""
        if self.cuda_kernels or self.empty:
            return
        nbytes = _C.workspace_bytes(self.cfg, "zcache")
        if nbytes == 0 or nbytes > ZCACHE_MAX_BYTES:
            return
        ident = None if stats is None else self._ident(stats)
        held, buf = _scratch.holds, _scratch.buf
        if ident is not None and held is not None and buf is not None and buf.numel() >= nbytes \
                and held.matches(ident):
            have = (1 << self.L) - 1
        else:
            buf, have = _cpu_scratch(nbytes), 0
        self._zbuf = buf  # held by this call too, whatever the thread-local does
        self.cfg.update({"zcache": buf.data_ptr(), "zcache_bytes": nbytes, "zcache_have": have})

    def zcache_filled(self, stats: Tensor) -> None:
        """Every layer of this call, with these statistics, is now in the cache: say so, for
        a backward to find (_Ident)."""
        if "zcache" in self.cfg and self._zbuf is _scratch.buf:
            _scratch.holds = self._ident(stats)

    def zcache_holds(self, layers: int) -> None:
        """With a cache in use: the passes so far wrote layers 0..layers-1."""
        if "zcache" in self.cfg:
            self.cfg["zcache_have"] = (1 << layers) - 1

    def workspace(self, phase: str) -> Tensor | None:
        if phase != "backward" and not self.cuda_kernels:
            return None  # the CPU forward and statistics passes take no scratch
        nbytes = _C.workspace_bytes(self.cfg, phase)
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=self.k.device)
        self.cfg["workspace"] = ws.data_ptr()
        self.cfg["workspace_bytes"] = nbytes
        self._ws = ws  # keep it alive for the kernel call
        return ws

    def set_stats(self, stats: Tensor) -> None:
        """stats [L, 3, Hmax], contiguous: point the kernels at the mean and invstd rows."""
        base, row = stats.data_ptr(), stats.shape[2] * stats.element_size()
        self.cfg["bn_mean"] = [base + 3 * l * row for l in range(self.L)]
        self.cfg["bn_invstd"] = [base + (3 * l + 1) * row for l in range(self.L)]

    def row_lengths(self) -> Tensor:
        """[R] int64: valid positions of each row before the mask (clamped to T)."""
        lens = self.lengths if self.row_seq is None else self.lengths[self.row_seq]
        return lens.clamp(0, self.T)

    def valid_mask(self) -> Tensor:
        """[R, T] bool: the (row, position) pairs the kernels treat as valid."""
        valid = torch.arange(self.T, device=self.k.device)[None, :] < self.row_lengths()[:, None]
        if self.mask is not None:
            valid = valid & (self.mask if self.row_seq is None else self.mask[self.row_seq])
        return valid

    def use_jagged_scores(self, starts: Tensor, total: int) -> None:
        """Weights row by row, each row exactly its length (the jagged layout has no mask;
        total = their sum): row r's at starts[r] = the sum of the lengths before it.  The
        kernels write them in place, so no [R, T] buffer exists (T is the longest row, and a
        skewed or shared batch's R x T is many times its sum of lengths)."""
        assert self.mask is None
        self.score_start = starts
        self.n_scores = total
        self.cfg["score_start"] = self.score_start.data_ptr()

    def valid_count(self) -> Tensor:
        # Every valid (row, position) pair counts, also when rows share a sequence:
        # the Dice batch statistics are those of the tiled input.
        return self.row_lengths().sum() if self.mask is None else self.valid_mask().sum()


def _mask_lengths(mask: Tensor, lengths: Tensor | None) -> Tensor:
    # With a mask, the kernels need only scan up to the last valid position.
    T = mask.shape[1]
    last = torch.where(mask, torch.arange(1, T + 1, device=mask.device), 0).amax(dim=1) if T else \
        torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    return last if lengths is None else torch.minimum(last, lengths.to(torch.int64))


def _eval_invstd(running_vars, eps: float, acc: torch.dtype) -> list[Tensor]:
    """Eval-mode Dice: 1/sqrt(running_var + eps) of each layer, flat, in acc dtype.  The
    small-call plan's kernel computes the same (DinParams::bn_var) with the same correctly
    rounded add, sqrt and division (torch's CPU rsqrt), so the two agree bitwise
    (tests/test_inputs.py checks it).  Per-layer ops: torch 2.4 has no _foreach_rsqrt_."""
    return [torch.rsqrt(v.detach().reshape(-1).to(acc) + float(eps)) for v in running_vars]


def _bn_stats(prep: _Prepared, running_means, running_vars, training: bool, eps: float) -> Tensor:
    """[L, 3, Hmax] acc dtype: mean, invstd and unbiased var used by each Dice layer."""
    L, Hmax = prep.L, max(prep.hidden)
    stats = torch.zeros(L, 3, Hmax, dtype=prep.acc, device=prep.k.device)
    if not training:
        invstd = _eval_invstd(running_vars, eps, prep.acc)
        for l, (m, v) in enumerate(zip(running_means, running_vars)):
            h = prep.hidden[l]
            stats[l, 0, :h] = m.detach().reshape(-1).to(prep.acc)
            stats[l, 1, :h] = invstd[l]
            stats[l, 2, :h] = v.detach().reshape(-1).to(prep.acc)
        prep.set_stats(stats)
        return stats
    n = prep.valid_count()
    nf = n.to(torch.float64)
    if not (n.is_cuda and torch.cuda.is_current_stream_capturing()):
        if int(n) == 0:
            # No valid position (every history empty): nothing to normalise and every output zero,
            # as nn.BatchNorm1d on no rows.  The running statistics stand in for the batch's, so
            # the momentum update keeps them (to rounding) where BatchNorm leaves them.
            return _bn_stats(prep, running_means, running_vars, False, eps)
        if int(n) == 1:
            raise ValueError("dice in training mode needs at least 2 valid positions in the batch for "
                             "BatchNorm statistics, got 1")
    prep.cfg["batch_stats"] = 1  # DinParams::batch_stats
    prep.set_stats(stats)
    prep.workspace("stats")
    prep.zcache()
    dof = (nf - 1).clamp_min(1.0)  # the unbiased variance's divisor
    for l in range(L):
        h = prep.hidden[l]
        # The kernels return the mean and M2 = sum((z - mean)^2), merged with Chan's
        # formula: no E[z^2] - E[z]^2, which cancels when |mean| >> std.
        mean_m2 = torch.empty(2, h, dtype=torch.float64, device=prep.k.device)
        prep.zcache_holds(l)
        _C.stats({**prep.cfg, "stats_layer": l, "stats_out": mean_m2.data_ptr()})
        mean, m2 = mean_m2.unbind()
        var = m2 / nf
        # The next layer's pass reads these rows: written here, per layer, in one copy.
        stats[l, :, :h] = torch.stack((mean, torch.rsqrt(var + eps), var * nf / dof)).to(prep.acc)
    return stats


# --------------------------------------------------------------------------------------
# The kernel calls shared by the padded and the jagged op
# --------------------------------------------------------------------------------------
def _forward(prep: _Prepared, activation, running_means, running_vars, training, eps):
    """out shaped like the query, [R, D] or [R, 1, D] (compute dtype), scores (acc dtype):
    [R, T], zero where invalid, or the jagged weights [sum of row lengths] after
    prep.use_jagged_scores(); stats."""
    dev = prep.k.device
    if activation == "dice":
        stats = _bn_stats(prep, running_means, running_vars, training, eps)
    else:
        stats = torch.zeros(prep.L, 3, max(prep.hidden), dtype=prep.acc, device=dev)
    shape = (prep.B, prep.T) if prep.score_start is None else (prep.n_scores,)
    if prep.empty:
        return (torch.zeros(prep.q.shape, dtype=prep.q.dtype, device=dev),
                torch.zeros(shape, dtype=prep.acc, device=dev), stats)
    out = torch.empty(prep.q.shape, dtype=prep.q.dtype, device=dev)  # [R, D] or [R, 1, D], as the query
    scores = torch.empty(shape, dtype=prep.acc, device=dev)
    prep.workspace("forward")
    prep.zcache_holds(prep.L)  # the statistics passes wrote every layer
    _C.forward({**prep.cfg, "out": out.data_ptr(), "ldo": prep.D, "scores": scores.data_ptr(),
                "ld_scores": prep.T})
    prep.zcache_filled(stats)
    return out, scores, stats


def _backward(prep: _Prepared, grad_out, grad_scores, stats, scores, activation, training):
    """dq shaped like the query, dk laid out like prep.k, and the parameter gradients (acc dtype, kernel
    layout: PReLU alphas per channel) as lists dW, db, dalpha, dgamma, dbeta."""
    acc, dev, L, T = prep.acc, prep.k.device, prep.L, prep.T
    # The CPU kernels write every element of dq and the parameter gradients, and all of
    # dk when the rows cover it (DinParams::dk_assign): no zero fills first (dk is a
    # [B, T, D] tensor).  The CUDA kernels add into zeros.
    cpu = not prep.cuda_kernels and not prep.empty
    new = torch.empty_like if cpu else torch.zeros_like
    assign = cpu and prep.rows_cover_keys
    dq = (torch.empty if cpu else torch.zeros)(prep.q.shape, dtype=prep.q.dtype, device=dev)
    dk = torch.empty_like(prep.k) if assign else torch.zeros_like(prep.k)
    prep.cfg["dk_assign"] = int(assign)
    dW = [new(w) for w in prep.weights]
    db = [new(b) for b in prep.biases]
    dalpha = [new(a) for a in prep.alphas]
    dgamma = [new(a) for a in prep.gammas]
    dbeta = [new(a) for a in prep.betas]
    if not prep.empty:
        g = _as(grad_out, prep.q.dtype)
        gs = None if grad_scores is None else _as(grad_scores, acc)
        scores = _as(scores, acc)
        prep.cfg.update({"dout": g.data_ptr(), "ld_dout": prep.D, "scores": scores.data_ptr(),
                         "ld_scores": T, "dscores": _ptr(gs), "ld_dscores": T})
        stats = _as(stats, acc)
        prep.set_stats(stats)
        # One workspace serves the reduce passes and the full backward (CUDA sizes
        # it for both; the CPU only uses it in the full pass).
        prep.workspace("backward")
        if activation == "dice" and training:
            # Batch statistics couple all positions: from the top layer down, reduce
            # mean(dxhat) and mean(dxhat*xhat) with the corrections above known.
            nf = prep.valid_count().to(torch.float64)
            prep.cfg["batch_stats"] = 1  # DinParams::batch_stats
            corr = torch.zeros(L, 2, max(prep.hidden), dtype=acc, device=dev)
            prep.cfg["bn_corr_a"] = [corr[l, 0].data_ptr() for l in range(L)]
            prep.cfg["bn_corr_c"] = [corr[l, 1].data_ptr() for l in range(L)]
            # The first reduction writes every layer (unless the forward's are still
            # there), the later passes read.
            prep.zcache(stats)
            for l in reversed(range(L)):
                h = prep.hidden[l]
                sums = torch.empty(2, h, dtype=torch.float64, device=dev)
                _C.backward({**prep.cfg, "reduce_layer": l, "reduce_out": sums.data_ptr()})
                corr[l, :, :h] = (sums / nf.clamp_min(1)).to(acc)  # (no valid position: sums 0, not 0/0)
                if l == L - 1:
                    prep.zcache_holds(L)
                    prep.zcache_filled(stats)
        prep.shared_dk_rows()
        _C.backward({**prep.cfg, "dq": dq.data_ptr(), "lddq": prep.D, "dk": dk.data_ptr(),
                     "dW": _ptrs(dW), "db": _ptrs(db), "dalpha": _ptrs(dalpha),
                     "dgamma": _ptrs(dgamma), "dbeta": _ptrs(dbeta)})
    return dq, dk, (dW, db, dalpha, dgamma, dbeta)


def _param_grads(kernel_grads, weights, biases, alphas, bn_weights, bn_biases) -> list[Tensor]:
    """Kernel gradients back to the callers' dtypes and shapes, in the order weights, biases,
    alphas, bn_weights, bn_biases (PReLU's scalar alpha sums its channels)."""
    dW, db, dalpha, dgamma, dbeta = kernel_grads
    grads = [_to(d, w.dtype) for d, w in zip(dW, weights)] + [_to(d, b.dtype) for d, b in zip(db, biases)]
    grads += [(d.sum() if a.numel() == 1 else d).reshape(a.shape).to(a.dtype) for d, a in zip(dalpha, alphas)]
    grads += [d.reshape(a.shape).to(a.dtype) for d, a in zip(dgamma, bn_weights)]
    grads += [d.reshape(a.shape).to(a.dtype) for d, a in zip(dbeta, bn_biases)]
    return grads


def _fake_param_grads(weights, biases, alphas, bn_weights, bn_biases) -> list[Tensor]:
    # Contiguous, as the kernels write them, whatever the parameter's strides (a transposed
    # weight's empty_like would promise its strides to the compiler).
    return [p.new_empty(p.shape) for p in [*weights, *biases, *alphas, *bn_weights, *bn_biases]]


def _fake_stats(query, weights) -> Tensor:
    L, Hmax = len(weights) - 1, max(w.shape[0] for w in weights[:-1])
    return query.new_empty(L, 3, Hmax, dtype=_acc_dtype(query.dtype))


# --------------------------------------------------------------------------------------
# Direct calls.  torch.ops.din_fused.* called by hand, and traced, compiled or exported
# graphs, reach the ops without functional's checks, so the registered ops check their
# arguments first (the kernels read by these shapes).  functional's eager calls, checked
# already, run the implementations (_IMPLS) without repeating it.
# --------------------------------------------------------------------------------------
def _bundle(a: dict) -> MLPParams:
    """The parameter bundle of an op call's arguments (by name); the backward ops take no
    running statistics."""
    return MLPParams(a["weights"], a["biases"], a["activation"], a["alphas"], a["bn_weights"], a["bn_biases"],
                     a.get("running_means"), a.get("running_vars"))


def _check_backward_inputs(a: dict, names: tuple, score_shape: tuple | None) -> None:
    """The backward's own inputs: grad_out like query, the forward's weights names[1] (and
    their gradient names[0], or None) of score_shape (None: the jagged weights, 1-D, of the
    sum of the rows' lengths, which the implementation checks), stats [L, 3, Hmax]."""
    query, weights = a["query"], a["weights"]
    stats_shape = (len(weights) - 1, 3, max(w.shape[0] for w in weights[:-1]))
    for name, shape in (("grad_out", tuple(query.shape)), ("stats", stats_shape), (names[0], score_shape),
                        (names[1], score_shape)):
        t = a[name]
        if t is None and name == names[0]:
            continue
        want = "[sum of the rows' lengths]" if shape is None else str(list(shape))
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor of shape {want}, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if t.dim() != (1 if shape is None else len(shape)) or (shape is not None and tuple(t.shape) != shape):
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but the inputs are on {query.device}")


def _check_op_lists(a: dict) -> None:
    """What the schema allows and functional never passes: a None lengths, and parameter
    lists the activation does not use (the fake implementation would count their gradients)."""
    if "lengths" in a and a["lengths"] is None:
        _check_index("lengths", None, (a["keys"].shape[0],), a["keys"].device)  # raises, naming it
    used = USED_LISTS[a["activation"]]  # (check_params has checked the name)
    for name in OPTIONAL_LISTS:
        if name not in used and len(a.get(name) or ()):
            raise ValueError(f"{name} must be empty for activation {a['activation']!r}, which has none, got "
                             f"{len(a[name])} tensors")


def _check_fwd_call(a: dict) -> None:
    check_inputs(a["query"], a["keys"], a["lengths"], a["mask"], _bundle(a), a["normalization"], a["scale"])
    _check_op_lists(a)


def _check_bwd_call(a: dict) -> None:
    check_inputs(a["query"], a["keys"], a["lengths"], a["mask"], _bundle(a), a["normalization"], a["scale"],
                 running_stats=False)
    _check_op_lists(a)
    _check_backward_inputs(a, ("grad_scores", "scores"), tuple(a["keys"].shape[:2]))


def _check_bwd_lengths(a: dict) -> None:
    # The forward checks the lengths' values; the backward op called on its own must too
    # (the kernels clamp them, which keeps the reads in bounds but would answer wrongly).
    _check_lengths_values(a["lengths"], a["keys"].shape[1])


def _check_jagged_fwd_call(a: dict) -> None:
    check_jagged_inputs(a["query"], a["values"], a["offsets"], a["row_seq"], _bundle(a), a["normalization"],
                        a["scale"])
    _check_op_lists(a)


def _check_jagged_bwd_call(a: dict) -> None:
    check_jagged_inputs(a["query"], a["values"], a["offsets"], a["row_seq"], _bundle(a), a["normalization"],
                        a["scale"], running_stats=False)
    _check_op_lists(a)
    _check_backward_inputs(a, ("grad_weights", "flat_weights"), None)


_SCHEMA_TYPES = {Tensor: "Tensor", Tensor | None: "Tensor?", list[Tensor]: "Tensor[]", str: "str",
                 float: "float", bool: "bool"}


def _schema(fn) -> str:
    """fn's op schema, written out from its annotations.  torch >= 2.5 infers the same, but
    torch 2.4's infer_schema reads neither string annotations (this module's `from __future__
    import annotations`) nor `X | None` and `list[X]`, so `import din_fused` failed there."""
    hints = typing.get_type_hints(fn)
    args = ", ".join(f"{_SCHEMA_TYPES[hints[n]]} {n}" for n in inspect.signature(fn).parameters)
    outs = ", ".join(_SCHEMA_TYPES[t] for t in typing.get_args(hints["return"]))
    return f"({args}) -> ({outs})"


def _op(name: str, impl, check, data_check=None):
    """The custom op `name`: check(its arguments by name), then impl; its schema is impl's.
    The fake implementation (registered with _fake) runs the same check: a call that mixes
    meta and real tensors runs the fake, not this.  data_check: checks of values, which only
    the real implementation can make."""
    sig = inspect.signature(impl)
    names = tuple(sig.parameters)  # (no defaults: every argument comes, by position or name)

    def checked(*args, **kwargs):
        a = {**dict(zip(names, args)), **kwargs}  # (Signature.bind costs 9 us a call)
        check(a)
        if data_check is not None:
            data_check(a)
        return impl(*args, **kwargs)

    checked.__signature__ = sig
    checked.__annotations__ = impl.__annotations__
    checked.__name__ = checked.__qualname__ = impl.__name__
    checked.__module__ = impl.__module__
    return torch.library.custom_op(name, mutates_args=(), schema=_schema(impl))(checked)


def _fake(op, check):
    """Register the decorated function as op's fake implementation, behind op's check."""
    def register(fn):
        names = tuple(inspect.signature(fn).parameters)

        def fake(*args, **kwargs):
            check({**dict(zip(names, args)), **kwargs})
            return fn(*args, **kwargs)

        op.register_fake(fake)
        return fn
    return register


# --------------------------------------------------------------------------------------
# Padded op
# --------------------------------------------------------------------------------------
def _din_fwd_impl(query: Tensor, keys: Tensor, lengths: Tensor, mask: Tensor | None,
            weights: list[Tensor], biases: list[Tensor], alphas: list[Tensor],
            bn_weights: list[Tensor], bn_biases: list[Tensor], running_means: list[Tensor],
            running_vars: list[Tensor], activation: str, normalization: str, scale: float,
            training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    B, T, D = keys.shape
    # The CPU forward kernel checks the lengths itself before it reads a key (a separate
    # aminmax pass and two host reads cost more than a small call's kernel).  Python checks
    # them where that cannot hold: CUDA, a mask (its lengths are first reduced with the
    # mask), the Dice statistics pass that runs before the forward, no kernel call at all.
    in_kernel = mask is None and not keys.is_cuda and not (training and activation == "dice")
    if not in_kernel:
        _check_lengths_values(lengths, T)
    ident = _ident_args("padded", query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                        activation, normalization, scale, training)
    if mask is not None:
        lengths = _mask_lengths(mask, lengths)
    prep = _Prepared(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale)
    prep.ident_args = ident
    if in_kernel:
        if prep.empty:
            _check_lengths_values(lengths, T)
        else:
            prep.cfg["check_lengths"] = 1
    out, scores, stats = _forward(prep, activation, running_means, running_vars, training, eps)
    return _to(out, query.dtype), scores, stats


din_fwd = _op("din_fused::din_fwd", _din_fwd_impl, _check_fwd_call)


@_fake(din_fwd, _check_fwd_call)
def _(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases, running_means,
      running_vars, activation, normalization, scale, training, eps):
    B, T, D = keys.shape
    return (query.new_empty(B, D), query.new_empty(B, T, dtype=_acc_dtype(query.dtype)),
            _fake_stats(query, weights))


def _din_bwd_impl(grad_out: Tensor, grad_scores: Tensor | None, query: Tensor, keys: Tensor,
            lengths: Tensor, mask: Tensor | None, weights: list[Tensor], biases: list[Tensor],
            alphas: list[Tensor], bn_weights: list[Tensor], bn_biases: list[Tensor], stats: Tensor,
            scores: Tensor, activation: str, normalization: str, scale: float,
            training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Returns dq shaped like the query ([B,D]; [B,1,D] when called directly with one, see
    call_forward), dk [B,T,D] and the parameter gradients in the order weights, biases,
    alphas, bn_weights, bn_biases (each list as given)."""
    ident = _ident_args("padded", query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                        activation, normalization, scale, training)
    if mask is not None:
        lengths = _mask_lengths(mask, lengths)
    prep = _Prepared(query, keys, lengths, mask, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale)
    prep.ident_args = ident
    dq, dk, kgrads = _backward(prep, grad_out, grad_scores, stats, scores, activation, training)
    grads = _param_grads(kgrads, weights, biases, alphas, bn_weights, bn_biases)
    return dq.to(query.dtype), dk.to(keys.dtype), grads


din_bwd = _op("din_fused::din_bwd", _din_bwd_impl, _check_bwd_call, _check_bwd_lengths)


@_fake(din_bwd, _check_bwd_call)
def _(grad_out, grad_scores, query, keys, lengths, mask, weights, biases, alphas, bn_weights,
      bn_biases, stats, scores, activation, normalization, scale, training):
    return (query.new_empty(query.shape), keys.new_empty(keys.shape),
            _fake_param_grads(weights, biases, alphas, bn_weights, bn_biases))


# --------------------------------------------------------------------------------------
# Jagged op
# --------------------------------------------------------------------------------------
def _jagged_layout(values: Tensor, offsets: Tensor, row_seq: Tensor | None, *, gather: bool):
    """(seq_start [S'] element offsets, seq_len [S'], row_seq for the kernels or None, T,
    row lengths [R], where each row's weights start among the jagged weights [R] (the sum
    of the lengths before it), their total).

    Raises ValueError on bad offsets or row_seq values, in the backward too (the op may be
    called directly).  gather: when no two rows share a sequence, gather the sequences per
    row, so that the kernels see row_seq=None; then the backward needs no dk partials (see
    din_cpu.cpp).  The forward's results do not depend on it.  On the CPU one pass of
    _C.jagged_layout does it all, checks included; elsewhere every data-dependent fact comes
    back in one host read (checks included): a small call would otherwise spend more on a
    dozen reads than in the kernel."""
    # The shapes the C++ pass reads by, again: the op called directly skips check_jagged_inputs.
    _check_jagged_index(offsets, row_seq, None, values.device)
    off = _as(offsets, torch.int64)
    N, D = values.shape
    S = off.shape[0] - 1
    rs = None if row_seq is None else _as(row_seq, torch.int64)
    if off.is_cpu and (rs is None or rs.is_cpu):
        R = S if rs is None else rs.shape[0]
        buf = torch.empty(2 * S + 2 * R, dtype=torch.int64)
        T, total, shared = _C.jagged_layout(off.data_ptr(), S, N, D, _ptr(rs), R, buf.data_ptr())
        seq_start, seq_len, lens, starts = buf.split([S, S, R, R])
        if gather and rs is not None and not shared:
            seq_start, seq_len, rs = seq_start[rs], lens, None
        return seq_start, seq_len, rs, T, lens, starts, total
    return _jagged_layout_torch(off, rs, N, D, gather=gather)


def _jagged_layout_torch(off: Tensor, rs: Tensor | None, N: int, D: int, *, gather: bool):
    """_jagged_layout in torch ops, for CUDA tensors: off [S+1] and rs [R] int64."""
    S = off.shape[0] - 1
    seq_start, seq_len = off[:-1] * D, torch.diff(off)
    check = not _data_checks_off(off)
    # Out-of-range row_seq values are clamped for the lookup (with no sequence at all, none
    # is looked up) and reported below.
    if rs is None:
        lens = seq_len
    elif S == 0:
        lens = torch.zeros_like(rs)
    else:
        lens = seq_len.index_select(0, rs.clamp(0, S - 1) if check else rs)
    facts = {}
    if check:
        facts.update(first=off[0], last=off[-1])
        if S > 0:
            facts["min_len"] = seq_len.min()
        if rs is not None and rs.numel():
            facts["lo"], facts["hi"] = torch.aminmax(rs)
    if lens.numel():
        facts.update(T=lens.max(), total=lens.sum())
    if gather and rs is not None and rs.numel():
        facts["most_rows"] = torch.bincount(rs.clamp(0, S)).max()  # (one out of range is reported below)
    got = dict(zip(facts, torch.stack(list(facts.values())).tolist())) if facts else {}
    if check:
        if got["first"] != 0:
            raise ValueError(f"offsets must start at 0, got offsets[0] = {got['first']}")
        if got.get("min_len", 0) < 0:
            i = int((off[1:] < off[:-1]).nonzero()[0, 0])
            raise ValueError(f"offsets must not decrease, got offsets[{i}] = {int(off[i])} > "
                             f"offsets[{i + 1}] = {int(off[i + 1])}")
        if got["last"] != N:
            raise ValueError(f"offsets must end at N = values.shape[0] = {N}, "
                             f"got offsets[-1] = {got['last']}")
        if "lo" in got and (got["lo"] < 0 or got["hi"] >= S):
            raise ValueError(f"row_seq must lie in [0, S) = [0, {S}), "
                             f"got values in [{got['lo']}, {got['hi']}]")
    if gather and rs is not None and (rs.numel() == 0 or got["most_rows"] <= 1):
        seq_start, seq_len, rs = seq_start[rs], lens, None
    starts = torch.cumsum(lens, 0) - lens
    return seq_start, seq_len, rs, got.get("T", 0), lens, starts, got.get("total", 0)


def _jagged_prepared(query, values, offsets, row_seq, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale, training, *, gather: bool) -> _Prepared:
    seq_start, seq_len, rs, T, lens, starts, total = _jagged_layout(values, offsets, row_seq, gather=gather)
    prep = _Prepared(query, values, seq_len, None, weights, biases, alphas, bn_weights, bn_biases,
                     activation, normalization, scale, seq_start=seq_start, row_seq=rs, max_len=T,
                     rows_cover_keys=row_seq is None)
    prep.use_jagged_scores(starts, total)
    # The cache's slots are (row, position), whether or not the rows' sequences are gathered.
    prep.ident_args = _ident_args("jagged", query, values, offsets, row_seq, weights, biases, alphas,
                                  bn_weights, bn_biases, activation, normalization, scale, training)
    return prep


def _din_jagged_fwd_impl(query: Tensor, values: Tensor, offsets: Tensor, row_seq: Tensor | None,
                   weights: list[Tensor], biases: list[Tensor], alphas: list[Tensor],
                   bn_weights: list[Tensor], bn_biases: list[Tensor], running_means: list[Tensor],
                   running_vars: list[Tensor], activation: str, normalization: str, scale: float,
                   training: bool, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """query [R,D] (or [R,1,D] when called directly, see call_forward), values [N,D], offsets
    [S+1], row_seq [R] or None -> out shaped like the query, weights [sum of row lengths] (acc
    dtype, row by row), stats [L,3,Hmax]."""
    prep = _jagged_prepared(query, values, offsets, row_seq, weights, biases, alphas, bn_weights,
                            bn_biases, activation, normalization, scale, training, gather=False)
    out, scores, stats = _forward(prep, activation, running_means, running_vars, training, eps)
    return _to(out, query.dtype), scores, stats


din_jagged_fwd = _op("din_fused::din_jagged_fwd", _din_jagged_fwd_impl, _check_jagged_fwd_call)


@_fake(din_jagged_fwd, _check_jagged_fwd_call)
def _(query, values, offsets, row_seq, weights, biases, alphas, bn_weights, bn_biases, running_means,
      running_vars, activation, normalization, scale, training, eps):
    n = torch.library.get_ctx().new_dynamic_size()
    return (query.new_empty(query.shape), query.new_empty(n, dtype=_acc_dtype(query.dtype)),
            _fake_stats(query, weights))


def _din_jagged_bwd_impl(grad_out: Tensor, grad_weights: Tensor | None, query: Tensor, values: Tensor,
                   offsets: Tensor, row_seq: Tensor | None, weights: list[Tensor], biases: list[Tensor],
                   alphas: list[Tensor], bn_weights: list[Tensor], bn_biases: list[Tensor], stats: Tensor,
                   flat_weights: Tensor, activation: str, normalization: str, scale: float,
                   training: bool) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Returns dq shaped like the query, dvalues [N,D] (a shared sequence gets the fixed-order
    sum of its rows' gradients) and the parameter gradients as din_bwd."""
    prep = _jagged_prepared(query, values, offsets, row_seq, weights, biases, alphas, bn_weights,
                            bn_biases, activation, normalization, scale, training, gather=True)
    for name, t in (("flat_weights", flat_weights), ("grad_weights", grad_weights)):
        if t is not None and t.shape[0] != prep.n_scores:
            raise ValueError(f"{name} must have shape [sum of the rows' lengths] = [{prep.n_scores}], "
                             f"got {tuple(t.shape)}")
    dq, dk, kgrads = _backward(prep, grad_out, grad_weights, stats, flat_weights.to(prep.acc), activation,
                               training)
    grads = _param_grads(kgrads, weights, biases, alphas, bn_weights, bn_biases)
    return dq.to(query.dtype), dk.to(values.dtype), grads


din_jagged_bwd = _op("din_fused::din_jagged_bwd", _din_jagged_bwd_impl, _check_jagged_bwd_call)


@_fake(din_jagged_bwd, _check_jagged_bwd_call)
def _(grad_out, grad_weights, query, values, offsets, row_seq, weights, biases, alphas, bn_weights,
      bn_biases, stats, flat_weights, activation, normalization, scale, training):
    return (query.new_empty(query.shape), values.new_empty(values.shape),
            _fake_param_grads(weights, biases, alphas, bn_weights, bn_biases))


# --------------------------------------------------------------------------------------
# Cheap eager calls
# --------------------------------------------------------------------------------------
_IMPLS = {din_fwd: _din_fwd_impl, din_jagged_fwd: _din_jagged_fwd_impl, din_bwd: _din_bwd_impl,
          din_jagged_bwd: _din_jagged_bwd_impl}
_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter adds no dispatch behaviour


def plain_eager() -> bool:
    """No torch.compile/export tracing, no torch.jit tracing, no dispatch or torch-function
    mode (fake tensors, profilers' modes, device contexts), no functorch transform.  With
    only plain tensors (or Parameters) as well, the dispatcher would only route a call to
    the implementation, at a fixed cost larger than a small forward's kernel: _call then
    runs the implementation directly (under _EagerGrad when gradients are needed)."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled()
                or _functorch.peek_interpreter_stack() is not None
                or torch._C._get_tracing_state() is not None)


class InferencePlan:
    """The forward of one parameter bundle for small eager inference calls on CPU, padded
    (``forward``) or jagged and shared (``forward_jagged``).

    Built once: the bundle is checked (check_params) and the static part of the kernels'
    params dict is kept.  Only bundles the kernels read in place qualify (every tensor
    contiguous, on the CPU, in the compute dtype), so in-place updates show through.
    ``valid()`` re-checks per call that every tensor still has the same storage and shape
    (a ``.data`` swap changes them).  Everything else, including the range checks of the
    lengths, offsets and row_seq, is done per call, and so is Dice's 1/sqrt(running_var +
    eps), by the kernel, with the correctly rounded operations of the general path's
    _eval_invstd (so bitwise the same).
    """

    def __init__(self, params: MLPParams, dim: int, dtype: torch.dtype, normalization: str, scale: float):
        check_params(params, dim, torch.device("cpu"))
        weights, biases, alphas, gammas, betas, means, variances = params.op_args()
        hidden = [w.shape[0] for w in weights[:-1]]
        tensors = [*weights, *biases, *alphas, *gammas, *betas, *means, *variances]
        self.ok = dtype in (torch.float32, torch.float64) \
            and all(t.dtype == dtype and t.is_cpu and t.is_contiguous() and not t.is_neg() for t in tensors)
        self.key = (dim, dtype, normalization, scale)
        self.params = params  # Dice reads its eps per call, as the module sets it
        self.dice = bool(variances)
        # valid() compares every tensor's storage, shape and strides as one list (a per-tensor
        # generator cost ~0.4 us a tensor; Dice has 17).  The strides too: a square weight's .data
        # swapped for its transpose keeps the pointer and the shape.
        self._tensors = tensors
        self._storage = self._identity()
        # PReLU's single alpha (one slope shared by the channels): the kernels read a copy per
        # channel, refreshed per call from the alpha's value (_config).  Its version would not do:
        # a write through .data leaves it as it was, and an inference tensor has none.
        self._scalar_alphas = []  # [alpha, its copy per channel, the value the copy holds]
        self.alphas = []
        for a, h in zip(alphas, hidden):
            if a.numel() == h:
                self.alphas.append(a)
            else:
                copy = a.detach().reshape(-1).expand(h).contiguous()
                self._scalar_alphas.append([a, copy, copy[0].item()])
                self.alphas.append(copy)
        self.cfg = _model_cfg(dim, hidden, params.activation, normalization, scale, dtype, weights, biases,
                              self.alphas, gammas, betas)
        self.cfg.update({"ldq": dim, "ldk": dim, "ldo": dim, "is_cuda": False})
        if means:
            # Read in place, as the general path's copy of them; the kernel takes
            # 1/sqrt(running_var + eps) itself (DinParams::bn_var), bitwise _eval_invstd.
            self.cfg["bn_mean"] = _ptrs(means)
            self.cfg["bn_var"] = _ptrs(variances)

    def _config(self, cfg: dict) -> None:
        """This call's values of what the kernels do not read in place: Dice's eps (eval), which
        the module refreshes from its BatchNorm, and PReLU's single alphas."""
        if self.dice:
            cfg["bn_eps"] = float(self.params.eps)
        for held in self._scalar_alphas:
            value = held[0].item()
            if value != held[2]:  # (a NaN is copied on every call)
                held[1].fill_(value)
                held[2] = value

    def _identity(self) -> list:
        # The dtype and the negative-view flag too: a .data swapped for a reinterpreting view
        # or a negative view keeps the pointer, the shape and the strides.
        return [(t.data_ptr(), t.shape, t.stride(), t.dtype, t.is_neg()) for t in self._tensors]

    def valid(self) -> bool:
        return self._identity() == self._storage

    def forward(self, query: Tensor, keys: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """query [B, D] or [B, 1, D], keys [B, T, D] (contiguous, CPU, the plan's dtype),
        lengths int64 [B] or [B, 1], contiguous, values above T meaning T (checked >= 0 in
        the kernel) -> (out shaped like query, weights [B, T])."""
        B, T, D = keys.shape
        out = torch.empty_like(query)
        scores = torch.empty(B, T, dtype=keys.dtype)
        cfg = self.cfg.copy()
        cfg.update({"rows": B, "max_len": T, "num_threads": torch.get_num_threads(), "q": query.data_ptr(),
                    "k": keys.data_ptr(), "seq_stride": T * D, "seq_len": lengths.data_ptr(),
                    "out": out.data_ptr(), "scores": scores.data_ptr(), "ld_scores": T, "check_lengths": 2})
        self._config(cfg)
        _C.forward(cfg)
        return out, scores

    def forward_jagged(self, query: Tensor, values: Tensor, offsets: Tensor,
                       row_seq: Tensor | None) -> Tensor:
        """query [R, D] or [R, 1, D], values [N, D] (contiguous, CPU, the plan's dtype), offsets
        [S+1] and row_seq [R] or None, int64 and contiguous, shapes already checked -> out shaped
        like query.  The values of offsets and row_seq are checked here, by _C.jagged_layout.
        No tensor but one buffer of the layout is made: the general path's _jagged_layout checks
        the index tensors again and splits that buffer into four, ~5 us a call."""
        S, R, (N, D) = offsets.shape[0] - 1, query.shape[0], values.shape
        # seq_start [S], seq_len [S], the rows' lengths [R] and weight starts [R], as _jagged_layout
        layout = torch.empty(2 * (S + R), dtype=torch.int64)
        at = layout.data_ptr()
        T, total, _ = _C.jagged_layout(offsets.data_ptr(), S, N, D, _ptr(row_seq), R, at)
        out = torch.empty_like(query)
        if T == 0:  # no row has a key (the kernels are not called, as in _forward)
            return out.zero_()
        scores = torch.empty(total, dtype=values.dtype)
        cfg = self.cfg.copy()
        cfg.update({"rows": R, "max_len": T, "num_threads": torch.get_num_threads(), "q": query.data_ptr(),
                    "k": values.data_ptr(), "seq_start": at, "seq_stride": T * D, "seq_len": at + 8 * S,
                    "row_seq": _ptr(row_seq), "out": out.data_ptr(), "scores": scores.data_ptr(),
                    "ld_scores": T, "score_start": at + 8 * (2 * S + R)})
        self._config(cfg)
        _C.forward(cfg)
        return out


def call_forward(op, *args):
    """op(*args) for din_fwd / din_jagged_fwd, or the same implementation called directly
    when the dispatcher adds nothing (see plain_eager).  The query may also be [R, 1, D]
    (DeepCTR's layout), and out then comes back [R, 1, D]: the implementations take it as
    it is (the kernels read the same memory), so an eager call records no view nodes
    (squeezing the query and unsqueezing out cost ~45 us of a B=128, T=10 forward+backward);
    the registered op takes [R, D], and gets the query's view."""
    query = args[0]
    tensors = [a for a in args[:4] if a is not None] + [t for lst in args[4:11] for t in lst]
    direct = _direct(tensors)
    if query.dim() == 3 and not direct:
        out, w, stats = op(query.squeeze(1), *args[1:])
        return out.unsqueeze(1), w, stats
    return _call(op, tensors, args, direct)


def _direct(tensors) -> bool:
    # (meta tensors go through the dispatcher to the fake implementation: the kernels need data)
    return plain_eager() and all(type(t) in _PLAIN for t in tensors) and not tensors[0].is_meta


def _call(op, tensors, args, direct: bool):
    """op(*args), or its implementation (under _EagerGrad when gradients are needed) when
    direct (_direct(tensors))."""
    if direct:
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return _IMPLS[op](*args)
        if op in _BACKWARDS:
            return _EagerGrad.run(op, args)
    return op(*args)


# --------------------------------------------------------------------------------------
# din_fused.model's embedding lookups and PReLU gradients
# --------------------------------------------------------------------------------------
def embedding_grad(idx: Tensor | typing.Sequence[Tensor], grad: Tensor | typing.Sequence[Tensor], rows: int,
                   padding_idx: int | None = None) -> Tensor:
    """An embedding table's gradient: idx [n] int, grad [n, E] -> [rows, E], the sum of
    grad's rows per index, padding_idx's row zero (negative: counted from the end).  idx and
    grad may also be equal-length sequences of such pairs (lookups of one table whose
    gradients add up: each pair is added in turn).  On the CPU (fp32/fp64) one pass of
    _C.embedding_grad per pair, each row summed in index order; elsewhere, and when grad
    needs a graph of its own (create_graph), index_add_.  Raises ValueError on an index
    outside [0, rows) on the CPU (index_add_ raises its own error)."""
    idxs, grads = ([idx], [grad]) if isinstance(grad, Tensor) else (list(idx), list(grad))
    if not grads or len(idxs) != len(grads):
        raise ValueError(f"embedding_grad: idx and grad must pair up, got {len(idxs)} and {len(grads)}")
    E = grads[0].shape[1]
    for i, g in zip(idxs, grads):
        _check_index("idx", i, (g.shape[0],), g.device)
        if g.dim() != 2 or g.shape[1] != E or g.dtype != grads[0].dtype:
            raise ValueError(f"grad must be [n, {E}] {grads[0].dtype}, got {tuple(g.shape)} {g.dtype}")
    if padding_idx is not None:
        if not -rows <= padding_idx < rows:
            raise ValueError(f"padding_idx must lie in [-rows, rows) = [{-rows}, {rows}), got {padding_idx}")
        padding_idx %= rows  # negative counts from the end, as in nn.Embedding
    g0 = grads[0]
    gw = torch.zeros(rows, E, dtype=g0.dtype, device=g0.device)
    # (With create_graph the table gradient must itself be differentiable: index_add_ is.)
    differentiable = torch.is_grad_enabled() and any(g.requires_grad for g in grads)
    fast = g0.is_cpu and g0.dtype in (torch.float32, torch.float64) and all(g.stride(1) == 1 for g in grads)
    if fast and not differentiable:
        for i, g in zip(idxs, grads):
            # A strided int64 column (one attribute of [n, A] ids) is read in place.
            i = i if i.dtype == torch.int64 else i.to(torch.int64)
            _C.embedding_grad(gw.data_ptr(), rows, E, i.data_ptr(), i.stride(0), g.shape[0], g.data_ptr(),
                              g.stride(0), -1 if padding_idx is None else padding_idx, _DTYPE_CODE[g.dtype])
        return gw
    for i, g in zip(idxs, grads):
        gw = gw.index_add(0, i, g)
    if padding_idx is not None:
        gw[padding_idx] = 0
    return gw


def lookup_rows(tables: typing.Sequence[Tensor], ids: Tensor) -> Tensor:
    """Rows of several tables side by side, no autograd: tables[a] [rows_a, E], ids [n, A]
    int -> [n, A*E], columns a*E:(a+1)*E holding tables[a][ids[:, a]].  On the CPU
    (fp32/fp64 contiguous tables) each table's rows are copied straight into place, with
    no per-table tensor and no torch.cat; elsewhere F.embedding and torch.cat.  Raises
    ValueError naming the column (CPU fast path) or IndexError on an index outside a table."""
    A, E = len(tables), tables[0].shape[1]
    _check_index("ids", ids, (None, A), tables[0].device)
    if not (tables[0].is_cpu and tables[0].dtype in (torch.float32, torch.float64)
            and all(t.is_contiguous() and t.dtype == tables[0].dtype and t.shape[1] == E for t in tables)):
        return torch.cat([torch.nn.functional.embedding(ids.select(1, a), t) for a, t in enumerate(tables)],
                         1)
    ids = _as(ids, torch.int64)
    out = torch.empty(ids.shape[0], A * E, dtype=tables[0].dtype)
    for a, t in enumerate(tables):
        try:
            _C.gather_rows(out.data_ptr() + a * E * out.element_size(), A * E, t.data_ptr(), t.shape[0], E,
                           ids.data_ptr() + a * ids.element_size(), A, ids.shape[0], _DTYPE_CODE[t.dtype],
                           torch.get_num_threads())
        except ValueError as e:
            raise ValueError(f"ids[:, {a}] indexes tables[{a}]: {e}") from None
    return out


def prelu_backward(grad: Tensor, x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """PReLU's input and slope gradients for x [N, C], weight [C] or [1]: grad * (x > 0 ? 1
    : weight) and the sum over rows of (x > 0 ? 0 : grad * x).  On the CPU (fp32/fp64,
    contiguous) one pass of _C.prelu_backward, the slope's sum in row order (in double for
    fp32); aten's own kernel took 0.5 ms on [1024, 200] (2 threads), ~20x an elementwise
    op there.  Elsewhere, and under create_graph, differentiable torch ops."""
    if x.dim() != 2 or grad.shape != x.shape or weight.numel() not in (1, x.shape[1]):
        raise ValueError(f"prelu_backward: grad and x must be [N, C] and weight [C] or [1], got "
                         f"{tuple(grad.shape)}, {tuple(x.shape)} and {tuple(weight.shape)}")
    C, wC = x.shape[1], weight.numel()
    graph = torch.is_grad_enabled() and (grad.requires_grad or x.requires_grad or weight.requires_grad)
    same = grad.dtype == x.dtype == weight.dtype
    if x.is_cpu and x.dtype in (torch.float32, torch.float64) and same and not graph:
        x, grad, w = _as(x, x.dtype), _as(grad, x.dtype), _as(weight, x.dtype)
        gx, gw = torch.empty_like(x), torch.empty(wC, dtype=x.dtype)
        _C.prelu_backward(gx.data_ptr(), gw.data_ptr(), grad.data_ptr(), x.data_ptr(), w.data_ptr(),
                          x.shape[0], C, wC, _DTYPE_CODE[x.dtype])
        return gx, gw.reshape(weight.shape)
    pos = x > 0
    gw = torch.where(pos, torch.zeros((), dtype=x.dtype, device=x.device), grad * x)
    gw = gw.sum(0) if wC > 1 else gw.sum().reshape(1)
    w = weight.reshape(1, wC) if wC > 1 else weight.reshape(())
    return torch.where(pos, grad, w * grad), gw.reshape(weight.shape)


# --------------------------------------------------------------------------------------
# Autograd (both ops: inputs query, keys/values, 2 index/mask inputs, 7 parameter
# lists, 5 attributes; outputs out, weights, stats)
# --------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    (query, keys, idx1, idx2, weights, biases, alphas, bn_weights, bn_biases, _rm, _rv,
     activation, normalization, scale, training, _eps) = inputs
    _out, scores, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(query, keys, idx1, idx2, scores, stats, *weights, *biases, *alphas,
                          *bn_weights, *bn_biases)
    ctx.sizes = (len(weights), len(alphas), len(bn_weights))
    ctx.attrs = (activation, normalization, scale, training)


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_scores, _grad_stats):
        query, keys, idx1, idx2, scores, stats, *params = ctx.saved_tensors
        weights, biases, alphas, bn_weights, bn_biases = _split_params(params, ctx.sizes)
        activation, normalization, scale, training = ctx.attrs
        if grad_out is None:
            grad_out = torch.zeros_like(query)
        if any(t is not None and _functorch.is_legacy_batchedtensor(t) for t in (grad_out, grad_scores)):
            raise NotImplementedError(
                "din_fused's fused op has no batched backward (torch.autograd.grad(is_grads_batched=True), "
                "torch.autograd.functional.jacobian or hessian with vectorize=True): use vectorize=False, "
                "or one backward per output")
        # Like the forward, the backward op bypasses the dispatcher in plain eager mode
        # (autograd runs it with grad mode off): ~0.5 ms of a B=128, T=10 step.
        args = (grad_out, grad_scores, query, keys, idx1, idx2, weights, biases, alphas, bn_weights,
                bn_biases, stats, scores, activation, normalization, scale, training)
        tensors = [t for t in (grad_out, grad_scores, query, keys, idx1, idx2, scores) if t is not None]
        direct = _direct(tensors + params)
        if query.dim() == 3 and not direct:
            # A [R, 1, D] query reaches here only from a direct forward (call_forward); with
            # the backward under a mode (e.g. a TorchDispatchMode), the op takes [R, D].
            dq, dk, grads = bwd_op(grad_out.squeeze(1), grad_scores, query.squeeze(1), *args[3:])
            dq = dq.unsqueeze(1)
        else:
            dq, dk, grads = _call(bwd_op, tensors + params, args, direct)
        split = _split_params(grads, ctx.sizes)
        no_grad_stats = [None] * ctx.sizes[2]  # running statistics are buffers
        return (dq, dk, None, None, *split, no_grad_stats, no_grad_stats, None, None, None, None, None)
    return backward


_BACKWARDS = {din_fwd: _make_backward(din_bwd), din_jagged_fwd: _make_backward(din_jagged_bwd)}
torch.library.register_autograd("din_fused::din_fwd", _BACKWARDS[din_fwd], setup_context=_setup_context)
torch.library.register_autograd("din_fused::din_jagged_fwd", _BACKWARDS[din_jagged_fwd],
                                setup_context=_setup_context)


class _EagerGrad(torch.autograd.Function):
    """din_fwd / din_jagged_fwd with exactly their registered autograd (_setup_context and
    the same backward), as a plain autograd.Function for eager calls that need gradients.
    The registered path redispatches, converting every list argument to the dispatcher's
    types and back, and checks the gradients through pytrees: ~0.4 ms a call, more than a
    B=128, T=10 forward.  Traced, compiled, exported and functorch calls still see the op.
    The parameter lists are passed flat, since autograd only tracks direct arguments."""

    @staticmethod
    def run(op, args):
        weights, biases, alphas, bn_weights, bn_biases = args[4:9]
        rest = ((len(weights), len(alphas), len(bn_weights)), *args[9:])
        return _EagerGrad.apply(op, rest, *args[:4], *weights, *biases, *alphas, *bn_weights, *bn_biases)

    @staticmethod
    def forward(ctx, op, rest, query, keys, idx1, idx2, *flat):
        args = (query, keys, idx1, idx2, *_split_params(flat, rest[0]), *rest[1:])
        output = _IMPLS[op](*args)
        _setup_context(ctx, args, output)
        ctx.backward_fn = _BACKWARDS[op]
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_scores, grad_stats):
        create_graph = torch.is_grad_enabled()  # autograd runs a backward in grad mode only then
        with torch.no_grad():
            g = ctx.backward_fn(ctx, grad_out, grad_scores, grad_stats)
        grads = (None, None, g[0], g[1], None, None, *[t for group in g[4:9] for t in group])
        return _undifferentiable(grads) if create_graph else grads


def _undifferentiable(grads: tuple) -> tuple:
    """The gradients of a backward run with create_graph, behind a node that raises if anything
    differentiates them: the backward kernels have no backward.  (once_differentiable adds that
    node only when the incoming gradients require grad, which those of a loss seldom do: a
    gradient penalty through the op then got no gradient at all, silently.)"""
    at = [i for i, g in enumerate(grads) if g is not None]
    if not at:
        return grads
    err = torch._C._functions.DelayedError(
        b"din_fused's fused op has no double backward (its backward kernels have no backward): "
        b"differentiate din_attention_ref instead, e.g. for a gradient penalty", len(at))
    marked = err(*[grads[i].detach().requires_grad_() for i in at])
    out = list(grads)
    for i, g in zip(at, marked if isinstance(marked, tuple) else (marked,)):
        out[i] = g
    return tuple(out)
