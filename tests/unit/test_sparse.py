"""`prune` and `quantize` (what encode.py turns each batch into): equal to their plain definitions, element for
element, on rows with ties, rows with nothing kept, thresholds and top-k."""
import math

import numpy as np
import pytest
import torch

from lsr_core.sparse import prune, quantize, to_vector


def reference_prune(reps, topk, threshold):
    """Keep weights > threshold, of those the topk largest, sorted descending: every column of the row leaves the
    device, one row at a time."""
    rows = []
    for row in reps.float():
        values, ids = row.topk(topk) if 0 < topk < len(row) else row.sort(descending=True)
        keep = values > threshold
        rows.append((ids[keep].numpy(), values[keep].numpy()))
    return rows


@pytest.mark.parametrize("topk,threshold", [(0, 0.0), (0, 0.5), (3, 0.0), (50, 0.2), (0, 10.0)])
def test_prune_equals_its_definition(topk, threshold):
    generator = torch.Generator().manual_seed(0)
    reps = torch.rand(6, 40, generator=generator) * (torch.rand(6, 40, generator=generator) < 0.2)
    reps[1] = 0.0  # nothing to keep
    reps[2, :5] = 0.75  # ties
    reps[3] = torch.rand(40, generator=generator)  # everything kept at threshold 0
    ours = prune(reps, topk, threshold)
    expected = reference_prune(reps, topk, threshold)
    assert len(ours) == len(expected) == 6
    for (ids, weights), (ref_ids, ref_weights) in zip(ours, expected):
        assert ids.dtype == np.int64 and weights.dtype == np.float32
        np.testing.assert_array_equal(weights, ref_weights)
        assert sorted(ids.tolist()) == sorted(ref_ids.tolist()) if len(set(weights.tolist())) < len(weights) \
            else ids.tolist() == ref_ids.tolist()
    assert len(ours[1][0]) == 0 and (threshold > 0 or topk or len(ours[3][0]) == 40)
    assert prune(reps[:0], topk, threshold) == []


def test_quantize_and_vectors_equal_their_definition():
    weights = np.random.default_rng(0).random(500).astype(np.float32) * 3
    weights[:10] = 0.0
    for scale in (0.0, 100.0):
        expected = [int(v) for v in np.rint(weights * scale)] if scale else [round(float(v), 5) for v in weights]
        got = quantize(weights, scale)
        assert got == expected and all(type(a) is type(b) for a, b in zip(got, expected))
    vocab = [f"t{i}" for i in range(500)]
    vector = to_vector(np.arange(500), weights, vocab, 100.0)
    assert len(vector) == sum(1 for v in weights if round(float(v) * 100) != 0) and "t0" not in vector
    with pytest.raises(ValueError, match="not finite"):
        quantize(np.array([1.0, math.inf], dtype=np.float32), 100.0)
