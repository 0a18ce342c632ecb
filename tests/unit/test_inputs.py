"""lsr_core.inputs.InputTexts: any range of rows reads what reading the whole file gives (JSONL with a byte-order
mark, blank lines and titles; TSV; gzip), duplicates are found though only id hashes are kept, and reading keeps
about one shard in memory, not the file."""
import gzip
import json
import os
import tracemalloc

import pytest

import lsr_core.inputs as inputs
from lsr_core.utils import InputError, TextLines, read_texts


def write(path, lines: list[str], bom: bool = False):
    data = ("\ufeff" if bom else "") + "".join(line + "\n" for line in lines)
    path.write_bytes(gzip.compress(data.encode()) if path.suffix == ".gz" else data.encode())
    return path


ROWS = [(f"d{i}", f"text {i} é" * (i % 4)) for i in range(20)]  # some empty, some with non-ASCII bytes


@pytest.mark.parametrize("name, lines, bom", [
    ("c.jsonl", [json.dumps({"id": r, "text": t, **({"title": "T"} if i % 5 else {})}, ensure_ascii=False) +
                 ("\n  " if i % 3 else "") for i, (r, t) in enumerate(ROWS)], True),
    ("c.tsv", [f"{r}\t{t}" + ("\n" if i % 4 else "") for i, (r, t) in enumerate(ROWS)], False),
    ("c.jsonl.gz", [json.dumps({"id": r, "text": t}) for r, t in ROWS], True),
])
def test_every_range_reads_what_the_whole_file_gives(tmp_path, monkeypatch, name, lines, bom):
    monkeypatch.setattr(inputs, "CHECKPOINT", 3)
    path = write(tmp_path / name, lines, bom)
    whole = list(read_texts(path, allow_empty=True))
    assert [rid for rid, _ in whole] == [r for r, _ in ROWS]
    source = inputs.InputTexts(str(path), "doc")
    assert len(source) == 20 and list(source) == [r for r, _ in ROWS]
    raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    marks, offset, rows = [(0, 0)], 0, 0  # (bytes, lines) before every third row
    for lineno, line in enumerate(raw.splitlines(keepends=True), 1):
        offset += len(line)
        rows += bool(line.strip())
        if line.strip() and rows % 3 == 0:
            marks.append((offset, lineno))
    assert source.marks == marks and len(marks) == 7
    for lo in range(20):
        for hi in range(lo + 1, 21):
            assert source.read(lo, hi) == tuple(map(list, zip(*whole[lo:hi]))), (lo, hi)


def test_consecutive_ranges_read_on_without_reopening(tmp_path, monkeypatch):
    """One process's shards follow each other: a .gz file is opened (and decompressed from its start) once for them,
    again only for a range that does not start where the last one stopped, or once the file changed."""
    monkeypatch.setattr(inputs, "CHECKPOINT", 3)
    path = write(tmp_path / "c.jsonl.gz", [json.dumps({"id": r, "text": t}) for r, t in ROWS])
    source, opened = inputs.InputTexts(str(path), "doc"), []
    monkeypatch.setattr(inputs, "TextLines", lambda *args: opened.append(args[1]) or TextLines(*args))
    whole = [r for r, _ in ROWS]
    assert [source.read(lo, min(lo + 7, 20))[0] for lo in range(0, 20, 7)] == [whole[:7], whole[7:14], whole[14:]]
    assert opened == [(0, 0)]
    assert source.read(3, 5)[0] == whole[3:5] and source.read(5, 10)[0] == whole[5:10]
    assert opened == [(0, 0), source.marks[1]]  # from the mark before row 3, then on
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # the same bytes, touched
    with pytest.raises(InputError, match=rf"^{path}: changed since encoding began"):
        source.read(10, 12)


def test_duplicates_are_found_whatever_the_hashes(tmp_path, monkeypatch):
    """One hash for every id: each is looked up again by id, and only a true repeat is an error."""
    path = write(tmp_path / "c.tsv", ["a\tx", "b\ty", "c\tz"])
    monkeypatch.setattr(inputs, "hash", lambda rid: 7, raising=False)
    assert inputs.read_input(str(path), "doc") == (["a", "b", "c"], ["x", "y", "z"])
    write(path, ["a\tx", "b\ty", "c\tz", "b\tw"])
    with pytest.raises(InputError, match=rf"^{path}: duplicate id 'b'$"):
        inputs.InputTexts(str(path), "doc")
    monkeypatch.undo()
    with pytest.raises(InputError, match=rf"^{path}: duplicate id 'b'$"):
        inputs.InputTexts(str(path), "doc")


def test_reading_keeps_about_one_shard_in_memory(tmp_path):
    """100k documents (~6 MB): the first pass keeps 8 bytes a row and an offset every CHECKPOINT rows; a shard of
    10k rows costs about its texts. (Reading them all at once, `read_input`, costs ~7x the file.)"""
    n = 100_000
    path = write(tmp_path / "c.tsv", [f"{i}\t" + " ".join(f"w{i * k % 1009}" for k in range(1, 11)) for i in range(n)])
    tracemalloc.start()
    try:
        source = inputs.InputTexts(str(path), "doc")
        scan_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        ids, texts = source.read(50_000, 60_000)
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    shard_bytes = sum(len(t) + 49 + len(i) + 49 for i, t in zip(ids, texts))  # str objects as CPython sizes them
    assert ids[0] == "50000" and len(ids) == 10_000 and texts[0] == source.read(50_000, 50_001)[1][0]
    assert scan_peak < n * 8 * 1.5 + 2**18 and scan_peak < path.stat().st_size / 5, scan_peak
    assert read_peak < 2 * shard_bytes + 2**18, (read_peak, shard_bytes)
