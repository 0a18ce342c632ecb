"""Encode a corpus or a query set into sparse vectors (DESIGN §5).

    python encode.py --cfg runs/demo/config.yaml --encode.input=data/wiki/corpus.jsonl --encode.kind=doc
    python encode.py --cfg runs/demo/config.yaml --encode.input=data/wiki/queries.test.jsonl --encode.kind=query
    accelerate launch --num_processes 4 encode.py --cfg ... --encode.input=...      # one shard per process

Model: `encode.model`; else `<output_dir>/final` when train.py has written it, unless the command line gives another
`model.name_or_path` than the one it was trained from (then that model; a warning either way when they differ); else
`model.name_or_path`. The log, the summary line and meta.json name the model used.
Input: JSONL/TSV (id, text), a HF `datasets` file (.parquet/.arrow/.csv with id and text columns), or
`irds:<ir_datasets id>` (docs for kind=doc, queries for kind=query).
Output (default `<output_dir>/encode/corpus` or `.../queries`): `part-NNNNN.jsonl.gz` shards of
{"id", "vector": {token: weight}} and `meta.json` (model, config hash, vocab size and hash, count, empty, texts cut
at the max length, nnz mean/p99, quantisation scale, FLOPs estimate for queries when the encoded corpus is found).
The input is checked in one streaming pass, then each shard reads only its own texts (`InputTexts`: memory holds a
shard, not the corpus). Texts are split into shards by position; each process writes its own shards (no gather), and
a rerun skips shards that already exist, so a killed job resumes without duplicates or gaps. A rerun with other
settings (model, vocabulary, top-k, threshold, quantisation, max length, input, shard size) over existing shards is
refused, as recorded in `.encode/settings.json` when the run began, unless `encode.overwrite=true` removes them first.
Within a shard texts are encoded in length-sorted batches to avoid padding waste, then written in input order.
`encode.num_writers` worker processes turn the pruned vectors into JSON lines while the model runs on.
"""
from __future__ import annotations

import collections
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from lsr_core.config import ConfigError, load_config
from lsr_core.inputs import InputTexts, local_path, resolve_model_path
from lsr_core.modeling import build_model
from lsr_core.outputs import claim_output, counts_path, encode_settings, finish, shard_counts, unfinished
from lsr_core.pipeline import check_finite, encode_shard
from lsr_core.sparse import ShardWriter, id_to_token_list, prune, shard_name
from lsr_core.writers import VectorWriters
from lsr_core.utils import accelerator_kwargs, atomic_write_json, run_script

logger = get_logger(__name__)


def main(argv=None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    enc = cfg.encode
    if not enc.input:
        raise ConfigError("'encode.input' is empty: give the corpus or queries file")
    is_query = enc.kind == "query"
    out = Path(enc.output or cfg.output_dir / "encode" / ("queries" if is_query else "corpus"))
    model_path, why, doubtful = resolve_model_path(cfg)
    source = InputTexts(enc.input, enc.kind)  # checked in one pass; each shard reads its own rows

    accelerator = Accelerator(**accelerator_kwargs())
    per_shard = enc.shard_size or math.ceil(len(source) / accelerator.num_processes)
    n_shards = math.ceil(len(source) / per_shard)
    mine = unfinished(out, n_shards, accelerator)
    # the writer processes start first: their start-up (each imports torch, seconds on a GPU host) runs while the
    # model loads, instead of holding up the first batches
    with VectorWriters(enc.num_writers if mine or enc.overwrite else 0) as writers:
        cfg.model.name_or_path = local_path(model_path)
        (logger.warning if doubtful else logger.info)(f"model: {cfg.model.name_or_path} ({why})")
        if accelerator.device.type == "cuda" and cfg.model.dtype == "float32":
            cfg.model.dtype = "bfloat16"  # inference in bf16 on GPU; the head pools in float32
        lengths = {"max_query_len" if is_query else "max_doc_len": enc.max_length} if enc.max_length else None
        model = build_model(cfg.model, max_lengths=lengths).to(accelerator.device).eval()
        max_length = model.spec.max_query_len if is_query else model.spec.max_doc_len
        vocab = id_to_token_list(model.tokenizer)
        settings = encode_settings(cfg, model, vocab, len(source), per_shard, max_length)
        claim_output(accelerator, out, settings, enc.overwrite)
        mine = unfinished(out, n_shards, accelerator)  # encode.overwrite may have removed finished shards
        todo = sum(min(per_shard, len(source) - s * per_shard) for s in mine)
        writers.start(vocab, enc.quant_scale)
        logger.info(f"encoding {len(source)} {'queries' if is_query else 'documents'} with {cfg.model.name_or_path} "
                    f"into {n_shards} shard(s) on {accelerator.num_processes} process(es); this process: "
                    f"{len(mine)} to do", main_process_only=False)
        if enc.num_workers:  # workers hand batches over by shared-memory file name, not by descriptor: faster on
            torch.multiprocessing.set_sharing_strategy("file_system")  # GPU hosts (bench/RESULTS.md)
        started = time.time()
        progress = tqdm(total=todo, disable=not accelerator.is_main_process, desc="encode", unit="text")
        for shard in mine:
            lo, hi = shard * per_shard, min(len(source), (shard + 1) * per_shard)
            ids, texts = source.read(lo, hi)
            rows: list[tuple[str, int] | None] = [None] * (hi - lo)  # (vector JSON, nnz) in input order
            counts = collections.Counter(truncated=0)
            for positions, reps in encode_shard(model, texts, is_query, enc.batch_size, progress,
                                                enc.num_workers, counts=counts):
                pruned = prune(reps, enc.topk, enc.threshold)
                check_finite(reps, [ids[pos] for pos in positions], enc.input)
                _place(rows, writers.submit(positions, pruned))
            _place(rows, writers.drain())
            atomic_write_json(counts_path(out, shard), {"texts": hi - lo, **counts})
            writer = ShardWriter(out / shard_name(shard))
            for rid, (vector_json, nnz) in zip(ids, rows):
                writer.add_json(rid, vector_json, nnz)
            writer.close()  # atomic: the shard exists only once complete
    progress.close()
    elapsed = time.time() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(cfg, out, source, n_shards, is_query, len(vocab), todo, elapsed, vocab=vocab,
               truncated=shard_counts(out, n_shards, "truncated"), max_length=max_length)
    return out


def _place(rows: list, done: list) -> None:
    """VectorWriters' finished batches -> their rows at their texts' positions in the shard."""
    for positions, batch_rows in done:
        for pos, row in zip(positions, batch_rows):
            rows[pos] = row


if __name__ == "__main__":
    run_script(main)
