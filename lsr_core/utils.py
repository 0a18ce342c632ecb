"""Small shared helpers: atomic writes, text readers with file:line errors, seeding, the scripts' `__main__`."""
from __future__ import annotations

import collections
import gzip
import itertools
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import orjson


class InputError(ValueError):
    """Bad input data; the message names the file, the line and the field."""


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", compress: bool = True):
    """Write to a temp file in the same folder, rename over `path` only if the block finishes. A `.gz` path is
    gzip-compressed unless `compress` is False (bytes already compressed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's host and pid in the name let a later run sweep what a killed one left (`sweep_stale`)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
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


def owner_tag() -> str:
    """`<host>-<pid>` of this process: temp files and folders carry it so a later run knows whether their writer is
    gone (`sweep_stale`)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def sweep_stale(folder: str | Path, prefixes: Iterable[str]) -> list[Path]:
    """Remove what killed runs left in `folder`: temp files (`atomic_open`'s `<prefix><host>-<pid>.<random>.tmp`) and
    folders (`<prefix><host>-<pid>`, index.py's) of this host whose process no longer runs. Those of a running
    process, or of another host sharing the folder, are kept: their writer may still be at work."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = re.compile(re.escape(socket.gethostname()) + r"-(\d+)(\.\w+\.tmp)?")
    removed = []
    for path in sorted(folder.iterdir()):
        tags = [path.name[len(p):] for p in prefixes if path.name.startswith(p)]
        match = next((m for m in map(mine.fullmatch, tags) if m), None)
        if match is None or _running(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


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
    At level 5 one core compresses encoded vectors about as fast as a fast GPU encodes them (bench/RESULTS.md),
    so a single-threaded writer would double the time encode.py spends after the model."""
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


class TextLines:
    """A UTF-8 text file, gzip-compressed when its name ends in .gz, read line by line (use `open_text`), or from
    `start`: (`file.tell()` after a line, its line number; a .gz file decompresses its way there). Iterating yields
    each line with its newline; a line that is not UTF-8, a truncated gzip or a corrupt deflate stream raises
    InputError naming the file and the line instead of a decoder's traceback. Lines end at b"\\n" only, so line
    numbers are `wc -l`'s; a UTF-8 byte-order mark at the start is dropped."""

    def __init__(self, path: Path, start: tuple[int, int] = (0, 0)):
        self.path, self.lineno = path, start[1]  # lineno: lines yielded so far, counted from the file's start
        try:
            self.file = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
            self.file.seek(start[0])
        except (OSError, EOFError, zlib.error) as err:  # seek: a .gz file damaged before `start`
            raise InputError(f"{path}: cannot open ({getattr(err, 'strerror', None) or err})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def __iter__(self) -> Iterator[str]:
        try:
            if self.file.tell() == 0 and self.file.peek(3)[:3] == b"\xef\xbb\xbf":
                self.file.read(3)
            for raw in self.file:
                self.lineno += 1
                yield raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{self.path}:{self.lineno}: not UTF-8 text (byte {err.object[err.start]:#04x} at "
                             f"offset {err.start} of the line)") from None
        except (OSError, EOFError, zlib.error) as err:  # a bad gzip header or CRC is an OSError (BadGzipFile)
            # the decompressor reads ahead, so the damage lies at or after the line reached
            reached = f"after line {self.lineno}" if self.lineno else "at the start"
            what = "truncated or corrupt gzip data" if self.path.suffix == ".gz" else "read error"
            raise InputError(f"{self.path}: {what} {reached} ({err})") from None


def open_text(path: str | Path) -> TextLines:
    """A text file (gzip by suffix) to iterate line by line, as a context manager; see `TextLines`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return TextLines(path)


def check_id(path, lineno: int, rid, row: bool = False) -> str:
    """`rid` as an id string, or InputError naming file:line (`row`: "file: row N", for rows of a table): an id is a
    string (or an integer), not empty, without whitespace, since TREC runs and qrels are split on whitespace."""
    if type(rid) is str and rid.split() == [rid]:
        return rid
    if type(rid) is int:
        return str(rid)
    where = f"{path}: row {lineno}" if row else f"{path}:{lineno}"
    if not isinstance(rid, str):
        raise InputError(f"{where}: field 'id' must be a string, got {type(rid).__name__} {rid!r}")
    if not rid:
        raise InputError(f"{where}: empty id")
    raise InputError(f"{where}: id {rid!r} contains whitespace (TREC runs and qrels split on it)")


def read_json(path: str | Path, fix: str = ""):
    """A whole JSON file (meta.json, engine.json, `*.gz` read through gzip); a missing, unreadable, non-UTF-8 or
    malformed file raises InputError naming the file (and the line), then `fix` (what to do) when given."""
    path = Path(path)
    then = f"; {fix}" if fix else ""
    try:
        if path.name.endswith(".gz"):
            with open_text(path) as f:  # gzip damage: InputError naming the file
                return json.loads("".join(f))
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: file not found{then}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text{then}") from None
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: invalid JSON ({err.msg}){then}") from None
    except OSError as err:
        raise InputError(f"{path}: unreadable ({err.strerror or err}){then}") from None


def read_jsonl(path: str | Path, lines: TextLines | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object); a malformed line raises InputError naming file:line. `lines`: `path` opened."""
    with lines or open_text(path) as f:
        for lineno, line in enumerate(f, f.lineno + 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)  # faster than json on shard lines (bench/RESULTS.md)
            except orjson.JSONDecodeError:  # json: its error messages, and what it reads beyond JSON (NaN, Infinity)
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise InputError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def read_texts(path: str | Path, allow_empty: bool = False, lines=None) -> Iterator[tuple[str, str]]:
    """Read (id, text) from JSONL ({"id"|"_id"|"qid"|"docid", "text"|"contents"[, "title"]}) or TSV (id<TAB>text).

    TSV lines are split on tabs, nothing quoted: a line with more than one tab is an error (a tab inside a text would
    make its id and text ambiguous). Ids must be non-empty and free of whitespace (`check_id`). Empty texts are an
    error unless `allow_empty` (documents may be empty; queries may not). `lines`: `path` opened (at a `start`).
    """
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    if name.endswith((".tsv", ".txt")):
        with lines or open_text(path) as f:
            for lineno, line in enumerate(f, f.lineno + 1):
                line = line.rstrip("\r\n")
                if not line:
                    continue
                row = line.split("\t")
                if len(row) != 2:
                    raise InputError(f"{path}:{lineno}: expected 2 tab-separated fields 'id<TAB>text', got "
                                     f"{len(row)}" + (" (a tab inside the text?)" if len(row) > 2 else ""))
                rid = check_id(path, lineno, row[0])
                _check_text(path, lineno, rid, row[1], allow_empty)
                yield rid, row[1]
        return
    for lineno, obj in read_jsonl(path, lines):
        id_key = next((k for k in ("id", "_id", "qid", "docid", "pid") if k in obj), None)
        if id_key is None:
            raise InputError(f"{path}:{lineno}: missing field 'id'")
        rid = check_id(path, lineno, obj[id_key])
        text_key = next((k for k in ("text", "contents", "query") if k in obj), None)
        if text_key is None:
            raise InputError(f"{path}:{lineno}: missing field 'text'")
        text, title = obj[text_key], obj.get("title")
        if title:
            if not isinstance(title, str):
                raise InputError(f"{path}:{lineno}: field 'title' must be a string, got {type(title).__name__}")
            _check_text(path, lineno, rid, text, allow_empty=True)
            text = f"{title}: {text}"
        _check_text(path, lineno, rid, text, allow_empty)
        yield rid, text


def _check_text(path, lineno, rid, text, allow_empty):
    if not isinstance(text, str):
        raise InputError(f"{path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
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
    """TREC qrels, `qid iter docid rel` (4 columns, `iter` ignored), or `qid docid rel` (3 columns) throughout: the
    first line fixes the number of columns, so a line missing a field is an error rather than a read with its fields
    shifted; `rel` must be an integer. A (qid, docid) judged twice with other grades is an error (same: kept once)."""
    qrels: dict[str, dict[str, int]] = {}
    columns = first = 0
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if not columns:
                if len(parts) not in (3, 4):
                    raise InputError(f"{path}:{lineno}: expected 4 fields 'qid iter docid rel' (or 3: 'qid docid "
                                     f"rel'), got {len(parts)}")
                columns, first = len(parts), lineno
            elif len(parts) != columns:
                raise InputError(f"{path}:{lineno}: expected {columns} fields like line {first} "
                                 f"({'qid iter docid rel' if columns == 4 else 'qid docid rel'}), got {len(parts)}")
            qid, docid, rel = parts[0], parts[-2], parts[-1]
            try:
                grade = int(rel)
            except ValueError:
                raise InputError(f"{path}:{lineno}: field 'rel' must be an integer, got {rel!r}") from None
            docs = qrels.setdefault(qid, {})
            if docs.get(docid, grade) != grade:
                raise InputError(f"{path}:{lineno}: docid {docid!r} of qid {qid!r} judged again with a different "
                                 f"grade ({docs[docid]} then {grade})")
            docs[docid] = grade
    return qrels


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_script(main) -> None:
    """The `if __name__ == "__main__":` of every script: logging set up one way, then `main()`. A bad config, input
    or model (ConfigError, InputError, ModelLoadError) ends the process with one line `error: <message>` on stderr
    and exit status 1, not a traceback; any other exception keeps its traceback (it is a bug to report)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        main()
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        message = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)


def user_errors() -> tuple[type, ...]:
    """The exception types that mean bad input rather than a bug. ModelLoadError only once lsr_core.backbones is
    loaded: importing it here would import torch into index/search/evaluate, and it cannot be raised before."""
    from lsr_core.config import ConfigError

    backbones = sys.modules.get("lsr_core.backbones")
    return (ConfigError, InputError) + ((backbones.ModelLoadError,) if backbones else ())


def native_bf16() -> bool:
    """Whether bf16 matmuls run natively where our scripts run (CUDA when present, else the CPU): a GPU with bf16, or
    a CPU with AVX512-BF16 or AMX. Elsewhere oneDNN emulates them, many times slower than float32 (bench/RESULTS.md).

    The environment variable LSR_NATIVE_BF16 forces the answer (1: native, 0: emulated; unset or empty: ask the
    hardware), so that one machine can run the tests as the other kind would; `auto` precision resolves through
    here (`resolve_precision`). It is read at every call."""
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


def resolve_precision(cfg, warn: bool = True) -> None:
    """`auto` in model.dtype / train.mixed_precision -> bf16 where this machine computes it natively, else float32 /
    no; an explicit bf16 on a CPU that emulates it gets a warning. The saved config.yaml records the choice."""
    wants_bf16 = {cfg.model.dtype, cfg.train.mixed_precision} & {"auto", "bfloat16", "bf16"}
    if not wants_bf16:
        return
    native = native_bf16()
    if cfg.model.dtype == "auto":
        cfg.model.dtype = "bfloat16" if native else "float32"
    if cfg.train.mixed_precision == "auto":
        cfg.train.mixed_precision = "bf16" if native else "no"
    if warn and not native and wants_bf16 - {"auto"}:
        logging.getLogger(__name__).warning(
            "bf16 requested on a CPU without AVX512-BF16 or AMX: its bf16 matmuls are emulated, many times slower "
            "than float32; 'auto' picks float32 here")


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
    return gloo if deepspeed else {"cpu": True, **gloo}
