"""Resources and concurrency of the fused op on CPU (issue 14).

* Python threads calling forward+backward at once on different inputs get
  exactly (bitwise) the serial results: the op keeps no shared mutable state
  and releases the GIL around the kernels.
* 5,000 forward+backward calls do not grow the resident set (no leak of
  workspaces, saved tensors or pybind11 objects).
* An input with more than 2^31 elements works (64-bit offsets all the way):
  the last rows of a ~2.2e9-element forward match the reference run on those
  rows alone.  Needs ~10 GB, so it only runs when 13 GB are free (and not with
  DIN_TEST_BIG=0, for shared machines).
"""

from __future__ import annotations

import gc
import os
import threading

import pytest
import torch
from common import clone_params, param_tensors, random_params

import din_fused
from din_fused.reference import din_attention_ref


def _problem(seed, B=13, T=17, D=9, hidden=(10, 6), act="dice"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=gen)
    k = torch.randn(B, T, D, generator=gen)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = T
    p = random_params(D, hidden, act, dtype=torch.float32, gen=gen)
    return q, k, lengths, p


def _fwd_bwd(q, k, lengths, p, training=True):
    p = clone_params(p)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    out, w = din_fused.din_attention(qq, kk, lengths, **p, training=training, normalization="softmax",
                                     scale=1.3, return_scores=True)
    grads = torch.autograd.grad((out ** 2).sum() + (w * w).sum(), [qq, kk, *param_tensors(p)])
    return [out.detach(), w.detach(), *grads, *p["running_means"], *p["running_vars"]]


def test_threads_get_the_serial_results():
    problems = [_problem(seed) for seed in range(4)]
    serial = [_fwd_bwd(*pr) for pr in problems]
    results = [[] for _ in problems]
    errors = []
    start = threading.Barrier(len(problems))

    def worker(i):
        try:
            start.wait()
            for _ in range(10):
                results[i].append(_fwd_bwd(*problems[i]))
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in enumerate(results):
        assert len(runs) == 10
        for run in runs:
            for a, b in zip(run, serial[i]):
                assert torch.equal(a, b), f"thread {i} differs from the serial run"


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)")
def test_no_memory_growth_over_5000_calls():
    q, k, lengths, p = _problem(5, B=8, T=12, D=8, hidden=(8,))
    for _ in range(300):  # warm up allocator caches and lazily built state
        _fwd_bwd(q, k, lengths, p)
    gc.collect()
    before = _rss_bytes()
    for _ in range(5000):
        _fwd_bwd(q, k, lengths, p)
    gc.collect()
    grown = _rss_bytes() - before
    assert grown < 5 * 2**20, f"RSS grew by {grown / 2**20:.1f} MB over 5000 forward+backward calls"


def _mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


BIG = (1 << 20, 16, 128)   # B, T, D: 2^31 key elements, plus one row -> over 2^31
BIG_GB = 11.0              # keys 8.6 GB + query/out 1.1 GB + scores, with margin


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DIN_TEST_BIG", "1") == "0", reason="DIN_TEST_BIG=0")
@pytest.mark.skipif(_mem_available_gb() < BIG_GB + 2,
                    reason=f"needs ~{BIG_GB:.0f} GB of free memory (MemAvailable) for a >2^31-element input")
def test_input_over_2_pow_31_elements():
    B, T, D = BIG
    B += 1
    assert B * T * D > 2**31
    gen = torch.Generator().manual_seed(3)
    block = torch.randn(64, T, D, generator=gen)
    keys = torch.empty(B, T, D)
    keys[: B - 1].view(-1, 64, T, D).copy_(block.expand((B - 1) // 64, 64, T, D))
    keys[B - 1] = torch.randn(T, D, generator=gen)
    query = torch.randn(B, D, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[-1] = T
    p = random_params(D, (4,), "prelu", dtype=torch.float32, gen=gen, requires_grad=False)
    with torch.no_grad():
        out, w = din_fused.din_attention(query, keys, lengths, **p, normalization="softmax",
                                         return_scores=True)
    last = slice(B - 5, B)  # keys of the last row start beyond element 2^31
    assert (B - 1) * T * D >= 2**31  # first element of the last row: index 2^31, beyond int32
    p64 = clone_params(p, torch.float64, requires_grad=False)
    with torch.no_grad():
        ref_out, ref_w = din_attention_ref(query[last].double(), keys[last].double(), lengths[last], **p64,
                                           normalization="softmax", return_scores=True)
    for got, want in ((out[last], ref_out), (w[last], ref_w)):
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-5, err
