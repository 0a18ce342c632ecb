"""Dry run of every paper configuration (yamls/rq1..rq4) and 7B student (yamls/7b): each yaml loads, an RQ yaml is
listed in its scripts/rqN.sh with the tiny architecture of its backbone family, and — with its backbone swapped for a
tiny random model of that family (lsr_core/tiny.py) and everything else kept (heads, decoding, sharing, LoRA, loss,
regularizers, gradient checkpointing; not 4-bit quantisation, which needs CUDA, nor torch.compile, tested elsewhere)
— takes one training step on CPU (RQ1: prompts one batch zero-shot)."""
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

import train
import zeroshot_prompt
from lsr_core.config import load_config
from lsr_core.sparse import read_meta

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import prepare_msmarco  # noqa: E402

RQ_YAMLS = sorted(p for p in (REPO / "yamls").glob("rq[1-4]/*.yaml") if p.name != "base.yaml")
B7_YAMLS = sorted((REPO / "yamls" / "7b").glob("*.yaml"))
ROW = re.compile(r'"(\S+)\s+(yamls/rq\d/[^\s+]+\.yaml)(?:\+\S+\.yaml)?\s+(\w+)\s+(\S+)"')  # MODEL.yaml[+METHOD.yaml]


def tiny_arch(name_or_path: str) -> str:
    """The lsr_core/tiny.py architecture of a hub backbone's family."""
    name = name_or_path.lower()
    for key, arch in (("t5", "t5"), ("opt", "opt"), ("llama", "llama"), ("smollm", "llama"), ("mistral", "llama"),
                      ("qwen", "llama")):
        if key in name:
            return arch
    return "bert"  # bert, distilbert, MiniLM


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("rq_dry")
    prepare_msmarco.main(["--tiny", "--out", str(root / "data"), "--tiny-models", str(root / "models")])
    shutil.copy(root / "data" / "scores.minilm.json.gz", root / "data" / "scores.rankllama.json.gz")
    return root


def test_every_paper_yaml_is_in_its_script():
    assert len(RQ_YAMLS) == 25  # rq1 10, rq2 5, rq3 4, rq4 6
    for rq in ("rq1", "rq2", "rq3", "rq4"):
        rows = ROW.findall((REPO / "scripts" / f"{rq}.sh").read_text())
        listed = {REPO / yaml: arch for _, yaml, arch, _ in rows}
        # rq4.sh also lists RQ2 yamls: its MiniLM-teacher rows are RQ2's configurations
        assert {p for p in listed if p.parent.name == rq} == {p for p in RQ_YAMLS if p.parent.name == rq}, rq
        assert all(p.is_file() for p in listed), rq
        for path, arch in listed.items():
            assert arch == tiny_arch(load_config(["--cfg", str(path)]).model.name_or_path), path


def test_paper_values_where_known():
    for path in RQ_YAMLS:
        cfg = load_config(["--cfg", str(path)])
        if path.parent.name == "rq1":
            assert (cfg.zeroshot.query_topk, cfg.zeroshot.doc_topk) == (1000, 128)
            continue
        assert cfg.train.loss == "margin_mse" and cfg.data.format == "msmarco"
        assert cfg.model.max_doc_len == 250 and (cfg.train.q_reg, cfg.train.d_reg) == ("flops", "flops")
        assert cfg.train.reg_warmup_steps > 0 and cfg.train.q_reg_weight + cfg.train.d_reg_weight > 0
        if "t5" in cfg.model.name_or_path:
            assert cfg.train.mixed_precision == "bf16"  # T5 overflows in fp16


def test_7b_students():
    assert {p.stem for p in B7_YAMLS} == {"llama2_7b_zero3", "mistral_7b_zero3", "qwen2_5_7b_zero3", "llama2_7b_lora",
                                          "mistral_7b_qlora"}
    for path in B7_YAMLS:
        cfg = load_config(["--cfg", str(path)])
        assert tiny_arch(cfg.model.name_or_path) == "llama" and cfg.train.mixed_precision == "bf16"
        assert cfg.model.lora == ("lora" in path.stem) and (cfg.model.quantization == "4bit") == ("qlora" in path.stem)


@pytest.mark.parametrize("path", RQ_YAMLS + B7_YAMLS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_dry_run(fixture, tmp_path, path):
    cfg = load_config(["--cfg", str(path)])
    data = fixture / "data"
    argv = ["--cfg", str(path), f"--exp.output_dir={tmp_path / 'run'}",
            f"--model.name_or_path={fixture / 'models' / tiny_arch(cfg.model.name_or_path)}", "--model.gguf_file=",
            "--model.max_query_len=16", "--model.max_doc_len=48", "--model.dtype=float32",
            "--model.quantization=none", "--model.compile=none"]
    if path.parent.name == "rq1":
        docs = tmp_path / "docs.tsv"
        docs.write_text("".join(line + "\n" for line in (data / "collection.tsv").read_text().splitlines()[:3]))
        out = zeroshot_prompt.main(argv + [f"--encode.input={docs}", "--encode.kind=doc", "--encode.batch_size=3"])
        assert read_meta(out)["count"] == 3 and read_meta(out)["nnz_mean"] > 0
        return
    teacher = Path(cfg.data.teacher_scores).name
    norm_ref = [f"--data.teacher_norm_reference={data / Path(cfg.data.teacher_norm_reference).name}"] \
        if cfg.data.teacher_norm_reference else []
    final = train.main(argv + [
        "--train.max_steps=1", "--train.batch_size=2", "--train.grad_accum=1", '--train.mixed_precision="no"',
        "--train.save_every=0", "--train.warmup_steps=0", "--train.num_workers=0", "--train.log_every=1",
        f"--data.corpus={data / 'collection.tsv'}", f"--data.queries={data / 'queries.train.tsv'}",
        f"--data.qrels={data / 'qrels.train.tsv'}", f"--data.teacher_scores={data / teacher}"] + norm_ref)
    spec = json.loads((final / "lsr_config.json").read_text())
    assert (spec["query_head"], spec["doc_head"], spec["shared"]) == \
        (cfg.model.query_head, cfg.model.doc_head, cfg.model.shared)
    assert spec["decoding"] == cfg.model.decoding  # (multi_token, the default, for kinds with one decoding)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and log[0]["loss"] == log[0]["loss"]  # one step, finite loss
    assert not list(final.rglob("adapter_config.json"))  # LoRA merged into the saved weights
