"""Teacher-score normalisation: put one teacher's scores on another teacher's scale before MarginMSE distillation.

The paper's teacher-scaling runs (RQ4) distil from RankLLaMA, whose logits have a different mean and spread from the
MiniLM cross-encoder's that the hyper-parameters were tuned with. The reference rescales RankLLaMA's scores with an
affine map fitted to the MiniLM scores (`data.teacher_norm`, `data.teacher_norm_reference`):

- `affine` (the reference's dataset `msmarco_triplet_distil_rankllama_affine`, its score file written by
  `zero_shot/rankllama.py`): one map for the whole file. With mu, sigma the mean and population standard deviation
  (ddof 0) over every (query, passage) score of a file, each file taken whole (no pairing of ids),
      a = sigma_ref / sigma_teacher,   b = mu_ref - a * mu_teacher,   score' = a * score + b,
  so the rescaled teacher has the reference's mean and standard deviation.
- `affine_query` (the reference's `msmarco_triplet_distil_rankllama_affine_query`, `affine_transform_per_query` in
  its `scripts/try2.py`): the same map fitted per query, from that query's scores in each file; a = 0 where the
  teacher's scores of the query are all equal (every score becomes the reference's mean), and a query the reference
  file lacks keeps its scores unchanged.

An affine map with a > 0 keeps every ranking; it changes the margins MarginMSE regresses on, and `affine` scales
all of them by the same factor a.
"""
from __future__ import annotations

import logging

import numpy as np

from lsr_core.utils import InputError

logger = logging.getLogger(__name__)

Scores = dict[str, dict[str, float]]  # qid -> {pid: score}


def _moments(values) -> tuple[float, float]:
    """Mean and population standard deviation, in float64."""
    arr = np.fromiter(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def affine_fit(teacher: Scores, reference: Scores) -> tuple[float, float]:
    """(a, b) of the global map a * score + b that gives `teacher` the mean and standard deviation of `reference`."""
    if not any(teacher.values()) or not any(reference.values()):
        raise InputError("teacher normalisation: the teacher and the reference need at least one score each")
    mu_t, sigma_t = _moments(s for cand in teacher.values() for s in cand.values())
    mu_r, sigma_r = _moments(s for cand in reference.values() for s in cand.values())
    if sigma_t == 0:
        raise InputError("teacher normalisation 'affine': every teacher score is the same, there is no spread to "
                         "rescale")
    a = sigma_r / sigma_t
    return a, mu_r - a * mu_t


def affine(teacher: Scores, reference: Scores) -> Scores:
    """`teacher` mapped by one affine function onto the mean and standard deviation of `reference`."""
    a, b = affine_fit(teacher, reference)
    logger.info("teacher normalisation 'affine': score' = %.6g * score + %.6g", a, b)
    return {qid: {pid: a * s + b for pid, s in cand.items()} for qid, cand in teacher.items()}


def affine_per_query(teacher: Scores, reference: Scores) -> Scores:
    """`teacher` mapped, query by query, onto the mean and standard deviation of the reference's scores of the same
    query; queries without reference scores are left as they are."""
    out: Scores = {}
    unmatched = 0
    for qid, cand in teacher.items():
        ref = reference.get(qid)
        if not ref or not cand:
            unmatched += 1
            out[qid] = dict(cand)
            continue
        mu_t, sigma_t = _moments(cand.values())
        mu_r, sigma_r = _moments(ref.values())
        a = sigma_r / sigma_t if sigma_t != 0 else 0.0
        b = mu_r - a * mu_t
        out[qid] = {pid: a * s + b for pid, s in cand.items()}
    if unmatched:
        logger.info("teacher normalisation 'affine_query': %d of %d queries have no reference scores and are kept "
                    "as they are", unmatched, len(teacher))
    return out


NORMALISATIONS = {"affine": affine, "affine_query": affine_per_query}


def normalise_teacher(teacher: Scores, data_cfg) -> Scores:
    """Apply `data_cfg.teacher_norm` ("none" returns `teacher` itself), fitted to `data_cfg.teacher_norm_reference`."""
    if data_cfg.teacher_norm == "none":
        return teacher
    from lsr_core.config import ConfigError
    from lsr_core.data import load_teacher_scores

    if not data_cfg.teacher_norm_reference:
        raise ConfigError(f"'data.teacher_norm={data_cfg.teacher_norm}' needs 'data.teacher_norm_reference' (the "
                          f"teacher whose scale to match, e.g. the MiniLM cross-encoder scores)")
    reference = load_teacher_scores(data_cfg.teacher_norm_reference, data_cfg.trust_pickle)
    return NORMALISATIONS[data_cfg.teacher_norm](teacher, reference)
