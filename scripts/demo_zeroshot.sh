#!/usr/bin/env bash
# `make demo-zeroshot`: SmolLM2-135M-Instruct prompted zero-shot (zeroshot_prompt.py, the paper's RQ1) on the
# Wikipedia known-item collection, next to BM25 and SPLADE-tiny as shipped, on the same documents and queries.
# CPU only. Zero-shot encoding runs at ~1 doc/s on 2 cores, so this uses a fixed subset (bench/zeroshot_ablation.py
# subset: 200 test queries, their 200 articles + 300 random others = 500 docs); the subset is easier than the full
# collection, so compare its rows with each other only. Takes ~10-15 minutes; steps are skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=runs/demo_zeroshot
SUB=data/wiki_zs
mkdir -p $OUT/search

$PY scripts/prepare_wiki.py --out data/wiki
[ -f $SUB/qrels.tsv ] || $PY bench/zeroshot_ablation.py subset
[ -f $OUT/search/bm25.trec ] || \
  $PY scripts/bm25.py --corpus $SUB/corpus.jsonl --queries $SUB/queries.jsonl --out $OUT/search/bm25.trec

# encode -> index -> search; $1 = run name, $2 = encoder script, $3... = its config
retrieve() {
  local name=$1 script=$2; shift 2
  local dir=$OUT/$name common=(--exp.output_dir=$OUT/$name --index.engine=exact "$@")
  [ -f $dir/encode/corpus/meta.json ] || \
    $PY $script "${common[@]}" --encode.input=$SUB/corpus.jsonl --encode.kind=doc
  [ -f $dir/encode/queries/meta.json ] || \
    $PY $script "${common[@]}" --encode.input=$SUB/queries.jsonl --encode.kind=query
  [ -f $dir/index/exact/meta.json ] || $PY index.py "${common[@]}"
  [ -f $OUT/search/$name.trec ] || \
    $PY search.py "${common[@]}" --search.name=$name --search.output=$OUT/search/$name.trec
}
retrieve splade_tiny encode.py --cfg yamls/demo.yaml --model.dtype=bfloat16
retrieve smollm2_zeroshot zeroshot_prompt.py --cfg yamls/zeroshot/smollm2_135m.yaml

$PY evaluate.py --qrels $SUB/qrels.tsv --out $OUT/eval \
  --run $OUT/search/bm25.trec $OUT/search/splade_tiny.trec $OUT/search/smollm2_zeroshot.trec
