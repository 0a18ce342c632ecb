#!/usr/bin/env bash
# The main job (`make demo`): on the offline Wikipedia known-item collection, compare BM25, SPLADE-tiny as shipped,
# and SPLADE-tiny fine-tuned on the train split; print the table for the test split and write
# runs/demo/eval/metrics.json. CPU only. Each step is skipped when its output exists, so a rerun resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WIKI=data/wiki
OUT=runs/demo
ENGINE=${ENGINE:-$($PY -c "from lsr_core.config import IndexConfig; print(IndexConfig().engine)")}
mkdir -p $OUT/search
step() { echo; echo "== $*"; }

step "collection"
$PY scripts/prepare_wiki.py --out $WIKI

step "BM25 (test run, and hard negatives for the train split)"
[ -f $OUT/search/bm25.trec ] || \
  $PY scripts/bm25.py --corpus $WIKI/corpus.jsonl --queries $WIKI/queries.test.jsonl --out $OUT/search/bm25.trec
[ -f $WIKI/train.bm25.jsonl ] || \
  $PY scripts/bm25.py --corpus $WIKI/corpus.jsonl --queries $WIKI/queries.train.jsonl --out $WIKI/train.bm25.trec \
    --qrels $WIKI/qrels.train.tsv --hard-negatives $WIKI/train.bm25.jsonl --n-neg 8

# encode -> index -> search for one model; $1 = run name, $2 = experiment folder, $3... = extra config overrides
retrieve() {
  local name=$1 dir=$2; shift 2
  local common=(--cfg yamls/demo.yaml --exp.output_dir=$dir --model.dtype=auto "$@")
  [ -f $dir/encode/corpus/meta.json ] || \
    $PY encode.py "${common[@]}" --encode.input=$WIKI/corpus.jsonl --encode.kind=doc
  [ -f $dir/encode/queries/meta.json ] || \
    $PY encode.py "${common[@]}" --encode.input=$WIKI/queries.test.jsonl --encode.kind=query
  [ -f $dir/index/$ENGINE/meta.json ] || $PY index.py "${common[@]}" --index.engine=$ENGINE
  [ -f $OUT/search/$name.trec ] || \
    $PY search.py "${common[@]}" --search.engine=$ENGINE --search.name=$name --search.output=$OUT/search/$name.trec
}

step "SPLADE-tiny as shipped (no training on this collection)"
retrieve splade_tiny $OUT/base

step "fine-tune SPLADE-tiny on the train split"
[ -f $OUT/trained/final/lsr_config.json ] || $PY train.py --cfg yamls/demo.yaml --train.resume=auto

step "fine-tuned SPLADE-tiny"
retrieve splade_tiny_ft $OUT/trained

step "evaluate on the test split"
$PY evaluate.py --qrels $WIKI/qrels.test.tsv --out $OUT/eval --plot \
  --run $OUT/search/bm25.trec $OUT/search/splade_tiny.trec $OUT/search/splade_tiny_ft.trec
$PY - <<'PY'
import json
m = json.load(open("runs/demo/eval/metrics.json"))
bm25, ft = m["bm25"]["mrr@10"], m["splade_tiny_ft"]["mrr@10"]
print(f"\nfine-tuned SPLADE-tiny MRR@10 {ft:.4f} vs BM25 {bm25:.4f}: "
      + ("beats BM25" if ft > bm25 else "does NOT beat BM25"))
PY
