"""scripts/teacher_scores.py: cross-encoder and causal-LM teachers give the model's own scores in the teacher format,
batching does not change them, and a killed run resumes from its partial file."""
import gzip
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import prepare_msmarco  # noqa: E402
import teacher_scores  # noqa: E402
from tests import tiny  # noqa: E402


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    prepare_msmarco.main(["--tiny", "--out", str(root / "data")])
    words = tiny.make_collection(root / "src")["words"] + ["yes", "no"]
    ce = prepare_msmarco.make_tiny_cross_encoder(root / "ce", tiny, words)
    llama = tiny.make_model(root / "llama", "llama", words)
    return root, ce, llama


def argv(root, model, out, *extra):
    data = root / "data"
    return ["--model", str(model), "--queries", str(data / "queries.train.tsv"), "--corpus",
            str(data / "collection.tsv"), "--candidates", str(data / "candidates.train.tsv"), "--out", str(out),
            *extra]


def read(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def test_cross_encoder_scores_are_the_models_logits(fixture, tmp_path):
    root, ce, _ = fixture
    out = teacher_scores.main(argv(root, ce, tmp_path / "t.json.gz", "--batch-size", "7"))
    scores = read(out)
    assert len(scores) == 32 and all(len(c) == 8 for c in scores.values())
    tok = transformers.AutoTokenizer.from_pretrained(ce)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ce).eval()
    query = dict(line.split("\t") for line in (root / "data" / "queries.train.tsv").read_text().splitlines())["q0_0"]
    docs = dict(line.split("\t") for line in (root / "data" / "collection.tsv").read_text().splitlines())
    pid = "d0_0"
    with torch.no_grad():
        expected = model(**tok(query, docs[pid], return_tensors="pt")).logits[0, 0].item()
    assert scores["q0_0"][pid] == pytest.approx(expected, abs=1e-5)  # padding in a batch of 7 changes nothing
    # a different batch size gives the same file
    other = read(teacher_scores.main(argv(root, ce, tmp_path / "u.json.gz", "--batch-size", "64")))
    assert all(other[q][d] == pytest.approx(s, abs=1e-5) for q, c in scores.items() for d, s in c.items())


def test_causal_lm_scores_the_yes_logit(fixture, tmp_path):
    root, _, llama = fixture
    out = teacher_scores.main(argv(root, llama, tmp_path / "l.json.gz", "--max-queries", "2", "--prompt",
                                   "{query} {doc}"))
    scores = read(out)
    assert list(scores) == ["q0_0", "q0_1"]
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    docs = dict(line.split("\t") for line in (root / "data" / "collection.tsv").read_text().splitlines())
    query = dict(line.split("\t") for line in (root / "data" / "queries.train.tsv").read_text().splitlines())["q0_0"]
    pid = next(iter(scores["q0_0"]))
    with torch.no_grad():
        logits = model(**tok(f"{query} {docs[pid]}", return_tensors="pt")).logits[0, -1]
    assert scores["q0_0"][pid] == pytest.approx(logits[tok.convert_tokens_to_ids("yes")].item(), abs=1e-4)


def test_resume_keeps_finished_queries(fixture, tmp_path):
    root, ce, _ = fixture
    out = tmp_path / "t.json.gz"
    # a killed run: one query finished (with a marker score), the next line cut mid-write
    Path(f"{out}.partial.jsonl").write_text(json.dumps({"qid": "q0_0", "scores": {"d0_0": 123.0}}) + '\n{"qid": "q0')
    scores = read(teacher_scores.main(argv(root, ce, out)))
    assert scores["q0_0"] == {"d0_0": 123.0} and len(scores) == 32 and len(scores["q0_1"]) == 8
    assert not Path(f"{out}.partial.jsonl").exists()
    assert teacher_scores.main(argv(root, ce, out)) == out and read(out) == scores  # done: left alone
