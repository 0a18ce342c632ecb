"""train.py's guards, through `train.main(argv)` on the tiny BERT: a non-finite loss stops training (naming the
optimizer step, the micro-batch and the part) before the optimizer applies it; a checkpoint folder from elsewhere
cannot run code on resume (planted pickles are refused, never unpickled); torn trainer_state.json and train_log.jsonl
files give one-line errors naming the file (a torn last log line, left by a kill mid-write, is dropped)."""
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train
from lsr_core.utils import InputError
from tests.e2e.test_train import argv, logged
from lsr_core.tiny import make_collection, make_model

FP32 = ["--model.dtype=float32", '--train.mixed_precision="no"']  # YAML reads a bare no as false


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_guards")
    collection = make_collection(root / "data")
    return {"data": root / "data", "bert": make_model(root / "bert", "bert", collection["words"])}


def run(tiny, out: Path, *overrides: str) -> Path:
    return train.main(argv(tiny, out, "bert_mlm.yaml", "bert", *FP32, "--train.max_steps=4", *overrides))


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """A run stopped after step 2, with its checkpoint checkpoints/step-000002: each test resumes a copy."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    run(tiny, out, "--train.save_every=2", "--train.stop_after=2", "--train.q_reg_weight=0.01",
        "--train.d_reg_weight=0.01", "--train.reg_warmup_steps=3")
    return out


def copy_of(stopped: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out, out / "checkpoints" / "step-000002"


# ------------------------------------------------------------------------------------------------ non-finite loss

@pytest.fixture
def optimizer_steps():
    """How many times the real optimizer (not accelerate's wrapper) stepped."""
    steps = []
    handle = register_optimizer_step_pre_hook(lambda *args: steps.append(1))
    yield steps
    handle.remove()


def nan_on_call(fn, calls: set, value: float):
    """`fn`, except that the calls numbered in `calls` (from 1) return `value` (in the graph, so backward runs)."""
    count = []

    def wrapped(*args, **kwargs):
        count.append(1)
        result = fn(*args, **kwargs)
        return result * value if len(count) in calls else result
    return wrapped


def test_non_finite_rank_loss_stops_before_the_optimizer_step(tiny, tmp_path, monkeypatch, optimizer_steps):
    # micro-batch 1 of optimizer step 3 (calls 5 and 6 make step 3 with 2 micro-batches per step)
    monkeypatch.setitem(train.LOSSES, "infonce", nan_on_call(train.LOSSES["infonce"], {5}, float("nan")))
    out = tmp_path / "run"
    with pytest.raises(train.NonFiniteLoss) as err:
        run(tiny, out, "--train.grad_accum=2")
    assert str(err.value) == ("non-finite rank loss (nan) at optimizer step 3, micro-batch 1 of 2: stopped before the "
                              "optimizer applied it (lower train.lr, or check that step's data)")
    assert isinstance(err.value, InputError)  # the scripts print it as one `error:` line
    assert len(optimizer_steps) == 2 and logged(out, "step") == [1, 2]


def test_non_finite_regularizer_is_named(tiny, tmp_path, monkeypatch, optimizer_steps):
    # the regularizer runs twice per micro-batch (queries, documents): call 4 is step 2's document term
    monkeypatch.setitem(train.REGULARIZERS, "flops", nan_on_call(train.REGULARIZERS["flops"], {4}, float("inf")))
    with pytest.raises(train.NonFiniteLoss, match=r"^non-finite regularizer \(inf\) at optimizer step 2, "
                                                  r"micro-batch 1 of 1: stopped before"):
        run(tiny, tmp_path / "run", "--train.q_reg_weight=0.01", "--train.d_reg_weight=0.01")
    assert len(optimizer_steps) == 1


def test_a_diverging_run_stops_with_the_step(tiny, tmp_path):
    """No injection: a learning rate this large overflows the scores within a few steps."""
    with pytest.raises(train.NonFiniteLoss, match=r"^non-finite rank loss \((nan|inf)\) at optimizer step \d+, "
                                                  r"micro-batch 1 of 1: stopped before the optimizer applied it"):
        run(tiny, tmp_path / "run", "--train.lr=1e30", "--train.max_steps=10")


# ------------------------------------------------------------------------------------------------ planted pickles

class Planted:
    """Unpickling this creates `marker`: what a malicious checkpoint file would do (os.system, anything)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_state_is_json_and_safetensors(stopped):
    folder = stopped / "checkpoints" / "step-000002"
    assert not list(folder.glob("custom_checkpoint_*"))  # the regularizer weights' state is in trainer_state.json
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["reg_weights"] == {"q": {"steps_done": 2}, "d": {"steps_done": 2}}


def test_checkpoint_without_reg_weights_resumes_the_warm_up_from_its_step(stopped, tiny, tmp_path):
    """Checkpoints of an older train.py kept the warm-up in a pickle (refused: see below); with that deleted, the
    warm-up restarts where it was, since it counts optimizer steps."""
    uninterrupted = tmp_path / "uninterrupted"
    run(tiny, uninterrupted, "--train.q_reg_weight=0.01", "--train.d_reg_weight=0.01", "--train.reg_warmup_steps=3")
    out, folder = copy_of(stopped, tmp_path)
    state = json.loads((folder / "trainer_state.json").read_text())
    del state["reg_weights"]
    (folder / "trainer_state.json").write_text(json.dumps(state))
    run(tiny, out, "--train.q_reg_weight=0.01", "--train.d_reg_weight=0.01", "--train.reg_warmup_steps=3",
        "--train.resume=auto")
    assert logged(out, "reg") == logged(uninterrupted, "reg") and logged(out, "reg")[2] > 0
    assert logged(out) == logged(uninterrupted)


PLANTED = {  # file -> the one-line refusal
    "custom_checkpoint_0.pkl": r"custom_checkpoint_0.pkl: train.py does not load pickled checkpoint state "
                               r"\(unpickling can run code\)",
    "random_states_0.pkl": r"random_states_0.pkl: not a readable RNG state \(UnpicklingError: Weights only load "
                           r"failed",
    "optimizer.bin": r"step-000002: cannot load the checkpoint \(UnpicklingError: Weights only load failed",
}


@pytest.mark.parametrize("name", list(PLANTED))
def test_planted_pickle_is_refused_and_never_run(stopped, tiny, tmp_path, name):
    out, folder = copy_of(stopped, tmp_path)
    marker = tmp_path / "marker"
    torch.save({"state": Planted(marker)}, folder / name)
    with pytest.raises(InputError, match=PLANTED[name]) as err:
        run(tiny, out, "--train.resume=auto")
    assert "\n" not in str(err.value)
    assert not marker.exists()
    torch.load(folder / name, weights_only=False)  # the planted file is live: a plain unpickling runs it
    assert marker.exists()


def test_planted_deepspeed_file_is_scanned_not_run(stopped, tmp_path):
    """DeepSpeed's engine unpickles its own files in full; train.py scans them first (no DeepSpeed run here: the
    DeepSpeed resume tests in test_train_distributed.py check that real DeepSpeed files pass the scan)."""
    _, folder = copy_of(stopped, tmp_path)
    marker = tmp_path / "marker"
    (folder / "pytorch_model").mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "client": Planted(marker)},
               folder / "pytorch_model" / "mp_rank_00_model_states.pt")
    with pytest.raises(InputError, match=r"mp_rank_00_model_states.pt: names posix.system, which DeepSpeed's "
                                         r"unpickling would call: refused"):
        train.check_checkpoint_files(folder, 0, deepspeed=True)
    (folder / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02}q\x00.")  # a bare pickle
    with pytest.raises(InputError, match=r"mp_rank_00_model_states.pt: not a checkpoint file DeepSpeed wrote"):
        train.check_checkpoint_files(folder, 0, deepspeed=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ torn files

@pytest.mark.parametrize("text,pattern", [
    ('{"step": 2, "epo', r"step-000002/trainer_state.json: not valid JSON, the checkpoint is damaged"),
    ('{"step": "2", "epoch": 0}', r"step-000002/trainer_state.json: field 'step' must be a non-negative integer, "
                                  r"got '2'"),
    ('{"step": 2, "epoch": 0, "logit_shift": "x"}', r"trainer_state.json: field 'logit_shift' must be a number"),
    ('{"step": 2, "epoch": 0, "reg_weights": {"q": {"steps": 2}}}',
     r"trainer_state.json: field 'reg_weights.q' is not a regularizer weight's state \(KeyError: 'steps_done'\)"),
], ids=["torn", "wrong_type", "logit_shift", "reg_weights"])
def test_damaged_trainer_state_is_an_error(stopped, tiny, tmp_path, text, pattern):
    out, folder = copy_of(stopped, tmp_path)
    (folder / "trainer_state.json").write_text(text)
    with pytest.raises(InputError, match=pattern) as err:
        run(tiny, out, "--train.resume=auto")
    assert "\n" not in str(err.value)


def test_auto_resume_skips_a_checkpoint_cut_off_mid_save(stopped, tiny, tmp_path, caplog):
    out, _ = copy_of(stopped, tmp_path)
    half = out / "checkpoints" / "step-000003"  # killed in save_state: no trainer_state.json yet
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"torn")
    with caplog.at_level(logging.INFO):
        run(tiny, out, "--train.resume=auto")
    assert f"resumed from {out / 'checkpoints' / 'step-000002'} at step 2" in caplog.text
    assert logged(out, "step") == [1, 2, 3, 4]


def test_torn_last_log_line_is_dropped_with_a_warning(stopped, tiny, tmp_path, caplog):
    out, _ = copy_of(stopped, tmp_path)
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.')  # killed while writing step 3's line
    with caplog.at_level(logging.WARNING):
        run(tiny, out, "--train.resume=auto")
    assert f"{out / 'train_log.jsonl'}:3: dropped a torn last line" in caplog.text
    assert logged(out, "step") == [1, 2, 3, 4]


def test_torn_log_line_before_the_last_is_an_error(stopped, tiny, tmp_path):
    out, _ = copy_of(stopped, tmp_path)
    lines = (out / "train_log.jsonl").read_text().splitlines(keepends=True)
    (out / "train_log.jsonl").write_text('{"step": 1, "lo\n' + "".join(lines[1:]))
    with pytest.raises(InputError, match=r"train_log.jsonl:1: invalid JSON \(Unterminated string") as err:
        run(tiny, out, "--train.resume=auto")
    assert "\n" not in str(err.value)
