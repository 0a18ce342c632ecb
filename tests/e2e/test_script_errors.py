"""Each of the six scripts, run as a program, reports a bad config or input as one line `error: ...` on stderr and
exits with status 1 (lsr_core.utils.run_script): no traceback. The failures chosen come before any model loads.

evaluate.py (no torch) runs as a real process; the five others run their `__main__` block in this process through
runpy, which executes the same code without paying for importing torch and transformers five more times."""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "train.py": (["--train.lr=nan"], "error: command line: 'train.lr' must be a finite number, got 'nan'"),
    "encode.py": (["--encode.batch_sise=8"],
                  "error: command line: unknown key 'encode.batch_sise' (did you mean 'batch_size'?)"),
    "zeroshot_prompt.py": (["--zeroshot.steps=two"], "error: command line: 'zeroshot.steps' must be int, got str "
                                                     "'two'"),
    "index.py": (["--index.engine=lucene"], "error: 'index.engine' must be one of ['exact', 'qdrant-edge', "
                                            "'seismic', 'milvus'], got 'lucene'"),
    "search.py": (["--cfg", "bad.yaml"], "error: bad.yaml:3:1: invalid YAML (expected ',' or ']', but got "
                                         "'<stream end>')"),
}


@pytest.mark.parametrize("script", CASES)
def test_script_main_block_reports_a_bad_config_in_one_line(tmp_path, monkeypatch, capsys, script):
    (tmp_path / "bad.yaml").write_text("search:\n  topk: [1\n")
    monkeypatch.chdir(tmp_path)
    argv, message = CASES[script]
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert exit_info.value.code == 1
    assert capsys.readouterr() == ("", message + "\n")
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.yaml"]  # nothing written


def test_evaluate_as_a_process_reports_a_missing_file_in_one_line(tmp_path):
    missing = tmp_path / "missing.tsv"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--qrels", str(missing), "--run", "a.trec",
                           "--out", str(tmp_path / "eval")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", f"error: {missing}: file not found\n")
    assert not (tmp_path / "eval").exists()
