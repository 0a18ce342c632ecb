#!/usr/bin/env bash
# RQ2 — which backbone makes the best learned sparse retriever? DistilSPLADE-max (encoder) vs Flan-T5-base as
# encoder-only, encoder-decoder with multi-token decoding, decoder-only, vs OPT-350m (decoder LLM, multi-token), all
# trained alike (MarginMSE from the MiniLM cross-encoder, FLOPs): train -> encode -> index -> search -> evaluate -> table.
#   bash scripts/rq2.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq2.sh --tiny                                      # CI: tiny random models + fixture, 2 steps
#   bash scripts/rq2.sh --wiki                                      # offline Wikipedia: SPLADE-tiny, SmolLM2-135M
# Options and outputs: scripts/rq_common.sh. Table: runs/rq2/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name                 yaml                                tiny  wiki stand-in
CONFIGS=("distilsplade_max     yamls/rq2/distilsplade_max.yaml     bert  splade_tiny"
         "flan_t5_encoder_only yamls/rq2/flan_t5_encoder_only.yaml t5    -"
         "flan_t5_multi_token  yamls/rq2/flan_t5_multi_token.yaml  t5    -"
         "flan_t5_decoder_only yamls/rq2/flan_t5_decoder_only.yaml t5    -"
         "opt_350m             yamls/rq2/opt_350m.yaml             opt   smollm2")
rq_main rq2 "RQ2: backbones (multi-token decoding)" trained "$@"
