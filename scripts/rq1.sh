#!/usr/bin/env bash
# RQ1 — can LLMs write useful sparse representations zero-shot? As the paper ran it (JingfenQiao/Decoder4LSR
# bash_rq1/*.sh): DistilBERT (its "BERT" row), Flan-T5 base -> xxl and OPT 350m -> 13b, each max-pooling its LM head
# over prompt + text (zeroshot.method multi_token, yamls/rq1/base.yaml): zeroshot_prompt.py (corpus + queries) ->
# index -> search -> evaluate -> table. SmolLM2-135M runs both that method and ours (next_token: its yaml +
# yamls/zeroshot/next_token.yaml, a second --cfg; a yaml column "A.yaml+B.yaml" passes both).
#   bash scripts/rq1.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq1.sh --tiny                                      # CI: tiny random models + fixture
#   bash scripts/rq1.sh --wiki                                      # offline Wikipedia: SmolLM2-135M, both methods
#                                                                   # (+ SPLADE-tiny's MLM for the BERT row)
# Options and outputs: scripts/rq_common.sh. Table: runs/rq1/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name                     yaml                                tiny  wiki stand-in
CONFIGS=("bert_base_uncased       yamls/rq1/bert_base_uncased.yaml    bert  splade_tiny"
         "flan_t5_base            yamls/rq1/flan_t5_base.yaml         t5    -"
         "flan_t5_large           yamls/rq1/flan_t5_large.yaml        t5    -"
         "flan_t5_xl              yamls/rq1/flan_t5_xl.yaml           t5    -"
         "flan_t5_xxl             yamls/rq1/flan_t5_xxl.yaml          t5    -"
         "opt_350m                yamls/rq1/opt_350m.yaml             opt   -"
         "opt_2_7b                yamls/rq1/opt_2_7b.yaml             opt   -"
         "opt_6_7b                yamls/rq1/opt_6_7b.yaml             opt   -"
         "opt_13b                 yamls/rq1/opt_13b.yaml              opt   -"
         "smollm2_135m            yamls/rq1/smollm2_135m.yaml         llama smollm2"
         "smollm2_135m_next_token yamls/rq1/smollm2_135m.yaml+yamls/zeroshot/next_token.yaml llama smollm2")
rq_main rq1 "RQ1: zero-shot prompted sparse representations" zeroshot "$@"
