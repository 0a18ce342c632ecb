"""`auto` precision end to end, the way `make demo` runs (`--model.dtype=auto`, `--train.mixed_precision=auto`):
train.py then encode.py on a tiny BERT. `auto` is bf16 where `lsr_core.utils.native_bf16` says the machine computes
it natively, else float32, so the test is marked `precision`: `make test` runs it both ways, as the machine resolves
`auto` and with LSR_NATIVE_BF16 forcing the other answer."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import encode
from lsr_core.config import load_config
from lsr_core.sparse import load_vectors, read_meta
from lsr_core.utils import native_bf16
from lsr_core.tiny import make_collection, make_model

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.precision


def test_auto_precision_trains_and_encodes(tmp_path):
    """train.py resolves `auto` as `native_bf16` says (the hardware, or LSR_NATIVE_BF16) and trains; encode.py with
    `--model.dtype=auto` (as scripts/demo.sh) gives float32's vectors up to bf16 rounding. train.py runs in a
    subprocess: accelerate keeps one precision per process, and the other tests in this one train in float32."""
    native = native_bf16()
    col = make_collection(tmp_path / "data")
    model = make_model(tmp_path / "bert", "bert", col["words"])
    out, data = tmp_path / "run", tmp_path / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))  # LSR_NATIVE_BF16, if set, goes along
    cmd = [sys.executable, str(ROOT / "train.py"), "--cfg", str(ROOT / "yamls/tiny/bert_mlm.yaml"),
           f"--model.name_or_path={model}", f"--exp.output_dir={out}", f"--data.train_file={data}/train.jsonl",
           f"--data.corpus={data}/corpus.jsonl", f"--data.queries={data}/queries.jsonl",
           "--train.max_steps=8", "--train.log_every=1", "--model.dtype=auto", "--train.mixed_precision=auto"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    cfg = load_config(["--cfg", str(out / "config.yaml")])
    assert (cfg.model.dtype, cfg.train.mixed_precision) == (("bfloat16", "bf16") if native else ("float32", "no"))
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    weights = {}
    for path in (out / "final").rglob("*.safetensors"):
        weights.update(load_file(str(path)))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16 if native else torch.float32}

    runs = {}
    for name in ("auto", "float32"):
        runs[name] = tmp_path / name
        encode.main([f"--exp.output_dir={out}", f"--encode.input={data}/corpus.jsonl", "--encode.kind=doc",
                     f"--encode.output={runs[name]}", f"--model.dtype={name}"])
    assert load_config(["--cfg", str(runs["auto"] / "config.yaml")]).model.dtype == cfg.model.dtype
    ids, auto = load_vectors(runs["auto"])
    ids32, f32 = load_vectors(runs["float32"])
    assert ids == ids32 and read_meta(runs["auto"])["count"] == 48
    vocab = sorted({t for v in auto + f32 for t in v})
    dense = {name: torch.tensor([[v.get(t, 0.0) for t in vocab] for v in vecs], dtype=torch.float64)
             for name, vecs in (("auto", auto), ("float32", f32))}
    if not native:  # the same float32 computation
        assert torch.equal(dense["auto"], dense["float32"])
        return
    # The bf16 checkpoint's weights are exact in float32, so what differs is activation rounding: bf16 keeps 8
    # significant bits (a rounding is off by at most 2^-8 of the value), the logits are rounded once more after the
    # two tiny layers', and log1p(relu(x)) passes a relative error on no larger. Allow four roundings' worth.
    err = (dense["auto"] - dense["float32"]).norm(dim=1) / dense["float32"].norm(dim=1)
    assert float(err.max()) <= 4 * 2.0 ** -8
    assert float(err.max()) > 0  # bf16 did run: rounding shows
