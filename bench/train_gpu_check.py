"""train.py's own GPU paths at a 1B decoder shape, on one GPU: DeepSpeed ZeRO-3 (yamls/ds/zero3.json: weights
partitioned as they load, 16-bit weights gathered at the save) and QLoRA (4-bit base + LoRA, merged into de-quantised
weights at the save). Each trains a few steps on the tiny collection, saves, and the saved folder is reloaded and
encodes; prints the losses, wall time and what changed. Needs deepspeed and bitsandbytes (bench/README.md).

    python3 bench/train_gpu_check.py --steps 10
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsr_core.config import ModelConfig  # noqa: E402
from lsr_core.modeling import build_model  # noqa: E402
from lsr_core.tiny import make_collection, make_tokenizer  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only to try the script out (--layers 1)
VARIANTS = {"zero3": ["--train.deepspeed=yamls/ds/zero3.json"],
            "qlora": ["--model.quantization=4bit", "--model.lora=true", "--model.gradient_checkpointing=true"]}


def make_llama(folder: Path, words: list[str], layers: int, hidden: int) -> Path:
    """Llama-3.2-1B's body (hidden 2048, 32/8 heads, intermediate 8192) over the collection's word vocabulary;
    `hidden` narrows it (heads of 64, intermediate 4 x hidden) for trying the script out on a CPU."""
    import transformers

    tok = make_tokenizer(folder, "decoder", words)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                                   intermediate_size=4 * hidden,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def tensor(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return f.get_tensor(name).float()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--variants", default="zero3,qlora")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="train_gpu_"))
    collection = make_collection(root / "data")
    base = make_llama(root / "llama", collection["words"], args.layers, args.hidden)
    probe = "model.layers.0.mlp.down_proj.weight"
    results = []
    for name in args.variants.split(","):
        out = root / name
        cmd = [sys.executable, "train.py", "--cfg", "yamls/tiny/llama_multi.yaml", f"--model.name_or_path={base}",
               f"--exp.output_dir={out}", f"--data.train_file={root / 'data/train.jsonl'}",
               f"--data.corpus={root / 'data/corpus.jsonl'}", f"--data.queries={root / 'data/queries.jsonl'}",
               f"--train.max_steps={args.steps}", "--train.mixed_precision=bf16", "--train.lr=1e-4",
               "--train.batch_size=8", *VARIANTS[name]]
        began = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if proc.returncode:
            print(f"{name}: train.py failed ({proc.returncode})\n{proc.stderr[-3000:]}")
            results.append({"variant": name, "error": proc.stderr[-3000:]})
            continue
        final = out / "final"
        losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        config = json.loads((final / "config.json").read_text())
        before, after = tensor(base, probe), tensor(final, probe)
        model = build_model(ModelConfig(name_or_path=str(final), dtype="bfloat16")).eval().to(DEVICE)
        with torch.inference_mode():
            reps = model.encode(["star planet orbit", "the recipe of the bread"], is_query=False)
        banner = next((line for line in proc.stderr.splitlines() if " on " in line and "steps" in line), "")
        print(f"{name}: {seconds:.0f} s for {args.steps} steps (process start, load, save included); {banner.strip()}")
        print(f"  loss {losses[0]:.3f} -> {losses[-1]:.3f}; saved {probe} {tuple(after.shape)} (base "
              f"{tuple(before.shape)}), mean |change| {(after - before).abs().mean():.2e}; quantization_config "
              f"in saved config: {'quantization_config' in config}; dtype {config.get('dtype')}")
        print(f"  reloaded and encoded: nnz per text {(reps > 0).sum(1).tolist()}, all >= 0: {bool((reps >= 0).all())}")
        results.append({"variant": name, "seconds": seconds, "losses": losses, "shape": tuple(after.shape),
                        "base_shape": tuple(before.shape), "change": float((after - before).abs().mean()),
                        "quantized": "quantization_config" in config, "reps": reps.float().cpu()})
    return results


if __name__ == "__main__":
    main()
