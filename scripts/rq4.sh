#!/usr/bin/env bash
# RQ4 — does scaling help? Students Flan-T5-large, OPT-1.3B, OPT-6.7B (LoRA) with the MiniLM-L6 cross-encoder
# teacher, and the teacher scaled to RankLLaMA-7B for the OPT-1.3B student: train -> encode -> index -> search ->
# evaluate -> table. RankLLaMA scores: scripts/teacher_scores.py (or scripts/prepare_msmarco.sh --rankllama-scores).
#   bash scripts/rq4.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq4.sh --tiny                                      # CI: tiny models; the "RankLLaMA" teacher is a
#                                                                   # tiny random cross-encoder run by teacher_scores.py
#   bash scripts/rq4.sh --wiki                                      # offline Wikipedia: SmolLM2-135M students only
# Options and outputs: scripts/rq_common.sh. Table: runs/rq4/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name                yaml                               tiny  wiki stand-in
CONFIGS=("flan_t5_large      yamls/rq4/flan_t5_large.yaml       t5    -"
         "opt_1_3b           yamls/rq4/opt_1_3b.yaml            opt   smollm2"
         "opt_6_7b_lora      yamls/rq4/opt_6_7b_lora.yaml       opt   -"
         "opt_1_3b_rankllama yamls/rq4/opt_1_3b_rankllama.yaml  opt   -")
if [[ " $* " == *" --tiny "* ]]; then
  # the tiny fixture has no RankLLaMA file: score its candidates with a tiny random cross-encoder (teacher_scores.py)
  ( ROOT=runs/rq_tiny; args=("$@")
    for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[i]}" = --out ] && ROOT=${args[i + 1]}; done
    cd "$(dirname "$0")/.." && bash scripts/prepare_msmarco.sh --tiny --out "$ROOT/data" --tiny-models "$ROOT/models" >/dev/null
    [ -f "$ROOT/data/scores.rankllama.json.gz" ] || ${PY:-.venv/bin/python} scripts/teacher_scores.py \
      --model "$ROOT/models/ce" --kind cross_encoder --queries "$ROOT/data/queries.train.tsv" \
      --corpus "$ROOT/data/collection.tsv" --candidates "$ROOT/data/candidates.train.tsv" \
      --out "$ROOT/data/scores.rankllama.json.gz" --batch-size 64 )
fi
rq_main rq4 "RQ4: scaling the student and the teacher" trained "$@"
