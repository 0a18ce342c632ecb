"""Every reader turns a bad file into one InputError naming the file and the line: bytes that are not UTF-8, a
truncated gzip, a corrupt deflate stream, a TSV line with a tab in its text, bad ids, qrels with a missing field,
shard weights that are not finite numbers >= 0; and config floats must be finite."""
import gzip
import json
import re
import sys
import types

import pytest

from lsr_core.config import Config, ConfigError, load_config, validate
from lsr_core.metrics import read_run
from lsr_core.sparse import load_vectors, read_vectors, to_csr
from lsr_core.utils import InputError, check_id, load_texts, read_jsonl, read_qrels, run_script

# file name -> (two good lines, reader, what it reads from them); each test breaks the file in its own way
READERS = {
    "texts.tsv": (["q1\tone", "q2\ttwo"], load_texts, {"q1": "one", "q2": "two"}),
    "texts.jsonl": (['{"id": "q1", "text": "one"}', '{"id": "q2", "text": "two"}'], load_texts,
                    {"q1": "one", "q2": "two"}),
    "rows.jsonl": (['{"a": 1}', '{"a": 2}'], lambda path: list(read_jsonl(path)), [(1, {"a": 1}), (2, {"a": 2})]),
    "qrels.tsv": (["q1 0 d1 1", "q2 0 d2 1"], read_qrels, {"q1": {"d1": 1}, "q2": {"d2": 1}}),
    "run.trec": (["q1 Q0 d1 1 2.5 t", "q2 Q0 d2 1 1.5 t"], read_run, {"q1": {"d1": 2.5}, "q2": {"d2": 1.5}}),
    "shard.jsonl": (['{"id": "d1", "vector": {"a": 1.5}}', '{"id": "d2", "vector": {"b": 2}}'], load_vectors,
                    (["d1", "d2"], [{"a": 1.5}, {"b": 2}])),
}


def lines_bytes(lines) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


@pytest.mark.parametrize("name", READERS)
def test_every_reader_reads_its_good_lines_gzipped_or_not(tmp_path, name):
    lines, reader, expected = READERS[name]
    plain, packed = tmp_path / name, tmp_path / f"{name}.gz"
    plain.write_bytes(b"\xef\xbb\xbf" + lines_bytes(lines).replace(b"\n", b"\r\n"))  # BOM and CRLF, as on Windows
    packed.write_bytes(gzip.compress(lines_bytes(lines)))
    assert reader(plain) == reader(packed) == expected


@pytest.mark.parametrize("name", READERS)
@pytest.mark.parametrize("gz", [False, True])
def test_non_utf8_bytes_name_file_and_line(tmp_path, name, gz):
    lines, reader, _ = READERS[name]
    data = lines_bytes(lines)[:-1] + b" \xff\xfe\n"  # Latin-1 or UTF-16 bytes at the end of line 2
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(InputError, match=rf"^{path}:2: not UTF-8 text \(byte 0xff at offset {len(lines[1]) + 1} "
                                         r"of the line\)$"):
        reader(path)


@pytest.mark.parametrize("name", READERS)
def test_truncated_gzip_names_file_and_line_reached(tmp_path, name):
    lines, reader, _ = READERS[name]
    path = tmp_path / f"{name}.gz"
    path.write_bytes(gzip.compress(lines_bytes(lines))[:-12])  # the trailer and the end of the stream are gone
    with pytest.raises(InputError, match=rf"^{path}: truncated or corrupt gzip data (at the start|after line 1) "
                                         r"\(Compressed file ended before the end-of-stream marker was reached\)$"):
        reader(path)


@pytest.mark.parametrize("name", READERS)
def test_corrupt_deflate_stream_names_file_and_line_reached(tmp_path, name):
    lines, reader, _ = READERS[name]
    good = gzip.compress(lines_bytes(lines))
    # a second gzip member whose first deflate block has the reserved type 3: zlib.error once line 2 is read
    path = tmp_path / f"{name}.gz"
    path.write_bytes(good + good[:10] + b"\x07" + good[11:])
    with pytest.raises(InputError, match=rf"^{path}: truncated or corrupt gzip data after line 2 "
                                         r"\(Error -3 while decompressing data: invalid block type\)$"):
        reader(path)


def test_not_gzip_and_bad_crc_name_the_file(tmp_path):
    path = tmp_path / "texts.tsv.gz"
    path.write_bytes(b"q1\tone\n")
    with pytest.raises(InputError, match=rf"^{path}: truncated or corrupt gzip data at the start "
                                         r"\(Not a gzipped file \(b'q1'\)\)$"):
        load_texts(path)
    good = gzip.compress(b"q1\tone\nq2\ttwo\n")
    path.write_bytes(good[:-8] + b"\0\0\0\0" + good[-4:])
    with pytest.raises(InputError, match=rf"^{path}: truncated or corrupt gzip data after line 2 \(CRC check failed"):
        load_texts(path)


def test_tsv_line_with_a_tab_in_its_text_is_an_error(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text("q1\tone\nq2\ttwo\tthree\n")
    with pytest.raises(InputError, match=rf"^{path}:2: expected 2 tab-separated fields 'id<TAB>text', got 3 "
                                         r"\(a tab inside the text\?\)$"):
        load_texts(path)
    path.write_text("q1\tone\nq2\n")
    with pytest.raises(InputError, match=rf"^{path}:2: expected 2 tab-separated fields 'id<TAB>text', got 1$"):
        load_texts(path)
    # quotes are text, not quoting: a line is split on tabs only
    path.write_text('q1\t"say" "hi\n\nq2\t\n')
    assert load_texts(path, allow_empty=True) == {"q1": '"say" "hi', "q2": ""}


@pytest.mark.parametrize("content, message", [
    ("q1\tone\n\tno id\n", ":2: empty id$"),
    ("q1\tone\nq 2\ttwo\n", r":2: id 'q 2' contains whitespace \(TREC runs and qrels split on it\)$"),
    ('{"id": "q1", "text": "a"}\n{"id": "", "text": "b"}\n', ":2: empty id$"),
    ('{"id": "q1", "text": "a"}\n{"id": "q\\u00a02", "text": "b"}\n', r":2: id 'q\\xa02' contains whitespace"),
    ('{"id": 1.5, "text": "a"}\n', ":1: field 'id' must be a string, got float 1.5$"),
    ('{"id": null, "text": "a"}\n', ":1: field 'id' must be a string, got NoneType None$"),
    ('{"id": "q1", "text": 3}\n', ":1: field 'text' must be a string, got int$"),
    ('{"id": "q1", "title": ["t"], "text": "a"}\n', ":1: field 'title' must be a string, got list$"),
    ('{"id": "q1", "title": "t", "text": null}\n', ":1: field 'text' must be a string, got NoneType$"),
])
def test_bad_ids_and_fields_name_file_and_line(tmp_path, content, message):
    path = tmp_path / ("q.jsonl" if content.startswith("{") else "q.tsv")
    path.write_text(content)
    with pytest.raises(InputError, match=f"^{path}{message}"):
        load_texts(path)


def test_integer_ids_are_text_and_check_id_names_rows():
    assert check_id("f.jsonl", 1, 7) == "7" and check_id("f.jsonl", 1, "d-7") == "d-7"
    with pytest.raises(InputError, match=r"^t.parquet: row 4: field 'id' must be a string, got bool True$"):
        check_id("t.parquet", 4, True, row=True)


def test_qrels_columns_are_fixed_by_the_first_line(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("q1 0 d1 1\nq1 0 2\n")  # line 2 lost its docid: not read as docid '0', grade 2
    with pytest.raises(InputError, match=rf"^{path}:2: expected 4 fields like line 1 \(qid iter docid rel\), got 3$"):
        read_qrels(path)
    path.write_text("\nq1 d1 1\nq1 0 d2 1\n")
    with pytest.raises(InputError, match=rf"^{path}:3: expected 3 fields like line 2 \(qid docid rel\), got 4$"):
        read_qrels(path)
    path.write_text("q1 0 d1\n")  # a 4-column line without its grade
    with pytest.raises(InputError, match=rf"^{path}:1: field 'rel' must be an integer, got 'd1'$"):
        read_qrels(path)
    path.write_text("q1 d1\n")
    with pytest.raises(InputError, match=rf"^{path}:1: expected 4 fields 'qid iter docid rel' \(or 3: 'qid docid "
                                         r"rel'\), got 2$"):
        read_qrels(path)
    path.write_text("q1 d1 2\nq1 d2 0\nq2 d1 -1\n")
    assert read_qrels(path) == {"q1": {"d1": 2, "d2": 0}, "q2": {"d1": -1}}


def test_qrels_judgment_repeated_with_another_grade_is_an_error(tmp_path):
    path = tmp_path / "qrels.tsv"
    path.write_text("q1 0 d1 1\nq1 0 d2 0\nq1 0 d1 1\n")
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}}  # the same judgment twice says nothing new
    path.write_text("q1 0 d1 1\nq1 0 d1 2\n")
    with pytest.raises(InputError, match=rf"^{path}:2: docid 'd1' of qid 'q1' judged again with a different grade "
                                         r"\(1 then 2\)$"):
        read_qrels(path)


def test_jsonl_lines_read_as_json_reads_them(tmp_path):
    """read_jsonl parses with orjson, and with json what orjson refuses: the objects (float digits, key order, a
    repeated key, NaN, Infinity, 1e400, a lone surrogate) and the error messages are json's."""
    lines = ['{"a": 0.1, "b": 5e-05, "c": -0.0, "d": 1e16, "\u00e9\\"": "x\u2028y", "a": 2, "i": -9223372036854775808}',
             '{"w": NaN, "x": Infinity, "y": -Infinity, "z": 1e400, "s": "\\ud800"}', "{}"]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(lines_bytes(lines))
    got = list(read_jsonl(path))
    assert json.dumps(got) == json.dumps([(i, json.loads(line)) for i, line in enumerate(lines, 1)])
    assert got[0][1]["b"] == 5e-05 and list(got[0][1]) == ["a", "b", "c", "d", 'é"', "i"] and got[0][1]["a"] == 2
    for bad in ['{"a": 1,}', '{"a": 01}', '\ufeff{"a": 1}', '{"a": tru}', '{"a": "\\x"}']:
        path.write_bytes(lines_bytes(["{}", bad]))
        with pytest.raises(json.JSONDecodeError) as expected:
            json.loads(bad)
        with pytest.raises(InputError) as err:
            list(read_jsonl(path))
        assert str(err.value) == f"{path}:2: invalid JSON ({expected.value.msg})"


WEIGHT_RULE = r"\(weights must be finite numbers >= 0, at most float32's 3.4e\+38\)$"


@pytest.mark.parametrize("weight", ["NaN", "Infinity", "-Infinity", "-0.5", "-1", '"1.5"', "true", "false",
                                    "null", "[1]", "{}", "1e39"])
def test_shard_weight_that_is_not_a_finite_number_names_file_line_and_token(tmp_path, weight):
    path = tmp_path / "part-00000.jsonl.gz"
    path.write_bytes(gzip.compress(lines_bytes(['{"id": "d1", "vector": {"a": 1.5, "b": 0}}',
                                                f'{{"id": "d2", "vector": {{"a": 2, "x\\"y": {weight}}}}}'])))
    shown = "1e+39" if weight == "1e39" else weight
    with pytest.raises(InputError, match=rf"^{path}:2: token 'x\"y' has weight {re.escape(shown)} {WEIGHT_RULE}"):
        load_vectors(tmp_path)
    with pytest.raises(InputError, match=rf"^{path}:2: token"):
        list(read_vectors(path))


def test_shard_ids_are_checked_and_duplicates_named_by_line(tmp_path):
    path = tmp_path / "part-00000.jsonl.gz"
    for line, message in [('{"id": "d 2", "vector": {}}', r":2: id 'd 2' contains whitespace"),
                          ('{"id": "", "vector": {}}', ":2: empty id"),
                          ('{"id": null, "vector": {}}', ":2: field 'id' must be a string, got NoneType None"),
                          ('{"id": "d1", "vector": {}}', ":2: duplicate id 'd1'"),
                          ('{"id": "d2", "vector": [1]}', r":2: expected \{'id': ..., 'vector': \{token: weight\}\}")]:
        path.write_bytes(gzip.compress(lines_bytes(['{"id": "d1", "vector": {"a": 1}}', line])))
        with pytest.raises(InputError, match=f"^{path}{message}"):
            load_vectors(tmp_path)
    path.write_bytes(gzip.compress(lines_bytes(['{"id": 7, "vector": {"a": 3, "b": 0.25}}', '{"id": "d8", '
                                                '"vector": {}}'])))
    assert load_vectors(tmp_path) == (["7", "d8"], [{"a": 3, "b": 0.25}, {}])


def test_to_csr_rejects_weights_not_read_from_a_file():
    with pytest.raises(InputError, match=r"^vector 1: token 'b' has weight nan in float32"):
        to_csr([{"a": 1.0}, {"a": 0.5, "b": float("nan")}])
    with pytest.raises(InputError, match=r"^vector 0: token 'a' has weight -2.0 in float32"):
        to_csr([{"a": -2}])
    with pytest.raises(InputError, match=r"^vector 0: token 'a' has weight inf in float32"):
        to_csr([{"a": 1e39}])  # finite in float64, inf once stored as float32


@pytest.mark.parametrize("yaml_value, cli_value, cli_shown", [
    (".nan", "nan", "'nan'"), (".inf", "inf", "'inf'"), ("-.inf", "-inf", "'-inf'"), ("1e999", ".NaN", "nan"),
    ("1" + "0" * 400, "-.inf", "-inf")], ids=["nan", "inf", "-inf", "1e999", "10**400"])
def test_config_float_that_is_not_finite_names_key_and_source(tmp_path, yaml_value, cli_value, cli_shown):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: 1.0e-4\n  temperature: {yaml_value}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: 'train.temperature' must be a finite number, got "):
        load_config(["--cfg", str(path)])
    with pytest.raises(ConfigError, match=rf"^command line: 'search.seismic_heap_factor' must be a finite number, "
                                          rf"got {re.escape(cli_shown)}$"):
        load_config([f"--search.seismic_heap_factor={cli_value}"])


def test_config_built_in_code_is_checked_for_non_finite_floats():
    cfg = Config()
    cfg.eval.alpha = float("nan")
    with pytest.raises(ConfigError, match=r"^'eval.alpha' must be a finite number, got nan$"):
        validate(cfg)


def test_invalid_yaml_is_one_line_naming_file_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError) as err:
        load_config(["--cfg", str(path)])
    assert str(err.value) == f"{path}:3:1: invalid YAML (expected ',' or ']', but got '<stream end>')"


def fake_module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)


class FakeTable(list):
    column_names = ["id", "text"]

    def select(self, positions):  # a HF Dataset's rows by position
        return FakeTable(self[i] for i in positions)


@pytest.mark.parametrize("rows, message", [
    ([{"id": "d1", "text": "a"}, {"id": "d 2", "text": "b"}], r"t.parquet: row 2: id 'd 2' contains whitespace"),
    ([{"id": "d1", "text": "a"}, {"id": None, "text": "b"}], "t.parquet: row 2: field 'id' must be a string"),
    ([{"id": "", "text": "a"}], "t.parquet: row 1: empty id"),
    ([{"id": "d1", "text": 5}], "t.parquet: row 1: field 'text' must be a string, got int"),
    ([{"id": "d1", "text": "a"}, {"id": "d1", "text": "b"}], "t.parquet: row 2: duplicate id 'd1'"),
])
def test_encode_input_rows_from_a_table_are_checked_like_lines(monkeypatch, rows, message):
    from lsr_core.inputs import read_input

    fake_module(monkeypatch, "datasets", load_dataset=lambda kind, data_files, split: FakeTable(rows))
    with pytest.raises(InputError, match=f"^{message}"):
        read_input("t.parquet", "doc")


def test_encode_input_from_ir_datasets_is_checked_and_read(monkeypatch):
    from lsr_core.inputs import read_input

    queries = [types.SimpleNamespace(query_id="1", text="a"), types.SimpleNamespace(query_id="2\t", text="b")]
    fake_module(monkeypatch, "ir_datasets", load=lambda name: types.SimpleNamespace(queries_iter=lambda: queries))
    with pytest.raises(InputError, match=r"^irds:x/y: row 2: id '2\\t' contains whitespace"):
        read_input("irds:x/y", "query")
    queries[1].query_id = "2"
    assert read_input("irds:x/y", "query") == (["1", "2"], ["a", "b"])
    fake_module(monkeypatch, "datasets", load_dataset=lambda kind, data_files, split: FakeTable(
        [{"id": 10, "text": "x"}, {"id": "d2", "text": None}]))
    assert read_input("t.csv", "doc") == (["10", "d2"], ["x", ""])  # integer ids as text; a null document is empty


def test_run_script_prints_one_line_and_exits_1(capsys):
    def bad_input():
        raise InputError("f.tsv:3: first line\nsecond line")

    with pytest.raises(SystemExit) as exit_info:
        run_script(bad_input)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: f.tsv:3: first line | second line\n"

    def bug():
        raise KeyError("k")

    with pytest.raises(KeyError):  # not bad input: a bug keeps its traceback
        run_script(bug)


def test_run_script_knows_model_load_errors_once_modeling_is_loaded(capsys):
    from lsr_core.backbones import ModelLoadError

    def bad_model():
        raise ModelLoadError("no such model")

    with pytest.raises(SystemExit):
        run_script(bad_model)
    assert capsys.readouterr().err == "error: no such model\n"


def test_json_meta_errors_name_the_file(tmp_path):
    from evaluate import find_flops

    run = tmp_path / "a.trec"
    meta = tmp_path / "a.trec.meta.json"
    meta.write_text('{"flops": NaN}')
    with pytest.raises(InputError, match=rf"^{meta}: field 'flops' must be a finite number, got NaN$"):
        find_flops(str(run))
    meta.write_text('{"flops": 1.5,\n}')
    with pytest.raises(InputError, match=rf"^{meta}:2: invalid JSON \(Expecting property name"):
        find_flops(str(run))
    meta.write_text(json.dumps({"flops": 2}))
    assert find_flops(str(run)) == 2.0
