"""Sparse vectors: the one top-k/threshold/quantise function, and the one shard writer/reader.

On disk (DESIGN §5), compatible with Anserini's JsonVectorCollection and Seismic's JSON input:
    <folder>/part-00000.jsonl.gz   one object a line: {"id": "<docid>", "vector": {"<token>": weight, ...}}
    <folder>/meta.json             model, config hash, vocab size, count, empty count, nnz mean/p99, scale, FLOPs
    <folder>/doc_freqs.json.gz     a corpus's {"n_docs": N, "df": {token: documents holding it}}: queries' FLOPs
Tokens are the tokenizer's surface strings; weights are floats, or ints `round(w * scale)` when quantised.
Empty vectors are written as `{}` and counted in meta.json, never replaced by a placeholder token.
A shard is complete once its file exists (written atomically); a `.tmp` is never read.
"""
from __future__ import annotations

import collections
import hashlib
import json
import math
from pathlib import Path
from typing import Iterator

import numpy as np

from lsr_core.utils import InputError, atomic_write_json, check_id, read_json, read_jsonl

SHARD_PATTERN = "part-*.jsonl.gz"


def shard_name(index: int) -> str:
    return f"part-{index:05d}.jsonl.gz"


def prune(reps, topk: int = 0, threshold: float = 0.0):
    """Sparsify a batch of dense vocabulary vectors (torch, not imported here: index.py and search.py load none).

    reps: [batch, vocab] non-negative. Keeps weights > threshold, and of those the `topk` largest (0 = all).
    Returns a list (one per row) of (token_ids int64 array, weights float32 array), ids sorted by weight descending.
    """
    reps = reps.detach().float()
    if topk and topk < reps.shape[1]:
        values, ids = reps.topk(topk, dim=1)
    else:
        values, ids = reps.sort(dim=1, descending=True)
    keep = values > threshold
    # only the columns up to the last kept weight of any row leave the device, not [batch, vocab]: ~100 MB per 256
    # documents at BERT's vocabulary
    columns = kept_columns(keep)
    values, ids, keep = (t[:, :columns].cpu().numpy() for t in (values, ids, keep))
    return [(ids[i][keep[i]], values[i][keep[i]]) for i in range(reps.shape[0])]


def kept_columns(keep) -> int:
    """How many leading columns of `keep` [batch, n] hold every True (with rows sorted by weight, the kept ones are
    a prefix; any pattern is covered)."""
    return int(keep.any(0).cumsum(0).argmax()) + 1 if keep.numel() else 0


def quantize(weights: np.ndarray, scale: float) -> list:
    """Float weights -> JSON values: ints round(w*scale) when scale > 0 (zeros dropped by `to_vector`)."""
    if scale > 0:
        scaled = np.rint(weights * scale)
        if not np.isfinite(scaled).all():
            raise ValueError(f"weights that are not finite cannot be quantised: {weights[~np.isfinite(scaled)][:5]}")
        return scaled.astype(np.int64).tolist()
    return [round(v, 5) for v in weights.tolist()]  # Python floats: faster than rounding numpy scalars


def to_vector(token_ids: np.ndarray, weights: np.ndarray, vocab: list[str], scale: float = 0.0) -> dict:
    """ids + weights -> {token: weight}; weights that quantise to 0 are dropped."""
    return {vocab[t]: w for t, w in zip(token_ids.tolist(), quantize(weights, scale)) if w}


def vector_rows(pruned: list, vocab: list[str], scale: float = 0.0) -> list[tuple[str, int]]:
    """`prune`'s rows -> (the JSON text of each {token: weight}, its number of terms): what ShardWriter.add_json
    takes. Python work per term (~0.3 us to round, ~0.5 us to dump on a 2-core sandbox): `VectorWriters` runs it in
    worker processes."""
    rows = []
    for token_ids, weights in pruned:
        vector = to_vector(token_ids, weights, vocab, scale)
        rows.append((json.dumps(vector, ensure_ascii=False), len(vector)))
    return rows


def id_to_token_list(tokenizer) -> list[str]:
    """Surface string of every vocabulary id (index = id). Duplicate strings get a `##<id>` suffix so they stay
    distinguishable after the round trip through text."""
    vocab_size = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
    tokens = [f"[unused{i}]" for i in range(vocab_size)]
    for tok, idx in tokenizer.get_vocab().items():
        tokens[idx] = tok
    seen: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in seen:
            tokens[i] = f"{tok}##{i}"
        else:
            seen[tok] = i
    return tokens


def vocab_hash(vocab: list[str]) -> str:
    """First 16 hex digits of sha256 over the vocabulary (`id_to_token_list`) joined by newlines: recorded in
    meta.json, so that vectors over different vocabularies are never matched against each other."""
    return hashlib.sha256("\n".join(vocab).encode("utf-8")).hexdigest()[:16]


class ShardWriter:
    """Collect vectors for one shard; `close()` writes the shard atomically and returns its stats."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[str] = []
        self.nnz: list[int] = []

    def add(self, rid: str, vector: dict) -> None:
        self.add_json(rid, json.dumps(vector, ensure_ascii=False), len(vector))

    def add_json(self, rid: str, vector_json: str, nnz: int) -> None:
        """A vector already dumped (`vector_rows`): the same line as `add` gives, {"id": ..., "vector": ...}."""
        self.rows.append(f'{{"id": {json.dumps(rid, ensure_ascii=False)}, "vector": {vector_json}}}')
        self.nnz.append(nnz)

    def close(self) -> dict:
        from lsr_core.utils import atomic_write_text, write_gzip_lines

        if self.path.suffix == ".gz":  # shards: compressed on every core
            write_gzip_lines(self.path, self.rows)
        else:
            atomic_write_text(self.path, "".join(row + "\n" for row in self.rows))
        return {"count": len(self.rows), "nnz": self.nnz}


def list_shards(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: encoded folder not found")
    shards = sorted(folder.glob(SHARD_PATTERN))
    if not shards:
        raise InputError(f"{folder}: no {SHARD_PATTERN} shards")
    return shards


_WEIGHT_TYPES = (float, int)  # not bool: JSON true/false are no weights
_WEIGHT_MAX = float(np.finfo(np.float32).max)  # engines store float32: a larger weight would become inf


def _vector_lines(folder_or_file: str | Path) -> Iterator[tuple[Path, int, str, dict]]:
    """(file, line, id, vector) of every line of a shard folder or a single .jsonl(.gz) file, checked."""
    path = Path(folder_or_file)
    files = list_shards(path) if path.is_dir() else [path]
    for file in files:
        for lineno, obj in read_jsonl(file):  # bad gzip, UTF-8 or JSON: InputError naming file:line
            vector = obj.get("vector")
            if "id" not in obj or not isinstance(vector, dict):
                raise InputError(f"{file}:{lineno}: expected {{'id': ..., 'vector': {{token: weight}}}}")
            rid = check_id(file, lineno, obj["id"])
            # one pass over the weights, ~60 ns a term; Python's json reads NaN and Infinity, so check after it
            for token, weight in vector.items():
                if type(weight) not in _WEIGHT_TYPES or not 0 <= weight <= _WEIGHT_MAX:
                    raise InputError(f"{file}:{lineno}: token {token!r} has weight {json.dumps(weight)} (weights "
                                     f"must be finite numbers >= 0, at most float32's {_WEIGHT_MAX:.3g})")
            yield file, lineno, rid, vector


def read_vectors(folder_or_file: str | Path) -> Iterator[tuple[str, dict]]:
    """Yield (id, {token: weight}) from a shard folder or a single .jsonl(.gz) file.

    A corrupt shard (bad gzip, bad UTF-8, bad JSON, wrong schema), an empty id or one with whitespace, and a weight
    that is not a finite number >= 0 (NaN, Infinity, negative, a string, true/false, null) raise InputError naming
    file:line.
    """
    for _, _, rid, vector in _vector_lines(folder_or_file):
        yield rid, vector


def _unique_vectors(folder_or_file: str | Path) -> Iterator[tuple[str, dict]]:
    """`_vector_lines`' (id, vector); a duplicate id is an error naming file:line."""
    seen = set()
    for file, lineno, rid, vec in _vector_lines(folder_or_file):
        if rid in seen:
            raise InputError(f"{file}:{lineno}: duplicate id '{rid}'")
        seen.add(rid)
        yield rid, vec


def load_vectors(folder_or_file: str | Path) -> tuple[list[str], list[dict]]:
    """All vectors; duplicate ids are an error."""
    ids, vecs = [], []
    for rid, vec in _unique_vectors(folder_or_file):
        ids.append(rid)
        vecs.append(vec)
    return ids, vecs


def load_csr(folder_or_file: str | Path, chunk: int = 1000, nnz_hint: int = 0):
    """`to_csr(load_vectors(...))` as (ids, CSR float32, vocab), same checks, no dict kept per vector: every `chunk`
    lines go into int32/float32 arrays with room for `nnz_hint` terms (grown by half when full; unwritten pages cost
    no memory), so a corpus costs about its CSR bytes, not ~20x that in Python objects."""
    import scipy.sparse as sp

    ids, vocab, lengths, cols, weights, used = [], {}, [], [], [], 0
    indices, data = np.empty(max(nnz_hint, chunk), np.int32), np.empty(max(nnz_hint, chunk), np.float32)

    def flush():
        nonlocal indices, data, used
        if used + len(cols) > len(indices):
            room = max(used + len(cols), len(indices) * 3 // 2)
            indices, data = (np.concatenate([a[:used], np.empty(room - used, a.dtype)]) for a in (indices, data))
        indices[used:used + len(cols)] = cols
        data[used:used + len(cols)] = weights
        used += len(cols)
        del cols[:], weights[:]

    for rid, vec in _unique_vectors(folder_or_file):
        ids.append(rid)
        lengths.append(len(vec))
        cols.extend([vocab.setdefault(tok, len(vocab)) for tok in vec])  # a new token gets the next column
        weights.extend(vec.values())  # checked finite, >= 0 and within float32 by `_vector_lines`
        if len(ids) % chunk == 0:
            flush()
    flush()
    index_dtype = np.int32 if used < 2**31 - 1 else np.int64  # int32 indptr: scipy keeps the int32 indices as they are
    indptr = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(index_dtype)
    mat = sp.csr_matrix((data[:used], indices[:used], indptr), shape=(len(ids), max(len(vocab), 1)))
    mat.sort_indices()  # in place, row by row: the engines use it as it is (`engine_base.as_csr`), no sorted copy
    return ids, mat, vocab


def to_csr(vectors: list[dict], vocab: dict[str, int] | None = None):
    """List of {token: weight} -> (scipy CSR [n, |vocab|], vocab token->column). Unseen tokens (when `vocab` is
    given, e.g. query terms absent from the corpus) are dropped: they cannot match anything."""
    import scipy.sparse as sp

    grow = vocab is None
    vocab = {} if vocab is None else vocab
    indptr, indices, data = [0], [], []
    for vec in vectors:
        for tok, w in vec.items():
            col = vocab.get(tok)
            if col is None:
                if not grow:
                    continue
                col = vocab[tok] = len(vocab)
            indices.append(col)
            data.append(float(w))
        indptr.append(len(indices))
    with np.errstate(over="ignore"):  # a weight beyond float32 becomes inf, reported below
        data = np.asarray(data, np.float32)
    bad = np.flatnonzero(~(np.isfinite(data) & (data >= 0)))  # vectors not read by read_vectors are checked here
    if bad.size:
        row = int(np.searchsorted(indptr, bad[0], side="right")) - 1
        token = next(tok for tok, col in vocab.items() if col == indices[bad[0]])
        raise InputError(f"vector {row}: token {token!r} has weight {data[bad[0]]} in float32 (weights must be "
                         f"finite numbers >= 0)")
    mat = sp.csr_matrix((data, np.asarray(indices, np.int64), np.asarray(indptr, np.int64)),
                        shape=(len(vectors), max(len(vocab), 1)))
    return mat, vocab


def nnz_stats(nnz: list[int]) -> dict:
    arr = np.asarray(nnz, dtype=np.float64)
    if arr.size == 0:
        return {"count": 0, "empty": 0, "nnz_mean": 0.0, "nnz_p99": 0.0}
    return {"count": int(arr.size), "empty": int((arr == 0).sum()), "nnz_mean": float(arr.mean()),
            "nnz_p99": p99(arr)}


DOC_FREQS = "doc_freqs.json.gz"  # in an encoded corpus folder: {"n_docs": N, "df": {token: documents holding it}}


def doc_freqs(doc_vectors: list[dict]) -> tuple[int, collections.Counter]:
    """(number of documents, token -> how many of them hold it): all the FLOPs estimate needs of a corpus."""
    return len(doc_vectors), collections.Counter(t for v in doc_vectors for t in v)


def flops_from_freqs(n_docs: int, df: dict, query_vectors: list[dict]) -> float:
    """Expected multiplications per (query, doc) pair: sum_t p_q(t) * p_d(t) (Formal et al.), where p_d(t) =
    df[t] / n_docs and p_q(t) the share of queries holding t."""
    if not n_docs or not query_vectors:
        return 0.0
    qcount = collections.Counter(t for v in query_vectors for t in v)
    nq = len(query_vectors)
    return float(sum(c / nq * df.get(t, 0) / n_docs for t, c in qcount.items()))


def flops_estimate(doc_vectors: list[dict], query_vectors: list[dict]) -> float:
    """`flops_from_freqs` over the document frequencies of `doc_vectors`."""
    return flops_from_freqs(*doc_freqs(doc_vectors), query_vectors)


def write_doc_freqs(folder: str | Path, n_docs: int, df: dict) -> str:
    """Save `doc_freqs`' result in `folder` (atomically); returns the file's name, for meta.json's `doc_freqs`."""
    from lsr_core.utils import atomic_open

    with atomic_open(Path(folder) / DOC_FREQS) as f:
        json.dump({"n_docs": n_docs, "df": df}, f, ensure_ascii=False)
    return DOC_FREQS


def read_doc_freqs(path: str | Path) -> tuple[int, dict]:
    """(n_docs, df) from `write_doc_freqs`' file; a damaged one raises InputError naming it."""
    path = Path(path)
    fix = f"re-encode the corpus, or run: python -m lsr_core.sparse doc-freqs {path.parent}"
    obj = read_json(path, fix)
    n_docs, df = (obj.get("n_docs"), obj.get("df")) if isinstance(obj, dict) else (None, None)
    if type(n_docs) is not int or n_docs < 0 or not isinstance(df, dict) or \
            not all(type(c) is int and 0 < c <= n_docs for c in df.values()):
        raise InputError(f"{path}: expected {{\"n_docs\": count, \"df\": {{token: count of documents, 1 to "
                         f"n_docs}}}}; {fix}")
    return n_docs, df


def save_doc_freqs(folder: str | Path) -> None:
    """For a corpus encoded before document frequencies were saved: count them from its shards, write the file and
    record it in meta.json, so that encoding queries can estimate FLOPs without reading the corpus."""
    _, vectors, meta = load_encoded(folder)
    meta["doc_freqs"] = write_doc_freqs(folder, *doc_freqs(vectors))
    write_meta(folder, meta)


def write_meta(folder: str | Path, meta: dict) -> None:
    atomic_write_json(Path(folder) / "meta.json", meta)


def read_meta(folder: str | Path) -> dict:
    path = Path(folder) / "meta.json"
    if not path.is_file():
        return {}
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def check_encoded(folder: str | Path) -> dict:
    """meta.json of a finished shard folder (encode.py / zeroshot_prompt.py), once every shard it records is there.

    encode.py writes meta.json last, so a folder without it is unfinished; shards missing or not recorded mean a run
    was cut short or two runs mixed. The number of lines is checked against meta["count"] by `load_encoded`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: encoded folder not found (run encode.py first)")
    if not (folder / "meta.json").is_file():
        raise InputError(f"{folder}: no meta.json, so encode.py did not finish this folder; "
                         f"re-run encode.py to finish it")
    meta = read_json(folder / "meta.json", "re-run encode.py")
    for key in ("count", "shards"):
        if not isinstance(meta, dict) or not isinstance(meta.get(key), int) or meta[key] < 0:
            raise InputError(f"{folder / 'meta.json'}: field '{key}' missing or not a count; re-run encode.py")
    expected = [shard_name(i) for i in range(meta["shards"])]
    present = {p.name for p in folder.glob(SHARD_PATTERN)}
    missing = [name for name in expected if name not in present]
    if missing:
        raise InputError(f"{folder}: {len(expected) - len(missing)} of {len(expected)} shards "
                         f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} missing); meta.json records "
                         f"{len(expected)}; re-run encode.py to finish")
    extra = sorted(present - set(expected))
    if extra:
        raise InputError(f"{folder}: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''} not among the "
                         f"{len(expected)} shards meta.json records (output of two runs?); remove the folder and "
                         f"re-run encode.py")
    return meta


def load_encoded(folder: str | Path, csr: bool = False) -> tuple:
    """(ids, vectors, meta) of a finished shard folder: `check_encoded`, then every line, as many as meta.json says;
    `csr`: (ids, (CSR, vocab), meta) from `load_csr`, no dict per vector."""
    meta = check_encoded(folder)
    mean = meta.get("nnz_mean")  # room for the terms meta.json announces: no arrays grown and copied while reading
    hint = int(meta["count"] * mean * 1.01) if type(mean) in (int, float) and 0 <= mean <= 1e5 else 0
    ids, *vectors = load_csr(folder, nnz_hint=hint) if csr else load_vectors(folder)
    vectors = tuple(vectors) if csr else vectors[0]
    if len(ids) != meta["count"]:
        raise InputError(f"{folder}: {len(ids)} vectors in {meta['shards']} shard(s), but meta.json records "
                         f"{meta['count']} (a shard was cut short or replaced); re-run encode.py")
    return ids, vectors, meta


def p99(values) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 99)) if len(values) else math.nan


if __name__ == "__main__":
    import sys

    from lsr_core.utils import run_script

    def _main(argv=None):
        argv = sys.argv[1:] if argv is None else argv
        if len(argv) != 2 or argv[0] != "doc-freqs":
            sys.exit("usage: python -m lsr_core.sparse doc-freqs <encoded corpus folder>")
        save_doc_freqs(argv[1])
        print(f"wrote {Path(argv[1]) / DOC_FREQS}")

    run_script(_main)
