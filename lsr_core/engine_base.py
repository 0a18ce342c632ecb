"""The interface every retrieval engine implements (`Engine`), and what they share: the vectors as a CSR matrix over
the documents' vocab, docid order and ties, row-parallel search, and the checks of an index folder's common files
(engine.json, ids.json, vocab.json) that turn a missing or corrupt file into an InputError naming it. The engines
themselves and their registry `ENGINES` are in lsr_core/engines.py."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lsr_core.sparse import to_csr
from lsr_core.utils import InputError, atomic_write_json, read_json

REBUILD = "rebuild it with index.py"  # the end of every message about a broken index file

logger = logging.getLogger(__name__)


def as_csr(vectors, vocab: dict[str, int] | None):
    """Dicts or a CSR matrix -> (CSR float32 with sorted column ids and no stored zeros, vocab). A float32 CSR that is
    already so (what `sparse.load_csr` gives) is used as it is, not copied: a corpus must fit twice over otherwise."""
    fresh = not sp.issparse(vectors)  # a matrix of our own, to fix in place
    if fresh:
        mat, vocab = to_csr(vectors, vocab)
    else:
        mat = vectors if isinstance(vectors, sp.csr_matrix) else sp.csr_matrix(vectors)
        if vocab is None:
            vocab = {str(j): j for j in range(mat.shape[1])}
        elif mat.shape[1] > len(vocab):  # query columns the documents never used
            mat, fresh = mat[:, :len(vocab)], True
    if mat.dtype != np.float32:
        mat, fresh = mat.astype(np.float32), True
    # min() reads the weights without a temporary array; NaN fails the test and takes the copy below
    if not fresh and mat.has_canonical_format and (mat.nnz == 0 or mat.data.min() > 0):
        return mat, vocab
    mat = mat if fresh else mat.copy()
    mat.data[mat.data < 0] = 0  # sparse vectors are non-negative; negative weights cannot come from our encoders
    mat.eliminate_zeros()
    mat.sort_indices()
    return mat, vocab


def docid_order(doc_ids: list[str]) -> np.ndarray | None:
    """Row numbers sorted by docid (None: the rows are in docid order already); a duplicate id is an InputError."""
    ids = np.empty(len(doc_ids), dtype=object)  # object array: sorts by Python string order, no fixed-width copy
    ids[:] = doc_ids
    if len(ids) < 2 or (ids[1:] > ids[:-1]).all():
        return None
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    same = np.flatnonzero(ids[1:] == ids[:-1])
    if same.size:
        raise InputError(f"duplicate doc id '{ids[same[0]]}'")
    return order


def ordered_chunks(docs, order: np.ndarray | None, rows: int, release: bool = False):
    """(first doc number, CSR of the next `rows` documents in docid order) over all of `docs`: one chunk is copied
    at a time, never the whole matrix. `release`: `docs` becomes an empty matrix once the last chunk is taken, its
    arrays freed while the engine builds from its own copy."""
    for first in range(0, docs.shape[0], rows):
        stop = min(first + rows, docs.shape[0])
        yield first, docs[first:stop] if order is None else docs[order[first:stop]]
    if release:
        empty = sp.csr_matrix((0, docs.shape[1]), dtype=docs.dtype)
        docs.data, docs.indices, docs.indptr, docs._shape = empty.data, empty.indices, empty.indptr, empty.shape


class EngineUnavailable(RuntimeError):
    """The engine's server cannot start or be reached (not a fault of the index files)."""


def row_chunks(n: int, parts: int) -> list[np.ndarray]:
    """Row numbers 0..n-1 cut into at most `parts` contiguous non-empty chunks."""
    return [c for c in np.array_split(np.arange(n), max(1, min(parts, n))) if len(c)]


def parallel_rows(fn, n: int, threads: int) -> list:
    """fn(row_numbers) -> list per row; run over `threads` contiguous chunks and concatenate in order."""
    chunks = row_chunks(n, threads)
    if len(chunks) == 1:
        return fn(chunks[0])
    with ThreadPoolExecutor(len(chunks)) as pool:
        return [hit for part in pool.map(fn, chunks) for hit in part]


class Engine:
    """Base: vocab, docid mapping, query validation and result ordering. Subclasses implement `_build`, `_open`,
    `_stored` and `_search(queries CSR [n, vocab], topk, threads) -> [[(doc_number, score), ...]]`."""

    name = ""
    marker = ""  # a file or folder that exists once the index is built

    def __init__(self, params: dict | None = None):
        self.params = dict(params or {})
        self.doc_ids: list[str] = []
        self.vocab: dict[str, int] = {}
        self.empty_queries = 0
        self.release = False

    def build(self, doc_ids: list[str], doc_vectors, folder: str | Path, vocab: dict[str, int] | None = None,
              release: bool = False) -> "Engine":
        """`doc_vectors`: dicts, or CSR with `vocab` (token -> its column, as `sparse.load_csr` gives). `release`: an
        engine that copies the documents into its own structures empties their CSR (a canonical float32 `doc_vectors`
        itself, see `as_csr`) once it has read it, so that the corpus is not held twice while it builds (index.py)."""
        self.release = release
        n_vectors = doc_vectors.shape[0] if sp.issparse(doc_vectors) else len(doc_vectors)
        if len(doc_ids) != n_vectors:
            raise InputError(f"{len(doc_ids)} doc ids for {n_vectors} vectors")
        order = docid_order(doc_ids)  # doc number order == docid order
        docs, self.vocab = as_csr(doc_vectors, vocab)
        self.doc_ids = list(doc_ids) if order is None else list(map(doc_ids.__getitem__, order))  # no int list
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._build(docs, order, folder)  # the engine reads the rows in docid order, chunk by chunk
        atomic_write_json(folder / "ids.json", self.doc_ids)
        tokens = [""] * len(self.vocab)
        for tok, col in self.vocab.items():
            tokens[col] = tok
        atomic_write_json(folder / "vocab.json", tokens)
        # the counts let `open` notice files that lost documents yet still load
        atomic_write_json(folder / "engine.json", {"engine": self.name, "params": self.params,
                                                   "docs": len(self.doc_ids), "vocab": len(self.vocab),
                                                   "stored": self._stored()})
        return self

    @classmethod
    def found(cls, folder: Path) -> bool:
        """Whether `folder` holds this engine's data (else `load` says the index is not found)."""
        return (folder / cls.marker).exists()

    def open(self, folder: str | Path) -> "Engine":
        folder = Path(folder)
        info = read_info(folder, [self.name])
        self.doc_ids = read_strings(folder / "ids.json")
        self.vocab = {tok: col for col, tok in enumerate(read_strings(folder / "vocab.json"))}
        for key, have in (("docs", len(self.doc_ids)), ("vocab", len(self.vocab))):
            if key in info and info[key] != have:
                name = "ids.json" if key == "docs" else "vocab.json"
                raise InputError(f"{folder / name}: {have} entries, engine.json records {info[key]}; {REBUILD}")
        data = self.data_path(folder)
        try:
            self._open(folder)
            stored = self._stored()
        except (KeyboardInterrupt, SystemExit, InputError, EngineUnavailable):
            raise
        except BaseException as err:  # pyo3 engines raise PanicException (a BaseException) on some corrupt files
            raise InputError(f"{data}: corrupt index file ({one_line(err)}); {REBUILD}") from None
        if "stored" in info and stored != info["stored"]:
            raise InputError(f"{data}: holds {stored} vectors, engine.json records {info['stored']}; {REBUILD}")
        return self

    def data_path(self, folder: Path) -> str:
        """Where the engine keeps its own data, for messages."""
        return str(folder / self.marker)

    def search(self, query_vectors, topk: int, threads: int = 1) -> list[list[tuple[str, float]]]:
        if topk <= 0 or threads <= 0:
            raise ValueError(f"topk and threads must be > 0, got {topk}, {threads}")
        queries, _ = as_csr(query_vectors, self.vocab)
        nonempty = np.flatnonzero(np.diff(queries.indptr))
        self.empty_queries = queries.shape[0] - len(nonempty)
        if self.empty_queries:
            logger.warning("%d of %d queries have no token known to the index: no results for them",
                           self.empty_queries, queries.shape[0])
        run: list[list[tuple[str, float]]] = [[] for _ in range(queries.shape[0])]
        if len(nonempty):
            hits = self._search(queries[nonempty], topk, threads)
            for row, row_hits in zip(nonempty, hits):
                row_hits = sorted(((float(s), int(d)) for d, s in row_hits), key=lambda h: (-h[0], h[1]))[:topk]
                run[row] = [(self.doc_ids[d], s) for s, d in row_hits]
        return run

    def close(self) -> None:
        """Release files and servers (call before moving the index folder)."""

    def _build(self, docs, order: np.ndarray | None, folder: Path) -> None:
        """Store `docs` (CSR [n_docs, vocab] in input order); doc number i is row `order[i]` (`ordered_chunks`)."""
        raise NotImplementedError

    def _open(self, folder: Path) -> None:
        raise NotImplementedError

    def _stored(self) -> int:
        """Number of vectors the engine's own data holds (qdrant-edge and milvus leave empty documents out)."""
        raise NotImplementedError

    def _search(self, queries, topk: int, threads: int) -> list:
        raise NotImplementedError


def one_line(err: BaseException) -> str:
    """An exception's message on one line, at most 300 characters, for an error that names a file."""
    return " ".join(str(err).split())[:300] or type(err).__name__


def read_strings(path: Path) -> list[str]:
    """ids.json / vocab.json: a JSON list of strings."""
    value = read_json(path, REBUILD)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}: corrupt index file (expected a JSON list of strings); {REBUILD}")
    return value


def read_info(folder: str | Path, names) -> dict:
    """engine.json of an index folder: {"engine": one of `names`, "params": build params, "docs", "vocab",
    "stored": counts} (indexes built before the counts existed lack them)."""
    path = Path(folder) / "engine.json"
    if not path.is_file():
        raise InputError(f"index not found: {folder} (run index.py first)")
    info = read_json(path, REBUILD)
    if not isinstance(info, dict) or not isinstance(info.get("params"), dict) or info.get("engine") not in names:
        engine = info.get("engine") if isinstance(info, dict) else None
        raise InputError(f"{path}: corrupt index file (expected {{'engine': one of {sorted(names)}, "
                         f"'params': {{...}}}}, got engine {engine!r}); {REBUILD}")
    return info


def folder_size(folder: Path) -> int:
    """An index's bytes allocated on disk (like `du`): qdrant preallocates sparse 32 MiB files that hold far less."""
    return sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())
