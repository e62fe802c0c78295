"""Shapes, inputs and providers shared by the pytest-benchmark suite and report.py.

A *case* is one problem (B, T, D, hidden sizes, activation, normalisation, length
distribution).  A *provider* is one implementation of the same layer with the
same weights:

- ``fused``: din_fused.FusedDINAttention (the fused kernel);
- ``reference``: the pure-PyTorch oracle ``din_fused.reference.din_attention_ref``
  (through ``FusedDINAttention(impl="reference")``, which calls it);
- ``compiled_ref``: ``torch.compile`` of that reference module;
- ``deepctr``: DeepCTR-Torch's ``AttentionSequencePoolingLayer`` (when importable);
- ``compiled_deepctr``: ``torch.compile`` of DeepCTR-Torch's layer.

Every provider takes DeepCTR's calling convention: query [B,1,D], keys [B,T,D],
keys_length [B,1].  The fused module is built from the DeepCTR layer with
``FusedDINAttention.from_deepctr`` when DeepCTR-Torch is available, so all
providers share the weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import warnings
from dataclasses import asdict, dataclass, field, replace

import torch

from din_fused import FusedDINAttention

PROVIDERS = ("fused", "reference", "compiled_ref", "deepctr", "compiled_deepctr")
BASELINES = ("reference", "compiled_ref", "deepctr", "compiled_deepctr")
LENGTHS = ("uniform", "longtail", "full")


@dataclass(frozen=True)
class Case:
    B: int = 1024
    T: int = 100
    D: int = 36
    hidden: tuple = (80, 40)
    activation: str = "sigmoid"
    normalization: str = "none"
    lengths: str = "uniform"
    max_len: int = 0            # lengths drawn in 1..max_len (0: T); padding beyond it
    dtype: str = "float32"
    seed: int = 0
    compile: bool = False       # include the torch.compile providers
    tags: tuple = field(default=(), compare=False)

    @property
    def id(self) -> str:
        h = "x".join(str(x) for x in self.hidden)
        s = (f"B{self.B}-T{self.T}-D{self.D}-H{h}-{self.activation}-{self.normalization}-"
             f"{self.lengths}")
        if self.max_len:
            s += f"-L{self.max_len}"
        if self.dtype != "float32":
            s += f"-{self.dtype}"
        return s

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["tags"] = list(self.tags)
        return d

    @staticmethod
    def from_dict(d: dict) -> Case:
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        d["tags"] = tuple(d.get("tags", ()))
        return Case(**d)


HEADLINE = Case(compile=True, tags=("headline",))


def default_sweep() -> list[Case]:
    """A few minutes on 2 cores: the headline shape plus one-factor-at-a-time variations."""
    h = replace(HEADLINE, compile=False, tags=())
    return [
        HEADLINE,
        replace(h, T=20), replace(h, T=400),
        replace(h, B=128),
        replace(h, D=8), replace(h, D=64),
        replace(h, hidden=(36,)), replace(h, hidden=(200, 80, 40)),
        replace(h, activation="relu"), replace(h, activation="prelu"), replace(h, activation="dice"),
        replace(h, normalization="softmax"),
        replace(h, lengths="longtail"), replace(h, lengths="full"),
    ]


def full_sweep() -> list[Case]:
    """The big sweep (--bench-full / DIN_BENCH_FULL=1): wider one-factor-at-a-time
    ranges, a few crossed combinations, and the compiled providers everywhere."""
    h = replace(HEADLINE, tags=())
    out = [HEADLINE]
    out += [replace(h, B=b) for b in (32, 256, 4096)]
    out += [replace(h, T=t) for t in (10, 50, 200, 500, 1000)]
    out += [replace(h, D=d) for d in (4, 8, 16, 64, 128)]
    out += [replace(h, hidden=hs) for hs in ((36,), (64, 32), (200, 80), (200, 80, 40), (256, 128, 64, 32))]
    out += [replace(h, activation=a, normalization=n)
            for a in ("sigmoid", "relu", "prelu", "dice") for n in ("none", "softmax")
            if (a, n) != ("sigmoid", "none")]
    out += [replace(h, lengths=ln, T=t) for ln in ("longtail", "full") for t in (100, 1000)]
    return out


# ----------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------
def make_lengths(case: Case, generator: torch.Generator) -> torch.Tensor:
    """[B] int64 valid lengths in 1..max_len (max_len defaults to T).

    uniform: uniform in 1..max_len.  longtail: 90% of the rows uniform in
    1..max(1, max_len//10), 10% at max_len (most rows short, a few long).
    full: every row at max_len.
    """
    B, top = case.B, case.max_len or case.T
    if case.lengths == "uniform":
        return torch.randint(1, top + 1, (B,), generator=generator)
    if case.lengths == "longtail":
        short = torch.randint(1, max(1, top // 10) + 1, (B,), generator=generator)
        long = torch.rand(B, generator=generator) < 0.1
        return torch.where(long, torch.full_like(short, top), short)
    if case.lengths == "full":
        return torch.full((B,), top, dtype=torch.int64)
    raise ValueError(f"unknown length distribution {case.lengths!r}")


def make_inputs(case: Case, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(case.seed)
    dtype = getattr(torch, case.dtype)
    q = torch.randn(case.B, 1, case.D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(case.B, case.T, case.D, generator=g).to(device=device, dtype=dtype)
    lengths = make_lengths(case, g).to(device)
    grad = torch.randn(case.B, 1, case.D, generator=g).to(device=device, dtype=dtype)
    return {"query": q, "keys": k, "lengths": lengths[:, None], "grad": grad}


def sum_lengths(inputs: dict) -> int:
    return int(inputs["lengths"].sum())


def forward_flops(case: Case, n_valid: int, folded: bool = True) -> float:
    """Napkin forward FLOPs with the fold: 2*(D*H1 + sum H_{l-1} H_l + H_L + D) per valid position.
    folded=False: a chain of ops (DeepCTR-Torch, the eager reference), whose first Linear reads
    the 4D-wide [q, k, q-k, q*k] (4*D*H1 instead of D*H1)."""
    hs = case.hidden
    first = (1 if folded else 4) * case.D * hs[0]
    per = first + sum(a * b for a, b in zip(hs[:-1], hs[1:])) + hs[-1] + case.D
    return 2.0 * per * n_valid


def ratio_bound(case: Case, n_valid: int, target: float, base_s: float, fused_s: float, peak) -> str:
    """What a forward ``target`` times faster than a chain-of-ops baseline taking ``base_s`` needs:
    the fused napkin FLOPs in base_s / target, beside the rate the fused call (``fused_s``) ran at,
    against ``peak`` ((GFLOP/s, ISA) or None). Both sides' counts are given: the baseline's first
    Linear does 4x the folded one's work."""
    fused, chain = forward_flops(case, n_valid), forward_flops(case, n_valid, folded=False)
    need, ran = fused * target / base_s / 1e9, fused / fused_s / 1e9

    def pct(rate):
        return f" ({100 * rate / peak[0]:.0f}%)" if peak else ""

    base = chain / base_s / 1e9
    text = (f"Napkin: the fused call {fused / 1e6:,.1f} MFLOP, run at {ran:.0f} GFLOP/s{pct(ran)}; "
            f"DeepCTR-Torch {chain / 1e6:,.1f} MFLOP, run at {base:.0f} GFLOP/s{pct(base)}. "
            f"{target:g}x its time is {base_s / target * 1e3:.3f} ms: {need:.0f} GFLOP/s{pct(need)}")
    if peak:
        text += f" of the {peak[1]} FMA peak measured now ({peak[0]:.0f} GFLOP/s)"
    return text + "."


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------
def deepctr_available() -> bool:
    try:
        _import_deepctr()
        return True
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False


def _import_deepctr():
    # deepctr_torch prints a version-check banner on import; keep the bench output clean.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from deepctr_torch.layers.sequence import AttentionSequencePoolingLayer
    return AttentionSequencePoolingLayer


def _build_modules(case: Case, device: str) -> dict:
    torch.manual_seed(case.seed + 1)
    dtype = getattr(torch, case.dtype)
    softmax = case.normalization == "softmax"
    mods = {}
    if deepctr_available():
        Layer = _import_deepctr()
        layer = Layer(att_hidden_units=case.hidden, att_activation=case.activation,
                      weight_normalization=softmax, embedding_dim=case.D)
        layer = layer.to(device=device, dtype=dtype)
        mods["deepctr"] = layer
        fused = FusedDINAttention.from_deepctr(layer)
    else:
        fused = FusedDINAttention(case.D, case.hidden, case.activation, weight_normalization=softmax)
        fused = fused.to(device=device, dtype=dtype)
    if case.activation == "dice":
        # Give the Dice BatchNorms non-trivial running statistics (eval mode uses them).
        with torch.no_grad():
            for m in [fused] + list(mods.values()):
                for a in m.local_att.dnn.activation_layers:
                    a.bn.running_var.fill_(2.0)
    mods["fused"] = fused
    ref = copy.deepcopy(fused)
    ref.impl = "reference"
    mods["reference"] = ref
    return mods


class ProviderSet:
    """The providers of one case, built lazily, all with the same weights.

    get(name) -> nn.Module-like callable(query, keys, keys_length), or None when
    the provider is unavailable (DeepCTR-Torch not installed)."""

    def __init__(self, case: Case, device: str = "cpu"):
        self.case, self.device = case, device
        self._mods = _build_modules(case, device)

    def get(self, name: str):
        if name not in PROVIDERS:
            raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")
        if name not in self._mods and name.startswith("compiled_"):
            base = self._mods.get("reference" if name == "compiled_ref" else "deepctr")
            if base is not None:
                self._mods[name] = torch.compile(copy.deepcopy(base))
        return self._mods.get(name)


def quiet_compile_logs() -> None:
    """Silence torch.compile's graph-break warnings (the reference has data-dependent shapes)."""
    import logging

    os.environ.setdefault("TORCHDYNAMO_VERBOSE", "0")
    for name in ("torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\._dynamo.*")
    warnings.filterwarnings("ignore", module=r"torch\._inductor.*")


# ----------------------------------------------------------------------------------------
# Timed calls
# ----------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _set_mode(module, training: bool) -> None:
    """Put ``module`` in train or eval mode unless it already is.  The timed calls check
    the flag instead of calling ``train()``/``eval()`` every time: either walks every
    submodule (32-45 us for these modules on a Zen 4, a quarter of the fused forward at
    B=128, T=10), a cost a user pays once per epoch or deployment, not per call."""
    if module.training != training:
        module.train(training)


def forward_call(module, inputs: dict, device: str = "cpu"):
    """Inference forward (eval mode, no autograd); synchronises on CUDA inside the call."""
    q, k, L = inputs["query"], inputs["keys"], inputs["lengths"]

    def run():
        _set_mode(module, False)
        with torch.no_grad():
            out = module(q, k, L)
        _sync(device)
        return out

    return run


def fwdbwd_call(module, inputs: dict, device: str = "cpu"):
    """Training step without the optimizer: train mode, forward, backward of a fixed
    upstream gradient into query, keys and every parameter (gradients are dropped
    before each call so nothing accumulates)."""
    q = inputs["query"].detach().clone().requires_grad_(True)
    k = inputs["keys"].detach().clone().requires_grad_(True)
    L, g = inputs["lengths"], inputs["grad"]
    params = [p for p in module.parameters() if p.requires_grad]

    def clear():
        q.grad = None
        k.grad = None
        for p in params:
            p.grad = None

    def run():
        clear()
        _set_mode(module, True)
        out = module(q, k, L)
        out.backward(g)
        _sync(device)

    run.clear = clear
    return run


def call_for(mode: str):
    if mode == "fwd":
        return forward_call
    if mode == "fwdbwd":
        return fwdbwd_call
    raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")


# No mmap for large blocks and no trimming: freed memory stays in the process for reuse, as
# jemalloc or tcmalloc (common in serving) keep it. With glibc's defaults, a chain of ops'
# multi-MB temporaries go back to the OS when freed and each call faults them in again.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def allocator_mode(keep_freed_memory: bool) -> str:
    """The glibc mode this process runs in, for a table's header. Asked to keep freed memory
    and not yet doing so, the script runs again with KEEP_FREED_MEMORY (glibc reads it at
    start-up)."""
    import os
    import sys

    keep = all(os.environ.get(k) == v for k, v in KEEP_FREED_MEMORY.items())
    if keep_freed_memory and not keep:
        argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]  # with interpreter flags
        os.execve(sys.executable, argv, {**os.environ, **KEEP_FREED_MEMORY})
    return "glibc keeping freed memory" if keep else "glibc defaults"


def write_markdown(text: str, out, tag: str) -> None:
    """Write a benchmark's markdown to ``out`` (parents created) and say where."""
    from pathlib import Path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[{tag}] wrote {out}")
