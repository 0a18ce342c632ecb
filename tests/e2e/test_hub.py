"""The model card and the Hub upload (lsr_core/hub.py, push_to_hub.py) and the Python API (lsr_core/api.py) on a
real tiny run: train -> encode -> index -> search -> evaluate. No network: huggingface_hub's HfApi is replaced."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import index
import lsr_core
import search
from lsr_core import hub
from lsr_core.config import ConfigError
from lsr_core.metrics import read_run
from lsr_core.sparse import load_vectors
from lsr_core.utils import InputError, load_texts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(train_tiny):
    """(collection folder, train.py output folder) after the whole chain, 5 steps of training, exact engine."""
    root, out = train_tiny("hub", 5, "--train.d_reg_weight=0.002")
    index.main([f"--exp.output_dir={out}", "--index.engine=exact"])
    search.main([f"--exp.output_dir={out}", "--search.engine=exact", f"--search.output={out}/search/tiny.trec"])
    evaluate.main(["--qrels", f"{root}/data/qrels.tsv", "--run", f"{out}/search/tiny.trec", "--out", f"{out}/eval"])
    return root / "data", out


def section(card: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert match, f"no section '{title}'"
    return match.group(1)


def table(text: str, first_cell: str) -> list[list[str]]:
    """The rows (cells) of the markdown table whose header starts with `first_cell`, header included."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]  # without the alignment row


def test_card_has_its_sections_and_the_numbers_of_metrics_and_meta(run):
    data, out = run
    src = hub.read_run(out)
    path = hub.write_card(src, "someone/tiny-lsr")
    card = path.read_text()
    assert path == out / "final" / "README.md"
    assert (out / "final" / "train_config.yaml").read_text() == (out / "config.yaml").read_text()
    assert not [p for p in (out / "final").iterdir() if p.name.endswith(".tmp")]  # written atomically

    front = card.split("---\n")[1]
    assert "library_name: transformers\n" in front and "- learned-sparse-retrieval\n" in front
    assert "- infonce\n" in front and "base_model" not in front  # trained from a local folder: no hub id to name
    assert "base_model: org/base\n" in hub.model_card(src, "someone/tiny-lsr", base="org/base")
    assert "| kind | encoder |" in section(card, "Backbone") and "BertForMaskedLM" in section(card, "Backbone")
    heads = section(card, "Heads and pooling")
    assert "| query head | MLM:" in heads and "| pooling over positions | max |" in heads
    assert f"| training examples | `{data}/train.jsonl` |" in section(card, "Training data")
    loss = section(card, "Loss and regularisers")
    assert "| loss | infonce, temperature 1, in-batch negatives on |" in loss
    assert "| document regulariser | flops, weight 0.002 (mean_of_groups) |" in loss
    last = json.loads((out / "train_log.jsonl").read_text().splitlines()[-1])
    assert f"step 5: loss {last['loss']!r}," in loss

    evaluation = section(card, "Evaluation")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = table(evaluation, "run")
    header = rows[0][1:]
    parsed = {row[0]: dict(zip(header, map(float, row[1:]))) for row in rows[1:]}
    assert parsed == metrics  # exactly: the card prints each float so that it reads back the same
    assert set(parsed["tiny"]) == {"mrr@10", "ndcg@10", "recall@100", "recall@1000"}
    cost = {row[0]: dict(zip(table(evaluation, "vectors")[0], row)) for row in table(evaluation, "vectors")[1:]}
    q_meta = json.loads((out / "encode" / "queries" / "meta.json").read_text())
    d_meta = json.loads((out / "encode" / "corpus" / "meta.json").read_text())
    assert float(cost["queries"]["FLOPs"]) == q_meta["flops"] > 0
    assert float(cost["queries"]["nnz mean"]) == q_meta["nnz_mean"]
    assert int(cost["documents"]["count"]) == d_meta["count"] == 48

    commands = section(card, "Reproduce").split("```bash\n")[1].split("```")[0].splitlines()
    assert commands == [
        "python train.py    --cfg train_config.yaml",
        f"python encode.py   --cfg {out}/config.yaml --encode.input={data}/corpus.jsonl --encode.kind=doc "
        "--encode.max_length=256",
        f"python encode.py   --cfg {out}/config.yaml --encode.input={data}/queries.jsonl --encode.kind=query "
        "--encode.max_length=32",
        f"python index.py    --cfg {out}/config.yaml --index.engine=exact",
        f"python search.py   --cfg {out}/config.yaml --search.engine=exact --search.output={out}/search/tiny.trec",
        f"python evaluate.py --qrels {data}/qrels.tsv --run {out}/search/tiny.trec "
        f"--metrics mrr@10,ndcg@10,recall@100,recall@1000 --out {out}/eval"]
    assert 'lsr_core.load("someone/tiny-lsr")' in section(card, "Use it")


class FakeApi:
    """Records the calls push_to_hub makes, and what the folder holds when it is uploaded."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        card = (Path(folder_path) / "README.md").read_text()
        self.calls.append(("upload_folder", folder_path, repo_id, kwargs, card))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_push_uploads_the_folder_with_its_card(run, monkeypatch, capsys):
    import huggingface_hub

    _, out = run
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    url = hub.main(["--run", str(out), "--repo", "someone/tiny-lsr", "--private"])
    assert url == "https://huggingface.co/someone/tiny-lsr/commit/abc"
    (create, name, create_kw), (upload, folder, repo, upload_kw, card) = FakeApi.calls
    assert (create, name, create_kw) == ("create_repo", "someone/tiny-lsr",
                                         {"repo_type": "model", "private": True, "exist_ok": True})
    assert (upload, Path(folder), repo, upload_kw["repo_type"]) == ("upload_folder", out / "final",
                                                                    "someone/tiny-lsr", "model")
    assert card == (out / "final" / "README.md").read_text() and card.startswith("---\nlibrary_name: transformers")
    assert "uploaded" in capsys.readouterr().out

    FakeApi.calls = []  # --dry-run: the card is written, nothing is called
    hub.main(["--run", str(out), "--repo", "someone/other", "--dry-run"])
    assert FakeApi.calls == []
    assert "# other\n" in (out / "final" / "README.md").read_text()
    printed = capsys.readouterr().out
    assert "would upload 7 file(s)" in printed and "README.md, config.json, lsr_config.json" in printed


def test_a_failed_upload_is_one_line_naming_the_repo(run, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    class Offline(FakeApi):
        def upload_folder(self, **kwargs):
            raise OfflineModeIsEnabled("Cannot reach https://huggingface.co/api/repos/create:\n offline mode is "
                                       "enabled.")

    _, out = run
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    with pytest.raises(InputError) as err:
        hub.main(["--run", str(out), "--repo", "someone/tiny-lsr"])
    assert str(err.value) == (f"someone/tiny-lsr: upload of {out}/final failed (OfflineModeIsEnabled: Cannot reach "
                              "https://huggingface.co/api/repos/create: offline mode is enabled.)")


def test_push_of_any_folder(run, tmp_path, monkeypatch):
    """--folder: another folder (a sentence-transformers export, say) gets the run's card and is the one uploaded."""
    import huggingface_hub

    _, out = run
    other = tmp_path / "export"
    other.mkdir()
    (other / "modules.json").write_text("[]")
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub.main(["--run", str(out), "--repo", "someone/st", "--folder", str(other)])
    assert Path(FakeApi.calls[1][1]) == other and "## Evaluation" in (other / "README.md").read_text()


def test_a_missing_file_is_one_line_naming_it(run, tmp_path):
    _, out = run
    for missing in ("eval/metrics.json", "encode/queries/meta.json", "encode/corpus/meta.json", "train_log.jsonl",
                    "final/lsr_config.json", "eval/config.yaml"):
        copy = tmp_path / missing.replace("/", "_")
        shutil.copytree(out, copy)
        (copy / missing).unlink()
        with pytest.raises(InputError, match=rf"^{re.escape(str(copy / missing))}: file not found"):
            hub.read_run(copy)
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    meta = json.loads((broken / "encode/queries/meta.json").read_text())
    del meta["flops"]
    (broken / "encode/queries/meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=rf"^{re.escape(str(broken))}/encode/queries/meta.json: no field 'flops'"):
        hub.read_run(broken)
    (broken / "eval/metrics.json").write_text('{"tiny": {"mrr@10": "high"}}')
    with pytest.raises(InputError, match=r"eval/metrics.json: expected evaluate.py's \{run: \{metric: number\}\}"):
        hub.read_run(broken)
    with pytest.raises(InputError, match="expected owner/name"):
        hub.main(["--run", str(out), "--repo", "no-owner", "--dry-run"])

    # the script: one line on stderr, status 1, nothing uploaded
    proc = subprocess.run([sys.executable, str(ROOT / "push_to_hub.py"), "--run", str(tmp_path / "eval_metrics.json"),
                           "--repo", "a/b"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path}/eval_metrics.json/eval/metrics.json: file not found; run evaluate.py " \
                          f"first (its --out folder holds metrics.json)\n"


def test_api_gives_the_scripts_vectors_rankings_and_scores(run, tmp_path):
    data, out = run
    model = lsr_core.load(out, device="cpu")  # the run folder: final/, as encode.py picks it
    assert model.name == str(out / "final") and "train.py's model" in model.why
    docs, queries = load_texts(data / "corpus.jsonl"), load_texts(data / "queries.jsonl")
    doc_ids, doc_vectors = load_vectors(out / "encode" / "corpus")
    qids, query_vectors = load_vectors(out / "encode" / "queries")
    encoded = model.encode([docs[d] for d in doc_ids], kind="document", batch_size=5)
    assert encoded == doc_vectors  # as encode.py wrote them, to the last rounded digit
    assert lsr_core.load(out / "final", device="cpu").encode([queries[q] for q in qids], kind="query") == \
        query_vectors
    index = lsr_core.build_index(doc_ids, encoded, tmp_path / "index", engine="exact")
    found = lsr_core.search(index, dict(zip(qids, query_vectors)), topk=1000)
    written = read_run(out / "search" / "tiny.trec")
    assert {q: list(hits) for q, hits in found.items()} == {q: list(hits) for q, hits in written.items()}
    assert all(abs(found[q][d] - s) <= 5e-7 for q in written for d, s in written[q].items())  # 6 decimals in .trec
    again = lsr_core.search(lsr_core.load_index(tmp_path / "index"), {"q0_0": query_vectors[0]}, topk=3)
    assert again == {"q0_0": dict(list(found[qids[0]].items())[:3])}
    metrics = json.loads((out / "eval" / "metrics.json").read_text())["tiny"]
    assert lsr_core.evaluate(found, data / "qrels.tsv") == pytest.approx(metrics, abs=1e-12)
    assert lsr_core.evaluate(out / "search" / "tiny.trec", data / "qrels.tsv") == metrics
    with pytest.raises(ValueError, match="kind must be one of"):
        model.encode(["x"], kind="passage")
    with pytest.raises(ConfigError, match="unknown key 'model.poolng'"):
        lsr_core.load(out / "final", "--model.poolng=sum")


def test_model_folder_fetches_a_pushed_model_and_passes_anything_else(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    fetched = []

    def download(repo, filename):
        if repo != "someone/pushed":
            raise EntryNotFoundError(f"{filename} not in {repo}")
        fetched.append((repo, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: str(tmp_path / "snapshot"))
    assert hub.model_folder("someone/pushed") == str(tmp_path / "snapshot")
    assert fetched == [("someone/pushed", "lsr_config.json")]
    assert hub.model_folder("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    assert hub.model_folder("pkg:cognition/model") == "pkg:cognition/model"
    assert hub.model_folder(str(tmp_path)) == str(tmp_path)
    assert fetched == [("someone/pushed", "lsr_config.json")]


def test_build_model_reads_a_pushed_repository_s_own_config(run, monkeypatch, tmp_path):
    """encode.py / train.py given the hub name of a pushed model: its lsr_config.json decides the heads, as for the
    folder it was pushed from (not the model section's defaults)."""
    import huggingface_hub
    from lsr_core.config import ModelConfig
    from lsr_core.modeling import build_model

    snapshot = tmp_path / "snapshot"
    shutil.copytree(run[1] / "final", snapshot)
    saved = json.loads((snapshot / "lsr_config.json").read_text())
    saved["logit_shift"] = -0.25
    (snapshot / "lsr_config.json").write_text(json.dumps(saved))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename: str(snapshot / filename))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo: str(snapshot))
    other = "sum" if saved["pooling"] == "max" else "max"
    model = build_model(ModelConfig(name_or_path="someone/pushed", pooling=other, dtype="float32"))
    assert model.spec.pooling == saved["pooling"] and model.spec.logit_shift == -0.25
