"""encode.py reads its input a shard at a time (lsr_core.inputs.InputTexts): the shards, meta.json and document
frequencies are byte for byte those of a run with every text in memory (the reading encode.py did before), for
plain and gzip files, TSV, tables and ir_datasets; a run cut short resumes, redoing only the missing shards."""
import gzip
import json
import types

import pytest

import encode
import lsr_core.inputs as inputs
from lsr_core.sparse import DOC_FREQS, doc_freqs, load_vectors, nnz_stats, read_doc_freqs, read_meta
from lsr_core.tiny import make_collection, make_model
from lsr_core.utils import InputError, read_texts
from tests.unit.test_readers import FakeTable, fake_module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    col = make_collection(root / "data")
    corpus = root / "data" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    # blank lines and a byte-order mark: rows are not lines, and offsets count bytes
    (root / "corpus.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\n\n")
    (root / "corpus.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    rows = [json.loads(line) for line in lines]
    (root / "corpus.tsv").write_text("".join(f"{r['id']}\t{r['text']}\n" for r in rows))
    return {"root": root, "rows": rows, "model": make_model(root / "bert", "bert", col["words"])}


class InMemory:
    """What encode.py read before: every (id, text) of the input in two lists, shards sliced from them."""

    def __init__(self, path, kind):
        import ir_datasets

        self.ids, self.texts = [], []
        for rid, text in (read_texts(path, allow_empty=kind == "doc") if not path.startswith("irds:") else
                          ((d.doc_id, inputs.irds_doc_text(d)) for d in ir_datasets.load(path[5:]).docs_iter())):
            self.ids.append(rid)
            self.texts.append(text)

    def __len__(self):
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)

    def read(self, lo, hi):
        return self.ids[lo:hi], self.texts[lo:hi]


def folder_bytes(folder):
    """Every file encode.py writes, by name: the shards' bytes, doc_freqs.json.gz's text (its gzip header holds the
    time), meta.json without its timing and the input's name."""
    files = {p.name: p.read_bytes() for p in folder.glob("part-*.jsonl.gz")}
    files[DOC_FREQS] = gzip.decompress((folder / DOC_FREQS).read_bytes()) if (folder / DOC_FREQS).is_file() else None
    meta = read_meta(folder)
    del meta["seconds_last_run"], meta["input"]
    return files, meta


def run(tiny, source, dest, *extra):
    return encode.main([f"--model.name_or_path={tiny['model']}", f"--encode.input={source}",
                        f"--exp.output_dir={tiny['root']}", f"--encode.output={dest}", "--encode.shard_size=7",
                        "--model.dtype=float32", *extra])


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.jsonl.gz", "corpus.tsv"])
def test_shards_read_lazily_equal_shards_read_in_memory(tiny, tmp_path, monkeypatch, name):
    monkeypatch.setattr(inputs, "CHECKPOINT", 4)  # shards of 7 start between marks: rows are skipped to reach them
    run(tiny, tiny["root"] / name, tmp_path / "lazy")
    with monkeypatch.context() as patched:
        patched.setattr(encode, "InputTexts", InMemory)
        run(tiny, tiny["root"] / name, tmp_path / "memory")
    lazy, memory = folder_bytes(tmp_path / "lazy"), folder_bytes(tmp_path / "memory")
    assert len(lazy[0]) == 8 and lazy == memory  # 7 shards of 48 documents and doc_freqs.json.gz
    ids, vectors = load_vectors(tmp_path / "lazy")
    assert ids == [r["id"] for r in tiny["rows"]]
    # meta.json's counts, read one vector at a time, are those of every vector in memory
    assert {k: lazy[1][k] for k in ("count", "empty", "nnz_mean", "nnz_p99")} == nnz_stats([len(v) for v in vectors])
    assert read_doc_freqs(tmp_path / "lazy" / DOC_FREQS) == doc_freqs(vectors)


def test_a_run_cut_short_resumes_with_the_same_shards(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "CHECKPOINT", 4)
    source, dest = tiny["root"] / "corpus.jsonl.gz", tmp_path / "resume"
    run(tiny, source, dest)
    whole = folder_bytes(dest)
    for name in ("part-00002.jsonl.gz", "part-00006.jsonl.gz", "meta.json"):  # as a kill leaves it
        (dest / name).unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in dest.glob("part-*.jsonl.gz")}
    read, real_read = [], inputs.InputTexts.read
    monkeypatch.setattr(inputs.InputTexts, "read", lambda self, lo, hi: read.append((lo, hi)) or
                        real_read(self, lo, hi))
    run(tiny, source, dest)
    assert read == [(14, 21), (42, 48)]  # only the missing shards' rows are read
    assert {name: (dest / name).stat().st_mtime_ns for name in kept} == kept
    assert folder_bytes(dest) == whole


def test_shards_that_do_not_hold_the_input_in_its_order_are_refused(tiny, tmp_path):
    """meta.json is written once the shards, read one line at a time, hold the input's ids in its order."""
    source, dest = tiny["root"] / "corpus.tsv", tmp_path / "mixed"
    run(tiny, source, dest)
    first, second = (dest / "part-00000.jsonl.gz").read_bytes(), (dest / "part-00001.jsonl.gz").read_bytes()
    for part0, part1, what in [(second, first, "0 ids missing, 0 repeated, 48 written, out of input order"),
                               (first, first, "7 ids missing, 7 repeated, 48 written")]:
        (dest / "part-00000.jsonl.gz").write_bytes(part0)
        (dest / "part-00001.jsonl.gz").write_bytes(part1)
        (dest / "meta.json").unlink(missing_ok=True)
        with pytest.raises(InputError, match=rf"^{dest}: shards do not match the input \({what}\); "):
            run(tiny, source, dest)
        assert not (dest / "meta.json").exists()


def test_queries_and_irds_documents_read_lazily_equal_in_memory(tiny, tmp_path, monkeypatch):
    """ir_datasets documents: sliced where docs_iter() can be (a list here), else streamed and skipped."""
    docs = [types.SimpleNamespace(doc_id=r["id"], text=r["text"]) for r in tiny["rows"]]
    for sliceable in (True, False):
        fake_module(monkeypatch, "ir_datasets", load=lambda name: types.SimpleNamespace(
            docs_iter=lambda: list(docs) if sliceable else iter(docs)))
        run(tiny, "irds:fake/docs", tmp_path / f"lazy{sliceable}")
    monkeypatch.setattr(encode, "InputTexts", InMemory)
    run(tiny, "irds:fake/docs", tmp_path / "memory")
    assert folder_bytes(tmp_path / "lazyTrue") == folder_bytes(tmp_path / "lazyFalse") == \
        folder_bytes(tmp_path / "memory")


def test_a_table_is_read_a_shard_at_a_time(tiny, tmp_path, monkeypatch):
    table = FakeTable({"id": r["id"], "text": r["text"]} for r in tiny["rows"])
    selected = []
    real_select = FakeTable.select
    monkeypatch.setattr(FakeTable, "select", lambda self, pos: selected.append((pos.start, pos.stop)) or
                        real_select(self, pos))
    fake_module(monkeypatch, "datasets", load_dataset=lambda kind, data_files, split: table)
    run(tiny, str(tmp_path / "t.parquet"), tmp_path / "lazy")
    assert selected == [(s, min(s + 7, 48)) for s in range(0, 48, 7)]
    run(tiny, str(tiny["root"] / "corpus.tsv"), tmp_path / "memory")
    assert folder_bytes(tmp_path / "lazy") == folder_bytes(tmp_path / "memory")


def test_an_input_changed_while_encoding_is_refused(tiny, tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("a\tone\nb\ttwo\n")
    source = inputs.InputTexts(str(path), "doc")
    assert source.read(1, 2) == (["b"], ["two"])
    path.write_text("a\tone\nb\ttwo!\n")
    with pytest.raises(InputError, match=rf"^{path}: changed since encoding began"):
        source.read(0, 2)
