"""The benchmarks' CPU smoke runs (`--tiny`): every system of bench/train.py, bench/encode_gpu.py,
bench/encode_head.py, bench/attention.py, bench/tokenize_cpu.py, bench/vectors_cpu.py and bench/shard_json.py (and
bench/train_gpu_check.py's QLoRA variant) runs on tiny models and reports its row, so a change in lsr_core that
breaks a benchmark is caught here, not on a lent GPU."""
import pytest

pytestmark = pytest.mark.slow


def test_train_bench_tiny():
    from bench import train as bench_train

    rows = bench_train.main(["--tiny", "--systems", "ours,st"])
    assert [r["key"] for r in rows] == ["ours", "st"]
    assert all(r["step_ms"] > 0 and r["samples_per_s"] > 0 for r in rows) and rows[0]["speedup_vs_st"] > 0
    (lora,) = bench_train.main(["--tiny", "--model", "llama7b", "--mode", "lora", "--lora-dropout", "0"])
    assert "LoRA dropout 0" in lora["system"] and 0 < lora["trainable_params"]


def test_train_bench_zero3_tiny():
    """llama7b --mode full (DeepSpeed ZeRO-3, one CPU process) with DeepSpeed's per-step timers; in a subprocess, as
    DeepSpeed's process group and accelerate's state would outlive it in this one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.e2e.test_train_distributed import free_port

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))  # not a fixed port a parallel test holds
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, str(root / "bench" / "train.py"), "--tiny", "--model", "llama7b", "--mode",
                           "full", "--ds-breakdown"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "| ours llama7b full | 1 |" in out
    assert "fwd_microstep" in out and "bwd_microstep" in out and "step_microstep" in out


def test_encode_bench_tiny():
    from bench import encode_gpu

    rows = encode_gpu.main(["--tiny", "--workers", "0", "--model-only", "--heads", "auto,torch",
                            "--packed", "true,false", "--host-only", "--transport", "wire-fs,wire-fs-padfirst"])
    host = rows.pop(0)  # the host pipeline alone comes first: no model, no terms
    assert host["system"] == "host pipeline alone (0 tokenizer workers, no model)" and host["docs_per_s"] > 0
    systems = [r["system"] for r in rows]
    assert systems[-1] == "sentence-transformers SparseEncoder.encode" and "error" not in rows[-1]
    assert any("model only" in s for s in systems)
    for r in rows[:-1]:  # the host's time per batch, split: launching the model, waiting for the batch, syncing
        assert 0 < r["launch_ms_per_batch"] < r["batch_ms_per_batch"] and r["sync_ms_per_batch"] > 0, r
    assert sum("padded" in s for s in systems) == 6 and sum(r.get("packed") == "true" for r in rows) == 7
    assert sum(r.get("transport") == "wire-fs-padfirst" for r in rows) == 4
    # the same bias shift for every system: the term counts agree
    nnz = [r["nnz_mean"] for r in rows]
    assert max(nnz) - min(nnz) < 0.1 * max(nnz), nnz


def test_encode_bench_times_encode_py_tiny():
    from bench import encode_gpu

    rows = encode_gpu.main(["--tiny", "--workers", "0", "--skip-serial", "--skip-st", "--script-writers", "0,1"])
    assert [r["system"] for r in rows] == ["ours (0 tokenizer workers)"] + [
        f"encode.py (0 tokenizer workers, {n} writers, torch.compile none)" for n in (0, 1)]
    assert all(r["docs_per_s"] > 0 for r in rows)
    # encode.py loads the folder saved with the shifted bias: its shards hold the bench's term counts
    nnz = [r["nnz_mean"] for r in rows]
    assert max(nnz) - min(nnz) < 0.1 * max(nnz) and max(nnz) < 500, nnz


def test_encode_head_bench_tiny():
    from bench import encode_head

    rows = encode_head.main(["--tiny"])  # no GPU: the torch path, the naive head, the torch path on packed texts
    assert [r["system"] for r in rows] == ["torch", "naive", "packed"]
    assert rows[1]["max_abs_diff_vs_torch"] < 1e-2 and all(r["ms"] > 0 for r in rows)
    assert rows[2]["max_abs_diff_vs_torch"] < 1e-2  # a text pooled over a neighbour's span would differ by ~1


def test_attention_bench_tiny():
    from bench import attention

    rows = attention.main(["--tiny"])  # no GPU: per-text SDPA, and the kernel in Triton's interpreter
    assert [r["system"] for r in rows] == ["sdpa", "ours"] * 2
    assert all(r["max_abs_diff_vs_sdpa"] < 1e-4 and r["ms"] > 0 for r in rows)


def test_train_gpu_check_tiny():
    """The script's QLoRA variant on the CPU at a narrow width (the ZeRO-3 one needs a GPU: its json's fused AdamW)."""
    pytest.importorskip("bitsandbytes")
    from bench import train_gpu_check

    [row] = train_gpu_check.main(["--layers", "1", "--hidden", "128", "--steps", "2", "--variants", "qlora"])
    assert "error" not in row, row.get("error")
    assert row["shape"] == row["base_shape"] == (128, 512) and row["change"] > 0 and not row["quantized"]
    assert (row["reps"] >= 0).all() and (row["reps"] > 0).any()


def test_tokenize_bench_tiny():
    from bench import tokenize_cpu

    rows = tokenize_cpu.main(["--tiny"])
    assert [(r["kind"], r["system"]) for r in rows][:3] == [
        ("encoder", "tokenize (tensor masks)"), ("encoder", "row by row (before)"), ("encoder", "tokenizer call alone")]
    assert [r["system"] for r in rows[3:5]] == ["packed, padded first (before)", "packed from the Rust tokenizer"]
    assert len(rows) == 8 and all(r["docs_per_s"] > 0 for r in rows)


def test_vectors_bench_tiny():
    from bench import vectors_cpu

    rows = vectors_cpu.main(["--tiny", "--writers", "0,1", "--shard-docs", "50"])
    assert [r["system"].split(":")[0].split(",")[0] for r in rows][:8] == \
        ["prune", "prune"] + ["to_vector"] * 4 + ["JSON lines"] * 2
    assert rows[1]["columns"] < rows[0]["columns"] and all(r["ms_per_batch"] > 0 for r in rows)
    assert all(r["docs_per_s"] > 0 for r in rows[6:8])
    assert all(r["system"].startswith("ShardWriter.close") and r["gz_mb"] > 0 for r in rows[8:]) and rows[8:]


def test_shard_json_bench_tiny():
    from bench import shard_json

    row = shard_json.main(["--tiny"])
    assert row["docs"] == 300 and row["nnz_mean"] > 100
    assert all(row[key] > 0 for key in ("json.loads", "orjson.loads", "read_vectors (json)", "read_vectors (orjson)",
                                        "load_csr (json)", "load_csr (orjson)", "json.dumps", "orjson.dumps"))
    assert row["dumps_identical"] == "0/300"  # orjson's bytes are not json's: shards are still written by json
