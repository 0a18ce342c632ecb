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
Texts are split into shards by position; each process writes its own shards (no gather), and a rerun skips shards
that already exist, so a killed job resumes without duplicates or gaps. A rerun with other settings (model,
vocabulary, top-k, threshold, quantisation, max length, input, shard size) over existing shards is refused, as
recorded in `.encode/settings.json` when the run began, unless `encode.overwrite=true` removes them first.
Within a shard texts are encoded in length-sorted batches to avoid padding waste, then written in input order.
`encode.num_writers` worker processes turn the pruned vectors into JSON lines while the model runs on.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from lsr_core.config import ConfigError, config_hash, load_config, save_config
from lsr_core.backbones import ModelLoadError
from lsr_core.backbones import resolve_model_path as package_path
from lsr_core.modeling import RUNTIME_FIELDS, build_model
from lsr_core.sparse import (SHARD_PATTERN, ShardWriter, VectorWriters, flops_estimate, id_to_token_list,
                             load_vectors, nnz_stats, prune, read_vectors, shard_name, vocab_hash, write_meta)
from lsr_core.utils import InputError, accelerator_kwargs, atomic_write_json, check_id, read_texts, run_script

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


def resolve_model_path(cfg) -> tuple[str, str, bool]:
    """(the model to encode with, why it was chosen, whether that deserves a warning): `encode.model`; else
    `<output_dir>/final` when train.py has written it, unless the command line names another model than the one it
    was trained from in `model.name_or_path` (then that model); else `model.name_or_path`. The warning is for a
    final/ left unused, or used although the configured `model.name_or_path` did not train it."""
    named = cfg.model.name_or_path
    from_cli = "model.name_or_path" in cfg.cli_keys
    if cfg.encode.model:
        if from_cli and local_path(named) != local_path(cfg.encode.model):
            raise ConfigError(f"encode.model={cfg.encode.model!r} and model.name_or_path={named!r} (command line) "
                              f"name different models: give only one")
        return cfg.encode.model, "encode.model", False
    final = cfg.output_dir / "final"
    if not (final / "lsr_config.json").is_file():
        return named, "model.name_or_path" + (", given on the command line" if from_cli else ""), False
    trained_from = _trained_from(cfg.output_dir)
    origin = f"trained from {trained_from}" if trained_from else "its base model unrecorded"
    if named and (trained_from is None or local_path(named) != local_path(trained_from)):
        if from_cli:
            return named, f"model.name_or_path, given on the command line; {final} ({origin}) is not used", True
        return str(final), (f"train.py's model in exp.output_dir ({origin}), not model.name_or_path={named!r}: set "
                            f"encode.model to encode with another model"), True
    return str(final), f"train.py's model in exp.output_dir, {origin}", False


def _trained_from(output_dir: Path) -> str | None:
    """model.name_or_path of the config.yaml train.py saved in `output_dir`, if any."""
    import yaml

    try:
        return yaml.safe_load((output_dir / "config.yaml").read_text())["model"]["name_or_path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def local_path(name: str) -> str:
    """An existing local file or folder (a `pkg:` name included) as an absolute path, anything else (a hub name,
    `irds:...`) as it is: what meta.json records, so that folders encoded from different working directories
    compare equal."""
    try:
        path = Path(package_path(name))
    except ModelLoadError:  # a package not installed here: the name is all there is
        return name
    return str(path.resolve()) if name and path.exists() else name


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
                      pin: bool = True, count_cut: bool = False):
    """(positions in `texts`, tokenized batch on the host as `to_wire` gives it) over length-sorted batches, tokenised
    in `workers` DataLoader workers (0: in this process), into pinned memory for a CUDA `device` (`pin`). Batches
    come packed (`SparseModel.host_batch`) where the model packs on `device`. With `count_cut` each item ends with
    the number of its texts cut at the max length (`cut_count`), counted in the workers too."""
    pack = model.packs(is_query, device)

    def collate(positions):
        chunk = [texts[i] for i in positions]
        batch = model.host_batch(chunk, is_query, pack)
        return (positions, *to_wire(batch)) + ((cut_count(model, chunk, batch, is_query),) if count_cut else ())

    return torch.utils.data.DataLoader(length_sorted_groups(texts, batch_size), batch_size=None, num_workers=workers,
                                       pin_memory=pin and device.type == "cuda", collate_fn=collate)


def cut_count(model, texts: list[str], batch: dict, is_query: bool) -> int:
    """How many of `texts` the tokenizer cut at the model's max length. `batch` is their `host_batch`: only a row
    that reached the max length there can have been cut, and only those texts are tokenised again (without the cut,
    to one token past it), as `SparseModel.tokenize` does: prefix and special tokens included."""
    spec = model.spec
    max_len = spec.max_query_len if is_query else spec.max_doc_len
    lengths = batch["cu_seq_lens"].diff() if "cu_seq_lens" in batch else batch["attention_mask"].sum(1)
    prefix = spec.query_prefix if is_query else spec.doc_prefix
    full = [prefix + text for text, n in zip(texts, lengths.tolist()) if n >= max_len]
    if not full:
        return 0
    ids = model.tokenizer(full, truncation=True, max_length=max_len + 1)["input_ids"]
    return sum(len(row) > max_len for row in ids)


def encode_shard(model, texts: list[str], is_query: bool, batch_size: int, progress, workers: int = 0,
                 pin: bool = True, lookahead: int = 1, counts: collections.Counter | None = None):
    """Yield (positions in `texts`, reps [b, V]) over length-sorted batches; the caller prunes each batch at once,
    so memory stays flat. With `workers` > 0 the tokenizer runs in DataLoader workers into pinned memory (`pin`), so
    a GPU does not wait for it (measured 3.3-3.7x docs/s on an H200, bench/RESULTS.md). `counts` (when given) gains
    "truncated": how many texts were cut at the max length.

    The model of the next `lookahead` batches is queued before a batch is yielded, so a GPU keeps working while the
    caller waits for that batch's result and this process takes the next batch from the workers. On CUDA the caller
    runs on a side stream while it holds a batch: on the model's stream its work would queue behind the batches
    ahead, and waiting for its result would mean waiting for them too."""
    device = next(model.parameters()).device
    side = _side_stream(device) if device.type == "cuda" and lookahead else None
    queued = collections.deque()
    for positions, flat, layout, *cut in tokenized_batches(model, texts, is_query, batch_size, workers, device, pin,
                                                           count_cut=counts is not None):
        if cut:
            counts["truncated"] += cut[0]
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
    model_path, why, doubtful = resolve_model_path(cfg)
    ids, texts = read_input(enc.input, enc.kind)

    accelerator = Accelerator(**accelerator_kwargs())
    per_shard = enc.shard_size or math.ceil(len(ids) / accelerator.num_processes)
    n_shards = math.ceil(len(ids) / per_shard)
    mine = unfinished(out, n_shards, accelerator)
    # the writer processes start first: their start-up (each imports torch: 7-14 s on an H200 host, runs Z15-Z16) runs
    # while the model loads, instead of holding up the first batches (bench/RESULTS.md)
    with VectorWriters(enc.num_writers if mine or enc.overwrite else 0) as writers:
        cfg.model.name_or_path = local_path(model_path)
        (logger.warning if doubtful else logger.info)(f"model: {cfg.model.name_or_path} ({why})")
        if accelerator.device.type == "cuda" and cfg.model.dtype == "float32":
            cfg.model.dtype = "bfloat16"  # inference in bf16 on GPU; the head pools in float32
        model = build_model(cfg.model).to(accelerator.device).eval()
        if enc.max_length:
            setattr(model.spec, "max_query_len" if is_query else "max_doc_len", enc.max_length)
        max_length = model.spec.max_query_len if is_query else model.spec.max_doc_len
        vocab = id_to_token_list(model.tokenizer)
        settings = encode_settings(cfg, model, vocab, len(ids), per_shard, max_length)
        claim_output(accelerator, out, settings, enc.overwrite)
        mine = unfinished(out, n_shards, accelerator)  # encode.overwrite may have removed finished shards
        todo = sum(min(per_shard, len(ids) - s * per_shard) for s in mine)
        writers.start(vocab, enc.quant_scale)
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
            counts = collections.Counter(truncated=0)
            for positions, reps in encode_shard(model, texts[lo:hi], is_query, enc.batch_size, progress,
                                                enc.num_workers, counts=counts):
                pruned = prune(reps, enc.topk, enc.threshold)
                check_finite(reps, [ids[lo + pos] for pos in positions], enc.input)
                _place(rows, writers.submit(positions, pruned))
            _place(rows, writers.drain())
            atomic_write_json(counts_path(out, shard), {"texts": hi - lo, **counts})
            writer = ShardWriter(out / shard_name(shard))
            for rid, (vector_json, nnz) in zip(ids[lo:hi], rows):
                writer.add_json(rid, vector_json, nnz)
            writer.close()  # atomic: the shard exists only once complete
    progress.close()
    elapsed = time.time() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish(cfg, out, ids, n_shards, is_query, len(vocab), todo, elapsed, vocab=vocab,
               truncated=shard_counts(out, n_shards, "truncated"), max_length=max_length)
    return out


STATE = ".encode"  # in an output folder: settings.json (what its shards are made with) and part-NNNNN.json (counts
#                    per shard, written just before the shard, so that a resumed run still reports every shard)


def counts_path(out: Path, shard: int) -> Path:
    return out / STATE / shard_name(shard).replace(".jsonl.gz", ".json")


def unfinished(out: Path, n_shards: int, accelerator) -> list[int]:
    """This process's shards (one in every `num_processes`) that do not exist yet."""
    return [s for s in range(accelerator.process_index, n_shards, accelerator.num_processes)
            if not (out / shard_name(s)).is_file()]


def encode_settings(cfg, model, vocab: list[str], texts: int, per_shard: int, max_length: int) -> dict:
    """What the vectors of an output folder depend on; a rerun over shards made with other settings is refused.
    Of the model: its (absolute) path, vocabulary, weights' precision and what `lsr_config.json` would record (not
    how a run computes it, nor the other kind's max length)."""
    skip = set(RUNTIME_FIELDS) | {"max_query_len", "max_doc_len"}
    spec = {k: v for k, v in dataclasses.asdict(model.spec).items() if k not in skip}
    enc = cfg.encode
    settings = {"model": cfg.model.name_or_path, "vocab_hash": vocab_hash(vocab), "dtype": cfg.model.dtype,
                "quantization": cfg.model.quantization, "spec": spec, "max_length": max_length, "kind": enc.kind,
                "input": local_path(enc.input), "texts": texts, "shard_size": per_shard, "topk": enc.topk,
                "threshold": enc.threshold, "scale": enc.quant_scale}
    return json.loads(json.dumps(settings))  # as it reads back from the file


def claim_output(accelerator, out: Path, settings: dict, overwrite: bool) -> None:
    """Make `out` a folder of shards made with `settings`: shards made otherwise, or of unknown origin, are refused
    (every process checks) unless `overwrite`, which removes them, meta.json and the shard counts first (the main
    process); then the main process records `settings`."""
    shards = sorted(out.glob(SHARD_PATTERN))
    recorded = out / STATE / "settings.json"
    if shards and not overwrite:
        how = "set encode.overwrite=true to replace them, or choose another encode.output"
        if not recorded.is_file():
            raise InputError(f"{out}: holds {len(shards)} shard(s) but no {STATE}/settings.json saying how they were "
                             f"made (by zeroshot_prompt.py, or an older encode.py): {how}")
        try:
            before = json.loads(recorded.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{recorded}: unreadable ({err}): {how}") from None
        before = _flat(before)
        changed = [f"{key} {before.get(key)!r} -> {now!r}" for key, now in _flat(settings).items()
                   if before.get(key) != now]
        if changed:
            raise InputError(f"{out}: holds {len(shards)} shard(s) encoded with other settings "
                             f"({'; '.join(changed)}): {how}")
    accelerator.wait_for_everyone()  # every process has checked before the folder changes
    if accelerator.is_main_process:
        if overwrite:
            for path in [*shards, out / "meta.json"]:
                path.unlink(missing_ok=True)
            shutil.rmtree(out / STATE, ignore_errors=True)
            if shards:
                logger.warning(f"encode.overwrite: removed {len(shards)} shard(s) and meta.json from {out}")
        recorded.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(recorded, settings)
    accelerator.wait_for_everyone()


def _flat(settings: dict) -> dict:
    """{"spec": {"pooling": ...}} -> {"spec.pooling": ...}: one entry per setting, for the error message."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def check_finite(reps: torch.Tensor, batch_ids: list[str], source: str) -> None:
    """Refuse a batch with a NaN or infinite weight (JSON would carry `NaN`; `prune` would drop a NaN silently)."""
    finite = torch.isfinite(reps).all(1)
    if not bool(finite.all()):
        rid = batch_ids[int((~finite).nonzero()[0, 0])]
        raise InputError(f"{source}: the model gave non-finite weights (NaN or inf) for id '{rid}': check the "
                         f"model's weights, or encode in float32 (model.dtype=float32)")


def shard_counts(out: Path, n_shards: int, key: str) -> int | None:
    """The sum of one per-shard count over every shard (None when a shard's counts are missing)."""
    total = 0
    for shard in range(n_shards):
        try:
            total += json.loads(counts_path(out, shard).read_text())[key]
        except (OSError, ValueError, KeyError):
            return None
    return total


def _place(rows: list, done: list) -> None:
    """VectorWriters' finished batches -> their rows at their texts' positions in the shard."""
    for positions, batch_rows in done:
        for pos, row in zip(positions, batch_rows):
            rows[pos] = row


def finish(cfg, out: Path, ids: list[str], n_shards: int, is_query: bool, vocab_size: int, todo: int,
           elapsed: float, hash_sections=("model",), label: str = "encoded", note: str = "",
           vocab: list[str] | None = None, truncated: int | None = None, max_length: int | None = None) -> dict:
    """Main process, once every shard exists (encode.py, zeroshot_prompt.py): check the shards, write meta.json and
    config.yaml next to them, print one summary line. `vocab` gives meta.json its `vocab_hash`; `truncated` (None:
    not counted) is how many texts were cut at `max_length` tokens."""
    meta = summarize(cfg, out, ids, n_shards, is_query, vocab_size)
    meta["config_hash"] = config_hash(cfg, hash_sections)
    meta["vocab_hash"] = vocab_hash(vocab) if vocab is not None else None
    meta["truncated"], meta["max_length"] = truncated, max_length
    meta["seconds_last_run"] = round(elapsed, 2)
    write_meta(out, meta)
    save_config(cfg, out)
    rate = todo / elapsed if elapsed > 0 else 0.0
    if truncated:
        logger.warning(f"{truncated} of {meta['count']} texts are longer than {max_length} tokens and were cut there: "
                       f"raise encode.max_length to encode them whole")
    cut = f", truncated {truncated} (max {max_length} tokens)" if truncated is not None else ""
    flops = f", FLOPs {meta['flops']:.2f}" if meta.get("flops") is not None else ""
    print(f"{label} {meta['count']} {'queries' if is_query else 'docs'} ({todo} this run, {rate:.2f}/s{note}) with "
          f"{meta['model']} into {out}: nnz mean {meta['nnz_mean']:.1f}, p99 {meta['nnz_p99']:.0f}, "
          f"empty {meta['empty']}{cut}{flops}")
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
