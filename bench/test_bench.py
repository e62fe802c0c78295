"""Side-by-side benchmarks of the fused DIN attention pooling against its baselines.

Each case is timed for every provider in two groups, forward ("fwd") and
forward+backward ("fwd+bwd"); see conftest.py for the options and cases.py for
the shapes and providers.  The CUDA timings synchronise inside the timed call.
The "train step" groups time one whole DIN training step of the models in
train_step.py; the "layout" groups compare layouts.py's jagged, shared, padded, tiled and
DeepCTR-Torch providers of one case; the "long" groups time long_seq.py's long rows on 1 and 2
threads; the "serving" groups, serving_latency.py's small call and one user's history against
100 candidates (all CPU only; ``--bench-providers`` does not apply to them).
"""

from __future__ import annotations

import re
from dataclasses import asdict

import cases
import layouts
import long_seq
import pytest
import serving_latency
import torch
import train_step

_INPUTS: dict = {}
_PROVIDERS: dict = {}  # one case's providers at a time


def _inputs(case, device):
    key = (case, device)
    if key not in _INPUTS:
        _INPUTS.clear()  # one case's tensors at a time
        _INPUTS[key] = cases.make_inputs(case, device)
    return _INPUTS[key]


def _provider(case, device, name):
    key = (case, device)
    if key not in _PROVIDERS:
        _PROVIDERS.clear()
        _PROVIDERS[key] = cases.ProviderSet(case, device)
    module = _PROVIDERS[key].get(name)
    if module is None:
        pytest.skip(f"provider {name} unavailable")
    return module


def _run(benchmark, case, provider, device, rounds, mode):
    inputs = _inputs(case, device)
    module = _provider(case, device, provider)
    fn = cases.call_for(mode)(module, inputs, device)
    fn()  # warm-up (and compilation for the torch.compile providers)
    benchmark.group = f"{'fwd' if mode == 'fwd' else 'fwd+bwd'} {case.id}"
    n_valid = cases.sum_lengths(inputs)
    benchmark.extra_info.update(case=case.to_dict(), provider=provider, mode=mode, device=device,
                                sum_lengths=n_valid, threads=torch.get_num_threads())
    if mode == "fwd":
        benchmark.extra_info["napkin_gflop"] = cases.forward_flops(case, n_valid) / 1e9
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


def test_fwd(benchmark, case, provider, device, rounds):
    _run(benchmark, case, provider, device, rounds, "fwd")


def test_fwdbwd(benchmark, case, provider, device, rounds):
    _run(benchmark, case, provider, device, rounds, "fwdbwd")


@pytest.mark.parametrize("attention", train_step.ATTENTIONS)
@pytest.mark.parametrize("provider", train_step.PROVIDERS)
def test_train_step(benchmark, provider, attention, device, rounds):
    """One whole DIN training step per call (train_step.py's providers and shape), CPU only."""
    if device != "cpu":
        pytest.skip("the training-step group is CPU only")
    if provider not in train_step.available_providers():
        pytest.skip(f"provider {provider} unavailable")
    shape = train_step.Shape()
    step = train_step.build(provider, attention, shape).step
    step()  # warm-up (Adam's state)
    benchmark.group = f"train step {attention} attention {shape.id}"
    benchmark.extra_info.update(provider=provider, attention=attention, shape=asdict(shape),
                                threads=torch.get_num_threads())
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


def test_layout(benchmark, layout, device, rounds):
    """One forward (eval, no_grad) of a layouts.py provider: jagged or padded on the skewed batch,
    shared or tiled (and DeepCTR-Torch) on one user's history against C candidates."""
    if device != "cpu":
        pytest.skip("the layout groups are CPU only")
    group, spec = layout
    fn, desc, _ = layouts.build_case(**spec)

    def call():
        with torch.no_grad():
            fn()

    call()
    benchmark.group = f"layout {group}"
    benchmark.extra_info.update(spec=spec, input=desc, threads=torch.get_num_threads())
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def test_long(benchmark, long_shape, mode, threads, device, rounds):
    """One long row (or four) on 1 and 2 threads: the CPU cuts rows over positions."""
    if device != "cpu":
        pytest.skip("the long-sequence groups are CPU only")
    B, T = long_shape
    case = long_seq.case(B, T)
    fn = cases.call_for(mode)(cases.ProviderSet(case).get("fused"), cases.make_inputs(case))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn()
        benchmark.group = f"long {mode} B={B} T={T}"
        benchmark.extra_info.update(B=B, T=T, mode=mode, threads=threads)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(before)


_SERVING = [("small", name) for name in serving_latency.SMALL_PROVIDERS] + \
    [("user", name) for name in serving_latency.USER_PROVIDERS]


@pytest.mark.parametrize("call", _SERVING, ids=[re.sub(r"[^A-Za-z0-9]+", "-", f"{g} {n}").strip("-")
                                                 for g, n in _SERVING])
def test_serving(benchmark, call, device, rounds):
    """Serving-sized calls (eval, no_grad): B=1, T=1, D=8, and one user's T=50 history against
    C=100 candidates, as serving_latency.py times them (issue 10)."""
    if device != "cpu":
        pytest.skip("the serving groups are CPU only")
    group, name = call
    fn = (serving_latency.small_calls() if group == "small" else serving_latency.user_calls()).get(name)
    if fn is None:
        pytest.skip(f"provider {name} unavailable")

    n = 100 if group == "small" else 5  # many calls a round: one small call is ~15 us

    def calls():
        with torch.no_grad():
            for _ in range(n):
                fn()

    calls()
    benchmark.group = ("serving small call B=1 T=1 D=8" if group == "small" else
                       "serving one user T=50 against C=100, D=36") + f", {n} calls a round"
    benchmark.extra_info.update(provider=name, threads=torch.get_num_threads(), calls_per_round=n)
    benchmark.pedantic(calls, rounds=rounds, iterations=1, warmup_rounds=1)
