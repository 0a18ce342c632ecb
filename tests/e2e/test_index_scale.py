"""`sparse.load_csr` (index.py's streaming reader) against `to_csr(load_vectors(...))`, bench/scale.py --tiny's
synthetic corpus through index.py, and the scale benchmark itself (--tiny: every engine, resumed)."""
import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import index
import search
from lsr_core import engines
from lsr_core.sparse import ShardWriter, flops_estimate, load_csr, load_vectors, shard_name, to_csr
from lsr_core.utils import InputError

ROOT = Path(__file__).resolve().parents[2]


def assert_same_as_dicts(path, chunk=10000):
    ids, mat, vocab = load_csr(path, chunk=chunk)
    want_ids, vectors = load_vectors(path)
    want, want_vocab = to_csr(vectors)
    assert ids == want_ids and vocab == want_vocab  # same order, same token -> column
    assert mat.shape == want.shape and mat.dtype == np.float32
    assert (mat != want).nnz == 0 and mat.nnz == want.nnz
    assert mat.indices.dtype == np.int32  # half the bytes of to_csr's int64 column ids
    return ids, mat, vocab


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale") / "corpus"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_load_csr_equals_dicts_on_random_shards(tiny_corpus, tmp_path):
    corpus, stats = tiny_corpus
    ids, mat, _ = assert_same_as_dicts(corpus, chunk=7)  # chunks end inside and across shards
    assert len(ids) == 300 and mat.nnz == stats["nnz"] and len(list(corpus.glob("part-*.jsonl.gz"))) == 3
    # empty vectors, integer (quantised) weights, zeros and a token first seen late; and a single .jsonl file
    writer = ShardWriter(tmp_path / shard_name(0))
    rows = [("b", {}), ("a", {"x": 3, "y": 0}), ("7", {"z": 0.5, "x": 1}), ("c", {})]
    for rid, vec in rows:
        writer.add(rid, vec)
    writer.close()
    for chunk in (1, 2, 10000):
        assert_same_as_dicts(tmp_path, chunk)
    single = tmp_path / "one.jsonl"
    single.write_text("".join(json.dumps({"id": r, "vector": v}) + "\n" for r, v in rows))
    ids, mat, vocab = assert_same_as_dicts(single)
    assert ids == ["b", "a", "7", "c"] and vocab == {"x": 0, "y": 1, "z": 2}
    assert mat.toarray().tolist() == [[0, 0, 0], [3, 0, 0], [1, 0, 0.5], [0, 0, 0]]


@pytest.mark.parametrize("line, message", [
    ('{"id": "d0", "vector": {"a": 1}}', "one.jsonl:2: duplicate id 'd0'"),
    ('{"id": "d1", "vector": {"a": NaN}}', "one.jsonl:2: token 'a' has weight NaN"),
    ('{"id": "d 1", "vector": {}}', "one.jsonl:2: id 'd 1' contains whitespace"),
    ('{"id": "d1", "vector": [1]}', "one.jsonl:2: expected {'id': ..., 'vector': {token: weight}}"),
])
def test_load_csr_errors_are_load_vectors_errors(tmp_path, line, message):
    path = tmp_path / "one.jsonl"
    path.write_text('{"id": "d0", "vector": {"a": 1}}\n' + line + "\n")
    errors = []
    for reader in (load_csr, load_vectors):
        with pytest.raises(InputError) as err:
            reader(path)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and message in errors[0]


def test_index_py_builds_the_scale_corpus_like_dicts(tiny_corpus, tmp_path):
    """index.py (streamed CSR) gives the index engines.build gives from the dicts: same vocab.json, ids and scores."""
    corpus, _ = tiny_corpus
    out = index.main([f"--index.input={corpus}", f"--index.output={tmp_path / 'idx'}", "--index.engine=exact",
                      f"--exp.output_dir={tmp_path}"])
    ids, vectors = load_vectors(corpus)
    want = engines.build("exact", ids, vectors, tmp_path / "dicts")
    for name in ("vocab.json", "ids.json", "engine.json"):
        assert json.loads((out / name).read_text()) == json.loads((tmp_path / "dicts" / name).read_text())
    assert json.loads((out / "meta.json").read_text())["count"] == 300
    queries = vectors[:5] + [{"t0": 1.0, "t1": 0.5}]
    assert engines.load(out).search(queries, 10) == want.search(queries, 10)


def test_scale_lines_are_the_shard_writers(tiny_corpus):
    """The vectorised line builder writes exactly what ShardWriter (json.dumps) writes for the same vector."""
    corpus, _ = tiny_corpus
    text = gzip.decompress((corpus / shard_name(1)).read_bytes()).decode()
    lines = text.splitlines()
    assert len(lines) == 100 and text.endswith("}}\n")
    for line in lines:
        row = json.loads(line)
        assert line == json.dumps({"id": row["id"], "vector": row["vector"]})
        assert row["vector"] and all(0.01 <= w <= 10 and round(w, 5) == w for w in row["vector"].values())
    assert json.loads(lines[0])["id"] == "d100"  # shard 1 holds documents 100..199


def test_scale_bench_tiny_measures_every_engine_and_resumes(tmp_path):
    work, results = tmp_path / "w", tmp_path / "scale.json"
    cmd = [sys.executable, str(ROOT / "bench" / "scale.py"), "--tiny", "--workdir", str(work), "--json", str(results),
           "--keep-index"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    state = json.loads(results.read_text())
    rows = {(r["engine"], r["search_params"].get("query_cut"), r["search_params"].get("heap_factor")): r
            for r in state["results"]}
    assert sorted(rows) == sorted([("exact", None, None), ("qdrant-edge", None, None), ("milvus", None, None),
                                   ("seismic", 20, 0.8), ("seismic", 20, 0.7), ("seismic", 30, 0.6),
                                   ("seismic", 10, 0.7)])
    corpus = state["corpora"][0]
    assert corpus["docs"] == 300 and corpus["csr_bytes"] == corpus["nnz"] * 8 + 301 * 4
    for (engine, *_), r in rows.items():
        assert "error" not in r and r["docs"] == 300 and r["queries"] == 20
        assert r["index_peak_rss"] > 50 * 2**20 and r["search_peak_rss"] > 50 * 2**20  # a Python process at least
        assert r["rss_x_csr"] == round(r["index_peak_rss"] / corpus["csr_bytes"], 2) > 0
        assert r["size_bytes"] > 0 and r["load_s"] >= 0 and 0 < r["ms_p50"] <= r["ms_p99"]
        assert (r["recall_at_10"] == 1.0) if engine != "seismic" else (0.5 < r["recall_at_10"] <= 1.0)
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| 300 |")]
    assert sorted(line.split(" | ")[1] for line in table_rows) == ["exact", "milvus", "qdrant-edge"] + ["seismic"] * 4
    assert done.stdout.count("[eta] 300 docs") == 4

    # The encoded query folder is one search.py accepts (meta.json, vocabulary hash) against index.py's index.
    queries = next(work.glob("queries-*"))
    flops = flops_estimate(load_vectors(work / "docs-300" / "corpus")[1], load_vectors(queries)[1])
    assert corpus["flops"] == round(flops, 3) > 0
    run = search.main([f"--search.index={work / 'docs-300' / 'index' / 'exact'}", f"--search.queries={queries}",
                       f"--search.output={tmp_path / 'run.trec'}", "--search.topk=10", "--search.latency_sample=0",
                       f"--exp.output_dir={tmp_path}"])
    hits = [line.split() for line in run.read_text().splitlines()]
    exact_hits = json.loads((work / "docs-300" / "hits" / "exact.json").read_text())["hits"][0]
    assert [h[2] for h in hits if h[0] == "q0"] == exact_hits[0] and len({h[0] for h in hits}) == 20

    # A rerun finds every measurement in the JSON: no engine runs again, the results stay as they were.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "[eta]" not in again.stdout and json.loads(results.read_text()) == state
    assert sum(line.startswith("| 300 |") for line in again.stdout.splitlines()) == 7
