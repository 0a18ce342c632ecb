"""Write MS MARCO passage in the project's training/evaluation format, with a checksum manifest (the paper's data).

    python scripts/prepare_msmarco.py --out data/msmarco                                  # from ir_datasets
    python scripts/prepare_msmarco.py --out data/msmarco --collection collection.tsv \\
        --queries-train queries.train.tsv --qrels-train qrels.train.tsv \\
        --queries-dev queries.dev.small.tsv --qrels-dev qrels.dev.small.tsv \\
        [--queries-dl19 F --qrels-dl19 F --queries-dl20 F --qrels-dl20 F]                  # from local files
    python scripts/prepare_msmarco.py --out data/msmarco --ce-scores cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz \\
        --trust-pickle [--rankllama-scores rankllama.json.gz] [--hard-negatives bm25.train.trec]
    python scripts/prepare_msmarco.py --out DIR --tiny [--tiny-models DIR2]             # CI fixture (lsr_core/tiny.py)
    python scripts/prepare_msmarco.py --out data/msmarco --verify                        # re-hash every file

Sources: `ir_datasets` ids msmarco-passage (collection), msmarco-passage/train, msmarco-passage/dev/small,
msmarco-passage/trec-dl-2019/judged, msmarco-passage/trec-dl-2020/judged (ir_datasets downloads and caches them
itself); any file given on the command line replaces the ir_datasets source of that file.
Outputs in --out, each written atomically, then recorded in manifest.json {name: {sha256, lines, bytes, source}}:
    collection.tsv                         pid<TAB>text
    queries.{train,dev,dl19,dl20}.tsv      qid<TAB>text
    qrels.{train,dev,dl19,dl20}.tsv        TREC qrels `qid 0 pid rel` (DL: graded 0-3)
    queries.eval.tsv                       dev + dl19 + dl20 queries in one file (their ids are disjoint), so each
                                           model encodes and searches once and evaluate.py scores each qrels
    scores.minilm.json.gz                  teacher {qid: {pid: score}} from the cross-encoder pickle (--ce-scores;
                                           the pickle is only opened with --trust-pickle: it can run code)
    scores.rankllama.json.gz               teacher from RankLLaMA score files (--rankllama-scores: JSON(.gz)
                                           {qid: {pid: score}}, or a TREC run / `qid pid score` TSV)
    candidates.train.tsv                   qid<TAB>pid hard-negative candidates (--hard-negatives: TREC run,
                                           `qid pid` TSV, or triples `qid pos neg`) for scripts/teacher_scores.py
Resumable: a file already in the manifest with its recorded size is skipped (--verify re-hashes). Counts are checked
against the official ones (EXPECTED) when the data comes from the full MS MARCO; a mismatch is an error with --strict.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lsr_core.data import load_teacher_scores  # noqa: E402
from lsr_core.utils import InputError, atomic_open, atomic_write_json, open_text, read_qrels, read_texts  # noqa: E402

logger = logging.getLogger("prepare_msmarco")

IRDS = {"collection": "msmarco-passage", "train": "msmarco-passage/train", "dev": "msmarco-passage/dev/small",
        "dl19": "msmarco-passage/trec-dl-2019/judged", "dl20": "msmarco-passage/trec-dl-2020/judged"}
# line counts of the official files (qrels: judgements, not queries)
EXPECTED = {"collection.tsv": 8_841_823, "queries.train.tsv": 808_731, "qrels.train.tsv": 532_761,
            "queries.dev.tsv": 6_980, "qrels.dev.tsv": 7_437, "queries.dl19.tsv": 43, "qrels.dl19.tsv": 9_260,
            "queries.dl20.tsv": 54, "qrels.dl20.tsv": 11_386}
EVAL_SETS = ("dev", "dl19", "dl20")


# ------------------------------------------------------------------------------------------------------ manifest
def sha256(path: Path) -> tuple[str, int]:
    digest, lines = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            lines += block.count(b"\n") if not path.name.endswith(".gz") else 0
    return digest.hexdigest(), lines


class Manifest:
    def __init__(self, out: Path):
        self.path = out / "manifest.json"
        self.out = out
        self.files = json.loads(self.path.read_text())["files"] if self.path.is_file() else {}

    def done(self, name: str) -> bool:
        entry, path = self.files.get(name), self.out / name
        return entry is not None and path.is_file() and path.stat().st_size == entry["bytes"]

    def record(self, name: str, source: str, count: int | None = None) -> None:
        path = self.out / name
        digest, lines = sha256(path)
        if count is None and name.endswith(".json.gz"):
            count = len(load_teacher_scores(path))
        self.files[name] = {"sha256": digest, "lines": lines if count is None else count,
                            "bytes": path.stat().st_size, "source": source}
        atomic_write_json(self.path, {"files": self.files})

    def verify(self) -> list[str]:
        bad = []
        for name, entry in self.files.items():
            path = self.out / name
            if not path.is_file() or sha256(path)[0] != entry["sha256"]:
                bad.append(name)
        return bad


# ------------------------------------------------------------------------------------------------------- writers
def write_texts(path: Path, rows) -> int:
    n = 0
    with atomic_open(path) as f:
        for rid, text in rows:
            # the tsv has no quoting: tabs and newlines inside a text would shift fields
            f.write(f"{rid}\t{' '.join(text.split())}\n")
            n += 1
    return n


def write_qrels(path: Path, rows) -> int:
    n = 0
    with atomic_open(path) as f:
        for qid, pid, rel in rows:
            f.write(f"{qid} 0 {pid} {int(rel)}\n")
            n += 1
    return n


def write_scores(path: Path, scores: dict) -> int:
    with atomic_open(path) as f:  # .gz: atomic_open compresses
        json.dump({str(q): {str(p): float(s) for p, s in c.items()} for q, c in scores.items()}, f)
    return len(scores)


def read_score_file(path: str, trust_pickle: bool) -> dict:
    """{qid: {pid: score}} from JSON(.gz)/pickle (lsr_core.data), a TREC run, or a `qid pid score` TSV."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith((".json", ".pkl", ".pickle")):
        return load_teacher_scores(path, trust_pickle)
    scores: dict = {}
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 6:  # qid Q0 pid rank score tag
                qid, pid, score = parts[0], parts[2], parts[4]
            elif len(parts) == 3:
                qid, pid, score = parts
            else:
                raise InputError(f"{path}:{lineno}: expected a TREC run line or 'qid pid score'")
            try:
                scores.setdefault(qid, {})[pid] = float(score)
            except ValueError:
                raise InputError(f"{path}:{lineno}: score must be a number, got {score!r}") from None
    return scores


def read_candidates(path: str):
    """(qid, pid) pairs from a TREC run, `qid pid` TSV, or `qid pos neg` triples (the negative is the candidate)."""
    seen = set()
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) == 6:
                pair = parts[0], parts[2]
            elif len(parts) in (2, 3):
                pair = parts[0], parts[-1]
            else:
                raise InputError(f"{path}:{lineno}: expected a TREC run line, 'qid pid' or 'qid pos neg'")
            if pair not in seen:
                seen.add(pair)
                yield pair


# ------------------------------------------------------------------------------------------------------- sources
def irds_source(split: str, what: str):
    import ir_datasets

    dataset = ir_datasets.load(IRDS[split])
    if what == "docs":
        return ((d.doc_id, d.text) for d in dataset.docs_iter())
    if what == "queries":
        return ((q.query_id, q.text) for q in dataset.queries_iter())
    return ((q.query_id, q.doc_id, q.relevance) for q in dataset.qrels_iter())


def local_qrels(path: str):
    return ((qid, pid, rel) for qid, docs in read_qrels(path).items() for pid, rel in docs.items())


def tiny_fixture(out: Path, models: Path | None, write_data: bool = True) -> None:
    """An MS MARCO-shaped set from lsr_core/tiny.py's collection (48 docs, 8 topics x 6): queries i<4 of each topic
    train, i>=4 dev; dl19/dl20 = the dev queries of topics 0-3 / 4-7 under new ids with graded qrels (3 = the known
    item, 1 = the other documents of its topic); teacher scores = word overlap + 5 for the positive + noise, over the
    positive and 7 other documents."""
    import tempfile

    from lsr_core import tiny

    with tempfile.TemporaryDirectory() as src:
        coll = tiny.make_collection(src)
    corpus = {d["id"]: d["text"] for d in coll["corpus"]}
    queries = {q["id"]: q["text"] for q in coll["queries"]}
    split = {qid: "train" if int(qid.split("_")[1]) < 4 else "dev" for qid in queries}
    rng = random.Random(0)
    files = {"collection.tsv": list(corpus.items())}
    for name in ("train", "dev"):
        files[f"queries.{name}.tsv"] = [(q, t) for q, t in queries.items() if split[q] == name]
        files[f"qrels.{name}.tsv"] = [(q, q.replace("q", "d", 1), 1) for q in queries if split[q] == name]
    for name, topics in (("dl19", range(0, 4)), ("dl20", range(4, 8))):
        dev = [q for q in queries if split[q] == "dev" and int(q[1:].split("_")[0]) in topics]
        files[f"queries.{name}.tsv"] = [(f"{name}_{q}", queries[q]) for q in dev]
        files[f"qrels.{name}.tsv"] = [(f"{name}_{q}", d, 3 if d == q.replace("q", "d", 1) else 1)
                                      for q in dev for d in corpus if d.split("_")[0] == q.replace("q", "d", 1).split("_")[0]]
    scores, candidates = {}, []
    for qid, text in files["queries.train.tsv"]:
        pos = qid.replace("q", "d", 1)
        cands = [pos] + rng.sample([d for d in corpus if d != pos], 7)
        words = set(text.split())
        scores[qid] = {d: len(words & set(corpus[d].split())) + 5.0 * (d == pos) + rng.random() for d in cands}
        candidates += [(qid, d) for d in cands]
    for name, rows in files.items() if write_data else ():
        (write_qrels if name.startswith("qrels") else write_texts)(out / name, rows)
    if write_data:
        write_scores(out / "scores.minilm.json.gz", scores)
        with atomic_open(out / "candidates.train.tsv") as f:
            f.writelines(f"{q}\t{d}\n" for q, d in candidates)
    if models is not None:
        words = coll["words"] + ["yes", "no", "query:", "document:"]
        for arch in ("bert", "t5", "opt", "llama"):
            if not (models / arch / "config.json").is_file():
                tiny.make_model(models / arch, arch, words)
        if not (models / "ce" / "config.json").is_file():
            make_tiny_cross_encoder(models / "ce", tiny, words)


def make_tiny_cross_encoder(folder: Path, tiny, words: list[str]) -> Path:
    """A tiny random BertForSequenceClassification (1 label) + word tokenizer: the stand-in teacher of --tiny runs."""
    import torch
    import transformers

    from tokenizers import processors

    tok = tiny.make_tokenizer(folder, "encoder", words)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(  # a cross-encoder reads text pairs
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=256, num_labels=1,
                                  pad_token_id=tok.pad_token_id)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="data/msmarco")
    p.add_argument("--tiny", action="store_true", help="build the CI fixture from lsr_core/tiny.py instead")
    p.add_argument("--tiny-models", default="", help="with --tiny: also save tiny random models into this folder")
    p.add_argument("--collection")
    for split in ("train", *EVAL_SETS):
        p.add_argument(f"--queries-{split}")
        p.add_argument(f"--qrels-{split}")
    p.add_argument("--no-irds", action="store_true", help="never fall back to ir_datasets for a file not given")
    p.add_argument("--ce-scores", help="cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz (or JSON)")
    p.add_argument("--trust-pickle", action="store_true", help="allow opening a pickle teacher file (runs code)")
    p.add_argument("--rankllama-scores", help="RankLLaMA scores: JSON(.gz) {qid: {pid: score}}, TREC run or TSV")
    p.add_argument("--hard-negatives", help="BM25/given candidates: TREC run, 'qid pid' or 'qid pos neg' lines")
    p.add_argument("--strict", action="store_true", help="a count different from the official one is an error")
    p.add_argument("--verify", action="store_true", help="re-hash every file in the manifest and exit")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    if args.verify:
        bad = manifest.verify()
        if bad:
            raise InputError(f"{out}: checksum mismatch or missing: {', '.join(bad)}")
        logger.info("%s: %d files match manifest.json", out, len(manifest.files))
        return manifest.files

    if args.tiny:
        names = [*EXPECTED, "scores.minilm.json.gz", "candidates.train.tsv"]
        todo = not all(manifest.done(n) for n in names)
        if todo or args.tiny_models:
            tiny_fixture(out, Path(args.tiny_models) if args.tiny_models else None, write_data=todo)
        for name in names if todo else ():
            manifest.record(name, "lsr_core/tiny.py")
    else:
        plan = [("collection.tsv", args.collection, lambda f: read_texts(f, allow_empty=True),
                 lambda: irds_source("collection", "docs"), write_texts)]
        for split in ("train", *EVAL_SETS):
            plan.append((f"queries.{split}.tsv", getattr(args, f"queries_{split}"), read_texts,
                         lambda s=split: irds_source(s, "queries"), write_texts))
            plan.append((f"qrels.{split}.tsv", getattr(args, f"qrels_{split}"), local_qrels,
                         lambda s=split: irds_source(s, "qrels"), write_qrels))
        for name, local, read_local, read_irds, write in plan:
            if manifest.done(name):
                logger.info("%s: done (in manifest.json), skipped", name)
                continue
            if local is None and args.no_irds:
                logger.warning("%s: no local file given and --no-irds: skipped", name)
                continue
            source = local or f"irds:{IRDS[name.split('.')[1] if name != 'collection.tsv' else 'collection']}"
            logger.info("%s <- %s", name, source)
            count = write(out / name, read_local(local) if local else read_irds())
            manifest.record(name, source)
            if name in EXPECTED and count != EXPECTED[name]:
                message = f"{name}: {count} lines, the official file has {EXPECTED[name]}"
                if args.strict:
                    raise InputError(message)
                logger.warning(message)

    teachers = [("scores.minilm.json.gz", args.ce_scores), ("scores.rankllama.json.gz", args.rankllama_scores)]
    for name, src in teachers:
        if src and not manifest.done(name):
            if src.endswith((".pkl", ".pkl.gz", ".pickle", ".pickle.gz")) and not args.trust_pickle:
                raise InputError(f"{src}: a pickle can run arbitrary code when opened; pass --trust-pickle if you "
                                 f"trust its source (it is converted to JSON once: {out / name})")
            n = write_scores(out / name, read_score_file(src, args.trust_pickle))
            manifest.record(name, src, count=n)
            logger.info("%s: %d queries with teacher scores", name, n)
    if args.hard_negatives and not manifest.done("candidates.train.tsv"):
        with atomic_open(out / "candidates.train.tsv") as f:
            f.writelines(f"{q}\t{d}\n" for q, d in read_candidates(args.hard_negatives))
        manifest.record("candidates.train.tsv", args.hard_negatives)

    # one query file for every evaluation set: each model encodes and searches once
    if not manifest.done("queries.eval.tsv"):
        merged: dict[str, str] = {}
        for split in EVAL_SETS:
            path = out / f"queries.{split}.tsv"
            for qid, text in read_texts(path) if path.is_file() else ():
                if merged.setdefault(qid, text) != text:
                    raise InputError(f"{path}: query id '{qid}' also in another set with a different text")
        if merged:
            write_texts(out / "queries.eval.tsv", merged.items())
            manifest.record("queries.eval.tsv", "+".join(EVAL_SETS))
    summary = {name: entry["lines"] for name, entry in sorted(manifest.files.items())}
    print(f"prepared {out}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return manifest.files


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except InputError as err:
        sys.exit(f"error: {err}")
