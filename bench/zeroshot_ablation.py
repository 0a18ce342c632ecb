"""SmolLM2 zero-shot ablation on a fixed Wikipedia known-item subset (bench/RESULTS.md, "Zero-shot prompting").

    python bench/zeroshot_ablation.py subset                 # data/wiki_zs/{corpus,queries}.jsonl + qrels.tsv
    python bench/zeroshot_ablation.py cells [chat raw]       # cells from the model runs, index (exact) + search

`subset`: 200 test queries (random.Random(0).sample, sorted by id), their 200 relevant documents, and 300 other
documents sampled with the same generator: 500 documents. Full-collection zero-shot encoding does not fit the time on
2 shared CPU cores (~1 doc/s).
`cells`: the model runs (zeroshot_prompt.py with `--zeroshot.doc_topk=0`, see RESULTS.md) hold every positive
weight; `in_text_only` (where no model run exists with it) and top-k 64/128/all are applied to those stored vectors
with the same rules as zeroshot_prompt.py (`lsr_core.intext`: TextVocabulary, keep_text_terms' fallback; prune's
top-k), so each cell equals a run with those flags (checked: the restricted chat vectors equal the real in_text_only=true run).
Runs go to runs/zs-abl/runs/<prompt>-intext_<on>-k<k>.trec.
"""
import json
import random
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path("runs/zs-abl")


def make_subset(out=Path("data/wiki_zs"), n_queries=200, n_docs=500):
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    queries = [json.loads(line) for line in open("data/wiki/queries.test.jsonl")]
    rel = {q: d for q, _, d, _ in (line.split() for line in open("data/wiki/qrels.test.tsv"))}
    picked = sorted(rng.sample(queries, n_queries), key=lambda q: q["id"])
    rel_docs = {rel[q["id"]] for q in picked}
    corpus = [json.loads(line) for line in open("data/wiki/corpus.jsonl")]
    others = rng.sample([d["id"] for d in corpus if d["id"] not in rel_docs], n_docs - len(rel_docs))
    keep = rel_docs | set(others)
    (out / "corpus.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in corpus
                                              if d["id"] in keep))
    (out / "queries.jsonl").write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in picked))
    (out / "qrels.tsv").write_text("".join(f"{q['id']} 0 {rel[q['id']]} 1\n" for q in picked))


def make_cells(prompts):
    from lsr_core import intext
    from lsr_core.config import load_config
    from lsr_core.inputs import read_input
    from lsr_core.backbones import load_tokenizer
    from lsr_core.sparse import (ShardWriter, id_to_token_list, load_vectors, nnz_stats, read_meta, shard_name,
                                 write_meta)

    cfg = load_config(["--cfg", "yamls/rq1/smollm2_135m.yaml", "--cfg", "yamls/zeroshot/next_token.yaml"])
    tok = load_tokenizer(cfg.model.name_or_path, cfg.model.gguf_file)
    vocab = id_to_token_list(tok)
    ids, texts = read_input("data/wiki_zs/corpus.jsonl", "doc")
    texts = intext.truncate_texts(tok, texts, cfg.model.max_doc_len)
    text_vocab = intext.TextVocabulary(tok)
    allowed = {rid: {vocab[i] for i in text_vocab(t)} for rid, t in zip(ids, texts)}

    def restrict(vec, keep):  # keep_text_terms on positive weights, with its fallback
        return {t: w for t, w in vec.items() if t in keep} or vec

    def topk(vec, k):  # prune(): the k largest weights (0 = all)
        return dict(sorted(vec.items(), key=lambda tw: -tw[1])[:k]) if k else vec

    for prompt in prompts:
        source = dict(zip(*load_vectors(ROOT / f"{prompt}-intext_false/encode/corpus")))
        if prompt == "chat":
            real_ids, real = load_vectors(ROOT / "chat-intext_true/encode/corpus")
            same = sum(restrict(source[r], allowed[r]) == v for r, v in zip(real_ids, real))
            print(f"derived in_text_only == real run for {same}/{len(real)} docs", flush=True)
        for in_text in ("true", "false"):
            for k in (64, 128, 0):
                name = f"{prompt}-intext_{in_text}-k{k or 'all'}"
                out = ROOT / "cells" / name
                writer = ShardWriter(out / "encode/corpus" / shard_name(0))
                for rid in ids:
                    writer.add(rid, topk(restrict(source[rid], allowed[rid]) if in_text == "true" else source[rid], k))
                stats = writer.close()
                # index.py checks the folder against its meta.json: the source's, with this cell's counts
                write_meta(out / "encode/corpus", {**read_meta(ROOT / f"{prompt}-intext_false/encode/corpus"),
                                                   "shards": 1, "topk": k, **nnz_stats(stats["nnz"])})
                base = [f"--exp.output_dir={out}", f"--exp.name={name}", "--index.engine=exact"]
                subprocess.run([sys.executable, "index.py", *base], check=True)
                subprocess.run([sys.executable, "search.py", *base,
                                f"--search.queries={ROOT / f'{prompt}-intext_{in_text}/encode/queries'}",
                                "--search.latency_sample=0", f"--search.output={ROOT / 'runs' / (name + '.trec')}"],
                               check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["subset"]:
        make_subset()
    elif sys.argv[1:2] == ["cells"]:
        make_cells(sys.argv[2:] or ["chat", "raw"])
    else:
        sys.exit(__doc__)
