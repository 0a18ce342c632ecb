"""Encode a corpus or a query set into sparse vectors (DESIGN §5).

    python encode.py --cfg runs/demo/config.yaml --encode.input=data/wiki/corpus.jsonl --encode.kind=doc
    python encode.py --cfg runs/demo/config.yaml --encode.input=data/wiki/queries.test.jsonl --encode.kind=query
    accelerate launch --num_processes 4 encode.py --cfg ... --encode.input=...      # one shard per process

Model: `encode.model`, else `<output_dir>/final` when train.py has written it, else `model.name_or_path`.
Input: JSONL/TSV (id, text), a HF `datasets` file (.parquet/.arrow/.csv with id and text columns), or
`irds:<ir_datasets id>` (docs for kind=doc, queries for kind=query).
Output (default `<output_dir>/encode/corpus` or `.../queries`): `part-NNNNN.jsonl.gz` shards of
{"id", "vector": {token: weight}} and `meta.json` (model, config hash, vocab size, count, empty, nnz mean/p99,
quantisation scale, FLOPs estimate for queries when the encoded corpus is found).
Texts are split into shards by position; each process writes its own shards (no gather), and a rerun skips shards
that already exist, so a killed job resumes without duplicates or gaps. Within a shard texts are encoded in
length-sorted batches to avoid padding waste, then written in input order. `encode.num_writers` worker processes
turn the pruned vectors into JSON lines while the model runs on.
"""
from __future__ import annotations

import collections
import functools
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from lsr_core.config import ConfigError, config_hash, load_config, save_config
from lsr_core.modeling import build_model
from lsr_core.sparse import (ShardWriter, VectorWriters, flops_estimate, id_to_token_list, load_vectors, nnz_stats,
                             prune, read_vectors, shard_name, write_meta)
from lsr_core.utils import InputError, accelerator_kwargs, check_id, read_texts, run_script

logger = get_logger(__name__)


def read_input(path: str, kind: str) -> tuple[list[str], list[str]]:
    """(ids, texts) from any supported input; duplicate ids are an error, empty queries too (empty docs are kept).
    Ids must be non-empty and free of whitespace (`check_id`); errors name the file's line, or a table's row."""
    allow_empty = kind == "doc"
    from_table = path.startswith("irds:") or path.endswith((".parquet", ".arrow", ".csv"))  # rows, not lines
    if path.startswith("irds:"):
        import ir_datasets

        dataset = ir_datasets.load(path[len("irds:"):])
        rows = ((d.doc_id, getattr(d, "text", "") or getattr(d, "body", "")) for d in dataset.docs_iter()) \
            if kind == "doc" else ((q.query_id, q.text) for q in dataset.queries_iter())
    elif from_table:
        import datasets

        table = datasets.load_dataset(path.rsplit(".", 1)[-1], data_files=path, split="train")
        id_col = next((c for c in ("id", "_id", "docid", "qid") if c in table.column_names), None)
        if id_col is None or "text" not in table.column_names:
            raise InputError(f"{path}: needs an id column (id/_id/docid/qid) and a 'text' column, "
                             f"found {table.column_names}")
        rows = ((r[id_col], "" if r["text"] is None else r["text"]) for r in table)
    else:
        rows = read_texts(path, allow_empty=allow_empty)  # checks ids and texts, naming file:line
    ids, texts, seen = [], [], set()
    for row, (rid, text) in enumerate(rows, 1):
        if from_table:
            rid = check_id(path, row, rid, row=True)
            if not isinstance(text, str):
                raise InputError(f"{path}: row {row}: field 'text' must be a string, got {type(text).__name__}")
        if rid in seen:
            raise InputError(f"{path}: {f'row {row}: ' if from_table else ''}duplicate id '{rid}'")
        if not allow_empty and not text.strip():
            raise InputError(f"{path}: {f'row {row}: ' if from_table else ''}empty query text for id '{rid}'")
        seen.add(rid)
        ids.append(rid)
        texts.append(text)
    if not ids:
        raise InputError(f"{path}: no texts")
    return ids, texts


def resolve_model_path(cfg) -> str:
    if cfg.encode.model:
        return cfg.encode.model
    final = cfg.output_dir / "final"
    return str(final) if (final / "lsr_config.json").is_file() else cfg.model.name_or_path


def to_wire(batch: dict) -> tuple[torch.Tensor, tuple]:
    """A tokenized batch -> (one int64 tensor, its layout): a DataLoader worker then hands the main process one
    shared-memory segment per batch, not one per tensor (each is a file descriptor to receive in the process that
    drives the device; bench/RESULTS.md, host pipeline)."""
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    layout = tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items())
    others = {k: v for k, v in batch.items() if k not in tensors}
    return torch.cat([v.reshape(-1).long() for v in tensors.values()]), (layout, others)


def from_wire(flat: torch.Tensor, layout: tuple) -> dict:
    """`to_wire`'s inverse, on whichever device `flat` is (views of it, but dtypes other than int64)."""
    shapes, others = layout
    parts = flat.split([math.prod(shape) for _, shape, _ in shapes])
    return {**{k: part.view(shape).to(dtype) for (k, shape, dtype), part in zip(shapes, parts)}, **others}


def length_sorted_groups(texts: list[str], batch_size: int) -> list[list[int]]:
    """Positions in `texts`, sorted by length and cut into batches (little padding within a batch)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def tokenized_batches(model, texts: list[str], is_query: bool, batch_size: int, workers: int, device,
                      pin: bool = True):
    """(positions in `texts`, tokenized batch on the host as `to_wire` gives it) over length-sorted batches, tokenised
    in `workers` DataLoader workers (0: in this process), into pinned memory for a CUDA `device` (`pin`). Batches
    come packed (`SparseModel.host_batch`) where the model packs on `device`."""
    pack = model.packs(is_query, device)
    return torch.utils.data.DataLoader(
        length_sorted_groups(texts, batch_size), batch_size=None, num_workers=workers,
        pin_memory=pin and device.type == "cuda",
        collate_fn=lambda positions: (positions, *to_wire(model.host_batch([texts[i] for i in positions], is_query,
                                                                           pack))))


def encode_shard(model, texts: list[str], is_query: bool, batch_size: int, progress, workers: int = 0,
                 pin: bool = True, lookahead: int = 1):
    """Yield (positions in `texts`, reps [b, V]) over length-sorted batches; the caller prunes each batch at once,
    so memory stays flat. With `workers` > 0 the tokenizer runs in DataLoader workers into pinned memory (`pin`), so
    a GPU does not wait for it (measured 3.3-3.7x docs/s on an H200, bench/RESULTS.md).

    The model of the next `lookahead` batches is queued before a batch is yielded, so a GPU keeps working while the
    caller waits for that batch's result and this process takes the next batch from the workers. On CUDA the caller
    runs on a side stream while it holds a batch: on the model's stream its work would queue behind the batches
    ahead, and waiting for its result would mean waiting for them too."""
    device = next(model.parameters()).device
    side = _side_stream(device) if device.type == "cuda" and lookahead else None
    queued = collections.deque()
    for positions, flat, layout in tokenized_batches(model, texts, is_query, batch_size, workers, device, pin):
        with torch.inference_mode():
            reps = model.encode_batch(from_wire(flat.to(device, non_blocking=True), layout), is_query)
        queued.append((positions, reps, torch.cuda.current_stream(device).record_event() if side else None))
        while len(queued) > lookahead:
            yield from _hand_over(*queued.popleft(), side, progress)
    while queued:
        yield from _hand_over(*queued.popleft(), side, progress)


@functools.cache
def _side_stream(device: torch.device):
    """One side stream per device for every encode_shard call: the caching allocator keeps a pool per stream, and
    while the pool of a new stream grows, each cudaMalloc makes the device finish the work queued before it (CUDA's
    implicit synchronisation), so a first hand-over on a new stream would wait for the batches ahead."""
    return torch.cuda.Stream(device)


def _hand_over(positions, reps, done, side, progress):
    """encode_shard's yield of one batch: on `side` (a CUDA stream, or None) once the batch is `done` there."""
    progress.update(len(positions))
    if side is None:
        yield positions, reps
        return
    side.wait_event(done)
    reps.record_stream(side)  # its memory is not reused before the caller's work on `side` is done
    with torch.cuda.stream(side):
        yield positions, reps


def main(argv=None) -> Path:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    enc = cfg.encode
    if not enc.input:
        raise ConfigError("'encode.input' is empty: give the corpus or queries file")
    is_query = enc.kind == "query"
    out = Path(enc.output or cfg.output_dir / "encode" / ("queries" if is_query else "corpus"))
    ids, texts = read_input(enc.input, enc.kind)

    accelerator = Accelerator(**accelerator_kwargs())
    per_shard = enc.shard_size or math.ceil(len(ids) / accelerator.num_processes)
    n_shards = math.ceil(len(ids) / per_shard)
    mine = [s for s in range(accelerator.process_index, n_shards, accelerator.num_processes)
            if not (out / shard_name(s)).is_file()]
    todo = sum(min(per_shard, len(ids) - s * per_shard) for s in mine)
    # the writer processes start first: their start-up (each imports torch: 7-14 s on an H200 host, runs Z15-Z16) runs
    # while the model loads, instead of holding up the first batches (bench/RESULTS.md)
    with VectorWriters(enc.num_writers if mine else 0) as writers:
        cfg.model.name_or_path = resolve_model_path(cfg)
        if accelerator.device.type == "cuda" and cfg.model.dtype == "float32":
            cfg.model.dtype = "bfloat16"  # inference in bf16 on GPU; the head pools in float32
        model = build_model(cfg.model).to(accelerator.device).eval()
        if enc.max_length:
            setattr(model.spec, "max_query_len" if is_query else "max_doc_len", enc.max_length)
        vocab = id_to_token_list(model.tokenizer)
        writers.start(vocab, enc.quant_scale)
        out.mkdir(parents=True, exist_ok=True)
        logger.info(f"encoding {len(ids)} {'queries' if is_query else 'documents'} with {cfg.model.name_or_path} "
                    f"into {n_shards} shard(s) on {accelerator.num_processes} process(es); this process: "
                    f"{len(mine)} to do", main_process_only=False)
        if enc.num_workers:  # workers hand batches over by shared-memory file name, not by descriptor: 2.5-3.2%
            torch.multiprocessing.set_sharing_strategy("file_system")  # more docs/s on an H200 (runs Z1, Z3)
        started = time.time()
        progress = tqdm(total=todo, disable=not accelerator.is_main_process, desc="encode", unit="text")
        for shard in mine:
            lo, hi = shard * per_shard, min(len(ids), (shard + 1) * per_shard)
            rows: list[tuple[str, int] | None] = [None] * (hi - lo)  # (vector JSON, nnz) in input order
            for positions, reps in encode_shard(model, texts[lo:hi], is_query, enc.batch_size, progress,
                                                enc.num_workers):
                _place(rows, writers.submit(positions, prune(reps, enc.topk, enc.threshold)))
            _place(rows, writers.drain())
            writer = ShardWriter(out / shard_name(shard))
            for rid, (vector_json, nnz) in zip(ids[lo:hi], rows):
                writer.add_json(rid, vector_json, nnz)
            writer.close()  # atomic: the shard exists only once complete
    progress.close()
    elapsed = time.time() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(cfg, out, ids, n_shards, is_query, len(vocab), todo, elapsed)
    return out


def _place(rows: list, done: list) -> None:
    """VectorWriters' finished batches -> their rows at their texts' positions in the shard."""
    for positions, batch_rows in done:
        for pos, row in zip(positions, batch_rows):
            rows[pos] = row


def finish(cfg, out: Path, ids: list[str], n_shards: int, is_query: bool, vocab_size: int, todo: int,
           elapsed: float, hash_sections=("model",), label: str = "encoded", note: str = "") -> dict:
    """Main process, once every shard exists (encode.py, zeroshot_prompt.py): check the shards, write meta.json and
    config.yaml next to them, print one summary line."""
    meta = summarize(cfg, out, ids, n_shards, is_query, vocab_size)
    meta["config_hash"] = config_hash(cfg, hash_sections)
    meta["seconds_last_run"] = round(elapsed, 2)
    write_meta(out, meta)
    save_config(cfg, out)
    rate = todo / elapsed if elapsed > 0 else 0.0
    print(f"{label} {meta['count']} {'queries' if is_query else 'docs'} ({todo} this run, {rate:.2f}/s{note}) into "
          f"{out}: nnz mean {meta['nnz_mean']:.1f}, p99 {meta['nnz_p99']:.0f}, empty {meta['empty']}"
          + (f", FLOPs {meta['flops']:.2f}" if meta.get("flops") is not None else ""))
    return meta


def summarize(cfg, out: Path, ids: list[str], n_shards: int, is_query: bool, vocab_size: int) -> dict:
    """Check the shards hold every id exactly once and gather the stats for meta.json."""
    expected = set(ids)
    shard_ids, vectors = load_vectors(out)  # raises on duplicates across shards
    if set(shard_ids) != expected or len(list(out.glob("part-*.jsonl.gz"))) != n_shards:
        missing = len(expected - set(shard_ids))
        raise InputError(f"{out}: shards do not match the input ({missing} ids missing, {len(shard_ids)} written); "
                         f"the folder holds output of another input or shard size: remove it and re-run")
    stats = nnz_stats([len(v) for v in vectors])
    meta = {"model": cfg.model.name_or_path, "kind": cfg.encode.kind,
            "input": cfg.encode.input, "vocab_size": vocab_size, "shards": n_shards, **stats,
            "topk": cfg.encode.topk, "threshold": cfg.encode.threshold, "scale": cfg.encode.quant_scale}
    if is_query:
        docs = Path(cfg.encode.flops_docs) if cfg.encode.flops_docs else out.parent / "corpus"
        if (docs / "meta.json").is_file():
            meta["flops"] = flops_estimate([v for _, v in read_vectors(docs)], vectors)
            meta["flops_docs"] = str(docs)
    return meta


if __name__ == "__main__":
    run_script(main)
