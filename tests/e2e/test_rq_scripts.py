"""scripts/rq1.sh .. rq4.sh --tiny end to end (tiny random models of each backbone family, the tiny MS MARCO-shaped
fixture, 2 training steps, exact engine): every configuration ends in a table row with metrics in [0, 1] and FLOPs;
a rerun skips finished steps; scripts/tables.py lays out the paper's columns.
`make test` (CI) runs each script on the configurations that take distinct code paths (CI_NAMES: in --tiny mode
e.g. flan_t5_base and flan_t5_xxl are the same tiny T5); every configuration of every script is marked `full`
(~20 min on 2 cores, `make test-full`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import tables  # noqa: E402

NAMES = {"rq1": ["bert_base_uncased", "flan_t5_base", "flan_t5_large", "flan_t5_xl", "flan_t5_xxl", "opt_350m",
                 "opt_2_7b", "opt_6_7b", "opt_13b", "smollm2_135m", "smollm2_135m_next_token"],
         "rq2": ["distilsplade_max", "flan_t5_encoder_only", "flan_t5_multi_token", "flan_t5_decoder_only",
                 "opt_350m"],
         "rq3": ["flan_t5_single_token", "flan_t5_multi_token", "qmlm_dmlp", "qmlp_dmlm"],
         "rq4": ["distilbert_minilm", "distilbert_rankllama", "flan_t5_base_minilm", "flan_t5_base_rankllama",
                 "opt_350m_minilm", "opt_350m_rankllama", "flan_t5_large", "opt_1_3b", "opt_6_7b_lora"]}
# one configuration per code path: zero-shot encoder / encoder-decoder / decoder (RQ1), the backbone uses of RQ2
# (multi-token T5 in RQ3), the asymmetric heads (RQ3), LoRA and the cross-encoder teacher (RQ4)
CI_NAMES = {"rq1": ["bert_base_uncased", "flan_t5_base", "opt_350m"],
            "rq2": ["distilsplade_max", "flan_t5_encoder_only", "flan_t5_decoder_only", "opt_350m"],
            "rq3": ["flan_t5_multi_token", "qmlm_dmlp", "qmlp_dmlm"],
            "rq4": ["opt_350m_rankllama", "opt_6_7b_lora"]}


def run_script(rq: str, root: Path, *args: str) -> str:
    env = dict(os.environ, PY=sys.executable, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / f"{rq}.sh"), "--tiny", "--out", str(root), *args],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def check_table(root: Path, rq: str, names: list[str]) -> dict:
    table = json.loads((root / rq / "table.json").read_text())
    assert list(table["rows"]) == names
    assert table["columns"][:2] == ["MS MARCO dev MRR@10", "MS MARCO dev R@1000"]
    assert "DL19 nDCG@10" in table["columns"] and "DL20 R@1000" in table["columns"]
    for name, row in table["rows"].items():
        for column, value in row.items():
            if column in ("FLOPs", "q nnz", "d nnz"):
                assert value > 0, (name, column)
            else:
                assert 0.0 <= value <= 1.0, (name, column)
        if rq != "rq1" and "mlp" not in name:
            # trained MLM vectors share terms with every document, so all 48 are retrieved; zero-shot vectors are
            # top-k'd and MLP heads do not expand, so those may share no term with a relevant document
            assert row["MS MARCO dev R@1000"] == 1.0
    md = (root / rq / "table.md").read_text()
    assert all(f"| {n} |" in md for n in names)
    assert (root / rq / "table.png").read_bytes()[:4] == b"\x89PNG"
    return table


def test_tables_layout(tmp_path):
    for s, metrics in (("dev", {"mrr@10": 0.38, "recall@1000": 0.97, "ndcg@10": 0.45}),
                       ("dl19", {"ndcg@10": 0.71, "recall@1000-l2": 0.82, "mrr@10-l2": 0.9})):
        (tmp_path / "eval" / s).mkdir(parents=True)
        (tmp_path / "eval" / s / "metrics.json").write_text(json.dumps({"a": metrics}))
    (tmp_path / "a" / "encode" / "queries").mkdir(parents=True)
    (tmp_path / "a" / "encode" / "queries" / "meta.json").write_text(json.dumps({"flops": 1.5, "nnz_mean": 20.0}))
    rows = tables.main(["--root", str(tmp_path), "--names", "a", "b", "--title", "T"])
    assert rows["a"] == {"MS MARCO dev MRR@10": 0.38, "MS MARCO dev R@1000": 0.97, "MS MARCO dev nDCG@10": 0.45,
                         "DL19 nDCG@10": 0.71, "DL19 R@1000": 0.82, "FLOPs": 1.5, "q nnz": 20.0, "d nnz": None}
    md = (tmp_path / "table.md").read_text()
    assert "| a | 0.3800 | 0.9700 | 0.4500 | 0.7100 | 0.8200 | 1.50 | 20.00 | – |" in md
    assert "| b | – | – | – | – | – | – | – | – |" in md  # not run: shown, empty


@pytest.mark.parametrize("rq", ["rq1", "rq2", "rq3", "rq4"])
def test_rq_script_tiny_ci_configs(tmp_path, rq):
    out = run_script(rq, tmp_path, "--only", ",".join(CI_NAMES[rq]))
    check_table(tmp_path, rq, [n for n in NAMES[rq] if n in CI_NAMES[rq]])
    assert f"{rq} (tiny) done" in out
    skipped = [n for n in NAMES[rq] if n not in CI_NAMES[rq]]
    assert not any(f"== {n}:" in out for n in skipped)
    if rq == "rq4":  # the teacher of opt_350m_rankllama was made by teacher_scores.py (tiny cross-encoder), then
        # rescaled onto the fixture's MiniLM scores
        assert (tmp_path / "data" / "scores.rankllama.json.gz").is_file()
        cfg = yaml.safe_load((tmp_path / "rq4" / "opt_350m_rankllama" / "config.yaml").read_text())
        assert cfg["data"]["teacher_scores"] == str(tmp_path / "data" / "scores.rankllama.json.gz")
        assert cfg["data"]["teacher_norm"] == "affine"
        assert cfg["data"]["teacher_norm_reference"] == str(tmp_path / "data" / "scores.minilm.json.gz")
    if rq == "rq2":  # a rerun of a finished configuration skips every step
        run = tmp_path / "rq2" / "search" / "distilsplade_max.trec"
        mtime = run.stat().st_mtime_ns
        out = run_script("rq2", tmp_path, "--only", "distilsplade_max")
        assert run.stat().st_mtime_ns == mtime and "trained 2 steps" not in out and "encoded" not in out


def test_only_names_an_unknown_configuration(tmp_path):
    env = dict(os.environ, PY=sys.executable, HF_HUB_OFFLINE="1")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "rq3.sh"), "--tiny", "--out", str(tmp_path), "--only",
                           "qmlm_dmlp,nope"], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2 and "error: --only nope: not one of: flan_t5_single_token" in proc.stderr


@pytest.mark.full
@pytest.mark.parametrize("rq", ["rq1", "rq2", "rq3", "rq4"])
def test_rq_script_tiny(tmp_path, rq):
    out = run_script(rq, tmp_path)
    check_table(tmp_path, rq, NAMES[rq])
    assert f"{rq} (tiny) done" in out
