"""pytest-benchmark options for the din_fused benchmark suite.

    pytest bench                       # default sweep, CPU, a few minutes on 2 cores
    pytest bench --bench-full          # the big sweep (or DIN_BENCH_FULL=1)
    pytest bench --bench-device cuda   # the same on CUDA (timed with a synchronise in the call)
    pytest bench -k headline           # only the headline shape
    pytest bench -k "test_layout or test_long"   # issue 9: jagged, shared, long sequences (CPU)
    pytest bench -k test_serving       # issue 10: the small call and one user against 100 candidates (CPU)

Groups are "<fwd|fwd+bwd> <case id>", so each table compares the providers of one
case side by side.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("din_fused bench")
    g.addoption("--bench-full", action="store_true", default=os.environ.get("DIN_BENCH_FULL") == "1",
                help="run the big sweep (also DIN_BENCH_FULL=1)")
    g.addoption("--bench-device", default=os.environ.get("DIN_BENCH_DEVICE", "cpu"),
                help="cpu or cuda (also DIN_BENCH_DEVICE)")
    g.addoption("--bench-providers", default=os.environ.get("DIN_BENCH_PROVIDERS", ""),
                help="comma-separated subset of " + ",".join(cases.PROVIDERS))
    g.addoption("--bench-rounds", type=int, default=int(os.environ.get("DIN_BENCH_ROUNDS", "5")),
                help="timed rounds per benchmark (after one warm-up round)")
    g.addoption("--bench-threads", type=int, default=int(os.environ.get("DIN_BENCH_THREADS", "0")),
                help="torch.set_num_threads for CPU runs (0: leave torch's default)")


def pytest_configure(config):
    config.addinivalue_line("markers", "headline: the headline shape of the issue")
    threads = config.getoption("--bench-threads")
    if threads:
        import torch

        torch.set_num_threads(threads)
    cases.quiet_compile_logs()


def pytest_generate_tests(metafunc):
    cfg = metafunc.config
    full = cfg.getoption("--bench-full")
    if "layout" in metafunc.fixturenames:  # issue 9's jagged and shared layouts
        import layouts

        metafunc.parametrize("layout", [pytest.param((g, s), id=f"{g}-{p}".replace(" ", "-"))
                                        for g, p, s in layouts.bench_specs(full)])
        return
    if "long_shape" in metafunc.fixturenames:  # issue 9's long sequences, 1 and 2 threads
        import long_seq

        shapes = long_seq.SHAPES if full else [s for s in long_seq.SHAPES if s[0] == 1]
        metafunc.parametrize("long_shape", shapes, ids=[f"B{b}-T{t}" for b, t in shapes])
        metafunc.parametrize("mode", ("fwd", "fwdbwd") if full else ("fwd",))
        metafunc.parametrize("threads", long_seq.THREADS)
        return
    if "case" not in metafunc.fixturenames:
        return
    sweep = cases.full_sweep() if full else cases.default_sweep()
    wanted = [p for p in cfg.getoption("--bench-providers").split(",") if p] or list(cases.PROVIDERS)
    unknown = set(wanted) - set(cases.PROVIDERS)
    if unknown:
        raise pytest.UsageError(f"unknown providers {sorted(unknown)}; choose from {cases.PROVIDERS}")
    have_deepctr = cases.deepctr_available()
    params = []
    for case in sweep:
        for prov in wanted:
            if prov.startswith("compiled") and not case.compile:
                continue
            if "deepctr" in prov and not have_deepctr:
                continue
            marks = [pytest.mark.headline] if "headline" in case.tags else []
            params.append(pytest.param(case, prov, id=f"{case.id}-{prov}", marks=marks))
    metafunc.parametrize(("case", "provider"), params)


@pytest.fixture(scope="session")
def device(request):
    dev = request.config.getoption("--bench-device")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip("--bench-device cuda but no CUDA device is visible")
    return dev


@pytest.fixture(scope="session")
def rounds(request):
    return request.config.getoption("--bench-rounds")
