"""scripts/teacher_scores.py: cross-encoder and causal-LM teachers give the model's own scores in the teacher format,
batching does not change them, a killed run resumes from its partial files, a LoRA adapter merged before scoring
gives the unmerged adapter's scores, and two processes under `accelerate launch` give the one-process file."""
import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import prepare_msmarco  # noqa: E402
import teacher_scores  # noqa: E402
from lsr_core import tiny  # noqa: E402


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    prepare_msmarco.main(["--tiny", "--out", str(root / "data")])
    words = tiny.make_collection(root / "src")["words"] + ["yes", "no"]
    ce = prepare_msmarco.make_tiny_cross_encoder(root / "ce", tiny, words)
    llama = tiny.make_model(root / "llama", "llama", words)
    return root, ce, llama


def argv(root, model, out, *extra):
    data = root / "data"
    return ["--model", str(model), "--queries", str(data / "queries.train.tsv"), "--corpus",
            str(data / "collection.tsv"), "--candidates", str(data / "candidates.train.tsv"), "--out", str(out),
            *extra]


def read(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def test_cross_encoder_scores_are_the_models_logits(fixture, tmp_path):
    root, ce, _ = fixture
    out = teacher_scores.main(argv(root, ce, tmp_path / "t.json.gz", "--batch-size", "7"))
    scores = read(out)
    assert len(scores) == 32 and all(len(c) == 8 for c in scores.values())
    tok = transformers.AutoTokenizer.from_pretrained(ce)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ce).eval()
    query = dict(line.split("\t") for line in (root / "data" / "queries.train.tsv").read_text().splitlines())["q0_0"]
    docs = dict(line.split("\t") for line in (root / "data" / "collection.tsv").read_text().splitlines())
    pid = "d0_0"
    with torch.no_grad():
        expected = model(**tok(query, docs[pid], return_tensors="pt")).logits[0, 0].item()
    assert scores["q0_0"][pid] == pytest.approx(expected, abs=1e-5)  # padding in a batch of 7 changes nothing
    # a different batch size gives the same file
    other = read(teacher_scores.main(argv(root, ce, tmp_path / "u.json.gz", "--batch-size", "64")))
    assert all(other[q][d] == pytest.approx(s, abs=1e-5) for q, c in scores.items() for d, s in c.items())


def test_causal_lm_scores_the_yes_logit(fixture, tmp_path):
    root, _, llama = fixture
    out = teacher_scores.main(argv(root, llama, tmp_path / "l.json.gz", "--max-queries", "2", "--prompt",
                                   "{query} {doc}"))
    scores = read(out)
    assert list(scores) == ["q0_0", "q0_1"]
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    docs = dict(line.split("\t") for line in (root / "data" / "collection.tsv").read_text().splitlines())
    query = dict(line.split("\t") for line in (root / "data" / "queries.train.tsv").read_text().splitlines())["q0_0"]
    pid = next(iter(scores["q0_0"]))
    with torch.no_grad():
        logits = model(**tok(f"{query} {docs[pid]}", return_tensors="pt")).logits[0, -1]
    assert scores["q0_0"][pid] == pytest.approx(logits[tok.convert_tokens_to_ids("yes")].item(), abs=1e-4)


def test_resume_keeps_finished_queries(fixture, tmp_path):
    root, ce, _ = fixture
    out = tmp_path / "t.json.gz"
    # a killed run: one query finished (with a marker score), the next line cut mid-write
    Path(f"{out}.partial-0.jsonl").write_text(json.dumps({"qid": "q0_0", "scores": {"d0_0": 123.0}}) + '\n{"qid": "q0')
    scores = read(teacher_scores.main(argv(root, ce, out)))
    assert scores["q0_0"] == {"d0_0": 123.0} and len(scores) == 32 and len(scores["q0_1"]) == 8
    assert not Path(f"{out}.partial-0.jsonl").exists()
    assert teacher_scores.main(argv(root, ce, out)) == out and read(out) == scores  # done: left alone


def assert_same_scores(got, expected, tol=1e-5):
    assert list(got) == list(expected)
    for qid, cand in expected.items():
        assert got[qid].keys() == cand.keys(), qid
        assert all(got[qid][d] == pytest.approx(s, abs=tol) for d, s in cand.items()), qid


def test_stopped_run_resumes_to_the_uninterrupted_file(fixture, tmp_path):
    root, ce, _ = fixture
    full = read(teacher_scores.main(argv(root, ce, tmp_path / "full.json.gz", "--batch-size", "5")))
    out = tmp_path / "t.json.gz"
    assert teacher_scores.main(argv(root, ce, out, "--batch-size", "5", "--stop-after", "3")) is None  # "killed"
    partial = Path(f"{out}.partial-0.jsonl")
    lines = partial.read_text().splitlines()
    assert not out.exists() and len(lines) == 3
    with open(partial, "a") as f:  # and the kill tore the line being written
        f.write('{"qid": "q0_3", "scores": {"d0_')
    assert_same_scores(read(teacher_scores.main(argv(root, ce, out, "--batch-size", "5"))), full)
    assert not partial.exists()


def test_partial_file_with_a_bad_complete_line_is_an_error(fixture, tmp_path):
    root, ce, _ = fixture
    out = tmp_path / "t.json.gz"
    Path(f"{out}.partial-1.jsonl").write_text('{"qid": "q0_0"}\n')
    with pytest.raises(teacher_scores.InputError, match=r"partial-1.jsonl:1: not a line"):
        teacher_scores.main(argv(root, ce, out))


def test_lora_adapter_is_merged_and_scores_as_the_unmerged_adapter(fixture, tmp_path):
    """RankLLaMA's layout: a causal-LM base folder and a SEQ_CLS LoRA adapter that carries a 1-label score head."""
    import peft

    root, _, llama = fixture
    torch.manual_seed(1)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)  # random B: the adapter changes the scores
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    out = teacher_scores.main(argv(root, "", tmp_path / "r.json.gz", "--adapter", str(tmp_path / "adapter"),
                                   "--num-labels", "1", "--max-queries", "2", "--batch-size", "3")[2:])
    scores = read(out)
    assert list(scores) == ["q0_0", "q0_1"] and all(len(c) == 8 for c in scores.values())

    tok = transformers.AutoTokenizer.from_pretrained(llama)
    torch.manual_seed(2)  # a different random head: the adapter's saved one must replace it
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1)
    unmerged = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1).eval()
    queries = dict(line.split("\t") for line in (root / "data" / "queries.train.tsv").read_text().splitlines())
    docs = dict(line.split("\t") for line in (root / "data" / "collection.tsv").read_text().splitlines())
    for qid, cand in scores.items():
        for pid, score in cand.items():
            batch = tok(queries[qid], docs[pid], return_tensors="pt")
            with torch.no_grad():
                expected = unmerged(**batch).logits[0, 0].item()
                without = plain(**batch).logits[0, 0].item()
            assert score == pytest.approx(expected, abs=1e-5), (qid, pid)
            assert abs(score - without) > 1e-3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Two CPU processes (gloo) under accelerate launch; `--multi_gpu` because `--cpu` would start one."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(Path(teacher_scores.__file__)), *args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher's variables in the test environment would join the wrong group
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_equal_one_process(fixture, tmp_path):
    root, ce, _ = fixture
    one = read(teacher_scores.main(argv(root, ce, tmp_path / "one.json.gz", "--max-queries", "12")))
    out = tmp_path / "two.json.gz"
    launch(argv(root, ce, out, "--max-queries", "12", "--stop-after", "2"), tmp_path)  # each process "killed"
    partials = [Path(f"{out}.partial-{rank}.jsonl") for rank in (0, 1)]
    logged = [[json.loads(line)["qid"] for line in p.read_text().splitlines()] for p in partials]
    assert not out.exists() and logged == [["q0_0", "q0_2"], ["q0_1", "q0_3"]]  # queries by position modulo 2
    with open(partials[1], "a") as f:
        f.write('{"qid": "q0_5", "sco')  # torn by the kill
    proc = launch(argv(root, ce, out, "--max-queries", "12"), tmp_path)
    assert proc.stdout.count("scored 12 queries") == 1  # merged and reported by the main process only
    assert_same_scores(read(out), one)
    assert not any(p.exists() for p in partials)
