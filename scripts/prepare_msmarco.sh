#!/usr/bin/env bash
# Prepare MS MARCO passage for the paper's experiments (scripts/rq1.sh .. rq4.sh), then verify the checksums.
#   bash scripts/prepare_msmarco.sh                          # ir_datasets (downloads and caches on first use)
#   bash scripts/prepare_msmarco.sh --collection collection.tsv --queries-train queries.train.tsv ...  # local files
#   bash scripts/prepare_msmarco.sh --ce-scores cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz --trust-pickle
#   bash scripts/prepare_msmarco.sh --tiny --out runs/rq_tiny/data --tiny-models runs/rq_tiny/models    # CI fixture
# Every argument is passed to scripts/prepare_msmarco.py (see its docstring for the files written). A rerun skips
# the files already recorded in <out>/manifest.json, so an interrupted download resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
OUT=data/msmarco
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --out) OUT=${args[i + 1]} ;;
    --out=*) OUT=${args[i]#--out=} ;;
  esac
done
$PY scripts/prepare_msmarco.py "$@"
$PY scripts/prepare_msmarco.py --out "$OUT" --verify
