"""The batch pipeline of encode.py: texts -> length-sorted batches, tokenised (in DataLoader workers, handed over as
one shared-memory tensor per batch) -> the model -> (positions, reps) per batch, with the next batches queued on the
device while the caller prunes one (`encode_shard`)."""
from __future__ import annotations

import collections
import functools
import math

import torch

from lsr_core.utils import InputError


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
    a GPU does not wait for it (bench/RESULTS.md). `counts` (when given) gains
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


def check_finite(reps: torch.Tensor, batch_ids: list[str], source: str) -> None:
    """Refuse a batch with a NaN or infinite weight (JSON would carry `NaN`; `prune` would drop a NaN silently)."""
    finite = torch.isfinite(reps).all(1)
    if not bool(finite.all()):
        rid = batch_ids[int((~finite).nonzero()[0, 0])]
        raise InputError(f"{source}: the model gave non-finite weights (NaN or inf) for id '{rid}': check the "
                         f"model's weights, or encode in float32 (model.dtype=float32)")
