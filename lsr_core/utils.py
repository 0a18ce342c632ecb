"""Small shared helpers: atomic writes, text readers with file:line errors, seeding."""
from __future__ import annotations

import collections
import csv
import gzip
import itertools
import json
import os
import struct
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


class InputError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", compress: bool = True):
    """Write to a temp file in the same folder, rename over `path` only if the block finishes. A `.gz` path is
    gzip-compressed unless `compress` is False (bytes already compressed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".gz" and compress:
            f = gzip.open(tmp, mode + ("t" if "b" not in mode else ""), compresslevel=5)
        else:
            f = open(tmp, mode)
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no name, mtime 0, unknown OS


def _deflate_piece(data: bytes, level: int) -> bytes:
    """Raw deflate blocks for `data`, ending on a sync flush (byte-aligned, not final): pieces join end to end."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


def write_gzip_lines(path: str | Path, lines: Iterable[str], level: int = 5, threads: int = 0,
                     lines_per_piece: int = 4096) -> None:
    """`lines` (each without its newline) -> one gzip member at `path`, atomically, compressed on `threads` threads
    (0: one per core; zlib releases the GIL) in pieces of `lines_per_piece` lines, as pigz does: each piece is
    deflated on its own and ends on a sync flush, so the pieces form one deflate stream that any gzip reader reads.
    At level 5, one core compresses ~29 MB/s of encoded vectors (~25 ms per 256 documents), as long as an H200
    encodes them, so a single-threaded writer would double the time encode.py spends after the model."""
    threads = threads or os.cpu_count() or 1
    crc, size, waiting = 0, 0, collections.deque()
    lines = iter(lines)
    with atomic_open(path, "wb", compress=False) as f, ThreadPoolExecutor(threads) as pool:
        f.write(_GZIP_HEADER)
        while piece := list(itertools.islice(lines, lines_per_piece)):
            data = "".join(line + "\n" for line in piece).encode()
            crc, size = zlib.crc32(data, crc), size + len(data)
            waiting.append(pool.submit(_deflate_piece, data, level))
            while len(waiting) > 2 * threads:  # bounded memory: write the oldest piece
                f.write(waiting.popleft().result())
        while waiting:
            f.write(waiting.popleft().result())
        f.write(zlib.compressobj(level, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # the final (empty) block
        f.write(struct.pack("<II", crc, size & 0xFFFFFFFF))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def open_text(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); a malformed line raises InputError naming file:line."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_texts(path: str | Path, allow_empty: bool = False) -> Iterator[tuple[str, str]]:
    """Read (id, text) from JSONL ({"id"|"_id"|"qid"|"docid", "text"|"contents"[, "title"]}) or TSV (id<TAB>text).

    Empty texts are an error unless `allow_empty` (documents may be empty; queries may not).
    """
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith((".tsv", ".txt")):
        with open_text(path) as f:
            for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
                if not row:
                    continue
                if len(row) < 2:
                    raise InputError(f"{path}:{lineno}: expected 'id<TAB>text', got {len(row)} field(s)")
                _check_text(path, lineno, row[0], row[1], allow_empty)
                yield row[0], row[1]
        return
    for lineno, obj in read_jsonl(path):
        rid = next((obj[k] for k in ("id", "_id", "qid", "docid", "pid") if k in obj), None)
        if rid is None:
            raise InputError(f"{path}:{lineno}: missing field 'id'")
        text = next((obj[k] for k in ("text", "contents", "query") if k in obj), None)
        if text is None:
            raise InputError(f"{path}:{lineno}: missing field 'text'")
        if obj.get("title"):
            text = f"{obj['title']}: {text}"
        _check_text(path, lineno, str(rid), text, allow_empty)
        yield str(rid), text


def _check_text(path, lineno, rid, text, allow_empty):
    if not isinstance(text, str):
        raise InputError(f"{path}:{lineno}: field 'text' must be a string")
    if not rid:
        raise InputError(f"{path}:{lineno}: empty id")
    if not allow_empty and not text.strip():
        raise InputError(f"{path}:{lineno}: empty text for id '{rid}'")


def load_texts(path: str | Path, allow_empty: bool = False) -> dict[str, str]:
    """All (id, text) pairs as a dict; duplicate ids are an error."""
    out: dict[str, str] = {}
    for rid, text in read_texts(path, allow_empty):
        if rid in out:
            raise InputError(f"{path}: duplicate id '{rid}'")
        out[rid] = text
    return out


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """TREC qrels: `qid iter docid rel` (4 columns) or `qid docid rel` (3 columns)."""
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) not in (3, 4):
                raise InputError(f"{path}:{lineno}: expected 'qid 0 docid rel', got {len(parts)} fields")
            qid, docid, rel = parts[0], parts[-2], parts[-1]
            try:
                qrels.setdefault(qid, {})[docid] = int(rel)
            except ValueError:
                raise InputError(f"{path}:{lineno}: field 'rel' must be an integer, got {rel!r}") from None
    return qrels


def stable_bucket(key: str, salt: str = "split") -> float:
    """Deterministic pseudo-random number in [0, 1) from a string (for fixed train/dev/test splits)."""
    import hashlib

    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively where our scripts run (CUDA when present, else the CPU): a GPU with bf16, or
    a CPU with AVX512-BF16 or AMX. Elsewhere oneDNN emulates them, many times slower than float32 (bench/RESULTS.md).

    The environment variable LSR_NATIVE_BF16 forces the answer (1: native, 0: emulated; unset or empty: ask the
    hardware), so that one machine can run the tests as the other kind would; `auto` precision resolves through
    here (`lsr_core.config.resolve_precision`). It is read at every call."""
    forced = os.environ.get("LSR_NATIVE_BF16", "").strip()
    if forced:
        if forced not in ("0", "1"):
            from lsr_core.config import ConfigError

            raise ConfigError(f"LSR_NATIVE_BF16 must be 0 or 1 (or unset), got {forced!r}")
        return forced == "1"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, so looked up defensively
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def accelerator_kwargs(deepspeed: bool = False) -> dict:
    """Accelerator arguments for where we run: several CPU processes (no CUDA) need the gloo backend, and DDP also
    `cpu=True`; GPUs and single processes need nothing. With DeepSpeed (`deepspeed`: train.py's
    `uses_deepspeed`) `cpu=True` must not be passed: accelerate then drops the DeepSpeed plugin without a word and
    trains with plain DDP."""
    import torch

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    from accelerate import InitProcessGroupKwargs

    gloo = {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    if deepspeed:
        return gloo
    return {"cpu": True, **gloo}
