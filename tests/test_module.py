"""FusedDINAttention: DeepCTR-Torch parity, shapes, torch.compile."""

import copy

import pytest
import torch
from common import TOL64, assert_modules_agree, max_rel_err, randomise_

import din_fused
from din_fused import FusedDINAttention

deepctr_sequence = pytest.importorskip("deepctr_torch.layers.sequence",
                                       reason="deepctr-torch is a test extra: pip install .[test]")


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
    # from_deepctr shares the layer's Parameters; a deep copy trains side by side.
    ours = FusedDINAttention.from_deepctr(copy.deepcopy(theirs))
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
    assert_modules_agree(results, eager, compiled_mod)  # Dice: its running statistics too


def test_exports():
    assert din_fused.FusedDINAttention is FusedDINAttention
    assert callable(din_fused.din_attention)


# ---------------------------------------------------------------------------------------
# Jagged layouts in the module: torch.nested jagged keys and explicit values/offsets/row_seq
# ---------------------------------------------------------------------------------------
def _module_pair(act, seed=0, **kw):
    fused = FusedDINAttention(embedding_dim=5, att_hidden_units=(8, 4), att_activation=act,
                              weight_normalization="softmax", scale=0.8, **kw).double()
    randomise_(fused, torch.Generator().manual_seed(seed))
    padded = copy.deepcopy(fused)
    return fused, padded


def _grads(mod, loss, inputs):
    params = list(mod.parameters())
    return torch.autograd.grad(loss, [*inputs, *params])


@pytest.mark.parametrize("act,train", [("sigmoid", False), ("prelu", True), ("dice", True), ("dice", False)])
def test_nested_jagged_keys_match_padded(act, train):
    gen = torch.Generator().manual_seed(4)
    lens = [3, 0, 6, 1]
    q = torch.randn(len(lens), 1, 5, generator=gen, dtype=torch.float64)
    seqs = [torch.randn(n, 5, generator=gen, dtype=torch.float64) for n in lens]
    jag, pad = _module_pair(act)
    jag.train(train)
    pad.train(train)
    values = torch.cat(seqs).requires_grad_()
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    keys = torch.nested.nested_tensor_from_jagged(values, offsets)
    qj = q.clone().requires_grad_()
    out_j = jag(qj, keys)
    kp = torch.zeros(len(lens), max(lens), 5, dtype=torch.float64)
    for i, s in enumerate(seqs):
        kp[i, :len(s)] = s
    kp.requires_grad_()
    qp = q.clone().requires_grad_()
    out_p = pad(qp, kp, torch.tensor(lens))
    assert out_j.shape == out_p.shape == (len(lens), 1, 5)
    assert max_rel_err(out_j, out_p) <= TOL64
    gout = torch.randn(out_p.shape, generator=gen, dtype=torch.float64)
    gj = _grads(jag, (out_j * gout).sum(), [qj, values])
    gp = _grads(pad, (out_p * gout).sum(), [qp, kp])
    gp = [gp[0], torch.cat([gp[1][i, :n] for i, n in enumerate(lens)]), *gp[2:]]
    for a, b in zip(gj, gp):
        assert max_rel_err(a, b) <= TOL64
    for (n1, t1), (n2, t2) in zip(jag.state_dict().items(), pad.state_dict().items()):
        assert n1 == n2 and max_rel_err(t1.double(), t2.double()) <= TOL64, n1


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_nested_jagged_view_with_holes_matches_padded(impl):
    """A jagged view with holes (torch.nested.narrow: row i is offsets[i] + [0, lengths[i])) is read
    by its lengths, not as if offsets alone bounded the rows; gradients reach the base tensor."""
    gen = torch.Generator().manual_seed(6)
    jag, pad = _module_pair("prelu", impl=impl)
    base = torch.randn(3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 1, 5, generator=gen, dtype=torch.float64)
    starts, lens = [0, 1, 2], [2, 3, 1]
    keys = torch.nested.narrow(base, 1, torch.tensor(starts), torch.tensor(lens), layout=torch.jagged)
    out = jag(q, keys)
    kp = torch.zeros(3, 5, 5, dtype=torch.float64)
    for i, (s0, n) in enumerate(zip(starts, lens)):
        kp[i, :n] = base[i, s0:s0 + n]
    want = pad(q, kp, torch.tensor(lens))
    assert max_rel_err(out, want) <= TOL64
    g, = torch.autograd.grad(out.sum(), base)
    gp, = torch.autograd.grad(want.sum(), base)
    assert max_rel_err(g, gp) <= TOL64


def test_module_names_keys_and_query_of_the_wrong_kind():
    mod = FusedDINAttention(embedding_dim=3, att_hidden_units=(4,)).eval()
    q, k, lengths = torch.randn(2, 1, 3), torch.randn(2, 4, 3), torch.tensor([1, 4])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            with pytest.raises(TypeError, match="query must be a torch.Tensor"):
                mod(None, k, lengths)
            with pytest.raises(TypeError, match="keys must be a torch.Tensor"):
                mod(q, [k], lengths)
            strided = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
            with pytest.raises(ValueError, match="nested keys must have layout=torch.jagged"):
                mod(q, strided)


def test_nested_jagged_return_score_is_nested():
    jag, pad = _module_pair("sigmoid", return_score=True)
    jag.eval()
    pad.eval()
    lens = [2, 4]
    values = torch.randn(6, 5, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 6])
    q = torch.randn(2, 5, dtype=torch.float64)
    w = jag(q, torch.nested.nested_tensor_from_jagged(values, offsets))
    assert w.is_nested and w.layout == torch.jagged
    kp = torch.stack([torch.cat([values[:2], values.new_zeros(2, 5)]), values[2:]])
    wp = pad(q, kp, torch.tensor(lens))
    for i, wi in enumerate(w.values().split(lens)):  # (torch 2.4's nested tensors cannot be indexed)
        assert max_rel_err(wi, wp[i, :lens[i]]) <= TOL64


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_explicit_values_offsets_row_seq_match_tiled(impl):
    # One user history shared by several candidates plus a second user: the module's
    # explicit jagged call against the padded module on the tiled keys.
    gen = torch.Generator().manual_seed(6)
    values = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    offsets = torch.tensor([0, 7, 9])
    row_seq = torch.tensor([0, 0, 1, 0, 1])
    q = torch.randn(5, 1, 5, generator=gen, dtype=torch.float64)
    jag, pad = _module_pair("dice", impl=impl)
    vj, qj = values.clone().requires_grad_(), q.clone().requires_grad_()
    out = jag(qj, vj, offsets=offsets, row_seq=row_seq)
    vp, qp = values.clone().requires_grad_(), q.clone().requires_grad_()
    kp, lengths = din_fused.reference.tile_jagged(vp, offsets, row_seq)
    ref = pad(qp, kp, lengths)
    assert out.shape == (5, 1, 5) and max_rel_err(out, ref) <= TOL64
    gout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(_grads(jag, (out * gout).sum(), [qj, vj]), _grads(pad, (ref * gout).sum(), [qp, vp])):
        assert max_rel_err(a, b) <= TOL64
    jag.return_score = True
    w, row_offsets = jag(q, values, offsets=offsets, row_seq=row_seq)
    assert row_offsets.tolist() == [0, 7, 14, 16, 23, 25] and w.shape == (25,)


def test_jagged_module_rejects_lengths_with_jagged_keys():
    mod = FusedDINAttention(embedding_dim=5)
    with pytest.raises(ValueError, match="keys_length"):
        mod(torch.randn(2, 5), torch.randn(3, 5), torch.tensor([1, 2]), offsets=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="offsets"):
        mod(torch.randn(2, 5), torch.randn(2, 3, 5), torch.tensor([1, 2]), row_seq=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------
# DeepCTR compatibility (issues 8 and 14)
# ---------------------------------------------------------------------------------------
def test_from_deepctr_shares_parameters_and_batchnorm_settings():
    theirs = deepctr_layer("dice", False, 4, (8, 4))
    for a in theirs.local_att.dnn.activation_layers:
        a.bn.momentum, a.bn.eps = 0.5, 1e-3
    ours = FusedDINAttention.from_deepctr(theirs)
    assert [id(p) for p in ours.parameters()] == [id(p) for p in theirs.parameters()]
    assert [id(b) for b in ours.buffers()] == [id(b) for b in theirs.buffers()]
    gen = torch.Generator().manual_seed(5)
    q, k, _ = inputs(6, 5, 4, gen)
    lengths = torch.full((6, 1), 5)  # no padding: DeepCTR's Dice statistics count padding
    ref = copy.deepcopy(theirs)
    ours.train()
    ref.train()
    out_o, out_r = ours(q, k, lengths), ref(q, k, lengths)
    assert max_rel_err(out_o, out_r) <= TOL64
    # momentum 0.5 and eps 1e-3 were used: the running statistics agree after the update.
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and max_rel_err(t1.double(), t2.double()) <= TOL64, n1


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_dice_batchnorm_momentum_none_is_a_cumulative_average(impl):
    mod = FusedDINAttention(embedding_dim=4, att_hidden_units=(6,), att_activation="dice", impl=impl).double()
    randomise_(mod, torch.Generator().manual_seed(1))
    bn = mod.local_att.dnn.activation_layers[0].bn
    bn.momentum = None
    bn.reset_running_stats()
    ref_bn = copy.deepcopy(bn)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        q = torch.randn(3, 4, generator=gen, dtype=torch.float64)
        k = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
        mod(q, k, torch.tensor([5, 5, 5]))
        # The pre-activations the Dice layer saw, through nn.BatchNorm1d's own update.
        lin = mod.local_att.dnn.linears[0]
        qe = q[:, None].expand_as(k)
        z = lin(torch.cat([qe, k, qe - k, qe * k], -1)).reshape(-1, 6)
        ref_bn(z.detach())
    assert int(bn.num_batches_tracked) == 3
    assert max_rel_err(bn.running_mean, ref_bn.running_mean) <= TOL64
    assert max_rel_err(bn.running_var, ref_bn.running_var) <= TOL64


def test_float_keys_length_and_lengths_above_T_as_deepctr():
    theirs = deepctr_layer("sigmoid", True, 5, (8,)).eval()
    ours = FusedDINAttention.from_deepctr(theirs)
    gen = torch.Generator().manual_seed(3)
    q, k, lengths = inputs(4, 6, 5, gen)
    lengths[0, 0] = 9  # above T: DeepCTR treats it as all T positions
    for kl in (lengths.double(), lengths.float(), lengths):
        assert max_rel_err(ours(q, k, kl), theirs(q, k, kl)) <= TOL64
    with pytest.raises(TypeError, match="whole numbers"):
        ours(q, k, lengths.double() + 0.5)
    # Infinite or huge float lengths: above T, so all T positions (a cast before the clamp wrapped
    # them to a negative int64), in eval under no_grad (the cached plan's route takes only int64) too.
    for big in (float("inf"), 1e30):
        kl = lengths.double()
        kl[1, 0] = big
        want = theirs(q, k, kl.clamp(max=k.shape[1]))
        assert max_rel_err(ours(q, k, kl), want) <= TOL64
        with torch.no_grad():
            assert max_rel_err(ours(q, k, kl), want) <= TOL64
    for bad, err, match in ((float("nan"), TypeError, r"not a whole number \(nan\)"),
                            (float("-inf"), ValueError, r"keys_length must be >= 0, got -inf"),
                            (-2.0, ValueError, r"keys_length must be >= 0, got -2.0")):
        kl = lengths.double()
        kl[2, 0] = bad
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(err, match=match):
                ours(q, k, kl)
    for kl in (lengths.int(), lengths):  # negative integer lengths, in eval under no_grad as well
        kl = kl.clone()
        kl[3, 0] = -1
        with torch.no_grad(), pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]"):
            ours(q, k, kl)
    with pytest.raises(TypeError, match="keys_length"):
        ours(q, k, [1, 2, 3, 4])


def test_float_keys_length_under_torch_compile_fullgraph():
    """A compiled graph cannot branch on the lengths' values: it asserts them when it runs, so a
    fractional, NaN or negative float length raises there too instead of being truncated."""
    mod = FusedDINAttention(embedding_dim=3, att_hidden_units=(4,)).eval()
    compiled = torch.compile(mod, fullgraph=True)
    q, k = torch.randn(2, 1, 3), torch.randn(2, 4, 3)
    for kl in (torch.tensor([2.0, 1.0]), torch.tensor([float("inf"), 1.0])):
        torch.testing.assert_close(compiled(q, k, kl), mod(q, k, kl))
    for bad in (2.5, float("nan"), -1.0):
        with pytest.raises(RuntimeError, match="keys_length must hold whole numbers >= 0"):
            compiled(q, k, torch.tensor([bad, 1.0]))


def test_deepctr_din_swap_after_compile_trains():
    # DeepCTR's usual order: build, compile (the optimizer now holds the layer's
    # Parameters), then swap the attention layer.  The fused layer must train those.
    from deepctr_torch.inputs import SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DIN
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    cols = [SparseFeat("user", 5, embedding_dim=6), SparseFeat("item_id", 10, embedding_dim=6),
            VarLenSparseFeat(SparseFeat("hist_item_id", 10, embedding_dim=6, embedding_name="item_id"),
                             maxlen=4, length_name="seq_length")]
    plain = DIN(cols, ["item_id"], dnn_hidden_units=(8,), att_hidden_size=(8, 4), device="cpu", seed=0)
    randomise_(plain.attention, torch.Generator().manual_seed(3))  # O(1) scores, visible updates
    swapped = copy.deepcopy(plain)
    rng = np.random.default_rng(0)
    n = 64
    # Full histories: DeepCTR's Dice statistics would count padding, ours do not.
    x = {"user": rng.integers(0, 5, n), "item_id": rng.integers(1, 10, n),
         "hist_item_id": rng.integers(1, 10, (n, 4)), "seq_length": np.full(n, 4)}
    y = rng.integers(0, 2, n).astype(np.float32)
    for m in (plain, swapped):
        m.compile("adam", "binary_crossentropy")
    swapped.attention = FusedDINAttention.from_deepctr(swapped.attention)
    before = {k: v.detach().clone() for k, v in plain.attention.named_parameters()}
    for m in (plain, swapped):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    got, want = dict(swapped.attention.named_parameters()), dict(plain.attention.named_parameters())
    assert sorted(got) == sorted(want) and len(got) == 12
    for name, p in want.items():
        step = (p - before[name]).abs().max().item()
        assert step > 1e-4, name  # it trained
        # float32 Adam on the same gradients up to rounding (a bias in front of
        # BatchNorm has an analytically zero gradient: Adam's step there is noise).
        assert (got[name] - p).abs().max().item() <= 1e-2 * step, name


@pytest.mark.parametrize("what", ["eps", "momentum"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_dice_layers_with_their_own_batchnorm_settings_are_refused(what, impl):
    """The op takes one eps and one momentum for every Dice layer: a later layer's own (which the
    bundle would silently have ignored) is refused, naming both; equal ones are fine."""
    mod = FusedDINAttention(embedding_dim=3, att_hidden_units=(4, 3), att_activation="dice", impl=impl)
    q, k, lengths = torch.randn(2, 1, 3), torch.randn(2, 4, 3), torch.tensor([1, 4])
    bns = [a.bn for a in mod.local_att.dnn.activation_layers]
    setattr(bns[1], what, 0.5)
    for train in (True, False):
        mod.train(train)
        with pytest.raises(ValueError, match=rf"layer 1 has .*{what}=0.5"):
            mod(q, k, lengths)
    setattr(bns[0], what, 0.5)
    assert mod(q, k, lengths).shape == (2, 1, 3)


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_dice_training_on_a_batch_of_empty_histories_matches_the_reference(layout):
    """Every history empty: nothing to normalise, as nn.BatchNorm1d on no rows: zero outputs and
    gradients, running statistics kept. (The fused op raised 'needs at least 2 valid positions'.)
    One valid position stays an error in both."""
    torch.manual_seed(0)
    fused = FusedDINAttention(5, att_hidden_units=(4, 3), att_activation="dice").double().train()
    randomise_(fused, torch.Generator().manual_seed(1))
    ref = copy.deepcopy(fused)
    ref.impl = "reference"
    q = torch.randn(3, 1, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, 5, dtype=torch.float64)
    if layout == "padded":
        args, kw = (k, torch.tensor([0, 0, 0])), {}
    else:
        args, kw = (k.new_zeros(0, 5),), {"offsets": torch.zeros(4, dtype=torch.int64)}
    outs = [m(q, *args, **kw) for m in (fused, ref)]
    assert torch.equal(outs[0], torch.zeros_like(outs[0])) and torch.equal(outs[0], outs[1])
    for a, b in zip(*(torch.autograd.grad(o.sum(), [q, *m.parameters()], allow_unused=True)
                      for o, m in zip(outs, (fused, ref)))):
        assert (a is None or not a.any()) and (b is None or not b.any())
    for (n1, t1), (_, t2) in zip(fused.state_dict().items(), ref.state_dict().items()):
        assert max_rel_err(t1.double(), t2.double()) <= TOL64, n1
    if layout == "padded":
        for m in (fused, ref):
            with pytest.raises(ValueError, match=r"(at least 2 valid positions|more than 1 value)"):
                m(q, k, torch.tensor([0, 1, 0]))
