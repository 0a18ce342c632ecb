"""scripts/prepare_msmarco.py: the tiny fixture has MS MARCO's shape and trains; local files (with the pickle trust
flag, TREC-run teacher files, hard-negative candidates) become the project's format; the manifest's checksums catch a
changed file; a rerun skips finished files."""
import gzip
import json
import pickle
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import prepare_msmarco  # noqa: E402
from lsr_core.config import load_config  # noqa: E402
from lsr_core.data import load_examples, load_teacher_scores  # noqa: E402
from lsr_core.utils import InputError, load_texts, read_qrels  # noqa: E402


def test_tiny_fixture_shape_resume_and_verify(tmp_path):
    out = tmp_path / "data"
    files = prepare_msmarco.main(["--tiny", "--out", str(out)])
    assert {n: files[n]["lines"] for n in ("collection.tsv", "queries.train.tsv", "queries.dev.tsv",
                                           "queries.dl19.tsv", "queries.eval.tsv")} == \
        {"collection.tsv": 48, "queries.train.tsv": 32, "queries.dev.tsv": 16, "queries.dl19.tsv": 8,
         "queries.eval.tsv": 32}
    dl19 = read_qrels(out / "qrels.dl19.tsv")
    assert sorted(set(r for q in dl19.values() for r in q.values())) == [1, 3]  # graded, one known item a query
    teacher = load_teacher_scores(out / "scores.minilm.json.gz")
    train_qrels = read_qrels(out / "qrels.train.tsv")
    for qid, cands in teacher.items():  # the positive is scored, and scored highest
        pos = next(iter(train_qrels[qid]))
        assert len(cands) == 8 and max(cands, key=cands.get) == pos
    assert set(load_texts(out / "queries.eval.tsv")) == \
        {q for s in ("dev", "dl19", "dl20") for q in load_texts(out / f"queries.{s}.tsv")}
    # the training loader reads it as MS MARCO
    cfg = load_config(["--data.format=msmarco", f"--data.corpus={out / 'collection.tsv'}",
                       f"--data.queries={out / 'queries.train.tsv'}", f"--data.qrels={out / 'qrels.train.tsv'}",
                       f"--data.teacher_scores={out / 'scores.minilm.json.gz'}"])
    examples = load_examples(cfg.data, 1, 0)
    samples = [examples.sample(i, seed=0, epoch=epoch) for epoch in range(3) for i in range(len(examples))]
    assert len(examples) == 32 and all(s.scores[0] > s.scores[1] for s in samples)

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"}
    prepare_msmarco.main(["--tiny", "--out", str(out)])
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"} == mtimes
    assert len(prepare_msmarco.main(["--out", str(out), "--verify"])) == 12
    (out / "qrels.dev.tsv").write_text((out / "qrels.dev.tsv").read_text().replace(" 1\n", " 2\n"))
    with pytest.raises(InputError, match="qrels.dev.tsv"):
        prepare_msmarco.main(["--out", str(out), "--verify"])


def test_local_files_pickle_trust_and_teacher_formats(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "collection.tsv").write_text("0\tthe  first   passage \n1\tsecond passage\n2\tthird one\n")
    (src / "queries.train.tsv").write_text("10\tfirst query\n11\tsecond query\n")
    (src / "qrels.train.tsv").write_text("10\t0\t0\t1\n11\t0\t1\t1\n")
    (src / "queries.dev.tsv").write_text("20\tdev query\n")
    (src / "qrels.dev.tsv").write_text("20 0 2 1\n")
    with gzip.open(src / "ce.pkl.gz", "wb") as f:
        pickle.dump({10: {0: 9.5, 2: 1.0}, 11: {1: 8.0, 0: -2.0}}, f)
    (src / "rankllama.trec").write_text("10 Q0 0 1 3.5 rankllama\n10 Q0 2 2 0.5 rankllama\n")
    (src / "bm25.trec").write_text("10 Q0 2 1 12.0 bm25\n10 Q0 1 2 11.0 bm25\n10 Q0 2 1 12.0 bm25\n")
    out = tmp_path / "out"
    base = ["--out", str(out), "--no-irds", "--collection", str(src / "collection.tsv"),
            "--queries-train", str(src / "queries.train.tsv"), "--qrels-train", str(src / "qrels.train.tsv"),
            "--queries-dev", str(src / "queries.dev.tsv"), "--qrels-dev", str(src / "qrels.dev.tsv"),
            "--ce-scores", str(src / "ce.pkl.gz")]
    with pytest.raises(InputError, match="--trust-pickle"):
        prepare_msmarco.main(base)
    files = prepare_msmarco.main(base + ["--trust-pickle", "--rankllama-scores", str(src / "rankllama.trec"),
                                         "--hard-negatives", str(src / "bm25.trec")])
    # whitespace runs collapse (the tsv has no quoting); ids become strings
    assert (out / "collection.tsv").read_text().splitlines()[0] == "0\tthe first passage"
    assert (out / "qrels.train.tsv").read_text() == "10 0 0 1\n11 0 1 1\n"
    assert json.load(gzip.open(out / "scores.minilm.json.gz", "rt")) == \
        {"10": {"0": 9.5, "2": 1.0}, "11": {"1": 8.0, "0": -2.0}}
    assert load_teacher_scores(out / "scores.rankllama.json.gz") == {"10": {"0": 3.5, "2": 0.5}}
    assert (out / "candidates.train.tsv").read_text() == "10\t2\n10\t1\n"
    assert files["scores.minilm.json.gz"]["lines"] == 2 and files["queries.eval.tsv"]["lines"] == 1
    assert "dl19" not in " ".join(files)  # not given, --no-irds: skipped, not invented
