"""The RQ2-RQ4 recipes (yamls/rq2..rq4) hold the values the paper's code fixes (JingfenQiao/Decoder4LSR: each
bash_rqN/train_*.sh names an experiment under lsr/configs/experiment/, which overrides lsr/configs/config.yaml;
what neither sets is transformers' TrainingArguments default), and every value line in them names its source.

The table below restates those values from the reference's files (the file named on each row); it is written
independently of the yamls so that an edit to a yaml that drifts from the reference fails here."""
import re
from pathlib import Path

import pytest

from lsr_core.config import load_config

REPO = Path(__file__).resolve().parents[2]

# Shared by every row unless the row says otherwise: config.yaml (max lengths 250, warmup_steps 6000, max_steps
# 150000, batch 128, save_steps 20000, save_total_limit 2, logging_steps 500, seed 42), TrainingArguments defaults
# (lr 5e-5, linear, max_grad_norm 1.0, weight_decay 0.0), loss distil_margin_mse (FLOPs on both sides, weight 0
# where an experiment sets none), dataset msmarco_triplet_distil (MiniLM cross-encoder scores, triples).
COMMON = {"model.max_query_len": 250, "model.max_doc_len": 250, "train.warmup_steps": 6000, "train.loss": "margin_mse",
          "train.q_reg": "flops", "train.d_reg": "flops", "train.d_reg_form": "mean_of_groups", "train.grad_accum": 1,
          "train.weight_decay": 0.0, "train.log_every": 500, "exp.seed": 42, "data.n_negatives": 1,
          "model.special_tokens": "reference", "model.query_prefix": "Query ", "model.doc_prefix": "Passage "}
MINILM = {"data.teacher_scores": "data/msmarco/scores.minilm.json.gz", "data.teacher_norm": "none"}
# dataset/msmarco_triplet_distil_rankllama_affine.yaml: RankLLaMA's scores under one affine map onto MiniLM's
RANKLLAMA = {"data.teacher_scores": "data/msmarco/scores.rankllama.json.gz", "data.teacher_norm": "affine",
             "data.teacher_norm_reference": "data/msmarco/scores.minilm.json.gz"}
HF_DEFAULTS = {"train.lr": 5e-5, "train.scheduler": "linear", "train.max_grad_norm": 1.0}
# the OPT experiments' training_arguments
OPT = {"train.lr": 1e-6, "train.scheduler": "cosine", "train.max_grad_norm": 0.3, "train.q_reg_weight": 0.0}

EXPECTED = {
    # bash_rq2/train_enc_multi_distll_splade_max.sh -> experiment/mlm_encoder_only_distll_splade_max.yaml
    "rq2/distilsplade_max": {**MINILM, "model.name_or_path": "distilbert-base-uncased", "train.q_reg_weight": 0.1,
                             "train.d_reg_weight": 0.08, "train.reg_warmup_steps": 50000, "train.lr": 1e-6,
                             "train.max_grad_norm": 0.3, "train.scheduler": "linear", "train.batch_size": 16,
                             "train.max_steps": 150000, "train.mixed_precision": "fp16"},
    # bash_rq2/train_enc_multi_tokens_flan_t5_base.sh -> experiment/mlm_encoder_only_t5_base.yaml
    "rq2/flan_t5_encoder_only": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                 "model.decoding": "encoder_only", "train.q_reg_weight": 0.1,
                                 "train.d_reg_weight": 0.08, "train.reg_warmup_steps": 50000,
                                 "train.batch_size": 32, "train.max_steps": 600000},
    # bash_rq2/train_enc_dec_multi_tokens_flan_t5_base.sh -> experiment/mlm_encoder_decoder_multi_t5_base.yaml
    "rq2/flan_t5_multi_token": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                "model.decoding": "multi_token", "train.q_reg_weight": 0.01,
                                "train.d_reg_weight": 0.01, "train.reg_warmup_steps": 50000, "train.batch_size": 16,
                                "train.max_steps": 200000},
    # bash_rq2/train_dec_multi_tokens_flan_t5_base.sh -> experiment/mlm_decoder_only_t5_base.yaml
    "rq2/flan_t5_decoder_only": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                 "model.decoding": "decoder_only", "train.q_reg_weight": 0.01,
                                 "train.d_reg_weight": 0.01, "train.reg_warmup_steps": 50000,
                                 "train.batch_size": 16, "train.max_steps": 600000},
    # bash_rq2/train_dec_multi_tokens_opt350m.sh -> experiment/mlm_decoder_only_opt3.5.yaml (document-only FLOPs)
    "rq2/opt_350m": {**MINILM, **OPT, "model.name_or_path": "facebook/opt-350m", "train.d_reg_weight": 0.1,
                     "train.reg_warmup_steps": 100000, "train.batch_size": 16, "train.max_steps": 160000,
                     "train.save_every": 50000, "train.keep_checkpoints": 3, "train.mixed_precision": "fp16"},
    # bash_rq3/train_enc_dec_single_token_flan_t5_base.sh -> experiment/mlm_encoder_decoder_single_t5_base.yaml
    "rq3/flan_t5_single_token": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                 "model.decoding": "single_token", "train.q_reg_weight": 0.01,
                                 "train.d_reg_weight": 0.01, "train.reg_warmup_steps": 50000,
                                 "train.batch_size": 16, "train.max_steps": 600000},
    # the RQ2 run (no bash_rq3 script): experiment/mlm_encoder_decoder_multi_t5_base.yaml
    "rq3/flan_t5_multi_token": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                "model.decoding": "multi_token", "train.q_reg_weight": 0.01,
                                "train.d_reg_weight": 0.01, "train.reg_warmup_steps": 50000, "train.batch_size": 16,
                                "train.max_steps": 200000},
    # bash_rq3/train_enc_dec_multi_tokens_flan_t5_base_qmlm_dmlp.sh -> experiment/qmlm_dmlp_encoder_decoder_multi_t5_base
    # .yaml with model/asm_qmlm_dmlp_encoder_decoder.yaml (no d_regularizer)
    "rq3/qmlm_dmlp": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                      "model.decoding": "multi_token", "model.query_head": "mlm", "model.doc_head": "mlp",
                      "model.shared": False, "train.q_reg_weight": 0.1, "train.d_reg_weight": 0.0,
                      "train.reg_warmup_steps": 50000, "train.batch_size": 16, "train.max_steps": 600000},
    # bash_rq3/train_enc_dec_multi_tokens_flan_t5_base_qmlp_dmlm.sh -> experiment/qmlp_dmlm_encoder_decoder_multi_t5_base
    # .yaml with model/asm_qmlp_dmlm_encoder_decoder.yaml (no q_regularizer)
    "rq3/qmlp_dmlm": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                      "model.decoding": "multi_token", "model.query_head": "mlp", "model.doc_head": "mlm",
                      "model.shared": False, "train.q_reg_weight": 0.0, "train.d_reg_weight": 0.08,
                      "train.reg_warmup_steps": 50000, "train.batch_size": 16, "train.max_steps": 600000},
    # bash_rq4/train_scaling_teacher_distillbert.sh -> experiment/rankllama_splade_msmarco_distilbert.yaml
    "rq4/distilbert_rankllama": {**RANKLLAMA, **HF_DEFAULTS, "model.name_or_path": "distilbert-base-uncased",
                                 "train.q_reg_weight": 0.1, "train.d_reg_weight": 0.08,
                                 "train.reg_warmup_steps": 50000, "train.batch_size": 64, "train.max_steps": 150000,
                                 "train.mixed_precision": "fp16"},
    # bash_rq4/train_scaling_teacher_flan_t5_base.sh -> experiment/rankllama_mlm_encoder_decoder_multi_t5_base.yaml
    "rq4/flan_t5_base_rankllama": {**RANKLLAMA, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-base",
                                   "model.decoding": "multi_token", "train.q_reg_weight": 0.01,
                                   "train.d_reg_weight": 0.01, "train.reg_warmup_steps": 50000,
                                   "train.batch_size": 16, "train.max_steps": 200000, "train.save_every": 10000},
    # bash_rq4/train_scaling_teacher_opt350m.sh -> experiment/rankllama_mlm_decoder_only_opt3.5.yaml
    "rq4/opt_350m_rankllama": {**RANKLLAMA, **OPT, "model.name_or_path": "facebook/opt-350m",
                               "train.d_reg_weight": 0.009, "train.reg_warmup_steps": 130000, "train.batch_size": 16,
                               "train.max_steps": 200000, "train.save_every": 2000, "train.keep_checkpoints": 3,
                               "train.mixed_precision": "fp16"},
    # bash_rq4/train_scaling_student_flan_t5_large.sh (4 GPUs x 4) -> experiment/mlm_encoder_decoder_multi_t5_large.yaml
    "rq4/flan_t5_large": {**MINILM, **HF_DEFAULTS, "model.name_or_path": "google/flan-t5-large",
                          "model.decoding": "multi_token", "train.q_reg_weight": 0.01, "train.d_reg_weight": 0.01,
                          "train.reg_warmup_steps": 50000, "train.batch_size": 16, "train.max_steps": 200000},
    # bash_rq4/train_scaling_student_opt1.3b.sh (4 GPUs x 4) -> experiment/mlm_decoder_only_opt13.yaml
    "rq4/opt_1_3b": {**MINILM, **OPT, "model.name_or_path": "facebook/opt-1.3b", "train.d_reg_weight": 0.01,
                     "train.reg_warmup_steps": 100000, "train.batch_size": 16, "train.max_steps": 600000,
                     "train.save_every": 50000, "train.keep_checkpoints": 3, "train.mixed_precision": "fp16"},
    # experiment/mlm_decoder_only_opt67_lora_0.001.yaml (no bash_rq4 script); LoRA: lsr/models/mlm_de_multi_opt_lora.py
    # (r 16, alpha 32, dropout 0.05; of its target names OPT has q_proj, k_proj, v_proj)
    "rq4/opt_6_7b_lora": {**MINILM, **OPT, "model.name_or_path": "facebook/opt-6.7b", "model.lora": True,
                          "model.lora_r": 16, "model.lora_alpha": 32, "model.lora_dropout": 0.05,
                          "model.lora_targets": ["q_proj", "k_proj", "v_proj"], "train.d_reg_weight": 0.001,
                          "train.reg_warmup_steps": 100000, "train.batch_size": 8, "train.max_steps": 160000,
                          "train.keep_checkpoints": 3, "train.mixed_precision": "fp16"},
}
YAMLS = sorted(p for p in (REPO / "yamls").glob("rq[2-4]/*.yaml") if p.name != "base.yaml")


def value(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_every_recipe_has_a_row():
    assert {f"{p.parent.name}/{p.stem}" for p in YAMLS} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recipe_takes_the_reference_values(name):
    cfg = load_config(["--cfg", str(REPO / "yamls" / f"{name}.yaml")])
    expected = {**COMMON, **EXPECTED[name]}
    got = {key: value(cfg, key) for key in expected}
    assert got == expected
    # T5 trains in bf16 where the reference uses fp16 (Flan-T5's activations overflow fp16: README's differences)
    assert cfg.train.mixed_precision == ("bf16" if "t5" in cfg.model.name_or_path else "fp16")


def test_rq4_runs_the_reference_rows():
    """scripts/rq4.sh runs bash_rq4's rows: MiniLM vs RankLLaMA teacher for three students (the MiniLM rows are the
    RQ2 yamls), and the scaled students."""
    text = (REPO / "scripts" / "rq4.sh").read_text()
    rows = dict(re.findall(r'"(\S+)\s+(yamls/rq\d/\S+\.yaml)\s+\w+\s+\S+"', text))
    assert rows == {"distilbert_minilm": "yamls/rq2/distilsplade_max.yaml",
                    "distilbert_rankllama": "yamls/rq4/distilbert_rankllama.yaml",
                    "flan_t5_base_minilm": "yamls/rq2/flan_t5_multi_token.yaml",
                    "flan_t5_base_rankllama": "yamls/rq4/flan_t5_base_rankllama.yaml",
                    "opt_350m_minilm": "yamls/rq2/opt_350m.yaml",
                    "opt_350m_rankllama": "yamls/rq4/opt_350m_rankllama.yaml",
                    "flan_t5_large": "yamls/rq4/flan_t5_large.yaml", "opt_1_3b": "yamls/rq4/opt_1_3b.yaml",
                    "opt_6_7b_lora": "yamls/rq4/opt_6_7b_lora.yaml"}
    for student in ("distilbert", "flan_t5_base", "opt_350m"):  # each pair differs in its teacher
        minilm = load_config(["--cfg", str(REPO / rows[f"{student}_minilm"])])
        rankllama = load_config(["--cfg", str(REPO / rows[f"{student}_rankllama"])])
        assert minilm.model.name_or_path == rankllama.model.name_or_path
        assert (minilm.data.teacher_norm, rankllama.data.teacher_norm) == ("none", "affine")


LEAF = re.compile(r"^\s+(\w+): \S")  # a `key: value` line inside a section


@pytest.mark.parametrize("path", sorted((REPO / "yamls").glob("rq[2-4]/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_value_names_its_source(path):
    """Each value line carries a comment (the reference file it comes from, or why the reference is silent); the
    run's own name and output folder need none."""
    bare = [line for line in path.read_text().splitlines()
            if (m := LEAF.match(line)) and m.group(1) not in ("name", "output_dir") and " # " not in line]
    assert bare == []
