"""QLoRA (`model.quantization=4bit` + LoRA) on the CPU, through bitsandbytes' CPU backend: the saved model keeps
what LoRA learnt, and the chain trains, saves a plain bf16 folder and encodes from it.

Merging LoRA into 4-bit weights re-quantises them; on a tiny Llama the rounding moves the logits several times more
than the whole LoRA update, so `SparseModel.save` merges into de-quantised weights instead (`backbones.merged`)."""
import json

import pytest
import torch
from safetensors import safe_open

import train
from lsr_core.config import ModelConfig
from lsr_core.backbones import ModelLoadError, load_backbone, prepare_for_training
from lsr_core.backbones import merged as merged_backbone
from lsr_core.modeling import build_model
from lsr_core.tiny import make_collection, make_model

pytest.importorskip("bitsandbytes")
ROOT_YAML = "yamls/tiny/llama_multi.yaml"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    collection = make_collection(root / "data")
    return {"data": root / "data", "model": make_model(root / "llama", "llama", collection["words"], hidden=128)}


def test_merging_into_a_4bit_base_keeps_the_lora_update(llama):
    backbone, _ = load_backbone(str(llama["model"]), quantization="4bit")
    backbone, _ = prepare_for_training(ModelConfig(lora=True, quantization="4bit", lora_r=16), backbone, backbone)
    torch.manual_seed(0)
    for name, param in backbone.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.01)  # an update the size of a few training steps
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        trained = backbone(input_ids=ids).logits.float()  # also repacks the CPU 4-bit weights
        with backbone.disable_adapter():
            untrained = backbone(input_ids=ids).logits.float()
        merged = merged_backbone(backbone)
        after = merged(input_ids=ids).logits.float()
    update = (trained - untrained).abs().mean()
    assert update > 0.01
    # merging into 4-bit weights misses by more than the update; what is left here is bf16 rounding, far below it
    assert (after - trained).abs().mean() < 0.5 * update
    assert not hasattr(merged.config, "quantization_config")
    assert all(type(m).__module__.split(".")[0] != "bitsandbytes" for m in merged.modules())


def test_qlora_trains_saves_a_16bit_folder_and_encodes(llama, tmp_path):
    data = llama["data"]
    final = train.main(["--cfg", ROOT_YAML, f"--model.name_or_path={llama['model']}", f"--exp.output_dir={tmp_path}",
                        f"--data.train_file={data / 'train.jsonl'}", f"--data.corpus={data / 'corpus.jsonl'}",
                        f"--data.queries={data / 'queries.jsonl'}", "--model.quantization=4bit", "--model.lora=true",
                        '--train.mixed_precision="no"', "--train.max_steps=3"])
    assert "quantization_config" not in json.loads((final / "config.json").read_text())
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the 4-bit compute dtype
    texts = ["star planet orbit", "the recipe of the bread"]
    with torch.no_grad():
        reps = build_model(ModelConfig(name_or_path=str(final))).eval().encode(texts, is_query=False)
        base = build_model(ModelConfig(name_or_path=str(llama["model"]))).eval().encode(texts, is_query=False)
    assert (reps > 0).any() and not torch.allclose(reps, base, atol=1e-4)


def test_quantization_without_bitsandbytes_says_so(llama, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"model.quantization=4bit \(QLoRA\) needs bitsandbytes"):
        load_backbone(str(llama["model"]), quantization="4bit")
