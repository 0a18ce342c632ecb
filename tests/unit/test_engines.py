"""Engines agree with exact (= a dense numpy dot product), persist, and handle empty/unknown queries and bad input."""
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

from lsr_core import engines
from lsr_core.engine_base import as_csr, docid_order
from lsr_core.sparse import to_csr
from lsr_core.config import load_config
from lsr_core.utils import InputError

N_DOCS, N_QUERIES, VOCAB = 1500, 40, 400
SEISMIC_SEARCH = {"query_cut": 100, "heap_factor": 0.5}  # small fixture: ask for (near) exhaustive search


def random_vectors(rng, n, nnz):
    vectors = []
    for _ in range(n):
        tokens = rng.choice(VOCAB, nnz, replace=False)
        vectors.append({f"t{t}": float(w) for t, w in zip(tokens, rng.uniform(0.05, 2.0, nnz))})
    return vectors


@pytest.fixture(scope="module")
def fixture_data():
    rng = np.random.default_rng(0)
    ids = [f"doc{i}" for i in rng.permutation(N_DOCS)]  # not in docid order: engines must sort
    return ids, random_vectors(rng, N_DOCS, 25), random_vectors(rng, N_QUERIES, 6)


def dense_truth(ids, docs, queries, k=10):
    """Brute force: dense [n_queries, vocab] @ [vocab, n_docs]; ties cannot happen with random float weights."""
    def dense(vecs):
        mat = np.zeros((len(vecs), VOCAB))
        for row, vec in enumerate(vecs):
            for tok, w in vec.items():
                mat[row, int(tok[1:])] = w
        return mat

    scores = dense(queries) @ dense(docs).T
    return [[(ids[d], s[d]) for d in np.argsort(-s)[:k]] for s in scores]


@pytest.fixture(scope="module")
def built(fixture_data, tmp_path_factory):
    """name -> (engine built in a folder, folder); milvus is skipped with the reason if milvus-lite cannot start."""
    ids, docs, _ = fixture_data
    out = {}
    for name in engines.ENGINES:
        folder = tmp_path_factory.mktemp(name)
        try:
            out[name] = (engines.build(name, ids, docs, folder, {"n_postings": 2000}), folder)
        except RuntimeError as err:  # milvus: server could not start here
            out[name] = (err, folder)
    yield out
    for engine, _ in out.values():
        if isinstance(engine, engines.Engine):
            engine.close()


def get_engine(built, name):
    engine, folder = built[name]
    if isinstance(engine, Exception):
        pytest.skip(f"{name} cannot run on this machine: {engine}")
    if name == "seismic":
        engine.params.update(SEISMIC_SEARCH)
    return engine, folder


def test_exact_equals_dense_bruteforce(fixture_data, built):
    ids, docs, queries = fixture_data
    run = get_engine(built, "exact")[0].search(queries, 10)
    truth = dense_truth(ids, docs, queries)
    assert [[d for d, _ in r] for r in run] == [[d for d, _ in t] for t in truth]
    np.testing.assert_allclose([s for r in run for _, s in r], [s for t in truth for _, s in t], rtol=1e-5)


@pytest.mark.parametrize("name", ["qdrant-edge", "milvus"])
def test_exact_engines_match_exact(fixture_data, built, name):
    queries = fixture_data[2]
    truth = get_engine(built, "exact")[0].search(queries, 10)
    run = get_engine(built, name)[0].search(queries, 10, threads=2)
    assert [[d for d, _ in r] for r in run] == [[d for d, _ in t] for t in truth]
    np.testing.assert_allclose([s for r in run for _, s in r], [s for t in truth for _, s in t], rtol=1e-4)


def test_seismic_recall_at_10(fixture_data, built):
    queries = fixture_data[2]
    truth = get_engine(built, "exact")[0].search(queries, 10)
    run = get_engine(built, "seismic")[0].search(queries, 10, threads=2)
    recall = np.mean([len({d for d, _ in r} & {d for d, _ in t}) / 10 for r, t in zip(run, truth)])
    assert recall >= 0.98
    assert all(len(r) == 10 for r in run)


@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_persistence_round_trip(fixture_data, built, name):
    engine, folder = get_engine(built, name)
    queries = fixture_data[2]
    before = engine.search(queries, 20)
    if name == "milvus":
        engine.close()  # milvus-lite: one server per file
    reloaded = engines.load(folder, params=SEISMIC_SEARCH if name == "seismic" else None)
    try:
        assert type(reloaded) is engines.ENGINES[name]
        assert reloaded.search(queries, 20) == before
    finally:
        if name == "milvus":
            reloaded.close()
            built[name] = (engines.load(folder), folder)


@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_empty_and_unknown_token_queries(fixture_data, built, name):
    engine = get_engine(built, name)[0]
    query = fixture_data[2][0]
    with_unknown = {**query, "never-seen-token": 3.0}
    run = engine.search([{}, with_unknown, {"never-seen-token": 1.0}, query], 10)
    assert run[0] == [] and run[2] == []
    assert engine.empty_queries == 2
    assert run[1] == run[3] and len(run[3]) == 10  # the unknown token is ignored


def test_exact_ties_broken_by_docid(tmp_path):
    docs = [{"a": 1.0}] * 5 + [{"a": 2.0}]
    ids = ["d3", "d1", "d4", "d0", "d2", "d9"]
    engine = engines.build("exact", ids, docs, tmp_path)
    # the cut at k=3 falls inside a 5-way tie: the smallest docids win
    assert engine.search([{"a": 1.0}], 3) == [[("d9", 2.0), ("d0", 1.0), ("d1", 1.0)]]


def test_missing_index_error(tmp_path):
    with pytest.raises(InputError, match=r"index not found: .*nope \(run index.py first\)"):
        engines.load(tmp_path / "nope")


def test_duplicate_doc_ids(tmp_path):
    with pytest.raises(InputError, match="duplicate doc id 'd1'"):
        engines.build("exact", ["d0", "d1", "d1"], [{"a": 1.0}, {"a": 2.0}, {"b": 1.0}], tmp_path / "x")


def test_config_params():
    cfg = load_config(["--index.seismic_n_postings=500", "--search.seismic_heap_factor=0.9"])
    assert engines.config_params("seismic", cfg.index) == {"n_postings": 500, "centroid_fraction": 0.1,
                                                           "summary_energy": 0.4}
    assert engines.config_params("seismic", cfg.search) == {"query_cut": 20, "heap_factor": 0.9}
    assert engines.config_params("milvus", cfg.index) == {"uri": "", "algo": "TAAT_NAIVE", "collection": "lsr_docs"}
    assert engines.config_params("qdrant-edge", cfg.index) == {}
    with pytest.raises(ValueError, match="unknown engine"):
        engines.engine_class("faiss")


def mapped(array) -> bool:
    """Whether `array` reads a memory-mapped file (np.memmap somewhere down its chain of bases)."""
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def test_exact_postings_built_in_chunks_are_memory_mapped(fixture_data, tmp_path, monkeypatch):
    ids, docs, queries = fixture_data
    monkeypatch.setattr(engines.ExactEngine, "chunk_terms", 100)  # 4 documents a chunk: 375 chunks
    monkeypatch.setattr(engines.ExactEngine, "segments", 3)
    built = engines.build("exact", ids, docs, tmp_path)
    assert sorted(p.name for p in (tmp_path / "postings").iterdir()) == ["data.npy", "indices.npy", "indptr.npy"]
    assert not (tmp_path / "docs.npz").exists()
    truth = dense_truth(ids, docs, queries)
    for engine in (built, engines.load(tmp_path)):
        docs_t = engine.docs_t
        assert docs_t.shape == (VOCAB, N_DOCS) and docs_t.nnz == N_DOCS * 25 and docs_t.has_sorted_indices
        assert docs_t.indices.dtype == docs_t.indptr.dtype == np.int32 and docs_t.data.dtype == np.float32
        assert all(mapped(a) and not a.flags.writeable for a in (docs_t.data, docs_t.indices, docs_t.indptr))
        run = engine.search(queries, 10)
        assert [[d for d, _ in r] for r in run] == [[d for d, _ in t] for t in truth]
        np.testing.assert_allclose([s for r in run for _, s in r], [s for t in truth for _, s in t], rtol=1e-5)


def test_exact_reads_an_index_of_the_npz_layout(fixture_data, built, tmp_path):
    """Indexes built before postings/ hold the transposed matrix in one docs.npz: still searched the same."""
    engine, folder = get_engine(built, "exact")
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "postings")
    sp.save_npz(tmp_path / "docs.npz", sp.csr_matrix(engine.docs_t, copy=True), compressed=False)
    legacy = engines.load(tmp_path)
    assert not mapped(legacy.docs_t.data)
    queries = fixture_data[2]
    assert legacy.search(queries, 20) == engine.search(queries, 20)
    (tmp_path / "docs.npz").unlink()
    with pytest.raises(InputError, match=r"index not found: .* \(no postings; run index.py first\)"):
        engines.load(tmp_path)


@pytest.mark.parametrize("release", [False, True])
@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_csr_in_input_order_builds_the_index_dicts_build(fixture_data, built, tmp_path, name, release):
    """What index.py passes (load_csr's CSR: int32 column ids, rows in file order, not docid order) gives the same
    results as the dicts, read in chunks of docid order; `release` empties the matrix of an engine that copied it."""
    ids, docs, queries = fixture_data
    want = get_engine(built, name)[0].search(queries, 10)
    mat, vocab = to_csr(docs)
    mat = sp.csr_matrix((mat.data, mat.indices.astype(np.int32), mat.indptr.astype(np.int32)), shape=mat.shape)
    mat.sort_indices()  # as load_csr does: the engines take it as it is
    before = [a.copy() for a in (mat.data, mat.indices, mat.indptr)]
    engine = engines.build(name, ids, mat, tmp_path, {"n_postings": 2000, **SEISMIC_SEARCH}, vocab, release)
    try:
        run = engine.search(queries, 10)
        assert [[d for d, _ in r] for r in run] == [[d for d, _ in w] for w in want]
        # qdrant-edge: two builds of the same points differ in the last bits of a few scores
        np.testing.assert_allclose([s for r in run for _, s in r], [s for w in want for _, s in w], rtol=1e-6)
    finally:
        engine.close()
    if release and name != "exact":  # exact reads the matrix once per part it writes, and holds no copy of it
        assert mat.shape == (0, len(vocab)) and mat.nnz == 0 and len(mat.indptr) == 1
    else:
        assert all((a == b).all() for a, b in zip(before, (mat.data, mat.indices, mat.indptr)))  # the input is kept


def test_as_csr_copies_only_what_it_must_fix():
    vocab = {"a": 0, "b": 1, "c": 2}
    canonical = sp.csr_matrix(np.array([[0, 1.5, 2], [3, 0, 0]], np.float32))
    assert as_csr(canonical, vocab)[0] is canonical  # a corpus is never held twice
    unsorted = sp.csr_matrix((np.array([2, 1.5, 3], np.float32), np.array([2, 1, 0]), np.array([0, 2, 3])),
                             shape=(2, 3))
    negative = sp.csr_matrix(np.array([[0, -1.5, 2], [3, 0, 0]], np.float32))
    for mat, want in ((unsorted, [[0, 1.5, 2], [3, 0, 0]]), (negative, [[0, 0, 2], [3, 0, 0]])):
        data = mat.data.copy()
        fixed = as_csr(mat, vocab)[0]
        assert fixed is not mat and fixed.has_canonical_format and fixed.toarray().tolist() == want
        assert (mat.data == data).all()  # the caller's matrix is left as it was


def test_docid_order():
    assert docid_order(["a", "b", "c"]) is None and docid_order([]) is None
    assert docid_order(["d10", "d2", "d1"]).tolist() == [2, 0, 1]  # string order, as the engines' ties need
    with pytest.raises(InputError, match="duplicate doc id 'a'"):
        docid_order(["b", "a", "c", "a"])
    with pytest.raises(InputError, match="duplicate doc id 'b'"):
        docid_order(["a", "b", "b"])
