"""Whole DIN training steps side by side (issue 12): DeepCTR-Torch, DeepCTR-Torch with the fused
attention swapped in, and din_fused.model.DIN.

Providers (same features, sizes, optimizer and batch):

- ``deepctr``: DeepCTR-Torch ``deepctr_torch.models.DIN``, eager;
- ``deepctr_swapped``: the same model with
  ``model.attention = FusedDINAttention.from_deepctr(model.attention)`` (the fused layer reuses the
  DeepCTR layer's Parameters; Adam is built after the swap);
- ``din_fused``: ``din_fused.model.DIN`` with ``attention="concat"`` (one attention unit over the
  item and category embeddings side by side, which is what DeepCTR's DIN does), fed jagged batches
  (values + offsets, no padding: the training job's default ``--layout``; ``--layout padded`` for
  the other).

Shape: B=1024 rows per step; history up to T=50, lengths uniform in 1..50; two attributes, item
(10,000 ids) and category (20 ids, a fixed random category per item), both in the candidate and
the history, candidate and history sharing one table per attribute; embedding E=16 per attribute
(the attention sees [A*E] = 32); attention unit 80-40 and MLP 200-80 (din_fused.model's defaults,
the paper's sizes; DeepCTR's own defaults are 64-16 and 256-128), MLP activation PReLU, attention
activation Dice or sigmoid (two tables). Ids are synthetic and uniform; no data set is read.
Not quite the same model, which does not matter for timing:
- DeepCTR's DNN cannot use Dice: it builds Dice with ``dim=3`` and crashes on its 2-D input,
  hence PReLU in the MLP of all three. DeepCTR's PReLU has one slope per layer, din_fused's one per
  unit;
- DeepCTR's attention Dice counts the padded positions in its batch statistics, din_fused's Dice
  (swapped in or in din_fused.model.DIN) counts only valid ones;
- DeepCTR's embedding L2 (``l2_reg_embedding``, a sum over the whole tables every step) is off.

One step = forward, loss (binary cross-entropy, mean over the batch where DeepCTR's ``fit`` sums;
DeepCTR's model ends in a sigmoid, din_fused's returns logits), backward, ``Adam.step`` (lr 1e-3,
fused, as ``din_fused.train.adam`` builds it for the main job, for every provider), ``zero_grad``.
DeepCTR's ``fit`` is not used (its DataLoader and metrics would be timed too); its forward gets the
[B, 2T+3] float tensor that ``fit`` builds from the feature dict in the model's ``feature_index``
order, prepared once.

Time: warm-up steps, then ``--rounds`` rounds; each round runs ``--steps`` steps of every provider
in turn (the order rotates), and the table shows the median over rounds of ms per step. Peak
memory: one fresh process per provider (peakmem.py, as layouts.py), the peak RSS above the resident
model and optimizer during one step after two warm-up steps, plus the bytes of its input tensors.

    python bench/train_step.py [--rounds 5] [--steps 4] [--layout jagged] [--quick]
                               [--out bench/results/local/train_step.md]

The OpenMP wait policy is the environment's (the table says which); ``python -m din_fused.train``
runs with ``OMP_WAIT_POLICY=passive`` unless told otherwise, so set it for figures that match the
training job's on a shared machine.

``--quick`` (B=128, 2 rounds of 2 steps, peak memory of the Dice table only: each child process
takes seconds to import torch and DeepCTR) is a smoke run. The same builders back the
pytest-benchmark group ``train step`` in test_bench.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # bench/ (cases, peakmem) and the checkout (din_fused)
import cases  # noqa: E402
import peakmem  # noqa: E402
import report  # noqa: E402

from din_fused import FusedDINAttention  # noqa: E402
from din_fused.data.batching import Batch, JaggedBatch, gather_jagged, gather_padded  # noqa: E402
from din_fused.model import DIN  # noqa: E402
from din_fused.train import adam  # noqa: E402

PROVIDERS = ("deepctr", "deepctr_swapped", "din_fused")
ATTENTIONS = ("dice", "sigmoid")
TARGET_STEP = report.TARGET_STEP  # issue 12: a whole step >= 10x DeepCTR-Torch's
FWDBWD_FLOPS = report.FWDBWD_FLOPS
LABELS = {
    "deepctr": "DeepCTR-Torch `DIN`",
    "deepctr_swapped": "the same with `FusedDINAttention.from_deepctr` swapped in",
    "din_fused": "`din_fused.model.DIN`",
}


@dataclass(frozen=True)
class Shape:
    B: int = 1024
    T: int = 50
    E: int = 16
    items: int = 10_000
    categories: int = 20
    att_hidden: tuple = (80, 40)
    mlp_hidden: tuple = (200, 80)
    lr: float = 1e-3
    layout: str = "jagged"  # din_fused.model.DIN's input
    seed: int = 0

    @property
    def id(self) -> str:
        return f"B{self.B}-T{self.T}-E{self.E}-{self.layout}"


QUICK = Shape(B=128)


@dataclass
class Provider:
    """One provider, ready to train: ``step()`` runs one whole training step."""

    step: Callable[[], None]
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    input_bytes: int

    def state_bytes(self) -> int:
        """Parameters plus the optimizer's state (Adam's two moments, after a first step)."""
        ts = list(self.model.parameters())
        ts += [v for s in self.opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------------------
# The batch
# ----------------------------------------------------------------------------------------
def make_batch(shape: Shape) -> dict:
    """One synthetic batch, padded and jagged: target [B, 2], history [B, T, 2] (0 beyond the
    length), values [N, 2] + offsets [B+1], lengths [B], label [B]. Column 0 is the item id
    (1..items), column 1 its category (1..categories, fixed per item)."""
    g = torch.Generator().manual_seed(shape.seed)
    cate_of = torch.randint(1, shape.categories + 1, (shape.items + 1,), generator=g)
    cate_of[0] = 0

    def ids(*size):
        item = torch.randint(1, shape.items + 1, size, generator=g)
        return torch.stack([item, cate_of[item]], dim=-1)

    B, T = shape.B, shape.T
    target = ids(B)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    # The data module's own gathers, from a store of B back-to-back windows of T behaviours.
    store, start = ids(B * T), torch.arange(B) * T
    values, offsets = gather_jagged(store, start, lengths)
    return {"target": target, "history": gather_padded(store, start, lengths, T), "lengths": lengths,
            "values": values, "offsets": offsets, "label": torch.randint(0, 2, (B,), generator=g).float()}


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------
def _deepctr(shape: Shape, attention: str):
    """DeepCTR-Torch's DIN on item + category, and the feature-name -> column map of its input."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its import prints a version-check banner
        from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
        from deepctr_torch.models import DIN as DeepCTRDIN
    E, T = shape.E, shape.T
    cols = [SparseFeat("item_id", shape.items + 1, embedding_dim=E),
            SparseFeat("cate_id", shape.categories + 1, embedding_dim=E)]
    cols += [VarLenSparseFeat(SparseFeat("hist_" + f.name, f.vocabulary_size, embedding_dim=E,
                                         embedding_name=f.name), maxlen=T, length_name="seq_length")
             for f in list(cols)]
    return DeepCTRDIN(cols, ["item_id", "cate_id"], dnn_hidden_units=shape.mlp_hidden, dnn_activation="prelu",
                      att_hidden_size=shape.att_hidden, att_activation=attention, l2_reg_embedding=0.0,
                      init_std=0.05, seed=shape.seed, device="cpu")


def _deepctr_input(model, b: dict) -> torch.Tensor:
    """What ``fit`` feeds the forward: every feature as float columns, in ``feature_index`` order."""
    cols = {"item_id": b["target"][:, :1], "cate_id": b["target"][:, 1:],
            "hist_item_id": b["history"][..., 0], "hist_cate_id": b["history"][..., 1],
            "seq_length": b["lengths"][:, None]}
    for name, (lo, hi) in model.feature_index.items():
        if cols[name].shape[1] != hi - lo:
            raise RuntimeError(f"DeepCTR feature {name}: {hi - lo} columns, built {cols[name].shape[1]}")
    return torch.cat([cols[name] for name in model.feature_index], dim=1).float()


def build(provider: str, attention: str, shape: Shape | None = None) -> Provider:
    """A provider with fresh weights (seeded), its Adam, and one prepared batch (``shape``: Shape())."""
    shape = shape or Shape()
    if provider not in PROVIDERS or attention not in ATTENTIONS:
        raise ValueError(f"provider must be one of {PROVIDERS} and attention one of {ATTENTIONS}, "
                         f"got {provider!r}, {attention!r}")
    b = make_batch(shape)
    label = b["label"]
    if provider.startswith("deepctr"):
        model = _deepctr(shape, attention)
        if provider == "deepctr_swapped":
            model.attention = FusedDINAttention.from_deepctr(model.attention)
        x = _deepctr_input(model, b)

        def loss_fn():
            return F.binary_cross_entropy(model(x).squeeze(-1), label)

        input_bytes = _nbytes(x, label)
    else:
        torch.manual_seed(shape.seed)
        model = DIN([shape.items + 1, shape.categories + 1], (), shape.E, attention="concat",
                    att_hidden_units=shape.att_hidden, att_activation=attention,
                    mlp_hidden_units=shape.mlp_hidden, activation="prelu")
        context, user = torch.empty(shape.B, 0, dtype=torch.int64), torch.arange(shape.B)
        if shape.layout == "jagged":
            batch = JaggedBatch(user, b["target"], b["values"], b["offsets"], context, label)
        elif shape.layout == "padded":
            batch = Batch(user, b["target"], b["history"], b["lengths"], context, label)
        else:
            raise ValueError(f"layout must be 'jagged' or 'padded', got {shape.layout!r}")

        def loss_fn():
            return F.binary_cross_entropy_with_logits(model(batch), label)

        input_bytes = _nbytes(*batch)
    model.train()
    opt = adam(model.parameters(), shape.lr)  # the main job's Adam (fused), for every provider

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Provider(step, model, opt, input_bytes)


def available_providers() -> tuple:
    return PROVIDERS if cases.deepctr_available() else ("din_fused",)


# ----------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------
def timed(steps: dict, rounds: int, per_round: int, warmup: int) -> dict:
    """name -> median over interleaved rounds of the seconds per step (`per_round` steps of each
    provider per round, the order rotating so that no provider always follows the same one)."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    names = list(steps)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[k]()
            times[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in times.items()}


def attention_alone(p: Provider) -> tuple[Callable[[], None], float]:
    """For din_fused.model.DIN: a call that runs its attention unit's forward and backward
    alone, on the inputs of one training step (caught by a hook; gradients for the inputs and
    the unit's parameters, taken with autograd.grad so that no .grad changes; a Dice unit's
    running statistics do move, as in a step), and the napkin FLOPs of that forward
    (cases.forward_flops over the step's valid positions)."""
    att = p.model.att[0]
    seen = {}
    hook = att.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                         with_kwargs=True)
    p.step()
    hook.remove()
    q, keys = (t.detach().requires_grad_() for t in seen["args"][:2])
    rest, kwargs = seen["args"][2:], seen["kwargs"]
    wrt = [q, keys, *att.parameters()]

    def run():
        out = att(q, keys, *rest, **kwargs)
        torch.autograd.grad(out, wrt, torch.ones_like(out))

    if "offsets" in kwargs:
        lens, row_seq = torch.diff(kwargs["offsets"]), kwargs.get("row_seq")
        n_valid = int((lens if row_seq is None else lens[row_seq]).sum())
    else:
        n_valid = int(rest[0].clamp(max=keys.shape[1]).sum())
    return run, cases.forward_flops(cases.Case(D=keys.shape[-1], hidden=tuple(att.att_hidden_units)), n_valid)


def child(spec: dict) -> dict:
    """In a fresh process: peak RSS above the resident model during one step (after two warm-up
    steps) plus the input tensors' bytes, and the parameters + optimizer state bytes."""
    p = build(spec["provider"], spec["attention"], Shape(**spec["shape"]))
    p.step()
    p.step()
    return {"peak_bytes": peakmem.peak_rss_above(p.step) + p.input_bytes, "state_bytes": p.state_bytes()}


def limit_note(t: dict, att_flops: float, peak: float | None) -> str:
    """Where din_fused.model.DIN's step goes, and what a 10x step against DeepCTR-Torch needs."""
    step, att = t["din_fused"], t["attention"]
    text = (f"Where the `din_fused.model.DIN` step goes: its attention unit alone (forward+backward on the "
            f"step's inputs, timed in the same rounds) takes {att * 1e3:.1f} ms of the step's "
            f"{step * 1e3:.1f} ms; the rest (embeddings, MLP, loss, Adam) {(step - att) * 1e3:.1f} ms.")
    if "deepctr" in t:
        need = t["deepctr"] / TARGET_STEP
        text += f" {TARGET_STEP:.0f}x DeepCTR-Torch's step is {need * 1e3:.1f} ms."
        if peak:
            floor = FWDBWD_FLOPS * att_flops / (peak * 1e9)
            text += (f" The attention's forward+backward does ~{FWDBWD_FLOPS:.0f}x its forward's napkin "
                     f"FLOPs ({FWDBWD_FLOPS * att_flops / 1e9:.2f} GFLOP; it recomputes the activations): "
                     f"at this machine's measured FMA peak ({peak:.0f} GFLOP/s) that alone is "
                     f"{floor * 1e3:.1f} ms, which leaves {(need - floor) * 1e3:.1f} ms for the rest of the "
                     f"step, against the {(step - att) * 1e3:.1f} ms it takes now.")
    return text


def section(attention: str, shape: Shape, a, lines: list) -> dict:
    """Times one attention activation's step for every provider and appends its table to
    ``lines``; returns the medians (seconds per step, with "attention": the unit alone) and
    the napkin FLOPs of the unit's forward ("att_flops")."""
    names = available_providers()
    built = {k: build(k, attention, shape) for k in names}
    steps = {k: p.step for k, p in built.items()}
    steps["attention"], att_flops = attention_alone(built["din_fused"])
    t = timed(steps, a.rounds, a.steps, a.warmup)
    del built, steps
    mem = {k: (peakmem.run_child(__file__, {"provider": k, "attention": attention, "shape": asdict(shape)})
               if attention in a.memory else None) for k in names}
    base = "deepctr" if "deepctr" in names else None
    lines += [f"#### {attention.capitalize()} attention", "",
              "| model | ms / step | samples / s | speed-up vs DeepCTR | step peak MB | peak vs DeepCTR "
              "| params + Adam MB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k in names:
        m, mb = mem[k], mem.get(base) if base else None
        speed = f"{t[base] / t[k]:.1f}x" if base else "n/a"
        peak = "n/a" if m is None else f"{m['peak_bytes'] / 2**20:.1f}"
        peak_ratio = "n/a" if m is None or mb is None else f"{m['peak_bytes'] / mb['peak_bytes']:.2f}x"
        state = "n/a" if m is None else f"{m['state_bytes'] / 2**20:.1f}"
        lines.append(f"| {LABELS[k]} | {t[k] * 1e3:.1f} | {shape.B / t[k]:,.0f} | {speed} | {peak} | "
                     f"{peak_ratio} | {state} |")
    if attention not in a.memory:
        lines += ["", "Peak memory not measured in this run (train_step.py: --quick or --no-memory; "
                  "report.py: --quick or --skip-mem)."]
    lines += ["", limit_note(t, att_flops, a.peak)]
    lines.append("")
    print("\n".join(lines[lines.index(f"#### {attention.capitalize()} attention"):]), flush=True)
    return {**t, "att_flops": att_flops}


def header(shape: Shape, a) -> list:
    """The markdown heading of the step tables (``a``: rounds, steps)."""
    h = "-".join(map(str, shape.att_hidden)), "-".join(map(str, shape.mlp_hidden))
    lines = [f"### Whole DIN training step: B={shape.B}, T={shape.T} (lengths uniform in 1..{shape.T}), "
             f"item ({shape.items:,} ids) + category ({shape.categories} ids), E={shape.E}, "
             f"attention {h[0]}, MLP {h[1]} PReLU, Adam, fp32, din_fused.model.DIN fed {shape.layout} "
             "batches; "
             f"{torch.get_num_threads()} threads, "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"median of {a.rounds} interleaved rounds of {a.steps} steps; step peak = peak RSS above "
             "the resident model during one step, inputs included", ""]
    if not cases.deepctr_available():
        lines += ["DeepCTR-Torch is not importable: din_fused.model.DIN only.", ""]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4, help="steps of each provider per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each provider first")
    ap.add_argument("--layout", choices=("jagged", "padded"), default="jagged",
                    help="din_fused.model.DIN's batches (the training job's default: jagged)")
    ap.add_argument("--attention", choices=ATTENTIONS, help="only this attention activation")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: B=128, 2 rounds of 2 steps, 1 warm-up, peak memory of the Dice "
                    "table only")
    ap.add_argument("--out", default=str(HERE / "results" / "local" / "train_step.md"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    shape = Shape()
    a.memory = () if a.no_memory else ATTENTIONS
    probe = report.fma_peak_gflops(torch.get_num_threads())
    a.peak = probe[0] if probe else None
    if a.quick:
        shape = QUICK
        a.rounds, a.steps, a.warmup = 2, 2, 1
        a.memory = a.memory[:1]
    shape = replace(shape, layout=a.layout)
    lines = header(shape, a)
    print("\n".join(lines), flush=True)
    for att in [a.attention] if a.attention else ATTENTIONS:
        section(att, shape, a, lines)
    cases.write_markdown("\n".join(lines) + "\n", a.out, "train_step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
