"""evaluate.py through main(argv) on tiny fixtures: files written, values equal to lsr_core.metrics, errors.

Fixture (tests/fixtures/eval): qrels q1 {d1:1, d2:2}, q2 {d3:1}, q3 {d4:1}, q4 {d5:0}.
  a.trec: q1 d2 > d9 = d1 (tie: trec_eval ranks d9 first), q2 d8 > d3, q3 missing, q4 d5, q7 unjudged.
  b.trec: q1 d9 > d2, q2 d3, q3 d7 = d4 (tie: d7 first), q4 missing; b.trec.meta.json has flops 1.25.
"""
import json
import logging
from pathlib import Path

import pytest

import evaluate
from lsr_core.config import ConfigError
from lsr_core.metrics import evaluate_run, mean_scores, read_run
from lsr_core.utils import read_qrels

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "eval"
QRELS, RUN_A, RUN_B = str(FIX / "qrels.tsv"), str(FIX / "a.trec"), str(FIX / "b.trec")


def test_main_writes_results(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, "evaluate")
    out = tmp_path / "eval"
    means = evaluate.main(["--qrels", QRELS, "--run", RUN_A, RUN_B, "--metrics", "mrr@10,recall@100,ndcg@10",
                           "--out", str(out), "--plot", "--corpus", str(FIX / "corpus.jsonl")])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == means and list(metrics) == ["a", "b"]
    # by hand: a = (1 + 1/2 + 0 + 0) / 4, b = (1/2 + 1 + 1/2 + 0) / 4; recall a = (1 + 1) / 4, b = (1/2 + 1 + 1) / 4
    assert metrics["a"]["mrr@10"] == 0.375 and metrics["b"]["mrr@10"] == 0.5
    assert metrics["a"]["recall@100"] == 0.5 and metrics["b"]["recall@100"] == 0.625
    qrels = read_qrels(QRELS)
    for name, path in (("a", RUN_A), ("b", RUN_B)):
        assert metrics[name] == mean_scores(evaluate_run(qrels, read_run(path), ["mrr@10", "recall@100", "ndcg@10"]))
    per_query = json.loads((out / "per_query.json").read_text())
    assert per_query["a"]["mrr@10"] == {"q1": 1.0, "q2": 0.5, "q3": 0.0, "q4": 0.0}  # q7 (unjudged) ignored
    assert per_query["b"]["mrr@10"]["q3"] == 0.5  # tie broken as trec_eval: d7 before d4
    significance = json.loads((out / "significance.json").read_text())
    assert significance["baseline"] == "a" and set(significance["p_values"]["b"]) == set(metrics["a"])
    table = capsys.readouterr().out
    assert "| run | mrr@10 | recall@100 | ndcg@10 |" in table and "| b | 0.5000 | 0.6250 |" in table
    assert (out / "flops.png").read_bytes()[:4] == b"\x89PNG" and (out / "config.yaml").is_file()
    assert "run a: no meta.json with 'flops' found: drawn as a reference line" in caplog.text
    assert "1 judged doc id(s) are not in the corpus" in caplog.text  # d5
    assert "1 of 4 judged queries have no results" in caplog.text


def test_cfg_and_dotted_overrides(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"eval:\n  qrels: {QRELS}\n  runs: [{RUN_B}, {RUN_A}]\n  metrics: [mrr@10]\n")
    means = evaluate.main(["--cfg", str(cfg), "--eval.metrics=[mrr@10, recall@100-l2]", f"--out={tmp_path}"])
    assert list(means) == ["b", "a"] and means["a"] == {"mrr@10": 0.375, "recall@100-l2": 0.25}  # only q1's d2
    assert set(json.loads((tmp_path / "significance.json").read_text())["p_values"]) == {"a"}


def test_argv_adapter():
    assert evaluate.to_config_argv(["--cfg", "x.yaml", "--run", "a b.trec", "c.trec", "--metrics=mrr@10,ndcg@10",
                                    "--plot", "--exp.name=z", "--qrels", "q.tsv"]) == [
        "--cfg", "x.yaml", '--eval.runs=["a b.trec", "c.trec"]', '--eval.metrics=["mrr@10", "ndcg@10"]',
        "--eval.plot=true", "--exp.name=z", '--eval.qrels="q.tsv"']


@pytest.mark.parametrize("argv, message", [
    (["--run", RUN_A], "'eval.qrels' is required"),
    (["--qrels", QRELS, "--run", RUN_A, "--metrics", "mrr10"], "unknown metric 'mrr10'"),
    (["--qrels", QRELS, "--run", RUN_A, "--alpha", "2"], "'eval.alpha' must be in"),
    (["--qrels", QRELS], "'eval.runs' is required"),
])
def test_config_errors(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        evaluate.main(argv + ["--out", str(tmp_path)])
