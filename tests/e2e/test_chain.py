"""The whole chain on a tiny BERT and the tiny collection: train -> encode -> index -> search -> evaluate, for every
engine; encode's output schema, multi-process equivalence, resume after a kill, and bad input."""
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import encode
import evaluate
import index
import search
from lsr_core.sparse import DOC_FREQS, doc_freqs, flops_estimate, load_vectors, read_doc_freqs, read_meta
from lsr_core.utils import InputError

ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["exact", "qdrant-edge", "seismic", "milvus"]


@pytest.fixture(scope="module")
def trained(train_tiny):
    """A tiny BERT fine-tuned for a few steps, with the collection it was trained on."""
    return train_tiny("chain", 60, shard_size=20)


def ranked(run_file: Path) -> dict:
    """qid -> [(docid, score), ...] best first, as the run file lists them."""
    hits = {}
    for line in run_file.read_text().splitlines():
        qid, _, docid, _, score, _ = line.split()
        hits.setdefault(qid, []).append((docid, float(score)))
    return hits


def top10(run_file: Path) -> dict:
    return {qid: [docid for docid, _ in hits[:10]] for qid, hits in ranked(run_file).items()}


# Seismic keeps document weights in half precision: a weight is off by at most 2^-11 of itself, so a score (a sum
# of non-negative products) by 2^-11 of itself plus float32's summation error, within SEISMIC_REL; the run files
# print scores to 6 decimals (SEISMIC_ABS covers two roundings).
SEISMIC_REL, SEISMIC_ABS = 2.0 ** -10, 1e-6


def test_chain_every_engine_agrees_with_exact(trained):
    root, out = trained
    meta = read_meta(out / "encode" / "corpus")
    n_docs = meta["count"]
    # Seismic is approximate by design; these parameters make it visit every document that shares a term with the
    # query, whatever its random clustering: n_postings >= documents prunes no posting list (each keeps up to
    # 1.5 x n_postings of the n_postings x vocabulary postings), query_cut >= the vocabulary walks every query
    # term's list, and k >= documents means its heap of k best is never full before every document is scored, so
    # no block is skipped on its summary. What is left is its half-precision weights (SEISMIC_REL).
    runs = {}
    for engine in ENGINES:
        index.main([f"--exp.output_dir={out}", f"--index.engine={engine}", f"--index.seismic_n_postings={n_docs}"])
        runs[engine] = out / "search" / f"{engine}.trec"
        search.main([f"--exp.output_dir={out}", f"--search.engine={engine}", f"--search.index={out}/index/{engine}",
                     f"--search.output={runs[engine]}", f"--search.topk={n_docs}",
                     f"--search.seismic_query_cut={meta['vocab_size']}"])
    truth = top10(runs["exact"])
    assert len(truth) == 48
    for engine in ("qdrant-edge", "milvus"):  # exact engines: the same ranking
        assert top10(runs[engine]) == truth, engine
    exact = {qid: dict(hits) for qid, hits in ranked(runs["exact"]).items()}
    seismic, checked = ranked(runs["seismic"]), 0
    for qid, best in truth.items():
        for docid, score in seismic[qid]:  # every score it returns is the document's, up to half precision
            assert abs(score - exact[qid][docid]) <= SEISMIC_REL * exact[qid][docid] + SEISMIC_ABS, (qid, docid)
        # A document of the exact top 10 can drop out of Seismic's only for one that scores, within those bounds,
        # as high: so every one clearly above the 11th exact score must be in Seismic's top 10.
        scores = sorted(exact[qid].values(), reverse=True)
        eleventh = scores[10] if len(scores) > 10 else 0.0
        clear = (eleventh + SEISMIC_ABS) * (1 + SEISMIC_REL) / (1 - SEISMIC_REL) + SEISMIC_ABS
        must = {docid for docid in best if exact[qid][docid] > clear}
        assert must <= {docid for docid, _ in seismic[qid][:10]}, qid
        checked += len(must)
    assert checked >= 0.9 * 10 * len(truth)  # near-ties at the 10th place are rare: the check is not empty
    evaluate.main(["--qrels", f"{root}/data/qrels.tsv", "--out", str(out / "eval"),
                   "--run", *[str(runs[e]) for e in ENGINES]])
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics) == set(ENGINES)
    assert metrics["exact"]["mrr@10"] == metrics["qdrant-edge"]["mrr@10"] == metrics["milvus"]["mrr@10"]
    assert metrics["exact"]["mrr@10"] > 0.2  # 48 docs: random ranking would give ~0.09


def test_encoded_schema_loads_in_seismic_and_fits_anserini(trained, tmp_path):
    _, out = trained
    corpus = out / "encode" / "corpus"
    meta = read_meta(corpus)
    assert meta["count"] == 48 and meta["shards"] == 3 and meta["empty"] == 0 and meta["vocab_size"] > 100
    queries_meta = read_meta(out / "encode" / "queries")
    assert queries_meta["flops"] > 0
    plain = tmp_path / "docs.jsonl"
    with open(plain, "w") as dst:
        for shard in sorted(corpus.glob("part-*.jsonl.gz")):
            with gzip.open(shard, "rt") as src:
                for line in src:
                    obj = json.loads(line)
                    # Anserini JsonVectorCollection / Seismic: {"id": str, "vector": {token: number}}
                    assert set(obj) == {"id", "vector"} and isinstance(obj["id"], str)
                    assert all(isinstance(t, str) and isinstance(w, (int, float)) and w > 0
                               for t, w in obj["vector"].items())
                    dst.write(line)
    import seismic

    built = seismic.SeismicIndex.build(str(plain), n_postings=50, centroid_fraction=0.5, min_cluster_size=2,
                                       summary_energy=0.5, load_content=False)
    assert built.len == 48


def test_query_flops_come_from_the_saved_document_frequencies(trained, tmp_path, caplog):
    """Encoding the corpus saves its document frequencies; encoding queries estimates FLOPs from them alone (the
    corpus folder given here holds no shard) and gets the value computed from every corpus vector."""
    root, out = trained
    corpus = out / "encode" / "corpus"
    _, doc_vecs = load_vectors(corpus)
    _, query_vecs = load_vectors(out / "encode" / "queries")
    assert read_meta(corpus)["doc_freqs"] == DOC_FREQS
    assert read_doc_freqs(corpus / DOC_FREQS) == doc_freqs(doc_vecs)
    expected = flops_estimate(doc_vecs, query_vecs)
    assert expected > 0 and read_meta(out / "encode" / "queries")["flops"] == expected

    shardless = tmp_path / "corpus"
    shardless.mkdir()
    for name in ("meta.json", DOC_FREQS):
        (shardless / name).write_bytes((corpus / name).read_bytes())
    args = [f"--exp.output_dir={out}", f"--encode.input={root}/data/queries.jsonl", "--encode.kind=query",
            f"--encode.flops_docs={shardless}"]
    encode.main(args + [f"--encode.output={tmp_path / 'q'}"])
    meta = read_meta(tmp_path / "q")
    assert meta["flops"] == expected and meta["flops_docs"] == str(shardless)

    # a corpus encoded before the frequencies were saved: a warning saying how to get them, no FLOPs, no reading
    older = read_meta(shardless)
    del older["doc_freqs"]
    (shardless / "meta.json").write_text(json.dumps(older))
    with caplog.at_level("WARNING"):
        encode.main(args + [f"--encode.output={tmp_path / 'old'}"])
    assert "flops" not in read_meta(tmp_path / "old")
    assert f"python -m lsr_core.sparse doc-freqs {shardless}" in caplog.text

    older["doc_freqs"] = DOC_FREQS
    (shardless / "meta.json").write_text(json.dumps(older))
    (shardless / DOC_FREQS).write_bytes(gzip.compress(b'{"n_docs": 48, "df": {"a": 49}}'))
    with pytest.raises(InputError, match=rf"^{shardless / DOC_FREQS}: expected .*re-encode the corpus"):
        encode.main(args + [f"--encode.output={tmp_path / 'bad'}"])
    (shardless / DOC_FREQS).write_bytes(gzip.compress(b'{"n_docs": 48, "df": {')[:-6])
    with pytest.raises(InputError, match=rf"^{shardless / DOC_FREQS}: truncated or corrupt gzip"):
        encode.main(args + [f"--encode.output={tmp_path / 'cut'}"])


def test_doc_freqs_of_an_older_corpus_are_saved_by_one_command(trained, tmp_path):
    _, out = trained
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in out.joinpath("encode", "corpus").glob("part-*.jsonl.gz"):
        (corpus / path.name).write_bytes(path.read_bytes())
    meta = read_meta(out / "encode" / "corpus")
    del meta["doc_freqs"]
    (corpus / "meta.json").write_text(json.dumps(meta))
    done = subprocess.run([sys.executable, "-m", "lsr_core.sparse", "doc-freqs", str(corpus)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == f"wrote {corpus / DOC_FREQS}\n", done.stderr
    assert read_meta(corpus) == {**meta, "doc_freqs": DOC_FREQS}
    assert read_doc_freqs(corpus / DOC_FREQS) == doc_freqs(load_vectors(corpus)[1])


def test_quantised_weights_are_integers(trained, tmp_path):
    root, out = trained
    dest = tmp_path / "q"
    encode.main([f"--exp.output_dir={out}", f"--encode.input={root}/data/queries.jsonl", "--encode.kind=query",
                 f"--encode.output={dest}", "--encode.quant_scale=100", "--encode.topk=5"])
    ids, vectors = load_vectors(dest)
    assert len(ids) == 48 and all(len(v) <= 5 for v in vectors)
    assert all(isinstance(w, int) and w > 0 for v in vectors for w in v.values())  # Anserini reads ints
    assert read_meta(dest)["scale"] == 100


def test_two_process_encode_equals_one_process(trained, tmp_path):
    root, out = trained
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "encode.py"),
           f"--exp.output_dir={out}", f"--encode.input={root}/data/corpus.jsonl", "--encode.kind=doc",
           f"--encode.output={tmp_path / 'two'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list((tmp_path / "two").glob("part-*.jsonl.gz"))) == 2
    two = dict(zip(*load_vectors(tmp_path / "two")))
    one = dict(zip(*load_vectors(out / "encode" / "corpus")))
    assert two.keys() == one.keys()
    for rid, vec in one.items():
        assert vec.keys() == two[rid].keys()
        assert max(abs(vec[t] - two[rid][t]) for t in vec) < 1e-4


def test_killed_encode_resumes_without_duplicates_or_gaps(trained, tmp_path):
    root, out = trained
    dest = tmp_path / "resume"
    args = [f"--exp.output_dir={out}", f"--encode.input={root}/data/corpus.jsonl", "--encode.kind=doc",
            f"--encode.output={dest}", "--encode.shard_size=10"]
    encode.main(args)
    # simulate a kill: one shard lost, one left half-written as a temp file, meta not yet written
    (dest / "part-00002.jsonl.gz").unlink()
    (dest / ".part-00003.jsonl.gz.tmp").write_text("{\"id\": \"half")
    (dest / "meta.json").unlink()
    first = {p.name: p.stat().st_mtime_ns for p in dest.glob("part-*.jsonl.gz")}
    encode.main(args)
    after = {p.name: p.stat().st_mtime_ns for p in dest.glob("part-*.jsonl.gz")}
    assert all(after[name] == first[name] for name in first)  # finished shards were skipped, not redone
    ids, _ = load_vectors(dest)
    assert sorted(ids) == sorted(json.loads(l)["id"] for l in open(root / "data" / "corpus.jsonl"))
    assert read_meta(dest)["count"] == 48


def test_writer_processes_write_the_same_lines(trained, tmp_path):
    """encode.num_writers: the vectors dumped in 2 worker processes, over 5 shards, are the lines this process
    writes alone, in the same order. (Not compared with the 3 shards of the fixture: other shards make other
    length-sorted batches, whose padding moves weights in the 5th decimal.)"""
    root, out = trained
    common = [f"--exp.output_dir={out}", f"--encode.input={root}/data/corpus.jsonl", "--encode.kind=doc",
              "--encode.shard_size=10"]
    encode.main(common + [f"--encode.output={tmp_path / 'writers'}", "--encode.num_writers=2"])
    encode.main(common + [f"--encode.output={tmp_path / 'alone'}"])

    def lines(folder):
        return [line for shard in sorted(folder.glob("part-*.jsonl.gz")) for line in gzip.open(shard, "rt")]

    assert len(list((tmp_path / "writers").glob("part-*.jsonl.gz"))) == 5
    assert lines(tmp_path / "writers") == lines(tmp_path / "alone") and len(lines(tmp_path / "alone")) == 48
    assert [json.loads(line)["id"] for line in lines(tmp_path / "writers")] == \
        [json.loads(line)["id"] for line in lines(out / "encode" / "corpus")]


def test_bad_input(trained, tmp_path):
    root, out = trained
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(InputError, match="duplicate id 'a'"):
        encode.main([f"--exp.output_dir={out}", f"--encode.input={dup}", f"--encode.output={tmp_path / 'o'}"])
    empty_query = tmp_path / "q.jsonl"
    empty_query.write_text('{"id": "q1", "text": "star"}\n{"id": "q2", "text": "  "}\n')
    with pytest.raises(InputError, match=r"q.jsonl:2: empty text for id 'q2'"):
        encode.main([f"--exp.output_dir={out}", f"--encode.input={empty_query}", "--encode.kind=query",
                     f"--encode.output={tmp_path / 'o'}"])
    assert not (tmp_path / "o").exists()
    # empty documents are kept and counted, never dropped or replaced by a placeholder token
    docs = tmp_path / "d.jsonl"
    docs.write_text('{"id": "d1", "text": "star planet"}\n{"id": "d2", "text": ""}\n')
    encode.main([f"--exp.output_dir={out}", f"--encode.input={docs}", f"--encode.output={tmp_path / 'd'}"])
    assert read_meta(tmp_path / "d")["count"] == 2
    # a corrupt shard is named in the error
    shard = tmp_path / "d" / "part-00000.jsonl.gz"
    shard.write_bytes(b"not gzip")
    with pytest.raises(InputError, match=r"part-00000.jsonl.gz: truncated or corrupt gzip data at the start "
                                         r"\(Not a gzipped file"):
        load_vectors(tmp_path / "d")
