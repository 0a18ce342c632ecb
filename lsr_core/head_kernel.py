"""Fused MLM encoding head for CUDA (Triton): the max over each text's positions of feats @ W.T, without writing
the logits.

    pooled[b, v] = max over the positions l that text b pools of  sum_h feats[l, h] * weight[v, h]   (float32 sums)

The torch path (`heads.max_pool_inference`) writes float32 logits for every (position, term) of a vocabulary
chunk, masks them and max-reduces them: three memory passes over [tokens x vocabulary], about as long as the matmul
itself for BERT-base. Here the positions of all texts (packed end to end, or a padded batch flattened) are the
columns of one GEMM against the vocabulary; each program keeps its [terms x positions] tile in registers, reduces
its columns per text (texts are contiguous runs of columns; -1 marks a position no text pools) and merges the
maxima into [texts x vocabulary] with atomic max. A text's tail costs no more than its share of a tile, unlike
per-text tiles, which were slower (bench/RESULTS.md, "One GEMM for the head"). Texts with no pooled position get
-inf, as in the torch path. Inference only (no argmax is kept): training uses `heads._SparseMLMPool`.

Programs run in groups of GROUP_T position tiles that sweep the vocabulary together, so those positions' hidden
states stay in L2 while each weight tile is read once per group. A configuration either gives each program one
tile, or runs PER_SM programs per SM that loop over the tiles (persistent: rarely the autotuner's pick on real
batches, bench/RESULTS.md). Tile sizes are autotuned once
per (hidden, vocabulary, power of two of the positions) and process.
Tested on the CPU through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path is used
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read by triton at import
_MAX_ELEMENTS = 2**31  # the kernel's offsets are 32-bit


def _addressable(feats: torch.Tensor, weight: torch.Tensor) -> bool:
    """Every element's offset fits 32 bits."""
    return all(sum((n - 1) * s for n, s in zip(t.shape, t.stride())) < _MAX_ELEMENTS - 1 for t in (feats, weight))


def usable(feats: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Where `model.head_kernel=auto` picks the kernel: CUDA tensors in bf16/fp16 (float32 would drop to TF32 in
    tl.dot and differ from the torch path) that 32-bit offsets can address."""
    return (triton is not None and not INTERPRET and feats.is_cuda and dtype in (torch.bfloat16, torch.float16)
            and _addressable(feats, weight))


def check_runnable(feats: torch.Tensor) -> None:
    """For `model.head_kernel=triton`: fail with the reason instead of falling back."""
    if triton is None:
        raise RuntimeError("model.head_kernel=triton needs the 'triton' package (it comes with CUDA builds of torch)")
    if not (feats.is_cuda or INTERPRET):
        raise RuntimeError(f"model.head_kernel=triton needs a CUDA device, got {feats.device} (set "
                           "TRITON_INTERPRET=1 before importing triton to run it on the CPU, slowly)")


if triton is not None:
    # (BLOCK_V, BLOCK_T, BLOCK_H, warps, stages, GROUP_T, PER_SM): vocabulary rows on the MMA's M side, token columns
    # on its N side; GROUP_T token tiles sweep the vocabulary together, so their hidden states stay in L2. PER_SM 0:
    # one program per tile; k > 0: k programs per SM loop over the tiles (persistent), the loop flattened so the
    # next tile's loads are issued during this tile's epilogue (H is short: 12 steps of 64 for BERT-base)
    _SEGMENT_TILES = [(128, 128, 64, 8, 3, 8, 0), (256, 128, 64, 8, 3, 8, 0), (128, 256, 64, 8, 3, 8, 0),
                      (128, 128, 64, 4, 4, 8, 0), (256, 128, 64, 8, 3, 32, 0), (128, 64, 64, 4, 4, 8, 0),
                      (64, 64, 64, 4, 4, 8, 0), (256, 64, 64, 8, 3, 8, 0), (128, 256, 64, 8, 4, 8, 0),
                      (128, 256, 128, 8, 2, 8, 0), (128, 256, 64, 8, 3, 32, 0), (128, 256, 64, 8, 4, 8, 1),
                      (128, 256, 64, 8, 3, 8, 1), (256, 128, 64, 8, 3, 8, 1)]
    _SEGMENT_CONFIGS = [triton.Config({"BLOCK_V": bv, "BLOCK_T": bt, "BLOCK_H": bh, "GROUP_T": g, "PER_SM": k},
                                      num_warps=w, num_stages=s) for bv, bt, bh, w, s, g, k in _SEGMENT_TILES]
    if INTERPRET:
        _SEGMENT_CONFIGS = [triton.Config({"BLOCK_V": 32, "BLOCK_T": 16, "BLOCK_H": 16, "GROUP_T": 2, "PER_SM": 0})]

    @triton.jit
    def _tile_products(feats, weight, offs_t, offs_v, in_t, in_v, H, s_ft, s_fh, s_wv, s_wh,
                       BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_H: tl.constexpr):
        """[BLOCK_V, BLOCK_T] float32: weight[offs_v] @ feats[offs_t].T"""
        offs_h = tl.arange(0, BLOCK_H)
        acc = tl.zeros([BLOCK_V, BLOCK_T], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            w_ptr = weight + offs_v[:, None] * s_wv + (h0 + offs_h)[None, :] * s_wh
            a_ptr = feats + offs_t[None, :] * s_ft + (h0 + offs_h)[:, None] * s_fh
            if EVEN_H:
                w = tl.load(w_ptr, mask=in_v[:, None], other=0.0)
                a = tl.load(a_ptr, mask=in_t[None, :], other=0.0)
            else:
                in_h = (h0 + offs_h) < H
                w = tl.load(w_ptr, mask=in_v[:, None] & in_h[None, :], other=0.0)
                a = tl.load(a_ptr, mask=in_h[:, None] & in_t[None, :], other=0.0)
            acc = tl.dot(w, a, acc)
        return acc

    @triton.jit
    def _merge_max(acc, owner, last, out, offs_v, in_v, V):
        """Texts are contiguous runs of columns: one masked max and one atomic max per text in the tile (none when
        the tile pools no position, last = -1)."""
        for b in range(tl.min(tl.where(owner >= 0, owner, last), axis=0), last + 1):
            best = tl.max(tl.where((owner == b)[None, :], acc, float("-inf")), axis=1)
            tl.atomic_max(out + b * V + offs_v, best, mask=in_v & (b >= 0), sem="relaxed")

    @triton.autotune(configs=_SEGMENT_CONFIGS, key=["H", "V", "T_BUCKET"])
    @triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})
    @triton.jit
    def _segment_max_matmul(feats, weight, text, out, T, H, V, T_BUCKET, s_ft, s_fh, s_wv, s_wh,
                            BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                            GROUP_T: tl.constexpr, PER_SM: tl.constexpr, EVEN_H: tl.constexpr):
        n_t = tl.cdiv(T, BLOCK_T)
        per_group = GROUP_T * tl.cdiv(V, BLOCK_V)
        for tile in tl.range(tl.program_id(0), n_t * tl.cdiv(V, BLOCK_V), tl.num_programs(0), flatten=PER_SM > 0):
            first = (tile // per_group) * GROUP_T
            rows = tl.minimum(n_t - first, GROUP_T)
            offs_t = (first + (tile % per_group) % rows) * BLOCK_T + tl.arange(0, BLOCK_T)
            offs_v = ((tile % per_group) // rows) * BLOCK_V + tl.arange(0, BLOCK_V)
            in_t = offs_t < T
            in_v = offs_v < V
            owner = tl.load(text + offs_t, mask=in_t, other=-1)
            last = tl.max(owner, axis=0)
            if PER_SM > 0:  # flattening needs the products unconditional
                acc = _tile_products(feats, weight, offs_t, offs_v, in_t, in_v, H, s_ft, s_fh, s_wv, s_wh,
                                     BLOCK_V, BLOCK_T, BLOCK_H, EVEN_H)
                _merge_max(acc, owner, last, out, offs_v, in_v, V)
            elif last >= 0:  # a tile of unpooled positions only (padding, echo's first copy) computes nothing
                acc = _tile_products(feats, weight, offs_t, offs_v, in_t, in_v, H, s_ft, s_fh, s_wv, s_wh,
                                     BLOCK_V, BLOCK_T, BLOCK_H, EVEN_H)
                _merge_max(acc, owner, last, out, offs_v, in_v, V)


def _sm_count(device: torch.device) -> int:
    """SMs for the persistent configurations' grid (4 on the CPU, for Triton's interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def segment_max_matmul(feats: torch.Tensor, weight: torch.Tensor, text: torch.Tensor, texts: int,
                       tile: tuple | None = None) -> torch.Tensor:
    """feats [T, H] (texts end to end, or a padded batch flattened), weight [V, H] (same dtype), text [T] int32: the
    text each position is pooled into, in runs of non-decreasing ids, -1 for a position no text pools -> [texts, V]
    float32 maxima of the raw products (-inf for a text with no position). No host synchronisation.
    One GEMM over all positions whose epilogue max-reduces each tile's columns per text into `out` with atomic max.
    `tile`: one configuration, as in _SEGMENT_TILES, instead of the autotuned one (tests and bench/encode_head.py)."""
    positions, hidden = feats.shape
    vocab = weight.shape[0]
    if weight.shape[1] != hidden or weight.dtype != feats.dtype:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} does not match feats {tuple(feats.shape)} "
                         f"{feats.dtype}")
    if text.shape != (positions,):
        raise ValueError(f"text ids {tuple(text.shape)} do not match feats {tuple(feats.shape)}")
    if not _addressable(feats, weight) or texts * vocab >= _MAX_ELEMENTS:
        raise ValueError(f"feats {tuple(feats.shape)}, weight {tuple(weight.shape)} or the output ({texts} x {vocab})"
                         " has 2**31 elements or more: split the batch")
    out = torch.full((texts, vocab), float("-inf"), dtype=torch.float32, device=feats.device)
    if positions == 0 or texts == 0:
        return out

    def grid(meta):
        tiles = triton.cdiv(positions, meta["BLOCK_T"]) * triton.cdiv(vocab, meta["BLOCK_V"])
        return (min(tiles, meta["PER_SM"] * _sm_count(feats.device)) if meta["PER_SM"] else tiles,)

    args = (feats, weight, text.to(torch.int32), out, positions, hidden, vocab, triton.next_power_of_2(positions),
            *feats.stride(), *weight.stride())
    if tile is not None:
        bv, bt, bh, warps, stages, group, per_sm = tile
        meta = {"BLOCK_V": bv, "BLOCK_T": bt, "BLOCK_H": bh, "GROUP_T": group, "PER_SM": per_sm}
        _segment_max_matmul.fn[grid(meta)](*args, **meta, num_warps=warps, num_stages=stages)
        return out
    # tuned per power of two of the positions (a host-side number: no synchronisation); the autotuner's repeated
    # launches leave `out` right, as a max is idempotent
    _segment_max_matmul[grid](*args)
    return out


def tiles_chosen(kernel) -> dict[str, str]:
    """The tile a Triton autotuner (`kernel`) chose per key (shapes, rounded) so far, and under "last" the tile of its
    latest call: what bench/ reports beside a timing. Empty before the first call on CUDA."""
    tiles = {str(key): str(config) for key, config in kernel.cache.items()}
    if getattr(kernel, "best_config", None) is not None:
        tiles["last"] = str(kernel.best_config)
    return tiles


def autotuned_tiles() -> dict[str, str]:
    """`tiles_chosen` of the head kernel; empty without triton."""
    return {} if triton is None else tiles_chosen(_segment_max_matmul)
