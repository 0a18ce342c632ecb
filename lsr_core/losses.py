"""Training losses, sparsity regularizers and the regularizer warm-up schedule.

Shapes: B queries per device, N negatives per query, V vocabulary size. Documents always come as one tensor
`d_reps [B*(1+N), V]` ordered per query: pos_0, neg_0_1..neg_0_N, pos_1, ... (what `data.collate` produces).

    scores  = group_scores(q_reps, d_reps)                       # [B, 1+N], column 0 = positive
    loss    = LOSSES[cfg.train.loss](q_reps, d_reps, teacher, temperature=..., in_batch=..., gather=...)
    reg     = regularization(q_reps, d_reps, REGULARIZERS["flops"], REGULARIZERS["flops"], q_weight.weight,
                             d_weight.weight, cfg.train.d_reg_form)
    ...
    if accelerator.sync_gradients: q_weight.step(); d_weight.step()   # optimizer steps, not micro-batches
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------------- scores
def group_scores(q_reps: torch.Tensor, d_reps: torch.Tensor) -> torch.Tensor:
    """Dot product of each query with its own 1+N documents.

    q_reps [B, V], d_reps [B*(1+N), V] (per query: pos, neg1..negN) -> scores [B, 1+N].
    """
    batch, vocab = q_reps.shape
    return torch.einsum("bv,bgv->bg", q_reps, d_reps.view(batch, _group_size(q_reps, d_reps), vocab))


def _group_size(q_reps: torch.Tensor, d_reps: torch.Tensor) -> int:
    """1+N from q_reps [B, V] and d_reps [B*(1+N), V]."""
    if d_reps.shape[0] % q_reps.shape[0]:
        raise ValueError(f"d_reps has {d_reps.shape[0]} rows, not a multiple of the {q_reps.shape[0]} queries")
    return d_reps.shape[0] // q_reps.shape[0]


# ---------------------------------------------------------------------------------------------------------- losses
def _wide(t: torch.Tensor) -> torch.Tensor:
    """float32, or float64 where the input is: bf16/fp16 margins and softmaxes of large scores lose most digits."""
    return t if t.dtype == torch.float64 else t.float()


def margin_mse(pos_scores: torch.Tensor, neg_scores: torch.Tensor,
               teacher_pos: torch.Tensor, teacher_neg: torch.Tensor) -> torch.Tensor:
    """MarginMSE (Hofstätter et al.): MSE between student and teacher margins, mean over the B*N pairs.

    pos_scores [B], neg_scores [B, N], teacher_pos [B], teacher_neg [B, N] -> scalar.
    """
    student_margin = _wide(pos_scores).unsqueeze(1) - _wide(neg_scores)
    teacher_margin = _wide(teacher_pos).unsqueeze(1) - _wide(teacher_neg)
    return F.mse_loss(student_margin, teacher_margin)


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)), summed over the 1+N candidates and averaged over B (batchmean).

    student [B, 1+N], teacher [B, 1+N] -> scalar. No T^2 factor: scale the learning rate instead if T != 1.
    """
    student_logp = F.log_softmax(_wide(student) / temperature, dim=-1)
    teacher_logp = F.log_softmax(_wide(teacher) / temperature, dim=-1)
    return F.kl_div(student_logp, teacher_logp, reduction="batchmean", log_target=True)


def infonce(q_reps: torch.Tensor, d_reps: torch.Tensor, temperature: float = 1.0, in_batch: bool = True,
            gather: bool = False) -> torch.Tensor:
    """Cross-entropy over dot-product scores / temperature; the target is the query's own positive.

    q_reps [B, V], d_reps [B*(1+N), V] (per query: pos, neg1..negN) -> scalar (mean over B).
    in_batch=False: each query scores only its own 1+N documents (target column 0).
    in_batch=True: each query scores all B*(1+N) documents (target row i*(1+N)); with gather=True, the documents of
    every device (world*B*(1+N) rows, via `gather_with_grad`) and the target is offset by rank*B*(1+N).
    """
    if not in_batch:
        scores = _wide(group_scores(q_reps, d_reps)) / temperature
        return F.cross_entropy(scores, torch.zeros(len(q_reps), dtype=torch.long, device=q_reps.device))
    group = _group_size(q_reps, d_reps)
    offset = 0
    if gather and _world_size() > 1:
        offset = dist.get_rank() * d_reps.shape[0]
        d_reps = gather_with_grad(d_reps)
    scores = _wide(q_reps @ d_reps.T) / temperature  # [B, world*B*(1+N)]
    targets = offset + torch.arange(len(q_reps), device=q_reps.device) * group
    return F.cross_entropy(scores, targets)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for this rank's slice (all_reduce, then slice)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = local.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss scored this rank's rows: collect those gradients too
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate `t` [n, ...] from every process -> [world*n, ...] in rank order, differentiable.

    The local slice keeps its gradient, and the backward adds the gradients that the other ranks' losses send to
    it, so a per-rank mean loss followed by DDP's gradient averaging equals the gradient of the global mean loss.
    Every rank must pass the same shape (use drop_last batching). Returns `t` unchanged when torch.distributed is
    not initialised or the world size is 1.
    """
    if _world_size() == 1:
        return t
    return _GatherWithGrad.apply(t)


def _require_teacher(teacher: torch.Tensor | None, name: str) -> torch.Tensor:
    if teacher is None:
        raise ValueError(f"loss '{name}' needs teacher scores; the training data has none")
    return teacher


def margin_mse_loss(q_reps, d_reps, teacher, *, temperature=1.0, in_batch=True, gather=False) -> torch.Tensor:
    """LOSSES adapter: q_reps [B, V], d_reps [B*(1+N), V], teacher [B, 1+N] -> scalar (ignores the rest)."""
    teacher = _require_teacher(teacher, "margin_mse")
    scores = group_scores(q_reps, d_reps)
    return margin_mse(scores[:, 0], scores[:, 1:], teacher[:, 0], teacher[:, 1:])


def kl_loss(q_reps, d_reps, teacher, *, temperature=1.0, in_batch=True, gather=False) -> torch.Tensor:
    """LOSSES adapter: q_reps [B, V], d_reps [B*(1+N), V], teacher [B, 1+N] -> scalar."""
    teacher = _require_teacher(teacher, "kl")
    return kl_distill(group_scores(q_reps, d_reps), teacher, temperature)


def infonce_loss(q_reps, d_reps, teacher, *, temperature=1.0, in_batch=True, gather=False) -> torch.Tensor:
    """LOSSES adapter: q_reps [B, V], d_reps [B*(1+N), V]; teacher scores are not used."""
    return infonce(q_reps, d_reps, temperature, in_batch, gather)


# Name -> loss with one signature: (q_reps [B,V], d_reps [B*(1+N),V], teacher [B,1+N] | None, *, temperature,
# in_batch, gather) -> scalar. Keys match the choices of `train.loss`.
LOSSES = {"margin_mse": margin_mse_loss, "kl": kl_loss, "infonce": infonce_loss}
NEEDS_TEACHER = {"margin_mse", "kl"}


# ---------------------------------------------------------------------------------------------------- regularizers
def flops(reps: torch.Tensor) -> torch.Tensor:
    """FLOPs regularizer (Paria et al.): sum over terms of the squared mean absolute weight. reps [n, V] -> scalar."""
    return reps.abs().mean(dim=0).pow(2).sum()


def l1(reps: torch.Tensor) -> torch.Tensor:
    """L1 norm per row, averaged over rows. reps [n, V] -> scalar."""
    return reps.abs().sum(dim=1).mean()


def no_reg(reps: torch.Tensor) -> torch.Tensor:
    """Zero (keeps the graph): for `reg: none`."""
    return reps.new_zeros(())


# Keys match the choices of `train.q_reg` / `train.d_reg`.
REGULARIZERS = {"flops": flops, "l1": l1, "none": no_reg}


def doc_regularization(d_reps: torch.Tensor, group_size: int, reg_fn, form: str = "mean_of_groups") -> torch.Tensor:
    """The document regularizer over d_reps [B*G, V] (per query: pos, neg1..negN; G = 1+N) -> scalar.

    mean_of_groups: the mean over the G columns of reg_fn on that column's B documents, i.e. (R(positives) +
      R(negatives_1) + ... + R(negatives_N)) / (1+N); with one negative it is the reference's (Decoder4LSR /
      learned-sparse-retrieval MarginMSE and KL losses) (R(pos) + R(neg)) / 2, where each document group is
      encoded and regularised as its own batch.
    concat: reg_fn over all B*G documents at once (the reference's form for its in-batch cross-entropy loss).
    Every document is counted once either way. For FLOPs the two differ (a squared mean per term over B rows, or
    over B*G rows); for L1 (a mean over rows) they are equal.
    """
    if form == "concat":
        return reg_fn(d_reps)
    if form != "mean_of_groups":
        raise ValueError(f"unknown document regularizer form {form!r}; expected one of {DOC_REG_FORMS}")
    if d_reps.shape[0] % group_size:
        raise ValueError(f"d_reps has {d_reps.shape[0]} rows, not a multiple of the group size {group_size}")
    groups = d_reps.view(-1, group_size, d_reps.shape[-1])  # [B, G, V]
    return sum(reg_fn(groups[:, g]) for g in range(group_size)) / group_size


# Choices of `train.d_reg_form`.
DOC_REG_FORMS = ("mean_of_groups", "concat")


def regularization(q_reps: torch.Tensor, d_reps: torch.Tensor, q_reg_fn, d_reg_fn, q_weight: float,
                   d_weight: float, d_form: str = "mean_of_groups") -> torch.Tensor:
    """The sparsity term added to the ranking loss: q_weight * R_q(q_reps) + d_weight * R_d(documents).

    q_reps [B, V], d_reps [B*(1+N), V] (per query: pos, neg1..negN); the document term is `doc_regularization`.
    """
    group_size = _group_size(q_reps, d_reps)
    return q_weight * q_reg_fn(q_reps) + d_weight * doc_regularization(d_reps, group_size, d_reg_fn, d_form)


class RegWeight:
    """Regularizer weight with quadratic warm-up: w = target * min(1, (step / T)^2); T = 0 means no warm-up.

    Call `.step()` once per optimizer step (when `accelerator.sync_gradients`), never per micro-batch. Holds its
    step in `state_dict()`, which train.py keeps in its checkpoints' trainer_state.json (JSON, never a pickle).
    """

    def __init__(self, target_weight: float, warmup_steps: int):
        if target_weight < 0 or warmup_steps < 0:
            raise ValueError(f"RegWeight needs target_weight >= 0 and warmup_steps >= 0, got "
                             f"{target_weight}, {warmup_steps}")
        self.target_weight = float(target_weight)
        self.warmup_steps = int(warmup_steps)
        self.steps_done = 0

    @property
    def weight(self) -> float:
        if self.warmup_steps == 0:
            return self.target_weight
        return self.target_weight * min(1.0, (self.steps_done / self.warmup_steps) ** 2)

    def step(self) -> None:
        self.steps_done += 1

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
