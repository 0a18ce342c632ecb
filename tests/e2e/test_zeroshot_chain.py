"""zeroshot_prompt.main on tiny fixtures: docs and queries in encode.py's format (shards + meta.json with the same
keys), the chain index -> search -> evaluate unchanged, dense parts, and resume by skipping finished shards."""
import json

import numpy as np
import pytest
import yaml

import encode
import evaluate
import index
import search
import zeroshot_prompt
from lsr_core.sparse import load_vectors, read_meta
from lsr_core.tiny import make_collection, make_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs_e2e")
    coll = make_collection(root / "data")
    return {"data": root / "data", "llama": make_model(root / "llama", "llama", coll["words"]),
            "t5": make_model(root / "t5", "t5", coll["words"]), "n_docs": len(coll["corpus"]),
            "n_queries": len(coll["queries"])}


def test_docs_queries_then_index_search_evaluate(tiny, tmp_path):
    exp = [f"--exp.output_dir={tmp_path / 'zs'}", "--exp.name=zs", f"--model.name_or_path={tiny['llama']}",
           "--encode.batch_size=5", "--zeroshot.doc_topk=16", "--zeroshot.query_topk=8", "--index.engine=exact"]
    docs = zeroshot_prompt.main(exp + [f"--encode.input={tiny['data'] / 'corpus.jsonl'}", "--encode.kind=doc"])
    queries = zeroshot_prompt.main(exp + [f"--encode.input={tiny['data'] / 'queries.jsonl'}", "--encode.kind=query"])
    assert docs == tmp_path / "zs" / "encode" / "corpus" and queries == tmp_path / "zs" / "encode" / "queries"
    doc_ids, doc_vecs = load_vectors(docs)
    assert len(doc_ids) == tiny["n_docs"] and all(0 < len(v) <= 16 for v in doc_vecs)
    assert all(isinstance(w, float) for v in doc_vecs for w in v.values())

    # encode.py on the same backbone: same files, same meta.json keys
    ref = [f"--exp.output_dir={tmp_path / 'enc'}", f"--model.name_or_path={tiny['llama']}"]
    for name, kind, ours in (("corpus", "doc", docs), ("queries", "query", queries)):
        theirs = encode.main(ref + [f"--encode.input={tiny['data'] / (name + '.jsonl')}", f"--encode.kind={kind}"])
        assert read_meta(ours).keys() == read_meta(theirs).keys()
        # encode.py's own state (.encode/: its settings, counts per shard) aside
        assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir()
                                                                if p.name != ".encode")
    zs_meta = read_meta(queries)
    assert zs_meta["topk"] == 8 and zs_meta["count"] == tiny["n_queries"] and zs_meta["flops"] > 0
    assert read_meta(docs)["topk"] == 16
    assert yaml.safe_load((docs / "config.yaml").read_text())["zeroshot"]["doc_topk"] == 16

    index.main(exp)
    run = search.main(exp + ["--search.topk=10", "--search.latency_sample=0"])
    lines = run.read_text().splitlines()
    assert lines and {line.split()[0] for line in lines} <= {f"q{t}_{i}" for t in range(8) for i in range(6)}
    results = evaluate.main(["--qrels", str(tiny["data"] / "qrels.tsv"), "--run", str(run),
                             "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= metrics[run.stem]["mrr@10"] <= 1.0 and results is not None


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_dense_parts_and_resume(tiny, tmp_path, arch):
    argv = [f"--model.name_or_path={tiny[arch]}", f"--encode.input={tiny['data'] / 'corpus.jsonl'}",
            f"--encode.output={tmp_path / 'out'}", "--encode.shard_size=20", "--zeroshot.emit_dense=true",
            "--zeroshot.steps=2", "--encode.quant_scale=100"]
    out = zeroshot_prompt.main(argv)
    shards = sorted(out.glob("part-*.jsonl.gz"))
    assert len(shards) == 3 == len(list(out.glob("dense-part-*.npy")))  # 48 docs / 20 a shard
    ids = json.loads((out / "dense-part-00001.ids.json").read_text())
    dense = np.load(out / "dense-part-00001.npy")
    assert dense.shape == (len(ids), 32) and np.isfinite(dense).all() and ids[0] == "d3_2"
    first = {p.name: p.read_bytes() for p in shards}
    # a killed run: shard 1 missing -> only it is redone, byte-identical; the others are not touched
    mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
    (out / "part-00001.jsonl.gz").unlink()
    (out / "dense-part-00001.npy").unlink()
    zeroshot_prompt.main(argv)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.jsonl.gz")
            if p.name != "part-00001.jsonl.gz"} == {k: v for k, v in mtimes.items() if k != "part-00001.jsonl.gz"}
    import gzip

    assert gzip.decompress((out / "part-00001.jsonl.gz").read_bytes()) == \
        gzip.decompress(first["part-00001.jsonl.gz"])
    np.testing.assert_allclose(np.load(out / "dense-part-00001.npy"), dense, atol=1e-6)
    assert read_meta(out)["count"] == tiny["n_docs"] and all(isinstance(w, int) for v in load_vectors(out)[1]
                                                               for w in v.values())
