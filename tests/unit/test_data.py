"""Training data: both jsonl forms, the MS MARCO files (JSON and pickle scores), negatives drawn per access,
errors, batching."""
import gzip
import json
import pickle
from pathlib import Path

import pytest
import torch

from lsr_core.config import DataConfig
from lsr_core.data import TrainSet, collate, convert_scores_to_json, load_examples, load_teacher_scores
from lsr_core.utils import InputError

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "train"
MSM = FIX / "msmarco"


def ids_cfg(train_file=FIX / "train_ids.jsonl", **kw) -> DataConfig:
    return DataConfig(format="jsonl", train_file=str(train_file), corpus=str(FIX / "corpus.jsonl"),
                      queries=str(FIX / "queries.tsv"), qrels=str(FIX / "qrels.txt"), **kw)


def msmarco_cfg(scores=MSM / "scores.json", **kw) -> DataConfig:
    return DataConfig(format="msmarco", queries=str(MSM / "queries.train.tsv"), corpus=str(MSM / "collection.tsv"),
                      qrels=str(MSM / "qrels.train.tsv"), teacher_scores=str(scores), **kw)


def drawn(examples: TrainSet, seed: int = 0, epoch: int = 0) -> list:
    return [examples.sample(i, seed, epoch) for i in range(len(examples))]


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_jsonl_ids_resolve_texts_and_scores():
    examples = drawn(load_examples(ids_cfg(), n_negatives=2, seed=0))
    assert [(ex.qid, ex.pos_id, ex.neg_ids) for ex in examples] == [
        ("q1", "d1", ["d5", "d6"]), ("q2", "d3", ["d7", "d8"]), ("q3", "d5", ["d1", "d6"])]
    first = examples[0]
    assert first.query == "where is the eiffel tower"
    assert first.pos == "The Eiffel Tower is a wrought-iron lattice tower in Paris."
    assert first.negs[0] == "The Colosseum is an amphitheatre in the centre of Rome."
    assert first.scores == [9.1, 2.0, 1.5]
    assert examples[1].scores == [8.0, -1.0, 0.5]


def test_jsonl_more_negatives_than_needed_are_drawn_per_access_with_their_scores():
    examples = load_examples(ids_cfg(), n_negatives=1, seed=3)
    score_of = {"d5": 2.0, "d6": 1.5}
    seen = set()
    for epoch in range(20):
        sample = examples.sample(0, seed=3, epoch=epoch)
        assert sample.neg_ids[0] in score_of
        assert sample.scores == [9.1, score_of[sample.neg_ids[0]]]
        assert sample == examples.sample(0, seed=3, epoch=epoch)  # the same draw for the same (seed, epoch, index)
        seen.add(sample.neg_ids[0])
    assert seen == {"d5", "d6"}  # epochs see both candidates


def test_jsonl_inline_texts():
    cfg = DataConfig(format="jsonl", train_file=str(FIX / "train_inline.jsonl"))
    examples = drawn(load_examples(cfg, n_negatives=2, seed=0))
    assert len(examples) == 2
    ex = examples[0]
    assert (ex.qid, ex.query) == ("train_inline.jsonl:1", "tallest mountain")
    assert ex.pos == "Mount Everest is the highest mountain above sea level."
    assert ex.negs == ["The Colosseum is in Rome.", "Python is a programming language."]
    assert ex.scores == [10.0, 1.0, 2.0]
    assert examples[1].qid == "x2" and examples[1].scores == [9.0, 0.0, -3.0]


def test_jsonl_fills_missing_negatives_from_corpus_never_a_positive(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q1", "pos": "d1", "negs": []},
                                                   {"qid": "q2", "pos": ["d3"], "negs": ["d8"]}])
    seen = set()
    examples = load_examples(ids_cfg(train), n_negatives=3, seed=0)
    for epoch in range(60):  # the corpus top-up is drawn per access too
        q1, q2 = drawn(examples, 0, epoch)
        # q1's qrels positives are d1 and d2; q2's are d3 and d4
        assert not {"d1", "d2"} & set(q1.neg_ids)
        assert not {"d3", "d4"} & set(q2.neg_ids)
        assert q2.neg_ids[0] == "d8" and len(set(q2.neg_ids)) == 3
        assert q1.scores is None
        seen.update(q1.neg_ids)
    assert seen == {"d3", "d4", "d5", "d6", "d7", "d8"}  # every other document gets sampled
    again = drawn(load_examples(ids_cfg(train), n_negatives=3, seed=7), 7, 0)
    assert [ex.neg_ids for ex in again] == [ex.neg_ids for ex in drawn(load_examples(ids_cfg(train), 3, 0), 7, 0)]


def test_listed_negative_that_is_a_positive_is_dropped(tmp_path):
    # d2 is a qrels positive of q1, d1 is the line's own positive: neither may be used as a negative
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q1", "pos": "d1", "negs": ["d2", "d1", "d7"]}])
    examples = load_examples(ids_cfg(train), n_negatives=2, seed=0)
    for epoch in range(30):
        (ex,) = drawn(examples, 0, epoch)
        assert ex.neg_ids[0] == "d7" and ex.neg_ids[1] not in {"d1", "d2"}
    inline = write_lines(tmp_path / "inline.jsonl", [{"query": "q", "pos": "same", "negs": ["same", "other"]}])
    (ex,) = drawn(load_examples(DataConfig(train_file=str(inline)), n_negatives=1, seed=0))
    assert ex.negs == ["other"]


def test_missing_negatives_errors(tmp_path):
    with pytest.raises(InputError, match="no teacher score"):
        load_examples(ids_cfg(), n_negatives=3, seed=0)  # lines have scores, random negatives would not
    inline = write_lines(tmp_path / "inline.jsonl", [{"query": "q", "pos": "p", "negs": ["n"]}])
    with pytest.raises(InputError, match=r"inline.jsonl:1: .*data.corpus"):
        load_examples(DataConfig(train_file=str(inline)), n_negatives=2, seed=0)


def test_malformed_json_line_names_file_and_line(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q1", "pos": "d1", "negs": ["d5"]}, '{"qid": "q2",'])
    with pytest.raises(InputError, match=r"train.jsonl:2: invalid JSON"):
        load_examples(ids_cfg(train), n_negatives=1, seed=0)


def test_unknown_id_names_line_and_field(tmp_path):
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q1", "pos": "d1", "negs": ["d5", "d99"]}])
    with pytest.raises(InputError, match=r"train.jsonl:1: field 'negs\[1\]': unknown document id 'd99'"):
        load_examples(ids_cfg(train), n_negatives=1, seed=0)
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q9", "pos": "d1", "negs": ["d5"]}])
    with pytest.raises(InputError, match=r"train.jsonl:1: field 'qid': unknown query id 'q9'"):
        load_examples(ids_cfg(train), n_negatives=1, seed=0)
    train = write_lines(tmp_path / "train.jsonl", [{"qid": "q1", "pos": "d1", "negs": ["d5"], "scores": {"d1": 1}}])
    with pytest.raises(InputError, match=r"train.jsonl:1: field 'scores' has no score for document 'd5'"):
        load_examples(ids_cfg(train), n_negatives=1, seed=0)


def test_empty_query_errors(tmp_path):
    inline = write_lines(tmp_path / "inline.jsonl", [{"query": "ok", "pos": "p", "negs": ["n"]},
                                                     {"query": "  ", "pos": "p", "negs": ["n"]}])
    with pytest.raises(InputError, match=r"inline.jsonl:2: field 'query' is empty"):
        load_examples(DataConfig(train_file=str(inline)), n_negatives=1, seed=0)
    queries = tmp_path / "queries.tsv"
    queries.write_text("q1\twhere is the eiffel tower\nq2\t \n")
    cfg = ids_cfg()
    cfg.queries = str(queries)
    with pytest.raises(InputError, match=r"queries.tsv:2: empty text"):
        load_examples(cfg, n_negatives=2, seed=0)


def test_msmarco_json_scores():
    examples = drawn(load_examples(msmarco_cfg(), n_negatives=2, seed=0))
    # query 300's only positive (pid 4) has no teacher score: skipped; query 100 has two positives
    assert [(ex.qid, ex.pos_id) for ex in examples] == [("100", "0"), ("100", "1"), ("200", "2")]
    scores = json.loads((MSM / "scores.json").read_text())
    positives = {"100": {"0", "1"}, "200": {"2"}}
    for ex in examples:
        assert not positives[ex.qid] & set(ex.neg_ids)
        assert len(set(ex.neg_ids)) == 2 and set(ex.neg_ids) <= set(scores[ex.qid])
        assert ex.scores == [scores[ex.qid][d] for d in [ex.pos_id, *ex.neg_ids]]
    assert examples[2].query == "who built the eiffel tower"
    assert examples[2].pos == "Gustave Eiffel's company built the tower."
    assert len(load_examples(msmarco_cfg(max_examples=2), n_negatives=2, seed=0)) == 2


def test_msmarco_negatives_drawn_per_access_never_a_positive():
    positives = {"100": {"0", "1"}, "200": {"2"}}
    candidates = {"100": {"5", "7", "6"}, "200": {"3", "6", "0"}}
    examples = load_examples(msmarco_cfg(), n_negatives=1, seed=0)
    seen = {i: set() for i in range(len(examples))}
    for seed in range(3):
        for epoch in range(40):
            for i, ex in enumerate(drawn(examples, seed, epoch)):
                assert not positives[ex.qid] & set(ex.neg_ids)
                seen[i].update(ex.neg_ids)
    # every non-positive candidate of the teacher gets drawn, for each (query, positive) example
    assert [seen[i] for i in range(len(examples))] == [candidates["100"], candidates["100"], candidates["200"]]
    # the draw depends on (seed, epoch, index) only: not on the order or number of earlier draws
    assert examples.sample(2, 5, 3) == drawn(examples, 5, 3)[2]


def test_examples_hold_ids_and_each_text_once():
    examples = load_examples(msmarco_cfg(), n_negatives=2, seed=0)
    assert [(ex.qid, ex.pos_id) for ex in examples.examples] == [("100", "0"), ("100", "1"), ("200", "2")]
    # the two examples of query 100 share one candidate list; texts live in the set, not in the examples
    assert examples.examples[0].candidates is examples.examples[1].candidates
    assert not any(isinstance(v, str) and " " in v for ex in examples.examples for v in vars(ex).values())
    assert sorted(examples.docs) == ["0", "1", "2", "3", "5", "6", "7"]  # positives and candidates of used queries
    assert sorted(examples.queries) == ["100", "200"]


def test_msmarco_pickle_needs_trust_and_converts(tmp_path):
    # the sentence-transformers file uses int ids: {qid: {pid: score}}
    raw = {int(q): {int(p): s for p, s in cand.items()}
           for q, cand in json.loads((MSM / "scores.json").read_text()).items()}
    pkl = tmp_path / "ce-scores.pkl.gz"
    with gzip.open(pkl, "wb") as f:
        pickle.dump(raw, f)
    with pytest.raises(InputError, match="convert_scores_to_json"):
        load_examples(msmarco_cfg(pkl), n_negatives=2, seed=0)
    trusted = drawn(load_examples(msmarco_cfg(pkl, trust_pickle=True), n_negatives=2, seed=0))
    assert trusted == drawn(load_examples(msmarco_cfg(), n_negatives=2, seed=0))

    converted = tmp_path / "ce-scores.json.gz"
    assert convert_scores_to_json(pkl, converted) == 3
    assert load_teacher_scores(converted) == load_teacher_scores(MSM / "scores.json")
    assert drawn(load_examples(msmarco_cfg(converted), n_negatives=2, seed=0)) == trusted


def test_msmarco_unknown_passage_is_an_error(tmp_path):
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"100": {"0": 1.0, "999": 0.5}}))
    with pytest.raises(InputError, match="collection.tsv: 1 id.*'999'"):
        load_examples(msmarco_cfg(scores), n_negatives=1, seed=0)


def test_collate_layout():
    examples = drawn(load_examples(ids_cfg(), n_negatives=2, seed=0))
    batch = collate(examples[:2])
    assert batch.queries == ["where is the eiffel tower", "how do plants make energy"]
    assert batch.docs == [examples[0].pos, *examples[0].negs, examples[1].pos, *examples[1].negs]
    assert batch.teacher_scores.shape == (2, 3)
    assert torch.allclose(batch.teacher_scores, torch.tensor([[9.1, 2.0, 1.5], [8.0, -1.0, 0.5]]))
    inline = drawn(load_examples(DataConfig(train_file=str(FIX / "train_inline.jsonl")), 2, 0))
    inline[0].scores = None
    with pytest.raises(ValueError, match="teacher scores"):
        collate(inline)


def test_epoch_view_deterministic_per_seed_and_epoch(tmp_path):
    from train import EpochView

    lines = [{"qid": f"x{i}", "query": f"query {i}", "pos": f"pos {i}", "negs": [f"neg {i} {j}" for j in range(3)]}
             for i in range(10)]
    examples = load_examples(DataConfig(train_file=str(write_lines(tmp_path / "t.jsonl", lines))), 2, 0)

    def epoch(seed, number):
        view = EpochView(examples, seed)
        view.shuffle_for_epoch(number)
        return collate([view[i] for i in range(len(view))])

    epoch0 = epoch(1, 0)
    assert sorted(epoch0.queries) == sorted(f"query {i}" for i in range(10))
    assert epoch0.queries == epoch(1, 0).queries and epoch0.docs == epoch(1, 0).docs
    assert epoch0.queries != epoch(1, 1).queries
    assert epoch0.docs != epoch(2, 0).docs  # another seed: another order and other negatives
