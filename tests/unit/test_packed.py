"""Packed encoding (model.packed): an encoder batch run as one row of its texts end to end, each attending to itself
only, gives the vectors of the padded batch, for every model type it is enabled for; it is taken only where it
applies, and refused with a clear error where asked for and unsupported."""
import pytest
import torch

from lsr_core import head_kernel, modeling, packing
from lsr_core.config import ModelConfig
from lsr_core.backbones import ModelLoadError
from lsr_core.modeling import build_model
from lsr_core.packing import PACKED_POSITION_OFFSET
from lsr_core.tiny import make_collection, make_model

# lengths 3 to 24 words: each batch pads most of its texts
TEXTS = ["star planet orbit", "the recipe of the bread with butter and sugar in the kitchen of a castle",
         "planet", " ".join(["orbit moon star comet"] * 6), "bread and butter"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed_models")
    words = make_collection(root / "data")["words"]
    return {arch: str(make_model(root / arch, arch, words)) for arch in [*PACKED_POSITION_OFFSET, "llama"]}


def encode(folder, texts, is_query=False, **overrides):
    model = build_model(ModelConfig(name_or_path=folder, **overrides)).eval()
    with torch.inference_mode():
        return model, model.encode(texts, is_query=is_query)


@pytest.fixture
def packed_calls(monkeypatch):
    """How many batches ran packed."""
    calls = []
    original = modeling.packed_inputs
    monkeypatch.setattr(modeling, "packed_inputs", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("special", ["reference", "keep"])
@pytest.mark.parametrize("arch", list(PACKED_POSITION_OFFSET))
def test_packed_vectors_equal_padded_ones(tiny, arch, special, packed_calls):
    """Both model.special_tokens choices: the packed row carries the pool mask that leaves [CLS]/[SEP] out."""
    _, padded = encode(tiny[arch], TEXTS, packed="false", special_tokens=special)
    assert not packed_calls
    model, packed = encode(tiny[arch], TEXTS, packed="true", special_tokens=special)
    assert packed_calls and model.doc_backbone.config._attn_implementation == packing.PACKED_ATTENTION
    assert (padded > 0).sum() > 0
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    batch = packing.pack_batch(model.tokenize(TEXTS, is_query=False))
    special_ids = torch.tensor(model.tokenizer.all_special_ids)
    assert torch.equal(batch["pool_mask"] == 0, torch.isin(batch["input_ids"], special_ids) & (special == "reference"))


def test_packed_queries_and_length_buckets(tiny, packed_calls):
    _, padded = encode(tiny["bert"], TEXTS, is_query=True, packed="false")
    _, packed = encode(tiny["bert"], TEXTS, is_query=True, packed="true", length_buckets=2, pad_to_multiple=16)
    assert len(packed_calls) == 2  # one packed row per length bucket
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not head_kernel.INTERPRET, reason="runs in Triton's interpreter (CPU machines)")
def test_packed_rows_through_the_fused_kernel(tiny):
    """The kernel reads each text's span of the packed row (Triton's interpreter on the CPU) and gives the chunked
    torch path's values on the padded batch; a wrong span would pool a neighbour's positions."""
    _, padded = encode(tiny["bert"], TEXTS, packed="false", head_kernel="torch")
    _, packed = encode(tiny["bert"], TEXTS, packed="true", head_kernel="triton")
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not head_kernel.INTERPRET, reason="runs in Triton's interpreter (CPU machines)")
def test_packed_rows_through_the_attention_kernel(tiny, monkeypatch):
    """model.attention_kernel=auto: on batches wider than KERNEL_MIN_LENGTH (lowered here: the tiny models have 128
    positions) the packed attention kernel (Triton's interpreter, allowed on the CPU) gives the padded batch's
    vectors; batches no wider keep the other path."""
    calls = []
    monkeypatch.setattr(packing.attention_kernel, "usable", lambda q: True)
    original = packing.attention_kernel.packed_attention
    monkeypatch.setattr(packing.attention_kernel, "packed_attention", lambda *a: calls.append(a[4]) or original(*a))
    monkeypatch.setattr(packing, "KERNEL_MIN_LENGTH", 0)
    _, padded = encode(tiny["bert"], TEXTS, packed="false")
    _, packed = encode(tiny["bert"], TEXTS, packed="true")
    assert len(calls) == 2 and set(calls) == {64}  # each layer, at the width rounded up to 64
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    calls.clear()
    _, packed = encode(tiny["bert"], TEXTS, packed="true", attention_kernel="varlen")
    assert not calls
    monkeypatch.setattr(packing, "KERNEL_MIN_LENGTH", 64)
    _, packed = encode(tiny["bert"], TEXTS, packed="true")
    assert not calls


class _Count:
    n = 0

    def update(self, n):
        self.n += n


@pytest.mark.parametrize("workers", [0, 1])
def test_texts_packed_on_the_host_give_the_padded_vectors(tiny, packed_calls, workers):
    """encode_shard packs in the tokenizer worker (`host_batch`), hands over one tensor (`to_wire`) and the model
    runs it as packed; the vectors, in input order, are the padded batch's."""
    from lsr_core.pipeline import encode_shard, from_wire, to_wire

    _, padded = encode(tiny["bert"], TEXTS, packed="false")
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true")).eval()
    batch = model.host_batch(TEXTS, is_query=False, pack=True)
    assert batch["input_ids"].shape == batch["pool_mask"].shape == (int(batch["cu_seq_lens"][-1]),)
    flat, layout = to_wire(batch)
    assert flat.dim() == 1 and flat.dtype == torch.int64
    back = from_wire(flat, layout)
    assert back.keys() == batch.keys() and back["cu_seq_lens"].dtype == torch.int32 and back["max_length"] == 64
    assert all(torch.equal(back[k], batch[k]) for k in batch if k != "max_length")
    progress = _Count()
    rows = torch.zeros_like(padded)
    for positions, reps in encode_shard(model, TEXTS, False, 2, progress, workers=workers):
        rows[positions] = reps
    assert progress.n == len(TEXTS) and len(packed_calls) == 3  # three batches of at most 2, packed
    torch.testing.assert_close(rows, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lookahead", [0, 1, 2])
def test_encode_shard_queues_the_next_batches_before_yielding_one(tiny, lookahead):
    """With `lookahead` n, when the caller gets a batch the model has already been given the next n (a GPU works on
    them while the caller syncs on the first), and every batch still comes once, in order, with the padded vectors."""
    from lsr_core.pipeline import encode_shard

    _, padded = encode(tiny["bert"], TEXTS, packed="false")
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true")).eval()
    calls, original = [], model.encode_batch
    model.encode_batch = lambda batch, is_query: calls.append(1) or original(batch, is_query)
    progress, seen, rows = _Count(), [], torch.zeros_like(padded)
    for positions, reps in encode_shard(model, TEXTS, False, 2, progress, lookahead=lookahead):
        seen.append((len(calls), progress.n))
        rows[positions] = reps
    # three batches (2 + 2 + 1 texts); progress counts the batches handed out
    assert seen == [(min(1 + lookahead + i, 3), min(2 * (i + 1), 5)) for i in range(3)]
    torch.testing.assert_close(rows, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_callers_work_on_a_batch_does_not_wait_for_the_batches_queued_after_it(tiny):
    """encode_shard hands each batch over on a side stream: the caller's work on batch 0 (here a sum, then a wait for
    it) finishes while batch 1, queued ahead on the model's stream with a long sleep in it, is still running."""
    from lsr_core.pipeline import encode_shard

    model = build_model(ModelConfig(name_or_path=tiny["bert"], dtype="bfloat16")).eval().to("cuda")
    for _, reps in encode_shard(model, TEXTS, False, 2, _Count(), lookahead=1):
        # warm-up: the head kernel's autotuning synchronises on each new shape, and so does each cudaMalloc while
        # the side stream's memory pool grows (without it the first batch is over before it is checked)
        reps.sum().item()
    original, main = model.encode_batch, torch.cuda.current_stream()

    def slow(batch, is_query):
        reps = original(batch, is_query)
        torch.cuda._sleep(2 * 10**8)  # ~0.1 s of GPU clock cycles after each batch
        return reps

    model.encode_batch = slow
    running = []
    for positions, reps in encode_shard(model, TEXTS, False, 2, _Count(), lookahead=1):
        assert torch.cuda.current_stream() != main
        reps.sum().item()  # synchronises the side stream only
        running.append(not main.query())
    assert running == [True, True, False]  # batches 1 and 2 were still running when 0 and 1 were done


@pytest.mark.parametrize("arch", list(PACKED_POSITION_OFFSET) + ["splade-tiny"])
def test_packing_from_the_rust_tokenizer_equals_packing_the_padded_batch(tiny, arch):
    """host_batch packs an encoder's texts straight from the Rust tokenizer; field for field it is pack_batch of the
    padded `tokenize`: documents cut at max_doc_len, queries with their prefix, widths rounded as configured, on the
    word-level test tokenizers and on the real SPLADE-tiny's WordPiece one (lower-casing, sub-words)."""
    if arch == "splade-tiny":
        from tests.unit.test_modeling import splade_tiny_folder

        folder = str(splade_tiny_folder())
    else:
        folder = tiny[arch]
    model = build_model(ModelConfig(name_or_path=folder, packed="true", pad_to_multiple=8, max_doc_len=16,
                                    query_prefix="query: ")).eval()
    texts = TEXTS + ["Astronomers' Observations of Jupiter's moons, 1610", ""]
    for is_query in (False, True):
        before = model.tokenizer.backend_tokenizer.truncation
        fast = model.host_batch(texts, is_query, pack=True)
        assert model.tokenizer.backend_tokenizer.truncation == before  # the wrapper's backend is left as it is
        slow = packing.pack_batch(model.tokenize(texts, is_query))
        assert fast.keys() == slow.keys() and fast["max_length"] == slow["max_length"]
        for key in ("input_ids", "position_ids", "pool_mask", "cu_seq_lens"):
            assert fast[key].dtype == slow[key].dtype and torch.equal(fast[key], slow[key]), (arch, is_query, key)
        if not is_query:
            assert int(fast["position_ids"].max()) == 15  # the long texts were cut at 16 tokens


def test_a_packed_batch_for_a_model_that_does_not_pack_is_refused(tiny):
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true")).eval()
    batch = model.host_batch(TEXTS, is_query=False, pack=True)
    with pytest.raises(ValueError, match="a packed batch .* for a model that does not pack"), torch.enable_grad():
        model.encode_batch(batch, is_query=False)


def test_calibration_logits_and_training_mode_stay_padded_where_packing_cannot_apply(tiny, packed_calls):
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true")).eval()
    batch = model.tokenize(TEXTS, is_query=False)
    raw = model.pooled_doc_logits(batch)
    assert len(packed_calls) == 1
    unpacked = build_model(ModelConfig(name_or_path=tiny["bert"], packed="false")).eval().pooled_doc_logits(batch)
    torch.testing.assert_close(raw, unpacked, atol=1e-5, rtol=1e-5)
    with torch.enable_grad():  # a gradient needs the padded training head
        model.encode(TEXTS[:2], is_query=False).sum().backward()
    assert len(packed_calls) == 1
    trained = build_model(ModelConfig(name_or_path=tiny["bert"], packed="true"), training=True)
    assert trained.packed == "false" and trained.doc_backbone.config._attn_implementation == "sdpa"


def test_auto_packs_only_on_cuda_and_skips_unsupported_backbones(tiny, packed_calls):
    model, _ = encode(tiny["bert"], TEXTS, packed="auto")
    assert model.packed == "auto" and not packed_calls  # enabled, but this is a CPU
    model, _ = encode(tiny["llama"], TEXTS, packed="auto")
    assert model.packed == "false"


def test_packed_true_refuses_what_it_cannot_pack(tiny):
    with pytest.raises(ModelLoadError, match="model.packed=true needs an encoder.*'llama'"):
        build_model(ModelConfig(name_or_path=tiny["llama"], packed="true"))
    with pytest.raises(ModelLoadError, match="model.packed=true needs .*'eager' attention"):
        build_model(ModelConfig(name_or_path=tiny["bert"], packed="true", attn_implementation="eager"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_varlen_flash_attention_on_cuda(tiny, packed_calls):
    """On CUDA in bf16 `auto` packs (varlen flash attention + the fused kernel on spans): as close to the float32
    padded vectors as the padded bf16 run is."""
    def run(**overrides):
        model = build_model(ModelConfig(name_or_path=tiny["bert"], **overrides)).eval().to("cuda")
        with torch.inference_mode():
            return model.encode(TEXTS * 40, is_query=False).float().cpu()
    reference = run(packed="false", dtype="float32")
    padded = run(packed="false", dtype="bfloat16")
    assert not packed_calls
    packed = run(packed="auto", dtype="bfloat16")
    assert packed_calls
    from lsr_core.pipeline import encode_shard  # packed in the tokenizer workers, no synchronisation: the same vectors
    model = build_model(ModelConfig(name_or_path=tiny["bert"], packed="auto", dtype="bfloat16")).eval().to("cuda")
    shard = torch.zeros_like(packed)
    for positions, reps in encode_shard(model, TEXTS * 40, False, 64, _Count(), workers=2):
        shard[positions] = reps.float().cpu()
    torch.testing.assert_close(shard, packed)
    batch = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in model.host_batch(TEXTS, False, True).items()}
    with torch.inference_mode():
        model.encode_batch(batch, is_query=False)  # warm-up: the kernel's autotuning synchronises
        torch.cuda.set_sync_debug_mode("error")  # a batch packed on the host runs without a synchronisation
        try:
            model.encode_batch(batch, is_query=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    err_padded, err_packed = (padded - reference).abs().max(), (packed - reference).abs().max()
    assert err_packed <= 2 * err_padded + 1e-3, (err_packed, err_padded)
