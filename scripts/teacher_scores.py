"""Score (query, candidate passage) pairs with a reranker into the teacher format {qid: {pid: score}} (JSON.gz), so a
user can swap or scale the teacher (the paper's RQ4: MiniLM-L6 cross-encoder vs RankLLaMA).

    python scripts/teacher_scores.py --model cross-encoder/ms-marco-MiniLM-L-6-v2 \\
        --queries data/msmarco/queries.train.tsv --corpus data/msmarco/collection.tsv \\
        --candidates data/msmarco/candidates.train.tsv --out data/msmarco/scores.minilm.json.gz
    python scripts/teacher_scores.py --model <Llama-2-7b with castorini/rankllama-v1-7b-lora-passage merged> \\
        --kind cross_encoder --query-template "query: {text}" --doc-template "document: {text}" \\
        --dtype bfloat16 ... --out data/msmarco/scores.rankllama.json.gz
    python scripts/teacher_scores.py --model <any instruction LLM> --kind causal_lm ...

Kinds (`--kind auto` picks cross_encoder when the model's architecture ends in ForSequenceClassification):
  cross_encoder  AutoModelForSequenceClassification on the pair (query, passage). Score = the logit when the model
                 has one label (MS MARCO cross-encoders; RankLLaMA, whose LlamaForSequenceClassification reads the
                 last token), or logit[1] - logit[0] with two labels.
  causal_lm      AutoModelForCausalLM on `--prompt` (with {query} and {doc}); score = the next-token logit of the
                 first of `--yes-tokens` that is a single token in the vocabulary ("yes", then "true" variants).
                 We take the raw "yes" logit, not log P(yes) or yes-minus-no: it is what a pointwise LLM reranker
                 exposes without a second class, and MarginMSE only uses score differences within a query.
Inputs: queries and corpus as id/text TSV or JSONL; candidates as a TREC run, `qid pid` TSV, `qid pos neg`
triples (the negative is kept), or an existing teacher JSON(.gz) (its pairs are re-scored). Every qrels positive
must be among a query's candidates for the training loader to use the query (lsr_core.data: msmarco format).
Output: --out, written atomically at the end. Resumable: finished queries are appended to `<out>.partial.jsonl`
as they complete; a rerun skips them, and an existing --out is left alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lsr_core.data import load_teacher_scores, texts_for  # noqa: E402
from lsr_core.modeling import load_tokenizer, resolve_model_path  # noqa: E402
from lsr_core.utils import InputError, atomic_open  # noqa: E402

logger = logging.getLogger("teacher_scores")

DEFAULT_PROMPT = ("Query: {query}\nPassage: {doc}\nIs the passage relevant to the query? Answer yes or no.\n"
                  "Answer:")
DEFAULT_YES = ["yes", " yes", "Yes", " Yes", "true", " true", "True", " True"]


def read_candidates(path: str) -> dict[str, list[str]]:
    """qid -> candidate pids in file order, without duplicates."""
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".json"):
        return {q: list(c) for q, c in load_teacher_scores(path).items()}
    sys.path.insert(0, str(ROOT / "scripts"))
    from prepare_msmarco import read_candidates as pairs

    out: dict[str, list[str]] = {}
    for qid, pid in pairs(path):
        out.setdefault(qid, []).append(pid)
    return out


class Scorer:
    """Batched pair scoring with one model; `__call__(queries, docs) -> float scores [B]`."""

    def __init__(self, args):
        import transformers

        name = resolve_model_path(args.model)
        config = transformers.AutoConfig.from_pretrained(name)
        archs = getattr(config, "architectures", None) or []
        self.kind = args.kind if args.kind != "auto" else (
            "cross_encoder" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm")
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(args.model)
        cls = (transformers.AutoModelForSequenceClassification if self.kind == "cross_encoder"
               else transformers.AutoModelForCausalLM)
        self.model = cls.from_pretrained(name, dtype=getattr(torch, args.dtype)).to(self.device).eval()
        if self.kind == "cross_encoder" and self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id  # LLM classifiers find the last token by it
        self.args = args
        if self.kind == "causal_lm":
            self.tokenizer.padding_side = "left"  # the last position is the next-token position in every row
            self.yes_id = self._yes_id(args.yes_tokens)

    def _yes_id(self, words: list[str]) -> int:
        for word in words:
            ids = self.tokenizer.encode(word, add_special_tokens=False)
            if len(ids) == 1 and ids[0] != self.tokenizer.unk_token_id:
                logger.info("causal_lm: score = next-token logit of %r (id %d)", word, ids[0])
                return ids[0]
        raise InputError(f"none of --yes-tokens {words} is a single token of {self.args.model}'s vocabulary")

    @torch.inference_mode()
    def __call__(self, queries: list[str], docs: list[str]) -> list[float]:
        a = self.args
        if self.kind == "cross_encoder":
            batch = self.tokenizer([a.query_template.replace("{text}", q) for q in queries],
                                   [a.doc_template.replace("{text}", d) for d in docs],
                                   padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
            logits = self.model(**batch.to(self.device)).logits.float()
            scores = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        else:
            prompts = [a.prompt.replace("{query}", q).replace("{doc}", d) for q, d in zip(queries, docs)]
            batch = self.tokenizer(prompts, padding=True, truncation=True, max_length=a.max_length,
                                   return_tensors="pt").to(self.device)
            logits = self.model(**batch, use_cache=False).logits[:, -1].float()
            scores = logits[:, self.yes_id]
        return scores.cpu().tolist()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local folder, hub name or pkg:<module>/<sub>")
    p.add_argument("--kind", default="auto", choices=["auto", "cross_encoder", "causal_lm"])
    p.add_argument("--queries", required=True)
    p.add_argument("--corpus", required=True)
    p.add_argument("--candidates", required=True)
    p.add_argument("--out", required=True, help="teacher file, .json.gz")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--query-template", default="{text}", help="cross_encoder: first segment")
    p.add_argument("--doc-template", default="{text}", help="cross_encoder: second segment")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="causal_lm: prompt with {query} and {doc}")
    p.add_argument("--yes-tokens", nargs="+", default=DEFAULT_YES)
    p.add_argument("--max-queries", type=int, default=0, help="score only the first N queries (0 = all)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be > 0, got {args.batch_size}")
    out = Path(args.out)
    if out.is_file():
        print(f"{out} exists: nothing to do")
        return out
    partial = Path(f"{out}.partial.jsonl")

    candidates = read_candidates(args.candidates)
    if args.max_queries:
        candidates = dict(list(candidates.items())[:args.max_queries])
    done: dict[str, dict[str, float]] = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the job was killed: that query is redone
                break
            done[row["qid"]] = row["scores"]
        partial.write_text("".join(json.dumps({"qid": q, "scores": s}) + "\n" for q, s in done.items()))
    todo = [(q, c) for q, c in candidates.items() if q not in done]
    queries = texts_for(args.queries, {q for q, _ in todo}, source="candidates")
    docs = texts_for(args.corpus, {d for _, c in todo for d in c}, source="candidates")
    pairs = [(q, d) for q, c in todo for d in c]
    logger.info("%d queries (%d done before), %d pairs to score", len(candidates), len(done), len(pairs))
    scorer = Scorer(args)

    started, remaining, pending = time.time(), {q: len(c) for q, c in todo}, {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "a") as log, tqdm(total=len(pairs), desc="teacher", unit="pair") as progress:
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            scores = scorer([queries[q] for q, _ in chunk], [docs[d] for _, d in chunk])
            for (qid, pid), score in zip(chunk, scores):
                pending.setdefault(qid, {})[pid] = score
                remaining[qid] -= 1
                if remaining[qid] == 0:  # a query is logged only once all its candidates are scored
                    log.write(json.dumps({"qid": qid, "scores": pending.pop(qid)}) + "\n")
            log.flush()
            progress.update(len(chunk))
    for line in partial.read_text().splitlines():
        row = json.loads(line)
        done[row["qid"]] = row["scores"]
    with atomic_open(out) as f:  # .gz: compressed by atomic_open
        json.dump({q: done[q] for q in candidates if q in done}, f)
    partial.unlink()
    print(f"scored {len(pairs)} pairs of {len(candidates)} queries with {args.model} ({scorer.kind}) in "
          f"{time.time() - started:.1f}s -> {out}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except InputError as err:
        sys.exit(f"error: {err}")
