"""`prune` and `quantize` (what encode.py turns each batch into): equal to their plain definitions, element for
element, on rows with ties, rows with nothing kept, thresholds and top-k. The JSON rows encode.py writes: the same
lines whether dumped at once or through `vector_rows` and `VectorWriters`' worker processes."""
import json
import math

import numpy as np
import pytest
import torch

from lsr_core.sparse import (ShardWriter, doc_freqs, flops_estimate, flops_from_freqs, prune, quantize,
                             read_doc_freqs, to_vector, vector_rows, write_doc_freqs)
from lsr_core.utils import InputError
from lsr_core.writers import VectorWriters


def reference_prune(reps, topk, threshold):
    """Keep weights > threshold, of those the topk largest, sorted descending: every column of the row leaves the
    device, one row at a time."""
    rows = []
    for row in reps.float():
        values, ids = row.topk(topk) if 0 < topk < len(row) else row.sort(descending=True)
        keep = values > threshold
        rows.append((ids[keep].numpy(), values[keep].numpy()))
    return rows


@pytest.mark.parametrize("topk,threshold", [(0, 0.0), (0, 0.5), (3, 0.0), (50, 0.2), (0, 10.0)])
def test_prune_equals_its_definition(topk, threshold):
    generator = torch.Generator().manual_seed(0)
    reps = torch.rand(6, 40, generator=generator) * (torch.rand(6, 40, generator=generator) < 0.2)
    reps[1] = 0.0  # nothing to keep
    reps[2, :5] = 0.75  # ties
    reps[3] = torch.rand(40, generator=generator)  # everything kept at threshold 0
    ours = prune(reps, topk, threshold)
    expected = reference_prune(reps, topk, threshold)
    assert len(ours) == len(expected) == 6
    for (ids, weights), (ref_ids, ref_weights) in zip(ours, expected):
        assert ids.dtype == np.int64 and weights.dtype == np.float32
        np.testing.assert_array_equal(weights, ref_weights)
        assert sorted(ids.tolist()) == sorted(ref_ids.tolist()) if len(set(weights.tolist())) < len(weights) \
            else ids.tolist() == ref_ids.tolist()
    assert len(ours[1][0]) == 0 and (threshold > 0 or topk or len(ours[3][0]) == 40)
    assert prune(reps[:0], topk, threshold) == []


def test_quantize_and_vectors_equal_their_definition():
    weights = np.random.default_rng(0).random(500).astype(np.float32) * 3
    weights[:10] = 0.0
    for scale in (0.0, 100.0):
        expected = [int(v) for v in np.rint(weights * scale)] if scale else [round(float(v), 5) for v in weights]
        got = quantize(weights, scale)
        assert got == expected and all(type(a) is type(b) for a, b in zip(got, expected))
    vocab = [f"t{i}" for i in range(500)]
    vector = to_vector(np.arange(500), weights, vocab, 100.0)
    assert len(vector) == sum(1 for v in weights if round(float(v) * 100) != 0) and "t0" not in vector
    with pytest.raises(ValueError, match="not finite"):
        quantize(np.array([1.0, math.inf], dtype=np.float32), 100.0)


def _batches(n: int):
    generator = torch.Generator().manual_seed(n)
    return [prune(torch.rand(5, 30, generator=generator) * (torch.rand(5, 30, generator=generator) < 0.3))
            for _ in range(n)]


VOCAB = [f"tok{i}" for i in range(28)] + ["café", "naïve"]  # non-ASCII tokens stay as they are (ensure_ascii off)


def test_shard_rows_from_dumped_vectors_equal_rows_from_dicts(tmp_path):
    (pruned,) = _batches(1)
    by_dict, by_json = ShardWriter(tmp_path / "a.jsonl.gz"), ShardWriter(tmp_path / "b.jsonl.gz")
    for i, (row, (text, nnz)) in enumerate(zip(pruned, vector_rows(pruned, VOCAB, 0.0))):
        by_dict.add(f"d{i}é", to_vector(*row, VOCAB, 0.0))
        by_json.add_json(f"d{i}é", text, nnz)
    assert by_dict.rows == by_json.rows and by_dict.nnz == by_json.nnz
    assert json.loads(by_json.rows[0])["id"] == "d0é"


@pytest.mark.parametrize("processes", [0, 2])
def test_vector_writers_give_each_batch_its_rows_in_order(processes):
    batches = _batches(7)
    got = []
    with VectorWriters(processes, VOCAB, 100.0) as writers:
        for key, pruned in enumerate(batches):
            done = writers.submit(key, pruned)
            assert len(writers.pending) <= 2 * processes  # at most 2 x processes batches wait
            got += done
        got += writers.drain()
    assert [key for key, _ in got] == list(range(7))
    assert [rows for _, rows in got] == [vector_rows(pruned, VOCAB, 100.0) for pruned in batches]


def test_vector_writers_start_before_the_vocabulary_is_known():
    """encode.py makes the writers before loading the model (their processes start meanwhile), then gives them the
    model's vocabulary: each process takes its own copy with its first batch."""
    batches = _batches(6)
    with VectorWriters(2) as writers:
        with pytest.raises(RuntimeError, match="before start"):
            writers.submit(0, batches[0])
        writers.start(VOCAB, 100.0)
        got = [rows for pruned in batches for _, rows in writers.submit(None, pruned)]
        got += [rows for _, rows in writers.drain()]
    assert got == [vector_rows(pruned, VOCAB, 100.0) for pruned in batches]


def test_vector_writers_take_a_new_vocabulary_after_a_drain():
    """start() again: every process drops the vocabulary it holds for the new one, whichever batches it takes."""
    batches = _batches(8)
    upper = [tok.upper() for tok in VOCAB]
    with VectorWriters(2, VOCAB, 100.0) as writers:
        first = [rows for pruned in batches for _, rows in writers.submit(None, pruned)]
        first += [rows for _, rows in writers.drain()]
        writers.start(upper, 0.0)
        second = [rows for pruned in batches for _, rows in writers.submit(None, pruned)]
        second += [rows for _, rows in writers.drain()]
    assert first == [vector_rows(pruned, VOCAB, 100.0) for pruned in batches]
    assert second == [vector_rows(pruned, upper, 0.0) for pruned in batches]


def test_a_writer_process_error_is_raised_with_its_batch():
    (pruned,) = _batches(1)
    pruned[2][1][0] = float("nan")  # cannot be quantised
    with VectorWriters(1, VOCAB, 100.0) as writers:
        writers.submit("bad", pruned)
        with pytest.raises(ValueError, match="not finite"):
            writers.drain()


@pytest.mark.parametrize("threads,per_piece", [(1, 4096), (3, 7), (2, 1)])
def test_shards_compressed_in_pieces_read_back_as_one_gzip_stream(tmp_path, threads, per_piece):
    """write_gzip_lines: pieces deflated apart on several threads join into one member that gzip (Python's, and
    the gzip tool where installed) reads back line for line; no lines, and a non-ASCII line, too."""
    import gzip
    import shutil
    import subprocess

    from lsr_core.utils import write_gzip_lines

    lines = [json.dumps({"id": f"d{i}", "vector": {f"t{j}é": j / 7 for j in range(i % 13)}}, ensure_ascii=False)
             for i in range(500)]
    for rows in (lines, []):
        path = tmp_path / f"part-{threads}-{per_piece}-{len(rows)}.jsonl.gz"
        write_gzip_lines(path, rows, threads=threads, lines_per_piece=per_piece)
        assert gzip.open(path, "rt", encoding="utf-8").read().splitlines() == rows
        if shutil.which("gzip"):
            tested = subprocess.run(["gzip", "-t", str(path)], capture_output=True, text=True)
            assert tested.returncode == 0, tested.stderr
    assert list(tmp_path.glob(".*.tmp")) == []


def reference_flops(doc_vectors, query_vectors):
    """sum over query terms t of (share of queries holding t) x (share of documents holding t), from the vectors."""
    if not doc_vectors or not query_vectors:
        return 0.0
    return float(sum(sum(t in q for q in query_vectors) / len(query_vectors)
                     * sum(t in d for d in doc_vectors) / len(doc_vectors)
                     for t in dict.fromkeys(t for q in query_vectors for t in q)))


@pytest.mark.parametrize("seed", range(4))
def test_flops_from_saved_frequencies_equal_flops_from_the_vectors(tmp_path, seed):
    rng = np.random.default_rng(seed)
    tokens = [f"t{i}" for i in range(60)] + ["é", "##s"]

    def vectors(n, most):
        return [{str(t): float(rng.random()) for t in rng.choice(tokens, rng.integers(0, most), replace=False)}
                for _ in range(n)]

    docs, queries = vectors(int(rng.integers(1, 200)), 40), vectors(int(rng.integers(1, 50)), 10)
    write_doc_freqs(tmp_path, *doc_freqs(docs))
    n_docs, df = read_doc_freqs(tmp_path / "doc_freqs.json.gz")
    assert (n_docs, df) == doc_freqs(docs) and n_docs == len(docs)
    assert flops_from_freqs(n_docs, df, queries) == flops_estimate(docs, queries)  # one formula, bit for bit
    assert flops_estimate(docs, queries) == pytest.approx(reference_flops(docs, queries), rel=1e-12, abs=1e-15)
    assert flops_from_freqs(0, {}, queries) == flops_from_freqs(n_docs, df, []) == 0.0


@pytest.mark.parametrize("content,message", [
    (b'{"n_docs": 2, "df": {"a": 3}}', ": expected"), (b'{"n_docs": "2", "df": {}}', ": expected"),
    (b'{"n_docs": 2, "df": {"a": true}}', ": expected"), (b"[1]", ": expected"), (b'{"n_docs": 2', ":1: invalid JSON")])
def test_a_damaged_doc_freqs_file_is_one_error_naming_it(tmp_path, content, message):
    import gzip

    path = tmp_path / "doc_freqs.json.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(InputError, match=rf"^{path}{message}.*re-encode the corpus, or run: python -m "
                                         rf"lsr_core.sparse doc-freqs {tmp_path}$"):
        read_doc_freqs(path)
