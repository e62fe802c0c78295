"""Serving: torch.export (save/load in a fresh process), AOTInductor without din_fused, the
C++ demo, and ONNX under onnxruntime, on a small trained DIN (din_fused.serving)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from common import random_params

from din_fused import FusedDINAttention, serving
from din_fused.data import JaggedBatch
from din_fused.model import DIN
from din_fused.ops import din_fwd, din_jagged_fwd
from din_fused.reference import ACTIVATIONS, NORMALIZATIONS, din_attention_ref

ROOT = Path(__file__).resolve().parents[1]
# What the installed torch lacks (serving.SERVING_TORCH; README, Build): the serving paths
# are tested from torch 2.7, AOTInductor packages exist from 2.6.
OLD_TORCH = serving._TORCH < serving.SERVING_TORCH
NO_AOTI = not hasattr(torch._inductor, "aoti_compile_and_package")
needs_serving_torch = pytest.mark.skipif(
    OLD_TORCH, reason=f"needs torch >= {'.'.join(map(str, serving.SERVING_TORCH))}, not {torch.__version__}")
needs_aoti = pytest.mark.skipif(NO_AOTI, reason=f"torch {torch.__version__} has no AOTInductor packages")
# (B, T) shapes served after exporting with example (6, 7): covers B=1, T=1 and longer T.
SHAPES = [(1, 1), (3, 20), (33, 50)]


def assert_close_rel(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5):
    """Within rel of the reference, elementwise and relative to its largest magnitude
    (a logit near zero would otherwise demand an absolute error of ~1e-12)."""
    torch.testing.assert_close(got, ref, rtol=rel, atol=rel * float(ref.detach().abs().max()))


def din_inputs(B: int, T: int, seed: int, vocab=(30, 8), context_vocab=(5,)):
    """target [B, A], history [B, T, A] (0 beyond lengths), lengths [B] incl. 0 and T, context."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = 0 if B > 1 else T
    if B > 2:
        lengths[1] = T
    target = torch.stack([torch.randint(1, v, (B,), generator=g) for v in vocab], dim=1)
    history = torch.stack([torch.randint(1, v, (B, T), generator=g) for v in vocab], dim=2)
    history = history.masked_fill((torch.arange(T)[None, :] >= lengths[:, None])[..., None], 0)
    context = torch.stack([torch.randint(1, v, (B,), generator=g) for v in context_vocab], dim=1)
    return target, history, lengths, context


def train_din(seed: int = 0, steps: int = 30, **kwargs) -> DIN:
    """A small DIN trained a few Adam steps with the fused op, returned in eval mode.
    Training moves the Dice running statistics away from (0, 1), so eval-mode Dice is
    exercised with non-trivial statistics."""
    torch.manual_seed(seed)
    model = DIN((30, 8), (5,), embedding_dim=8, att_hidden_units=(16, 8), mlp_hidden_units=(32, 16),
                **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(steps):
        target, history, lengths, context = din_inputs(64, 12, seed=1000 + step)
        # A learnable signal: click when the candidate's category occurs in the history.
        label = (history[:, :, 1] == target[:, 1:2]).any(dim=1).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(target, history, lengths, context),
                                                                     label)
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = [m.running_mean for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert steps == 0 or all(bool(s.abs().max() > 1e-3) for s in stats), "Dice statistics did not move"
    return model.eval()


MODEL_CONFIGS = {
    "dice-separate": dict(activation="dice"),
    "prelu-concat-softmax": dict(activation="prelu", attention="concat", att_weight_normalization="softmax"),
}


@functools.cache
def trained_model(config: str) -> DIN:
    # Trained once per session; the tests only run it in eval mode, which changes nothing.
    return train_din(**MODEL_CONFIGS[config])


@pytest.fixture(params=list(MODEL_CONFIGS))
def trained(request):
    return trained_model(request.param)


@pytest.fixture
def trained_dice():
    return trained_model("dice-separate")


def run_python(code: str, cwd: Path, with_repo: bool) -> str:
    """Run code in a fresh interpreter; with_repo puts this source tree on sys.path."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if with_repo:
        env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"subprocess failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


def reload_in_fresh_process(ep, batches: list, tmp_path: Path) -> list:
    """ep saved, loaded in a fresh interpreter that imports din_fused (at this process's thread
    count) and run under no_grad on each (args, kwargs) of batches: the outputs."""
    torch.export.save(ep, tmp_path / "ep.pt2")
    torch.save(batches, tmp_path / "inputs.pt")
    run_python(f"""
        import torch
        import din_fused  # registers the op the saved graph calls
        torch.set_num_threads({torch.get_num_threads()})
        ep = torch.export.load("ep.pt2").module()
        with torch.no_grad():
            torch.save([ep(*a, **kw) for a, kw in torch.load("inputs.pt")], "outputs.pt")
    """, cwd=tmp_path, with_repo=True)
    return torch.load(tmp_path / "outputs.pt")


def run_without_din_fused(package: Path, batches: list, tmp_path: Path) -> list:
    """An AOTInductor package loaded and run on each args of batches in a fresh interpreter
    that cannot import din_fused (not on its path, and blocked in sys.modules): the outputs.
    Checks that neither din_fused's modules nor its compiled library got in."""
    torch.save(batches, tmp_path / "inputs.pt")
    out = run_python(f"""
        import sys
        sys.modules["din_fused"] = None  # any attempt to import it now fails
        import torch
        if torch.__version__.startswith("2.10."):
            import torch._inductor.codecache  # pytorch#173706: 2.10's loader needs it imported
        runner = torch._inductor.aoti_load_package({str(package)!r})
        torch.save([runner(*x) for x in torch.load("inputs.pt")], "outputs.pt")
        print(sorted(m for m in sys.modules if m.startswith("din_fused")))
        with open("/proc/self/maps") as maps:  # the libraries this process mapped
            print(any("din_fused" in line for line in maps))
    """, cwd=tmp_path, with_repo=False)
    assert out.split() == ["['din_fused']", "False"]  # only the blocking None entry; no _C mapped
    return torch.load(tmp_path / "outputs.pt")


# --------------------------------------------------------------------------------------
# The aten implementation of the op
# --------------------------------------------------------------------------------------
def _op_args(p, q, k, lengths, mask, activation, normalization, scale):
    return (q, k, lengths, mask, p["weights"], p["biases"], p.get("alphas", []), p.get("bn_weights", []),
            p.get("bn_biases", []), p.get("running_means", []), p.get("running_vars", []), activation,
            normalization, scale, False, 1e-8)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("B,T,D,use_mask", [(5, 9, 37, True), (3, 1, 8, False), (4, 6, 5, False)])
def test_din_fwd_aten_matches_reference_and_op(activation, normalization, B, T, D, use_mask):
    gen = torch.Generator().manual_seed(B * 100 + T)
    p = random_params(D, (16, 8), activation, gen=gen, requires_grad=False)
    q = torch.randn(B, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,), generator=gen)
    lengths[0] = 0
    mask = torch.rand(B, T, generator=gen) > 0.3 if use_mask else None
    valid = (torch.arange(T)[None, :] < lengths[:, None]) & (True if mask is None else mask)
    k = k.masked_fill(~valid[..., None] & (torch.rand(B, T, 1, generator=gen) < 0.5), float("nan"))
    args = _op_args(p, q, k, lengths, mask, activation, normalization, 0.7)
    out, w, stats = serving.din_fwd_aten(*args)
    ref_out, ref_w = din_attention_ref(q, k, lengths, mask, normalization=normalization, scale=0.7,
                                       return_scores=True, **p)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w, ref_w, rtol=1e-10, atol=1e-10)
    assert out.dtype == torch.float64 and w.dtype == torch.float64
    op_out, op_w, op_stats = din_fwd(*args)
    torch.testing.assert_close(stats, op_stats, rtol=1e-12, atol=0)
    # float32: the served graph against the fused kernel.
    p32 = {key: [t.float() for t in v] if isinstance(v, list) else v for key, v in p.items()}
    args32 = _op_args(p32, q.float(), k.float(), lengths, mask, activation, normalization, 0.7)
    got, fused = serving.din_fwd_aten(*args32), din_fwd(*args32)
    for a, b in zip(got, fused):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close_rel(a, b)


def test_din_fwd_aten_refuses_training_dice():
    p = random_params(4, (3,), "dice", requires_grad=False)
    args = list(_op_args(p, torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64),
                         torch.tensor([1, 3]), None, "dice", "none", 1.0))
    args[14] = True
    with pytest.raises(NotImplementedError, match="eval mode"):
        serving.din_fwd_aten(*args)
    with pytest.raises(ValueError, match="eval-mode"):
        serving.export(train_din(steps=0).train(), din_inputs(6, 7, 0))


# --------------------------------------------------------------------------------------
# torch.export with the fused op
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("masking", [False, True])
def test_export_fused_module_dynamic_batch_and_length(masking, tmp_path):
    torch.manual_seed(0)
    kw = (dict(att_activation="prelu", weight_normalization=True, supports_masking=True, return_score=True)
          if masking else dict(att_activation="dice"))
    m = FusedDINAttention(embedding_dim=37, att_hidden_units=(16, 8), **kw).eval()
    with torch.no_grad():  # non-trivial Dice running statistics
        for layer in m.local_att.dnn.activation_layers:
            if hasattr(layer, "bn"):
                layer.bn.running_mean.normal_(0, 0.3)
                layer.bn.running_var.uniform_(0.5, 1.5)
    b, t = torch.export.Dim("b", min=1), torch.export.Dim("t", min=1)

    def inputs(B, T):
        q, k = torch.randn(B, 1, 37), torch.randn(B, T, 37)
        if masking:
            return q, k, None, torch.rand(B, T) > 0.3
        return q, k, torch.randint(0, T + 1, (B, 1))

    ds = ({0: b}, {0: b, 1: t}, None, {0: b, 1: t}) if masking else ({0: b}, {0: b, 1: t}, {0: b})
    ep = torch.export.export(m, inputs(4, 6), dynamic_shapes=ds)
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "din_fused.din_fwd.default" in ops
    aten = serving.to_aten(ep)
    assert not any("din_fused" in str(n.target) for n in aten.graph.nodes)
    batches = [inputs(B, T) for B, T in SHAPES]
    with torch.no_grad():
        eager = [m(*x) for x in batches]
    for x, e in zip(batches, eager):
        assert torch.equal(ep.module()(*x), e)
        assert_close_rel(aten.module()(*x), e)
    for got, e in zip(reload_in_fresh_process(ep, [(x, {}) for x in batches], tmp_path), eager):
        assert torch.equal(got, e)


@needs_serving_torch
def test_export_din_from_one_row_or_one_behaviour_and_without_context():
    """serving.export's default dims are dynamic whatever the example: one row, one behaviour
    or none (which torch.export alone would specialise) are widened with padding for tracing;
    and context=None as a fourth input (a model without context) exports."""
    model = trained_model("dice-separate")
    batches = [din_inputs(B, T, B + T) for B, T in SHAPES]
    with torch.no_grad():
        eager = [model(*x) for x in batches]
        for B, T in ((1, 5), (3, 1), (3, 0), (1, 0)):
            example = din_inputs(B, T, 0)
            ep = serving.export(model, example)
            assert example[1].shape == (B, T, 2)  # the caller's tensors are left alone
            for x, e in zip(batches, eager):
                assert torch.equal(ep.module()(*x), e), (B, T)
        torch.manual_seed(0)
        plain = DIN((30, 8), embedding_dim=8, att_hidden_units=(16, 8)).eval()
        t, h, lengths, _ = din_inputs(3, 4, 1)
        ep = serving.export(plain, (t, h, lengths, None))
        for x in batches:
            assert torch.equal(ep.module()(*x[:3], None), plain(*x[:3]))


def test_export_din_save_load_fresh_process_bitwise(trained_dice, tmp_path):
    model = trained_dice
    ep = serving.export(model, din_inputs(6, 7, 0))
    batches = [din_inputs(B, T, seed=B) for B, T in SHAPES]
    with torch.no_grad():
        eager = [model(*x) for x in batches]
    for got, ref in zip(reload_in_fresh_process(ep, [(x, {}) for x in batches], tmp_path), eager):
        assert torch.equal(got, ref)


# --------------------------------------------------------------------------------------
# AOTInductor: a package that runs without din_fused (Python, then C++)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("aoti") / "din.pt2"
    serving.aoti_package(trained_model("dice-separate"), path, din_inputs(6, 7, 0))
    return path


@needs_aoti
def test_aoti_package_runs_without_din_fused(trained_dice, aoti_package, tmp_path):
    batches = [din_inputs(B, T, seed=B) for B, T in SHAPES]
    with torch.no_grad():
        for got, x in zip(run_without_din_fused(aoti_package, batches, tmp_path), batches):
            assert_close_rel(got, trained_dice(*x))


def build_cpp_demo(out: Path) -> Path:
    """Compile examples/serving_cpp/din_serve.cpp against the torch wheel's libtorch.

    The compiler is called directly rather than through CMake's find_package(Torch),
    which with a CUDA build of torch also wants the CUDA toolkit (not on CPU CI).
    `--no-as-needed` keeps libtorch.so among the demo's libraries although it calls
    nothing in it: the AOTInductor runner of torch 2.9 dlopens the model with libtorch.so
    as a dependency, which the demo's RUNPATH does not reach, and GCC on Debian and Ubuntu
    links as-needed by default.  C++20: torch 2.14's headers need it (`requires` clauses);
    torch 2.13's own cpp_extension builds with it, and older headers (2.7.1 up) compile with it."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]
    src = ROOT / "examples" / "serving_cpp" / "din_serve.cpp"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-O1", str(src), "-o", str(out),
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *[f"-I{p}" for p in include_paths()],
           f"-L{lib}", f"-Wl,-rpath,{lib}", "-Wl,--no-as-needed", "-ltorch", "-ltorch_cpu", "-lc10"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    return out


def build_cpp_demo_cmake(build: Path) -> Path:
    """The README's commands: examples/serving_cpp's CMakeLists.txt, configured from the
    repository root with the torch wheel's CMake prefix, and built."""
    prefix = torch.utils.cmake_prefix_path
    for cmd in (["cmake", "-S", "examples/serving_cpp", "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(build)]):
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return build / "din_serve"


@needs_aoti
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None,
                    reason="the C++ serving demo needs a C++ compiler")
@pytest.mark.parametrize("build", ["compiler", "cmake"])
def test_aoti_cpp_serving_demo(build, trained_dice, aoti_package, tmp_path):
    if build == "cmake" and (shutil.which("cmake") is None or torch.version.cuda):
        pytest.skip("the CMake build needs cmake, and a CPU build of torch (a CUDA one makes "
                    "find_package(Torch) want the CUDA toolkit: README, Serving)")
    exe = build_cpp_demo(tmp_path / "din_serve") if build == "compiler" else \
        build_cpp_demo_cmake(tmp_path / "build")
    for B, T in ((5, 9), (1, 1)):
        x = din_inputs(B, T, seed=7)
        lines = [" ".join(map(str, [t.dim(), *t.shape, *t.reshape(-1).tolist()])) for t in x]
        (tmp_path / "inputs.txt").write_text("\n".join(lines) + "\n")
        res = subprocess.run([str(exe), str(aoti_package), str(tmp_path / "inputs.txt")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        rows = [list(map(float, line.split())) for line in res.stdout.strip().splitlines()]
        got = torch.tensor(rows, dtype=torch.float32)
        with torch.no_grad():
            ref = trained_dice(*x)
        assert got.shape == (B, 2)
        assert_close_rel(got[:, 0], ref)
        assert_close_rel(got[:, 1], torch.sigmoid(ref))


# --------------------------------------------------------------------------------------
# ONNX under onnxruntime
# --------------------------------------------------------------------------------------
@needs_serving_torch
def test_onnx_export_onnxruntime_dynamic_batch_and_length(trained, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = tmp_path / "din.onnx"
    serving.onnx_export(trained, path, din_inputs(6, 7, 0))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    # Standard operators only: nothing a stock runtime would not know.
    domains = {n.domain for n in proto.graph.node} | {f.domain for f in proto.functions}
    assert domains <= {"", "ai.onnx"}, domains
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["target", "history", "lengths", "context"]
    for B, T in SHAPES:
        x = din_inputs(B, T, seed=B)
        (got,) = sess.run(None, {n: t.numpy() for n, t in zip(names, x)})
        with torch.no_grad():
            assert_close_rel(torch.from_numpy(got), trained(*x))


# --------------------------------------------------------------------------------------
# Jagged layout (din_fused::din_jagged_fwd)
# --------------------------------------------------------------------------------------
def jagged_inputs(R: int, lens, shared: bool, seed: int, E: int = 8) -> tuple[tuple, dict]:
    """(args, kwargs) of FusedDINAttention's explicit jagged forward: query [R, E],
    values [N, E], offsets [S+1] over sequences of the given lengths (zeros included),
    and, when shared, row_seq [R] picking sequences at random (else one row per sequence)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    offsets = torch.cat([lens.new_zeros(1), lens.cumsum(0)])
    N, S = int(offsets[-1]), len(lens)
    R = R if shared else S
    q, v = torch.randn(R, E, generator=g), torch.randn(N, E, generator=g)
    kwargs = {"offsets": offsets}
    if shared:
        kwargs["row_seq"] = torch.randint(0, S, (R,), generator=g)
    return (q, v), kwargs


JAGGED_SHAPES = [(1, [1]), (7, [4, 0, 9]), (100, [50])]  # (rows, sequence lengths)


def jagged_scorer(shared: bool) -> tuple[FusedDINAttention, torch.export.ExportedProgram]:
    """A FusedDINAttention (Dice; softmax when shared) exported for its explicit jagged
    forward with rows, values and sequences dynamic."""
    torch.manual_seed(0)
    m = FusedDINAttention(embedding_dim=8, att_hidden_units=(16, 8), att_activation="dice",
                          weight_normalization=shared).eval()
    with torch.no_grad():
        for layer in m.local_att.dnn.activation_layers:
            layer.bn.running_mean.normal_(0, 0.3)
            layer.bn.running_var.uniform_(0.5, 1.5)
            layer.alpha.normal_(0.2, 0.3)
    args, kwargs = jagged_inputs(5, [3, 0, 5, 2], shared, 0)
    return m, serving.export(m, args, serving.jagged_dynamic_shapes(shared), kwargs=kwargs)


@needs_serving_torch
def test_onnx_export_from_a_one_row_example_without_context(tmp_path):
    """A model without context exported from a one-row, one-behaviour example with context=None:
    three named inputs, batch and length still dynamic under onnxruntime."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    plain = DIN((30, 8), embedding_dim=8, att_hidden_units=(16, 8)).eval()
    t, h, lengths, _ = din_inputs(1, 1, 0)
    serving.onnx_export(plain, tmp_path / "plain.onnx", (t, h, lengths, None))
    sess = ort.InferenceSession(str(tmp_path / "plain.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["target", "history", "lengths"]
    for B, T in SHAPES:
        x = din_inputs(B, T, seed=B)[:3]
        (got,) = sess.run(None, {n: v.numpy() for n, v in zip(names, x)})
        with torch.no_grad():
            assert_close_rel(torch.from_numpy(got), plain(*x))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_din_jagged_fwd_aten_matches_op(shared, activation, normalization):
    gen = torch.Generator().manual_seed(3)
    p = random_params(37, (16, 8), activation, gen=gen, requires_grad=False)
    (q, v), kw = jagged_inputs(6, [3, 0, 5, 1, 4], shared, 1, E=37)
    offsets, row_seq = kw["offsets"], kw.get("row_seq")
    def close64(a, b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    for dtype, check in ((torch.float64, close64), (torch.float32, assert_close_rel)):
        pd = {key: [t.to(dtype) for t in val] if isinstance(val, list) else val for key, val in p.items()}
        args = _op_args(pd, q.to(dtype), v.to(dtype), offsets, row_seq, activation, normalization, 0.7)
        for got, ref in zip(serving.din_jagged_fwd_aten(*args), din_jagged_fwd(*args)):
            assert got.dtype == ref.dtype and got.shape == ref.shape
            check(got, ref)


@needs_serving_torch
@pytest.mark.parametrize("shared", [False, True])
def test_export_jagged_dynamic_rows_and_values(shared, tmp_path):
    m, ep = jagged_scorer(shared)
    assert "din_fused.din_jagged_fwd.default" in {str(n.target) for n in ep.graph.nodes}
    aten = serving.to_aten(ep)
    assert not any("din_fused" in str(n.target) for n in aten.graph.nodes)
    batches = [jagged_inputs(R, lens, shared, R) for R, lens in JAGGED_SHAPES]
    with torch.no_grad():
        eager = [m(*x, **kw) for x, kw in batches]
        for (x, kw), e in zip(batches, eager):
            assert torch.equal(ep.module()(*x, **kw), e)
            assert_close_rel(aten.module()(*x, **kw), e)
    for got, e in zip(reload_in_fresh_process(ep, batches, tmp_path), eager):
        assert torch.equal(got, e)


@needs_serving_torch
@pytest.mark.parametrize("shared", [False, True])
def test_aoti_jagged_history(shared, tmp_path):
    """The jagged layout as an AOTInductor package: a sequence per row, and the serving case,
    many candidates against one user's history."""
    m, ep = jagged_scorer(shared)
    runner = torch._inductor.aoti_load_package(serving.aoti_package(ep, tmp_path / "jagged.pt2"))
    with torch.no_grad():
        for R, lens in JAGGED_SHAPES:
            x, kw = jagged_inputs(R, lens, shared, R)
            assert_close_rel(runner(*x, **kw), m(*x, **kw))


@needs_serving_torch
def test_aoti_package_checks_inputs_under_torchs_switch(tmp_path, monkeypatch):
    """A package does not check its inputs by default (an int32 offsets is misread as int64,
    docs/serving.md); with AOTI_RUNTIME_CHECK_INPUTS=1 in the serving process, read at the
    package's first call, a dtype or a fixed size that differs from the export's is refused."""
    monkeypatch.setenv("AOTI_RUNTIME_CHECK_INPUTS", "1")
    m, ep = jagged_scorer(True)
    runner = torch._inductor.aoti_load_package(serving.aoti_package(ep, tmp_path / "checked.pt2"))
    (q, v), kw = jagged_inputs(7, [4, 0, 9], True, 7)
    with torch.no_grad():
        assert_close_rel(runner(q, v, **kw), m(q, v, **kw))
        for args, kwargs, match in (
            ((q, v), {**kw, "offsets": kw["offsets"].int()}, "unmatched dtype"),
            ((q, v), {**kw, "row_seq": kw["row_seq"].int()}, "unmatched dtype"),
            ((q.double(), v), kw, "unmatched dtype"),
            ((q[:, :5], v[:, :5]), kw, "unmatched dim value at 1, expected: 8"),
        ):
            with pytest.raises(RuntimeError, match=match):
                runner(*args, **kwargs)


@needs_serving_torch
@pytest.mark.parametrize("shared", [False, True])
def test_onnx_jagged_onnxruntime(shared, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m, ep = jagged_scorer(shared)
    serving.onnx_export(ep, tmp_path / "jagged.onnx")
    sess = ort.InferenceSession(str(tmp_path / "jagged.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for R, lens in JAGGED_SHAPES:
            x, kw = jagged_inputs(R, lens, shared, R)
            feed = dict(zip(["query", "keys"], x)) | kw
            assert [i.name for i in sess.get_inputs()] == list(feed)
            (got,) = sess.run(None, {name: t.numpy() for name, t in feed.items()})
            assert_close_rel(torch.from_numpy(got), m(*x, **kw))


# --------------------------------------------------------------------------------------
# din_fused.model.DIN on the jagged layout (serving.JaggedDIN)
# --------------------------------------------------------------------------------------
def din_jagged_inputs(B: int, T: int, seed: int, shared: bool) -> tuple:
    """JaggedDIN's (target, values, offsets, row_seq, context), from din_inputs(B, T, seed):
    one history per row, or with shared, the first min(B, 3) rows' histories, which the rows
    pick in turn (row_seq)."""
    target, history, lengths, context = din_inputs(B, T, seed)
    S = min(B, 3) if shared else B
    values = torch.cat([history[i, :n] for i, n in enumerate(lengths[:S].tolist())])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths[:S].cumsum(0)])
    return target, values, offsets, torch.arange(B) % S if shared else None, context


DIN_JAGGED_SHAPES = [(6, 7), (1, 1), (2, 50), (9, 3)]  # (rows, max history length)


@needs_serving_torch
@pytest.mark.parametrize("shared", [False, True])
def test_export_din_jagged_dynamic_rows_and_values(trained, shared, tmp_path):
    """A trained DIN's jagged forward (serving.JaggedDIN) exports with rows, values and shared
    histories dynamic: bitwise the eager model at other shapes, after a save and a load in a
    fresh process too; and the eager jagged forward is the padded one (rows tiled by row_seq)."""
    m = serving.JaggedDIN(trained, shared)
    ep = serving.export(m, din_jagged_inputs(6, 7, 0, shared))
    assert "din_fused.din_jagged_fwd.default" in {str(n.target) for n in ep.graph.nodes}
    batches = [din_jagged_inputs(B, T, B + T, shared) for B, T in DIN_JAGGED_SHAPES]
    with torch.no_grad():
        eager = [m(*x) for x in batches]
        for (B, T), x, e in zip(DIN_JAGGED_SHAPES, batches, eager):
            assert torch.equal(ep.module()(*x), e)
            target, history, lengths, context = din_inputs(B, T, B + T)
            rows = x[3] if shared else torch.arange(B)  # each row's own padded history
            torch.testing.assert_close(e, trained(target, history[rows], lengths[rows], context),
                                       rtol=1e-5, atol=1e-6)
    for got, ref in zip(reload_in_fresh_process(ep, [(x, {}) for x in batches], tmp_path), eager):
        assert torch.equal(got, ref)


@needs_aoti
def test_aoti_din_jagged_shared_history_without_din_fused(tmp_path):
    """The serving case: a trained DIN scoring candidates against shared histories, as an
    AOTInductor package run in a process that never imports din_fused."""
    m = serving.JaggedDIN(trained_model("dice-separate"), shared=True)
    path = serving.aoti_package(m, tmp_path / "din_jagged.pt2", din_jagged_inputs(6, 7, 0, True))
    batches = [din_jagged_inputs(B, T, B + T, True) for B, T in DIN_JAGGED_SHAPES]
    with torch.no_grad():
        for got, x in zip(run_without_din_fused(path, batches, tmp_path), batches):
            assert_close_rel(got, m(*x))


@needs_serving_torch
@pytest.mark.parametrize("shared", [False, True])
def test_onnx_din_jagged_onnxruntime(shared, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    m = serving.JaggedDIN(trained_model("prelu-concat-softmax"), shared)
    serving.onnx_export(m, tmp_path / "din_jagged.onnx", din_jagged_inputs(6, 7, 0, shared))
    sess = ort.InferenceSession(str(tmp_path / "din_jagged.onnx"), providers=["CPUExecutionProvider"])
    names = ["target", "values", "offsets", "row_seq", "context"]
    assert [i.name for i in sess.get_inputs()] == [n for n in names if shared or n != "row_seq"]
    assert [o.name for o in sess.get_outputs()] == ["logit"]
    with torch.no_grad():
        for B, T in DIN_JAGGED_SHAPES:
            x = din_jagged_inputs(B, T, B + T, shared)
            (got,) = sess.run(None, {n: t.numpy() for n, t in zip(names, x) if t is not None})
            assert_close_rel(torch.from_numpy(got), m(*x))


@needs_serving_torch
def test_export_din_jagged_without_context_or_row_seq():
    """A model without context features exports from (target, values, offsets) alone; the
    wrapper follows the model's mode."""
    torch.manual_seed(0)
    model = DIN((30, 8), (), embedding_dim=8, att_hidden_units=(16, 8), mlp_hidden_units=(32, 16))
    jm = serving.JaggedDIN(model)
    model.eval()  # after wrapping: export reads the model's mode
    target, values, offsets, _, _ = din_jagged_inputs(6, 7, 0, False)
    ep = serving.export(jm, (target, values, offsets))
    for B, T in DIN_JAGGED_SHAPES:
        x = din_jagged_inputs(B, T, B + T, False)[:3]
        with torch.no_grad():
            assert torch.equal(ep.module()(*x), jm(*x))


def test_jagged_din_refuses_what_it_cannot_serve():
    model = trained_model("dice-separate")
    target, values, offsets, row_seq, context = din_jagged_inputs(4, 5, 0, True)
    with pytest.raises(ValueError, match=r"row_seq must be given for JaggedDIN\(shared=True\)"):
        serving.JaggedDIN(model, shared=True)(target, values, offsets, None, context)
    with pytest.raises(ValueError, match=r"row_seq must be None for JaggedDIN\(shared=False\)"):
        serving.JaggedDIN(model)(target, values, offsets, row_seq, context)
    with pytest.raises(TypeError, match="model must be a din_fused.model DIN or BaseModel"):
        serving.JaggedDIN(torch.nn.Linear(2, 1))
    batch = JaggedBatch(torch.arange(4), target, values, offsets, context, torch.zeros(4))
    with pytest.raises(TypeError, match=r"export serving.JaggedDIN\(model\) .* instead of a JaggedBatch"):
        serving.export(model, (batch,))


def test_serving_paths_name_the_torch_they_need(monkeypatch, tmp_path):
    """On torch older than serving.SERVING_TORCH (or without AOTInductor packages) the paths
    that would fail inside torch refuse first, with an error naming the torch they need.  The
    version is patched, so this runs on any torch; the real old ones were checked by hand
    (README, Build)."""
    monkeypatch.setattr(serving, "_TORCH", torch.torch_version.TorchVersion("2.6.0"))
    monkeypatch.delattr(torch._inductor, "aoti_compile_and_package", raising=False)
    linear = torch.nn.Linear(2, 1).eval()
    m = FusedDINAttention(embedding_dim=8, att_hidden_units=(16, 8)).eval()
    args, kwargs = jagged_inputs(5, [3, 0, 5, 2], False, 0)
    x = (torch.randn(3, 2),)
    jagged = "serving.export of the jagged layout"
    calls = [("serving.onnx_export", lambda: serving.onnx_export(linear, tmp_path / "x.onnx", x)),
             ("serving.aoti_package", lambda: serving.aoti_package(linear, tmp_path / "x.pt2", x)),
             (jagged, lambda: serving.export(m, args, serving.jagged_dynamic_shapes(False), kwargs=kwargs)),
             (jagged, lambda: serving.export(serving.JaggedDIN(train_din(steps=0)),
                                             din_jagged_inputs(6, 7, 0, False)))]
    for what, call in calls:
        with pytest.raises(RuntimeError, match=rf"^{what} needs a newer torch than 2\.6\.0: "):
            call()
    ep = serving.export(train_din(steps=0), din_inputs(6, 7, 0))  # the padded layout still exports
    assert "din_fused.din_fwd.default" in {str(n.target) for n in ep.graph.nodes}
