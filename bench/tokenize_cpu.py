"""Tokenisation throughput on the CPU, one process: `SparseModel.tokenize` (the tokenizer pads, masks on whole
tensors) against the row-by-row path it replaced (`tokenizing.tokenize_rows`, kept for echo) and the tokenizer call alone; for
the encoder also a packing model's worker batch (`host_batch(..., pack=True)` + `to_wire`: straight from the Rust
tokenizer) against packing the padded batch (`pack_batch(tokenize(...))`, before).

    python bench/tokenize_cpu.py --docs 8192 --out $OUT/tokenize_cpu.jsonl

At encoding time on a GPU the tokenizer workers feed the model (encode.num_workers), and with packed BERT-base the
model outruns them (bench/RESULTS.md, runs O and T), so their docs/s bound end-to-end encoding.
Corpus: encode_gpu's random words, 60-250 per document, in length-sorted batches of --batch; word-level tokenizers
(one word = one token) shaped as BERT's (vocabulary 30,522, [CLS] ... [SEP]) and Llama's (128,256, <s> ...).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.encode_gpu import make_texts, padded_first_host_batch  # noqa: E402
from lsr_core.config import ModelConfig  # noqa: E402
from lsr_core.pipeline import to_wire  # noqa: E402
from lsr_core import tokenizing  # noqa: E402
from lsr_core.modeling import build_model  # noqa: E402
from lsr_core.backbones import KINDS  # noqa: E402
from lsr_core.tiny import TOKENIZERS, make_model  # noqa: E402


def best_rate(fn, batches, n_docs, repeats) -> float:
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        for batch in batches:
            fn(batch)
        rates.append(n_docs / (time.perf_counter() - began))
    return max(rates)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.tiny:
        args.docs, args.batch, args.repeats = 64, 16, 1
    rows = []
    for arch, kind, vocab in (("bert", "encoder", 30522), ("llama", "decoder", 128256)):
        words = (64 if args.tiny else vocab) - len(TOKENIZERS[kind][0])
        # a tiny random backbone: only its tokenizer and options are used
        folder = make_model(tempfile.mkdtemp(prefix="bench_tok_"), arch, [f"w{i}" for i in range(words)])
        model = build_model(ModelConfig(name_or_path=str(folder)))
        tok = model.tokenizer
        texts = sorted(make_texts(args.docs, words, 60, 250), key=len)
        batches = [texts[s:s + args.batch] for s in range(0, len(texts), args.batch)]
        systems = {"tokenize (tensor masks)": lambda b: model.tokenize(b, is_query=False),
                   "row by row (before)": lambda b: tokenizing.tokenize_rows(model.spec, model.tokenizer, b, False, model.pad_multiple),
                   "tokenizer call alone": lambda b: tok(b, truncation=True, max_length=256,
                                                         return_special_tokens_mask=True)}
        if KINDS[kind].packs:  # a packing encoder's worker: the batch packed and made one tensor (encode.py's job)
            systems.update({
                "packed, padded first (before)": lambda b: to_wire(padded_first_host_batch(model, b, False, True)),
                "packed from the Rust tokenizer": lambda b: to_wire(model.host_batch(b, is_query=False, pack=True))})
        rates = {name: best_rate(fn, batches, len(texts), args.repeats) for name, fn in systems.items()}
        for name, rate in rates.items():
            before = "packed, padded first (before)" if name.startswith("packed") else "row by row (before)"
            rows.append({"kind": kind, "system": name, "docs": args.docs, "batch": args.batch, "docs_per_s": rate,
                         "vs_before": rate / rates[before]})
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("| tokenizer | system | docs/s | vs before |\n|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['system']} | {r['docs_per_s']:.0f} | {r['vs_before']:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
