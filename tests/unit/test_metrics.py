"""metrics.py equals trec_eval (pytrec_eval) and rejects bad runs with file:line messages."""
import random

import pytest
import pytrec_eval

from lsr_core.metrics import evaluate_run, mean_scores, paired_tests, parse_metric, read_run, trec_order
from lsr_core.utils import InputError

METRICS = ["mrr@10", "ndcg@10", "recall@100", "recall@1000", "recall@100-l2", "mrr@10-l2"]


def random_case(seed=0, n_queries=40, n_docs=1500):
    """Graded qrels (0..3), a run with many score ties, queries missing from the run and run-only queries."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(n_docs)]
    qrels = {f"q{i}": {d: rng.choice([0, 1, 1, 2, 3]) for d in rng.sample(docs, rng.randint(1, 12))}
             for i in range(n_queries)}
    run = {}
    for i in range(n_queries + 5):  # q40..q44 are not judged: ignored
        if i % 7 == 3:
            continue  # judged but not retrieved: scores 0
        qid = f"q{i}"
        judged = qrels.get(qid, {})
        pool = sorted(set(rng.sample(docs, 1200)) | set(judged))
        # one decimal -> heavy ties; judged documents get a boost half of the time so the metrics are not ~0
        run[qid] = {d: round(rng.random() + (0.7 if d in judged and rng.random() < 0.5 else 0), 1) for d in pool}
    return qrels, run


def reference(qrels, run, measure, level=1, cut=None):
    """pytrec_eval per query with missing queries as 0 (trec_eval -c); `cut` truncates each ranking after
    trec_eval's ordering (for MRR@10: trec_eval's recip_rank has no cut-off)."""
    if cut:
        run = {q: {d: docs[d] for d in trec_order(docs)[:cut]} for q, docs in run.items()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {measure}, relevance_level=level).evaluate(run)
    return {q: scores.get(q, {}).get(measure, 0.0) for q in qrels}


def test_trec_order_is_trec_eval_order():
    qrels = {"q": {"b": 1}}
    run = {"q": {"a": 1.0, "b": 1.0, "c": 1.0}}  # ties: trec_eval ranks c, b, a
    assert trec_order(run["q"]) == ["c", "b", "a"]
    assert reference(qrels, run, "recip_rank")["q"] == 0.5
    assert evaluate_run(qrels, run, ["mrr@10"])["mrr@10"]["q"] == 0.5


def test_equals_pytrec_eval_with_ties_and_missing_queries():
    qrels, run = random_case()
    ours = evaluate_run(qrels, run, METRICS)
    graded = {q: {d: r for d, r in docs.items()} for q, docs in qrels.items()}
    expected = {
        "mrr@10": reference(graded, run, "recip_rank", cut=10),
        "ndcg@10": reference(graded, run, "ndcg_cut_10"),
        "recall@100": reference(graded, run, "recall_100"),
        "recall@1000": reference(graded, run, "recall_1000"),
        "recall@100-l2": reference(graded, run, "recall_100", level=2),
        "mrr@10-l2": reference(graded, run, "recip_rank", level=2, cut=10),
    }
    for metric in METRICS:
        assert set(ours[metric]) == set(qrels)
        for qid in qrels:
            assert ours[metric][qid] == pytest.approx(expected[metric][qid], abs=1e-4), (metric, qid)
        mean = sum(expected[metric].values()) / len(qrels)
        assert round(mean_scores(ours)[metric], 4) == round(mean, 4)
    assert 0 < mean_scores(ours)["ndcg@10"] < 1


def test_missing_query_counts_as_zero():
    qrels = {"q1": {"a": 1}, "q2": {"b": 1}}
    run = {"q1": {"a": 3.0}, "q9": {"b": 1.0}}  # q2 missing, q9 unjudged
    means = mean_scores(evaluate_run(qrels, run, ["mrr@10", "recall@100"]))
    assert means == {"mrr@10": 0.5, "recall@100": 0.5}


def test_threshold_keeps_queries_without_grade_2():
    qrels = {"q1": {"a": 2}, "q2": {"b": 1}}
    run = {"q1": {"a": 1.0}, "q2": {"b": 1.0}}
    assert mean_scores(evaluate_run(qrels, run, ["recall@100-l2"])) == {"recall@100-l2": 0.5}


def test_paired_tests():
    base = {"m": {"q1": 1.0, "q2": 0.0, "q3": 1.0, "q4": 0.5}}
    same = {"m": dict(base["m"])}
    worse = {"m": {"q1": 0.0, "q2": 0.0, "q3": 0.1, "q4": 0.0}}
    p = paired_tests({"a": base, "b": same, "c": worse})
    assert p["b"]["m"] == 1.0
    assert 0 < p["c"]["m"] < 0.2


def test_parse_metric():
    assert parse_metric("recall@1000-l2") == ("recall", 1000, 2)
    assert parse_metric("mrr@10") == ("mrr", 10, 1)
    assert parse_metric("map") == ("map", 0, 1)
    with pytest.raises(ValueError, match="unknown metric 'mrr10'"):
        parse_metric("mrr10")


def test_malformed_run_line(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 2.5 tag\nq1 Q0 d2 2 high tag\n")
    with pytest.raises(InputError, match=r"bad.trec:2: field 'score' must be a number, got 'high'"):
        read_run(path)
    path.write_text("q1 Q0 d1 1 2.5\n")
    with pytest.raises(InputError, match=r"bad.trec:1: expected 6 fields"):
        read_run(path)


def test_duplicate_run_line(tmp_path):
    path = tmp_path / "dup.trec"
    path.write_text("q1 Q0 d1 1 2.5 t\nq1 Q0 d2 2 2.0 t\nq1 Q0 d1 3 1.0 t\n")
    with pytest.raises(InputError, match=r"dup.trec:3: duplicate result: docid 'd1' appears twice for qid 'q1'"):
        read_run(path)


def test_empty_inputs(tmp_path):
    path = tmp_path / "empty.trec"
    path.write_text("\n")
    with pytest.raises(InputError, match="empty run"):
        read_run(path)
    with pytest.raises(InputError, match="empty qrels"):
        evaluate_run({}, {"q": {"d": 1.0}}, ["mrr@10"])
