"""index.py + search.py through main(argv) on tiny shard folders, for every engine: TREC run, meta, config, errors."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import yaml

import index
import search
from lsr_core import engines
from lsr_core.sparse import ShardWriter, load_vectors, nnz_stats, shard_name, vocab_hash, write_meta
from lsr_core.utils import InputError

ROOT = Path(__file__).resolve().parents[2]
N_DOCS, N_QUERIES = 300, 12
MODEL, VOCAB = "runs/tiny/final", vocab_hash([f"tok{t}" for t in range(150)])


def write_folder(folder, rows, **meta):
    """One shard and the meta.json encode.py would write for it (`meta` overrides keys)."""
    writer = ShardWriter(folder / shard_name(0))
    for rid, vec in rows:
        writer.add(rid, vec)
    stats = writer.close()
    write_meta(folder, {"model": MODEL, "vocab_hash": VOCAB, "shards": 1, **nnz_stats(stats["nnz"]),
                        "config_hash": "0123abcd", **meta})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    rng = np.random.default_rng(1)

    def vec(nnz):
        return {f"tok{t}": round(float(w), 4) for t, w in zip(rng.choice(150, nnz, replace=False),
                                                              rng.uniform(0.1, 2.0, nnz))}

    root = tmp_path_factory.mktemp("run")
    write_folder(root / "encode" / "corpus", [(f"p{i}", vec(15)) for i in range(N_DOCS)])
    queries = [(f"q{i}", vec(4)) for i in range(N_QUERIES)] + [("q-empty", {}), ("q-unknown", {"zzz": 1.0})]
    write_folder(root / "encode" / "queries", queries)
    return root


@pytest.fixture(scope="module")
def truth(run_dir, tmp_path_factory):
    """qid -> top-5 [(docid, score)] from engines.build("exact") on the same shard files."""
    doc_ids, docs = load_vectors(run_dir / "encode" / "corpus")
    qids, queries = load_vectors(run_dir / "encode" / "queries")
    run = engines.build("exact", doc_ids, docs, tmp_path_factory.mktemp("truth")).search(queries, 5)
    return {q: hits for q, hits in zip(qids, run) if hits}


def read_trec(path):
    run = {}
    for line in path.read_text().splitlines():
        qid, q0, docid, rank, score, tag = line.split()
        assert q0 == "Q0"
        run.setdefault(qid, []).append((docid, int(rank), float(score), tag))
    return run


@pytest.mark.parametrize("engine", ["exact", "qdrant-edge", "seismic", "milvus"])
def test_index_then_search(run_dir, truth, engine):
    base = [f"--exp.output_dir={run_dir}", "--exp.name=e2e", f"--index.engine={engine}"]
    try:
        index_dir = index.main(base)
    except RuntimeError as err:
        if engine == "milvus":
            pytest.skip(f"milvus-lite cannot run on this machine: {err}")
        raise
    assert index_dir == run_dir / "index" / engine
    meta = json.loads((index_dir / "meta.json").read_text())
    assert meta["engine"] == engine and meta["count"] == N_DOCS and meta["size_bytes"] > 0
    assert meta["docs"] == {"model": MODEL, "vocab_hash": VOCAB, "config_hash": "0123abcd"}
    assert not list(index_dir.parent.glob(".*tmp*"))  # the temp build folder was renamed away
    assert yaml.safe_load((index_dir / "config.yaml").read_text())["index"]["engine"] == engine

    extra = ["--search.seismic_query_cut=50", "--search.seismic_heap_factor=0.5"] if engine == "seismic" else []
    out = search.main(base + ["--search.topk=5", "--search.threads=2", f"--search.name=run-{engine}"] + extra)
    assert out == run_dir / "search" / f"run-{engine}.trec"
    run = read_trec(out)
    assert set(run) == {f"q{i}" for i in range(N_QUERIES)}  # empty and unknown-only queries have no lines
    for hits in run.values():
        assert [h[1] for h in hits] == list(range(1, 6))
        assert all(a[2] >= b[2] for a, b in zip(hits, hits[1:]))
        assert {h[3] for h in hits} == {f"run-{engine}"}
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["count"] == N_QUERIES + 2 and meta["empty_queries"] == 2 and meta["engine"] == engine
    assert meta["latency_sample"] == N_QUERIES and meta["ms_per_query_p99"] >= meta["ms_per_query_mean"] > 0

    # the same top-5 as the exact engine called directly on the same files (seismic: approximate)
    same = np.mean([len({h[0] for h in run[q]} & {d for d, _ in hits}) / 5 for q, hits in truth.items()])
    assert same >= (0.98 if engine == "seismic" else 1.0)
    if engine != "seismic":
        assert {q: [h[0] for h in hits] for q, hits in run.items()} == {q: [d for d, _ in h] for q, h in truth.items()}


def test_missing_index_and_input(tmp_path):
    with pytest.raises(InputError, match=r"index not found: .*index/qdrant-edge \(run index.py first\)"):
        search.main([f"--exp.output_dir={tmp_path}"])
    with pytest.raises(InputError, match="encoded documents not found"):
        index.main([f"--exp.output_dir={tmp_path}"])


def test_duplicate_doc_ids_rejected(tmp_path):
    write_folder(tmp_path / "encode" / "corpus", [("p1", {"a": 1.0}), ("p1", {"b": 1.0})])
    with pytest.raises(InputError, match="duplicate id 'p1'"):
        index.main([f"--exp.output_dir={tmp_path}"])
    assert not (tmp_path / "index").exists() or not any((tmp_path / "index").iterdir())


# --- each step checks what the previous one wrote -------------------------------------------------------------------

def small_folder(folder, n=6, **meta):
    write_folder(folder, [(f"p{i}", {f"tok{i}": 1.0, "tok99": 0.5}) for i in range(n)], **meta)


def test_index_refuses_unfinished_folders(tmp_path):
    corpus = tmp_path / "encode" / "corpus"
    args = [f"--exp.output_dir={tmp_path}", "--index.engine=exact"]

    def refused(message):
        with pytest.raises(InputError) as err:
            index.main(args)
        assert str(err.value) == message
        assert "\n" not in str(err.value)

    small_folder(corpus)
    (corpus / "meta.json").unlink()  # encode.py was killed before it finished
    refused(f"{corpus}: no meta.json, so encode.py did not finish this folder; re-run encode.py to finish it")

    small_folder(corpus, shards=3)  # meta.json records 3 shards, only part-00000 and part-00002 are there
    (corpus / shard_name(0)).rename(corpus / shard_name(2))
    ShardWriter(corpus / shard_name(0)).close()
    refused(f"{corpus}: 2 of 3 shards (part-00001.jsonl.gz missing); meta.json records 3; re-run encode.py to finish")
    (corpus / shard_name(2)).unlink()

    small_folder(corpus, shards=1)  # a shard of another run next to the recorded one
    ShardWriter(corpus / shard_name(1)).close()
    refused(f"{corpus}: part-00001.jsonl.gz not among the 1 shards meta.json records (output of two runs?); remove "
            f"the folder and re-run encode.py")
    (corpus / shard_name(1)).unlink()

    small_folder(corpus, count=7)  # fewer lines than recorded: a shard was replaced by a shorter one
    refused(f"{corpus}: 6 vectors in 1 shard(s), but meta.json records 7 (a shard was cut short or replaced); "
            f"re-run encode.py")

    (corpus / "meta.json").write_text('{"count": 6, "shards": ')
    with pytest.raises(InputError, match=rf"^{re.escape(str(corpus / 'meta.json'))}:1: invalid JSON "
                                         rf"\(Expecting value\); re-run encode.py$"):
        index.main(args)
    (corpus / "meta.json").write_text('{"count": 6}')
    refused(f"{corpus / 'meta.json'}: field 'shards' missing or not a count; re-run encode.py")
    assert not (tmp_path / "index").exists()  # nothing was built

    small_folder(corpus)  # complete again: builds
    assert index.main(args) == tmp_path / "index" / "exact"


def test_search_checks_queries_come_from_the_documents_encoder(tmp_path, caplog):
    small_folder(tmp_path / "encode" / "corpus")
    base = [f"--exp.output_dir={tmp_path}", "--index.engine=exact", "--search.topk=3", "--search.latency_sample=0"]
    index_dir = index.main(base)
    assert json.loads((index_dir / "meta.json").read_text())["docs"] == {"model": MODEL, "vocab_hash": VOCAB,
                                                                          "config_hash": "0123abcd"}
    queries = tmp_path / "encode" / "queries"
    other_vocab = vocab_hash(["tok0", "tok1"])

    def search_with(**meta):
        write_folder(queries, [("q1", {"tok1": 1.0}), ("q2", {"tok99": 2.0})], **meta)
        caplog.clear()
        return search.main(base)

    out = search_with()  # same model and vocabulary
    assert read_trec(out)["q1"][0][:2] == ("p1", 1) and "vocabulary unknown" not in caplog.text
    for meta, q_model, q_vocab in [({"vocab_hash": other_vocab}, MODEL, other_vocab),
                                   ({"model": "runs/other/final"}, "runs/other/final", VOCAB),
                                   ({"model": "runs/other/final", "vocab_hash": None}, "runs/other/final", "unknown")]:
        with pytest.raises(InputError) as err:
            search_with(**meta)
        assert str(err.value) == (f"{queries}: queries encoded by model {q_model!r} (vocab {q_vocab}), the documents "
                                  f"of {index_dir} by model {MODEL!r} (vocab {VOCAB}); encode both with one model or "
                                  f"pass --search.force=true")
    out.unlink()
    forced = search.main(base + ["--search.force=true"])  # the last queries: another model, no vocab_hash
    assert forced == out and read_trec(out)["q1"][0][:2] == ("p1", 1)
    assert "by model 'runs/other/final' (vocab unknown)" in caplog.text and "searching anyway" in caplog.text
    assert f"vocabulary unknown (no vocab_hash in {queries}/meta.json)" in caplog.text

    search_with(vocab_hash=None)  # older queries without vocab_hash, same model: searched, with a warning
    assert f"vocabulary unknown (no vocab_hash in {queries}/meta.json): only the models" in caplog.text

    # one model folder reached by two paths is one model
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    small_folder(tmp_path / "encode" / "corpus", model=str(model))
    index.main(base)
    search_with(model=str(tmp_path / "link"))

    # queries folder unfinished: refused like documents
    (queries / "meta.json").unlink()
    with pytest.raises(InputError, match=rf"^{re.escape(str(queries))}: no meta.json, so encode.py did not finish"):
        search.main(base)


@pytest.fixture(scope="module")
def small_indexes(tmp_path_factory):
    """engine -> a built index folder of 40 documents (milvus: None if milvus-lite cannot start here)."""
    rng = np.random.default_rng(3)
    ids = [f"d{i}" for i in range(40)]
    docs = [{f"t{t}": float(w) for t, w in zip(rng.choice(60, 6, replace=False), rng.uniform(0.1, 2, 6))}
            for _ in ids]
    docs[5] = {}  # an empty document: qdrant-edge and milvus do not store it, engine.json's count says so
    out = {}
    for name in engines.ENGINES:
        folder = tmp_path_factory.mktemp(name)
        try:
            engines.build(name, ids, docs, folder).close()
            out[name] = folder
        except RuntimeError:
            out[name] = None
    legacy = tmp_path_factory.mktemp("exact-npz")  # the exact engine's layout before postings/: one docs.npz
    shutil.copytree(out["exact"], legacy, dirs_exist_ok=True)
    sp.save_npz(legacy / "docs.npz", sp.csr_matrix(engines.load(legacy).docs_t, copy=True), compressed=False)
    shutil.rmtree(legacy / "postings")
    out["exact-npz"] = legacy
    return out


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def garbage(path):
    path.write_bytes(b"\x00garbage\xff" * 8)


def drop_first_id(path):
    path.write_text(json.dumps(json.loads(path.read_text())[1:]))


REBUILD = "; rebuild it with index.py$"
CORRUPT_CASES = [  # engine, file (glob), damage, expected message after the file's path
    ("exact", "engine.json", garbage, r": not UTF-8 text" + REBUILD),
    ("exact", "engine.json", lambda p: p.write_text('{"engine": "faiss", "params": {}}'),
     r": corrupt index file \(expected \{'engine': one of \['exact', .*got engine 'faiss'\)" + REBUILD),
    ("exact", "ids.json", truncate, r":\d+: invalid JSON \(.+\)" + REBUILD),
    ("exact", "ids.json", drop_first_id, r": 39 entries, engine.json records 40" + REBUILD),
    ("exact", "ids.json", lambda p: p.write_text('{"d0": 1}'),
     r": corrupt index file \(expected a JSON list of strings\)" + REBUILD),
    ("exact", "vocab.json", garbage, r": not UTF-8 text" + REBUILD),
    ("exact", "vocab.json", lambda p: p.unlink(), r": file not found" + REBUILD),
    ("exact", "postings/data.npy", truncate, r": corrupt index file \(.+\)" + REBUILD),
    ("exact", "postings/indices.npy", garbage, r": corrupt index file \(.+\)" + REBUILD),
    ("exact", "postings/indptr.npy", lambda p: p.unlink(), r": file not found" + REBUILD),
    ("exact", "postings/indptr.npy", lambda p: np.save(p, np.arange(41, dtype=np.int32)),  # another vocab's rows
     r": 40 token rows for \d+ tokens in vocab.json" + REBUILD),
    ("exact", "postings/indptr.npy", lambda p: np.save(p, np.load(p) + 1), r": corrupt index file \(row pointers do "
     r"not fit \d+ indices and \d+ weights\)" + REBUILD),
    ("exact", "postings/data.npy", lambda p: np.save(p, np.load(p).astype(np.int32)),
     r": corrupt index file \(a 1-d int32 array\)" + REBUILD),
    ("exact-npz", "docs.npz", truncate, r": corrupt index file \(.+\)" + REBUILD),
    ("exact-npz", "docs.npz", garbage, r": corrupt index file \(.+\)" + REBUILD),
    ("qdrant-edge", "qdrant/edge_config.json", garbage, r": corrupt index file \(.+\)" + REBUILD),
    ("qdrant-edge", "qdrant/segments/*/segment.json", truncate, r": corrupt index file \(.+\)" + REBUILD),
    ("qdrant-edge", "qdrant/segments/*/vector_storage-sparse/store/page_0.dat", garbage,
     r": corrupt index file \(.+\)" + REBUILD),
    ("qdrant-edge", "qdrant/segments/*/mutable_id_tracker.mappings", truncate,  # loads, with documents lost
     r": holds \d+ vectors, engine.json records 39" + REBUILD),
    ("seismic", "index.index.seismic", truncate, r": corrupt index file \(.+\)" + REBUILD),
    ("seismic", "index.index.seismic", garbage, r": corrupt index file \(.+\)" + REBUILD),
    ("milvus", "milvus.db", garbage,
     r": milvus-lite cannot open it \(.+\): a corrupt index file, or milvus-lite cannot run on this machine" + REBUILD),
    ("milvus", "milvus.db", lambda p: p.unlink(), r": file not found" + REBUILD),
]


@pytest.mark.parametrize("engine,pattern,damage,message", CORRUPT_CASES,
                         ids=[f"{c[0]}-{c[1].split('/')[-1]}-{i}" for i, c in enumerate(CORRUPT_CASES)])
def test_corrupt_index_file_is_named(small_indexes, engine, pattern, damage, message):
    folder = small_indexes[engine]
    if folder is None:
        pytest.skip(f"{engine} cannot run on this machine")
    path = next(folder.glob(pattern))
    data = path.read_bytes()
    damage(path)
    try:
        with pytest.raises(InputError) as err:
            engines.load(folder).close()
        # the message names the damaged file (qdrant-edge: its folder, the engine reports the file inside)
        named = folder / "qdrant" if engine == "qdrant-edge" and pattern != "engine.json" else path
        assert re.fullmatch(re.escape(str(named)) + message.rstrip("$"), str(err.value)), str(err.value)
        assert "\n" not in str(err.value)
    finally:
        path.write_bytes(data)
    engines.load(folder).close()  # restored: loads again


def test_search_names_a_corrupt_index_file(tmp_path):
    small_folder(tmp_path / "encode" / "corpus")
    write_folder(tmp_path / "encode" / "queries", [("q1", {"tok1": 1.0})])
    base = [f"--exp.output_dir={tmp_path}", "--index.engine=exact"]
    index_dir = index.main(base)
    damaged = index_dir / "postings" / "data.npy"
    truncate(damaged)
    with pytest.raises(InputError, match=rf"^{re.escape(str(damaged))}: corrupt index file \(.+\); "
                                         rf"rebuild it with index.py$"):
        search.main(base)
    (index_dir / "meta.json").write_text("[1, 2")
    with pytest.raises(InputError, match=rf"^{re.escape(str(index_dir / 'meta.json'))}:\d+: invalid JSON"):
        search.main(base)


# --- no leaks: temp files and folders of failed or killed runs -------------------------------------------------------

def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_swept_and_live_ones_kept(tmp_path, caplog):
    small_folder(tmp_path / "encode" / "corpus")
    write_folder(tmp_path / "encode" / "queries", [("q1", {"tok1": 1.0})])
    base = [f"--exp.output_dir={tmp_path}", "--exp.name=e2e", "--index.engine=exact", "--search.latency_sample=0"]
    host, dead, live = socket.gethostname(), dead_pid(), os.getppid()
    (tmp_path / "index").mkdir()
    (tmp_path / "search").mkdir()
    stale = [tmp_path / "index" / f".exact.tmp-{host}-{dead}", tmp_path / "index" / f".exact.old-{host}-{dead}",
             tmp_path / "search" / f".e2e.trec.{host}-{dead}.k2x_9ab.tmp",
             tmp_path / "search" / f".e2e.meta.json.{host}-{dead}.abc.tmp",
             tmp_path / "search" / f".config.yaml.{host}-{dead}.abc.tmp"]
    kept = [tmp_path / "index" / f".exact.tmp-{host}-{live}",  # a run still at work
            tmp_path / "index" / f".exact.tmp-elsewhere-{dead}",  # a run of another host sharing the folder
            tmp_path / "index" / f".seismic.tmp-{host}-{dead}",  # another output's: its own next run sweeps it
            tmp_path / "search" / f".e2e.trec.{host}-{live}.abc.tmp",
            tmp_path / "search" / f".other.trec.{host}-{dead}.abc.tmp"]
    for path in stale + kept:
        if path.parent.name == "index":
            path.mkdir()
            (path / "ids.json").write_text("[]")
        else:
            path.write_text("half a line")
    index.main(base)
    assert f"removed 2 folder(s) left by killed runs: {stale[1]}, {stale[0]}" in caplog.text  # sorted by name
    search.main(base)
    assert f"removed 3 temp file(s) left by killed runs: {stale[4]}, {stale[3]}, {stale[2]}" in caplog.text
    assert [p for p in stale if p.exists()] == [] and [p for p in kept if not p.exists()] == []


def test_failed_runs_leave_no_temp_files(tmp_path, monkeypatch):
    small_folder(tmp_path / "encode" / "corpus")
    write_folder(tmp_path / "encode" / "queries", [("q1", {"tok1": 1.0})])
    base = [f"--exp.output_dir={tmp_path}", "--exp.name=e2e", "--index.engine=exact", "--search.latency_sample=0"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(engines.ExactEngine, "_stored", fail)  # after the engine wrote its files
        with pytest.raises(OSError, match="disk full"):
            index.main(base)
    assert list((tmp_path / "index").iterdir()) == []
    index.main(base)
    with monkeypatch.context() as patch:  # a failure while the run file is written
        patch.setattr(engines.ExactEngine, "search", lambda self, queries, *args: [[("p1", "NaN?")] for _ in queries])
        with pytest.raises(ValueError, match="Unknown format code 'f'"):
            search.main(base)
    assert list((tmp_path / "search").iterdir()) == []


KILLED = """
import contextlib, os, signal, sys
import index, search
from lsr_core import engines

build, atomic_open = engines.ExactEngine._build, search.atomic_open

def build_then_die(self, *args):
    build(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)

@contextlib.contextmanager
def write_then_die(path, *args, **kwargs):
    with atomic_open(path, *args, **kwargs) as f:
        yield f
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

engines.ExactEngine._build, search.atomic_open = build_then_die, write_then_die
getattr(sys.modules[sys.argv[1]], "main")(sys.argv[2:])
"""


def test_killed_index_and_search_leave_temp_files_the_next_run_removes(tmp_path):
    small_folder(tmp_path / "encode" / "corpus")
    write_folder(tmp_path / "encode" / "queries", [("q1", {"tok1": 1.0})])
    base = [f"--exp.output_dir={tmp_path}", "--exp.name=e2e", "--index.engine=exact", "--search.latency_sample=0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def killed(script, pattern):
        proc = subprocess.run([sys.executable, "-c", KILLED, script, *base], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        return list(tmp_path.glob(pattern))

    left = killed("index", f"index/.exact.tmp-{socket.gethostname()}-*")
    assert len(left) == 1 and (left[0] / "postings" / "indices.npy").is_file()
    assert not (tmp_path / "index" / "exact").exists()
    index.main(base)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["exact"]

    left = killed("search", f"search/.e2e.trec.{socket.gethostname()}-*.tmp")
    assert len(left) == 1 and left[0].read_text() == "q1 Q0 p1 1 1.000000 e2e\n"
    assert not (tmp_path / "search" / "e2e.trec").exists()
    search.main(base)
    assert sorted(p.name for p in (tmp_path / "search").iterdir()) == ["config.yaml", "e2e.meta.json", "e2e.trec"]
