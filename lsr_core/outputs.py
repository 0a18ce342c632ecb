"""encode.py's output folder: shard planning (`unfinished`), the settings its shards are made with (`encode_settings`,
`claim_output`: a rerun with other settings is refused), per-shard counts, and `finish` (checks every shard, writes
meta.json and config.yaml, prints the summary line; zeroshot_prompt.py's output too)."""
from __future__ import annotations

import array
import collections
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Iterable

from lsr_core.config import config_hash, save_config
from lsr_core.inputs import local_path
from lsr_core.modeling import RUNTIME_FIELDS
from lsr_core.sparse import (SHARD_PATTERN, flops_from_freqs, nnz_stats, read_doc_freqs, read_meta, read_vectors,
                             shard_name, vocab_hash, write_doc_freqs, write_meta)
from lsr_core.utils import InputError, atomic_write_json, read_json

logger = logging.getLogger(__name__)


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
        before = _flat(read_json(recorded, how))
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


def shard_counts(out: Path, n_shards: int, key: str) -> int | None:
    """The sum of one per-shard count over every shard; None (with a warning) when a shard has no counts file, as
    shards written before the file existed have; a damaged file or one without `key` is an error naming it."""
    total = 0
    for shard in range(n_shards):
        path = counts_path(out, shard)
        if not path.exists():
            logger.warning(f"{path} is missing: {key} not counted for this output")
            return None
        counts = read_json(path, "remove the shard and its counts file and encode again")
        value = counts.get(key) if isinstance(counts, dict) else None
        if type(value) is not int or value < 0:
            raise InputError(f"{path}: '{key}' must be a count, got {value!r}")
        total += value
    return total


def finish(cfg, out: Path, ids: Iterable[str], n_shards: int, is_query: bool, vocab_size: int, todo: int,
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


def summarize(cfg, out: Path, ids: Iterable[str], n_shards: int, is_query: bool, vocab_size: int) -> dict:
    """Check the shards hold every id of the input (`ids`, in input order, iterable twice) once, in its order, and
    gather the stats for meta.json, one vector at a time (documents are counted, not kept; queries are kept for
    their FLOPs)."""
    expected, nnz, df, vectors = iter(ids), array.array("q"), collections.Counter(), []
    in_order = True
    for rid, vec in read_vectors(out):
        in_order = in_order and rid == next(expected, None)
        nnz.append(len(vec))
        if is_query:
            vectors.append(vec)
        else:
            df.update(vec.keys())  # documents holding each token
    in_order = in_order and next(expected, None) is None
    if not in_order or len(list(out.glob("part-*.jsonl.gz"))) != n_shards:
        shard_ids = [rid for rid, _ in read_vectors(out)]  # read again for the message
        missing, repeated = len(set(ids) - set(shard_ids)), len(shard_ids) - len(set(shard_ids))
        order = "" if missing or repeated else ", out of input order"
        raise InputError(f"{out}: shards do not match the input ({missing} ids missing, {repeated} repeated, "
                         f"{len(shard_ids)} written{order}); the folder holds output of another input or shard size: "
                         f"remove it and re-run")
    stats = nnz_stats(nnz)
    meta = {"model": cfg.model.name_or_path, "kind": cfg.encode.kind,
            "input": cfg.encode.input, "vocab_size": vocab_size, "shards": n_shards, **stats,
            "topk": cfg.encode.topk, "threshold": cfg.encode.threshold, "scale": cfg.encode.quant_scale}
    if not is_query:  # counted from the vectors already loaded: queries' FLOPs never reload the corpus
        meta["doc_freqs"] = write_doc_freqs(out, len(nnz), df)
    else:
        docs = Path(cfg.encode.flops_docs) if cfg.encode.flops_docs else out.parent / "corpus"
        if (docs / "meta.json").is_file():
            docs_meta = read_meta(docs)
            name = docs_meta.get("doc_freqs")
            if not isinstance(name, str) or not name:
                logger.warning(f"{docs}: meta.json records no document frequencies (encoded by an older version), so "
                               f"meta.json gets no FLOPs: re-encode the corpus, or run "
                               f"`python -m lsr_core.sparse doc-freqs {docs}` and encode the queries again")
            else:
                path = docs / Path(name).name  # a name, never a path out of the folder
                n_docs, df = read_doc_freqs(path)
                if n_docs != docs_meta.get("count"):
                    raise InputError(f"{path}: counts {n_docs} documents, {docs / 'meta.json'} records "
                                     f"{docs_meta.get('count')}: re-encode the corpus")
                meta["flops"] = flops_from_freqs(n_docs, df, vectors)
                meta["flops_docs"] = str(docs)
    return meta
