"""Score (query, candidate passage) pairs with a reranker into the teacher format {qid: {pid: score}} (JSON.gz), so a
user can swap or scale the teacher (the paper's RQ4: MiniLM-L6 cross-encoder vs RankLLaMA).

    python scripts/teacher_scores.py --model cross-encoder/ms-marco-MiniLM-L-6-v2 \\
        --queries data/msmarco/queries.train.tsv --corpus data/msmarco/collection.tsv \\
        --candidates data/msmarco/candidates.train.tsv --out data/msmarco/scores.minilm.json.gz
    accelerate launch --num_processes 8 scripts/teacher_scores.py \\
        --adapter castorini/rankllama-v1-13b-lora-passage --num-labels 1 \\
        --query-template "query: {text}" --doc-template "document: {text}" \\
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
`--adapter`: a PEFT LoRA adapter (local folder or hub name); it is loaded onto --model (default: the adapter's base
model) and merged into it (merge_and_unload) before scoring, so it costs nothing per batch. `--kind auto` then
follows the adapter's task type (SEQ_CLS: cross_encoder). RankLLaMA's adapter holds a 1-label score head:
`--num-labels 1` makes the base model's head match it.
Processes: under `accelerate launch --num_processes N` (GPUs, or CPU processes with gloo) process r scores the
queries at positions r, r+N, r+2N, ... of the candidates file.
Output: --out, written atomically by the main process once every process is done. Resumable: each process appends
a query's scores as one line to `<out>.partial-<rank>.jsonl` once all its candidates are scored; a rerun (with any
number of processes) skips the queries found in any partial file and drops a last line cut by a kill; an existing
--out is left alone.
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
from lsr_core.backbones import ModelLoadError, load_tokenizer, resolve_model_path  # noqa: E402
from lsr_core.utils import InputError, accelerator_kwargs, atomic_open  # noqa: E402

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


def adapter_config(adapter: str):
    """The PEFT config of `adapter` (local folder or hub name), or a one-line error."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(resolve_model_path(adapter))
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"--adapter {adapter}: not a PEFT adapter ({str(err).splitlines()[0]})") from None


def partial_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.partial-*.jsonl"))


def read_partial(path: Path) -> tuple[dict[str, dict[str, float]], int]:
    """Finished queries of one partial file, and the length in bytes of its complete lines. A last line without
    its newline was cut by a kill: it is left out (that query is scored again); any other bad line is an error."""
    text = path.read_bytes()
    complete = text.rfind(b"\n") + 1
    done: dict[str, dict[str, float]] = {}
    for lineno, line in enumerate(text[:complete].decode("utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
            qid, scores = row["qid"], row["scores"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"{path}:{lineno}: not a line {{\"qid\": ..., \"scores\": {{pid: score}}}}") from None
        if not isinstance(qid, str) or not isinstance(scores, dict):
            raise InputError(f"{path}:{lineno}: 'qid' must be a string and 'scores' a mapping")
        done[qid] = scores
    return done, complete


def read_partials(out: Path) -> dict[str, dict[str, float]]:
    """Finished queries of every process's partial file (of this run or an earlier one, any number of processes)."""
    done: dict[str, dict[str, float]] = {}
    for path in partial_files(out):
        done.update(read_partial(path)[0])
    return done


class Scorer:
    """Batched pair scoring with one model; `__call__(queries, docs) -> float scores [B]`."""

    def __init__(self, args, device: torch.device):
        import transformers

        name = resolve_model_path(args.model)
        config = transformers.AutoConfig.from_pretrained(name)
        archs = getattr(config, "architectures", None) or []
        adapter = adapter_config(args.adapter) if args.adapter else None
        if args.kind != "auto":
            self.kind = args.kind
        elif adapter is not None:  # the base is often a plain causal LM; the adapter says what it was trained as
            self.kind = "cross_encoder" if str(adapter.task_type).endswith("SEQ_CLS") else "causal_lm"
        else:
            self.kind = ("cross_encoder" if any(a.endswith("ForSequenceClassification") for a in archs)
                         else "causal_lm")
        self.device = device
        self.tokenizer = load_tokenizer(args.model)
        cls = (transformers.AutoModelForSequenceClassification if self.kind == "cross_encoder"
               else transformers.AutoModelForCausalLM)
        extra = {"num_labels": args.num_labels} if args.num_labels else {}
        model = cls.from_pretrained(name, dtype=getattr(torch, args.dtype), **extra)
        if self.kind == "cross_encoder" and model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id  # LLM classifiers find the last token by it
        if adapter is not None:
            from peft import PeftModel

            # merged once here: scoring then runs the plain model, as fast as one without an adapter
            model = PeftModel.from_pretrained(model, resolve_model_path(args.adapter)).merge_and_unload()
        self.model = model.to(self.device).eval()
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


def main(argv: list[str] | None = None) -> Path | None:
    from accelerate import Accelerator

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="local folder, hub name or pkg:<module>/<sub>; with --adapter, "
                   "default: the adapter's base model")
    p.add_argument("--adapter", default="", help="PEFT LoRA adapter (folder or hub name), merged into --model")
    p.add_argument("--num-labels", type=int, default=0, help="cross_encoder: labels of the classification head "
                   "(0 = the model's config; RankLLaMA: 1)")
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
    p.add_argument("--device", default="auto", help="auto: this process's accelerator device")
    p.add_argument("--stop-after", type=int, default=0,
                   help="testing aid: each process stops (as if killed) after logging this many queries")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be > 0, got {args.batch_size}")
    if not args.model:
        if not args.adapter:
            raise InputError("--model is required (or --adapter, whose base model is then used)")
        args.model = adapter_config(args.adapter).base_model_name_or_path
    out = Path(args.out)
    if out.is_file():
        print(f"{out} exists: nothing to do")
        return out
    accelerator = Accelerator(**accelerator_kwargs())
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device if args.device == "auto" else torch.device(args.device)

    candidates = read_candidates(args.candidates)
    if args.max_queries:
        candidates = dict(list(candidates.items())[:args.max_queries])
    done = read_partials(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()  # every process has read the partial files before any is changed
    partial = out.parent / f"{out.name}.partial-{rank}.jsonl"
    if partial.is_file():
        complete = read_partial(partial)[1]
        if complete < partial.stat().st_size:  # cut the line a kill tore, so appended lines start on their own
            with open(partial, "r+b") as f:
                f.truncate(complete)
    todo = [(q, c) for i, (q, c) in enumerate(candidates.items()) if i % world == rank and q not in done]
    queries = texts_for(args.queries, {q for q, _ in todo}, source="candidates")
    docs = texts_for(args.corpus, {d for _, c in todo for d in c}, source="candidates")
    pairs = [(q, d) for q, c in todo for d in c]
    logger.info("process %d of %d: %d of %d queries to score (%d done before), %d pairs", rank, world, len(todo),
                len(candidates), len(done), len(pairs))
    scorer = Scorer(args, device)

    started, remaining, pending, logged = time.time(), {q: len(c) for q, c in todo}, {}, 0
    with open(partial, "a") as log, tqdm(total=len(pairs), desc="teacher", unit="pair",
                                         disable=not accelerator.is_main_process) as progress:
        for start in range(0, len(pairs), args.batch_size):
            chunk = pairs[start:start + args.batch_size]
            scores = scorer([queries[q] for q, _ in chunk], [docs[d] for _, d in chunk])
            for (qid, pid), score in zip(chunk, scores):
                pending.setdefault(qid, {})[pid] = score
                remaining[qid] -= 1
                if remaining[qid] == 0:  # a query is logged only once all its candidates are scored
                    log.write(json.dumps({"qid": qid, "scores": pending.pop(qid)}) + "\n")
                    logged += 1
                    if logged == args.stop_after:
                        logger.info("process %d: stopping after %d queries (--stop-after)", rank, logged)
                        return None
            log.flush()
            progress.update(len(chunk))
    accelerator.wait_for_everyone()  # every process's share is in its partial file
    if not accelerator.is_main_process:
        return out
    done = read_partials(out)
    missing = [q for q in candidates if q not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} queries have no scores after every process finished, e.g. {missing[0]}")
    with atomic_open(out) as f:  # .gz: compressed by atomic_open
        json.dump({q: done[q] for q in candidates}, f)
    for path in partial_files(out):
        path.unlink()
    print(f"scored {len(candidates)} queries with {args.model}{' + ' + args.adapter if args.adapter else ''} "
          f"({scorer.kind}) on {world} process(es) in {time.time() - started:.1f}s -> {out}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (InputError, ModelLoadError) as err:
        sys.exit(f"error: {err}")
