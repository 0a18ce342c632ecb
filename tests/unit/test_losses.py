"""Losses, regularizers and the warm-up schedule against values worked out by hand."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lsr_core.losses import (LOSSES, REGULARIZERS, RegWeight, doc_regularization, flops, gather_with_grad, group_scores,
                             infonce, kl_distill, l1, margin_mse)


def test_margin_mse_by_hand():
    pos = torch.tensor([3.0, 1.0])
    neg = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    t_pos = torch.tensor([2.0, 2.0])
    t_neg = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # student margins [[2, 1], [1, -3]], teacher margins [[1, 1], [2, 2]]
    # differences [[1, 0], [-1, -5]] -> (1 + 0 + 1 + 25) / 4 = 6.75
    assert margin_mse(pos, neg, t_pos, t_neg).item() == pytest.approx(6.75)


def test_kl_distill_by_hand():
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    # row 0: p = softmax(teacher) = [3/4, 1/4], q = [1/2, 1/2]; KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    # row 1: identical distributions -> 0; batchmean = (row0 + 0) / 2
    row0 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kl_distill(student, teacher, 1.0).item() == pytest.approx(row0 / 2, abs=1e-6)
    # temperature 2 on teacher logits 2*ln3 gives the same row-0 distribution
    teacher_t2 = torch.tensor([[2 * math.log(3.0), 0.0], [2.0, 4.0]])
    assert kl_distill(2 * student, teacher_t2, 2.0).item() == pytest.approx(row0 / 2, abs=1e-6)


# q0 = e0, q1 = e1; docs per query (pos, neg): q0 -> [2,0], [0,1]; q1 -> [0,3], [1,0]
Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
D = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])


def test_group_scores_order():
    # q0 . [d0, d1] = [2, 0]; q1 . [d2, d3] = [3, 0]
    assert group_scores(Q, D).tolist() == [[2.0, 0.0], [3.0, 0.0]]


def test_infonce_own_group_by_hand():
    # q0 scores [2, 0] -> -log(e^2 / (e^2 + 1)) = log(1 + e^-2); q1 scores [3, 0] -> log(1 + e^-3)
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-3))) / 2
    assert infonce(Q, D, 1.0, in_batch=False).item() == pytest.approx(expected, abs=1e-6)
    # temperature 0.5 doubles the scores
    expected_t = (math.log(1 + math.exp(-4)) + math.log(1 + math.exp(-6))) / 2
    assert infonce(Q, D, 0.5, in_batch=False).item() == pytest.approx(expected_t, abs=1e-6)


def test_infonce_in_batch_by_hand():
    # q0 scores all docs [2, 0, 0, 1], target 0: log(e^2 + 1 + 1 + e) - 2
    # q1 scores all docs [0, 1, 3, 0], target 2: log(1 + e + e^3 + 1) - 3
    q0 = math.log(math.exp(2) + 2 + math.e) - 2
    q1 = math.log(2 + math.e + math.exp(3)) - 3
    value = infonce(Q, D, 1.0, in_batch=True).item()
    assert value == pytest.approx((q0 + q1) / 2, abs=1e-6)
    # in-batch negatives make the task harder than the own group alone
    assert value > infonce(Q, D, 1.0, in_batch=False).item()
    # gather without torch.distributed initialised is a no-op
    assert infonce(Q, D, 1.0, in_batch=True, gather=True).item() == pytest.approx(value)
    assert gather_with_grad(D) is D


def test_loss_table_uses_collated_layout():
    teacher = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    scores = group_scores(Q, D)  # [[2, 0], [3, 0]]
    expected = margin_mse(scores[:, 0], scores[:, 1:], teacher[:, 0], teacher[:, 1:])
    # student margins [2, 3], teacher margins [1, 1] -> (1 + 4) / 2 = 2.5
    assert expected.item() == pytest.approx(2.5)
    assert LOSSES["margin_mse"](Q, D, teacher).item() == pytest.approx(2.5)
    assert LOSSES["kl"](Q, D, teacher, temperature=1.0).item() == pytest.approx(kl_distill(scores, teacher).item())
    assert LOSSES["infonce"](Q, D, None, in_batch=False).item() == pytest.approx(infonce(Q, D, in_batch=False).item())
    with pytest.raises(ValueError, match="teacher"):
        LOSSES["margin_mse"](Q, D, None)


def test_flops_and_l1_by_hand():
    reps = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])
    # mean |.| per column [2, 1, 0.5] -> 4 + 1 + 0.25
    assert flops(reps).item() == pytest.approx(5.25)
    # row sums of |.|: 3 and 4 -> mean 3.5
    assert l1(reps).item() == pytest.approx(3.5)
    assert REGULARIZERS["none"](reps).item() == 0.0


def test_doc_regularization_counts_each_document_once():
    # one query, G = 3 documents (pos, neg1, neg2): rows [1,0], [0,2], [1,0]
    docs = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.0]])
    # concat: column means [2/3, 2/3] -> 4/9 + 4/9
    assert doc_regularization(docs, 3, flops, "concat").item() == pytest.approx(8 / 9)
    # mean_of_groups: each column of the group is its own batch of B=1 rows: (1 + 4 + 1) / 3
    assert doc_regularization(docs, 3, flops, "mean_of_groups").item() == pytest.approx(2.0)
    # L1 is a mean over rows: the same either way, (1 + 2 + 1) / 3
    assert doc_regularization(docs, 3, l1, "concat").item() == pytest.approx(4 / 3)
    assert doc_regularization(docs, 3, l1, "mean_of_groups").item() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="form 'sum'"):
        doc_regularization(docs, 3, flops, "sum")
    with pytest.raises(ValueError, match="not a multiple of the group size 2"):
        doc_regularization(docs, 2, flops)


def test_reg_weight_schedule_and_state():
    weight = RegWeight(2.0, 10)
    values = {}
    for step in range(21):
        values[step] = weight.weight
        weight.step()
    # w = 2 * min(1, (s/10)^2): s=0 -> 0, s=5 -> 0.5, s=10 -> 2, s=20 -> 2
    assert [values[s] for s in (0, 5, 10, 20)] == pytest.approx([0.0, 0.5, 2.0, 2.0])
    restored = RegWeight(2.0, 10)
    restored.load_state_dict(RegWeight(2.0, 10).state_dict())
    assert restored.weight == 0.0
    half = RegWeight(2.0, 10)
    for _ in range(5):
        half.step()
    restored.load_state_dict(half.state_dict())
    assert restored.weight == pytest.approx(0.5)
    assert RegWeight(3.0, 0).weight == 3.0
    with pytest.raises(ValueError):
        RegWeight(-1.0, 5)


def _gather_worker(rank, world, init_file, q_all, d_all, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    batch = len(q_all) // world
    rows = len(d_all) // world
    q = q_all[rank * batch:(rank + 1) * batch].clone().requires_grad_()
    d = d_all[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    loss = infonce(q, d, 1.0, in_batch=True, gather=True)
    loss.backward()
    out[rank] = (loss.detach(), q.grad.clone(), d.grad.clone())
    dist.destroy_process_group()


@pytest.mark.slow
def test_cross_device_gather_matches_single_process(tmp_path):
    """Two gloo ranks, each with half the queries: mean loss and DDP-averaged gradients equal one big batch."""
    torch.manual_seed(0)
    world, batch, group, vocab = 2, 2, 3, 5
    q_all = torch.rand(world * batch, vocab)
    d_all = torch.rand(world * batch * group, vocab)
    out = mp.Manager().dict()
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), q_all, d_all, out), nprocs=world)

    q_ref = q_all.clone().requires_grad_()
    d_ref = d_all.clone().requires_grad_()
    ref = infonce(q_ref, d_ref, 1.0, in_batch=True)
    ref.backward()
    assert (out[0][0] + out[1][0]).item() / world == pytest.approx(ref.item(), abs=1e-6)
    # DDP averages gradients over ranks: rank grad / world == the global mean loss's gradient
    q_grad = torch.cat([out[r][1] for r in range(world)]) / world
    d_grad = torch.cat([out[r][2] for r in range(world)]) / world
    assert torch.allclose(q_grad, q_ref.grad, atol=1e-6)
    assert torch.allclose(d_grad, d_ref.grad, atol=1e-6)
