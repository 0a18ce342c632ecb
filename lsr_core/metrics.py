"""Retrieval metrics with trec_eval semantics, computed by ranx.

    qrels = read_qrels("data/wiki/qrels.test.tsv")
    runs = {"bm25": read_run("data/wiki/test.bm25.trec")}
    per_query = {name: evaluate_run(qrels, run, ["mrr@10", "ndcg@10"]) for name, run in runs.items()}
    means = {name: mean_scores(pq) for name, pq in per_query.items()}
    p_values = paired_tests(per_query)          # every run against the first one

Run files (TREC): `qid Q0 docid rank score tag`, whitespace separated. As in trec_eval the rank column is ignored:
results are ordered by score descending, ties by docid descending (byte order), checked against pytrec_eval.

Metric names: `mrr@10`, `ndcg@10`, `recall@100`, `precision@10`, `map@1000` (the cut-off is optional), plus an
`-lN` suffix (`recall@1000-l2`) meaning "relevant = judged >= N", as TREC DL uses N = 2. The suffix is implemented
by thresholding the qrels (grades below N become 0, the query stays), so it equals `trec_eval -l N` for the binary
metrics (mrr, recall, precision, map). trec_eval's nDCG ignores `-l`: the official TREC DL nDCG@10 is plain
`ndcg@10`; `ndcg@10-l2` additionally gives grade-1 documents zero gain.

Averages follow `trec_eval -c`: every query in the qrels counts, a query missing from the run scores 0; queries in
the run but not in the qrels are ignored.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np

from lsr_core.utils import InputError, open_text

logger = logging.getLogger(__name__)

METRIC_RE = re.compile(r"^(mrr|ndcg|recall|precision|map)(@[1-9][0-9]*)?(-l([1-9][0-9]*))?$")


def parse_metric(name: str) -> tuple[str, int, int]:
    """`recall@1000-l2` -> ("recall", 1000, 2): the ranx metric, the cut-off (0 = none) and the relevance level."""
    match = METRIC_RE.match(name)
    if not match:
        raise ValueError(f"unknown metric {name!r}: expected mrr|ndcg|recall|precision|map, optional @k, "
                         f"optional -lN (e.g. 'ndcg@10', 'recall@1000-l2')")
    return match.group(1), int((match.group(2) or "@0")[1:]), int(match.group(4) or 1)


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """TREC run -> {qid: {docid: score}}. A malformed line, a non-finite score or a repeated (qid, docid) raises
    InputError naming file:line and the field; an empty run is an error too."""
    run: dict[str, dict[str, float]] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise InputError(f"{path}:{lineno}: expected 6 fields 'qid Q0 docid rank score tag', "
                                 f"got {len(parts)}")
            qid, _, docid, rank, score, _ = parts
            try:
                int(rank)
            except ValueError:
                raise InputError(f"{path}:{lineno}: field 'rank' must be an integer, got {rank!r}") from None
            try:
                value = float(score)
            except ValueError:
                raise InputError(f"{path}:{lineno}: field 'score' must be a number, got {score!r}") from None
            if not math.isfinite(value):
                raise InputError(f"{path}:{lineno}: field 'score' must be finite, got {score!r}")
            docs = run.setdefault(qid, {})
            if docid in docs:
                raise InputError(f"{path}:{lineno}: duplicate result: docid {docid!r} appears twice for qid {qid!r}")
            docs[docid] = value
    if not run:
        raise InputError(f"{path}: empty run (no result lines)")
    return run


def trec_order(docs: dict[str, float]) -> list[str]:
    """Doc ids in trec_eval's order: score descending, then docid descending."""
    return [docid for docid, _ in sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def check_qrels(qrels: dict[str, dict[str, int]], corpus_ids: set[str] | None = None, where: str = "qrels") -> int:
    """Empty qrels are an error. With `corpus_ids`, count (and warn about) judged doc ids absent from the corpus:
    they can never be retrieved, so they lower recall without any run being at fault."""
    if not qrels or not any(qrels.values()):
        raise InputError(f"{where}: empty qrels (no judgments)")
    if corpus_ids is None:
        return 0
    unknown = sum(docid not in corpus_ids for docs in qrels.values() for docid in docs)
    if unknown:
        logger.warning("%s: %d judged doc id(s) are not in the corpus", where, unknown)
    return unknown


def threshold_qrels(qrels: dict[str, dict[str, int]], level: int) -> dict[str, dict[str, int]]:
    """Grades below `level` become 0 (non-relevant); every query is kept, so averages keep their denominator."""
    if level <= 1:
        return qrels
    return {qid: {docid: rel if rel >= level else 0 for docid, rel in docs.items()} for qid, docs in qrels.items()}


def evaluate_run(qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]],
                 metrics: list[str]) -> dict[str, dict[str, float]]:
    """Per-query scores {metric: {qid: score}} over exactly the qrels' queries (missing from the run -> 0)."""
    from numba.typed import List
    from ranx.metrics import metric_switch

    check_qrels(qrels)
    qids = list(qrels)
    # ranx's array format, built here (its dict-based Run is slow): one [n, 2] float64 array per query of
    # (doc number, value) sorted by value descending; doc numbers are exact small ints, not hashes.
    doc_number: dict[str, int] = {}
    ranked = List()
    for qid in qids:
        order = trec_order(run.get(qid, {}))  # ranx breaks ties its own way: give it strictly decreasing scores
        ranked.append(np.array([[doc_number.setdefault(d, len(doc_number)), len(order) - i]
                                for i, d in enumerate(order)], dtype=np.float64).reshape(-1, 2))
    by_level: dict[int, list[str]] = {}
    for name in metrics:
        by_level.setdefault(parse_metric(name)[2], []).append(name)
    per_query: dict[str, dict[str, float]] = {}
    for level, names in by_level.items():
        judged = List()
        for qid, docs in threshold_qrels(qrels, level).items():
            rows = sorted(((doc_number.setdefault(d, len(doc_number)), rel) for d, rel in docs.items()),
                          key=lambda row: -row[1])
            judged.append(np.array(rows, dtype=np.float64).reshape(-1, 2))
        for name in names:
            metric, cutoff, _ = parse_metric(name)
            scores = metric_switch(metric)(judged, ranked, cutoff, 1)
            per_query[name] = dict(zip(qids, map(float, scores)))
    return {name: per_query[name] for name in metrics}


def mean_scores(per_query: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean(list(scores.values()))) for name, scores in per_query.items()}


def paired_tests(per_query_by_run: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Two-sided paired t-test (scipy.stats.ttest_rel) of every run against the first, per metric, over the qrels'
    queries. Returns {run: {metric: p_value}} for the runs after the first; identical scores give p = 1."""
    from scipy.stats import ttest_rel

    names = list(per_query_by_run)
    if not names:
        return {}
    base = per_query_by_run[names[0]]
    out: dict[str, dict[str, float]] = {}
    for name in names[1:]:
        out[name] = {}
        for metric, base_scores in base.items():
            qids = list(base_scores)
            a = np.array([base_scores[q] for q in qids])
            b = np.array([per_query_by_run[name][metric][q] for q in qids])
            with np.errstate(all="ignore"):
                p_value = float(ttest_rel(a, b).pvalue) if len(qids) > 1 else math.nan
            # nan: no difference at all (or a single query); a constant non-zero difference gives p = 0
            out[name][metric] = 1.0 if math.isnan(p_value) else p_value
    return out
