"""train.py across processes on the CPU: 2-process DDP under `accelerate launch` (gloo), DeepSpeed ZeRO-2 in one
process, ZeRO-3 in one and two. Each runs train.py as a subprocess (a process group cannot be torn down cleanly
inside pytest) and checks that the run trains and saves a model that loads back.

On a CPU-only machine `accelerate launch --multi_gpu --num_processes 2` starts 2 CPU processes (`--cpu` would
start one). DeepSpeed builds its small shared-memory comm op with the C++ compiler on first use (~30 s, then cached
in ~/.cache/torch_extensions); the test json has no optimizer section, so the optimizer is torch's AdamW and no
optimizer op is compiled.
"""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from lsr_core.config import ModelConfig
from lsr_core.modeling import build_model
from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["star planet astronomy", "recipe bake cooking", "football goal team match league"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dist")
    collection = make_collection(root / "data")
    return {"data": root / "data", **{arch: make_model(root / arch, arch, collection["words"])
                                       for arch in ("bert", "llama", "t5")}}


def train_args(tiny, out: Path, *overrides: str, yaml: str = "bert_mlm", arch: str = "bert") -> list[str]:
    data = tiny["data"]
    return [str(ROOT / "train.py"), "--cfg", str(ROOT / "yamls" / "tiny" / f"{yaml}.yaml"),
            f"--model.name_or_path={tiny[arch]}", f"--data.train_file={data / 'train.jsonl'}",
            f"--data.corpus={data / 'corpus.jsonl'}", f"--data.queries={data / 'queries.jsonl'}",
            f"--exp.output_dir={out}", "--train.max_steps=10", *overrides]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher's variables in the test environment would join the wrong group
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def deepspeed_json(folder: Path, stage: int, optimizer: bool = False) -> Path:
    """A CPU DeepSpeed config: fp32, torch's AdamW (no op to compile) made by train.py, or with `optimizer` by
    DeepSpeed from the json's own section (as yamls/ds/*.json have it; train.py then hands DeepSpeed its schedule);
    under ZeRO-3 every parameter is partitioned and the final save gathers them."""
    zero = {"stage": stage}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    path = folder / f"zero{stage}_cpu.json"
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": zero, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": False}}
    if optimizer:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
    path.write_text(json.dumps(config))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged(out: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


@torch.no_grad()
def vectors(path) -> torch.Tensor:
    model = build_model(ModelConfig(name_or_path=str(path))).eval()
    return torch.cat([model.encode(TEXTS, is_query=True), model.encode(TEXTS, is_query=False)])


def assert_trained_and_loadable(final: Path, untrained: Path) -> torch.Tensor:
    assert (final / "lsr_config.json").is_file() and list(final.rglob("model.safetensors"))  # query/, doc/ if unshared
    reps = vectors(final)
    assert torch.equal(reps, vectors(final))
    assert (reps >= 0).all() and (reps > 0).any()
    assert not torch.allclose(reps, vectors(untrained), atol=1e-4)
    return reps


def test_ddp_two_cpu_processes(tiny, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *train_args(tiny, out)]
    proc = run(cmd, tmp_path)
    assert proc.stdout.count("trained 10 steps") == 1  # the summary line comes from the main process only
    assert_trained_and_loadable(out / "final", tiny["bert"])
    losses = logged(out)
    assert len(losses) == 10
    # cross-device negatives: each query is scored against the 2 x 4 x 2 = 16 documents of both processes, so the
    # untrained loss is about log(16), not the single-process log(8)
    assert abs(losses[0] - math.log(16)) < 0.3, losses


def test_deepspeed_zero2_single_cpu_process_with_resume(tiny, tmp_path):
    """With the optimizer in the DeepSpeed json (train.py used to put a torch schedule on accelerate's placeholder
    optimizer, and crashed)."""
    ds_json = deepspeed_json(tmp_path, stage=2, optimizer=True)
    out = tmp_path / "ds"
    ds_args = train_args(tiny, out, f"--train.deepspeed={ds_json}", "--train.save_every=5")
    run([sys.executable, *ds_args, "--train.stop_after=5"], tmp_path)  # killed after step 5 ...
    checkpoint = out / "checkpoints" / "step-000005"
    assert (checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()  # a ZeRO state
    assert not (out / "final").exists()
    proc = run([sys.executable, *ds_args, "--train.resume=auto"], tmp_path)  # ... and resumed
    assert "trained 10 steps" in proc.stdout
    ds_reps = assert_trained_and_loadable(out / "final", tiny["bert"])
    losses = logged(out)
    assert [int(s) for s in logged(out, "step")] == list(range(1, 11))

    # ZeRO-2 in fp32 on one process is the same optimisation as plain uninterrupted training: same losses, vectors
    plain = tmp_path / "plain"
    train.main(train_args(tiny, plain)[1:])
    assert losses == pytest.approx(logged(plain), rel=1e-3, abs=1e-3)
    torch.testing.assert_close(ds_reps, vectors(plain / "final"), atol=1e-3, rtol=1e-3)


def test_deepspeed_zero3_single_cpu_process_calibrates_and_saves(tiny, tmp_path):
    """ZeRO-3 partitions every parameter: calibration (train.calibrate_nnz) must still see whole weights, and the
    final folder must hold gathered, full-size weights. In fp32 on one process, killed and resumed, both match
    plain uninterrupted training; on two
    CPU processes DeepSpeed must really run (accelerate drops it if given `cpu=True`)."""
    ds_json = deepspeed_json(tmp_path, stage=3)
    calibrate = ("--train.calibrate_nnz=40", "--train.max_steps=4")
    out = tmp_path / "ds3"
    ds_args = train_args(tiny, out, f"--train.deepspeed={ds_json}", "--train.save_every=2", *calibrate)
    run([sys.executable, *ds_args, "--train.stop_after=2"], tmp_path)  # killed after step 2 ...
    assert (out / "checkpoints" / "step-000002" / "trainer_state.json").is_file() and not (out / "final").exists()
    proc = run([sys.executable, *ds_args, "--train.resume=auto"], tmp_path)  # ... and resumed, shift restored
    assert "DeepSpeed ZeRO-3" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert "resumed from" in proc.stderr and "calibrate_nnz" not in proc.stderr
    plain = tmp_path / "plain"
    train.main(train_args(tiny, plain, *calibrate)[1:])
    shift = json.loads((out / "final" / "lsr_config.json").read_text())["logit_shift"]
    assert shift != 0 and shift == pytest.approx(json.loads((plain / "final" / "lsr_config.json").read_text())
                                                 ["logit_shift"], abs=1e-4)
    assert logged(out) == pytest.approx(logged(plain), rel=1e-3, abs=1e-3)
    ds_reps = assert_trained_and_loadable(out / "final", tiny["bert"])
    torch.testing.assert_close(ds_reps, vectors(plain / "final"), atol=1e-3, rtol=1e-3)

    # two processes under accelerate launch: each calibrates on the same texts; the gathered save loads back
    two = tmp_path / "ds3x2"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()),
                *train_args(tiny, two, f"--train.deepspeed={ds_json}", *calibrate)], tmp_path)
    assert "DeepSpeed ZeRO-3) on 48 examples: 4 steps x effective batch 8 = 4 per device x 2 processes" in \
        proc.stderr, proc.stderr[-3000:]  # not silently plain DDP
    assert json.loads((two / "final" / "lsr_config.json").read_text())["logit_shift"] == pytest.approx(shift)
    assert_trained_and_loadable(two / "final", tiny["bert"])


@pytest.mark.parametrize("yaml,arch", [("asym_qmlp_dmlm", "bert"), ("llama_multi", "llama"), ("t5_multi", "t5")])
def test_deepspeed_zero3_other_heads_and_backbones(tiny, tmp_path, yaml, arch):
    """Two backbones (asymmetric, MLP query head), a decoder and an encoder-decoder under ZeRO-3 on one process
    give the vectors of plain training (a deep copy of a partitioned backbone used to train on empty weights, and
    the MLP heads were saved from their empty shards)."""
    out = tmp_path / "run"
    proc = run([sys.executable, *train_args(tiny, out, f"--train.deepspeed={deepspeed_json(tmp_path, stage=3)}",
                                            "--train.max_steps=3", yaml=yaml, arch=arch)], tmp_path)
    assert "DeepSpeed ZeRO-3" in proc.stderr
    reps = assert_trained_and_loadable(out / "final", tiny[arch])
    plain = tmp_path / "plain"
    train.main(train_args(tiny, plain, "--train.max_steps=3", yaml=yaml, arch=arch)[1:])
    torch.testing.assert_close(reps, vectors(plain / "final"), atol=1e-3, rtol=1e-3)
