"""AUC, GAUC, per-user AUC, logloss and RelaImpr against hand-computed cases."""

import json
import math

import numpy as np
import pytest
import torch

from din_fused import metrics as M


def brute_force_auc(y, s):
    """Fraction of (positive, negative) pairs ranked correctly, ties counting 1/2."""
    pos = [b for a, b in zip(y, s) if a == 1]
    neg = [b for a, b in zip(y, s) if a == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_hand_computed():
    # Pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, 0.1) right, (0.8, 0.4) right -> 3/4.
    assert M.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # Perfect and reversed rankings.
    assert M.auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert M.auc([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]) == 0.0
    # A tie between a positive and a negative counts one half.
    assert M.auc([0, 1], [0.5, 0.5]) == 0.5
    # Tensors (including [N, 1] model outputs) are accepted.
    assert M.auc(torch.tensor([0.0, 0, 1, 1]), torch.tensor([[0.1], [0.4], [0.35], [0.8]])) == pytest.approx(
        0.75
    )


def test_auc_single_class_is_nan_and_bad_input_raises():
    assert math.isnan(M.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(M.auc([], []))
    with pytest.raises(ValueError, match="same length"):
        M.auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0 or 1"):
        M.auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        M.auc([0, 1], [0.1, float("nan")])


# user 7: labels 1,0,0 scores .9,.1,.5 -> AUC 1.0 with 3 impressions
# user 3: labels 1,1,0,0 scores .2,.6,.4,.8 -> pairs (.2,.4) (.2,.8) (.6,.8) wrong,
#         (.6,.4) right -> 1/4 with 4 impressions
# user 5: labels 1,1 -> one class, skipped
GAUC_CASE = dict(
    labels=[1, 0, 0, 1, 1, 0, 0, 1, 1],
    scores=[0.9, 0.1, 0.5, 0.2, 0.6, 0.4, 0.8, 0.3, 0.7],
    users=[7, 7, 7, 3, 3, 3, 3, 5, 5],
)


def test_gauc_hand_computed():
    g = M.group_auc(**GAUC_CASE)
    assert g.weighted == pytest.approx((3 * 1.0 + 4 * 0.25) / 7)  # paper: weighted by impressions
    assert g.unweighted == pytest.approx((1.0 + 0.25) / 2)
    assert (g.users, g.skipped, g.impressions) == (2, 1, 7)
    assert M.gauc(**GAUC_CASE) == pytest.approx(4 / 7)
    assert M.gauc(**GAUC_CASE, weighted=False) == pytest.approx(0.625)


def test_gauc_is_not_the_global_auc_and_ignores_order():
    # One user ranks perfectly, the other perfectly too, but their score scales
    # differ: per-user AUC is 1 while the pooled AUC is not.
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.2, 0.1]
    u = [1, 1, 2, 2]
    assert M.gauc(y, s, u) == 1.0
    assert M.auc(y, s) == pytest.approx(brute_force_auc(y, s)) == pytest.approx(0.75)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(GAUC_CASE["labels"]))
    shuffled = {k: np.asarray(v)[perm] for k, v in GAUC_CASE.items()}
    assert M.gauc(**shuffled) == pytest.approx(4 / 7)


def test_gauc_random_against_brute_force():
    rng = np.random.default_rng(1)
    n = 300
    users = rng.integers(0, 12, n)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.random(n), 2)  # rounding creates ties
    num = den = 0.0
    per_user = []
    for u in np.unique(users):
        m = users == u
        if labels[m].min() == labels[m].max():
            continue
        a = brute_force_auc(labels[m], scores[m])
        per_user.append(a)
        num += m.sum() * a
        den += m.sum()
    g = M.group_auc(labels, scores, users)
    assert g.weighted == pytest.approx(num / den)
    assert g.unweighted == pytest.approx(np.mean(per_user))
    assert M.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores))


def test_gauc_all_users_single_class_is_nan():
    g = M.group_auc([1, 1, 0], [0.1, 0.2, 0.3], [1, 1, 2])
    assert math.isnan(g.weighted) and math.isnan(g.unweighted)
    assert (g.users, g.skipped) == (0, 2)


def test_log_loss_hand_computed():
    assert M.log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    # Clipping keeps a confident mistake finite.
    assert math.isfinite(M.log_loss([1], [0.0]))
    # Logits passed for probabilities would clip to a near-perfect loss: refused.
    for bad in ([2.0, -1.0], [0.5, 1.0 + 1e-9]):
        with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]"):
            M.log_loss([1, 0], bad)


def test_relaimpr_matches_paper_table3():
    # The paper's MovieLens column: DIN 0.7337 -> 1.61 %, DIN with Dice 0.7348 -> 2.09 % over 0.7300.
    assert M.relaimpr(0.7337, 0.7300) == pytest.approx(1.6087, abs=1e-4)
    assert M.relaimpr(0.7348, 0.7300) == pytest.approx(2.0870, abs=1e-4)
    assert M.relaimpr(0.7300, 0.7300) == 0.0
    assert M.relaimpr(0.6, 0.7) == pytest.approx(-50.0)
    with pytest.raises(ValueError, match="above 0.5"):
        M.relaimpr(0.7, 0.5)


def test_table_cli(tmp_path, capsys):
    rows = [
        {"name": "BaseModel+PReLU", "test_auc": 0.73, "test_gauc": 0.70, "test_gauc_unweighted": 0.69},
        {"name": "DIN+Dice", "test_auc": 0.7348, "test_gauc": 0.71, "test_gauc_unweighted": 0.70},
    ]
    files = []
    for i, r in enumerate(rows):
        f = tmp_path / f"{i}.json"
        f.write_text(json.dumps(r))
        files.append(str(f))
    assert M._main(files) == 0
    out = capsys.readouterr().out
    assert "| BaseModel+PReLU | 0.7300 | +0.00% |" in out
    assert "| DIN+Dice | 0.7348 | +2.09% | 0.7100 | +5.00% |" in out
    with pytest.raises(SystemExit):
        M._main([str(tmp_path / "missing.json")])


def test_gauc_user_ids_are_never_merged_by_a_cast():
    """Float ids that are not whole numbers are refused (a cast to int merged 1.2 and 1.7 into one
    user); whole floats, strings and tensors group like the integers they stand for."""
    y, s = [0, 1, 0, 1], [0.1, 0.9, 0.8, 0.2]
    with pytest.raises(ValueError, match="users must be integer ids within int64, got 1.2"):
        M.gauc(y, s, [1.2, 1.7, 2.2, 2.7])
    # Past int64 (and at +-inf) every id would cast to one: refused, not merged.
    for big in ([1e30, 1e30, 2e30, 2e30], [math.inf, math.inf, -math.inf, -math.inf], [1, 1, math.nan, 2]):
        with pytest.raises(ValueError, match="within int64"):
            M.gauc(y, s, big)
    want = M.gauc(y, s, [1, 1, 2, 2])
    for users in ([1.0, 1.0, 2.0, 2.0], ["a", "a", "b", "b"], torch.tensor([1, 1, 2, 2])):
        assert M.gauc(y, s, users) == want
    assert M.auc(torch.tensor(y), torch.tensor(s, dtype=torch.bfloat16)) == M.auc(y, s)
