"""FusedDINAttention: DeepCTR-Torch parity, shapes, torch.compile."""

import pytest
import torch
from common import TOL64, max_rel_err

import din_fused
from din_fused import FusedDINAttention

deepctr_sequence = pytest.importorskip("deepctr_torch.layers.sequence",
                                       reason="deepctr-torch is a test extra: pip install .[test]")


def randomise_(module, gen):
    """DeepCTR initialises with std 1e-4, which makes every score ~0; use O(1) weights."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5)
            elif t.dim() == 2 and "alpha" not in name:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * t.shape[1] ** -0.5 * 2)
            else:
                t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3
                        + (1.0 if name.endswith("bn.weight") else 0.0))


def deepctr_layer(act, normalization, D, hidden, return_score=False, seed=0):
    layer = deepctr_sequence.AttentionSequencePoolingLayer(
        att_hidden_units=hidden, att_activation=act, weight_normalization=normalization,
        return_score=return_score, embedding_dim=D).double()
    randomise_(layer, torch.Generator().manual_seed(seed))
    return layer


def inputs(B, T, D, gen):
    q = torch.randn(B, 1, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    # DeepCTR gives an empty softmax row uniform weights over padding, we give zeros
    # (documented), so parity rows have at least one valid position.
    lengths = torch.randint(1, T + 1, (B, 1), generator=gen)
    return q, k, lengths


MODES = [(act, "eval") for act in ("sigmoid", "relu", "prelu", "dice")] + \
        [(act, "train") for act in ("sigmoid", "relu", "prelu")]


@pytest.mark.parametrize("normalization", [False, True])
@pytest.mark.parametrize("act,mode", MODES)
def test_deepctr_parity_outputs_grads_and_one_step(act, mode, normalization):
    D, hidden, B, T = 6, (10, 5), 7, 9
    theirs = deepctr_layer(act, normalization, D, hidden)
    theirs.train(mode == "train")
    ours = FusedDINAttention.from_deepctr(theirs)
    assert ours.training == theirs.training
    gen = torch.Generator().manual_seed(1)
    q, k, lengths = inputs(B, T, D, gen)
    opt_t = torch.optim.SGD(theirs.parameters(), lr=0.1)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.1)
    for _step in range(2):
        results = []
        for layer, opt in ((theirs, opt_t), (ours, opt_o)):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            out = layer(qq, kk, lengths)
            assert out.shape == (B, 1, D)
            opt.zero_grad()
            (out * torch.arange(D, dtype=torch.float64)).sum().backward()
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            results.append((out.detach(), qq.grad, kk.grad, grads))
            opt.step()
        (o1, gq1, gk1, p1), (o2, gq2, gk2, p2) = results
        assert max_rel_err(o2, o1) <= TOL64
        assert max_rel_err(gq2, gq1) <= TOL64
        assert max_rel_err(gk2, gk1) <= TOL64
        assert p1.keys() == p2.keys()
        for name in p1:
            assert max_rel_err(p2[name], p1[name]) <= TOL64, name
    for (n1, t1), (n2, t2) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        assert n1 == n2 and max_rel_err(t2.double(), t1.double()) <= TOL64, n1


def test_deepctr_return_score_and_masking():
    D, hidden, B, T = 5, (8,), 4, 6
    theirs = deepctr_layer("sigmoid", False, D, hidden, return_score=True).eval()
    ours = FusedDINAttention.from_deepctr(theirs)
    gen = torch.Generator().manual_seed(2)
    q, k, lengths = inputs(B, T, D, gen)
    s1, s2 = theirs(q, k, lengths), ours(q, k, lengths)
    assert s2.shape == (B, 1, T) and max_rel_err(s2, s1) <= TOL64
    # supports_masking: the mask replaces the lengths.
    theirs.supports_masking = True
    masked = FusedDINAttention.from_deepctr(theirs)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[:, 0] = True
    assert max_rel_err(masked(q, k, None, mask=mask), theirs(q, k, None, mask=mask)) <= TOL64


def test_state_dict_loads_both_ways():
    theirs = deepctr_layer("dice", True, 4, (8, 4))
    ours = FusedDINAttention(embedding_dim=4, att_hidden_units=(8, 4), att_activation="dice",
                             weight_normalization=True).double()
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())


@pytest.mark.parametrize("act", ["sigmoid", "prelu", "dice"])
def test_query_shapes_and_reference_impl(act):
    D, B, T = 7, 5, 6
    fused = FusedDINAttention(embedding_dim=D, att_hidden_units=(9, 4), att_activation=act,
                              weight_normalization="softmax", scale=0.5).double().eval()
    ref = FusedDINAttention(embedding_dim=D, att_hidden_units=(9, 4), att_activation=act,
                            weight_normalization="softmax", scale=0.5, impl="reference").double().eval()
    ref.load_state_dict(fused.state_dict())
    q = torch.randn(B, D, dtype=torch.float64)
    k = torch.randn(B, T, D, dtype=torch.float64)
    lengths = torch.tensor([0, 1, 6, 3, 2])
    out2 = fused(q, k, lengths)
    assert out2.shape == (B, D)
    out3 = fused(q[:, None], k, lengths[:, None])
    assert out3.shape == (B, 1, D)
    assert torch.equal(out3[:, 0], out2)
    assert max_rel_err(out2, ref(q, k, lengths)) <= TOL64
    assert torch.all(out2[0] == 0)


def test_dice_train_running_stats_match_reference():
    D, B, T = 6, 9, 7
    fused = FusedDINAttention(embedding_dim=D, att_hidden_units=(8, 5), att_activation="dice").double()
    ref = FusedDINAttention(embedding_dim=D, att_hidden_units=(8, 5), att_activation="dice",
                            impl="reference").double()
    randomise_(fused, torch.Generator().manual_seed(3))
    ref.load_state_dict(fused.state_dict())
    q = torch.randn(B, D, dtype=torch.float64)
    k = torch.randn(B, T, D, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,))
    for _ in range(3):
        assert max_rel_err(fused(q, k, lengths), ref(q, k, lengths)) <= TOL64
    for (n1, t1), (n2, t2) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and max_rel_err(t1.double(), t2.double()) <= TOL64, n1


@pytest.mark.parametrize("act", ["sigmoid", "dice"])
def test_torch_compile_fullgraph_forward_backward(act):
    D, B, T = 8, 6, 10
    torch._dynamo.reset()
    eager = FusedDINAttention(embedding_dim=D, att_hidden_units=(12, 6), att_activation=act,
                              weight_normalization=True)
    compiled_mod = FusedDINAttention(embedding_dim=D, att_hidden_units=(12, 6), att_activation=act,
                                     weight_normalization=True)
    compiled_mod.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_mod, fullgraph=True)
    q = torch.randn(B, 1, D)
    k = torch.randn(B, T, D)
    lengths = torch.randint(0, T + 1, (B, 1))
    results = []
    for mod in (eager, compiled):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        out = mod(qq, kk, lengths)
        out.square().sum().backward()
        results.append((out.detach(), qq.grad, kk.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p1, p2 in zip(eager.parameters(), compiled_mod.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-5, atol=1e-6)
    if act == "dice":  # running statistics were updated through the compiled graph too
        for b1, b2 in zip(eager.buffers(), compiled_mod.buffers()):
            torch.testing.assert_close(b1, b2)


def test_exports():
    assert din_fused.FusedDINAttention is FusedDINAttention
    assert callable(din_fused.din_attention)
