"""`sparse.load_csr` (index.py's streaming reader) against `to_csr(load_vectors(...))`, and bench/scale.py --tiny's
synthetic corpus through index.py."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import index
from lsr_core import engines
from lsr_core.sparse import ShardWriter, load_csr, load_vectors, shard_name, to_csr
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
