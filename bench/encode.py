"""Encoding speed on the CPU: encode.py's path vs sentence-transformers' SparseEncoder, same weights, same texts.

    .venv/bin/python bench/encode.py --docs 2000 --threads 2 [--dtype bfloat16] [--rounds 2]

Weights: the real SPLADE-tiny (`pkg:cognition/model`). Texts: the first --docs Wikipedia lead sections of
data/wiki/corpus.jsonl (title + text, as encode.py reads them; run scripts/prepare_wiki.py first), truncated to
--max-length tokens. Before timing, both encoders' vectors are checked equal on the first 64 texts (max abs diff).
Ours: `pipeline.encode_shard` (length-sorted batches, memory-lean head) + `sparse.prune` (what encode.py runs per
batch, without the JSON writing). Peer: `SparseEncoder([MLMTransformer, SpladePooling("max")]).encode(...)` with
the same batch size, returning sparse tensors. The two are timed alternately for --rounds rounds (the machine may be
shared) and the best round of each is reported, as docs/s and the ratio ours/peer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lsr_core.pipeline import encode_shard  # noqa: E402
from lsr_core.config import ModelConfig  # noqa: E402
from lsr_core.backbones import resolve_model_path  # noqa: E402
from lsr_core.modeling import build_model  # noqa: E402
from lsr_core.sparse import prune  # noqa: E402
from lsr_core.utils import read_texts  # noqa: E402


class _Quiet:
    def update(self, n):
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--corpus", default="data/wiki/corpus.jsonl")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    texts = [text for _, text in zip(range(args.docs), (t for _, t in read_texts(args.corpus, allow_empty=True)))]
    path = resolve_model_path("pkg:cognition/model")
    dtype = getattr(torch, args.dtype)

    # special_tokens=keep: [CLS]/[SEP] pool, as in the sentence-transformers peer, so both compute the same vectors
    ours = build_model(ModelConfig(name_or_path=path, max_doc_len=args.max_length, dtype=args.dtype,
                                   special_tokens="keep")).eval()
    from sentence_transformers.sparse_encoder import SparseEncoder
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    peer = SparseEncoder(modules=[MLMTransformer(path, max_seq_length=args.max_length), SpladePooling("max")],
                         device="cpu", model_kwargs={"dtype": dtype})

    def run_ours(part):
        nnz = 0
        for _, reps in encode_shard(ours, part, False, args.batch, _Quiet()):
            nnz += sum(len(ids) for ids, _ in prune(reps))
        return nnz

    def run_peer(part):
        return int(peer.encode(part, batch_size=args.batch, convert_to_sparse_tensor=True)._nnz())

    check = texts[:64]
    with torch.inference_mode():
        mine = torch.cat([r for _, r in sorted(((p, r) for ps, reps in encode_shard(ours, check, False, 64, _Quiet())
                                                for p, r in zip(ps, reps)), key=lambda x: x[0])]).view(len(check), -1)
    theirs = peer.encode(check, batch_size=64, convert_to_sparse_tensor=False).float()
    diff = float((mine.float() - theirs).abs().max())
    run_ours(texts[:64]), run_peer(texts[:64])  # warm-up
    best = {"ours": float("inf"), "sentence-transformers": float("inf")}
    nnz = {}
    for _ in range(args.rounds):
        for name, fn in (("ours", run_ours), ("sentence-transformers", run_peer)):
            began = time.perf_counter()
            with torch.inference_mode():
                nnz[name] = fn(texts)
            best[name] = min(best[name], time.perf_counter() - began)
    rate = {name: len(texts) / seconds for name, seconds in best.items()}
    print(f"SPLADE-tiny, {len(texts)} Wikipedia docs (max {args.max_length} tokens), batch {args.batch}, "
          f"{args.dtype}, {args.threads} thread(s); max |ours - peer| on 64 docs = {diff:.2e}\n")
    print("| encoder | docs/s | seconds | mean nnz | vs peer |\n|---|---:|---:|---:|---:|")
    for name in ("ours", "sentence-transformers"):
        print(f"| {name} | {rate[name]:.1f} | {best[name]:.1f} | {nnz[name] / len(texts):.1f} | "
              f"{rate[name] / rate['sentence-transformers']:.2f}x |")
    print(json.dumps({"docs_per_s": rate, "max_abs_diff": diff, "args": vars(args)}))


if __name__ == "__main__":
    main()
