"""encode.py's guards: writer processes on a real (30,522-token) vocabulary finish and die with their parent; a
rerun over shards made with other settings is refused (or overwrites when asked); the model used is the one asked
for and is named; texts cut at the max length are counted; non-finite weights are refused by text id."""
import gzip
import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

import encode
from lsr_core.config import ConfigError, ModelConfig, save_config, load_config
from lsr_core.backbones import load_tokenizer
from lsr_core.modeling import build_model
from lsr_core.outputs import counts_path
from lsr_core.sparse import id_to_token_list, load_vectors, read_meta, vocab_hash
from lsr_core.utils import InputError
from lsr_core.tiny import make_collection, make_model
from tests.unit.test_modeling import splade_tiny_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("guards")
    col = make_collection(root / "data")
    return {"root": root, "data": root / "data", "words": col["words"], "corpus": col["corpus"],
            "bert": make_model(root / "bert", "bert", col["words"]),
            "bert2": make_model(root / "bert2", "bert", col["words"], seed=1)}


def lines(folder: Path) -> list[str]:
    return [line for shard in sorted(folder.glob("part-*.jsonl.gz")) for line in gzip.open(shard, "rt")]


# ------------------------------------------------------------------------------------------ writers (point 2)

def test_writers_with_the_splade_tiny_vocabulary_write_the_lines_of_the_main_process(tiny, tmp_path):
    """A writer used to take the vocabulary (~290 KB pickled) only with its first batch, and no batch was sent before
    that pipe write returned: encode.py hung. Here a writer on SPLADE-tiny's vocabulary finishes (in a thread, so
    that a hang fails the test) and writes the lines this process writes alone."""
    model = splade_tiny_folder()
    common = [f"--model.name_or_path={model}", f"--encode.input={tiny['data'] / 'corpus.jsonl'}",
              f"--exp.output_dir={tmp_path}", "--encode.shard_size=20", "--encode.topk=20"]
    done = []
    run = threading.Thread(target=lambda: done.append(encode.main(
        common + [f"--encode.output={tmp_path / 'writers'}", "--encode.num_writers=1"])), daemon=True)
    run.start()
    run.join(timeout=240)
    assert done == [tmp_path / "writers"], "encode.py with a writer process did not finish"
    encode.main(common + [f"--encode.output={tmp_path / 'alone'}"])
    assert lines(tmp_path / "writers") == lines(tmp_path / "alone") and len(lines(tmp_path / "alone")) == 48
    vocab = id_to_token_list(load_tokenizer(str(model)))
    assert len(vocab) == 30522
    meta = read_meta(tmp_path / "writers")
    assert meta["vocab_hash"] == hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:16] == vocab_hash(vocab)
    assert meta["model"] == str(model.resolve()) and meta["vocab_size"] == 30522


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # reparented to an init that does not reap: dead all the same
    except psutil.NoSuchProcess:
        return True


def test_a_killed_encode_leaves_no_writer_process(tiny, tmp_path):
    """SIGKILL (like an unhandled SIGTERM) gives encode.py no chance to stop its writers: they exit by themselves.
    SPLADE-tiny: the run is killed once the writers have its vocabulary."""
    corpus = tmp_path / "corpus.jsonl"
    with open(corpus, "w") as f:  # long enough to be still encoding when killed
        for i in range(100):
            for doc in tiny["corpus"]:
                f.write(json.dumps({"id": f"{doc['id']}-{i}", "text": doc["text"]}) + "\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "encode.py"), f"--model.name_or_path={splade_tiny_folder()}",
                             f"--encode.input={corpus}", f"--exp.output_dir={tmp_path}", "--encode.num_writers=2",
                             "--encode.batch_size=4"], env=env, text=True, stderr=subprocess.PIPE)
    children = []
    try:
        for line in proc.stderr:  # the model is loaded and the writers were given the vocabulary
            if "encoding 4800 documents" in line:
                break
        children = psutil.Process(proc.pid).children(recursive=True)
        writers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        assert len(writers) == 2
        time.sleep(1)
        assert proc.poll() is None, "encode.py finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 60  # a writer still importing torch notices once it is up
        while time.time() < deadline and not all(_gone(c) for c in children):
            time.sleep(0.2)
        left = [c.pid for c in children if not _gone(c)]
        assert not left, f"processes of the killed encode.py still running: {left}"
    finally:
        proc.kill()
        for child in children:  # never leave them to the next test
            if not _gone(child):
                child.kill()


# ------------------------------------------------------------------------------------------ provenance (point 3)

def test_a_rerun_with_other_settings_is_refused_or_overwrites(tiny, tmp_path):
    dest = tmp_path / "docs"
    base = [f"--model.name_or_path={tiny['bert']}", f"--encode.input={tiny['data'] / 'corpus.jsonl'}",
            f"--exp.output_dir={tmp_path}", f"--encode.output={dest}", "--encode.shard_size=20"]
    encode.main(base)
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    settings = json.loads((dest / ".encode" / "settings.json").read_text())
    assert settings["max_length"] == 256 and settings["topk"] == 0 and settings["model"] == str(tiny["bert"])
    refusals = [(["--encode.topk=5"], "topk 0 -> 5"),
                (["--encode.quant_scale=100"], "scale 0.0 -> 100.0"),
                (["--encode.max_length=8"], "max_length 256 -> 8"),
                ([f"--model.name_or_path={tiny['bert2']}"], f"model '{tiny['bert']}' -> '{tiny['bert2']}'"),
                (["--model.pooling=sum"], "spec.pooling 'max' -> 'sum'"),
                (["--encode.shard_size=10"], "shard_size 20 -> 10")]
    for extra, change in refusals:
        with pytest.raises(InputError) as err:
            encode.main(base + extra)
        message = str(err.value)
        assert message.startswith(f"{dest}: holds 3 shard(s) encoded with other settings (") and "\n" not in message
        assert change in message and message.endswith(
            "set encode.overwrite=true to replace them, or choose another encode.output"), message
    after = {p.name: p.read_bytes() for p in dest.iterdir() if p.is_file()}
    assert after == before  # neither shards nor meta.json were touched

    encode.main(base + ["--encode.topk=5", "--encode.overwrite=true", "--encode.shard_size=10"])
    ids, vectors = load_vectors(dest)
    assert len(ids) == 48 and all(len(v) <= 5 for v in vectors) and len(list(dest.glob("part-*"))) == 5
    meta = read_meta(dest)
    assert meta["topk"] == 5 and meta["shards"] == 5 and meta["count"] == 48

    # a torn record of the settings: one line naming it
    (dest / ".encode" / "settings.json").write_text('{"model": ')
    with pytest.raises(InputError, match=r"docs/.encode/settings.json:1: invalid JSON \(Expecting value\); set "
                                         r"encode.overwrite=true"):
        encode.main(base + ["--encode.topk=5", "--encode.shard_size=10"])
    # shards without a record of their settings (zeroshot_prompt.py, an older encode.py): refused as well
    (dest / ".encode" / "settings.json").unlink()
    with pytest.raises(InputError, match=r"docs: holds 5 shard\(s\) but no .encode/settings.json saying how they "
                                         r"were made .*: set encode.overwrite=true"):
        encode.main(base + ["--encode.topk=5", "--encode.shard_size=10"])


# ------------------------------------------------------------------------------------------ model used (point 9)

@pytest.fixture(scope="module")
def trained_dir(tiny):
    """An exp.output_dir as train.py leaves it: final/ (here: tiny BERT 2 saved as a SparseModel) and config.yaml
    naming the model it was trained from (tiny BERT 1)."""
    out = tiny["root"] / "run"
    build_model(ModelConfig(name_or_path=str(tiny["bert2"]))).save(out / "final")
    save_config(load_config([f"--model.name_or_path={tiny['bert']}", f"--exp.output_dir={out}"]), out)
    return out


@pytest.mark.parametrize("case", ["default", "same_base_on_cli", "other_on_cli", "other_in_yaml"])
def test_the_model_used_is_the_one_asked_for_and_is_named(tiny, trained_dir, tmp_path, caplog, capsys, case):
    final, base, other = trained_dir / "final", tiny["bert"], tiny["bert2"]
    argv = [f"--exp.output_dir={trained_dir}", f"--encode.input={tiny['data'] / 'queries.jsonl'}",
            "--encode.kind=query", f"--encode.output={tmp_path / 'q'}"]
    if case == "same_base_on_cli":  # the scripts pass train.py's arguments on: final/ is the model meant
        argv.append(f"--model.name_or_path={base}")
    elif case == "other_on_cli":
        argv.append(f"--model.name_or_path={other}")
    elif case == "other_in_yaml":
        (tmp_path / "other.yaml").write_text(f"model:\n  name_or_path: {other}\n")
        argv = ["--cfg", str(tmp_path / "other.yaml")] + argv
    with caplog.at_level(logging.INFO, logger="encode"):
        encode.main(argv)
    used = other if case == "other_on_cli" else final
    meta = read_meta(tmp_path / "q")
    assert meta["model"] == str(used)
    assert f" with {used} into {tmp_path / 'q'}:" in capsys.readouterr().out
    said = [(re.sub(r"^\[RANK \d+\] ", "", r.getMessage()), r.levelno) for r in caplog.records]
    said = [(message, level) for message, level in said if message.startswith("model: ")]
    assert len(said) == 1
    message, level = said[0]
    if case in ("default", "same_base_on_cli"):
        assert message == f"model: {final} (train.py's model in exp.output_dir, trained from {base})"
        assert level == logging.INFO
    elif case == "other_on_cli":
        assert message == (f"model: {other} (model.name_or_path, given on the command line; {final} (trained from "
                           f"{base}) is not used)") and level == logging.WARNING
    else:
        assert message == (f"model: {final} (train.py's model in exp.output_dir (trained from {base}), not "
                           f"model.name_or_path='{other}': set encode.model to encode with another model)")
        assert level == logging.WARNING


def test_encode_model_and_another_model_on_the_command_line_conflict(tiny, tmp_path):
    with pytest.raises(ConfigError, match=rf"encode.model='{tiny['bert']}' and model.name_or_path='{tiny['bert2']}' "
                                          r"\(command line\) name different models: give only one"):
        encode.main([f"--encode.model={tiny['bert']}", f"--model.name_or_path={tiny['bert2']}",
                     f"--encode.input={tiny['data'] / 'queries.jsonl'}", f"--exp.output_dir={tmp_path}"])


# ------------------------------------------------------------------------------------------ truncation (point 9)

@pytest.mark.parametrize("arch,extra", [("bert", []), ("bert", ["--model.packed=true", "--encode.num_workers=2"]),
                                        ("llama", ["--model.echo=true"])])
def test_texts_cut_at_the_max_length_are_counted(tiny, tmp_path, caplog, capsys, arch, extra):
    """Word-level tokenizers: a text is 1 token a word plus [CLS] [SEP] (BERT) or <s> (Llama); cut when that is
    more than encode.max_length. Counted (padded, packed in tokenizer workers, echoed) in meta.json, the summary line
    and a warning, across a resume too."""
    model = tiny["bert"] if arch == "bert" else make_model(tmp_path / "llama", "llama", tiny["words"])
    specials = 2 if arch == "bert" else 1
    words = tiny["words"][5:]
    texts = {f"d{n}": " ".join(words[:n]) for n in range(1, 25)}
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": rid, "text": text}) + "\n" for rid, text in texts.items()))
    expected = sum(len(t.split()) + specials > 12 for t in texts.values())
    assert expected == 24 - (12 - specials)
    dest = tmp_path / "out"
    argv = [f"--model.name_or_path={model}", f"--encode.input={corpus}", f"--exp.output_dir={tmp_path}",
            f"--encode.output={dest}", "--encode.max_length=12", "--encode.batch_size=5", "--encode.shard_size=10",
            *extra]
    with caplog.at_level(logging.WARNING, logger="encode"):
        encode.main(argv)
    meta = read_meta(dest)
    assert meta["truncated"] == expected and meta["max_length"] == 12
    assert f", truncated {expected} (max 12 tokens)" in capsys.readouterr().out
    assert f"{expected} of 24 texts are longer than 12 tokens and were cut there" in caplog.text
    (dest / "part-00002.jsonl.gz").unlink()  # a resumed run still counts the shards it skips
    (dest / "meta.json").unlink()
    encode.main(argv)
    assert read_meta(dest)["truncated"] == expected
    assert "(4 this run" in capsys.readouterr().out
    if extra:
        return
    # a shard's counts: torn -> an error naming the file; missing (an older encode.py) -> not counted, said so
    counts = counts_path(dest, 1)
    counts.write_text('{"texts": 10, "trunc')
    (dest / "meta.json").unlink()
    with pytest.raises(InputError, match=rf"{counts}:1: invalid JSON .*; remove the shard and its counts file"):
        encode.main(argv)
    counts.unlink()
    with caplog.at_level(logging.WARNING, logger="lsr_core.outputs"):
        encode.main(argv)
    assert read_meta(dest)["truncated"] is None and f"{counts} is missing: truncated not counted" in caplog.text


def test_queries_within_the_max_length_count_none(tiny, tmp_path, capsys):
    dest = tmp_path / "q"
    encode.main([f"--model.name_or_path={tiny['bert']}", f"--encode.input={tiny['data'] / 'queries.jsonl'}",
                 "--encode.kind=query", f"--exp.output_dir={tmp_path}", f"--encode.output={dest}"])
    assert read_meta(dest)["truncated"] == 0 and read_meta(dest)["max_length"] == 32
    assert ", truncated 0 (max 32 tokens)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ non-finite weights

def test_non_finite_weights_are_refused_by_text_id(tiny, tmp_path, monkeypatch):
    from lsr_core.modeling import SparseModel

    plain = SparseModel.encode_batch

    def broken(self, batch, is_query):  # NaN in the vector of any text holding the word "comet"
        reps = plain(self, batch, is_query)
        comet = self.tokenizer.convert_tokens_to_ids("comet")
        reps[(batch["input_ids"] == comet).any(1)] = float("nan")
        return reps

    monkeypatch.setattr(SparseModel, "encode_batch", broken)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "star planet"}\n{"id": "b", "text": "moon comet orbit"}\n'
                      '{"id": "c", "text": "bread oven"}\n')
    with pytest.raises(InputError, match=rf"^{corpus}: the model gave non-finite weights \(NaN or inf\) for id 'b': "):
        encode.main([f"--model.name_or_path={tiny['bert']}", f"--encode.input={corpus}",
                     f"--exp.output_dir={tmp_path}", f"--encode.output={tmp_path / 'o'}"])
    assert not list((tmp_path / "o").glob("part-*"))
