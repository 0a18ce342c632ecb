"""scripts/beir.py on two tiny BEIR-layout datasets (tests/fixtures/beir) with a tiny random BERT: the table's
numbers are evaluate.py's metrics.json per dataset and their mean; the qrels header row is not a judgment; titles
are joined as BEIR does; unjudged queries are not encoded; a rerun reuses every output; bad qrels rows and an
`irds:` set's qrels (a fake ir_datasets) are read or refused with file:line."""
import gzip
import json
import re
import sys
import types
from pathlib import Path

import pytest

from lsr_core.tiny import make_model
from lsr_core.utils import InputError, read_qrels

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "tests" / "fixtures" / "beir"
sys.path.insert(0, str(ROOT / "scripts"))
import beir  # noqa: E402

STEPS = ["--engine", "exact", "--model.dtype=float32", "--model.max_doc_len=32", "--model.max_query_len=16",
         "--search.latency_sample=0", "--encode.batch_size=8"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    words = sorted({w for f in FIX.rglob("*.jsonl") for w in re.findall(r"\w+|[^\w\s]", f.read_text().lower())})
    model = make_model(root / "bert", "bert", words)
    out = root / "out"
    argv = ["--model", str(model), "--datasets", str(FIX / "scifacts"), str(FIX / "medline"), "--out", str(out),
            *STEPS]
    return out, argv, beir.main(argv)


def test_table_equals_evaluate_per_dataset_and_their_mean(evaluated, capsys):
    out, _, result = evaluated
    assert list(result["datasets"]) == ["scifacts", "medline"]
    for name, row in result["datasets"].items():
        metrics = json.loads((out / name / "eval" / "metrics.json").read_text())
        assert list(metrics) == ["bert"]  # the run is named after the model folder
        assert {m: row[m] for m in beir.METRICS} == metrics["bert"]
    rows = result["datasets"].values()
    assert result["mean"] == {m: sum(r[m] for r in rows) / 2 for m in beir.METRICS}
    assert json.loads((out / "beir.json").read_text())["datasets"] == result["datasets"]
    table = (out / "beir.md").read_text()
    sci = result["datasets"]["scifacts"]
    assert f"| scifacts | 6 | 3 | {sci['ndcg@10']:.4f} | {sci['recall@100']:.4f} |" in table
    assert f"| mean (2) | | | {result['mean']['ndcg@10']:.4f} |" in table


def test_header_row_is_not_a_judgment_and_only_judged_queries_are_encoded(evaluated):
    out = evaluated[0]
    assert read_qrels(out / "scifacts" / "data" / "qrels.tsv") == {"1": {"s1": 1}, "2": {"s2": 1},
                                                                   "3": {"s4": 2, "s5": 0}}
    assert read_qrels(out / "medline" / "data" / "qrels.tsv") == {"PLAIN-1": {"m1": 2, "m3": 1},
                                                                  "PLAIN-2": {"m2": 2}, "PLAIN-3": {"m5": 1}}
    significance = json.loads((out / "medline" / "eval" / "significance.json").read_text())
    assert significance["queries"] == 3 and evaluated[2]["datasets"]["medline"]["queries"] == 3
    queries = [json.loads(line)["id"] for line in (out / "scifacts" / "data" / "queries.jsonl").open()]
    assert queries == ["1", "2", "3"]  # query 4 is judged in dev only
    assert json.loads((out / "scifacts" / "encode" / "queries" / "meta.json").read_text())["count"] == 3


def test_titles_are_joined_as_beir_does(evaluated):
    with gzip.open(evaluated[0] / "scifacts" / "data" / "corpus.jsonl.gz", "rt") as f:
        texts = {d["id"]: d["text"] for d in map(json.loads, f)}
    assert texts["s1"] == "Aspirin aspirin reduces fever and pain in adults"
    assert texts["s3"] == "sleep improves memory consolidation in students"  # empty title
    assert texts["s6"] == "coffee intake and liver health"  # no title field


def test_rerun_reuses_every_output(evaluated, monkeypatch):
    out, argv, first = evaluated

    def refuse(argv=None):
        raise AssertionError("a finished step ran again")

    for step in (beir.encode, beir.index, beir.search):
        monkeypatch.setattr(step, "main", refuse)
    assert beir.main(argv) == first
    with pytest.raises(InputError, match=r"encode/corpus/meta.json: encoded by '.*bert', not '.*other': give "
                                         r"another --out"):
        beir.main([*argv, "--model", str(out / "other")])


@pytest.mark.parametrize("lines, message", [
    ("query-id\tcorpus-id\tscore\n1\td1\n", r"test.tsv:2: expected 3 tab-separated fields .*, got 2"),
    ("query-id\tcorpus-id\tscore\n1\td1\thigh\n", r"test.tsv:2: field 'score' must be an integer, got 'high'"),
    ("1\td1\t1\nquery-id\tcorpus-id\tscore\n", r"test.tsv:2: field 'score' must be an integer, got 'score'"),
    ("query-id\tcorpus-id\tscore\n1\td1\t1\n1\td1\t2\n", r"test.tsv:3: corpus-id 'd1' of query-id '1' judged again"),
    ("query-id\tcorpus-id\tscore\n1 2\td1\t1\n", r"test.tsv:2: id '1 2' contains whitespace"),
    ("query-id\tcorpus-id\tscore\n", r"test.tsv: no judgments"),
])
def test_bad_qrels_rows_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "test.tsv"
    path.write_text(lines)
    with pytest.raises(InputError, match=message):
        beir.read_beir_qrels(path)


def test_qrels_without_header_keep_their_first_row(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("1\td1\t1\n2\td2\t0\n")
    assert beir.read_beir_qrels(path) == [(1, "1", "d1", 1), (2, "2", "d2", 0)]


def test_judged_query_missing_from_queries_file(tmp_path):
    src = tmp_path / "ds"
    (src / "qrels").mkdir(parents=True)
    (src / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "x"}\n')
    (src / "queries.jsonl").write_text('{"_id": "1", "text": "q"}\n')
    (src / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n1\td1\t1\n7\td1\t1\n")
    with pytest.raises(InputError, match=r"qrels/test.tsv:3: query-id '7' is not in .*queries.jsonl$"):
        beir.prepare_folder(src, "test", tmp_path / "data")
    assert not (tmp_path / "data" / "qrels.tsv").exists()  # not marked complete


def test_irds_dataset_qrels(tmp_path, monkeypatch):
    qrels = [types.SimpleNamespace(query_id="q1", doc_id="d1", relevance=2, iteration="0"),
             types.SimpleNamespace(query_id="q2", doc_id="d9", relevance=0, iteration="0")]
    sets = {"beir/x/test": types.SimpleNamespace(has_qrels=lambda: True, qrels_iter=lambda: iter(qrels)),
            "beir/x": types.SimpleNamespace(has_qrels=lambda: False)}
    module = types.ModuleType("ir_datasets")
    module.load = sets.__getitem__
    monkeypatch.setitem(sys.modules, "ir_datasets", module)
    corpus, queries, path = beir.prepare_irds("beir/x/test", tmp_path / "data")
    assert (corpus, queries) == ("irds:beir/x/test", "irds:beir/x/test")  # encode.py reads them (titles joined)
    assert path.read_text() == "q1 0 d1 2\nq2 0 d9 0\n"
    assert beir.dataset_name("irds:beir/x/test") == "beir-x-test"
    with pytest.raises(InputError, match=r"^irds:beir/x: no qrels \(name a split"):
        beir.prepare_irds("beir/x", tmp_path / "other")
