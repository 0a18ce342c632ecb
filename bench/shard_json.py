"""Shard line parsing and writing speed: the standard library's json against orjson, on lines as encode.py writes
them (`sparse.vector_rows`: ~120 terms a document, weights rounded to 5 decimals, SPLADE-like token strings).

    .venv/bin/python bench/shard_json.py --docs 50000

Reading: `json.loads` and `orjson.loads` alone over the lines, then `sparse.read_vectors` and `sparse.load_csr`
(index.py's reader) end to end (gzip, UTF-8, the id and weight checks) over a shard of them, with `utils.read_jsonl`
parsing by json (as before) and by orjson (now). Writing: `json.dumps(vector, ensure_ascii=False)` (what
`vector_rows` does) and `orjson.dumps(vector)`, and whether their bytes are the same. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core import utils  # noqa: E402
from lsr_core.sparse import load_csr, read_vectors, shard_name, vector_rows  # noqa: E402
from lsr_core.utils import write_gzip_lines  # noqa: E402


def shard_lines(docs: int, terms: int, vocab: int, seed: int = 0) -> list[str]:
    """encode.py's lines for `docs` random documents of about `terms` tokens (ids skewed towards frequent tokens)."""
    rng = np.random.default_rng(seed)
    words = [f"##w{j}" if j % 3 == 0 else f"word{j}" for j in range(vocab)]
    pruned = []
    for _ in range(docs):
        ids = np.unique((rng.power(0.3, int(terms * 1.07)) * vocab).astype(np.int64))
        weights = rng.uniform(0.01, 3.0, ids.size).astype(np.float32)
        weights[rng.random(ids.size) < 0.01] = 5e-5  # a few small weights: written as 5e-05 by json, 0.00005 by orjson
        order = np.argsort(-weights)
        pruned.append((ids[order], weights[order]))
    rows = vector_rows(pruned, words)
    return [f'{{"id": "d{i}", "vector": {vector_json}}}' for i, (vector_json, _) in enumerate(rows)]


def rate(fn, items) -> float:
    """Items a second of `fn` over `items` (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=50000)
    parser.add_argument("--terms", type=int, default=120)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--tiny", action="store_true", help="300 lines (checks that it runs)")
    parser.add_argument("--out", help="append the result to this JSON lines file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.docs = 300
    lines = shard_lines(args.docs, args.terms, args.vocab)
    vectors = [json.loads(line)["vector"] for line in lines]
    assert [orjson.loads(line) for line in lines[:1000]] == [json.loads(line) for line in lines[:1000]]
    result = {"docs": args.docs, "nnz_mean": round(sum(map(len, vectors)) / len(vectors), 1),
              "json.loads": rate(json.loads, lines), "orjson.loads": rate(orjson.loads, lines)}
    with tempfile.TemporaryDirectory() as folder:
        write_gzip_lines(Path(folder) / shard_name(0), lines)
        for parser in ("json", "orjson"):  # json: what utils.read_jsonl parsed with before
            utils.orjson = orjson if parser == "orjson" else types.SimpleNamespace(
                loads=json.loads, JSONDecodeError=json.JSONDecodeError)
            result[f"read_vectors ({parser})"] = rate(lambda f: sum(1 for _ in read_vectors(f)), [folder]) * args.docs
            result[f"load_csr ({parser})"] = rate(load_csr, [folder]) * args.docs
        utils.orjson = orjson
    result["json.dumps"] = rate(lambda v: json.dumps(v, ensure_ascii=False), vectors)
    result["orjson.dumps"] = rate(orjson.dumps, vectors)
    same = [orjson.dumps(v).decode() == json.dumps(v, ensure_ascii=False) for v in vectors]
    result["dumps_identical"] = f"{sum(same)}/{len(same)}"
    result["dumps_identical_without_spaces"] = sum(
        orjson.dumps(v).decode() == json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in vectors)
    result = {k: round(v) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    main()
