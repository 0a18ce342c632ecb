"""BM25 baseline (bm25s) writing a TREC run, optionally BM25 hard negatives for training.

    python scripts/bm25.py --corpus data/wiki/corpus.jsonl --queries data/wiki/queries.test.jsonl \
        --out data/wiki/test.bm25.trec
    python scripts/bm25.py --corpus data/wiki/corpus.jsonl --queries data/wiki/queries.train.jsonl \
        --out data/wiki/train.bm25.trec --hard-negatives data/wiki/train.bm25.jsonl \
        --qrels data/wiki/qrels.train.tsv --n-neg 8

Inputs: corpus and queries as JSONL/TSV (lsr_core.utils.read_texts: a JSONL title is prepended to the text).
Tokenisation: bm25s's regex tokenizer, lowercased, English stopwords removed, no stemming (a stemmer would need
PyStemmer, which is not a dependency). Scoring: Lucene BM25 (k1 0.9, b 0.4 by default, as Anserini).
Outputs (atomic):
    --out             TREC run `qid Q0 docid rank score bm25`, at most --topk lines a query, ordered as trec_eval
                      orders them (score desc, docid desc); documents sharing no term with the query are left out
    --hard-negatives  one JSON object per query that has a relevant document in --qrels:
                      {"qid": ..., "pos": [relevant docids], "negs": [top --n-neg BM25 docids, none relevant]}
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lsr_core.metrics import trec_order  # noqa: E402
from lsr_core.utils import InputError, atomic_open, load_texts, read_qrels  # noqa: E402

logger = logging.getLogger("bm25")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--queries", required=True)
    parser.add_argument("--out", required=True, help="TREC run file to write")
    parser.add_argument("--topk", type=int, default=1000)
    parser.add_argument("--k1", type=float, default=0.9)
    parser.add_argument("--b", type=float, default=0.4)
    parser.add_argument("--tag", default="bm25")
    parser.add_argument("--hard-negatives", default="", help="JSONL of {qid, pos, negs} to write (needs --qrels)")
    parser.add_argument("--qrels", default="")
    parser.add_argument("--n-neg", type=int, default=8)
    args = parser.parse_args(argv)
    if args.topk <= 0 or args.n_neg <= 0:
        parser.error("--topk and --n-neg must be > 0")
    if args.hard_negatives and not args.qrels:
        parser.error("--hard-negatives needs --qrels")
    import bm25s

    corpus = load_texts(args.corpus, allow_empty=True)
    queries = load_texts(args.queries)
    if not corpus:
        raise InputError(f"{args.corpus}: empty corpus")
    doc_ids = list(corpus)
    retriever = bm25s.BM25(k1=args.k1, b=args.b, method="lucene")
    retriever.index(bm25s.tokenize(list(corpus.values()), stopwords="en", show_progress=False), show_progress=False)
    # Queries as token strings, so they are looked up in the corpus vocabulary (unknown terms are ignored).
    query_tokens = bm25s.tokenize(list(queries.values()), stopwords="en", return_ids=False, show_progress=False)
    k = min(args.topk, len(doc_ids))
    hits, scores = retriever.retrieve(query_tokens, k=k, show_progress=len(queries) > 1000, n_threads=1)

    ranking: dict[str, list[str]] = {}
    with atomic_open(args.out) as f:
        for qid, row_hits, row_scores in zip(queries, hits, scores):
            # Round before ordering, so the rank column is the order trec_eval gives the written scores.
            docs = {doc_ids[h]: round(float(s), 6) for h, s in zip(row_hits, row_scores) if s > 0}
            ranking[qid] = trec_order(docs)
            for rank, docid in enumerate(ranking[qid], 1):
                f.write(f"{qid} Q0 {docid} {rank} {docs[docid]:.6f} {args.tag}\n")
    empty = sum(not docs for docs in ranking.values())
    if empty:
        logger.warning("%d of %d queries retrieved nothing (no term in common with the corpus)", empty, len(queries))
    summary = {"queries": len(queries), "docs": len(doc_ids), "empty_queries": empty}

    if args.hard_negatives:
        qrels = read_qrels(args.qrels)
        written, no_query = 0, 0
        with atomic_open(args.hard_negatives) as f:
            for qid, judged in qrels.items():
                positives = [docid for docid, rel in judged.items() if rel > 0]
                if not positives:
                    continue
                if qid not in ranking:
                    no_query += 1
                    continue
                negatives = [docid for docid in ranking[qid] if judged.get(docid, 0) <= 0][: args.n_neg]
                f.write(json.dumps({"qid": qid, "pos": positives, "negs": negatives}, ensure_ascii=False) + "\n")
                written += 1
        if no_query:
            logger.warning("%d judged queries are not in %s: no hard negatives for them", no_query, args.queries)
        summary.update(hard_negative_queries=written)
    logger.info("bm25: %s -> %s", summary, args.out)
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
