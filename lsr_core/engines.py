"""Retrieval engines behind one small interface (DESIGN §6), chosen by name from `ENGINES`.

    engine = build("seismic", doc_ids, doc_vectors, "runs/x/index/seismic", {"n_postings": 1000})
    engine = load("runs/x/index/seismic", params={"query_cut": 10, "heap_factor": 0.7})   # engine read from engine.json
    run = engine.search(query_vectors, topk=1000, threads=2)    # [[(docid, score), ...] per query]

Vectors are `{token: weight}` dicts (the shard format of lsr_core.sparse), or a scipy CSR matrix whose column j is the
token "j" (what bench/search.py uses to stay within memory). Every engine maps tokens to integer columns with the vocab
of the documents (saved as vocab.json); query tokens absent from it cannot match and are dropped. Documents are stored
in docid order, so "docid ascending" is the integer order every engine breaks ties with: results are sorted by
(score desc, docid asc). Empty queries (no known token) return [] and are counted in `engine.empty_queries`.

Folder layout: engine.json (engine name, build params, and the numbers of docs, vocab tokens and vectors stored),
ids.json, vocab.json, and the engine's own files: exact postings/ (older indexes: docs.npz) | qdrant-edge qdrant/ |
seismic index.index.seismic | milvus milvus.db (milvus-lite) or a cluster URI. `load` turns a missing or corrupt
file, or one that holds another number of docs than engine.json records, into an InputError naming it.

A new engine: an `Engine` subclass (lsr_core/engine_base.py) here in `ENGINES`, its params `<prefix>_<key>` fields of
the index and search config sections.
"""
from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lsr_core.engine_base import REBUILD, Engine, EngineUnavailable, one_line, ordered_chunks, parallel_rows, read_info
from lsr_core.utils import InputError

logger = logging.getLogger(__name__)


class ExactEngine(Engine):
    """Reference scorer: queries [n, V] @ docs^T [V, N] in scipy, exact top-k per row (argpartition + ties by docid).

    docs^T is stored as its three CSR arrays, postings/{indptr,indices,data}.npy (uncompressed, memory-mapped at search
    time: only the rows of the query tokens are read); indexes of an older layout, one docs.npz, are read whole."""

    name, marker, legacy = "exact", "postings", "docs.npz"
    chunk_terms = 2**18  # terms transposed at a time while building: bounds the temporary arrays (~50 bytes a term)
    segments = 2  # each array of docs^T is built in this many parts: the loaded matrix + 1/4 of it in memory

    @classmethod
    def found(cls, folder):
        return (folder / cls.marker).exists() or (folder / cls.legacy).exists()

    def data_path(self, folder):
        return str(folder / (self.marker if (folder / self.marker).exists() else self.legacy))

    def _build(self, docs, order, folder):
        n_docs, n_tokens = docs.shape[0], len(self.vocab)
        index_dtype = np.int32 if max(n_docs, n_tokens, docs.nnz) < 2**31 - 1 else np.int64  # scipy's own choice
        counts = np.zeros(n_tokens, np.int64)
        for start in range(0, docs.nnz, self.chunk_terms):  # by slices: bincount makes an int64 copy of its input
            counts += np.bincount(docs.indices[start:start + self.chunk_terms], minlength=n_tokens)[:n_tokens]
        indptr = np.zeros(n_tokens + 1, index_dtype)
        np.cumsum(counts, out=indptr[1:])
        out = folder / self.marker
        out.mkdir(exist_ok=True)
        with open(out / "indptr.npy", "wb") as f:
            np.save(f, indptr, allow_pickle=False)
        self._save_transposed(out / "data.npy", docs, order, indptr, "data", np.float32)
        self._save_transposed(out / "indices.npy", docs, order, indptr, "indices", index_dtype)
        self._open(folder)

    def _save_transposed(self, path: Path, docs, order, indptr, part: str, dtype) -> None:
        """docs^T's `part` ("data", or "indices": the doc numbers) as the .npy `path`, written `segments` groups of
        token rows at a time: only one group's entries are ever in memory beside the loaded matrix."""
        nnz = int(indptr[-1])
        bounds = np.searchsorted(indptr, np.linspace(0, nnz, self.segments + 1), side="right") - 1
        bounds[-1] = len(indptr) - 1
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                     "fortran_order": False, "shape": (nnz,)})
            for top, stop in zip(bounds[:-1], bounds[1:]):
                self._transposed(docs, order, indptr, top, stop, part, dtype).tofile(f)

    def _transposed(self, docs, order, indptr, top: int, stop: int, part: str, dtype) -> np.ndarray:
        """Token rows top..stop-1 of docs^T's `part`: each chunk of documents in docid order lands after the earlier
        chunks' entries of each token row."""
        out = np.empty(int(indptr[stop] - indptr[top]), dtype)
        cursor = (indptr[top:stop] - indptr[top]).astype(np.int64)  # where each token row's next entry goes
        rows = max(1, self.chunk_terms * docs.shape[0] // max(docs.nnz, 1))
        for first, chunk in ordered_chunks(docs, order, rows):
            chunk_t = chunk.T.tocsr()  # [V, rows], doc numbers ascending within each token row
            ptr = chunk_t.indptr[top:stop + 1]
            a, b, counts = ptr[0], ptr[-1], np.diff(ptr)
            # a chunk's columns count from its first document
            values = chunk_t.data[a:b] if part == "data" else chunk_t.indices[a:b] + first
            out[np.repeat(cursor - (ptr[:-1] - a), counts) + np.arange(b - a)] = values
            cursor += counts
        return out

    def _open(self, folder):
        if not (folder / self.marker).exists():
            return self._open_legacy(folder)
        parts = {}
        for part, kinds in (("indptr", "i"), ("indices", "i"), ("data", "f")):
            path = folder / self.marker / f"{part}.npy"
            if not path.is_file():
                raise InputError(f"{path}: file not found; {REBUILD}")
            try:  # allow_pickle=False: no code runs from the file
                parts[part] = array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as err:  # a bad header, or fewer bytes than it announces
                raise InputError(f"{path}: corrupt index file ({one_line(err)}); {REBUILD}") from None
            if array.ndim != 1 or array.dtype.kind != kinds:
                raise InputError(f"{path}: corrupt index file (a {array.ndim}-d {array.dtype} array); {REBUILD}")
        indptr, indices, data = parts["indptr"], parts["indices"], parts["data"]
        path = folder / self.marker / "indptr.npy"
        if len(indptr) != len(self.vocab) + 1:
            raise InputError(f"{path}: {len(indptr) - 1} token rows for {len(self.vocab)} tokens in vocab.json; "
                             f"{REBUILD}")
        if indptr[0] != 0 or (np.diff(indptr) < 0).any() or not indptr[-1] == len(indices) == len(data):
            raise InputError(f"{path}: corrupt index file (row pointers do not fit {len(indices)} indices and "
                             f"{len(data)} weights); {REBUILD}")
        self.docs_t = sp.csr_matrix((data, indices, indptr), shape=(len(self.vocab), len(self.doc_ids)))

    def _open_legacy(self, folder):
        path = folder / self.legacy
        if not zipfile.is_zipfile(path):  # else numpy tries it as a pickle and says so
            raise InputError(f"{path}: corrupt index file (not a .npz archive); {REBUILD}")
        self.docs_t = sp.load_npz(path).tocsr()  # allow_pickle=False inside: no code runs from it
        if self.docs_t.shape[0] != len(self.vocab):
            raise InputError(f"{path}: {self.docs_t.shape[0]} token rows for {len(self.vocab)} "
                             f"tokens in vocab.json; {REBUILD}")

    def _stored(self):
        return self.docs_t.shape[1]

    def _search(self, queries, topk, threads):
        index_dtype = self.docs_t.indices.dtype  # else scipy converts the whole docs^T to the queries' int64 per block
        queries = sp.csr_matrix((queries.data, queries.indices.astype(index_dtype), queries.indptr.astype(index_dtype)),
                                shape=queries.shape)

        def score(rows):
            hits = []
            for block in np.array_split(rows, -(-len(rows) // 64)):  # bounded [64, N] score matrices
                scores = (queries[block] @ self.docs_t).tocsr()  # only docs sharing a token with the query
                hits += [self._topk(scores.indices[a:b], scores.data[a:b], topk)
                         for a, b in zip(scores.indptr[:-1], scores.indptr[1:])]
            return hits

        return parallel_rows(score, queries.shape[0], threads)

    @staticmethod
    def _topk(docs: np.ndarray, scores: np.ndarray, topk: int):
        if len(scores) > topk:
            kth = np.partition(scores, len(scores) - topk)[len(scores) - topk]
            keep = scores >= kth  # keep every doc tied with the k-th score; the docid order decides among them
            docs, scores = docs[keep], scores[keep]
        order = np.lexsort((docs, -scores))[:topk]
        return list(zip(docs[order].tolist(), scores[order].tolist()))


class QdrantEdgeEngine(Engine):
    """qdrant-edge-py 0.9 (the Qdrant engine in-process): exact sparse dot product over an inverted index."""

    name, marker = "qdrant-edge", "qdrant"
    vector_name = "sparse"

    def _build(self, docs, order, folder):
        import qdrant_edge as qe

        config = qe.EdgeConfig(
            sparse_vectors={self.vector_name: qe.EdgeSparseVectorParams(datatype=qe.VectorStorageDatatype.Float32)},
            wal_enabled=False)  # durability comes from flush() below; a WAL only doubles the disk use
        shard = qe.EdgeShard.create(str(folder / "qdrant"), config)
        for first, chunk in ordered_chunks(docs, order, 5000, self.release):  # Python objects for a chunk only
            points = []
            indptr, indices, weights = chunk.indptr.tolist(), chunk.indices.tolist(), chunk.data.tolist()
            for row, (a, b) in enumerate(zip(indptr, indptr[1:])):
                if b > a:  # an empty document can never match
                    vector = qe.SparseVector(indices[a:b], weights[a:b])
                    points.append(qe.Point(first + row, {self.vector_name: vector}))
            shard.update(qe.UpdateOperation.upsert_points(points))
        shard.optimize()  # build the immutable (compressed) sparse index now, not on the first search
        shard.flush()
        self.shard = shard

    def _open(self, folder):
        import qdrant_edge as qe

        self.shard = qe.EdgeShard.load(str(folder / "qdrant"))

    def _stored(self):
        return self.shard.info().points_count

    def _search(self, queries, topk, threads):
        import qdrant_edge as qe

        def request(row):
            a, b = queries.indptr[row], queries.indptr[row + 1]
            vector = qe.SparseVector(queries.indices[a:b].tolist(), queries.data[a:b].tolist())
            return qe.QueryRequest(limit=topk, query=qe.Query.Nearest(vector, using=self.vector_name),
                                   with_payload=False, with_vector=False)

        def run(rows):
            batch = self.shard.query_batch(qe.QueryBatchRequest([request(r) for r in rows]))
            return [[(p.id, p.score) for p in points] for points in batch]

        return parallel_rows(run, queries.shape[0], threads)

    def close(self):
        if getattr(self, "shard", None) is not None:
            self.shard.close()
            self.shard = None


class SeismicEngine(Engine):
    """pyseismic-lsr 0.5.4: approximate (clustered, pruned posting lists with summaries).

    Build params: n_postings, centroid_fraction, summary_energy. Search params: query_cut, heap_factor.
    Components are our vocab columns written as strings ("42"); more than 65,535 of them need the `*LV` classes."""

    name, marker = "seismic", "index.index.seismic"
    build_defaults = {"n_postings": 1000, "centroid_fraction": 0.1, "summary_energy": 0.4}
    search_defaults = {"query_cut": 10, "heap_factor": 0.7}

    def _classes(self):
        import seismic

        large = len(self.vocab) > 65535
        return (seismic.SeismicDatasetLV, seismic.SeismicIndexLV) if large else (seismic.SeismicDataset,
                                                                                 seismic.SeismicIndex)

    def _build(self, docs, order, folder):
        dataset_cls, index_cls = self._classes()
        dataset = dataset_cls(dim=len(self.vocab))
        for first, chunk in ordered_chunks(docs, order, 20000, self.release):  # int64 copies of a chunk only
            dataset.add_documents_by_id([str(d) for d in range(first, first + chunk.shape[0])],
                                        chunk.indices.astype(np.int64), chunk.data,
                                        chunk.indptr.astype(np.int64))
        params = {**self.build_defaults, **{k: v for k, v in self.params.items() if k in self.build_defaults}}
        self.index = index_cls.build_from_dataset(dataset, **params)
        del dataset  # the index copied the documents: free ours before save() needs room for its own buffers
        self.index.save(str(folder / "index"))

    def _open(self, folder):
        self.index = self._classes()[1].load(str(folder / self.marker))

    def _stored(self):
        return self.index.len

    def _search(self, queries, topk, threads):
        import seismic

        params = {**self.search_defaults, **{k: v for k, v in self.params.items() if k in self.search_defaults}}
        string = seismic.get_seismic_string()
        rows = range(queries.shape[0])
        ids = np.array([str(r) for r in rows], dtype=string)
        components = [queries.indices[queries.indptr[r]:queries.indptr[r + 1]].astype(str).astype(string) for r in rows]
        values = [queries.data[queries.indptr[r]:queries.indptr[r + 1]].astype(np.float32) for r in rows]
        results = self.index.batch_search(ids, components, values, k=topk, num_threads=threads, **params)
        # Place hits by the query id they carry: with several threads the lists do not come back in query order.
        run = [[] for _ in rows]
        for hits in results:
            for qid, score, doc in hits:
                run[int(qid)].append((int(doc), score))
        return run


class MilvusEngine(Engine):
    """Milvus 2.5 (pymilvus): SPARSE_INVERTED_INDEX, metric IP, `inverted_index_algo` from params["algo"].

    params["uri"] empty: a milvus-lite file DB (milvus.db) inside the index folder, else a cluster URI (the collection
    params["collection"] is replaced)."""

    name, marker = "milvus", "engine.json"
    lite_file = "milvus.db"

    def _connect(self, folder: Path):
        with warnings.catch_warnings():  # milvus-lite 2.5 imports pkg_resources (needs setuptools<81)
            warnings.simplefilter("ignore")
            from pymilvus import MilvusClient

            self.lite_path = "" if self.params.get("uri") else str((folder / self.lite_file).absolute())
            try:
                self.client = MilvusClient(self.params.get("uri") or self.lite_path)
            except Exception as err:
                where = self.params.get("uri") or f"milvus-lite at {self.lite_path}"
                raise EngineUnavailable(f"milvus: cannot start or reach {where}: {err}") from err
        self.collection = self.params.get("collection") or "lsr_docs"

    def _build(self, docs, order, folder):
        from pymilvus import DataType

        self._connect(folder)
        client, name = self.client, self.collection
        if client.has_collection(name):
            logger.warning("milvus: replacing existing collection %s", name)
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False)
        schema.add_field("doc", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.SPARSE_FLOAT_VECTOR)
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type="SPARSE_INVERTED_INDEX", metric_type="IP",
                        params={"inverted_index_algo": self.params.get("algo", "TAAT_NAIVE")})
        client.create_collection(name, schema=schema, index_params=index)
        for first, chunk in ordered_chunks(docs, order, 2000, self.release):  # a dict per row of a chunk only
            indptr, indices, weights = chunk.indptr.tolist(), chunk.indices.tolist(), chunk.data.tolist()
            rows = [{"doc": first + row, "vector": dict(zip(indices[a:b], weights[a:b]))}
                    for row, (a, b) in enumerate(zip(indptr, indptr[1:]))
                    if b > a]  # Milvus rejects empty sparse vectors; they could never match anyway
            if rows:
                client.insert(name, rows)
        client.flush(name)
        client.load_collection(name)

    def _open(self, folder):
        if self.params.get("uri"):
            self._connect(folder)
        else:
            lite = folder / self.lite_file
            if not lite.is_file():  # milvus-lite would create an empty database in its place
                raise InputError(f"{lite}: file not found; {REBUILD}")
            try:
                self._connect(folder)
            except EngineUnavailable as err:  # the server starts, or not, from this file: it cannot tell us why
                raise InputError(f"{lite}: milvus-lite cannot open it ({one_line(err.__cause__ or err)}): a corrupt "
                                 f"index file, or milvus-lite cannot run on this machine; {REBUILD}") from None
        if not self.client.has_collection(self.collection):
            raise InputError(f"index not found: {folder} (milvus collection '{self.collection}' is missing)")
        self.client.load_collection(self.collection)

    def _stored(self):
        return int(self.client.get_collection_stats(self.collection)["row_count"])

    def data_path(self, folder):
        uri = self.params.get("uri")
        return f"{uri} (collection {self.collection})" if uri else str(folder / self.lite_file)

    def _search(self, queries, topk, threads):
        def run(rows):
            data = [dict(zip(queries.indices[queries.indptr[r]:queries.indptr[r + 1]].tolist(),
                             queries.data[queries.indptr[r]:queries.indptr[r + 1]].tolist())) for r in rows]
            results = self.client.search(self.collection, data=data, anns_field="vector", limit=topk,
                                         search_params={"metric_type": "IP"}, output_fields=[])
            return [[(hit["id"], hit["distance"]) for hit in hits] for hits in results]

        return parallel_rows(run, queries.shape[0], threads)

    def close(self):
        if getattr(self, "client", None) is None:
            return
        self.client.close()
        self.client = None
        if self.lite_path:
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.lite_path)


ENGINES: dict[str, type[Engine]] = {
    "exact": ExactEngine,
    "qdrant-edge": QdrantEdgeEngine,
    "seismic": SeismicEngine,
    "milvus": MilvusEngine,
}


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; one of {sorted(ENGINES)}")
    return ENGINES[name]


def config_params(engine: str, section) -> dict:
    """Engine params from a config section: fields named `<prefix>_<key>` (seismic_n_postings, milvus_uri) ->
    {key: value}; the prefix is the engine name up to its first '-' (qdrant-edge -> qdrant_)."""
    prefix = engine.split("-")[0] + "_"
    return {k[len(prefix):]: v for k, v in vars(section).items() if k.startswith(prefix)}


def build(engine: str, doc_ids: list[str], doc_vectors, folder: str | Path, params: dict | None = None,
          vocab: dict[str, int] | None = None, release: bool = False) -> Engine:
    """Build an index of `doc_vectors` (dicts, or CSR with its `vocab`) into `folder`; returns the engine, ready to
    search. `release`: the engine may empty a CSR `doc_vectors` once it holds its own copy (`Engine.build`)."""
    return engine_class(engine)(params).build(doc_ids, doc_vectors, folder, vocab, release)


def load_info(folder: str | Path) -> dict:
    """engine.json of an index folder, its engine one of `ENGINES` (`engine_base.read_info`)."""
    return read_info(folder, ENGINES)


def load(folder: str | Path, engine: str = "", params: dict | None = None) -> Engine:
    """Open an index built by `build`; `params` are search-time params (seismic query_cut, heap_factor) merged over
    the build params recorded in engine.json. `engine` (if given) must match the recorded one."""
    folder = Path(folder)
    info = load_info(folder)
    if engine and engine != info["engine"]:
        raise InputError(f"{folder}: index was built with engine '{info['engine']}', not '{engine}'")
    cls = engine_class(info["engine"])
    if not cls.found(folder):
        raise InputError(f"index not found: {folder} (no {cls.marker}; run index.py first)")
    return cls({**info["params"], **(params or {})}).open(folder)
