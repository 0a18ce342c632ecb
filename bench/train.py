"""Training-step throughput: our SparseModel vs sentence-transformers' SparseEncoder, and 7B-class decoders.

    python bench/train.py --model bert-base --out $OUT/train.jsonl            # ours vs ST SparseEncoder, 1 GPU
    python bench/train.py --model bert-base --systems ours,ours-compile,ours-compile-cg,st,st-compile  # torch.compile
    python bench/train.py --model llama7b --mode lora --out $OUT/train.jsonl  # LoRA, 1 GPU
    python bench/train.py --model llama7b --mode qlora --out $OUT/train.jsonl # QLoRA (4-bit NF4 base), 1 GPU
    accelerate launch --num_processes 4 bench/train.py --model llama7b --mode full --out $OUT/train.jsonl  # ZeRO-3
    python bench/train.py --tiny                                               # CPU smoke run (tiny BERT, both)

Shapes (per device): `--batch` queries of `--q-len` tokens, each with one positive and one negative document of
`--d-len` tokens (MarginMSE on random teacher scores + FLOPs on queries and documents), every token real (no
padding). Models are random-initialised at the real shape (no downloads): bert-base (BertForMaskedLM, 12 x 768,
vocab 30522) and llama7b (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000), built on the GPU.
Both systems get the same weights, bf16 autocast over float32 weights (bert-base) and fused torch AdamW; the
7B runs keep bf16 weights (DeepSpeed bf16 for full fine-tuning).

FLOPs per step (for MFU, against --peak-tflops: by default the bf16 matmul rate measured at the start of the run,
bench/peak.py; ~790 TFLOP/s on an H200, whose datasheet says 989):
  forward = 2 * N * T + 2 * H * V * T + sum over sequences of 4 * layers * L^2 * d_model
  (N: non-embedding, non-vocabulary parameters; T: tokens; the second term is the vocabulary projection; the third
  QK^T and AV over full L x L scores). Training = 3 x forward when weights get gradients (full fine-tuning, BERT),
  2 x forward for frozen weights (LoRA, QLoRA: backward computes only input gradients; adapters are ignored).
Output: one JSON line per system (samples/s = queries/s, tokens/s, step ms, MFU, peak memory) and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.config import ModelConfig  # noqa: E402
from lsr_core.losses import flops, margin_mse_loss  # noqa: E402
from bench.peak import peak_tflops  # noqa: E402
from lsr_core.backbones import prepare_for_training  # noqa: E402
from lsr_core.modeling import LSRSpec, SparseModel, build_model, compile_blocks  # noqa: E402

REG_WEIGHT = 1e-3


def hf_config(name: str, tiny: bool):
    import transformers

    if name == "bert-base":
        if tiny:
            return transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128)
        return transformers.BertConfig()  # bert-base-uncased shape: 12 x 768, 12 heads, 3072, vocab 30522
    if tiny:
        return transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False)
    return transformers.LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                                    tie_word_embeddings=False)


def step_flops(cfg, n_params: int, q_shape, d_shape, train_weights: bool) -> float:
    """The formula of the module docstring; n_params excludes embeddings and the vocabulary projection."""
    d_model, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    forward = 0.0
    for rows, length in (q_shape, d_shape):
        tokens = rows * length
        forward += 2 * n_params * tokens + 2 * d_model * vocab * tokens + rows * 4 * layers * length ** 2 * d_model
    return forward * (3 if train_weights else 2)


def body_params(backbone) -> int:
    """Parameters outside the input embeddings and the vocabulary projection (weights, not LoRA adapters)."""
    skip = {id(p) for m in (backbone.get_input_embeddings(), backbone.get_output_embeddings()) for p in m.parameters()}
    total = 0
    for name, p in backbone.named_parameters():
        if id(p) in skip or "lora_" in name or "position_embeddings" in name or "token_type" in name:
            continue
        total += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return total


def make_batch(args, vocab: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)

    def tokens(rows, length):
        ids = torch.randint(5, vocab, (rows, length), generator=gen)
        ones = torch.ones_like(ids)
        return {"input_ids": ids.to(device), "attention_mask": ones.to(device), "pool_mask": ones.to(device)}

    q = tokens(args.batch, args.q_len)
    d = tokens(2 * args.batch, args.d_len)  # per query: positive, negative (data.collate's order)
    teacher = (torch.randn(args.batch, 2, generator=gen) * 3).to(device)
    return q, d, teacher


def timed(step, warmup: int, steps: int, device) -> tuple[float, float]:
    """Median step seconds and peak memory (GiB) after warm-up."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def report(args, system: str, seconds: float, peak: float, step_flop: float, world: int, extra=None) -> dict:
    tokens = args.batch * (args.q_len + 2 * args.d_len)
    row = {"system": system, "model": args.model, "mode": args.mode, "gpus": world, "batch_per_gpu": args.batch,
           "q_len": args.q_len, "d_len": args.d_len, "step_ms": seconds * 1e3,
           "samples_per_s": world * args.batch / seconds, "tokens_per_s": world * tokens / seconds,
           "mfu": step_flop / seconds / (args.peak_tflops * 1e12), "peak_tflops": args.peak_tflops,
           "peak_mem_gib": peak,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **(extra or {})}
    if args.out and int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def profile_step(step, label: str, rows: int = 14) -> None:
    """Print the CUDA kernels that take the most time in one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"--- profile: {label}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


# ------------------------------------------------------------------------------------------------ BERT-base vs ST

def bench_ours(args, folder: Path, device, compiled: str) -> dict:
    # model.compile: what train.py does with --model.compile=<mode>
    mcfg = ModelConfig(name_or_path=str(folder), kind="encoder", compile=compiled or "none",
                       special_tokens="keep")  # [CLS]/[SEP] pool, as in the sentence-transformers peer
    model = build_model(mcfg, training=True).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    q, d, teacher = make_batch(args, model.vocab_size, device, seed=0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            q_reps, d_reps = model(q, d)
        loss = margin_mse_loss(q_reps, d_reps, teacher) + REG_WEIGHT * (flops(q_reps) + flops(d_reps))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, args.warmup, args.steps, device)
    if args.profile and device.type == "cuda":
        profile_step(step, f"ours compiled={compiled}")
    backbone = model.doc_backbone
    step_flop = step_flops(backbone.config, body_params(backbone), (args.batch, args.q_len),
                           (2 * args.batch, args.d_len), True)
    return report(args, "ours (SparseModel, sparse_mlm_pool)" + (f" + torch.compile {compiled}" if compiled else ""),
                  seconds, peak, step_flop, 1)


def bench_st(args, folder: Path, device, compiled: str) -> dict:
    from sentence_transformers import SparseEncoder
    try:
        from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    except ImportError:  # sentence-transformers < 6.2
        from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling
    from sentence_transformers.sparse_encoder.losses import SparseMarginMSELoss, SpladeLoss

    encoder = SparseEncoder(modules=[MLMTransformer(str(folder)), SpladePooling(pooling_strategy="max")],
                            device=str(device)).train()
    if compiled:  # the same blocks as ours
        compile_blocks(encoder[0].auto_model, compiled)
    loss_fn = SpladeLoss(encoder, SparseMarginMSELoss(encoder), document_regularizer_weight=REG_WEIGHT,
                         query_regularizer_weight=REG_WEIGHT)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-5, fused=device.type == "cuda")
    q, d, teacher = make_batch(args, hf_config(args.model, args.tiny).vocab_size, device, seed=0)
    features = [{k: v[rows] for k, v in batch.items() if k != "pool_mask"}
                for batch, rows in ((q, slice(None)), (d, slice(0, None, 2)), (d, slice(1, None, 2)))]
    labels = teacher[:, 0] - teacher[:, 1]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = loss_fn(features, labels)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, args.warmup, args.steps, device)
    if args.profile and device.type == "cuda":
        profile_step(step, f"sentence-transformers compiled={compiled}")
    backbone = encoder[0].auto_model
    step_flop = step_flops(backbone.config, body_params(backbone), (args.batch, args.q_len),
                           (2 * args.batch, args.d_len), True)
    return report(args, "sentence-transformers SparseEncoder (SpladeLoss+SparseMarginMSELoss)"
                  + (f" + torch.compile {compiled}" if compiled else ""), seconds, peak, step_flop, 1)


def bert_vs_st(args, device) -> list[dict]:
    import transformers

    from lsr_core.tiny import make_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="bench_bert_"))
    cfg = hf_config("bert-base", args.tiny)
    make_tokenizer(folder, "encoder", [f"w{i}" for i in range(cfg.vocab_size - 5)])
    torch.manual_seed(0)
    transformers.BertForMaskedLM(cfg).save_pretrained(folder)
    rows = []
    for system in args.systems.split(","):
        bench = bench_ours if system.startswith("ours") else bench_st
        compiled = {"compile": "default", "compile-cg": "reduce-overhead"}.get(system.split("-", 1)[-1], "")
        rows.append(bench(args, folder, device, compiled=compiled))
        rows[-1]["key"] = system
        if device.type == "cuda":
            torch.cuda.empty_cache()
    peer = next((r for r in rows if r["key"] == "st"), None)
    for r in rows:
        if peer is not None and r["key"].startswith("ours"):
            r["speedup_vs_st"] = peer["step_ms"] / r["step_ms"]
    return rows


# ------------------------------------------------------------------------------------------------------ 7B decoder

def build_decoder(args, device):
    """Random-init LlamaForCausalLM at real shape, in bf16, directly on the device."""
    import transformers

    cfg = hf_config("llama7b", args.tiny)
    torch.manual_seed(0)
    with device:
        return transformers.LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)


def bench_decoder(args, device) -> dict:
    spec = LSRSpec(kind="decoder")
    mcfg = ModelConfig(kind="decoder", lora=args.mode in ("lora", "qlora"), gradient_checkpointing=args.grad_ckpt,
                       quantization="4bit" if args.mode == "qlora" else "none", lora_dropout=args.lora_dropout)
    if args.mode == "qlora":
        # bitsandbytes quantises while loading: write the random model once, then load it as the toolkit does
        from lsr_core.tiny import make_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="bench_llama_"))
        backbone = build_decoder(args, device)
        make_tokenizer(folder, "decoder", [f"w{i}" for i in range(backbone.config.vocab_size - 4)])
        backbone.save_pretrained(folder)
        del backbone
        torch.cuda.empty_cache()
        mcfg.name_or_path, mcfg.dtype = str(folder), "bfloat16"
        model = build_model(mcfg, training=True)
    else:
        backbone = build_decoder(args, device)
        if args.mode == "lora":
            backbone, _ = prepare_for_training(mcfg, backbone, backbone)
        elif args.grad_ckpt:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = SparseModel(spec, None, backbone)
    if args.compile != "none":  # what model.compile / model.compile_scope do in build_model
        compile_blocks(model.doc_backbone, args.compile, args.compile_scope)
    model.train()
    world = 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True) if device.type == "cuda" else \
        torch.optim.AdamW(params, lr=1e-5)
    accelerator = None
    if args.mode == "full":
        accelerator = make_zero3_accelerator(args)
        model, optimizer = accelerator.prepare(model, optimizer)
        if args.ds_compile != "none":  # DeepSpeedEngine.compile: torch.compile of the whole model, with DeepSpeed's
            model.compile()  # hooks (ds-compile torch) or with ZeRO-3's gathers scheduled in the graph (deepcompile)
        world = accelerator.num_processes
        device = accelerator.device
    q, d, teacher = make_batch(args, hf_config("llama7b", args.tiny).vocab_size, device, seed=int(
        os.environ.get("RANK", "0")))

    def step():
        q_reps, d_reps = model(q, d)
        loss = margin_mse_loss(q_reps, d_reps, teacher) + REG_WEIGHT * (flops(q_reps) + flops(d_reps))
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, args.warmup, args.steps, device)
    if args.profile and device.type == "cuda" and int(os.environ.get("RANK", "0")) == 0 and accelerator is None:
        profile_step(step, f"llama7b {args.mode}")
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    backbone = unwrapped.doc_backbone
    step_flop = step_flops(hf_config("llama7b", args.tiny), body_params(backbone), (args.batch, args.q_len),
                           (2 * args.batch, args.d_len), train_weights=args.mode == "full")
    if accelerator is not None:  # the slowest rank sets the pace and the memory bound
        stats = torch.tensor([seconds, peak], device=device)
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        seconds, peak = stats.tolist()
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in unwrapped.parameters()
                    if p.requires_grad)
    label = f"ours llama7b {args.mode}" + (" + grad ckpt" if args.grad_ckpt else "") + \
        (f", LoRA dropout {args.lora_dropout:g}" if args.mode != "full" else "") + \
        (f" + torch.compile {args.compile} ({args.compile_scope})" if args.compile != "none" else "") + \
        (f" + DeepSpeed compile ({args.ds_compile})" if args.mode == "full" and args.ds_compile != "none" else "")
    return report(args, label, seconds, peak, step_flop, world, {"trainable_params": trainable})


def make_zero3_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    ds_config = {
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e8,
                              "stage3_param_persistence_threshold": 1e6, "stage3_max_live_parameters": 1e9,
                              "stage3_max_reuse_distance": 1e9},
        "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "train_micro_batch_size_per_gpu": args.batch, "zero_allow_untested_optimizer": True,
    }
    if args.ds_compile == "deepcompile":
        ds_config["compile"] = {"deepcompile": True}
    if args.ds_breakdown:  # DeepSpeed's timers (forward, backward, allgather, reduce, optimizer step) every step
        ds_config.update(wall_clock_breakdown=True, steps_per_print=1)
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29513"}.items():
        os.environ.setdefault(key, value)
    return Accelerator(mixed_precision="bf16", deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert-base", "llama7b"], default="bert-base")
    parser.add_argument("--mode", choices=["full", "lora", "qlora"], default="full")
    parser.add_argument("--batch", type=int, default=0, help="queries per device (default 32 BERT, 8 llama7b)")
    parser.add_argument("--q-len", type=int, default=32)
    parser.add_argument("--d-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (llama7b)")
    parser.add_argument("--systems", default="ours,st", help="bert-base: any of ours, st, each with -compile "
                        "(torch.compile of the transformer blocks) or -compile-cg (+ CUDA graphs)")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one step per system "
                        "(bert-base; llama7b without DeepSpeed)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="llama7b LoRA/QLoRA: dropout on the "
                        "adapters' inputs (0 removes one elementwise pass per adapted layer)")
    parser.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead"],
                        help="llama7b: torch.compile the transformer blocks (as model.compile)")
    parser.add_argument("--compile-scope", default="stack", choices=["stack", "layer"],
                        help="llama7b: model.compile_scope, the whole stack as one graph or each block on its own")
    parser.add_argument("--ds-compile", default="none", choices=["none", "torch", "deepcompile"],
                        help="llama7b --mode full: DeepSpeedEngine.compile() of the whole model, with ZeRO-3's "
                        "module hooks (torch) or DeepCompile (ZeRO-3's gathers and releases as graph passes)")
    parser.add_argument("--ds-breakdown", action="store_true", help="llama7b --mode full: print DeepSpeed's "
                        "wall_clock_breakdown timers of each step (rank 0)")
    parser.add_argument("--peak-tflops", default="measure", help="MFU denominator: 'measure' or TFLOP/s")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, 2 steps")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    args.batch = args.batch or (32 if args.model == "bert-base" else 8)
    if args.tiny:
        args.batch, args.q_len, args.d_len, args.warmup, args.steps = 2, 8, 16, 1, 2
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    args.peak_tflops, how = peak_tflops(args.peak_tflops)
    print(f"MFU denominator: {args.peak_tflops:.0f} TFLOP/s ({how})")
    rows = bert_vs_st(args, device) if args.model == "bert-base" else [bench_decoder(args, device)]
    if int(os.environ.get("RANK", "0")) == 0:
        print("| system | GPUs | samples/s | tokens/s | step ms | MFU | peak GiB |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['system']} | {r['gpus']} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} "
                  f"| {r['step_ms']:.1f} | {r['mfu']:.1%} | {r['peak_mem_gib']:.1f} |")
        for r in rows:
            if "speedup_vs_st" in r:
                print(f"speed-up {r['system']} / sentence-transformers (eager): {r['speedup_vs_st']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
