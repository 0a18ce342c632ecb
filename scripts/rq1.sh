#!/usr/bin/env bash
# RQ1 — can LLMs write useful sparse representations zero-shot? Prompted BERT (MLM at [MASK]), Flan-T5 base -> xxl
# and OPT 350m -> 13b: zeroshot_prompt.py (corpus + queries) -> index -> search -> evaluate -> table.
#   bash scripts/rq1.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq1.sh --tiny                                      # CI: tiny random models + fixture
#   bash scripts/rq1.sh --wiki                                      # offline Wikipedia, SmolLM2-135M (+ SPLADE-tiny's MLM)
# Options and outputs: scripts/rq_common.sh. Table: runs/rq1/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name               yaml                              tiny  wiki stand-in
CONFIGS=("bert_base_uncased yamls/rq1/bert_base_uncased.yaml bert  splade_tiny"
         "flan_t5_base      yamls/rq1/flan_t5_base.yaml      t5    -"
         "flan_t5_large     yamls/rq1/flan_t5_large.yaml     t5    -"
         "flan_t5_xl        yamls/rq1/flan_t5_xl.yaml        t5    -"
         "flan_t5_xxl       yamls/rq1/flan_t5_xxl.yaml       t5    -"
         "opt_350m          yamls/rq1/opt_350m.yaml          opt   smollm2"
         "opt_1_3b          yamls/rq1/opt_1_3b.yaml          opt   -"
         "opt_2_7b          yamls/rq1/opt_2_7b.yaml          opt   -"
         "opt_6_7b          yamls/rq1/opt_6_7b.yaml          opt   -"
         "opt_13b           yamls/rq1/opt_13b.yaml           opt   -")
rq_main rq1 "RQ1: zero-shot prompted sparse representations" zeroshot "$@"
