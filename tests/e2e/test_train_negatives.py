"""train.py on a tiny MS MARCO-format data set: negatives are drawn afresh each epoch from the teacher's candidates
(never a positive), and a run killed mid-epoch resumes to the same negatives and the same final weights."""
import json
import random
from pathlib import Path

import pytest

import train
from lsr_core.data import collate as real_collate
from tests.e2e.test_train import assert_same_weights, logged
from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]
N_QUERIES, N_CANDIDATES = 8, 10


@pytest.fixture(scope="module")
def msmarco(tmp_path_factory):
    """queries.train.tsv, collection.tsv, qrels.train.tsv (one positive a query) and a teacher dict qid -> {pid:
    score} over the positive and N_CANDIDATES other passages, plus a tiny BERT over the collection's words."""
    root = tmp_path_factory.mktemp("tiny_msmarco")
    collection = make_collection(root / "src")
    rng = random.Random(0)
    docs = {d["id"]: d["text"] for d in collection["corpus"]}
    queries = [q for q in collection["queries"] if q["id"].endswith("_0")][:N_QUERIES]
    (root / "collection.tsv").write_text("".join(f"{d}\t{text}\n" for d, text in docs.items()))
    (root / "queries.train.tsv").write_text("".join(f"{q['id']}\t{q['text']}\n" for q in queries))
    (root / "qrels.train.tsv").write_text("".join(f"{q['id']} 0 {q['id'].replace('q', 'd', 1)} 1\n" for q in queries))
    teacher = {}
    for q in queries:
        pos = q["id"].replace("q", "d", 1)
        words = set(q["text"].split())
        cands = [pos] + rng.sample([d for d in docs if d != pos], N_CANDIDATES)
        teacher[q["id"]] = {d: float(len(words & set(docs[d].split()))) + (5.0 if d == pos else 0.0) for d in cands}
    (root / "scores.json").write_text(json.dumps(teacher))
    return {"root": root, "teacher": teacher, "model": make_model(root / "bert", "bert", collection["words"])}


def argv(msmarco, out: Path, *overrides: str) -> list[str]:
    root = msmarco["root"]
    # 8 examples in batches of 4: 2 steps an epoch, 3 epochs
    return ["--cfg", str(ROOT / "yamls" / "tiny" / "bert_mlm.yaml"), f"--model.name_or_path={msmarco['model']}",
            "--data.format=msmarco", f"--data.queries={root / 'queries.train.tsv'}",
            f"--data.corpus={root / 'collection.tsv'}", f"--data.qrels={root / 'qrels.train.tsv'}",
            f"--data.teacher_scores={root / 'scores.json'}", "--data.n_negatives=1", "--train.loss=margin_mse",
            "--train.batch_size=4", "--train.max_steps=6", "--train.q_reg_weight=0.01", "--train.d_reg_weight=0.01",
            "--model.dtype=float32", '--train.mixed_precision="no"', f"--exp.output_dir={out}", *overrides]


def record_negatives(monkeypatch) -> list:
    """Patch train.collate to record, per batch, the (qid, negative ids) it was given."""
    seen = []

    def recording(samples):
        seen.append([(s.qid, tuple(s.neg_ids)) for s in samples])
        return real_collate(samples)

    monkeypatch.setattr(train, "collate", recording)
    return seen


def test_each_epoch_draws_fresh_negatives_and_resume_draws_the_same(msmarco, tmp_path, monkeypatch):
    seen_a = record_negatives(monkeypatch)
    final_a = train.main(argv(msmarco, tmp_path / "a"))
    assert len(seen_a) == 6  # one collate per step: no batch is drawn twice or skipped

    per_query: dict[str, set] = {}
    for batch in seen_a:
        for qid, negs in batch:
            pos = qid.replace("q", "d", 1)
            assert pos not in negs and set(negs) <= set(msmarco["teacher"][qid])  # a scored candidate, not the positive
            per_query.setdefault(qid, set()).update(negs)
    assert len(per_query) == N_QUERIES and all(len(negs) >= 2 for negs in per_query.values()), per_query

    # killed after step 3 (mid-epoch 2; last checkpoint at step 2), then resumed
    out_b = tmp_path / "b"
    seen_b = record_negatives(monkeypatch)
    train.main(argv(msmarco, out_b, "--train.save_every=2", "--train.stop_after=3"))
    assert not (out_b / "final").exists()
    seen_resumed = record_negatives(monkeypatch)
    final_b = train.main(argv(msmarco, out_b, "--train.save_every=2", "--train.resume=auto"))
    # the loader reads one batch ahead (accelerate looks for the epoch's end), so the killed run drew 3 or 4
    assert seen_b[:3] == seen_a[:3] and seen_b == seen_a[:len(seen_b)]
    assert seen_resumed == seen_a[2:]  # from the checkpoint on: the same examples with the same negatives
    assert logged(out_b) == logged(tmp_path / "a")
    assert_same_weights(final_a, final_b)
