"""DIN / BaseModel: shapes, per-attribute attention, shared tables, padding, fused vs reference, MBA."""

import copy

import pytest
import torch

from din_fused.model import DIN, BaseModel, MiniBatchAwareL2, build_model
from din_fused.modules import Dice, FusedDINAttention

torch.set_num_threads(1)

VOCAB = (30, 6)  # items 1..29, categories 1..5
CTX = (4,)


def make_batch(b=8, t=7, seed=0, with_context=True):
    g = torch.Generator().manual_seed(seed)
    target = torch.stack([torch.randint(1, 30, (b,), generator=g), torch.randint(1, 6, (b,), generator=g)], 1)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = 0  # always exercise an empty history
    lengths[1] = t
    history = torch.stack(
        [torch.randint(1, 30, (b, t), generator=g), torch.randint(1, 6, (b, t), generator=g)], 2
    )
    history = history * (torch.arange(t)[None, :, None] < lengths[:, None, None])
    context = torch.randint(1, 4, (b, 1), generator=g) if with_context else None
    return target, history, lengths, context


def models(att_impl="reference", activation="prelu"):
    torch.manual_seed(0)
    return {
        "din-separate": DIN(
            VOCAB, CTX, 4, attention="separate", attention_impl=att_impl, activation=activation
        ),
        "din-concat": DIN(VOCAB, CTX, 4, attention="concat", attention_impl=att_impl, activation=activation),
        "base-sum": BaseModel(VOCAB, CTX, 4, pooling="sum", activation=activation),
        "base-mean": BaseModel(VOCAB, CTX, 4, pooling="mean", activation=activation),
    }


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_shapes_and_gradients(activation):
    target, history, lengths, context = make_batch()
    for name, m in models(activation=activation).items():
        out = m(target, history, lengths, context)
        assert out.shape == (8,), name
        assert torch.isfinite(out).all(), name
        out.sum().backward()
        # Every parameter receives a gradient (Dice/PReLU alphas, attention, tables).
        missing = [n for n, p in m.named_parameters() if p.grad is None]
        assert not missing, (name, missing)


def test_attention_layout():
    m = models()
    sep, cat = m["din-separate"], m["din-concat"]
    # One attention unit per attribute over E=4 (input 4E=16), vs one over the concatenation (4*A*E=32).
    assert len(sep.att) == 2 and all(isinstance(a, FusedDINAttention) for a in sep.att)
    assert sep.att[0].local_att.dnn.linears[0].weight.shape == (80, 16)
    assert len(cat.att) == 1 and cat.att[0].local_att.dnn.linears[0].weight.shape == (80, 32)
    # MLP 200-80 with the chosen activation, then a logit.
    assert [type(x).__name__ for x in sep.mlp] == ["Linear", "PReLU", "Linear", "PReLU"]
    assert sep.mlp[0].out_features == 200 and sep.mlp[2].out_features == 80
    dice = DIN(VOCAB, (), 4, attention_impl="reference", activation="dice")
    assert isinstance(dice.mlp[1], Dice) and dice.att[0].activation == "dice"
    assert (
        DIN(VOCAB, (), 4, attention_impl="reference", att_activation="sigmoid").att[0].activation == "sigmoid"
    )


def test_candidate_and_behaviour_share_one_table_per_attribute():
    m = models()["din-separate"]
    target, history, lengths, _ = make_batch()
    history[:, 0] = target  # position 0 holds the candidate itself
    q, k = m.embed(target, history)
    for a in range(2):
        assert torch.equal(q[a], k[a][:, 0])
    assert len(m.attr_embeddings) == 2 and m.attr_embeddings[0].num_embeddings == 30


def test_separate_attention_scores_attributes_independently():
    """In "separate" mode the item unit never sees categories: changing the
    behaviour categories leaves the item part of the interest vector unchanged."""
    m = models()["din-separate"].eval()
    target, history, lengths, _ = make_batch()
    q, k = m.embed(target, history)
    base = m.pool(q, k, lengths)
    h2 = history.clone()
    h2[:, :, 1] = (h2[:, :, 1] % 5) + 1
    h2 = h2 * (torch.arange(7)[None, :, None] < lengths[:, None, None])
    q2, k2 = m.embed(target, h2)
    moved = m.pool(q2, k2, lengths)
    assert torch.allclose(base[:, :4], moved[:, :4])  # item attention output
    assert not torch.allclose(base[:, 4:], moved[:, 4:])  # category attention output


@pytest.mark.parametrize("name", ["din-separate", "din-concat", "base-sum", "base-mean"])
def test_padding_never_matters(name):
    m = models()[name].eval()
    target, history, lengths, context = make_batch()
    ref = m(target, history, lengths, context)
    junk = torch.stack([torch.randint(1, 30, (8, 7)), torch.randint(1, 6, (8, 7))], 2)
    pad = torch.arange(7)[None, :, None] >= lengths[:, None, None]
    noisy = torch.where(pad, junk, history)
    assert not torch.equal(noisy, history)
    torch.testing.assert_close(m(target, noisy, lengths, context), ref)
    # An empty history pools to exactly zero.
    q, k = m.embed(target, noisy)
    assert torch.all(m.pool(q, k, lengths)[0] == 0)


def test_base_pooling_values():
    m = models()["base-mean"]
    target, history, lengths, _ = make_batch()
    q, k = m.embed(target, history)
    pooled = m.pool(q, k, lengths)
    i = 1  # full-length row
    expected = torch.cat([k[0][i].mean(0), k[1][i].mean(0)])
    torch.testing.assert_close(pooled[i], expected)
    m.pooling = "sum"
    torch.testing.assert_close(m.pool(q, k, lengths)[i], expected * 7)


@pytest.mark.parametrize("att_impl", ["fused", "reference"])
@pytest.mark.parametrize("name", ["din-separate", "base-sum", "base-mean"])
def test_lengths_above_T_mean_all_positions_and_negative_ones_are_refused(name, att_impl):
    """As DIN's attention takes them (and DeepCTR-Torch's masks): a length above T pools all T
    positions, so the mean divides by T, not by the length; a negative length is an error (the
    reference attention pooled it to zero)."""
    m = models(att_impl)[name].eval()
    target, history, lengths, context = make_batch()
    T = history.shape[1]
    big = lengths.clone()
    big[1] = T + 5  # row 1 is full-length
    torch.testing.assert_close(m(target, history, big, context), m(target, history, lengths, context))
    neg = lengths.clone()
    neg[2] = -1
    with pytest.raises(ValueError, match="lengths must"):
        m(target, history, neg, context)


@pytest.mark.parametrize("attention", ["separate", "concat"])
@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_fused_matches_reference(attention, activation):
    """attention_impl only switches the op: same parameters, same outputs and gradients."""
    torch.manual_seed(1)
    ref = DIN(VOCAB, CTX, 4, attention=attention, attention_impl="reference", activation=activation).double()
    fused = DIN(VOCAB, CTX, 4, attention=attention, attention_impl="fused", activation=activation).double()
    fused.load_state_dict(ref.state_dict())
    target, history, lengths, context = make_batch(b=16)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        fused.train(mode == "train")
        out_r = ref(target, history, lengths, context)
        out_f = fused(target, history, lengths, context)
        torch.testing.assert_close(out_f, out_r, rtol=1e-9, atol=1e-10)
        ref.zero_grad()
        fused.zero_grad()
        out_r.square().sum().backward()
        out_f.square().sum().backward()
        for (n, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
            torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-7, atol=1e-9, msg=f"{mode} {n}")
    # Training-mode Dice updated the same running statistics.
    for (n, br), (_, bf) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(bf, br, msg=n)


def test_bad_arguments():
    with pytest.raises(ValueError, match="attention"):
        DIN(VOCAB, attention="sum")
    with pytest.raises(ValueError, match="attention_impl"):
        DIN(VOCAB, attention_impl="cuda")
    with pytest.raises(ValueError, match="pooling"):
        BaseModel(VOCAB, pooling="max")
    with pytest.raises(ValueError, match="activation"):
        BaseModel(VOCAB, activation="relu")
    with pytest.raises(ValueError, match="model"):
        build_model("dien", VOCAB)
    m = models()["din-separate"]
    target, history, lengths, context = make_batch()
    with pytest.raises(ValueError, match="target"):
        m(target[:, :1], history, lengths, context)
    with pytest.raises(ValueError, match="history"):
        m(target, history[:, :, :1], lengths, context)
    with pytest.raises(ValueError, match="lengths"):
        m(target, history, lengths[:3], context)
    with pytest.raises(ValueError, match="context"):
        m(target, history, lengths, None)


@pytest.mark.parametrize("name", ["din-separate", "din-concat", "base-sum"])
def test_bad_jagged_arguments(name):
    """Eager jagged calls check offsets' and row_seq's values (a traced graph cannot: serving
    skips them, docs/serving.md), naming the argument, before any lookup or kernel."""
    m = models(att_impl="fused")[name]
    target, history, lengths, context = make_batch(b=4, t=3, seed=9)
    lengths = torch.tensor([2, 0, 3, 1])
    values = torch.cat([history[i, : lengths[i]] for i in range(4)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    m.forward_jagged(target, values, offsets, context)  # the good call
    for bad in (offsets + 1, offsets.flip(0), torch.cat([offsets[:-1], offsets[-1:] - 1])):
        with pytest.raises(ValueError, match="offsets must start at 0, not decrease and end at"):
            m.forward_jagged(target, values, bad, context)
    with pytest.raises(ValueError, match=r"without row_seq, offsets must be \[R\+1\]"):
        m.forward_jagged(target, values[: int(offsets[-2])], offsets[:-1], context)
    two = torch.tensor([0, 2, 2])  # two histories for four rows
    for row_seq in (torch.tensor([0, 1, 2, 0]), torch.tensor([0, -1, 0, 1]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match=r"row_seq must be \[4\] with values in \[0, 2\)"):
            m.forward_jagged(target, values[:2], two, context, row_seq)


def test_build_model():
    m = build_model(
        "din", VOCAB, CTX, embedding_dim=4, activation="dice", attention="concat", attention_impl="reference"
    )
    assert isinstance(m, DIN) and m.attention == "concat" and m.att[0].impl == "reference"
    b = build_model("base", VOCAB, CTX, embedding_dim=4, pooling="mean", activation="prelu")
    assert isinstance(b, BaseModel) and b.pooling == "mean"


def test_batch_ids_skip_padding():
    m = models()["din-separate"]
    target = torch.tensor([[1, 1], [2, 2]])
    history = torch.tensor([[[3, 3], [4, 4]], [[5, 5], [9, 5]]])  # row 1: (9, 5) is beyond its length
    lengths = torch.tensor([2, 1])
    ids = m.batch_ids(target, history, lengths, torch.tensor([[1], [3]]))
    assert sorted(ids[0].tolist()) == [1, 2, 3, 4, 5]
    assert sorted(ids[1].tolist()) == [1, 2, 3, 4, 5]
    assert sorted(ids[2].tolist()) == [1, 3]


def test_mba_regulariser_hand_computed():
    table = torch.nn.Embedding(5, 2, padding_idx=0)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.0, 0], [1, 2], [3, 0], [0, 4], [5, 5]]))
    counts = torch.tensor([0.0, 2, 5, 1, 0])  # id 4 never seen in training -> treated as 1
    reg = MiniBatchAwareL2([counts], lam=0.1)
    ids = torch.tensor([[1, 1, 3], [0, 3, 1]])  # uses rows 1 and 3 (each once), 0 is padding
    pen = reg([table], [ids])
    # 0.1/2 * (||(1,2)||^2 / 2 + ||(0,4)||^2 / 1) = 0.05 * (2.5 + 16)
    assert pen.item() == pytest.approx(0.05 * 18.5)
    pen.backward()
    g = table.weight.grad
    # Gradient lam * w_j / n_j on used rows, zero on all others (rows 2 and 4 untouched).
    torch.testing.assert_close(g[1], 0.1 * torch.tensor([1.0, 2]) / 2)
    torch.testing.assert_close(g[3], 0.1 * torch.tensor([0.0, 4]) / 1)
    assert torch.all(g[[0, 2, 4]] == 0)
    assert MiniBatchAwareL2([counts], 0.0)([table], [ids]).item() == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lam .*finite number >= 0"):
            MiniBatchAwareL2([counts], bad)
    with pytest.raises(TypeError, match="lam"):
        MiniBatchAwareL2([counts], None)
    with pytest.raises(ValueError, match="tables"):
        reg([table, table], [ids, ids])


def test_mba_on_model_touches_only_batch_rows():
    m = models()["din-separate"]
    target, history, lengths, context = make_batch()
    counts = [torch.ones(v) for v in (*VOCAB, *CTX)]
    reg = MiniBatchAwareL2(counts, 1.0)
    reg(m.embedding_tables(), m.batch_ids(target, history, lengths, context)).backward()
    used = set(m.batch_ids(target, history, lengths, context)[0].tolist()) - {0}
    rows_with_grad = set(torch.nonzero(m.attr_embeddings[0].weight.grad.abs().sum(1)).squeeze(1).tolist())
    assert rows_with_grad == used


def test_softmax_attention_option_averages():
    """att_weight_normalization="softmax" (the original code's choice) makes the weights a convex
    combination: a history of one repeated behaviour pools to exactly that behaviour."""
    torch.manual_seed(0)
    m = DIN(VOCAB, (), 4, attention_impl="reference", activation="prelu", att_weight_normalization="softmax")
    target, history, lengths, _ = make_batch()
    history = torch.where(history > 0, torch.tensor([3, 2]), history)
    q, k = m.embed(target, history)
    pooled = m.pool(q, k, lengths)
    has = lengths > 0
    expected = torch.cat([m.attr_embeddings[0].weight[3], m.attr_embeddings[1].weight[2]])
    torch.testing.assert_close(pooled[has], expected.expand(int(has.sum()), 8))
    assert torch.all(pooled[~has] == 0)


def _trained(m, activation_steps=3):
    """A few optimiser steps so that weights, Dice running statistics and PReLU slopes move."""
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for s in range(activation_steps):
        target, history, lengths, context = make_batch(b=16, seed=10 + s)
        loss = m(target, history, lengths, context).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_save_load_predicts_bitwise_the_same(tmp_path, activation):
    from din_fused.data import Vocab
    from din_fused.model import load, load_checkpoint, save

    vocab = Vocab(
        item_raw=torch.arange(-1, 29).numpy() * 10,
        item_attrs=torch.stack([torch.arange(30), torch.arange(30) % 5 + (torch.arange(30) > 0)], 1).numpy(),
        context_raw=(torch.tensor([-1, 7, 8, 9]).numpy(),),
    )
    target, history, lengths, context = make_batch(b=11, seed=4)
    for name, m in models(att_impl="fused", activation=activation).items():
        m = _trained(m)
        before = m(target, history, lengths, context)
        path = tmp_path / f"{name}.pt"
        save(m, path, vocab=vocab, max_len=7, metrics={"test_auc": 0.7, "v": torch.__version__},
             attr_names=("item", "category"), context_names=("slot",))
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
        loaded = load(path)
        assert type(loaded) is type(m) and not loaded.training
        assert torch.equal(loaded(target, history, lengths, context), before), name
        ck = load_checkpoint(path)
        assert ck.max_len == 7 and ck.metrics["test_auc"] == 0.7 and ck.context_names == ("slot",)
        assert ck.vocab.item_rows()[280] == 29 and ck.vocab.context_rows() == [{7: 1, 8: 2, 9: 3}]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a din_fused checkpoint"):
        load(tmp_path / "junk.pt")
    torch.save({"format": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="format 'other'"):
        load(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load(tmp_path / "missing.pt")
    # Names and vocabulary that do not describe the model's columns: refused on save, and on load
    # (a file written without the check: predict maps request context by these names).
    no_context = Vocab(vocab.item_raw, vocab.item_attrs)
    for kw, match in (({"context_names": ()}, "context_names must name the model's 1"),
                      ({"attr_names": ("item",)}, "attr_names must name the model's 2"),
                      ({"vocab": no_context}, "vocab has 2 item attribute.*0 context")):
        args = {"vocab": vocab, "max_len": 7, "attr_names": ("item", "category"), "context_names": ("slot",)}
        with pytest.raises(ValueError, match=match):
            save(m, tmp_path / "bad.pt", **{**args, **kw})
        assert not (tmp_path / "bad.pt").exists()
    blob = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    torch.save({**blob, "context_names": []}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="damaged din_fused checkpoint.*context_names must name"):
        load_checkpoint(tmp_path / "old.pt")


@pytest.mark.parametrize("name", ["din-separate", "din-concat", "base-sum"])
def test_score_shared_equals_forward_on_tiled_histories(name):
    """One history per user, many candidates each: the same logits as the padded batch that tiles it."""
    m = _trained(models(att_impl="fused", activation="dice")[name])
    g = torch.Generator().manual_seed(3)
    lens = [5, 0, 7, 1]  # includes an empty history
    values = torch.stack([torch.randint(1, 30, (sum(lens),), generator=g),
                          torch.randint(1, 6, (sum(lens),), generator=g)], 1)
    offsets = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    row_seq = torch.tensor([0, 0, 0, 1, 2, 2, 3, 0])
    r = row_seq.numel()
    target = torch.stack([torch.randint(1, 30, (r,), generator=g), torch.randint(1, 6, (r,), generator=g)], 1)
    context = torch.randint(1, 4, (r, 1), generator=g)
    t = max(lens)
    history = torch.zeros(r, t, 2, dtype=torch.int64)
    for i, s in enumerate(row_seq.tolist()):
        history[i, : lens[s]] = values[offsets[s] : offsets[s + 1]]
    lengths = torch.tensor([lens[s] for s in row_seq.tolist()])
    want = m(target, history, lengths, context)
    got = m.score_shared(target, values, offsets, row_seq, context)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"end at values.shape\[0\] = 12"):
        m.score_shared(target, values[:-1], offsets, row_seq, context)
    with pytest.raises(ValueError, match="values must be"):
        m.score_shared(target, values[:, :1], offsets, row_seq, context)
    with pytest.raises(ValueError, match=r"row_seq must be \[8\] with values in \[0, 4\)"):
        m.score_shared(target, values, offsets, row_seq + 1, context)
    with pytest.raises(ValueError, match="row_seq"):
        m.score_shared(target, values, offsets, row_seq[:-1], context)


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_jagged_forward_and_gradients_equal_padded(activation):
    """The same batch as jagged values/offsets and as padded [B, T]: same logits and the same gradients
    for every parameter (training mode, so Dice uses batch statistics)."""
    target, history, lengths, context = make_batch(b=9, t=6, seed=5)
    values = torch.cat([history[i, : lengths[i]] for i in range(9)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    for name, m0 in models(att_impl="fused", activation=activation).items():
        grads, outs, buffers = [], [], []
        for jagged in (False, True):
            m = copy.deepcopy(m0).train()
            out = m.forward_jagged(target, values, offsets, context) if jagged else m(
                target, history, lengths, context
            )
            (out * torch.linspace(-1, 1, 9)).sum().backward()
            outs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
            buffers.append(dict(m.named_buffers()))  # Dice running statistics, batch counters
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6, msg=name)
        for n in grads[0]:
            torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=f"{name} {n}")
        for n in buffers[0]:
            torch.testing.assert_close(buffers[1][n], buffers[0][n], rtol=1e-5, atol=1e-7, msg=f"{name} {n}")


def test_din_jagged_path_never_pads(monkeypatch):
    """With the fused op, the jagged DIN reads values/offsets directly: the keys are never tiled or
    padded (only the reference oracle does that, through reference.tile_jagged)."""
    import din_fused.modules as modules_mod

    def no_padding(*args, **kwargs):
        raise AssertionError("tile_jagged called on the fused jagged path")

    monkeypatch.setattr(modules_mod, "tile_jagged", no_padding)
    target, history, lengths, context = make_batch(b=5, t=4, seed=6)
    values = torch.cat([history[i, : lengths[i]] for i in range(5)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    for name in ("din-separate", "din-concat"):
        m = models(att_impl="fused", activation="dice")[name]
        m.forward_jagged(target, values, offsets, context).sum().backward()
        shared = torch.tensor([0, 3])  # one history of 3 behaviours for all 5 candidates
        m.eval().score_shared(target, values[:3], shared, torch.zeros(5, dtype=torch.int64), context)


@pytest.mark.parametrize("jagged", [False, True])
@pytest.mark.parametrize("name", ["din-separate", "din-concat", "base-sum"])
def test_table_gradients_equal_nn_embedding(name, jagged, monkeypatch):
    """Eager CPU training looks the candidates' and the behaviours' rows up in one node
    (_JointLookup: both sides of a table, side by side with "concat") with a table gradient of
    its own (ops.embedding_grad), and runs PReLU's backward in one pass (ops.prelu_backward):
    the same logits bitwise and the same gradients as nn.Embedding and nn.PReLU, float64, up
    to summation order, and nothing at the padding row."""
    import din_fused.model as M

    target, history, lengths, context = make_batch(b=9, t=6, seed=7)
    values = torch.cat([history[i, : lengths[i]] for i in range(9)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    m0 = models(att_impl="fused")[name].double()
    grads, outs, nodes = [], [], []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(M, "_fast_table", lambda emb: False)
            monkeypatch.setattr(M.PReLU, "forward", torch.nn.PReLU.forward)
        m = copy.deepcopy(m0).train()
        if jagged:
            out = m.forward_jagged(target, values, offsets, context)
        else:
            out = m(target, history, lengths, context)
        nodes.append(_graph_nodes(out.grad_fn))
        (out * torch.linspace(-1, 1, 9, dtype=torch.float64)).sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    # BaseModel's jagged pooling is embedding_bag: only its candidates are looked up, one table at a time.
    lookup = "_LookupIndexAddBackward" if jagged and name.startswith("base") else "_JointLookupBackward"
    assert {lookup, "_PReLUFnBackward"} <= nodes[0], nodes[0]
    assert not {"_JointLookupBackward", "_PReLUFnBackward", "_LookupIndexAddBackward"} & nodes[1], nodes[1]
    assert torch.equal(outs[0], outs[1])
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=1e-12, atol=1e-14, msg=n)
        if "embeddings" in n:
            assert g.abs().sum() > 0 and torch.equal(g[0], torch.zeros_like(g[0])), n


def _graph_nodes(fn) -> set:
    """The names of the autograd nodes that fn reaches."""
    seen, names, todo = set(), set(), [fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(f.name())
        todo += [g for g, _ in f.next_functions]
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("E", [1, 5, 16])
def test_embedding_grad_sums_rows_per_index(dtype, E):
    """ops.embedding_grad (the lookups' table gradient): every index's row of grad added into
    its table row, hot and absent rows included, padding row zero, against a float64 sum;
    a transposed grad (the index_add_ path) agrees; a bad index is refused before writing."""
    from din_fused.ops import embedding_grad

    g = torch.Generator().manual_seed(E)
    rows, n = 37, 500
    idx = torch.cat([torch.randint(0, rows, (n - 50,), generator=g), torch.full((50,), 3)])  # row 3 hot
    grad = torch.randn(n, E, generator=g, dtype=torch.float64)
    want = torch.zeros(rows, E, dtype=torch.float64)
    for i, r in enumerate(idx.tolist()):
        want[r] += grad[i]
    want[5] = 0
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    got = embedding_grad(idx, grad.to(dtype), rows, padding_idx=5)
    torch.testing.assert_close(got, want.to(dtype), **tol)
    assert torch.equal(got[5], torch.zeros(E, dtype=dtype))
    assert embedding_grad(idx, grad.to(dtype), rows).abs()[5].sum() > 0
    wide = torch.randn(n, E + 5, generator=g, dtype=torch.float64).to(dtype)
    wide[:, 2:2 + E] = grad.to(dtype)
    for other in (wide[:, 2:2 + E],  # rows E + 5 apart: the C++ pass with its row stride
                  grad.to(dtype).t().contiguous().t()):  # stride(1) != 1 (unless E == 1): index_add_
        torch.testing.assert_close(embedding_grad(idx, other, rows, padding_idx=5), want.to(dtype), **tol)
    torch.testing.assert_close(embedding_grad(idx, grad.to(dtype), rows, padding_idx=5 - rows),
                               want.to(dtype), **tol)  # negative: from the end, as nn.Embedding
    ids = torch.randint(0, rows, (n, 3), generator=g)
    ids[:, 1] = idx  # one attribute's column of [n, A] ids, read in place at stride 3
    assert torch.equal(embedding_grad(ids[:, 1], grad.to(dtype), rows, padding_idx=5),
                       embedding_grad(idx.clone(), grad.to(dtype), rows, padding_idx=5))
    for bad in (rows, -1):
        with pytest.raises(ValueError, match="indices must lie in"):
            embedding_grad(torch.tensor([0, bad]), grad[:2].to(dtype), rows)
        with pytest.raises(ValueError, match=r"indices\[1\] = " + str(bad)):
            embedding_grad(torch.tensor([[0, 9], [bad, 9]])[:, 0], grad[:2].to(dtype), rows)
    with pytest.raises(ValueError, match="idx must have shape"):
        embedding_grad(idx[:-1], grad.to(dtype), rows)
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        embedding_grad(idx, grad.to(dtype), rows, padding_idx=rows)


def test_embedding_grad_adds_pairs_in_turn():
    """Several lookups of one table: each (idx, grad) pair added in turn, as their separate
    gradients summed; pairs that do not match are refused."""
    from din_fused.ops import embedding_grad

    g = torch.Generator().manual_seed(1)
    idx = [torch.randint(0, 9, (n,), generator=g) for n in (5, 40)]
    grad = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (5, 40)]
    want = embedding_grad(idx[0], grad[0], 9, 0) + embedding_grad(idx[1], grad[1], 9, 0)
    torch.testing.assert_close(embedding_grad(idx, grad, 9, 0), want, rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="must pair up"):
        embedding_grad(idx, grad[:1], 9)
    with pytest.raises(ValueError, match="grad must be"):
        embedding_grad(idx, [grad[0], grad[1][:, :2]], 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_lookup_rows_writes_tables_side_by_side(dtype):
    """ops.lookup_rows: tables[a][ids[:, a]] in columns a*E:(a+1)*E, bitwise torch.cat of the
    lookups (the C++ copy for fp32/fp64, F.embedding and cat otherwise); a bad index is
    refused with the argument's name before anything is written."""
    from din_fused.ops import lookup_rows

    g = torch.Generator().manual_seed(2)
    tables = [torch.randn(r, 5, generator=g).to(dtype) for r in (11, 3, 7)]
    ids = torch.stack([torch.randint(0, r, (23,), generator=g) for r in (11, 3, 7)], 1)
    want = torch.cat([t[ids[:, a]] for a, t in enumerate(tables)], 1)
    for i in (ids, ids.to(torch.int32), ids.t().contiguous().t()):
        assert torch.equal(lookup_rows(tables, i), want)
    assert lookup_rows(tables, ids[:0]).shape == (0, 15)
    big = [torch.randn(r, 16, generator=g).to(dtype) for r in (50, 9)]
    big_ids = torch.stack([torch.randint(0, r, (5000,), generator=g) for r in (50, 9)], 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # 5000 rows of 16: copied by two threads, each its own rows
        got = lookup_rows(big, big_ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got, torch.cat([t[big_ids[:, a]] for a, t in enumerate(big)], 1))
    bad = ids.clone()
    bad[4, 1] = 3
    message = r"ids\[:, 1\] indexes tables\[1\]: indices must lie in \[0, 3\), got indices\[4\] = 3"
    with pytest.raises((ValueError, IndexError), match=message + "|index out of range"):
        lookup_rows(tables, bad)
    with pytest.raises(ValueError, match=r"ids must have shape \[N, 3\]"):
        lookup_rows(tables, ids[:, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C,slopes", [(200, "channel"), (37, "channel"), (3, "one"), (1, "channel")])
def test_prelu_backward_equals_aten(dtype, C, slopes):
    """ops.prelu_backward against aten's PReLU backward: the input gradient bitwise (zeros,
    -0.0 and NaN inputs included), the slope gradient up to summation order; under
    create_graph (differentiable torch ops) the same, and a second derivative flows."""
    from din_fused.ops import prelu_backward

    g = torch.Generator().manual_seed(C)
    x = torch.randn(70, C, generator=g, dtype=torch.float64)
    x[0, 0], x[1, -1], x[2, 0] = 0.0, -0.0, float("nan")
    grad = torch.randn(70, C, generator=g, dtype=torch.float64)
    w = torch.rand(C if slopes == "channel" else 1, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(torch.prelu(xr, wr), (xr, wr), grad)
    x, grad, w = x.to(dtype), grad.to(dtype), w.to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    got = prelu_backward(grad, x, w)
    assert torch.equal(got[0], torch.ops.aten._prelu_kernel_backward(grad, x, w)[0].to(dtype))
    torch.testing.assert_close(got[0].double(), want[0], equal_nan=True, **tol)
    torch.testing.assert_close(got[1].double(), want[1], equal_nan=True, **tol)
    keep = ~torch.isnan(x).any(1)  # the NaN row makes the slope's gradient NaN
    xc, gc = x[keep].double().requires_grad_(), grad[keep].double().requires_grad_()
    wc = w.double().requires_grad_()
    gx, gw = prelu_backward(gc, xc, wc)
    assert gx.requires_grad and gw.requires_grad
    xr, wr = xc.detach().requires_grad_(), wc.detach().requires_grad_()
    torch.testing.assert_close(gw, torch.autograd.grad(torch.prelu(xr, wr), wr, gc.detach())[0], **tol)
    assert torch.autograd.grad(gw.sum() + gx.square().sum(), wc)[0].abs().sum() > 0
    with pytest.raises(ValueError, match=r"must be \[N, C\]"):
        prelu_backward(grad[:5], x, w)


def test_model_prelu_gradcheck():
    """The model's PReLU (nn.PReLU with ops.prelu_backward in eager CPU training) routes
    through _PReLUFn, whose one-pass backward passes gradcheck in float64."""
    from din_fused.model import PReLU, _PReLUFn

    act = PReLU(6).double()
    x = (torch.randn(9, 6, dtype=torch.float64) + 0.3).requires_grad_()
    assert act(x).grad_fn.name() == "_PReLUFnBackward"
    with torch.no_grad():
        assert act(x).grad_fn is None
    w = torch.linspace(-0.5, 1.5, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_PReLUFn.apply, (x, w))


def test_table_gradients_support_double_backward():
    """create_graph through the lookups: the table gradient is itself differentiable, as
    nn.Embedding's is (a gradient penalty on the tables gets the same second-order term)."""
    import din_fused.model as M

    emb = torch.nn.Embedding(7, 3, padding_idx=0).double()
    idx = torch.tensor([[1, 2, 2], [0, 6, 1]])
    got = []
    for lookup in (M._lookup, lambda e, i: e(i)):
        w = emb.weight
        (gw,) = torch.autograd.grad(lookup(emb, idx).pow(3).sum(), w, create_graph=True)
        got.append(torch.autograd.grad(gw.square().sum(), w)[0])
    assert M._lookup(emb, idx).grad_fn.name().endswith("_LookupIndexAddBackward")
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=1e-12)
    assert got[0].abs().sum() > 0


def test_index_add_lookup_only_where_it_applies():
    import din_fused.model as M

    emb = torch.nn.Embedding(5, 3, padding_idx=0)
    idx = torch.tensor([0, 2, 2])
    assert M._lookup(emb, idx).grad_fn.name().endswith("_LookupIndexAddBackward")
    with torch.no_grad():
        assert M._lookup(emb, idx).grad_fn is None
    emb.weight.requires_grad_(False)
    assert M._lookup(emb, idx).grad_fn is None


@pytest.mark.parametrize("name", ["din-separate", "base-mean"])
def test_model_inputs_of_the_wrong_kind_are_named(name):
    """Lengths and row_seq must be integers (BaseModel pooled float lengths, and took a bool
    row_seq as a mask), and context given to a model without context features is refused rather
    than ignored; an empty [B, 0] context stays fine."""
    m = models()[name].eval()
    bare = DIN(VOCAB, (), 4) if name.startswith("din") else BaseModel(VOCAB, (), 4)
    target, history, lengths, context = make_batch()
    for bad in (lengths.double() + 0.5, lengths.bool()):
        with pytest.raises(TypeError, match="lengths must be an int32/int64 tensor"):
            m(target, history, bad, context)
    with pytest.raises(ValueError, match="built without context features"):
        bare.eval()(target, history, lengths, context)
    assert bare(target, history, lengths, context[:, :0]).shape == (8,)
    values = history[torch.arange(7)[None, :] < lengths[:, None]]
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    with pytest.raises(TypeError, match="row_seq must be an int32/int64 tensor"):
        m.forward_jagged(target, values, offsets, context, torch.ones(8, dtype=torch.bool))


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_base_jagged_pooling_treats_id_0_as_the_padded_path_does(pooling):
    """An id 0 inside a history (the tables' padding_idx): the padded lookups add its zero row,
    train nothing and count it in the mean's length; the jagged path (embedding_bag) must too."""
    torch.manual_seed(0)
    m = BaseModel(VOCAB, (), 3, pooling=pooling).double()
    target = torch.tensor([[1, 1], [2, 3]])
    hist = torch.tensor([[[0, 0], [5, 2], [0, 0]], [[7, 1], [0, 0], [0, 0]]])
    lengths = torch.tensor([3, 1])
    values, offsets = torch.cat([hist[0, :3], hist[1, :1]]), torch.tensor([0, 3, 4])
    grads = []
    for out in (m(target, hist, lengths), m.forward_jagged(target, values, offsets)):
        m.zero_grad()
        out.sum().backward()
        grads.append([t.grad.clone() for t in m.attr_embeddings[0].parameters()])
        assert not grads[-1][0][0].any()  # the padding row trains nothing
    torch.testing.assert_close(m(target, hist, lengths), m.forward_jagged(target, values, offsets))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("layout", ["padded", "jagged"])
def test_ids_outside_a_table_name_the_input(layout):
    """An id of the vocabulary's size or a negative one: a ValueError naming the input and the
    table, where the lookup said only 'index out of range in self'."""
    m = models("fused")["din-separate"].eval()
    target, history, lengths, context = make_batch()
    values = history[torch.arange(7)[None, :] < lengths[:, None]]
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])

    def run(t, h, v, c):
        return m(t, h, lengths, c) if layout == "padded" else m.forward_jagged(t, v, offsets, c)

    for name, idx, bad in (("target", (0, 0), VOCAB[0]), ("target", (2, 1), -1), ("context", (0, 0), CTX[0])):
        t, c = target.clone(), context.clone()
        (t if name == "target" else c)[idx] = bad
        with pytest.raises(ValueError, match=rf"{name}\[\.\.\., {idx[1]}\] holds ids in .*outside table"):
            run(t, history, values, c)
    h, v = history.clone(), values.clone()
    h[1, 0, 1], v[0, 1] = VOCAB[1], VOCAB[1]
    with pytest.raises(ValueError, match=r"(history|values)\[\.\.\., 1\] holds ids"):
        run(target, h, v, context)
