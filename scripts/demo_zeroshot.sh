#!/usr/bin/env bash
# `make demo-zeroshot`: SmolLM2-135M-Instruct prompted zero-shot (zeroshot_prompt.py, the paper's RQ1) on the
# Wikipedia known-item collection, next to BM25 and SPLADE-tiny as shipped, on the same documents and queries.
# CPU only. Zero-shot encoding runs at ~1 doc/s on 2 cores, so this uses a fixed subset (bench/zeroshot_ablation.py
# subset: 200 test queries, their 200 articles + 300 random others = 500 docs); the subset is easier than the full
# collection, so compare its rows with each other only. Takes ~3 minutes on an idle 2-core machine.
#   bash scripts/demo_zeroshot.sh --full   # the whole collection and the 960 test queries instead (~17 min idle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY scripts/prepare_wiki.py --out data/wiki
if [ "${1:-}" = --full ]; then
  OUT=runs/demo_zeroshot_full CORPUS=data/wiki/corpus.jsonl QUERIES=data/wiki/queries.test.jsonl QRELS=data/wiki/qrels.test.tsv
else
  OUT=runs/demo_zeroshot CORPUS=data/wiki_zs/corpus.jsonl QUERIES=data/wiki_zs/queries.jsonl QRELS=data/wiki_zs/qrels.tsv
  [ -f $QRELS ] || $PY bench/zeroshot_ablation.py subset
fi
mkdir -p $OUT/search
[ -f $OUT/search/bm25.trec ] || $PY scripts/bm25.py --corpus $CORPUS --queries $QUERIES --out $OUT/search/bm25.trec

# encode -> index -> search; $1 = run name, $2 = encoder script, $3... = its config
retrieve() {
  local name=$1 script=$2; shift 2
  local dir=$OUT/$name common=(--exp.output_dir=$OUT/$name --index.engine=exact "$@")
  [ -f $dir/encode/corpus/meta.json ] || \
    $PY $script "${common[@]}" --encode.input=$CORPUS --encode.kind=doc --encode.shard_size=1000
  [ -f $dir/encode/queries/meta.json ] || \
    $PY $script "${common[@]}" --encode.input=$QUERIES --encode.kind=query
  [ -f $dir/index/exact/meta.json ] || $PY index.py "${common[@]}"
  [ -f $OUT/search/$name.trec ] || \
    $PY search.py "${common[@]}" --search.name=$name --search.output=$OUT/search/$name.trec
}
retrieve splade_tiny encode.py --cfg yamls/demo.yaml --model.dtype=auto
retrieve smollm2_zeroshot zeroshot_prompt.py --cfg yamls/rq1/smollm2_135m.yaml --cfg yamls/zeroshot/next_token.yaml

$PY evaluate.py --qrels $QRELS --out $OUT/eval \
  --run $OUT/search/bm25.trec $OUT/search/splade_tiny.trec $OUT/search/smollm2_zeroshot.trec
