#!/usr/bin/env bash
# RQ4 — does scaling help? As the reference's bash_rq4/ runs it: the teacher scaled from the MiniLM-L6
# cross-encoder to RankLLaMA (its scores rescaled onto MiniLM's by one affine map) for the DistilBERT, Flan-T5-base
# and OPT-350m students (the MiniLM rows are RQ2's configurations, trained again here so that the table stands
# alone), and the student scaled to Flan-T5-large, OPT-1.3B and OPT-6.7B (LoRA) with the MiniLM teacher: train ->
# encode -> index -> search -> evaluate -> table. RankLLaMA scores: scripts/teacher_scores.py (or
# scripts/prepare_msmarco.sh --rankllama-scores); the *_rankllama rows need data/msmarco/scores.rankllama.json.gz and
# scores.minilm.json.gz.
#   bash scripts/rq4.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq4.sh --tiny                                      # CI: tiny models; the "RankLLaMA" teacher is a
#                                                                   # tiny random cross-encoder run by teacher_scores.py
#   bash scripts/rq4.sh --wiki                                      # offline Wikipedia: SmolLM2-135M students only
# Options and outputs: scripts/rq_common.sh. Table: runs/rq4/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name                   yaml                                   tiny  wiki stand-in
CONFIGS=("distilbert_minilm      yamls/rq2/distilsplade_max.yaml        bert  -"
         "distilbert_rankllama   yamls/rq4/distilbert_rankllama.yaml    bert  -"
         "flan_t5_base_minilm    yamls/rq2/flan_t5_multi_token.yaml     t5    -"
         "flan_t5_base_rankllama yamls/rq4/flan_t5_base_rankllama.yaml  t5    -"
         "opt_350m_minilm        yamls/rq2/opt_350m.yaml                opt   -"
         "opt_350m_rankllama     yamls/rq4/opt_350m_rankllama.yaml      opt   -"
         "flan_t5_large          yamls/rq4/flan_t5_large.yaml           t5    -"
         "opt_1_3b               yamls/rq4/opt_1_3b.yaml                opt   smollm2"
         "opt_6_7b_lora          yamls/rq4/opt_6_7b_lora.yaml           opt   -")
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
