"""Document encoding throughput on one GPU: our encoder (encode.py's path) vs sentence-transformers' SparseEncoder.

    python bench/encode_gpu.py --model bert-base --docs 16000 --out $OUT/encode.jsonl
    python bench/encode_gpu.py --model llama1b --docs 4000 --out $OUT/encode.jsonl
    python bench/encode_gpu.py --tiny                      # CPU smoke run

Corpus: random words, lengths uniform in [--min-words, --max-words] (MS MARCO-like 60-250 tokens); a word-level
tokenizer over as many words as the model's vocabulary, so one word = one token. Models are random-initialised at
the real shape and saved once (bf16): bert-base (BertForMaskedLM, 12 x 768, vocab 30522) and llama1b (Llama-3.2-1B
shape: hidden 2048, 16 layers, 32 heads / 8 KV heads, intermediate 8192, vocab 128256, tied embeddings).
  ours: `build_model(..., dtype=bfloat16)` + `pipeline.encode_shard` (length-sorted batches, tokenise, forward with the
        sparse MLM head: the fused Triton kernel unless --heads says otherwise), each batch's reps turned into a
        sparse COO tensor on the GPU: first as encode.py runs by
        default (tokenising in the main process, encode.num_workers 0), then with --workers tokenizer workers
        (encode.num_workers), once per --compile mode (model.compile; batches padded to a multiple of 16) and per
        --packed value (model.packed: auto packs an encoder's texts end to end on CUDA, false pads) and per
        --attention value (model.attention_kernel: auto, our kernel on packed batches wider than 128; varlen); with
        --host-only also the host side alone (tokenizer workers + copy to the GPU, no model): end to end's ceiling
  ST:   SparseEncoder([MLMTransformer(folder), SpladePooling("max")]) in bf16, `.encode(texts, batch_size)`
        (it also sorts by length; default output: sparse COO tensors)
Both get the same texts, batch size and weights, after a warm-up on other texts of the same lengths (`warm_texts`).
A random model activates nearly every vocabulary term; the output bias is shifted (calibrated on the warm-up texts,
same shift for both) so that documents keep ~--target-nnz terms, as trained SPLADE models do.
With --script-writers, encode.py itself (`encode.main`) on a corpus file of the same texts, per encode.num_writers.
MFU: sum over documents of (2 * N * L + 2 * H * V * L + 4 * layers * L^2 * d_model) over time and --peak-tflops
(N: non-embedding, non-vocabulary parameters; L: the document's real tokens, padding not counted); by default the
peak is the bf16 matmul rate measured at the start of the run (bench/peak.py).
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsr_core.pipeline import encode_shard, from_wire, length_sorted_groups, to_wire, tokenized_batches  # noqa: E402
from bench.peak import peak_tflops  # noqa: E402
from bench.train import body_params, profile_step  # noqa: E402
from lsr_core.config import ModelConfig  # noqa: E402
from lsr_core.modeling import build_model  # noqa: E402
from lsr_core.packing import pack_batch  # noqa: E402


class _NoProgress:
    def update(self, n):
        pass


def hf_config(name: str, tiny: bool):
    import transformers

    if name == "bert-base":
        if tiny:
            return transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=128)
        return transformers.BertConfig()
    if tiny:
        return transformers.LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=128, tie_word_embeddings=True)
    return transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                    num_key_value_heads=8, intermediate_size=8192, tie_word_embeddings=True,
                                    max_position_embeddings=4096)


def make_model_folder(name: str, tiny: bool) -> tuple[Path, object]:
    import transformers

    from lsr_core.tiny import TOKENIZERS, make_tokenizer

    cfg = hf_config(name, tiny)
    kind = "encoder" if name == "bert-base" else "decoder"
    folder = Path(tempfile.mkdtemp(prefix=f"bench_{name}_"))
    tok = make_tokenizer(folder, kind, [f"w{i}" for i in range(cfg.vocab_size - len(TOKENIZERS[kind][0]))])
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    cls = {"encoder": transformers.BertForMaskedLM, "decoder": transformers.LlamaForCausalLM}[kind]
    with device:
        model = cls._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    del model
    return folder, cfg


def make_texts(n: int, vocab_words: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab_words)}" for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def warm_texts(n: int, vocab_words: int, lo: int, hi: int, batch: int) -> list[str]:
    """The warm-up: n texts of random lengths, plus a batch of the shortest and one of the longest. A long run's
    length-sorted batches start and end nearly uniform at those extremes, so every shape bucket it meets (the head
    and attention kernels' tiles, autotuned per power of two of the positions and of the longest text; the compiled
    graphs' guards on them) is compiled and tuned before the clock starts, as in a long job."""
    rng = random.Random(2)
    return make_texts(n, vocab_words, lo, hi, seed=1) + [
        " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(words)) for words in [lo] * batch + [hi] * batch]


def encode_flops(cfg, n_params: int, lengths: list[int]) -> float:
    d_model, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    return float(sum(2 * n_params * n + 2 * d_model * vocab * n + 4 * layers * n * n * d_model for n in lengths))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def output_bias_shift(model, warm, args) -> float:
    """The shift c such that a bias of -c on the vocabulary projection leaves ~target_nnz terms per document:
    a random-init model activates nearly every term, which would time a dense-output conversion rather than
    encoding. Pooled values are log1p(max logit), so c is the expm1 of that quantile of the unbiased reps."""
    with torch.inference_mode():
        reps = torch.cat([r for _, r in encode_shard(model, warm, False, args.batch, _NoProgress())]).float()
    keep = min(1.0, args.target_nnz / reps.shape[1])
    sample = reps.flatten()[torch.randperm(reps.numel(), device=reps.device)[:1 << 22]]
    return float(torch.expm1(torch.quantile(sample, 1 - keep)))


def shift_bias(backbone, shift: float) -> None:
    projection = backbone.get_output_embeddings()
    if projection.bias is None:  # Llama: no bias; the head supports one
        projection.bias = torch.nn.Parameter(torch.zeros(projection.weight.shape[0], dtype=projection.weight.dtype,
                                                         device=projection.weight.device), requires_grad=False)
    projection.bias.data.sub_(shift)


def dict_batches(model, texts: list[str], batch_size: int, workers: int, device):
    """The host pipeline before `pipeline.to_wire` (transport "dicts"): each worker hands over a dict of padded
    tensors (one shared-memory segment each) and the device packs them (`pack_batch` there: synchronisations)."""
    loader = torch.utils.data.DataLoader(
        length_sorted_groups(texts, batch_size), batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
        collate_fn=lambda positions: (positions, model.tokenize([texts[i] for i in positions], is_query=False)))
    for positions, batch in loader:
        with torch.inference_mode():
            yield positions, model.encode_batch({k: v.to(device, non_blocking=True) for k, v in batch.items()},
                                                is_query=False)


def padded_first_host_batch(model, texts: list[str], is_query: bool, pack: bool) -> dict:
    """`SparseModel.host_batch` as it was before `_tokenize_packed` (transport "wire-fs-padfirst"): the wrapper
    pads, then `pack_batch` unpads."""
    batch = model.tokenize(texts, is_query)
    return pack_batch(batch) if pack else batch


def autotuned_tiles() -> dict:
    """The tile each Triton kernel's autotuner chose so far, per key (shapes, rounded)."""
    from lsr_core import attention_kernel, head_kernel

    kernels = {"head": head_kernel, "attention": attention_kernel}
    return {f"{name} {key}": tile for name, kernel in kernels.items() for key, tile in kernel.autotuned_tiles().items()
            if key != "last"}


def set_transport(transport: str) -> None:
    """wire / dicts: shared-memory segments passed as file descriptors (torch's default on Linux); wire-fs: by
    file name (torch.multiprocessing's file_system strategy)."""
    torch.multiprocessing.set_sharing_strategy("file_system" if "-fs" in transport else "file_descriptor")


def bench_ours(folder, texts, warm, args, device, workers: int, compile_mode: str, head: str, packed: str,
               transport: str = "wire-fs", lookahead: int = 1, attention: str = "auto"):
    mode, _, scope = compile_mode.partition(":")  # e.g. default:layer
    # each variant's model compiles the same block code: without a reset its graphs count towards the previous
    # models' recompile limit (8), and past it torch runs the blocks eagerly without a word on stdout
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = build_model(ModelConfig(name_or_path=str(folder), dtype="bfloat16", compile=mode,
                                    compile_scope=scope or "stack", head_kernel=head, packed=packed,
                                    attention_kernel=attention, special_tokens="keep")).to(device)  # as ST pools
    model.eval()
    if args.target_nnz and args.shift is None:
        args.shift = output_bias_shift(model, warm, args)
    if args.shift:
        shift_bias(model.doc_backbone, args.shift)

    def run(part):
        nnz = 0
        if workers < 0:  # the model alone: batches tokenised and on the GPU before the clock starts
            for batch in pretokenized[id(part)]:
                with torch.inference_mode():
                    reps = model.encode_batch(batch, is_query=False)
                began = time.perf_counter()
                nnz += reps.to_sparse()._nnz()
                host["sync"] += time.perf_counter() - began
            return nnz
        set_transport(transport)
        if "padfirst" in transport:  # the workers' batches as made before SparseModel._tokenize_packed
            model.host_batch = functools.partial(padded_first_host_batch, model)
        batches = dict_batches(model, part, args.batch, workers, device) if transport.startswith("dicts") else \
            encode_shard(model, part, False, args.batch, _NoProgress(), workers, pin="pageable" not in transport,
                         lookahead=lookahead)
        batches = iter(batches)
        while True:  # per batch: the wait for the next one (its launch included) and the result's synchronisation
            began = time.perf_counter()
            item = next(batches, None)
            waited = time.perf_counter()
            if item is None:
                return nnz
            nnz += item[1].to_sparse()._nnz()
            host["next"] += waited - began
            host["sync"] += time.perf_counter() - waited

    pretokenized = {}
    if workers < 0:
        for part in (warm, texts):
            pretokenized[id(part)] = [
                from_wire(flat.to(device), layout) for flat, layout in (
                    to_wire(model.host_batch([part[i] for i in group], False, model.packs(False, device)))
                    for group in length_sorted_groups(part, args.batch))]

    # the host time spent in encode_batch: launching the model's kernels (no synchronisation inside on a packed
    # batch); near the time per batch, the host, not the device, sets the pace
    host, encode_batch = {}, model.encode_batch

    def timed(batch, is_query):
        began = time.perf_counter()
        out = encode_batch(batch, is_query)
        host["launch"] += time.perf_counter() - began
        host["batches"] += 1
        return out

    model.encode_batch = timed
    host.update(launch=0.0, batches=0, next=0.0, sync=0.0)
    run(warm)
    sync(device)
    if args.profile and workers < 0 and device.type == "cuda":  # the warm-up batches again, kernel by kernel
        profile_step(lambda: run(warm), f"model only, compile {compile_mode}, head {head}, packed {packed}, "
                     f"attention {attention}", 25)
    host.update(launch=0.0, batches=0, next=0.0, sync=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    graphs, tunings = torch._dynamo.utils.counters["stats"]["unique_graphs"], len(autotuned_tiles())
    began = time.perf_counter()
    nnz = run(texts)
    sync(device)
    seconds = time.perf_counter() - began
    # compiling or autotuning on the clock: a shape the warm-up missed (the row's time then holds it)
    args.on_the_clock = {"graphs_compiled_timed": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
                         "tunings_timed": len(autotuned_tiles()) - tunings}
    # per batch on the host (ms): launch (in encode_batch), wait (in the loop's next(), launch excluded: the
    # DataLoader and the copy to the device) and sync (the consumer's wait for the result); end to end only
    args.host_ms = {k: 1e3 * host[k] / host["batches"] for k in ("launch", "next", "sync")}
    args.host_ms.update(wait=args.host_ms.pop("next") - args.host_ms["launch"] if workers >= 0 else float("nan"),
                        batch=1e3 * seconds / host["batches"])
    return seconds, token_lengths(model, texts, args), body_params(model.doc_backbone), nnz / len(texts)


def token_lengths(model, texts: list[str], args) -> list[int]:
    """Each text's tokens, counted once per run (every variant encodes the same texts with the same tokenizer)."""
    if getattr(args, "lengths", None) is None:
        args.lengths = [len(ids) for ids in model.tokenizer(texts)["input_ids"]]
    return args.lengths


def shifted_folder(folder: Path, shift: float) -> Path:
    """A copy of the model folder with the output bias shifted as `shift_bias` does in memory, for encode.py, which
    loads its model from a folder."""
    import transformers

    shifted = Path(tempfile.mkdtemp(prefix="bench_shifted_"))
    shutil.copytree(folder, shifted, dirs_exist_ok=True)  # the tokenizer's files; the weights are written over
    backbone = transformers.BertForMaskedLM.from_pretrained(folder, dtype=torch.bfloat16)
    shift_bias(backbone, shift)
    backbone.save_pretrained(shifted)
    return shifted


def bench_script(folder: Path, texts: list[str], warm: list[str], args, workers: int, writers: int,
                 compile_mode: str) -> dict:
    """encode.py itself (`encode.main`) over a corpus file of `texts`: tokenise in `workers` workers, encode, prune,
    JSON lines in `writers` processes (encode.num_writers), one gzip shard. Time: meta.json's seconds_last_run (from
    the model loaded to the shard on disk; the check of the shards after it is left out). A first call on `warm`
    compiles the model, as a long job amortises that."""
    import encode  # in this process, so that the warm-up's compiled graphs serve the timed call

    work = Path(tempfile.mkdtemp(prefix="bench_script_"))
    for name, part in (("warm", warm), ("corpus", texts)):
        with open(work / f"{name}.jsonl", "w") as f:
            for i, text in enumerate(part):
                f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")

    def run(name: str, out: str) -> dict:
        encode.main([f"--model.name_or_path={folder}", "--model.dtype=bfloat16", f"--model.compile={compile_mode}",
                     f"--encode.input={work / name}.jsonl", f"--encode.output={work / out}",
                     f"--encode.batch_size={args.batch}", f"--encode.num_workers={workers}",
                     f"--encode.num_writers={writers}", f"--exp.output_dir={work}"])
        return json.loads((work / out / "meta.json").read_text())

    torch._dynamo.reset()
    run("warm", "warm")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    meta = run("corpus", "corpus")
    meta["graphs_compiled_timed"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    shutil.rmtree(work)
    return meta


def bench_host(model, texts, warm, args, device, workers: int, transport: str) -> float:
    """encode_shard's host side alone: the tokenizer workers' batches copied to the device, no model run (the
    model, left on the CPU, only tokenises)."""
    set_transport(transport)

    def run(part):
        for _, flat, _ in tokenized_batches(model, part, False, args.batch, workers, device):
            flat.to(device, non_blocking=True)
        sync(device)

    run(warm)
    began = time.perf_counter()
    run(texts)
    return time.perf_counter() - began


def bench_st(folder, texts, warm, args, device):
    from sentence_transformers import SparseEncoder
    try:
        from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    except ImportError:  # sentence-transformers < 6.2
        from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling

    encoder = SparseEncoder(modules=[MLMTransformer(str(folder)), SpladePooling(pooling_strategy="max")],
                            device=str(device)).to(torch.bfloat16).eval()
    if args.shift:
        shift_bias(encoder[0].auto_model, args.shift)
    encoder.encode(warm, batch_size=args.batch)
    sync(device)
    began = time.perf_counter()
    out = encoder.encode(texts, batch_size=args.batch)
    sync(device)
    seconds = time.perf_counter() - began
    nnz = out._nnz() if hasattr(out, "_nnz") else sum(o._nnz() for o in out)
    return seconds, nnz / len(texts)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["bert-base", "llama1b"], default="bert-base")
    parser.add_argument("--docs", type=int, default=16000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--min-words", type=int, default=60)
    parser.add_argument("--max-words", type=int, default=250)
    parser.add_argument("--skip-st", action="store_true")
    parser.add_argument("--skip-serial", action="store_true", help="leave out encode.py's default run (tokenising in "
                        "the main process, eager)")
    parser.add_argument("--workers", default="8", help="comma list of tokenizer worker counts (encode.num_workers)")
    parser.add_argument("--host-only", action="store_true", help="also time the host pipeline alone per worker "
                        "count: tokenise in the workers and copy to the GPU, no model (what end to end can reach)")
    parser.add_argument("--compile", default="none", help="comma list of model.compile modes to time with workers: "
                        "none, default, reduce-overhead, each optionally :layer (model.compile_scope)")
    parser.add_argument("--heads", default="auto", help="comma list of model.head_kernel values to time: auto "
                        "(the fused Triton kernel on a GPU), torch (chunked float32 logits), triton")
    parser.add_argument("--attention", default="auto", help="comma list of model.attention_kernel values to time: "
                        "auto (packed texts: the Triton kernel with small tiles), varlen (torch's varlen_attn)")
    parser.add_argument("--packed", default="auto", help="comma list of model.packed values to time: auto (an "
                        "encoder's texts end to end on CUDA, varlen flash attention), false (padded batches)")
    parser.add_argument("--transport", default="wire-fs", help="comma list, how tokenizer workers hand batches over: "
                        "wire-fs (encode.py's: one tensor per batch, packed on the host, shared by file name: "
                        "torch's file_system strategy), wire (the same by file descriptor, torch's default), "
                        "wire-fs-pageable (wire-fs not pinned), wire-fs-padfirst (wire-fs, the workers packing "
                        "the padded batch: before SparseModel._tokenize_packed), dicts (a tensor per field by "
                        "descriptor, packed on the device: the pipeline before pipeline.to_wire)")
    parser.add_argument("--threads", default="0", help="comma list of the main process's torch CPU threads to time "
                        "end to end with (torch.set_num_threads; 0 = torch's default, one per core)")
    parser.add_argument("--lookahead", default="1", help="comma list of encode_shard's lookahead to time end to end "
                        "with (batches queued on the GPU before one is handed to the caller; 0: none)")
    parser.add_argument("--model-only", action="store_true", help="also time the model alone on batches tokenised "
                        "before the clock starts (the host pipeline's ceiling)")
    parser.add_argument("--script-writers", default="", help="comma list of encode.num_writers to time encode.py "
                        "itself with (bert-base; first --workers and --compile values): reading the corpus file to "
                        "writing the shard")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of the model-only variants "
                        "(torch.profiler over the warm-up batches)")
    parser.add_argument("--target-nnz", type=int, default=150, help="shift the output bias to ~this many terms per "
                        "document (0 = leave the random model's near-dense output)")
    parser.add_argument("--peak-tflops", default="measure", help="MFU denominator: 'measure' or TFLOP/s")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.script_writers and args.model != "bert-base":
        parser.error("--script-writers: bert-base only (a Llama has no output bias to shift in its saved folder)")
    if args.tiny:
        args.docs, args.batch, args.min_words, args.max_words = 40, 8, 5, 30
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.peak_tflops, how = peak_tflops(args.peak_tflops)
    print(f"MFU denominator: {args.peak_tflops:.0f} TFLOP/s ({how})")
    folder, cfg = make_model_folder(args.model, args.tiny)
    words = cfg.vocab_size - (5 if args.model == "bert-base" else 4)
    texts = make_texts(args.docs, words, args.min_words, args.max_words)
    warm = warm_texts(8 * args.batch, words, args.min_words, args.max_words, args.batch)
    args.shift = None
    rows = []
    heads, modes, packs = args.heads.split(","), args.compile.split(","), args.packed.split(",")
    attentions = args.attention.split(",")
    grid = [(mode, head, packed, attention) for mode in modes for head in heads for packed in packs
            for attention in attentions]
    workers = [int(n) for n in args.workers.split(",")]
    transports = args.transport.split(",")
    threads = [int(n) for n in args.threads.split(",")]
    lookaheads = [int(n) for n in args.lookahead.split(",")]
    variants = [] if args.skip_serial else \
        [(0, "none", heads[0], packs[0], attentions[0], transports[0], threads[0], lookaheads[0])]
    variants += [(n, *v, transport, t, ahead) for n in workers for v in grid for transport in transports
                 for t in threads for ahead in lookaheads]
    variants += [(-1, *v, transports[0], threads[0], 0) for v in grid] if args.model_only else []
    default_threads = torch.get_num_threads()
    if args.host_only:
        tokenizer_only = build_model(ModelConfig(name_or_path=str(folder), dtype="bfloat16"))
        tokens = sum(len(ids) for ids in tokenizer_only.tokenizer(texts)["input_ids"])
    for n in workers if args.host_only else []:
        seconds = bench_host(tokenizer_only, texts, warm, args, device, n, transports[0])
        rows.append({"model": args.model, "docs": args.docs, "batch": args.batch, "system": f"host pipeline alone "
                     f"({n} tokenizer workers, no model)", "seconds": seconds, "docs_per_s": args.docs / seconds,
                     "tokens_per_s": tokens / seconds, "mfu": float("nan"), "nnz_mean": float("nan")})
    for workers, compile_mode, head, packed, attention, transport, n_threads, lookahead in variants:
        torch.set_num_threads(n_threads or default_threads)
        seconds, lengths, n_params, nnz = bench_ours(folder, texts, warm, args, device, workers, compile_mode, head,
                                                     packed, transport, lookahead, attention)
        flop = encode_flops(cfg, n_params, lengths)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        base = {"model": args.model, "docs": args.docs, "batch": args.batch, "mean_tokens": sum(lengths) / len(lengths),
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "bias_shift": args.shift,
                "peak_tflops": args.peak_tflops, "head_kernel": head, "packed": packed, "attention_kernel": attention,
                "transport": transport,
                "main_threads": torch.get_num_threads(), "lookahead": lookahead if workers >= 0 else None}
        name = f"ours ({workers} tokenizer workers" if workers >= 0 else "ours (model only: pre-tokenised batches"
        name += f", torch.compile {compile_mode}" if compile_mode != "none" else ""
        name += f", head {head}" if head != "auto" else ""
        name += f", attention {attention}" if len(attentions) > 1 else ""
        name += f", transport {transport}" if workers > 0 and len(transports) > 1 else ""
        name += f", {torch.get_num_threads()} main threads" if workers > 0 and len(threads) > 1 else ""
        name += f", lookahead {lookahead}" if workers >= 0 and len(lookaheads) > 1 else ""
        name += ", padded)" if packed == "false" else ")"
        rows.append(dict(base, system=name, seconds=seconds, docs_per_s=args.docs / seconds,
                         tokens_per_s=sum(lengths) / seconds, mfu=flop / seconds / (args.peak_tflops * 1e12),
                         peak_mem_gib=peak, nnz_mean=nnz,
                         **{f"{k}_ms_per_batch": v for k, v in args.host_ms.items()},
                         compiled_graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                         tiles=autotuned_tiles(), **args.on_the_clock))
        # as it comes, so that a run cut short by a time limit still reports what it measured
        print(f"measured {name}: {rows[-1]['docs_per_s']:.0f} docs/s, MFU {rows[-1]['mfu']:.1%}; on the clock: "
              f"{args.on_the_clock['graphs_compiled_timed']} graphs compiled, {args.on_the_clock['tunings_timed']} "
              "kernel tunings", flush=True)
    torch.set_num_threads(default_threads)
    folder_shifted = shifted_folder(folder, args.shift) if args.script_writers else None
    script_workers = int(args.workers.split(",")[0])
    for n in [int(n) for n in args.script_writers.split(",")] if args.script_writers else []:
        meta = bench_script(folder_shifted, texts, warm, args, script_workers, n, modes[0])
        seconds = meta["seconds_last_run"]
        name = f"encode.py ({script_workers} tokenizer workers, {n} writers, torch.compile {modes[0]})"
        rows.append(dict(base, system=name, seconds=seconds, docs_per_s=args.docs / seconds,
                         tokens_per_s=sum(lengths) / seconds, mfu=flop / seconds / (args.peak_tflops * 1e12),
                         nnz_mean=meta["nnz_mean"], graphs_compiled_timed=meta["graphs_compiled_timed"]))
        print(f"measured {name}: {rows[-1]['docs_per_s']:.0f} docs/s, MFU {rows[-1]['mfu']:.1%}; on the clock: "
              f"{meta['graphs_compiled_timed']} graphs compiled", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.skip_st:
        try:
            st_seconds, st_nnz = bench_st(folder, texts, warm, args, device)
            rows.append(dict(base, system="sentence-transformers SparseEncoder.encode", seconds=st_seconds,
                             docs_per_s=args.docs / st_seconds, tokens_per_s=sum(lengths) / st_seconds,
                             mfu=flop / st_seconds / (args.peak_tflops * 1e12), nnz_mean=st_nnz))
            for r in rows[:-1]:
                if r["system"].startswith("ours"):
                    r["speedup_vs_st"] = st_seconds / r["seconds"]
        except Exception as err:  # e.g. a causal LM, which ST's MLMTransformer (AutoModelForMaskedLM) cannot load
            rows.append(dict(base, system="sentence-transformers SparseEncoder.encode",
                             error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"))
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print("| model | system | docs/s | tokens/s | MFU | note |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['system']} | - | - | - | {r['error']} |")
        else:
            graphs = f", {r['compiled_graphs']} graphs compiled" if r.get("compiled_graphs") else ""
            if "batch_ms_per_batch" in r:
                graphs += (f", ms/batch {r['batch_ms_per_batch']:.1f}: launch {r['launch_ms_per_batch']:.1f}, "
                           f"wait {r['wait_ms_per_batch']:.1f}, sync {r['sync_ms_per_batch']:.1f}")
            print(f"| {r['model']} | {r['system']} | {r['docs_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['mfu']:.1%} "
                  f"| nnz {r['nnz_mean']:.0f}{graphs} |")
    for r in rows:
        if "speedup_vs_st" in r:
            print(f"speed-up {r['system']} / sentence-transformers: {r['speedup_vs_st']:.2f}x")
    return rows


if __name__ == "__main__":
    main()
