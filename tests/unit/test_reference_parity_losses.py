"""Loss + regulariser parity with the reference (JingfenQiao/Decoder4LSR, a fork of thongnt99/learned-sparse-retrieval)
on fixed random batches. The reference's formulas are restated below, written independently of our code (no code
copied), and compared with `LOSSES` + `losses.regularization` (what train.py adds up).

Reference (lsr/losses/*.py, lsr/trainer HFTrainer.compute_loss = loss + q_reg + d_reg, where each regularizer's value
already includes its warmed-up weight):
- scores: s(q, d) = q . d (dot product of the sparse vectors)
- MarginMSE: mean over the batch of ((s(q,pos) - s(q,neg)) - (t_pos - t_neg))^2 (one negative per query)
- DistilKL: sum_j p_j (log p_j - log softmax(s)_j) with p = softmax(teacher scores), mean over the batch; no
  temperature
- MultipleNegatives (in-batch cross entropy): -log softmax_k(q_b . d_k)[own positive] over all B*(1+N) documents,
  mean over the batch; no temperature
- FLOPs(X [n, V]) = sum_v (mean_i |X_iv|)^2;  L1(X) = mean_i sum_v |X_iv|
- weight after k regularizer steps: W * (min(k, T) / T)^2
- document term: MarginMSE and DistilKL (FLOPs(pos) + FLOPs(neg)) / 2, each document group encoded as its own batch;
  MultipleNegatives: FLOPs over all its documents at once. Query term: FLOPs(queries).
The reference's MarginMSE/DistilKL take exactly one negative group (forward(q, pos, neg, labels)); with N > 1 ours
averages the margins over all B*N pairs and the document term over the 1+N groups (checked separately below).
"""
import math

import pytest
import torch

from lsr_core.config import CHOICES, load_config
from lsr_core.losses import DOC_REG_FORMS, LOSSES, REGULARIZERS, RegWeight, regularization

# ---------------------------------------------------------------------------------- the reference's formulas, restated


def ref_flops(reps):
    n = len(reps)
    return sum((sum(abs(reps[i][v]) for i in range(n)) / n) ** 2 for v in range(len(reps[0])))


def ref_l1(reps):
    return sum(sum(abs(x) for x in row) for row in reps) / len(reps)


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def log_softmax(xs):
    top = max(xs)
    log_z = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - log_z for x in xs]


def ref_margin_mse(q, pos, neg, teacher):
    return sum(((dot(q[b], pos[b]) - dot(q[b], neg[b])) - (teacher[b][0] - teacher[b][1])) ** 2
               for b in range(len(q))) / len(q)


def ref_kl(q, pos, neg, teacher):
    total = 0.0
    for b in range(len(q)):
        log_p = log_softmax(teacher[b])
        log_s = log_softmax([dot(q[b], pos[b]), dot(q[b], neg[b])])
        total += sum(math.exp(lp) * (lp - ls) for lp, ls in zip(log_p, log_s))
    return total / len(q)


def ref_multiple_negatives(q, docs, group):
    return sum(-log_softmax([dot(q[b], d) for d in docs])[b * group] for b in range(len(q))) / len(q)


def ref_weight(target, T, k):
    return target * (min(k, T) / T) ** 2


# ------------------------------------------------------------------------------------------------------- fixtures
B, V = 4, 9


def batch(dtype, n_neg=1, seed=0):
    """q [B, V], d [B*(1+N), V] in the collated layout (per query: pos, neg1..negN), teacher [B, 1+N]; sparse-ish
    non-negative reps like ReLU outputs."""
    g = torch.Generator().manual_seed(seed)
    q = torch.relu(torch.randn(B, V, generator=g, dtype=torch.float64))
    d = torch.relu(torch.randn(B * (1 + n_neg), V, generator=g, dtype=torch.float64))
    teacher = torch.randn(B, 1 + n_neg, generator=g, dtype=torch.float64) * 3
    return q.to(dtype), d.to(dtype), teacher.to(dtype)


def as_lists(q, d, teacher, n_neg=1):
    group = 1 + n_neg
    q_l, d_l, t_l = q.double().tolist(), d.double().tolist(), teacher.double().tolist()
    return q_l, d_l, t_l, d_l[0::group], d_l[1::group]


DTYPES = [torch.float32, torch.float64]


# ---------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reg", ["flops", "l1"])
@pytest.mark.parametrize("loss", ["margin_mse", "kl"])
def test_distillation_loss_plus_regularizer_equals_reference(dtype, reg, loss):
    q, d, teacher = batch(dtype)
    q_l, d_l, t_l, pos_l, neg_l = as_lists(q, d, teacher)
    ref_reg = {"flops": ref_flops, "l1": ref_l1}[reg]
    ref_loss = {"margin_mse": ref_margin_mse, "kl": ref_kl}[loss]
    w_q, w_d = 0.3, 0.7
    expected = ref_loss(q_l, pos_l, neg_l, t_l) + w_q * ref_reg(q_l) + w_d * (ref_reg(pos_l) + ref_reg(neg_l)) / 2

    rank = LOSSES[loss](q, d, teacher, temperature=1.0)
    total = rank + regularization(q, d, REGULARIZERS[reg], REGULARIZERS[reg], w_q, w_d, "mean_of_groups")
    assert rank.item() == pytest.approx(ref_loss(q_l, pos_l, neg_l, t_l), rel=1e-6, abs=1e-6)
    assert total.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # the default form is the reference's
    assert regularization(q, d, REGULARIZERS[reg], REGULARIZERS[reg], w_q, w_d).item() == \
        pytest.approx(expected - ref_loss(q_l, pos_l, neg_l, t_l), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flops_over_the_concatenation_is_another_value(dtype):
    """The point of `mean_of_groups`: FLOPs over pos+neg stacked is not (FLOPs(pos) + FLOPs(neg)) / 2."""
    q, d, teacher = batch(dtype)
    _, d_l, _, pos_l, neg_l = as_lists(q, d, teacher)
    concat = regularization(q, d, REGULARIZERS["none"], REGULARIZERS["flops"], 0.0, 1.0, "concat").item()
    groups = regularization(q, d, REGULARIZERS["none"], REGULARIZERS["flops"], 0.0, 1.0, "mean_of_groups").item()
    assert concat == pytest.approx(ref_flops(d_l), rel=1e-6, abs=1e-6)
    assert groups == pytest.approx((ref_flops(pos_l) + ref_flops(neg_l)) / 2, rel=1e-6, abs=1e-6)
    assert groups - concat > 1e-3  # a mean of squares over fewer rows each: larger (Jensen), never equal here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_neg", [1, 3])
def test_in_batch_cross_entropy_with_concatenated_flops_equals_reference(dtype, n_neg):
    q, d, teacher = batch(dtype, n_neg)
    q_l, d_l, _, _, _ = as_lists(q, d, teacher, n_neg)
    expected = ref_multiple_negatives(q_l, d_l, 1 + n_neg) + 0.2 * ref_flops(q_l) + 0.5 * ref_flops(d_l)
    total = LOSSES["infonce"](q, d, None, temperature=1.0, in_batch=True, gather=False) + \
        regularization(q, d, REGULARIZERS["flops"], REGULARIZERS["flops"], 0.2, 0.5, "concat")
    assert total.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_several_negatives_generalise_the_reference(dtype):
    """N = 3 (beyond the reference's MarginMSE/KL): margins averaged over all B*N pairs, KL over 1+N candidates, the
    document term the mean over the 1+N groups (pos column, neg_1 column, ...); each reduces to the reference's at
    N = 1 (tested above)."""
    n_neg = 3
    q, d, teacher = batch(dtype, n_neg, seed=1)
    q_l, d_l, t_l, _, _ = as_lists(q, d, teacher, n_neg)
    group = 1 + n_neg
    columns = [d_l[j::group] for j in range(group)]
    margins = [((dot(q_l[b], columns[0][b]) - dot(q_l[b], columns[j][b])) - (t_l[b][0] - t_l[b][j])) ** 2
               for b in range(B) for j in range(1, group)]
    assert LOSSES["margin_mse"](q, d, teacher).item() == pytest.approx(sum(margins) / len(margins), rel=1e-6, abs=1e-6)
    kl = 0.0
    for b in range(B):
        log_p = log_softmax(t_l[b])
        log_s = log_softmax([dot(q_l[b], columns[j][b]) for j in range(group)])
        kl += sum(math.exp(lp) * (lp - ls) for lp, ls in zip(log_p, log_s)) / B
    assert LOSSES["kl"](q, d, teacher, temperature=1.0).item() == pytest.approx(kl, rel=1e-6, abs=1e-6)
    doc_term = regularization(q, d, REGULARIZERS["none"], REGULARIZERS["flops"], 0.0, 1.0, "mean_of_groups")
    assert doc_term.item() == pytest.approx(sum(ref_flops(c) for c in columns) / group, rel=1e-6, abs=1e-6)


def test_warmup_weight_equals_reference_schedule():
    weight = RegWeight(0.08, 50)
    for k in range(120):
        assert weight.weight == pytest.approx(ref_weight(0.08, 50, k), abs=1e-12), k
        weight.step()


def test_recipes_use_the_reference_form():
    assert tuple(CHOICES["train.d_reg_form"]) == DOC_REG_FORMS
    assert load_config([]).train.d_reg_form == "mean_of_groups"
    for rq in ("rq2", "rq3", "rq4"):
        cfg = load_config(["--cfg", f"yamls/{rq}/base.yaml"])
        assert (cfg.train.loss, cfg.train.d_reg, cfg.train.d_reg_form) == ("margin_mse", "flops", "mean_of_groups")
