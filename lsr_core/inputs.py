"""What encode.py and zeroshot_prompt.py read before they encode: the input texts (`InputTexts`, a range of rows at a
time; `read_input`, all of them) and the model to encode with (`resolve_model_path`), and `local_path`, the form of a
path that meta.json and settings record."""
from __future__ import annotations

import array
import itertools
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from lsr_core.config import ConfigError
from lsr_core.backbones import ModelLoadError
from lsr_core.backbones import resolve_model_path as package_path
from lsr_core.utils import InputError, TextLines, check_id, open_text, read_texts


CHECKPOINT = 1024  # rows between the file offsets `InputTexts` keeps: a range's read skips fewer rows than that


def read_input(path: str, kind: str) -> tuple[list[str], list[str]]:
    """(ids, texts) of every row of `InputTexts(path, kind)`, in memory (zeroshot_prompt.py, small inputs)."""
    source = InputTexts(path, kind)
    return source.read(0, len(source))


class InputTexts:
    """An input's (id, text) rows (JSONL/TSV, .gz too; a HF `datasets` file: .parquet/.arrow/.csv with id and text
    columns; `irds:<ir_datasets id>`: docs for kind=doc, queries for kind=query), checked in one streaming pass when
    made, then read a range of rows at a time (`read`), so that a corpus never sits in memory whole.

    Duplicate ids are an error, empty queries too (empty docs are kept). Ids must be non-empty and free of whitespace
    (`check_id`); errors name the file's line, or a table's row. The first pass keeps one 8-byte hash per id (a
    repeated hash is looked up again by id) and, in a file, the offset of every `CHECKPOINT`-th row: `read` seeks
    there (a .gz file decompresses its way from the start, unless the range follows the last one read), an irds
    corpus slices `docs_iter()` where the dataset can (else it skips), a table selects its rows. A file that changes
    after the first pass is an error when read."""

    def __init__(self, path: str, kind: str):
        self.path, self.kind, self.allow_empty = path, kind, kind == "doc"
        self.table_rows = path.startswith("irds:") or path.endswith((".parquet", ".arrow", ".csv"))  # rows, not lines
        if path.startswith("irds:"):
            import ir_datasets

            self.source = ir_datasets.load(path[len("irds:"):])
        elif self.table_rows:
            import datasets

            self.source = datasets.load_dataset(path.rsplit(".", 1)[-1], data_files=path, split="train")
            self.id_col = next((c for c in ("id", "_id", "docid", "qid") if c in self.source.column_names), None)
            if self.id_col is None or "text" not in self.source.column_names:
                raise InputError(f"{path}: needs an id column (id/_id/docid/qid) and a 'text' column, "
                                 f"found {self.source.column_names}")
        else:
            self.marks, self.stat = [(0, 0)], _stat(path)  # marks[i]: (offset, lines) before row i * CHECKPOINT
        self.cursor = (-1, None)  # (next row, the rows from there) of a file's last read
        hashes = array.array("q", (hash(rid) for rid, _ in self._rows(0, None, scan=True)))
        self.count = len(hashes)
        if not hashes:
            raise InputError(f"{path}: no texts")
        ordered = np.frombuffer(hashes, np.int64)
        ordered.sort()  # in place: no second copy of the hashes
        twice = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
        del ordered, hashes
        seen = set()  # only the ids whose hash came twice: a true duplicate, or (rarely) two ids of one hash
        for row, (rid, _) in enumerate(self._rows(0, None) if twice else (), 1):
            if hash(rid) in twice:
                if rid in seen:
                    raise InputError(f"{path}: {f'row {row}: ' if self.table_rows else ''}duplicate id '{rid}'")
                seen.add(rid)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        """The ids, in input order (one more pass over the input)."""
        return (rid for rid, _ in self._rows(0, None))

    def read(self, lo: int, hi: int) -> tuple[list[str], list[str]]:
        """(ids, texts) of rows lo..hi-1 (0-based). A file read on from the previous range (one process's shards)
        goes on where that read stopped: a .gz file is not decompressed from its start again."""
        ids, texts = [], []
        if self.table_rows or self.cursor[0] != lo or _stat(self.path) != self.stat:
            self.cursor = (lo, self._rows(lo, None if not self.table_rows else hi))
        for rid, text in itertools.islice(self.cursor[1], hi - lo):
            ids.append(rid)
            texts.append(text)
        self.cursor = (hi, self.cursor[1])
        if len(ids) != hi - lo:
            raise InputError(f"{self.path}: has fewer than {hi} texts now, {self.count} when encoding began: the "
                             f"input changed; restore it, or encode it again with encode.overwrite=true")
        return ids, texts

    def _rows(self, lo: int, hi: int | None, scan: bool = False) -> Iterator[tuple[str, str]]:
        """(id, text) of rows lo..hi-1 (hi None: to the end), checked; `scan`: the first pass, which keeps marks."""
        if not self.table_rows:
            yield from self._lines(lo, scan)
            return
        if self.path.startswith("irds:") and self.kind == "doc":
            docs = self.source.docs_iter()
            rows = ((d.doc_id, irds_doc_text(d)) for d in (docs[lo:hi] if lo and hasattr(docs, "__getitem__")
                                                          else itertools.islice(docs, lo, hi)))
        elif self.path.startswith("irds:"):
            rows = ((q.query_id, q.text) for q in itertools.islice(self.source.queries_iter(), lo, hi))
        else:
            hi = len(self.source) if hi is None else hi
            table = self.source.select(range(lo, hi)) if (lo, hi) != (0, len(self.source)) else self.source
            rows = ((r[self.id_col], "" if r["text"] is None else r["text"]) for r in table)
        for row, (rid, text) in enumerate(rows, lo + 1):
            rid = check_id(self.path, row, rid, row=True)
            if not isinstance(text, str):
                raise InputError(f"{self.path}: row {row}: field 'text' must be a string, got {type(text).__name__}")
            if not self.allow_empty and not text.strip():
                raise InputError(f"{self.path}: row {row}: empty query text for id '{rid}'")
            yield rid, text

    def _lines(self, lo: int, scan: bool) -> Iterator[tuple[str, str]]:
        """`_rows` of a JSONL/TSV file (`read_texts` checks each line, naming file:line), from the mark before `lo`."""
        if not scan and _stat(self.path) != self.stat:
            raise InputError(f"{self.path}: changed since encoding began (size or modification time): restore it, or "
                             f"encode it again with encode.overwrite=true")
        row = lo - lo % CHECKPOINT
        with TextLines(Path(self.path), self.marks[row // CHECKPOINT]) as lines:
            for rid, text in read_texts(Path(self.path), self.allow_empty, lines):
                if row >= lo:
                    yield rid, text
                row += 1
                if scan and row % CHECKPOINT == 0:
                    self.marks.append((lines.file.tell(), lines.lineno))


def _stat(path: str) -> tuple[int, int]:
    """(size, modification time) of a file that exists (`open_text` names one that does not)."""
    with open_text(path):
        info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def join_title(title, text: str) -> str:
    """A document's title and text as one text, as BEIR's models see it: `title + " " + text` when the title is not
    empty, else the text."""
    # BEIR's SentenceBERT and SPLADE models encode `(title + sep + text).strip()` with sep " " (beir-cellar/beir,
    # beir/retrieval/models/sentence_bert.py and splade.py), as ir_datasets' BEIR docs' default_text() does: a
    # BEIR score compares with others only on the same text
    if isinstance(title, str) and title.strip():
        return f"{title} {text}".strip()
    return text


def irds_doc_text(doc) -> str:
    """The text of an ir_datasets document of any docs type: its `text` (or `body`), after its `title` where the
    type has one (BeirTitleDoc, MsMarcoDocument, WapoDoc, ...)."""
    return join_title(getattr(doc, "title", None), getattr(doc, "text", "") or getattr(doc, "body", "") or "")


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
