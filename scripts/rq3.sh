#!/usr/bin/env bash
# RQ3 — which head/decoding? On Flan-T5-base: single-token vs multi-token decoding (both MLM), and the asymmetric
# qMLM-dMLP and qMLP-dMLM (two backbone copies): train -> encode -> index -> search -> evaluate -> table.
#   bash scripts/rq3.sh [--only NAME[,NAME...]] [--engine E] [--gpus N]      # MS MARCO (scripts/prepare_msmarco.sh first)
#   bash scripts/rq3.sh --tiny                                      # CI: tiny random T5 + fixture, 2 steps
#   bash scripts/rq3.sh --wiki                                      # offline Wikipedia: the heads on SPLADE-tiny (no
#                                                                   # pretrained T5 offline: single-token is skipped)
# Options and outputs: scripts/rq_common.sh. Table: runs/rq3/table.md (+ table.png: MRR@10 vs FLOPs).
source "$(dirname "$0")/rq_common.sh"
#        name                 yaml                                tiny  wiki stand-in
CONFIGS=("flan_t5_single_token yamls/rq3/flan_t5_single_token.yaml t5    -"
         "flan_t5_multi_token  yamls/rq3/flan_t5_multi_token.yaml  t5    splade_tiny"
         "qmlm_dmlp            yamls/rq3/qmlm_dmlp.yaml            t5    splade_tiny"
         "qmlp_dmlm            yamls/rq3/qmlp_dmlm.yaml            t5    splade_tiny")
rq_main rq3 "RQ3: heads and decoding (Flan-T5-base)" trained "$@"
