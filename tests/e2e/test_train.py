"""train.py end to end on tiny models, through `train.main(argv)` and the yamls in yamls/tiny/: the loss goes down,
final/ loads back (and is not the untrained model), training is deterministic, a killed run resumes to the same
weights, and bad input stops with a one-line error before anything is written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from lsr_core.config import ConfigError, ModelConfig, load_config
from lsr_core.backbones import ModelLoadError
from lsr_core.modeling import build_model
from lsr_core.utils import InputError
from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]
TINY_YAMLS = ROOT / "yamls" / "tiny"
QUERIES = ["star planet astronomy", "recipe bake cooking", "goal team football"]
DOCS = ["astronomy star planet telescope galaxy", "cooking recipe bake oven flour", "football goal team match"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_train")
    collection = make_collection(root / "data")
    models = {arch: make_model(root / arch, arch, collection["words"]) for arch in ("bert", "llama", "opt", "t5")}
    return {"data": root / "data", **models}


def argv(tiny, out: Path, yaml: str, arch: str, *overrides: str) -> list[str]:
    """train.py's arguments, in float32 on every CPU (the losses and weights compared here are float32's; an
    override can still change it)."""
    data = tiny["data"]
    return ["--cfg", str(TINY_YAMLS / yaml), f"--model.name_or_path={tiny[arch]}",
            f"--data.train_file={data / 'train.jsonl'}", f"--data.corpus={data / 'corpus.jsonl'}",
            f"--data.queries={data / 'queries.jsonl'}", f"--exp.output_dir={out}", "--model.dtype=float32",
            '--train.mixed_precision="no"', *overrides]


def logged(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


@torch.no_grad()
def vectors(model_or_path, **options) -> torch.Tensor:
    model = model_or_path if not isinstance(model_or_path, (str, Path)) else \
        build_model(ModelConfig(name_or_path=str(model_or_path), **options)).eval()
    return torch.cat([model.encode(QUERIES, is_query=True), model.encode(DOCS, is_query=False)])


def weights(folder: Path) -> dict:
    tensors = {}
    for path in sorted(folder.rglob("*.safetensors")):
        tensors.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(str(path)).items()})
    assert tensors, f"no safetensors in {folder}"
    return tensors


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ------------------------------------------------------------------------------------------------ every backbone

CASES = {  # yaml -> (arch, untrained-model options matching the yaml)
    "bert_mlm.yaml": ("bert", {}),
    "bert_mlp.yaml": ("bert", {"query_head": "mlp", "doc_head": "mlp"}),
    "t5_single.yaml": ("t5", {"decoding": "single_token"}),
    "t5_multi.yaml": ("t5", {}),
    "llama_multi.yaml": ("llama", {}),
    "opt_lora.yaml": ("opt", {}),
    "asym_qmlp_dmlm.yaml": ("bert", {"query_head": "mlp", "shared": False}),
}


@pytest.mark.parametrize("yaml", list(CASES))
def test_train_lowers_loss_and_saves_a_loadable_model(tiny, tmp_path, yaml):
    arch, options = CASES[yaml]
    out = tmp_path / "run"
    final = train.main(argv(tiny, out, yaml, arch))
    assert final == out / "final"

    losses = logged(out)
    assert len(losses) == load_config(["--cfg", str(TINY_YAMLS / yaml)]).train.max_steps  # log_every: 1
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10, losses

    saved = json.loads((final / "lsr_config.json").read_text())
    untrained = build_model(ModelConfig(name_or_path=str(tiny[arch]), **options))
    assert saved["kind"] == untrained.spec.kind
    assert (saved["query_head"], saved["doc_head"], saved["shared"]) == \
        (untrained.spec.query_head, untrained.spec.doc_head, untrained.spec.shared)
    assert not (final / "adapter_config.json").exists()  # LoRA merged into plain HF weights
    if not saved["shared"]:
        assert (final / "query" / "model.safetensors").is_file() and (final / "doc" / "model.safetensors").is_file()
    loaded = vectors(final)
    assert torch.equal(loaded, vectors(final))  # loading is deterministic
    assert (loaded >= 0).all() and (loaded > 0).any()
    assert not torch.allclose(loaded, vectors(untrained.eval()), atol=1e-4)  # final/ holds the trained weights
    config = (out / "config.yaml").read_text()
    assert f"name_or_path: {tiny[arch]}" in config


def test_training_is_deterministic(tiny, tmp_path):
    finals = [train.main(argv(tiny, tmp_path / name, "bert_mlm.yaml", "bert", "--train.max_steps=8"))
              for name in ("a", "b")]
    assert logged(tmp_path / "a") == logged(tmp_path / "b")
    assert_same_weights(*finals)
    other_seed = train.main(argv(tiny, tmp_path / "c", "bert_mlm.yaml", "bert", "--train.max_steps=8",
                                 "--exp.seed=7"))
    assert logged(tmp_path / "c") != logged(tmp_path / "a")
    assert not torch.equal(weights(other_seed)["model.safetensors:bert.embeddings.word_embeddings.weight"],
                           weights(finals[0])["model.safetensors:bert.embeddings.word_embeddings.weight"])


# ------------------------------------------------------------------------------------------------ MarginMSE

def write_scored_train_file(tiny, path: Path) -> Path:
    """The tiny train.jsonl with teacher scores: query-word overlap (a BM25-like teacher the student can learn)."""
    data = tiny["data"]
    queries = {json.loads(line)["id"]: json.loads(line)["text"] for line in (data / "queries.jsonl").open()}
    corpus = {json.loads(line)["id"]: json.loads(line)["text"] for line in (data / "corpus.jsonl").open()}
    lines = []
    for line in (data / "train.jsonl").open():
        row = json.loads(line)
        words = set(queries[row["qid"]].split())
        row["scores"] = {d: float(len(words & set(corpus[d].split()))) for d in row["pos"] + row["negs"]}
        lines.append(json.dumps(row) + "\n")
    path.write_text("".join(lines))
    return path


def test_margin_mse_with_teacher_scores(tiny, tmp_path):
    train_file = write_scored_train_file(tiny, tmp_path / "scored.jsonl")
    out = tmp_path / "run"
    train.main(argv(tiny, out, "bert_mlm.yaml", "bert", f"--data.train_file={train_file}", "--train.loss=margin_mse",
                    "--train.max_steps=80"))
    losses = logged(out)
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8, losses
    assert (out / "final" / "model.safetensors").is_file()


def test_margin_mse_without_teacher_scores_is_an_error(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"'train.loss=margin_mse' needs teacher scores, and .*train.jsonl has none"):
        train.main(argv(tiny, out, "bert_mlm.yaml", "bert", "--train.loss=margin_mse"))
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("stop_after,extra", [
    (8, []),
    # killed two steps after the last checkpoint, with accumulation, a decaying lr and a warming-up regularizer
    (10, ["--train.grad_accum=2", "--train.scheduler=linear", "--train.warmup_steps=2",
          "--train.q_reg_weight=0.01", "--train.d_reg_weight=0.01", "--train.reg_warmup_steps=10"]),
    # the logit shift calibrated when the run began is restored from the checkpoint, not recalibrated
    (10, ["--train.calibrate_nnz=20"]),
], ids=["at_checkpoint", "after_checkpoint", "calibrated"])
def test_resume_reaches_the_uninterrupted_result(tiny, tmp_path, stop_after, extra):
    # batch 8 of 48 examples: 6 batches per epoch, so the run crosses epochs and resumes mid-epoch
    common = ["--train.max_steps=12", "--train.save_every=4", "--train.batch_size=8", *extra]
    final_a = train.main(argv(tiny, tmp_path / "a", "bert_mlm.yaml", "bert", *common))

    out_b = tmp_path / "b"
    assert train.main(argv(tiny, out_b, "bert_mlm.yaml", "bert", *common, f"--train.stop_after={stop_after}")) == out_b
    assert not (out_b / "final").exists()
    assert sorted(p.name for p in (out_b / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    final_b = train.main(argv(tiny, out_b, "bert_mlm.yaml", "bert", *common, "--train.resume=auto"))

    assert_same_weights(final_a, final_b)
    assert logged(out_b, "step") == list(range(1, 13))  # steps redone after the checkpoint are logged once
    assert logged(out_b) == logged(tmp_path / "a")
    assert logged(out_b, "reg") == logged(tmp_path / "a", "reg")
    shift = json.loads((final_a / "lsr_config.json").read_text())["logit_shift"]
    assert json.loads((final_b / "lsr_config.json").read_text())["logit_shift"] == shift
    assert (shift != 0) == ("--train.calibrate_nnz=20" in extra)


def test_resume_from_an_incomplete_checkpoint_is_an_error(tiny, tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(InputError, match="is not a complete checkpoint"):
        train.main(argv(tiny, tmp_path / "run", "bert_mlm.yaml", "bert", f"--train.resume={tmp_path / 'half'}"))


# ------------------------------------------------------------------------------------------------ calibration

def test_calibrate_nnz_starts_the_student_sparse(tiny, tmp_path):
    """A random decoder activates most of the vocabulary; calibrated, it starts near the target and the shift
    travels with the model (config.yaml, lsr_config.json, hence encode.py)."""
    out = tmp_path / "run"
    final = train.main(argv(tiny, out, "llama_multi.yaml", "llama", "--train.max_steps=2", "--train.log_every=1",
                            "--train.calibrate_nnz=12"))
    shift = json.loads((final / "lsr_config.json").read_text())["logit_shift"]
    assert shift < 0 and load_config(["--cfg", str(out / "config.yaml")]).model.logit_shift == shift
    assert logged(out, "d_nnz")[0] < 20  # step 1 (uncalibrated: nearly the whole ~150-term vocabulary)
    assert (vectors(final) > 0).sum(1).float().mean() < 20
    plain = tmp_path / "plain"
    train.main(argv(tiny, plain, "llama_multi.yaml", "llama", "--train.max_steps=2", "--train.log_every=1"))
    assert logged(plain, "d_nnz")[0] > 60


def test_calibrate_nnz_needs_an_mlm_document_head(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'train.calibrate_nnz' needs an MLM document head"):
        train.main(argv(tiny, tmp_path / "run", "bert_mlp.yaml", "bert", "--train.calibrate_nnz=5"))


# ------------------------------------------------------------------------------------------------ torch.compile

@pytest.mark.slow
@pytest.mark.parametrize("yaml,arch,scope", [("bert_mlm.yaml", "bert", "stack"), ("llama_multi.yaml", "llama", "stack"),
                                             ("llama_multi.yaml", "llama", "layer")])
def test_compiled_training_matches_eager(tiny, tmp_path, yaml, arch, scope):
    """model.compile=default (inductor on the CPU here; on a GPU it is what bench/train.py measures): the same
    losses as eager up to kernel rounding, with batches padded to a multiple of 16. Dropout is off:
    compiled dropout draws its masks from another generator."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny[arch], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update({k: 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")
                   if k in config})
    (folder / "config.json").write_text(json.dumps(config))
    common = ["--train.max_steps=4", "--train.log_every=1", "--model.length_buckets=2",
              f"--model.name_or_path={folder}"]
    eager = train.main(argv(tiny, tmp_path / "eager", yaml, arch, *common))
    compiled = train.main(argv(tiny, tmp_path / "compiled", yaml, arch, *common, "--model.compile=default",
                               f"--model.compile_scope={scope}"))
    torch.testing.assert_close(torch.tensor(logged(tmp_path / "compiled")), torch.tensor(logged(tmp_path / "eager")),
                               rtol=1e-3, atol=1e-4)
    # in-place compile keeps the parameter names (the weights themselves differ by Adam steps of rounding noise)
    assert weights(eager).keys() == weights(compiled).keys()
    model = build_model(ModelConfig(name_or_path=str(compiled), compile="default")).eval()
    assert model.pad_multiple == 16
    torch.testing.assert_close(vectors(model), vectors(compiled), rtol=1e-3, atol=1e-4)


def test_compile_with_deepspeed_is_a_config_error(tiny, tmp_path):
    with pytest.raises(ConfigError, match="'model.compile' is not supported with DeepSpeed"):
        train.main(argv(tiny, tmp_path / "run", "bert_mlm.yaml", "bert", "--model.compile=default",
                        f"--train.deepspeed={ROOT / 'yamls' / 'ds' / 'zero2.json'}"))


# ------------------------------------------------------------------------------------------------ bad input

def write_bad_train_file(tmp_path: Path, kind: str) -> Path:
    good = {"query": "star planet", "pos": "astronomy star planet", "negs": ["cooking recipe"]}
    path = tmp_path / f"{kind}.jsonl"
    if kind == "malformed":
        path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"query": "star", "pos": \n')
    elif kind == "empty_query":
        path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, query="  ")) + "\n")
    return path


BAD_INPUTS = {  # name -> (overrides given tmp_path, exception, message pattern)
    "unknown_key": (lambda tmp: ["--train.warmup=10"], ConfigError,
                    r"unknown key 'train.warmup' \(did you mean 'warmup_steps'\?\)"),
    "wrong_type": (lambda tmp: ["--train.max_steps=many"], ConfigError, r"'train.max_steps' must be int, got str"),
    "bad_choice": (lambda tmp: ["--train.loss=triplet"], ConfigError, r"'train.loss' must be one of"),
    "missing_train_file": (lambda tmp: [f"--data.train_file={tmp / 'nope.jsonl'}"], InputError,
                           r"nope.jsonl: file not found"),
    "malformed_jsonl": (lambda tmp: [f"--data.train_file={write_bad_train_file(tmp, 'malformed')}"], InputError,
                        r"malformed.jsonl:3: invalid JSON"),
    "empty_query": (lambda tmp: [f"--data.train_file={write_bad_train_file(tmp, 'empty_query')}"], InputError,
                    r"empty_query.jsonl:2: field 'query' is empty"),
    "missing_model": (lambda tmp: [f"--model.name_or_path={tmp / 'no_model'}"], ModelLoadError,
                      r"cannot load .*no_model"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny, tmp_path, name):
    overrides, error, pattern = BAD_INPUTS[name]
    out = tmp_path / "run"
    with pytest.raises(error, match=pattern) as err:
        train.main(argv(tiny, out, "bert_mlm.yaml", "bert", *overrides(tmp_path)))
    assert "\n" not in str(err.value)
    assert not out.exists()  # everything is validated before the run folder is created


def test_empty_query_text_in_queries_file(tiny, tmp_path):
    rows = [json.loads(line) for line in (tiny["data"] / "queries.jsonl").open()]
    rows[2]["text"] = " "
    queries = tmp_path / "queries.tsv"
    queries.write_text("".join(f"{row['id']}\t{row['text']}\n" for row in rows))
    out = tmp_path / "run"
    with pytest.raises(InputError, match=rf"queries.tsv:3: empty text for id '{rows[2]['id']}'"):
        train.main(argv(tiny, out, "bert_mlm.yaml", "bert", f"--data.queries={queries}"))
    assert not out.exists()


def test_cli_prints_one_error_line_without_traceback(tiny, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"),
           *argv(tiny, out, "bert_mlm.yaml", "bert", f"--data.train_file={tmp_path / 'missing.jsonl'}")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {tmp_path / 'missing.jsonl'}: file not found"], proc.stderr[-2000:]
    assert not out.exists()
